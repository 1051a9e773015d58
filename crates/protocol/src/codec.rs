//! Value encoding. A value travels as `(codec, bytes)`; the scheduler never looks inside.
//! Rust tasks use msgpack ([`MSGPACK`]) through `rmp-serde`, with structs as arrays.
use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

/// Codec name of msgpack-encoded values.
pub const MSGPACK: &str = "msgpack";

/// An encoded value: the bytes and the name of the codec that made them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    pub codec: &'static str,
    pub data: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("failed to encode a value as msgpack: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("failed to decode a {codec} value as {expected}: {source}")]
    Decode {
        codec: String,
        expected: &'static str,
        #[source]
        source: rmp_serde::decode::Error,
    },
    #[error("failed to decode a value: codec {0:?} is not known here (expected \"msgpack\")")]
    UnknownCodec(String),
}

impl Value {
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Value, CodecError> {
        Ok(Value { codec: MSGPACK, data: Bytes::from(to_msgpack(value)?) })
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Encodes `value` as msgpack into a buffer of exactly the right size. Large values (byte
/// buffers of hundreds of MB) would otherwise grow the buffer by doubling: each step copies
/// everything so far into fresh memory the kernel must zero first.
pub fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    // Pass 1 counts the bytes, keeping the first 256: small values are done here.
    let mut head = Vec::with_capacity(256);
    let mut counter = Capped { buf: &mut head, total: 0 };
    rmp_serde::encode::write(&mut counter, value)?;
    let total = counter.total;
    if total <= head.capacity() {
        return Ok(head);
    }
    // Pass 2 writes into a buffer of the exact size (for bytes, counting cost nothing).
    let mut exact = Vec::with_capacity(total);
    rmp_serde::encode::write(&mut exact, value)?;
    Ok(exact)
}

/// A writer that keeps the first 256 bytes and counts the rest.
struct Capped<'a> {
    buf: &'a mut Vec<u8>,
    total: usize,
}

impl std::io::Write for Capped<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.total += data.len();
        let room = 256usize.saturating_sub(self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..room]);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Interns the codec names we know so `Value` can hold a `&'static str`.
pub fn codec_name(name: &str) -> Result<&'static str, CodecError> {
    match name {
        MSGPACK | "" => Ok(MSGPACK),
        other => Err(CodecError::UnknownCodec(other.to_string())),
    }
}

/// Decodes `data` (made by codec `codec`) as a `T`.
pub fn decode<T: DeserializeOwned>(codec: &str, data: &[u8]) -> Result<T, CodecError> {
    codec_name(codec)?;
    rmp_serde::from_slice(data).map_err(|source| CodecError::Decode {
        codec: codec.to_string(),
        expected: std::any::type_name::<T>(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_size_encoding_matches_rmp() {
        for v in [vec![1u8; 0], vec![7u8; 10], vec![9u8; 300], vec![3u8; 100_000]] {
            let b = serde_bytes::ByteBuf::from(v.clone());
            let ours = to_msgpack(&b).unwrap();
            assert_eq!(ours, rmp_serde::to_vec(&b).unwrap());
            assert_eq!(ours.capacity(), ours.len().max(256), "no over-allocation");
            let back: serde_bytes::ByteBuf = decode(MSGPACK, &ours).unwrap();
            assert_eq!(back.into_vec(), v);
        }
        let nested = (1i64, "text".to_string(), vec![0.5f64; 1000]);
        assert_eq!(to_msgpack(&nested).unwrap(), rmp_serde::to_vec(&nested).unwrap());
    }
}
