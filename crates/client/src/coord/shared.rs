//! [`Queue`] and [`Variable`]: values and futures shared through the scheduler.
use std::marker::PhantomData;
use std::time::Duration;

use dask_protocol::pb::{self, coord_reply::Kind, coord_request::Op};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Answer, Wait, fresh_name, future_item, unexpected, value_item};
use crate::{Client, Error, Future, Result};

/// What a queue or variable holds: a value, or a future (whose result stays on the cluster).
#[derive(Debug)]
pub enum Shared<T> {
    Value(T),
    Future(Future<T>),
}

impl<T: DeserializeOwned + 'static> Shared<T> {
    /// The value itself: a future's result is fetched.
    pub fn result(self) -> Result<T> {
        match self {
            Shared::Value(v) => Ok(v),
            Shared::Future(f) => f.result(),
        }
    }

    pub async fn result_async(self) -> Result<T> {
        match self {
            Shared::Value(v) => Ok(v),
            Shared::Future(f) => f.result_async().await,
        }
    }
}

impl<T> Shared<T> {
    /// The future, if a future was shared.
    pub fn into_future(self) -> Option<Future<T>> {
        match self {
            Shared::Future(f) => Some(f),
            Shared::Value(_) => None,
        }
    }
}

/// A first-in first-out queue shared by every client and task that names it (dask's
/// `distributed.Queue`): values or futures of type `T`. A future in the queue stays alive until
/// someone takes it. The queue and its items outlive the clients that made them.
pub struct Queue<T> {
    client: Client,
    name: String,
    maxsize: u32,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<Queue: {}, maxsize={}>", self.name, self.maxsize)
    }
}

impl<T: Serialize + DeserializeOwned + 'static> Queue<T> {
    /// The queue called `name`, without bound.
    pub fn new(client: &Client, name: impl Into<String>) -> Queue<T> {
        Queue { client: client.clone(), name: name.into(), maxsize: 0, _t: PhantomData }
    }

    /// A queue of at most `maxsize` items (0: no bound); puts wait for room. The bound counts
    /// when the queue's first user creates it.
    pub fn bounded(client: &Client, name: impl Into<String>, maxsize: u32) -> Queue<T> {
        Queue { maxsize, ..Queue::new(client, name) }
    }

    /// A queue with a fresh name (dask's `Queue()`).
    pub fn unnamed(client: &Client) -> Queue<T> {
        Queue::new(client, fresh_name(client, "queue"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn put_item(&self, item: pb::Item, timeout: Option<Duration>) -> Result<()> {
        let op = Op::QueuePut(pb::QueuePut { item: Some(item), maxsize: self.maxsize });
        match self.client.coord(&self.name, Wait::from_timeout(timeout), op).await? {
            Answer::Said(Kind::Done(_)) => Ok(()),
            Answer::TimedOut => Err(Error::Timeout {
                what: format!("room in queue {:?}", self.name),
                after: timeout.unwrap_or_default(),
            }),
            other => Err(unexpected("put", other)),
        }
    }

    /// Puts a value at the end (waiting for room in a bounded queue).
    pub fn put(&self, value: &T) -> Result<()> {
        let item = value_item(value)?;
        self.client.inner.block_on(self.put_item(item, None))
    }

    /// Puts a future: whoever takes it gets the future, and its result stays on the cluster
    /// meanwhile.
    pub fn put_future(&self, future: &Future<T>) -> Result<()> {
        self.client.inner.block_on(self.put_item(future_item(future), None))
    }

    /// [`put`](Self::put), waiting at most `timeout` for room ([`Error::Timeout`] then).
    pub fn put_timeout(&self, value: &T, timeout: Duration) -> Result<()> {
        let item = value_item(value)?;
        self.client.inner.block_on(self.put_item(item, Some(timeout)))
    }

    pub async fn put_async(&self, value: &T, timeout: Option<Duration>) -> Result<()> {
        self.put_item(value_item(value)?, timeout).await
    }

    async fn take(&self, count: u32, batch: bool, timeout: Option<Duration>) -> Result<Vec<Shared<T>>> {
        let op = Op::QueueGet(pb::QueueGet { count, batch, maxsize: self.maxsize });
        let wait = if batch && count == 0 { Wait::No } else { Wait::from_timeout(timeout) };
        match self.client.coord(&self.name, wait, op).await? {
            Answer::Items(items, id) => self.client.items_to_shared(items, id),
            Answer::TimedOut => Err(Error::Timeout {
                what: format!("an item of queue {:?}", self.name),
                after: timeout.unwrap_or_default(),
            }),
            other => Err(unexpected("get", other)),
        }
    }

    /// Takes the first item, waiting for one.
    pub fn get(&self) -> Result<Shared<T>> {
        self.client.inner.block_on(self.get_async(None))
    }

    /// Takes the first item, waiting at most `timeout` ([`Error::Timeout`] then; zero: no wait).
    pub fn get_timeout(&self, timeout: Duration) -> Result<Shared<T>> {
        self.client.inner.block_on(self.get_async(Some(timeout)))
    }

    pub async fn get_async(&self, timeout: Option<Duration>) -> Result<Shared<T>> {
        Ok(self.take(1, false, timeout).await?.pop().expect("one item asked, one given"))
    }

    /// Takes every item there now, without waiting (dask's `get(batch=True)`).
    pub fn get_all(&self) -> Result<Vec<Shared<T>>> {
        self.client.inner.block_on(self.take(0, true, None))
    }

    /// Takes `n` items, waiting for all of them (dask's `get(batch=n)`).
    pub fn get_batch(&self, n: u32, timeout: Option<Duration>) -> Result<Vec<Shared<T>>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        self.client.inner.block_on(self.take(n, true, timeout))
    }

    /// Items in the queue now.
    pub fn qsize(&self) -> Result<u64> {
        self.client.inner.block_on(async {
            match self.client.coord(&self.name, Wait::No, Op::QueueSize(pb::Empty {})).await? {
                Answer::Said(Kind::Count(n)) => Ok(n),
                other => Err(unexpected("qsize", other)),
            }
        })
    }
}

/// A named slot shared by every client and task (dask's `distributed.Variable`): holds one value
/// or future of type `T`. A future set in it stays alive while the variable holds it.
pub struct Variable<T> {
    client: Client,
    name: String,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Variable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<Variable: {}>", self.name)
    }
}

impl<T: Serialize + DeserializeOwned + 'static> Variable<T> {
    pub fn new(client: &Client, name: impl Into<String>) -> Variable<T> {
        Variable { client: client.clone(), name: name.into(), _t: PhantomData }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn set_item(&self, item: pb::Item) -> Result<()> {
        match self.client.coord(&self.name, Wait::No, Op::VariableSet(item)).await? {
            Answer::Said(Kind::Done(_)) => Ok(()),
            other => Err(unexpected("set", other)),
        }
    }

    /// Sets a value (replacing what was there).
    pub fn set(&self, value: &T) -> Result<()> {
        let item = value_item(value)?;
        self.client.inner.block_on(self.set_item(item))
    }

    /// Sets a future: it stays alive while the variable holds it.
    pub fn set_future(&self, future: &Future<T>) -> Result<()> {
        self.client.inner.block_on(self.set_item(future_item(future)))
    }

    pub async fn set_async(&self, value: &T) -> Result<()> {
        self.set_item(value_item(value)?).await
    }

    /// What the variable holds, waiting until it is set.
    pub fn get(&self) -> Result<Shared<T>> {
        self.client.inner.block_on(self.get_async(None))
    }

    /// What it holds, waiting at most `timeout` for it to be set ([`Error::Timeout`] then).
    pub fn get_timeout(&self, timeout: Duration) -> Result<Shared<T>> {
        self.client.inner.block_on(self.get_async(Some(timeout)))
    }

    pub async fn get_async(&self, timeout: Option<Duration>) -> Result<Shared<T>> {
        match self.client.coord(&self.name, Wait::from_timeout(timeout), Op::VariableGet(pb::Empty {})).await? {
            Answer::Items(items, id) => {
                Ok(self.client.items_to_shared(items, id)?.pop().expect("a variable holds one item"))
            }
            Answer::TimedOut => Err(Error::Timeout {
                what: format!("variable {:?} to be set", self.name),
                after: timeout.unwrap_or_default(),
            }),
            other => Err(unexpected("get", other)),
        }
    }

    /// Deletes the variable (a future it held is let go).
    pub fn delete(&self) -> Result<()> {
        self.client.inner.block_on(async {
            match self.client.coord(&self.name, Wait::No, Op::VariableDelete(pb::Empty {})).await? {
                Answer::Said(Kind::Done(_)) => Ok(()),
                other => Err(unexpected("delete", other)),
            }
        })
    }
}
