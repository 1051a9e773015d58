//! [`Pub`] and [`Sub`]: messages on named topics (dask's `distributed.Pub` / `Sub`), carried by
//! the scheduler to every client subscribed at the time of the `put`.
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dask_protocol::codec::Value;
use dask_protocol::pb::{self, coord_reply::Kind, coord_request::Op};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::{Answer, Wait, unexpected, value_item};
use crate::{Client, Error, Result};

/// Publishes messages of type `T` on a topic.
pub struct Pub<T> {
    client: Client,
    topic: String,
    _t: PhantomData<fn(T)>,
}

impl<T> std::fmt::Debug for Pub<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<Pub: {}>", self.topic)
    }
}

impl<T: Serialize> Pub<T> {
    pub fn new(client: &Client, topic: impl Into<String>) -> Pub<T> {
        Pub { client: client.clone(), topic: topic.into(), _t: PhantomData }
    }

    /// Sends `message` to every subscriber of the topic now (none: it is dropped, as in dask).
    pub fn put(&self, message: &T) -> Result<()> {
        let item = value_item(message)?;
        self.client.inner.block_on(self.put_item(item))
    }

    pub async fn put_async(&self, message: &T) -> Result<()> {
        self.put_item(value_item(message)?).await
    }

    async fn put_item(&self, item: pb::Item) -> Result<()> {
        match self.client.coord(&self.topic, Wait::No, Op::Publish(item)).await? {
            Answer::Said(Kind::Done(_)) => Ok(()),
            other => Err(unexpected("publish", other)),
        }
    }
}

static NEXT_SUB: AtomicU64 = AtomicU64::new(1);

/// Receives the messages of a topic published after it subscribed. Dropping it unsubscribes.
pub struct Sub<T> {
    client: Client,
    topic: String,
    id: u64,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<pb::Item>>,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Sub<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<Sub: {}>", self.topic)
    }
}

impl<T: DeserializeOwned + 'static> Sub<T> {
    /// Subscribes (the scheduler knows of it when this returns).
    pub fn new(client: &Client, topic: impl Into<String>) -> Result<Sub<T>> {
        client.inner.block_on(Sub::new_async(client, topic))
    }

    pub async fn new_async(client: &Client, topic: impl Into<String>) -> Result<Sub<T>> {
        let topic = topic.into();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = NEXT_SUB.fetch_add(1, Ordering::Relaxed);
        let sub = Sub { client: client.clone(), topic, id, rx: tokio::sync::Mutex::new(rx), _t: PhantomData };
        client.check_open()?;
        let replies = &client.inner.link.replies;
        let answer = replies.subscribe(&sub.topic, id, tx, || {
            let (rid, rx) = replies.expect();
            client.inner.send(pb::client_op::Kind::Coord(pb::CoordRequest {
                id: rid,
                name: sub.topic.clone(),
                timeout_s: 0.0,
                op: Some(Op::Subscribe(pb::Empty {})),
            }));
            rx
        });
        if let Some(rx) = answer {
            let reply = rx.await.map_err(|_| Error::SchedulerLost("no answer to a subscribe".into()))?;
            if let Some(Kind::Error(e)) = reply.kind {
                return Err(Error::Refused(e));
            }
        }
        Ok(sub)
    }

    /// The next message, waiting for one.
    pub fn get(&self) -> Result<T> {
        self.client.inner.block_on(self.get_async(None))
    }

    /// The next message, waiting at most `timeout` ([`Error::Timeout`] then).
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        self.client.inner.block_on(self.get_async(Some(timeout)))
    }

    pub async fn get_async(&self, timeout: Option<Duration>) -> Result<T> {
        let mut rx = self.rx.lock().await;
        let item = match timeout {
            None => rx.recv().await,
            Some(t) => tokio::time::timeout(t, rx.recv())
                .await
                .map_err(|_| Error::Timeout { what: format!("a message on topic {:?}", self.topic), after: t })?,
        };
        let item = item.ok_or_else(|| Error::SchedulerLost("the client's connection ended".into()))?;
        let codec = dask_protocol::codec::codec_name(&item.codec)?;
        Ok(Value { codec, data: item.data }.decode()?)
    }
}

impl<T> Drop for Sub<T> {
    fn drop(&mut self) {
        let replies = &self.client.inner.link.replies;
        replies.unsubscribe(&self.topic, self.id, || {
            // The last one here: the scheduler stops sending (no answer awaited).
            self.client.inner.send(replies.request(self.topic.clone(), Op::Unsubscribe(pb::Empty {})));
        });
    }
}
