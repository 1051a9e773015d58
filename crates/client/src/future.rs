//! `Future<T>`: a handle to a task's result on the cluster. Cloning is cheap; dropping the last
//! handle to a key tells the scheduler the client no longer wants it.
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::de::DeserializeOwned;

use crate::client::ClientInner;
use crate::error::TaskFailure;
use crate::{Error, Result};

/// dask's future statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FutureStatus {
    Pending,
    Finished,
    Error,
    Cancelled,
    Lost,
}

impl std::fmt::Display for FutureStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FutureStatus::Pending => "pending",
            FutureStatus::Finished => "finished",
            FutureStatus::Error => "error",
            FutureStatus::Cancelled => "cancelled",
            FutureStatus::Lost => "lost",
        })
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Status {
    Pending,
    /// In memory on `workers`; `value` when it came with the report (small values).
    Finished {
        workers: Vec<String>,
        value: Option<dask_protocol::codec::Value>,
    },
    Error(Arc<TaskFailure>),
    /// Why: this client cancelled it, or the cluster was restarted.
    Cancelled(Arc<str>),
    Lost(String),
    /// The connection to the scheduler is gone.
    Disconnected(String),
}

impl Status {
    fn public(&self) -> FutureStatus {
        match self {
            Status::Pending => FutureStatus::Pending,
            Status::Finished { .. } => FutureStatus::Finished,
            Status::Error(_) => FutureStatus::Error,
            Status::Cancelled(_) => FutureStatus::Cancelled,
            Status::Lost(_) | Status::Disconnected(_) => FutureStatus::Lost,
        }
    }
}

type Callback = Box<dyn FnOnce(FutureStatus) + Send>;

/// What the client knows of one key; shared by every `Future` of that key.
pub(crate) struct KeyState {
    inner: Mutex<KeyInner>,
    cond: Condvar,
}

struct KeyInner {
    status: Status,
    /// Counts status changes, so a stale status can be reset without losing a newer one.
    version: u64,
    wakers: Vec<Waker>,
    callbacks: Vec<Callback>,
}

impl KeyState {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(KeyState {
            inner: Mutex::new(KeyInner {
                status: Status::Pending,
                version: 0,
                wakers: Vec::new(),
                callbacks: Vec::new(),
            }),
            cond: Condvar::new(),
        })
    }

    pub(crate) fn status(&self) -> Status {
        self.inner.lock().status.clone()
    }

    /// Sets a new status; wakes waiters and runs callbacks once the key is done.
    pub(crate) fn set(&self, status: Status) {
        let (wakers, callbacks, public) = {
            let mut g = self.inner.lock();
            if matches!(status, Status::Disconnected(_)) && !matches!(g.status, Status::Pending) {
                return; // a finished key stays finished
            }
            g.status = status;
            g.version += 1;
            let public = g.status.public();
            let done = public != FutureStatus::Pending;
            let callbacks = if done { std::mem::take(&mut g.callbacks) } else { Vec::new() };
            (std::mem::take(&mut g.wakers), callbacks, public)
        };
        self.cond.notify_all();
        for w in wakers {
            w.wake();
        }
        for cb in callbacks {
            cb(public);
        }
    }

    /// Blocks until the key is no longer pending, or the deadline passes.
    pub(crate) fn wait(&self, deadline: Option<Instant>) -> Option<Status> {
        let mut g = self.inner.lock();
        loop {
            if !matches!(g.status, Status::Pending) {
                return Some(g.status.clone());
            }
            match deadline {
                None => self.cond.wait(&mut g),
                Some(d) => {
                    if self.cond.wait_until(&mut g, d).timed_out() && matches!(g.status, Status::Pending) {
                        return None;
                    }
                }
            }
        }
    }

    /// Back to pending, unless the status changed since `version` (a newer report won).
    pub(crate) fn reset_if(&self, version: u64) {
        let mut g = self.inner.lock();
        if g.version == version {
            g.status = Status::Pending;
            g.version += 1;
        }
    }

    pub(crate) fn poll_done(&self, cx: &mut Context<'_>) -> Poll<(Status, u64)> {
        let mut g = self.inner.lock();
        if matches!(g.status, Status::Pending) {
            if !g.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                g.wakers.push(cx.waker().clone());
            }
            Poll::Pending
        } else {
            Poll::Ready((g.status.clone(), g.version))
        }
    }

    fn add_callback(&self, cb: Callback) {
        let mut g = self.inner.lock();
        let public = g.status.public();
        if public == FutureStatus::Pending {
            g.callbacks.push(cb);
        } else {
            drop(g);
            cb(public);
        }
    }
}

/// Waits (async) until a key is done.
pub(crate) struct Done<'a>(pub(crate) &'a KeyState);

impl std::future::Future for Done<'_> {
    type Output = (Status, u64);
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(Status, u64)> {
        self.0.poll_done(cx)
    }
}

/// One reference to a key held by this client; the last one dropped releases the key.
#[doc(hidden)]
pub struct FutureRef {
    pub(crate) key: Arc<str>,
    pub(crate) state: Arc<KeyState>,
    /// The client's table entry this handle counts in.
    pub(crate) generation: u64,
    pub(crate) client: Arc<ClientInner>,
}

impl Drop for FutureRef {
    fn drop(&mut self) {
        self.client.release_ref(&self.key, self.generation);
    }
}

/// A remote result of type `T`.
pub struct Future<T> {
    pub(crate) inner: Arc<FutureRef>,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Future<T> {
    fn clone(&self) -> Self {
        Future { inner: self.inner.clone(), _t: PhantomData }
    }
}

impl<T> std::fmt::Debug for Future<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<Future: {}, key: {}>", self.status(), self.key())
    }
}

impl<T> Future<T> {
    pub(crate) fn from_ref(inner: Arc<FutureRef>) -> Self {
        Future { inner, _t: PhantomData }
    }

    /// The task's key.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    pub fn status(&self) -> FutureStatus {
        self.inner.state.status().public()
    }

    /// Finished, erred, cancelled or lost: no longer pending.
    pub fn done(&self) -> bool {
        self.status() != FutureStatus::Pending
    }

    pub fn cancelled(&self) -> bool {
        self.status() == FutureStatus::Cancelled
    }

    /// Cancels the task for this client: the future turns `cancelled`; the cluster drops the
    /// work unless another client wants it.
    pub fn cancel(&self) {
        self.inner.client.cancel(std::slice::from_ref(&self.inner.key));
    }

    /// The task's error, once it failed (blocks until the task is done).
    pub fn exception(&self) -> Option<TaskFailure> {
        match self.inner.client.blocking(|| self.inner.state.wait(None)) {
            Ok(Some(Status::Error(e))) => Some((*e).clone()),
            _ => None,
        }
    }

    /// Calls `f` with the final status once the future is done (at once if it is).
    /// The callback runs on the client's IO thread: keep it short.
    pub fn add_done_callback(&self, f: impl FnOnce(FutureStatus) + Send + 'static) {
        self.inner.state.add_callback(Box::new(f));
    }

    /// Erases the result type (for `wait` and `as_completed` over mixed futures).
    pub fn erase(&self) -> Future<()> {
        Future::from_ref(self.inner.clone())
    }
}

impl<T: DeserializeOwned + 'static> Future<T> {
    /// Blocks until the task is done and returns its value (or its error).
    pub fn result(&self) -> Result<T> {
        self.result_inner(None)
    }

    /// Like [`result`](Self::result), but gives up with [`Error::Timeout`] after `timeout`.
    pub fn result_timeout(&self, timeout: Duration) -> Result<T> {
        self.result_inner(Some(timeout))
    }

    fn result_inner(&self, timeout: Option<Duration>) -> Result<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let client = &self.inner.client;
        let timed_out =
            || Error::Timeout { what: format!("the result of {}", self.key()), after: timeout.unwrap_or_default() };
        client.blocking(|| self.inner.state.wait(deadline))?.ok_or_else(timed_out)?;
        let value = client.value_of::<T>(&self.inner.key, &self.inner.state);
        match deadline {
            None => client.block_on(value),
            Some(d) => client.block_on(async move {
                tokio::time::timeout(d.saturating_duration_since(Instant::now()), value)
                    .await
                    .map_err(|_| timed_out())?
            }),
        }
    }

    /// The value, awaited (also `future.await`).
    pub async fn result_async(&self) -> Result<T> {
        self.inner.client.value_of::<T>(&self.inner.key, &self.inner.state).await
    }
}

impl<T: DeserializeOwned + Send + 'static> std::future::IntoFuture for Future<T> {
    type Output = Result<T>;
    type IntoFuture = Pin<Box<dyn std::future::Future<Output = Result<T>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.result_async().await })
    }
}

impl<'a, T: DeserializeOwned + Send + 'static> std::future::IntoFuture for &'a Future<T> {
    type Output = Result<T>;
    type IntoFuture = Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.result_async())
    }
}
