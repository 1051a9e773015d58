//! Moving values over the data service in chunks, so no value is limited by a gRPC message
//! size, and no byte is copied that need not be: outgoing chunks are slices of the stored
//! `Bytes`; an incoming value that arrives in one part is kept as that part's `Bytes`.
use bytes::{Bytes, BytesMut};
use tonic::transport::Channel;

use crate::DATA_CHUNK;
use crate::codec::{Value, codec_name};
use crate::pb::{self, worker_data_client::WorkerDataClient};

/// Splits values into frames of about [`DATA_CHUNK`] bytes; small values share a frame.
/// `None` values are sent as `missing`.
pub fn frames(values: Vec<(String, Option<Value>)>) -> Vec<pb::DataFrame> {
    let mut frames = Vec::new();
    let mut parts = Vec::new();
    let mut size = 0usize;
    for (key, value) in values {
        match value {
            None => parts.push(pb::DataPart { key, missing: true, ..Default::default() }),
            Some(v) => {
                let total = v.data.len();
                let mut offset = 0;
                loop {
                    let room = DATA_CHUNK.saturating_sub(size).max(1);
                    let end = (offset + room).min(total);
                    parts.push(pb::DataPart {
                        key: key.clone(),
                        total_len: total as u64,
                        codec: v.codec.to_string(),
                        data: v.data.slice(offset..end),
                        missing: false,
                        type_name: String::new(),
                    });
                    size += end - offset + key.len() + 16;
                    offset = end;
                    if size >= DATA_CHUNK {
                        frames.push(pb::DataFrame { parts: std::mem::take(&mut parts) });
                        size = 0;
                    }
                    if offset >= total {
                        break;
                    }
                }
            }
        }
    }
    if !parts.is_empty() {
        frames.push(pb::DataFrame { parts });
    }
    frames
}

/// Reassembles values from frames, in arrival order.
#[derive(Default)]
pub struct Assembler {
    current: Option<(String, &'static str, usize, Partial)>,
    done: Vec<(String, Option<Value>)>,
}

enum Partial {
    Empty,
    One(Bytes),
    Many(BytesMut),
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("failed to read data from a peer: {0}")]
    Transport(#[from] tonic::Status),
    #[error("failed to reassemble a value: {0}")]
    Protocol(String),
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
}

impl Assembler {
    pub fn push(&mut self, frame: pb::DataFrame) -> Result<(), DataError> {
        for part in frame.parts {
            if part.missing {
                self.finish_current()?;
                self.done.push((part.key, None));
                continue;
            }
            let same = matches!(&self.current, Some((k, ..)) if *k == part.key);
            if !same {
                self.finish_current()?;
                let codec = codec_name(&part.codec)?;
                self.current = Some((part.key.clone(), codec, part.total_len as usize, Partial::Empty));
            }
            let (_, _, total, partial) = self.current.as_mut().expect("current");
            *partial = match std::mem::replace(partial, Partial::Empty) {
                Partial::Empty if part.data.len() == *total => Partial::One(part.data),
                Partial::Empty => {
                    let mut buf = BytesMut::with_capacity(*total);
                    buf.extend_from_slice(&part.data);
                    Partial::Many(buf)
                }
                Partial::One(b) => {
                    let mut buf = BytesMut::with_capacity(*total);
                    buf.extend_from_slice(&b);
                    buf.extend_from_slice(&part.data);
                    Partial::Many(buf)
                }
                Partial::Many(mut buf) => {
                    buf.extend_from_slice(&part.data);
                    Partial::Many(buf)
                }
            };
        }
        Ok(())
    }

    fn finish_current(&mut self) -> Result<(), DataError> {
        if let Some((key, codec, total, partial)) = self.current.take() {
            let data = match partial {
                Partial::Empty => Bytes::new(),
                Partial::One(b) => b,
                Partial::Many(b) => b.freeze(),
            };
            if data.len() != total {
                return Err(DataError::Protocol(format!("value {key:?} has {} of {total} bytes", data.len())));
            }
            self.done.push((key, Some(Value { codec, data })));
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<Vec<(String, Option<Value>)>, DataError> {
        self.finish_current()?;
        Ok(self.done)
    }
}

/// Fetches `keys` from a worker's data service. Keys the worker lacks come back as `None`.
pub async fn get_data(
    client: &mut WorkerDataClient<Channel>,
    keys: Vec<String>,
) -> Result<Vec<(String, Option<Value>)>, DataError> {
    let mut stream = client.get_data(pb::DataRequest { keys }).await?.into_inner();
    let mut asm = Assembler::default();
    while let Some(frame) = stream.message().await? {
        asm.push(frame)?;
    }
    asm.finish()
}

/// A lazily connecting data-service client with our message limits.
pub fn data_client(address: &crate::addr::Address) -> Result<WorkerDataClient<Channel>, tonic::transport::Error> {
    // Keep-alives notice a peer that stopped answering (a hung or partitioned worker), so a
    // fetch fails over to another holder instead of waiting forever.
    let channel = crate::serve::endpoint(address, std::time::Duration::from_secs(10))?.connect_lazy();
    Ok(WorkerDataClient::new(channel)
        .max_decoding_message_size(crate::MAX_MESSAGE)
        .max_encoding_message_size(crate::MAX_MESSAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_round_trips_small_big_and_missing() {
        let big: Vec<u8> = (0..(3 * DATA_CHUNK + 17)).map(|i| i as u8).collect();
        let values = vec![
            ("a".to_string(), Some(Value { codec: "msgpack", data: Bytes::from_static(b"\x01") })),
            ("big".to_string(), Some(Value { codec: "msgpack", data: Bytes::from(big.clone()) })),
            ("gone".to_string(), None),
            ("empty".to_string(), Some(Value { codec: "msgpack", data: Bytes::new() })),
        ];
        let frames = frames(values);
        assert!(frames.len() >= 4, "a 3 MiB value spans several frames");
        for f in &frames {
            let n: usize = f.parts.iter().map(|p| p.data.len()).sum();
            assert!(n <= DATA_CHUNK);
        }
        let mut asm = Assembler::default();
        for f in frames {
            asm.push(f).unwrap();
        }
        let out = asm.finish().unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(&out[0].1.as_ref().unwrap().data[..], b"\x01");
        assert_eq!(out[1].1.as_ref().unwrap().data, Bytes::from(big));
        assert!(out[2].1.is_none());
        assert!(out[3].1.as_ref().unwrap().data.is_empty());
    }
}
