//! Coordination through the scheduler, shared by every client and every task: [`Lock`],
//! [`Semaphore`], [`Queue`], [`Variable`], [`Event`], [`Pub`]/[`Sub`] topics, published datasets
//! and metadata (dask's `distributed.Lock`, ..., `Client.publish_dataset`, `set_metadata`).
//!
//! Names are shared across clients. A client (or worker) that goes releases its locks and
//! semaphore leases; queues, variables, events, datasets and metadata stay, as in dask. A future
//! put in a queue, a variable or a dataset stays alive while it is there. Every call has a
//! blocking form and an `_async` one; waits take an optional timeout.
mod datasets;
mod primitives;
mod pubsub;
mod shared;

use std::time::Duration;

use dask_protocol::codec::Value;
use dask_protocol::pb::{self, coord_reply::Kind, coord_request::Op};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use datasets::Datasets;
pub use primitives::{Event, Lock, LockGuard, Semaphore};
pub use pubsub::{Pub, Sub};
pub use shared::{Queue, Shared, Variable};

use crate::{Client, Error, Future, Result};

/// How long a request may wait at the scheduler.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    No,
    Forever,
    For(Duration),
}

impl Wait {
    fn from_timeout(t: Option<Duration>) -> Wait {
        match t {
            None => Wait::Forever,
            Some(d) if d.is_zero() => Wait::No,
            Some(d) => Wait::For(d),
        }
    }

    fn seconds(self) -> f64 {
        match self {
            Wait::No => 0.0,
            Wait::Forever => -1.0,
            Wait::For(d) => d.as_secs_f64(),
        }
    }
}

/// An answer: what the scheduler said, or that the wait ran out.
pub(crate) enum Answer {
    Said(Kind),
    /// Items, and the id of the request they answer (acknowledged once their futures exist).
    Items(Vec<pb::Item>, u64),
    TimedOut,
}

impl Client {
    /// Sends one coordination request on the client stream (after everything sent before it)
    /// and waits for its answer. A refusal is [`Error::Refused`].
    pub(crate) async fn coord(&self, name: &str, wait: Wait, op: Op) -> Result<Answer> {
        self.check_open()?;
        let link = self.inner.link.clone();
        let orphan = match &op {
            Op::Acquire(a) => crate::replies::Orphan::Lease { name: name.to_string(), lease: a.lease },
            _ => crate::replies::Orphan::Nothing,
        };
        let (id, rx) = link.replies.expect_or(orphan);
        self.inner.send(pb::client_op::Kind::Coord(pb::CoordRequest {
            id,
            name: name.to_string(),
            timeout_s: wait.seconds(),
            op: Some(op),
        }));
        let lost = || {
            let why = self.check_open().err().map_or_else(|| "the connection was lost".to_string(), |e| e.to_string());
            Error::SchedulerLost(format!("no answer to a request about {name:?}: {why}"))
        };
        let reply = rx.await.map_err(|_| lost())?;
        match reply.kind {
            Some(Kind::Error(e)) => Err(Error::Refused(e)),
            Some(Kind::TimedOut(_)) => Ok(Answer::TimedOut),
            Some(Kind::Items(list)) => Ok(Answer::Items(list.items, id)),
            Some(kind) => Ok(Answer::Said(kind)),
            None => Err(Error::Refused(format!("the scheduler gave an empty answer about {name:?}"))),
        }
    }

    /// Turns received items (the answer to request `id`) into values or futures (futures this
    /// client now holds), then tells the scheduler it holds them: it kept them alive meanwhile.
    fn items_to_shared<T: DeserializeOwned + 'static>(&self, items: Vec<pb::Item>, id: u64) -> Result<Vec<Shared<T>>> {
        let any_key = items.iter().any(|i| !i.key.is_empty());
        let shared: Vec<Shared<T>> = items
            .into_iter()
            .map(|i| {
                if i.key.is_empty() {
                    let codec = dask_protocol::codec::codec_name(&i.codec)?;
                    Ok(Shared::Value(Value { codec, data: i.data }.decode()?))
                } else {
                    Ok(Shared::Future(self.future_of(&i.key)))
                }
            })
            .collect::<Result<_>>()?;
        if any_key {
            // After the futures' wants, on the same stream; no answer awaited.
            self.inner.send(self.inner.link.replies.request(String::new(), Op::Ack(id)));
        }
        Ok(shared)
    }
}

/// A value as an item.
fn value_item<T: Serialize + ?Sized>(value: &T) -> Result<pb::Item> {
    let v = Value::encode(value)?;
    Ok(pb::Item { codec: v.codec.to_string(), data: v.data, key: String::new() })
}

/// A future as an item: the scheduler keeps its key alive while it holds the item.
fn future_item<T>(future: &Future<T>) -> pb::Item {
    pb::Item { key: future.key().to_string(), ..Default::default() }
}

/// What a request that should answer `what` said instead.
pub(crate) fn unexpected(what: &str, kind: Answer) -> Error {
    let said = match kind {
        Answer::TimedOut => "timed out".to_string(),
        Answer::Items(items, _) => format!("{} items", items.len()),
        Answer::Said(k) => format!("{k:?}"),
    };
    Error::Refused(format!("the scheduler answered a {what} request with {said}"))
}

/// A name for an unnamed primitive (dask uses a uuid): a fresh key of this client.
fn fresh_name(client: &Client, kind: &str) -> String {
    client.inner.unique_key(kind)
}
