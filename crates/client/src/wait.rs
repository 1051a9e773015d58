//! `wait` and `as_completed` over many futures.
use std::time::Duration;

use futures_util::future::{join_all, select_all};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::future::Future;
use crate::keys::{self, Done, KeyOwner};
use crate::{Error, Result};

/// dask's `return_when`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReturnWhen {
    #[default]
    AllCompleted,
    FirstCompleted,
}

/// The futures that are done and those that are not.
#[derive(Debug)]
pub struct WaitResult<T> {
    pub done: Vec<Future<T>>,
    pub not_done: Vec<Future<T>>,
}

/// Blocks until all (or the first) of `futures` are done. With a `timeout`, gives up with
/// [`Error::Timeout`] (dask raises `TimeoutError` too). Erred futures count as done.
pub fn wait<T>(futures: &[Future<T>], timeout: Option<Duration>, return_when: ReturnWhen) -> Result<WaitResult<T>> {
    let Some(first) = futures.first() else {
        return Ok(WaitResult { done: Vec::new(), not_done: Vec::new() });
    };
    keys::block_on(first.inner.client.handle(), wait_async(futures, timeout, return_when))
}

/// [`wait`] for async code.
pub async fn wait_async<T>(
    futures: &[Future<T>],
    timeout: Option<Duration>,
    return_when: ReturnWhen,
) -> Result<WaitResult<T>> {
    let waiting = async {
        match return_when {
            ReturnWhen::AllCompleted => {
                join_all(futures.iter().map(|f| Done(&f.inner.state))).await;
            }
            ReturnWhen::FirstCompleted => {
                if !futures.is_empty() && !futures.iter().any(|f| f.done()) {
                    select_all(futures.iter().map(|f| Box::pin(Done(&f.inner.state)))).await;
                }
            }
        }
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, waiting)
            .await
            .map_err(|_| Error::Timeout { what: format!("{} futures", futures.len()), after: t })?,
        None => waiting.await,
    }
    let (done, not_done) = futures.iter().cloned().partition(|f| f.done());
    Ok(WaitResult { done, not_done })
}

/// Futures in the order they finish (dask's `as_completed`). Take them with `next()` (or a
/// `for` loop over it); [`add`](Self::add) more while taking; [`with_results`](Self::with_results)
/// for values too; [`batches`](Self::batches) to take everything done at once. `count()` is the
/// number not yet taken (the type is not itself an `Iterator`, so `count()` never consumes it).
pub struct AsCompleted<T> {
    tx: mpsc::UnboundedSender<Future<T>>,
    rx: mpsc::UnboundedReceiver<Future<T>>,
    pending: usize,
    /// Futures done and not yet taken.
    ready: usize,
    client: Option<std::sync::Arc<dyn KeyOwner>>,
}

/// Starts an [`AsCompleted`] over `futures`.
pub fn as_completed<T: 'static>(futures: impl IntoIterator<Item = Future<T>>) -> AsCompleted<T> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut ac = AsCompleted { tx, rx, pending: 0, ready: 0, client: None };
    ac.update(futures);
    ac
}

impl<T: 'static> AsCompleted<T> {
    /// Adds a future; it is yielded when done.
    pub fn add(&mut self, future: Future<T>) {
        self.pending += 1;
        self.client.get_or_insert_with(|| future.inner.client.clone());
        let tx = self.tx.clone();
        let f = future.clone();
        future.add_done_callback(move |_| {
            let _ = tx.send(f);
        });
    }

    /// Adds many (dask's `update`).
    pub fn update(&mut self, futures: impl IntoIterator<Item = Future<T>>) {
        for f in futures {
            self.add(f);
        }
    }

    /// Futures added and not yet taken.
    pub fn count(&self) -> usize {
        self.pending
    }

    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Moves what finished into the ready count.
    fn drain_ready(&mut self) -> Vec<Future<T>> {
        let mut out = Vec::new();
        while let Ok(f) = self.rx.try_recv() {
            out.push(f);
        }
        out
    }

    /// Whether a done future is waiting to be taken (dask's `has_ready`).
    pub fn has_ready(&mut self) -> bool {
        if self.ready == 0 {
            // Peek: keep what arrived for the next takes.
            let got = self.drain_ready();
            self.ready += got.len();
            for f in got {
                let _ = self.tx.send(f);
            }
        }
        self.ready > 0
    }

    /// Forgets every future not yet taken (dask's `clear`).
    pub fn clear(&mut self) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.tx = tx;
        self.rx = rx;
        self.pending = 0;
        self.ready = 0;
    }

    fn took(&mut self) {
        self.pending -= 1;
        self.ready = self.ready.saturating_sub(1);
    }

    /// The next future to finish, waiting for it; `None` once all were taken.
    #[allow(clippy::should_implement_trait)] // not an Iterator: see the type's note on `count`
    pub fn next(&mut self) -> Option<Future<T>> {
        self.next_timeout(None).ok().flatten()
    }

    /// The next future to finish, waiting at most `timeout` ([`Error::Timeout`] then; dask's
    /// `as_completed(timeout=...)`); `Ok(None)` once all were taken.
    pub fn next_timeout(&mut self, timeout: Option<Duration>) -> Result<Option<Future<T>>> {
        if self.pending == 0 {
            return Ok(None);
        }
        let Some(client) = self.client.clone() else { return Ok(None) };
        let pending = self.pending;
        let rx = &mut self.rx;
        let f = keys::block_on(client.handle(), async {
            match timeout {
                None => Ok(rx.recv().await),
                Some(t) => tokio::time::timeout(t, rx.recv())
                    .await
                    .map_err(|_| Error::Timeout { what: format!("the next of {pending} futures"), after: t }),
            }
        })?;
        if f.is_some() {
            self.took();
        }
        Ok(f)
    }

    /// The next future to finish (async).
    pub async fn next_async(&mut self) -> Option<Future<T>> {
        if self.pending == 0 {
            return None;
        }
        let f = self.rx.recv().await?;
        self.took();
        Some(f)
    }

    /// Everything done now, as a batch. With `block`, waits for at least one (`None` once all
    /// were taken); without, gives what is there, maybe nothing (dask's `next_batch(block)`).
    pub fn next_batch(&mut self, block: bool) -> Option<Vec<Future<T>>> {
        let mut batch = Vec::new();
        if block {
            batch.push(self.next()?);
        }
        for f in self.drain_ready() {
            self.took();
            batch.push(f);
        }
        if !block && batch.is_empty() && self.pending == 0 {
            return None;
        }
        Some(batch)
    }

    /// Iterates over batches of finished futures.
    pub fn batches(self) -> impl Iterator<Item = Vec<Future<T>>> {
        let mut s = self;
        std::iter::from_fn(move || s.next_batch(true))
    }
}

impl<T: DeserializeOwned + 'static> AsCompleted<T> {
    /// Iterates over `(future, result)` pairs.
    pub fn with_results(self) -> impl Iterator<Item = (Future<T>, Result<T>)> {
        self.into_iter().map(|f| {
            let r = f.result();
            (f, r)
        })
    }
}

/// `for f in as_completed(futures)`.
impl<T: 'static> IntoIterator for AsCompleted<T> {
    type Item = Future<T>;
    type IntoIter = std::iter::FromFn<Box<dyn FnMut() -> Option<Future<T>>>>;
    fn into_iter(self) -> Self::IntoIter {
        let mut s = self;
        std::iter::from_fn(Box::new(move || s.next()))
    }
}
