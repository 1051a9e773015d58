//! `Future<T>`: a handle to a task's result on the cluster. Cloning is cheap; dropping the last
//! handle to a key tells the scheduler the client no longer wants it.
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::error::TaskFailure;
pub use crate::keys::FutureStatus;
use crate::keys::{self, KeyOwner, KeyState, Status};
use crate::{Error, Result};

/// One reference to a key held by this client; the last one dropped releases the key.
#[doc(hidden)]
pub struct FutureRef {
    pub(crate) key: Arc<str>,
    pub(crate) state: Arc<KeyState>,
    /// The client's table entry this handle counts in.
    pub(crate) generation: u64,
    pub(crate) client: Arc<dyn KeyOwner>,
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

    /// Runs the task again if it failed, with the failed tasks it depends on (dask's `retry`).
    pub fn retry(&self) {
        self.reset_if_failed();
        self.inner.client.retry(std::slice::from_ref(&self.inner.key));
    }

    /// A failed future waits again (it is being retried).
    pub(crate) fn reset_if_failed(&self) {
        if matches!(self.inner.state.status(), Status::Error(_)) {
            self.inner.state.set(Status::Pending);
        }
    }

    /// Why it was cancelled, if it was.
    pub(crate) fn cancel_reason(&self) -> Option<String> {
        match self.inner.state.status() {
            Status::Cancelled(why) => Some(why.to_string()),
            _ => None,
        }
    }

    /// Cancels the task for this client: the future turns `cancelled`; the cluster drops the
    /// work unless another client wants it.
    pub fn cancel(&self) {
        self.inner.client.cancel(std::slice::from_ref(&self.inner.key), false, None);
    }

    /// [`cancel`](Self::cancel) with dask's `force` (for every client holding it) and a reason.
    pub fn cancel_with(&self, force: bool, reason: Option<&str>) {
        self.inner.client.cancel(std::slice::from_ref(&self.inner.key), force, reason);
    }

    /// The task's error, once it failed (blocks until the task is done).
    pub fn exception(&self) -> Option<TaskFailure> {
        match keys::blocking(|| self.inner.state.wait(None)) {
            Ok(Some(Status::Error(e))) => Some((*e).clone()),
            _ => None,
        }
    }

    /// Where the task panicked: the worker thread's backtrace, once the task failed by a
    /// panic (dask's `Future.traceback`); `None` if it did not fail, or failed otherwise.
    pub fn traceback(&self) -> Option<String> {
        self.exception().map(|e| e.traceback).filter(|t| !t.is_empty())
    }

    /// [`exception`](Self::exception), waiting at most `timeout` ([`Error::Timeout`] then).
    pub fn exception_timeout(&self, timeout: Duration) -> Result<Option<TaskFailure>> {
        match keys::blocking(|| self.inner.state.wait(Some(Instant::now() + timeout)))? {
            Some(Status::Error(e)) => Ok(Some((*e).clone())),
            Some(_) => Ok(None),
            None => Err(Error::Timeout { what: format!("{} to be done", self.key()), after: timeout }),
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
        keys::blocking(|| self.inner.state.wait(deadline))?.ok_or_else(timed_out)?;
        let value = async { Ok(client.value(&self.inner.key, &self.inner.state).await?.decode()?) };
        match deadline {
            None => keys::block_on(client.handle(), value),
            Some(d) => keys::block_on(client.handle(), async move {
                tokio::time::timeout(d.saturating_duration_since(Instant::now()), value)
                    .await
                    .map_err(|_| timed_out())?
            }),
        }
    }

    /// The value, awaited (also `future.await`).
    pub async fn result_async(&self) -> Result<T> {
        Ok(self.inner.client.value(&self.inner.key, &self.inner.state).await?.decode()?)
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
