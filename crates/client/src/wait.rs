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

/// Futures in the order they finish (dask's `as_completed`). Iterate it; `add` more while
/// iterating; `with_results` to get values too; `batches` to take everything done at once.
pub struct AsCompleted<T> {
    tx: mpsc::UnboundedSender<Future<T>>,
    rx: mpsc::UnboundedReceiver<Future<T>>,
    pending: usize,
    client: Option<std::sync::Arc<dyn KeyOwner>>,
}

/// Starts an [`AsCompleted`] over `futures`.
pub fn as_completed<T: 'static>(futures: impl IntoIterator<Item = Future<T>>) -> AsCompleted<T> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut ac = AsCompleted { tx, rx, pending: 0, client: None };
    for f in futures {
        ac.add(f);
    }
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

    /// Futures added and not yet yielded.
    pub fn count(&self) -> usize {
        self.pending
    }

    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// The next future to finish (async).
    pub async fn next_async(&mut self) -> Option<Future<T>> {
        if self.pending == 0 {
            return None;
        }
        let f = self.rx.recv().await?;
        self.pending -= 1;
        Some(f)
    }

    /// Everything done now (waiting for at least one), as a batch.
    pub fn next_batch(&mut self) -> Option<Vec<Future<T>>> {
        let first = self.next()?;
        let mut batch = vec![first];
        while let Ok(f) = self.rx.try_recv() {
            self.pending -= 1;
            batch.push(f);
        }
        Some(batch)
    }

    /// Iterates over batches of finished futures.
    pub fn batches(self) -> impl Iterator<Item = Vec<Future<T>>> {
        let mut s = self;
        std::iter::from_fn(move || s.next_batch())
    }
}

impl<T: DeserializeOwned + 'static> AsCompleted<T> {
    /// Iterates over `(future, result)` pairs.
    pub fn with_results(self) -> impl Iterator<Item = (Future<T>, Result<T>)> {
        self.map(|f| {
            let r = f.result();
            (f, r)
        })
    }
}

impl<T: 'static> Iterator for AsCompleted<T> {
    type Item = Future<T>;
    fn next(&mut self) -> Option<Future<T>> {
        if self.pending == 0 {
            return None;
        }
        let client = self.client.clone()?;
        let f = keys::block_on(client.handle(), async { Ok(self.rx.recv().await) }).ok().flatten()?;
        self.pending -= 1;
        Some(f)
    }
}
