//! What a task can reach of the worker that runs it (dask's `get_worker`, `get_client`,
//! `worker_client`, `secede`, `rejoin`): the executor sets it for the task's thread while the
//! task runs.
//!
//! * [`get_client`]: in a task, the worker's own client (one connection per worker, made on
//!   first use and shared by its tasks); elsewhere, [`Client::current`].
//! * [`secede`] gives the task's thread slot back to the worker (the pool starts another thread
//!   so the slot is used) and tells the scheduler, which stops counting the task against the
//!   worker's threads. A task that waits on futures it submitted secedes first, or a worker
//!   whose slots are all taken by waiting tasks deadlocks.
//! * [`rejoin`] waits for a free slot and takes it again.
//! * [`worker_client`] is both: a client, with the task seceded until the guard is dropped.
use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use dask_client::{Client, Error, Result};

/// The worker, as its tasks see it.
#[derive(Debug)]
pub struct WorkerContext {
    pub address: String,
    pub name: String,
    pub scheduler: String,
    pub nthreads: usize,
    client: OnceLock<Client>,
    /// The worker's TLS credentials, for its client too.
    security: Option<dask_protocol::tls::Security>,
    /// What each executor thread runs now, and since when (seconds since the Unix epoch):
    /// `Client::call_stack`.
    pub(crate) running: parking_lot::Mutex<rustc_hash::FxHashMap<u32, (Arc<str>, f64)>>,
}

impl WorkerContext {
    pub fn new(
        address: String,
        name: String,
        scheduler: String,
        nthreads: usize,
        security: Option<dask_protocol::tls::Security>,
    ) -> Arc<WorkerContext> {
        Arc::new(WorkerContext {
            address,
            name,
            scheduler,
            nthreads,
            client: OnceLock::new(),
            security,
            running: Default::default(),
        })
    }

    /// The worker's client, connected on first use.
    fn client(&self) -> Result<Client> {
        if let Some(c) = self.client.get() {
            return Ok(c.clone());
        }
        let c = Client::connect_secure(&self.scheduler, dask_client::CONNECT_TIMEOUT, self.security.clone())?;
        // Two tasks racing: one connection wins, the other is closed.
        Ok(self.client.get_or_init(|| c).clone())
    }

    /// Closes the worker's client, if one was made (the worker is stopping).
    pub fn close(&self) {
        if let Some(c) = self.client.get() {
            c.close();
        }
    }
}

/// What the executor knows of the task on this thread.
pub(crate) struct TaskScope {
    pub(crate) worker: Arc<WorkerContext>,
    pub(crate) key: String,
    /// Gives the slot back (`true`) or takes one again (`false`); returns whether anything
    /// changed.
    pub(crate) slots: Arc<dyn Fn(bool) -> bool + Send + Sync>,
}

thread_local! {
    static CURRENT: RefCell<Option<TaskScope>> = const { RefCell::new(None) };
}

/// Runs `f` with `scope` as the current task of this thread.
pub(crate) fn with_scope<R>(scope: TaskScope, f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT.with(|c| c.borrow_mut().take());
        }
    }
    CURRENT.with(|c| *c.borrow_mut() = Some(scope));
    let _reset = Reset;
    f()
}

/// The worker of the task (or `Client.run` function) on this thread.
pub(crate) fn current_worker() -> Option<Arc<WorkerContext>> {
    with_current(|s| s.worker.clone())
}

fn with_current<R>(f: impl FnOnce(&TaskScope) -> R) -> Option<R> {
    CURRENT.with(|c| c.borrow().as_ref().map(f))
}

/// Runs a `Client.run` function here, as a task of key `run-<id>` would see it (so
/// `get_worker` and `get_client` work in it), and says how it went.
pub(crate) fn run_function(worker: &Arc<WorkerContext>, id: u64, spec: &[u8]) -> dask_protocol::pb::RunResult {
    use prost::Message;
    let spec = match dask_protocol::pb::TaskSpec::decode(spec) {
        Ok(s) => s,
        Err(e) => {
            let e = dask_protocol::task::ExecErrorKind::BadArguments(format!("malformed function spec: {e}"));
            return dask_protocol::task::run_result(&worker.address, "", Err(e));
        }
    };
    let scope = TaskScope { worker: worker.clone(), key: format!("run-{id}"), slots: Arc::new(|_| false) };
    let r = with_scope(scope, || dask_protocol::task::execute(&spec, &|_| None));
    dask_protocol::task::run_result(&worker.address, &spec.function, r)
}

const NOT_IN_TASK: &str = "not inside a task: get_worker, secede and rejoin work only in a task run by a worker";

/// The worker running the current task, and the task's key.
#[derive(Clone, Debug)]
pub struct TaskWorker {
    pub address: String,
    pub name: String,
    pub scheduler: String,
    pub nthreads: usize,
    /// The key of the task asking.
    pub key: String,
}

/// dask's `get_worker()`: the worker running this task.
pub fn get_worker() -> Result<TaskWorker> {
    with_current(|s| TaskWorker {
        address: s.worker.address.clone(),
        name: s.worker.name.clone(),
        scheduler: s.worker.scheduler.clone(),
        nthreads: s.worker.nthreads,
        key: s.key.clone(),
    })
    .ok_or_else(|| Error::InvalidArgument(NOT_IN_TASK.into()))
}

/// dask's `get_client()`: in a task, its worker's client; elsewhere the default client.
pub fn get_client() -> Result<Client> {
    match with_current(|s| s.worker.clone()) {
        Some(w) => w.client(),
        None => Client::current(),
    }
}

/// dask's `secede()`: this task gives its thread slot back while it runs on (see the module).
/// Calling it twice is harmless.
pub fn secede() -> Result<()> {
    with_current(|s| (s.slots)(true)).map(drop).ok_or_else(|| Error::InvalidArgument(NOT_IN_TASK.into()))
}

/// dask's `rejoin()`: waits for a free thread slot and takes it (after [`secede`]).
pub fn rejoin() -> Result<()> {
    with_current(|s| (s.slots)(false)).map(drop).ok_or_else(|| Error::InvalidArgument(NOT_IN_TASK.into()))
}

/// dask's `worker_client()`: the worker's client, with this task seceded until the guard is
/// dropped (then it rejoins). Use it to submit subtasks and wait on them from a task.
pub fn worker_client() -> Result<WorkerClient> {
    let client = get_client()?;
    secede()?;
    Ok(WorkerClient { client })
}

/// A client for use in a task; the task rejoins its worker's pool when this is dropped.
#[derive(Debug)]
pub struct WorkerClient {
    client: Client,
}

impl std::ops::Deref for WorkerClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Drop for WorkerClient {
    fn drop(&mut self) {
        let _ = rejoin();
    }
}
