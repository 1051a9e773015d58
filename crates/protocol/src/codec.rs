//! Value encoding. A value travels as `(codec, bytes)`; the scheduler never looks inside.
//!
//! * [`MSGPACK`]: values of Rust tasks in general, through `rmp-serde`, with structs as arrays.
//! * [`RAW`]: byte buffers (`bytes::Bytes`, `serde_bytes::ByteBuf`, `Vec<u8>`) as they are,
//!   with no header, so a buffer of hundreds of MB is never copied to be encoded or decoded:
//!   a `Bytes` result, stored, sent and received, is the same allocation until the kernel
//!   copies it into a socket. Any type that serde can read from bytes or a sequence of `u8`
//!   reads a raw value; a `Bytes` also reads a msgpack `bin` value without a copy.
use std::any::{Any, TypeId};

use bytes::Bytes;
use serde::Serialize;
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde_bytes::ByteBuf;

/// Codec name of msgpack-encoded values.
pub const MSGPACK: &str = "msgpack";
/// Codec name of raw byte buffers.
pub const RAW: &str = "bytes";

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
    #[error("failed to decode a {codec} value as {expected}: {why}")]
    Decode { codec: &'static str, expected: &'static str, why: String },
    #[error("failed to decode a value: codec {0:?} is not known here (expected \"msgpack\" or \"bytes\")")]
    UnknownCodec(String),
}

impl Value {
    /// Encodes `value` as msgpack.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Value, CodecError> {
        Ok(Value { codec: MSGPACK, data: Bytes::from(to_msgpack(value)?) })
    }

    /// Encodes an owned value: byte buffers become [`RAW`] values without a copy, anything
    /// else is msgpack.
    pub fn from_owned<T: Serialize + 'static>(value: T) -> Result<Value, CodecError> {
        let value = match cast::<T, Bytes>(value) {
            Ok(b) => return Ok(Value::raw(b)),
            Err(v) => v,
        };
        let value = match cast::<T, ByteBuf>(value) {
            Ok(b) => return Ok(Value::raw(Bytes::from(b.into_vec()))),
            Err(v) => v,
        };
        match cast::<T, Vec<u8>>(value) {
            Ok(b) => Ok(Value::raw(Bytes::from(b))),
            Err(v) => Value::encode(&v),
        }
    }

    /// A raw byte buffer.
    pub fn raw(data: Bytes) -> Value {
        Value { codec: RAW, data }
    }

    /// Decodes this value as a `T`. A `Bytes` is a view of this value's buffer (no copy).
    pub fn decode<T: DeserializeOwned + 'static>(&self) -> Result<T, CodecError> {
        match self.as_byte_type() {
            Some(t) => Ok(t),
            None => decode(self.codec, &self.data),
        }
    }

    /// The value as `T` without serde when `T` is a byte type: a `Bytes` view (of a raw value or
    /// a msgpack `bin`), or one copy into a `Vec<u8>` or `ByteBuf` (of a raw value; serde would
    /// go byte by byte). `None` for any other type or encoding.
    pub fn as_byte_type<T: 'static>(&self) -> Option<T> {
        let t = TypeId::of::<T>();
        if t == TypeId::of::<Bytes>() {
            return cast(self.as_bytes()?).ok();
        }
        if self.codec != RAW {
            return None;
        }
        if t == TypeId::of::<Vec<u8>>() {
            return cast(self.data.to_vec()).ok();
        }
        if t == TypeId::of::<ByteBuf>() {
            return cast(ByteBuf::from(self.data.to_vec())).ok();
        }
        None
    }

    /// The value as a byte buffer without copying: a raw value, or a msgpack `bin`.
    pub fn as_bytes(&self) -> Option<Bytes> {
        match self.codec {
            RAW => Some(self.data.clone()),
            _ => {
                let d = &self.data;
                let (head, len) = match d.first()? {
                    0xc4 => (2, *d.get(1)? as usize),
                    0xc5 => (3, u16::from_be_bytes(d.get(1..3)?.try_into().ok()?) as usize),
                    0xc6 => (5, u32::from_be_bytes(d.get(1..5)?.try_into().ok()?) as usize),
                    _ => return None,
                };
                (d.len() == head + len).then(|| d.slice(head..))
            }
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// `t` as a `U` if `T` is `U`; `t` back otherwise. (A type test without `unsafe`.)
pub fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.take().expect("just filled")),
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
        RAW => Ok(RAW),
        other => Err(CodecError::UnknownCodec(other.to_string())),
    }
}

/// Decodes `data` (made by codec `codec`) as a `T`.
pub fn decode<T: DeserializeOwned>(codec: &str, data: &[u8]) -> Result<T, CodecError> {
    let codec = codec_name(codec)?;
    let expected = std::any::type_name::<T>();
    match codec {
        RAW => T::deserialize(RawDeserializer(data)).map_err(|e| CodecError::Decode { codec, expected, why: e.0 }),
        _ => rmp_serde::from_slice(data).map_err(|e| CodecError::Decode { codec, expected, why: e.to_string() }),
    }
}

/// Error of [`RawDeserializer`].
#[derive(Debug)]
pub struct RawError(String);

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for RawError {}
impl de::Error for RawError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        RawError(msg.to_string())
    }
}

/// Reads a raw byte buffer as bytes, or as a sequence of `u8`.
#[derive(Clone, Copy)]
pub struct RawDeserializer<'a>(pub &'a [u8]);

impl<'de> serde::Deserializer<'de> for RawDeserializer<'_> {
    type Error = RawError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        visitor.visit_bytes(self.0)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        visitor.visit_byte_buf(self.0.to_vec())
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        visitor.visit_seq(de::value::SeqDeserializer::new(
            self.0.iter().map(|b| IntoDeserializer::<RawError>::into_deserializer(*b)),
        ))
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, RawError> {
        self.deserialize_seq(visitor)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, RawError> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        visitor.visit_some(self)
    }
    fn is_human_readable(&self) -> bool {
        false
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes unit unit_struct
        tuple_struct map struct enum identifier ignored_any
    }
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

    #[test]
    fn byte_buffers_are_raw_and_not_copied() {
        let b = Bytes::from(vec![5u8; 1000]);
        let v = Value::from_owned(b.clone()).unwrap();
        assert_eq!(v.codec, RAW);
        assert_eq!(v.data.as_ptr(), b.as_ptr(), "encoding a Bytes shares its buffer");
        let back: Bytes = v.decode().unwrap();
        assert_eq!(back.as_ptr(), b.as_ptr(), "decoding as Bytes shares the buffer");
        // Other byte types read raw values, by serde.
        assert_eq!(v.decode::<ByteBuf>().unwrap().into_vec(), vec![5u8; 1000]);
        assert_eq!(v.decode::<Vec<u8>>().unwrap(), vec![5u8; 1000]);
        assert_eq!(v.decode::<Vec<u16>>().unwrap(), vec![5u16; 1000]);
        assert_eq!(v.decode::<Option<Vec<u8>>>().unwrap(), Some(vec![5u8; 1000]));
        let e = v.decode::<i64>().unwrap_err().to_string();
        assert!(e.contains("bytes value as i64"), "{e}");
        // ByteBuf and Vec<u8> are raw too; other types stay msgpack.
        let v = Value::from_owned(ByteBuf::from(vec![1, 2, 3])).unwrap();
        assert_eq!((v.codec, &v.data[..]), (RAW, &[1u8, 2, 3][..]));
        let v = Value::from_owned(vec![1u8, 2]).unwrap();
        assert_eq!((v.codec, &v.data[..]), (RAW, &[1u8, 2][..]));
        assert_eq!(Value::from_owned(7i64).unwrap(), Value::encode(&7i64).unwrap());
    }

    #[test]
    fn msgpack_bin_reads_as_bytes_without_copy() {
        for n in [0usize, 3, 300, 70_000] {
            let v = Value::encode(&ByteBuf::from(vec![9u8; n])).unwrap();
            let b: Bytes = v.decode().unwrap();
            assert_eq!(b.len(), n);
            assert_eq!(b.as_ptr(), v.data[v.data.len() - n..].as_ptr());
        }
        // Not a bin: serde decides (a msgpack array of small ints reads as bytes).
        let v = Value::encode(&vec![1u8, 2, 3]).unwrap();
        assert_eq!(&v.decode::<Bytes>().unwrap()[..], &[1, 2, 3]);
        assert!(Value::encode(&"text").unwrap().as_bytes().is_none());
    }

    #[test]
    fn unknown_codecs_are_named() {
        let e = decode::<i64>("pickle", b"").unwrap_err().to_string();
        assert!(e.contains("\"pickle\""), "{e}");
    }
}
