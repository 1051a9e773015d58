//! What goes in and out of the core: events, commands and the types they carry.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use smallvec::SmallVec;

use super::{ClientId, Key, WorkerId, WorkerMemory};

/// A task error as the core passes it around: built once, shared by every dependent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskError {
    pub message: String,
    pub kind: String,
    pub function: String,
    /// The key whose failure caused this error.
    pub key: String,
    /// The worker the failing task ran on (empty if it never ran).
    pub worker: String,
    /// The backtrace of a panic, as the worker caught it.
    pub traceback: String,
}

impl TaskError {
    /// An error the scheduler itself gives a task (no function ran).
    pub(super) fn raised_here(key: &str, kind: &str, message: String, worker: &str) -> Arc<TaskError> {
        Arc::new(TaskError {
            message,
            kind: kind.to_string(),
            function: String::new(),
            key: key.to_string(),
            worker: worker.to_string(),
            traceback: String::new(),
        })
    }
}

/// A task as a client submits it.
#[derive(Clone, Debug, Default)]
pub struct NewTask {
    pub key: Key,
    /// Encoded `TaskSpec`, forwarded to workers untouched.
    pub spec: Box<[u8]>,
    pub dependencies: Vec<Key>,
    /// Higher runs first.
    pub priority: i32,
    pub retries: u32,
    /// Worker addresses or names this task may run on.
    pub workers: Vec<Arc<str>>,
    pub allow_other_workers: bool,
    /// Abstract resources it holds while it runs (`GPU` 1.0): it runs only where they are free.
    pub resources: Vec<(Arc<str>, f64)>,
}

/// What the shell knows of a worker when it registers.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub address: Arc<str>,
    pub name: Arc<str>,
    pub nthreads: u32,
    pub memory_limit: u64,
    /// Process id, for `scheduler_info` (0 if unknown).
    pub pid: u32,
    /// Its abstract resources (`--resources "GPU=2"`).
    pub resources: Vec<(Arc<str>, f64)>,
}

/// Everything that can happen to the scheduler.
#[derive(Clone, Debug)]
pub enum Event {
    ClientConnected {
        client: ClientId,
    },
    ClientDisconnected {
        client: ClientId,
    },
    /// New tasks, and keys the client now holds futures for.
    UpdateGraph {
        client: ClientId,
        tasks: Vec<NewTask>,
        wants: Vec<Key>,
        /// dask's `fifo_timeout`: sent within this long of the client's previous graph, the
        /// tasks share that graph's generation (ordered with it by graph order); otherwise they
        /// come after everything submitted before. Zero: always after.
        fifo_timeout: Duration,
    },
    /// The client holds futures for these keys again (e.g. a future was rebuilt from a key).
    Want {
        client: ClientId,
        keys: Vec<Key>,
    },
    /// The client dropped its last future for these keys.
    ReleaseKeys {
        client: ClientId,
        keys: Vec<Key>,
    },
    /// `Future::cancel`: release and report `cancelled` to this client.
    CancelKeys {
        client: ClientId,
        keys: Vec<Key>,
        /// Cancel for every client that wants them, not only this one.
        force: bool,
        /// Why, as the other futures cancelled with them will say.
        reason: Option<String>,
    },
    /// The client put these values on workers (scatter) and holds futures for them.
    Scattered {
        client: ClientId,
        keys: Vec<(Key, Vec<Arc<str>>, u64)>,
    },
    WorkerJoined {
        worker: WorkerId,
        spec: WorkerSpec,
    },
    WorkerLost {
        worker: WorkerId,
        reason: String,
        /// It was asked to go (restarted, retired): its tasks do not count it as a death.
        expected: bool,
    },
    /// The worker's connection ended; it is removed (`WorkerLost`) once its nanny says why. Until
    /// then it gets no new work.
    WorkerClosing {
        worker: WorkerId,
    },
    /// `Client::restart`: forget every task; every client's futures end as cancelled, each
    /// client told in its stream's order (after everything it was told before).
    Restart {
        reason: String,
    },
    TaskFinished {
        worker: WorkerId,
        key: Key,
        nbytes: u64,
        duration: Duration,
        /// The value itself, when it is small and a client wants it (see `Command::Compute`).
        value: Option<InlineValue>,
    },
    TaskFailed {
        worker: WorkerId,
        key: Key,
        error: TaskError,
        duration: Duration,
    },
    /// `worker` could not fetch `dependency` of `key` from `from`.
    MissingData {
        worker: WorkerId,
        key: Key,
        dependency: Key,
        from: Vec<Arc<str>>,
    },
    Heartbeat {
        worker: WorkerId,
        /// Its memory now (sent with heartbeats, and at once when it pauses or resumes).
        memory: Option<WorkerMemory>,
    },
    /// These tasks started running on `worker` (it reports only those still running when its
    /// batch goes out).
    TasksStarted {
        worker: WorkerId,
        keys: Vec<Key>,
        /// The worker waits for an acknowledgement (announced tasks among them); the shell
        /// sends it once the event is handled.
        ack: bool,
    },
    /// Retire these workers (`Client::retire_workers`, a worker's `--lifetime`): their values
    /// move to others, then they close (`close`), their nannies starting fresh ones if
    /// `restart`. Answered by [`Command::Retired`] with `op` (0: no answer wanted).
    RetireWorkers {
        op: u64,
        workers: Vec<WorkerId>,
        close: bool,
        restart: bool,
        reason: String,
    },
    /// `worker` now holds copies of these values, as asked by [`Command::AcquireReplicas`].
    ReplicasAdded {
        worker: WorkerId,
        keys: Vec<(Key, u64)>,
    },
    /// `worker` could not fetch these copies.
    ReplicasFailed {
        worker: WorkerId,
        keys: Vec<Key>,
    },
    /// After a batch of events while workers retire: copies to plan, retired workers to close.
    /// Once per batch, not per event: a retiring worker's values are walked each time.
    RetireProgress,
    /// The answer to [`Command::Steal`] `id`: `stolen` if `worker` had not started `key` and
    /// dropped it; otherwise it runs (or ran) it there.
    StealResponse {
        worker: WorkerId,
        key: Key,
        id: u64,
        stolen: bool,
    },
    /// `Client::retry`: these erred keys run again, with the erred tasks they depend on and the
    /// erred tasks that depend on those (dask's `retry`).
    Retry {
        client: ClientId,
        keys: Vec<Key>,
    },
    /// These tasks seceded on `worker` (`dask::secede`, `worker_client`): they run on there, but
    /// no longer take one of its thread slots.
    TasksSeceded {
        worker: WorkerId,
        keys: Vec<Key>,
    },
    /// `Client::replicate`: copy these values until `n` of `workers` hold each (all of them if
    /// `None`; every worker taking work if `workers` is empty); drop copies beyond `n`.
    /// Answered by [`Command::CopiesDone`] with `op`.
    Replicate {
        op: u64,
        keys: Vec<Key>,
        n: Option<usize>,
        workers: Vec<WorkerId>,
    },
    /// `Client::rebalance`: move these values (all if empty) among `workers` (all if empty)
    /// so each holds about the same bytes of them. Answered by [`Command::CopiesDone`].
    Rebalance {
        op: u64,
        keys: Vec<Key>,
        workers: Vec<WorkerId>,
    },
    /// Periodic: removes workers that stopped heartbeating; idle workers look for work.
    Tick,
}

impl Event {
    /// Short name used as the cause of transitions in the story log.
    pub fn name(&self) -> &'static str {
        match self {
            Event::ClientConnected { .. } => "client-connected",
            Event::ClientDisconnected { .. } => "client-disconnected",
            Event::UpdateGraph { .. } => "update-graph",
            Event::Want { .. } => "want",
            Event::ReleaseKeys { .. } => "release-keys",
            Event::CancelKeys { .. } => "cancel-keys",
            Event::Scattered { .. } => "scattered",
            Event::WorkerJoined { .. } => "worker-joined",
            Event::WorkerLost { .. } => "worker-lost",
            Event::WorkerClosing { .. } => "worker-closing",
            Event::Restart { .. } => "restart",
            Event::TaskFinished { .. } => "task-finished",
            Event::TaskFailed { .. } => "task-failed",
            Event::MissingData { .. } => "missing-data",
            Event::Heartbeat { .. } => "heartbeat",
            Event::TasksStarted { .. } => "tasks-started",
            Event::RetireWorkers { .. } => "retire-workers",
            Event::ReplicasAdded { .. } => "replicas-added",
            Event::ReplicasFailed { .. } => "replicas-failed",
            Event::RetireProgress => "retire-progress",
            Event::StealResponse { .. } => "steal-response",
            Event::TasksSeceded { .. } => "tasks-seceded",
            Event::Retry { .. } => "retry",
            Event::Replicate { .. } => "replicate",
            Event::Rebalance { .. } => "rebalance",
            Event::Tick => "tick",
        }
    }
}

/// Where a dependency can be fetched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepLocation {
    pub key: Key,
    pub workers: SmallVec<[Arc<str>; 2]>,
    pub nbytes: u64,
}

/// A small value travelling with its completion: the codec's name and the bytes (opaque here).
pub type InlineValue = (&'static str, Bytes);

/// What the client is told about a key it wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    Memory {
        nbytes: u64,
        workers: SmallVec<[Arc<str>; 2]>,
        value: Option<InlineValue>,
    },
    Erred(Arc<TaskError>),
    /// `None`: the client's own cancel, confirmed. `Some(why)`: the scheduler cancelled it
    /// (a restart).
    Cancelled(Option<Arc<str>>),
    Lost(String),
}

/// Everything the scheduler asks the outside world to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Compute {
        worker: WorkerId,
        key: Key,
        spec: Bytes,
        deps: Vec<DepLocation>,
        priority: i32,
        /// A client wants the result: send it back with the completion if it is small.
        inline: bool,
        /// A worker died while this task was assigned to it: the worker must report the start
        /// before running it (see `remove_worker`).
        announce: bool,
        /// Resources it holds while it runs (the worker holds them until it really ends).
        resources: Vec<(Key, f64)>,
    },
    /// Drop the value of `key`, or cancel its computation.
    Free {
        worker: WorkerId,
        key: Key,
    },
    Report {
        client: ClientId,
        key: Key,
        report: Report,
    },
    /// Tell the worker to go away (rejected or timed out).
    CloseWorker {
        worker: WorkerId,
        reason: String,
        /// Its nanny should start a fresh worker in its place.
        restart: bool,
    },
    /// Fetch these values from their holders and keep them (copies for safekeeping).
    AcquireReplicas {
        worker: WorkerId,
        keys: Vec<DepLocation>,
    },
    /// A retire request is done: these workers retired (or `refused` says why none did).
    Retired {
        op: u64,
        workers: Vec<Arc<str>>,
        refused: Option<String>,
    },
    /// Give up `key` if it has not started (work stealing); answered by
    /// [`Event::StealResponse`] with the same `id`.
    Steal {
        worker: WorkerId,
        key: Key,
        id: u64,
    },
    /// A replicate or rebalance is over: every copy arrived but `failed`.
    CopiesDone {
        op: u64,
        failed: u32,
    },
    /// Something the scheduler's log should say (the core does no IO).
    Notice {
        level: NoticeLevel,
        message: String,
    },
    /// For scheduler plugins, only while [`SchedulerCore::set_feed`](super::SchedulerCore::set_feed) is on.
    Feed(Feed),
}

/// What scheduler plugins are told (dask's `SchedulerPlugin` hooks), in the order it happened.
#[derive(Clone, Debug, PartialEq)]
pub enum Feed {
    /// A client sent these new tasks.
    UpdateGraph {
        client: ClientId,
        keys: Vec<Key>,
    },
    /// A task went from one state to another (`"forgotten"`: it is gone).
    Transition {
        key: Key,
        from: &'static str,
        to: &'static str,
    },
    AddWorker {
        worker: Arc<str>,
    },
    RemoveWorker {
        worker: Arc<str>,
        reason: String,
    },
    AddClient {
        client: ClientId,
    },
    RemoveClient {
        client: ClientId,
    },
}

/// How loud a [`Command::Notice`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeLevel {
    Info,
    Warn,
    Error,
}
