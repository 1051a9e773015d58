//! [`Lock`], [`Semaphore`] and [`Event`].
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dask_protocol::pb::{self, coord_reply::Kind, coord_request::Op};
use parking_lot::Mutex;

use super::{Answer, Wait, fresh_name, unexpected};
use crate::{Client, Error, Result};

/// Lease numbers, unique in this process: two handles of one name in one client never share one.
static NEXT_LEASE: AtomicU64 = AtomicU64::new(1);

/// Leases of one semaphore taken through one handle.
struct Leases {
    client: Client,
    name: String,
    max_leases: u32,
    held: Mutex<Vec<u64>>,
}

impl Leases {
    async fn acquire(&self, timeout: Option<Duration>) -> Result<bool> {
        let lease = NEXT_LEASE.fetch_add(1, Ordering::Relaxed);
        let op = Op::Acquire(pb::Acquire { lease, max_leases: self.max_leases });
        match self.client.coord(&self.name, Wait::from_timeout(timeout), op).await? {
            Answer::Said(Kind::Flag(true)) => {
                self.held.lock().push(lease);
                Ok(true)
            }
            Answer::Said(Kind::Flag(false)) | Answer::TimedOut => Ok(false),
            other => Err(unexpected("acquire", other)),
        }
    }

    async fn release(&self, what: &str) -> Result<()> {
        let Some(lease) = self.held.lock().pop() else {
            return Err(Error::Refused(format!(
                "{what} {:?} is not acquired through this handle: released more often than acquired",
                self.name
            )));
        };
        match self.client.coord(&self.name, Wait::No, Op::Release(lease)).await? {
            Answer::Said(Kind::Done(_)) => Ok(()),
            other => Err(unexpected("release", other)),
        }
    }

    async fn in_use(&self) -> Result<u64> {
        match self.client.coord(&self.name, Wait::No, Op::Leases(pb::Empty {})).await? {
            Answer::Said(Kind::Count(n)) => Ok(n),
            other => Err(unexpected("leases", other)),
        }
    }
}

/// A lock shared by every client and task that names it (dask's `distributed.Lock`). Not
/// re-entrant: a second `acquire` through the same handle waits like anyone else's. Released by
/// [`release`](Self::release), or when the client that holds it goes.
pub struct Lock {
    leases: Leases,
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<Lock: {}>", self.leases.name)
    }
}

impl Lock {
    /// The lock called `name` on `client`'s cluster.
    pub fn new(client: &Client, name: impl Into<String>) -> Lock {
        Lock {
            leases: Leases { client: client.clone(), name: name.into(), max_leases: 1, held: Mutex::new(Vec::new()) },
        }
    }

    /// A lock with a fresh name (dask's `Lock()`), to share through [`name`](Self::name).
    pub fn unnamed(client: &Client) -> Lock {
        Lock::new(client, fresh_name(client, "lock"))
    }

    pub fn name(&self) -> &str {
        &self.leases.name
    }

    /// Waits until the lock is ours; `true`.
    pub fn acquire(&self) -> Result<bool> {
        self.leases.client.inner.block_on(self.leases.acquire(None))
    }

    /// Waits up to `timeout`; `false` if the lock is still held by another then.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
        self.leases.client.inner.block_on(self.leases.acquire(Some(timeout)))
    }

    /// Takes the lock only if it is free now (dask's `blocking=False`).
    pub fn try_acquire(&self) -> Result<bool> {
        self.acquire_timeout(Duration::ZERO)
    }

    /// [`acquire`](Self::acquire) (`None`) or [`acquire_timeout`](Self::acquire_timeout), async.
    pub async fn acquire_async(&self, timeout: Option<Duration>) -> Result<bool> {
        self.leases.acquire(timeout).await
    }

    /// Releases the lock taken through this handle; an error if it holds none.
    pub fn release(&self) -> Result<()> {
        self.leases.client.inner.block_on(self.leases.release("lock"))
    }

    pub async fn release_async(&self) -> Result<()> {
        self.leases.release("lock").await
    }

    /// Whether anyone holds the lock.
    pub fn locked(&self) -> Result<bool> {
        Ok(self.leases.client.inner.block_on(self.leases.in_use())? > 0)
    }

    pub async fn locked_async(&self) -> Result<bool> {
        Ok(self.leases.in_use().await? > 0)
    }

    /// Acquires and returns a guard that releases when dropped (Python's `with lock:`).
    pub fn guard(&self) -> Result<LockGuard<'_>> {
        self.acquire()?;
        Ok(LockGuard { lock: self })
    }
}

/// Holds a [`Lock`] until dropped.
#[derive(Debug)]
pub struct LockGuard<'a> {
    lock: &'a Lock,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.lock.release() {
            tracing::warn!(lock = %self.lock.name(), error = %e, "releasing a lock guard failed");
        }
    }
}

/// A semaphore of `max_leases` shared by every client and task that names it (dask's
/// `distributed.Semaphore`): at most that many leases are out at once. A lease is released by
/// [`release`](Self::release), or when the client that took it goes (a worker that dies, with
/// it its tasks' client, frees its leases).
pub struct Semaphore {
    leases: Leases,
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<Semaphore: {}, max_leases={}>", self.leases.name, self.leases.max_leases)
    }
}

impl Semaphore {
    /// The semaphore called `name`; `max_leases` counts when its first user creates it.
    pub fn new(client: &Client, name: impl Into<String>, max_leases: u32) -> Result<Semaphore> {
        if max_leases == 0 {
            return Err(Error::InvalidArgument("a semaphore needs max_leases of at least 1".into()));
        }
        Ok(Semaphore {
            leases: Leases { client: client.clone(), name: name.into(), max_leases, held: Mutex::new(Vec::new()) },
        })
    }

    pub fn name(&self) -> &str {
        &self.leases.name
    }

    /// Waits for a lease; `true`.
    pub fn acquire(&self) -> Result<bool> {
        self.leases.client.inner.block_on(self.leases.acquire(None))
    }

    /// Waits up to `timeout` for a lease; `false` if none came.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
        self.leases.client.inner.block_on(self.leases.acquire(Some(timeout)))
    }

    pub async fn acquire_async(&self, timeout: Option<Duration>) -> Result<bool> {
        self.leases.acquire(timeout).await
    }

    /// Gives back one lease taken through this handle.
    pub fn release(&self) -> Result<()> {
        self.leases.client.inner.block_on(self.leases.release("semaphore"))
    }

    pub async fn release_async(&self) -> Result<()> {
        self.leases.release("semaphore").await
    }

    /// Leases out now, by anyone (dask's `get_value`).
    pub fn get_value(&self) -> Result<u64> {
        self.leases.client.inner.block_on(self.leases.in_use())
    }
}

/// A flag shared by every client and task that names it (dask's `distributed.Event`): `wait`
/// blocks until someone `set`s it.
#[derive(Clone)]
pub struct Event {
    client: Client,
    name: String,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<Event: {}>", self.name)
    }
}

impl Event {
    pub fn new(client: &Client, name: impl Into<String>) -> Event {
        Event { client: client.clone(), name: name.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn simple(&self, op: Op, what: &str) -> Result<bool> {
        match self.client.coord(&self.name, Wait::No, op).await? {
            Answer::Said(Kind::Done(_)) => Ok(true),
            Answer::Said(Kind::Flag(f)) => Ok(f),
            other => Err(unexpected(what, other)),
        }
    }

    /// Sets the flag: every waiter wakes.
    pub fn set(&self) -> Result<()> {
        self.client.inner.block_on(self.simple(Op::EventSet(pb::Empty {}), "set")).map(drop)
    }

    pub async fn set_async(&self) -> Result<()> {
        self.simple(Op::EventSet(pb::Empty {}), "set").await.map(drop)
    }

    /// Clears the flag: later waits block again.
    pub fn clear(&self) -> Result<()> {
        self.client.inner.block_on(self.simple(Op::EventClear(pb::Empty {}), "clear")).map(drop)
    }

    pub fn is_set(&self) -> Result<bool> {
        self.client.inner.block_on(self.simple(Op::EventIsSet(pb::Empty {}), "is_set"))
    }

    /// Waits until the flag is set; `true`.
    pub fn wait(&self) -> Result<bool> {
        self.client.inner.block_on(self.wait_async(None))
    }

    /// Waits up to `timeout`; `false` if the flag is still clear then.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool> {
        self.client.inner.block_on(self.wait_async(Some(timeout)))
    }

    pub async fn wait_async(&self, timeout: Option<Duration>) -> Result<bool> {
        match self.client.coord(&self.name, Wait::from_timeout(timeout), Op::EventWait(pb::Empty {})).await? {
            Answer::Said(Kind::Flag(f)) => Ok(f),
            Answer::TimedOut => Ok(false),
            other => Err(unexpected("wait", other)),
        }
    }
}
