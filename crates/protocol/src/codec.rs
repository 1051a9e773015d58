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
        Ok(Value { codec: MSGPACK, data: Bytes::from(rmp_serde::to_vec(value)?) })
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
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
