//! What the client knows of each key it holds, shared by the client (which applies the
//! scheduler's reports) and its futures (which wait on it): the key's status, the table of held
//! keys, and [`KeyOwner`], the client seen from a future. With this module in between, futures
//! do not reach into the client, and the client's modules do not reach into futures' internals.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use dask_protocol::codec::Value;
use dask_protocol::pb;
use parking_lot::{Condvar, Mutex};
use rustc_hash::FxHashMap;

use crate::error::TaskFailure;
use crate::{Error, Result};

/// What a future needs of the client that holds its key.
pub(crate) trait KeyOwner: Send + Sync {
    /// One handle of `key` (entry `generation`) is gone; the last one releases the key.
    fn release_ref(&self, key: &str, generation: u64);
    /// Cancels these keys for this client (for every client with `force`), and what depends on
    /// them that no other client wants.
    fn cancel(&self, keys: &[Arc<str>], force: bool, reason: Option<&str>);
    /// The value of a done key: from its report, or fetched from the workers that hold it.
    fn value<'a>(
        &'a self,
        key: &'a Arc<str>,
        state: &'a Arc<KeyState>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Value>> + Send + 'a>>;
    /// Runs these failed keys again.
    fn retry(&self, keys: &[Arc<str>]);
    /// The runtime the client's network work runs on.
    fn handle(&self) -> &tokio::runtime::Handle;
}

const CURRENT_THREAD: &str =
    "a blocking call on a current-thread tokio runtime would deadlock: use the .await / _async form";

/// Runs `f` to completion on `handle` from blocking code, also when called from async code on a
/// multi-thread runtime. On a current-thread runtime blocking would stop the very task that has
/// to answer, so it is refused.
pub(crate) fn block_on<F: std::future::Future<Output = Result<R>>, R>(
    handle: &tokio::runtime::Handle,
    f: F,
) -> Result<R> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
            Err(Error::InvalidArgument(CURRENT_THREAD.into()))
        }
        Ok(_) => tokio::task::block_in_place(|| handle.block_on(f)),
        Err(_) => handle.block_on(f),
    }
}

/// Runs a blocking wait (a condition variable), telling tokio first when called from async code
/// so the runtime's other work goes on.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> Result<R> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
            Err(Error::InvalidArgument(CURRENT_THREAD.into()))
        }
        Ok(_) => Ok(tokio::task::block_in_place(f)),
        Err(_) => Ok(f()),
    }
}

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
    pub(crate) fn public(&self) -> FutureStatus {
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

    pub(crate) fn add_callback(&self, cb: Callback) {
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

/// The keys this client holds futures for: a count of handles and the shared state.
#[derive(Default)]
pub(crate) struct KeyTable {
    pub(crate) keys: Mutex<FxHashMap<Arc<str>, Held>>,
    /// Numbers each entry, so a handle from before a cancel cannot release its successor.
    pub(crate) next_gen: AtomicU64,
    /// Entries numbered from here on were made after this client's last `restart` began: a
    /// restart's late cancellation must not end them (the same key submitted again).
    pub(crate) restart_floor: AtomicU64,
}

/// Handles this client holds for one key, the key's shared state, and the entry's number.
pub(crate) struct Held {
    pub(crate) count: u32,
    pub(crate) state: Arc<KeyState>,
    pub(crate) generation: u64,
}

impl KeyTable {
    /// Makes room for `n` more keys.
    pub(crate) fn reserve(&self, n: usize) {
        self.keys.lock().reserve(n);
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<KeyState>> {
        self.keys.lock().get(key).map(|h| h.state.clone())
    }

    pub(crate) fn apply(&self, report: pb::KeyReport) {
        use pb::key_report::Kind;
        let Some(state) = self.get(&report.key) else {
            return;
        };
        let status = match report.kind {
            Some(Kind::Memory(m)) => {
                let value = match (m.has_value, dask_protocol::codec::codec_name(&m.codec)) {
                    (true, Ok(codec)) => Some(Value { codec, data: m.value }),
                    _ => None,
                };
                Status::Finished { workers: m.workers, value }
            }
            Some(Kind::Erred(e)) => Status::Error(Arc::new(TaskFailure::from(e))),
            // The scheduler cancelled it (a restart): the future is over, and a later submission
            // of the key is a new computation. Not an entry made after this client's own
            // restart began: that report is late, for the key's previous life.
            Some(Kind::Cancelled(c)) if c.by_scheduler => {
                let floor = self.restart_floor.load(Ordering::Relaxed);
                let mut keys = self.keys.lock();
                match keys.get(report.key.as_str()) {
                    Some(h) if floor != 0 && h.generation >= floor => return,
                    Some(_) => {
                        keys.remove(report.key.as_str());
                    }
                    None => return,
                }
                drop(keys);
                Status::Cancelled(Arc::from(c.reason))
            }
            // This client's own cancel, marked already; a late confirmation must not cancel a
            // newer submission of the same key.
            Some(Kind::Cancelled(_)) => return,
            Some(Kind::Lost(l)) => {
                // Gone for good: a later submission of the key starts afresh.
                self.detach(&report.key);
                Status::Lost(l.reason)
            }
            None => return,
        };
        state.set(status);
    }

    /// Forgets the entry of `key` (its handles keep their state and release nothing).
    pub(crate) fn detach(&self, key: &str) {
        self.keys.lock().remove(key);
    }

    /// Every future ends as lost, with `why`; later submissions of the same keys are new.
    pub(crate) fn lose_all(&self, why: &str) {
        let states: Vec<_> = self.keys.lock().drain().map(|(_, h)| h.state).collect();
        for s in states {
            s.set(Status::Lost(why.to_string()));
        }
    }

    /// Every future made before entry number `floor` ends as cancelled, with `why`; later
    /// submissions of the same keys are new.
    pub(crate) fn cancel_below(&self, floor: u64, why: &str) {
        let why: Arc<str> = Arc::from(why);
        let states: Vec<_> = {
            let mut keys = self.keys.lock();
            let gone: Vec<Arc<str>> =
                keys.iter().filter(|(_, h)| h.generation < floor).map(|(k, _)| k.clone()).collect();
            gone.into_iter().filter_map(|k| keys.remove(&k)).map(|h| h.state).collect()
        };
        for s in states {
            s.set(Status::Cancelled(why.clone()));
        }
    }

    pub(crate) fn disconnect_all(&self, why: &str) {
        let states: Vec<_> = self.keys.lock().values().map(|h| h.state.clone()).collect();
        for s in states {
            s.set(Status::Disconnected(why.to_string()));
        }
    }
}
