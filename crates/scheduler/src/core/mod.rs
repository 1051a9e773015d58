//! The scheduler's state machine: plain synchronous Rust, no IO, no clock, no randomness.
//!
//! One entry point, [`SchedulerCore::handle`]: an [`Event`] and the current time go in,
//! [`Command`]s come out (pushed into a `Vec` the caller owns and drains). The gRPC shell
//! (`crate::server`) turns stream messages into events and commands into stream messages.
//! See `docs/scheduler.md` for the state diagram.
//!
//! # Task states
//! ```text
//!             +-----------+  wanted / needed by an active dependent
//!  (new) ---> | Released  | ------------------------------------+
//!             +-----------+                                      v
//!                 ^  ^                      deps not in memory +---------+
//!   data freed /  |  |                  +--------------------- | Waiting |
//!   cancelled     |  |                  |                      +---------+
//!                 |  |                  v all deps in memory        |
//!                 |  |   +--------+  no eligible worker  +----------+
//!                 |  +-- | Queued | <------------------> | NoWorker |
//!                 |      +--------+  (slots full)        +----------+
//!                 |          | a worker has a free slot        |
//!                 |          v                                 v
//!                 |     +------------+   finished    +--------+
//!                 +---- | Processing | ------------> | Memory | --- last replica lost --> Waiting
//!                       +------------+               +--------+                         / Released
//!                              | failed (no retries left), or a dependency erred
//!                              v
//!                          +--------+
//!                          | Erred  |
//!                          +--------+
//! ```
//! A task nobody wants and no task depends on is *forgotten* (removed).
//!
//! # Invariants (checked by [`SchedulerCore::validate`])
//! * An *active* task (Waiting/Queued/NoWorker/Processing) has every dependency in Memory or
//!   active; `Waiting.remaining` counts those not in Memory (> 0); Queued/NoWorker/Processing
//!   tasks have all dependencies in Memory.
//! * `active_dependents` of a task counts its active dependents.
//! * A task in Memory is wanted by a client or has an active dependent; its replicas are
//!   listed both in `who_has` and in each worker's `has_what`.
//! * A wanted task is active, in Memory or Erred; an unwanted task without dependents does not
//!   exist.
//! * A worker's `processing` set holds exactly the tasks Processing on it.

mod queue;
mod retire;
mod slab;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;
use thin_vec::ThinVec;

pub use queue::ReadyQueue;

/// A worker, numbered by the shell in the order workers join. Never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

/// A connected client, numbered by the shell. Never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u32);

/// The holder of `fire_and_forget` keys: wants a key until it is done, then lets it go.
pub const FIRE_AND_FORGET: ClientId = ClientId(u32::MAX);

/// Index of a task in the core's slab. Reused after the task is forgotten, so it never leaves
/// the core: events and commands name tasks by key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(u32);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker#{}", self.0)
    }
}
impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client#{}", self.0)
    }
}

/// Keys are strings, shared between the key index and the task.
pub type Key = Arc<str>;

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
}

impl TaskError {
    /// An error the scheduler itself gives a task (no function ran).
    fn raised_here(key: &str, kind: &str, message: String, worker: &str) -> Arc<TaskError> {
        Arc::new(TaskError {
            message,
            kind: kind.to_string(),
            function: String::new(),
            key: key.to_string(),
            worker: worker.to_string(),
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
    /// Periodic: removes workers that stopped heartbeating.
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// Something the scheduler's log should say (the core does no IO).
    Notice {
        level: NoticeLevel,
        message: String,
    },
}

/// How loud a [`Command::Notice`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeLevel {
    Info,
    Warn,
    Error,
}

/// Tunables. Defaults follow dask where dask has one.
#[derive(Clone, Debug)]
pub struct Config {
    /// A worker silent for this long is removed (dask: `scheduler.worker-ttl`, 5 minutes).
    pub worker_ttl: Duration,
    /// A task that was processing on this many workers that died is erred (dask:
    /// `scheduler.allowed-failures`, 3).
    pub allowed_failures: u32,
    /// A worker is given at most as many queued tasks as it can start within this time, at
    /// the measured duration of the task's kind.
    pub soon: Duration,
    /// Cap on queued tasks per thread, however short tasks are.
    pub max_depth: u32,
    /// Assumed duration of a task kind never seen finishing (dask: 500 ms).
    pub unknown_duration: Duration,
    /// Entries kept in the transition log (0 disables it).
    pub log_len: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            worker_ttl: Duration::from_secs(300),
            allowed_failures: 3,
            soon: Duration::from_millis(10),
            max_depth: 1024,
            unknown_duration: Duration::from_millis(500),
            log_len: 100_000,
        }
    }
}

/// A task's state; each variant carries what only that state has.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskState {
    Released,
    Waiting { remaining: u32 },
    Queued,
    NoWorker,
    Processing { worker: WorkerId },
    Memory { nbytes: u64, who_has: SmallVec<[WorkerId; 1]> },
    Erred { error: Arc<TaskError> },
}

impl TaskState {
    pub fn name(&self) -> &'static str {
        match self {
            TaskState::Released => "released",
            TaskState::Waiting { .. } => "waiting",
            TaskState::Queued => "queued",
            TaskState::NoWorker => "no-worker",
            TaskState::Processing { .. } => "processing",
            TaskState::Memory { .. } => "memory",
            TaskState::Erred { .. } => "erred",
        }
    }

    /// Active tasks are on their way to Memory and need their dependencies.
    fn is_active(&self) -> bool {
        matches!(
            self,
            TaskState::Waiting { .. } | TaskState::Queued | TaskState::NoWorker | TaskState::Processing { .. }
        )
    }
}

struct Task {
    key: Key,
    state: TaskState,
    /// Encoded spec; empty for scattered data (which cannot be recomputed).
    spec: Box<[u8]>,
    dependencies: Box<[TaskId]>,
    /// Most tasks have none or few: a thin vector is one pointer (its length lives on the heap).
    dependents: ThinVec<TaskId>,
    /// Dependents in an active state: while > 0 the value must stay (or become) available.
    active_dependents: u32,
    who_wants: SmallVec<[ClientId; 1]>,
    priority: i32,
    /// Submission order, the tie-breaker of `priority`.
    order: u64,
    prefix: u32,
    retries: u32,
    /// Workers that died while this task ran on them.
    suspicious: u32,
    /// Its worker reported that it started (reset when it leaves Processing).
    started: bool,
    /// A worker died while this task was assigned to it but not known to be running: its next
    /// worker reports its start before running it.
    orphaned: bool,
    restrictions: Option<Box<Restrictions>>,
}

struct Restrictions {
    workers: Box<[Arc<str>]>,
    loose: bool,
}

struct Worker {
    spec: WorkerSpec,
    processing: FxHashSet<TaskId>,
    has_what: FxHashSet<TaskId>,
    nbytes: u64,
    last_seen: Instant,
    /// Being removed: gets no new work.
    closing: bool,
    /// Over its memory's `pause` threshold: gets no new work until it resumes.
    paused: bool,
    /// Being retired (its values move elsewhere, then it closes): gets no new work.
    retiring: Option<retire::Retiring>,
    /// What it last said of its memory.
    memory: WorkerMemory,
}

impl Worker {
    /// Takes new work.
    fn open(&self) -> bool {
        !self.closing && !self.paused && self.retiring.is_none()
    }
}

/// A worker's memory, as it reports it (dask's `WorkerState.memory`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerMemory {
    /// Resident memory of the worker process.
    pub process: u64,
    /// Bytes of values it holds in memory.
    pub managed: u64,
    /// Bytes of values it spilled to disk.
    pub spilled: u64,
    /// Bytes it wrote to disk since it started.
    pub spilled_total: u64,
    pub paused: bool,
}

impl WorkerMemory {
    /// Process memory that is not the values it holds (dask's "unmanaged").
    pub fn unmanaged(&self) -> u64 {
        self.process.saturating_sub(self.managed)
    }
}

#[derive(Default)]
struct Client {
    wants: FxHashSet<TaskId>,
}

/// Measured durations of one kind of task (keys share a prefix: `inc-<token>` -> `inc`).
struct Prefix {
    /// Exponential moving average in nanoseconds; `None` until one finished.
    avg_ns: Option<f64>,
}

/// One line of a task's story.
#[derive(Clone, Debug)]
pub struct Transition {
    pub key: Key,
    pub from: &'static str,
    pub to: &'static str,
    pub cause: &'static str,
    pub at: Instant,
}

/// A log entry as kept: 24 bytes (names interned, time as nanoseconds since the core began).
/// The key is kept as its 64-bit hash: holding the key itself kept the keys of forgotten tasks
/// alive for as long as their entries, and dropping the oldest entry's key was a cache miss on
/// every transition (3 % of a scheduler's time in map+gather).
#[derive(Clone)]
struct LogEntry {
    key: u64,
    from: u8,
    to: u8,
    cause: u8,
    at_ns: u64,
}

/// A task with more dependents than this keeps an index of where each sits in its list:
/// forgetting the 100k dependents of one task searched the list for each (3 s, quadratic).
const INDEX_OVER: usize = 64;

/// How the log names a key (a collision would only add another key's lines to a story).
fn log_key(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

/// The scheduler's whole state.
pub struct SchedulerCore {
    config: Config,
    tasks: slab::Slab<Task>,
    free_ids: Vec<u32>,
    keys: FxHashMap<Key, TaskId>,
    workers: BTreeMap<WorkerId, Worker>,
    clients: FxHashMap<ClientId, Client>,
    queue: ReadyQueue,
    no_worker: FxHashSet<TaskId>,
    /// Open (not closing) workers by occupancy, least busy first: placement of a task without
    /// inputs is O(log workers), not a scan.
    by_occupancy: BTreeSet<(u64, WorkerId)>,
    prefixes: Vec<Prefix>,
    prefix_ids: FxHashMap<Arc<str>, u32>,
    next_order: u64,
    log: VecDeque<LogEntry>,
    /// Names used in the log (states, events), interned to a byte.
    log_names: Vec<&'static str>,
    started: Instant,
    /// Tasks to re-check for release/forget at the end of the current event.
    to_check: Vec<TaskId>,
    /// For tasks with more than [`INDEX_OVER`] dependents: each dependent's position in the
    /// task's `dependents`.
    positions: FxHashMap<TaskId, FxHashMap<TaskId, u32>>,
    cause: &'static str,
    now: Instant,
    /// The value of the task finishing in the current event, if the worker sent it along:
    /// forwarded to the clients that want it, never kept.
    inline: Option<(Key, InlineValue)>,
    /// Set while `set_state` marks dependents erred, so it does not recurse.
    erred_propagating: bool,
    /// Workers a task stopped processing on during the current event: at its end they take
    /// queued tasks into the freed slots (a released or moved task frees one too).
    freed: Vec<WorkerId>,
    /// Values being copied off retiring workers, and the worker taking each copy.
    replicating: FxHashMap<TaskId, WorkerId>,
    /// Failed copies of a value in a row (retirement gives up after a few).
    copy_failures: FxHashMap<TaskId, u32>,
    retire_ops: FxHashMap<u64, retire::RetireOp>,
}

/// An impossible transition: a bug in the core, never a user's mistake.
#[derive(Debug, thiserror::Error)]
#[error("impossible transition of {key:?} from {from} to {to}")]
pub struct InvalidTransition {
    pub key: String,
    pub from: &'static str,
    pub to: &'static str,
}

impl SchedulerCore {
    pub fn new(config: Config, now: Instant) -> Self {
        SchedulerCore {
            config,
            tasks: slab::Slab::default(),
            free_ids: Vec::new(),
            keys: FxHashMap::default(),
            workers: BTreeMap::new(),
            clients: FxHashMap::default(),
            queue: ReadyQueue::default(),
            no_worker: FxHashSet::default(),
            by_occupancy: BTreeSet::new(),
            prefixes: Vec::new(),
            prefix_ids: FxHashMap::default(),
            next_order: 0,
            log: VecDeque::new(),
            log_names: Vec::new(),
            started: now,
            to_check: Vec::new(),
            positions: FxHashMap::default(),
            cause: "",
            now,
            erred_propagating: false,
            inline: None,
            freed: Vec::new(),
            replicating: FxHashMap::default(),
            copy_failures: FxHashMap::default(),
            retire_ops: FxHashMap::default(),
        }
    }

    // ------------------------------------------------------------------ queries

    pub fn n_tasks(&self) -> usize {
        self.keys.len()
    }

    pub fn task_state(&self, key: &str) -> Option<&TaskState> {
        self.keys.get(key).map(|&id| &self.task(id).state)
    }

    /// Addresses holding each key (empty for keys not in memory or unknown).
    pub fn who_has(&self, key: &str) -> Vec<Arc<str>> {
        match self.task_state(key) {
            Some(TaskState::Memory { who_has, .. }) => {
                who_has.iter().map(|w| self.workers[w].spec.address.clone()).collect()
            }
            _ => Vec::new(),
        }
    }

    /// For each worker: its spec, keys held, tasks processing, bytes held.
    pub fn workers(&self) -> impl Iterator<Item = (WorkerId, &WorkerSpec, Vec<Key>, usize, u64)> + '_ {
        self.workers.iter().map(|(id, w)| {
            let keys = w.has_what.iter().map(|t| self.task(*t).key.clone()).collect();
            (*id, &w.spec, keys, w.processing.len(), w.nbytes)
        })
    }

    /// What a worker last said of its memory.
    pub fn worker_memory(&self, id: WorkerId) -> Option<WorkerMemory> {
        self.workers.get(&id).map(|w| w.memory)
    }

    /// dask's worker status: `running`, `paused`, `closing_gracefully` (retiring), `closed`
    /// (retired, left connected), `closing`.
    pub fn worker_status(&self, id: WorkerId) -> Option<&'static str> {
        let w = self.workers.get(&id)?;
        Some(match &w.retiring {
            _ if w.closing => "closing",
            Some(r) if r.is_done() => "closed",
            Some(_) => "closing_gracefully",
            None if w.paused => "paused",
            None => "running",
        })
    }

    pub fn n_workers(&self) -> usize {
        self.workers.len()
    }

    pub fn worker_spec(&self, id: WorkerId) -> Option<&WorkerSpec> {
        self.workers.get(&id).map(|w| &w.spec)
    }

    pub fn worker_last_seen(&self, id: WorkerId) -> Option<Instant> {
        self.workers.get(&id).map(|w| w.last_seen)
    }

    /// The transitions of `key` still in the log, oldest first.
    pub fn story(&self, key: &str) -> Vec<Transition> {
        let hash = log_key(key);
        let key: Key = Arc::from(key);
        self.log
            .iter()
            .filter(|t| t.key == hash)
            .map(|t| Transition {
                key: key.clone(),
                from: self.log_names[t.from as usize],
                to: self.log_names[t.to as usize],
                cause: self.log_names[t.cause as usize],
                at: self.started + Duration::from_nanos(t.at_ns),
            })
            .collect()
    }

    // ------------------------------------------------------------------ the entry point

    /// Applies one event. Commands are appended to `out`.
    pub fn handle(&mut self, event: Event, now: Instant, out: &mut Vec<Command>) {
        self.now = now;
        self.cause = event.name();
        match event {
            Event::ClientConnected { client } => {
                self.clients.entry(client).or_default();
            }
            Event::ClientDisconnected { client } => {
                if let Some(c) = self.clients.remove(&client) {
                    for t in c.wants {
                        self.unwant(t, client);
                    }
                }
            }
            Event::UpdateGraph { client, tasks, wants } => self.update_graph(client, tasks, wants, out),
            Event::Want { client, keys } => {
                for key in keys {
                    if let Some(&t) = self.keys.get(&key) {
                        self.want(t, client, out);
                    } else {
                        out.push(Command::Report {
                            client,
                            key,
                            report: Report::Lost("the scheduler does not know this key".into()),
                        });
                    }
                }
            }
            Event::ReleaseKeys { client, keys } => {
                for key in keys {
                    if let Some(&t) = self.keys.get(&key) {
                        self.client_release(client, t);
                    }
                }
            }
            Event::CancelKeys { client, keys } => {
                for key in keys {
                    if let Some(&t) = self.keys.get(&key)
                        && self.task(t).who_wants.contains(&client)
                    {
                        self.client_release(client, t);
                    }
                    out.push(Command::Report { client, key, report: Report::Cancelled(None) });
                }
            }
            Event::Scattered { client, keys } => self.scattered(client, keys, out),
            Event::WorkerJoined { worker, spec } => self.worker_joined(worker, spec, out),
            Event::WorkerLost { worker, reason, expected } => self.remove_worker(worker, &reason, expected, out),
            Event::WorkerClosing { worker } => {
                if let Some(w) = self.workers.get_mut(&worker)
                    && !w.closing
                {
                    let key = (occupancy(w), worker);
                    if w.open() {
                        self.by_occupancy.remove(&key);
                    }
                    w.closing = true;
                }
            }
            Event::Restart { reason } => self.restart(&reason, out),
            Event::RetireWorkers { op, workers, close, restart, reason } => {
                self.retire(op, workers, close, restart, &reason, out)
            }
            Event::ReplicasAdded { worker, keys } => self.replicas_added(worker, keys, out),
            Event::ReplicasFailed { worker, keys } => self.replicas_failed(worker, keys, out),
            Event::RetireProgress => self.progress_retirement(out),
            Event::TaskFinished { worker, key, nbytes, duration, value } => {
                self.inline = value.map(|v| (key.clone(), v));
                self.task_finished(worker, key, nbytes, duration, out);
                self.inline = None;
            }
            Event::TaskFailed { worker, key, error, duration } => self.task_failed(worker, key, error, duration, out),
            Event::MissingData { worker, key, dependency, from } => {
                self.missing_data(worker, key, dependency, from, out)
            }
            Event::Heartbeat { worker, memory } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.last_seen = now;
                    if let Some(m) = memory {
                        w.memory = m;
                        if m.paused != w.paused {
                            self.set_paused(worker, m.paused, out);
                        }
                    }
                }
            }
            Event::TasksStarted { worker, keys, .. } => {
                for key in keys {
                    if let Some(&t) = self.keys.get(&key)
                        && matches!(self.task(t).state, TaskState::Processing { worker: w } if w == worker)
                    {
                        self.task_mut(t).started = true;
                    }
                }
            }
            Event::Tick => {
                let ttl = self.config.worker_ttl;
                let dead: Vec<WorkerId> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| now.saturating_duration_since(w.last_seen) > ttl)
                    .map(|(id, _)| *id)
                    .collect();
                for w in dead {
                    let reason = format!("no heartbeat for {:?} (worker-ttl)", ttl);
                    out.push(Command::CloseWorker { worker: w, reason: reason.clone(), restart: true });
                    self.remove_worker(w, &reason, false, out);
                }
            }
        }
        self.settle(out);
        while let Some(w) = self.freed.pop() {
            self.fill(w, out);
        }
    }

    /// Whether any worker is retiring: the shell then sends [`Event::RetireProgress`] after each
    /// batch of events.
    pub fn is_retiring(&self) -> bool {
        !self.retire_ops.is_empty() || self.workers.values().any(|w| w.retiring.as_ref().is_some_and(|r| !r.is_done()))
    }

    // ------------------------------------------------------------------ clients

    fn update_graph(&mut self, client: ClientId, tasks: Vec<NewTask>, wants: Vec<Key>, out: &mut Vec<Command>) {
        self.clients.entry(client).or_default();
        // Pass 1: records for the keys we do not know yet.
        let mut created: Vec<(TaskId, Vec<Key>)> = Vec::new();
        for nt in tasks {
            if self.keys.contains_key(&nt.key) {
                continue; // same key: pure submissions share one task
            }
            let prefix = self.prefix_of(&nt.key);
            let restrictions = (!nt.workers.is_empty()).then(|| {
                Box::new(Restrictions { workers: nt.workers.into_boxed_slice(), loose: nt.allow_other_workers })
            });
            let order = self.next_order;
            self.next_order += 1;
            let id = self.insert(Task {
                key: nt.key,
                state: TaskState::Released,
                spec: nt.spec,
                dependencies: Box::new([]),
                dependents: ThinVec::new(),
                active_dependents: 0,
                who_wants: SmallVec::new(),
                priority: nt.priority,
                order,
                prefix,
                retries: nt.retries,
                suspicious: 0,
                started: false,
                orphaned: false,
                restrictions,
            });
            created.push((id, nt.dependencies));
        }
        // Pass 2: link dependencies (they may come later in the batch).
        let mut bad: Vec<(TaskId, String)> = Vec::new();
        for (id, deps) in &created {
            if self.task(*id).spec.is_empty() {
                bad.push((*id, "the task has no function (empty spec); submit it with a registered function".into()));
            }
            let mut ids: Vec<TaskId> = Vec::with_capacity(deps.len());
            for d in deps {
                match self.keys.get(d) {
                    Some(&dep) if dep != *id => ids.push(dep),
                    Some(_) => bad.push((*id, format!("task depends on itself ({d:?})"))),
                    None => bad.push((
                        *id,
                        format!(
                            "dependency {d:?} is not a known key: submit it in the same graph, or keep its future alive"
                        ),
                    )),
                }
            }
            // A key listed twice is one dependency (sorting keeps this linear-ish for huge fan-ins).
            ids.sort_unstable();
            ids.dedup();
            for &dep in &ids {
                self.add_dependent(dep, *id);
            }
            self.task_mut(*id).dependencies = ids.into_boxed_slice();
        }
        // Cycles can only run through new tasks (old ones cannot depend on new ones).
        for id in self.find_cycles(created.iter().map(|(id, _)| *id)) {
            bad.push((id, "the graph has a cycle through this task".to_string()));
        }
        // An invalid task errs once (it may both miss a dependency and lie on a cycle), and
        // drops its dependency edges: otherwise the members of a cycle would keep each other
        // alive (each has a dependent) after every client released them.
        let mut seen: FxHashSet<TaskId> = FxHashSet::default();
        for (id, why) in bad {
            if !seen.insert(id) {
                continue;
            }
            // Still released, so no `active_dependents` counts change.
            let deps = std::mem::take(&mut self.task_mut(id).dependencies);
            for &d in deps.iter() {
                if self.remove_dependent(d, id) {
                    self.to_check.push(d);
                }
            }
            let err = TaskError::raised_here(&self.task(id).key, "invalid-graph", why, "");
            self.set_state(id, TaskState::Erred { error: err }, out);
        }
        for key in wants {
            match self.keys.get(&key) {
                Some(&t) => self.want(t, client, out),
                None => out.push(Command::Report {
                    client,
                    key,
                    report: Report::Lost("the scheduler does not know this key".into()),
                }),
            }
        }
        // Cull what nobody asked for.
        for (id, _) in created {
            if self.tasks.slot(id.0).is_some() {
                self.to_check.push(id);
            }
        }
    }

    /// Tasks among `new` that lie on a cycle (Kahn's algorithm over the new tasks only).
    fn find_cycles(&self, new: impl Iterator<Item = TaskId>) -> Vec<TaskId> {
        let new: Vec<TaskId> = new.collect();
        let set: FxHashSet<TaskId> = new.iter().copied().collect();
        let mut indeg: FxHashMap<TaskId, u32> = FxHashMap::default();
        for &t in &new {
            let n = self.task(t).dependencies.iter().filter(|d| set.contains(d)).count();
            indeg.insert(t, n as u32);
        }
        let mut stack: Vec<TaskId> = indeg.iter().filter(|(_, n)| **n == 0).map(|(t, _)| *t).collect();
        while let Some(t) = stack.pop() {
            indeg.remove(&t);
            for d in &self.task(t).dependents {
                if let Some(n) = indeg.get_mut(d) {
                    *n -= 1;
                    if *n == 0 {
                        stack.push(*d);
                    }
                }
            }
        }
        indeg.into_keys().collect()
    }

    fn want(&mut self, t: TaskId, client: ClientId, out: &mut Vec<Command>) {
        if client == FIRE_AND_FORGET && matches!(self.task(t).state, TaskState::Memory { .. } | TaskState::Erred { .. })
        {
            return; // already done: nothing to keep alive
        }
        let c = self.clients.entry(client).or_default();
        // Wanting a key again is how a client asks where it is now (its holder may have gone):
        // it gets the current report.
        if c.wants.insert(t) {
            self.task_mut(t).who_wants.push(client);
        }
        match &self.task(t).state {
            TaskState::Memory { .. } | TaskState::Erred { .. } => {
                if let Some(report) = self.report_of(t) {
                    out.push(Command::Report { client, key: self.task(t).key.clone(), report });
                }
            }
            TaskState::Released => self.compute(t, out),
            _ => {}
        }
    }

    fn client_release(&mut self, client: ClientId, t: TaskId) {
        if let Some(c) = self.clients.get_mut(&client)
            && c.wants.remove(&t)
        {
            self.unwant(t, client);
        }
    }

    fn unwant(&mut self, t: TaskId, client: ClientId) {
        let task = self.task_mut(t);
        task.who_wants.retain(|c| *c != client);
        if task.who_wants.is_empty() {
            self.to_check.push(t);
        }
    }

    fn scattered(&mut self, client: ClientId, keys: Vec<(Key, Vec<Arc<str>>, u64)>, out: &mut Vec<Command>) {
        for (key, addrs, nbytes) in keys {
            let holders: SmallVec<[WorkerId; 1]> = addrs
                .iter()
                .filter_map(|a| self.workers.iter().find(|(_, w)| w.spec.address == *a).map(|(id, _)| *id))
                .collect();
            let id = match self.keys.get(&key) {
                Some(&id) => id,
                None => {
                    let prefix = self.prefix_of(&key);
                    let order = self.next_order;
                    self.next_order += 1;
                    self.insert(Task {
                        key: key.clone(),
                        state: TaskState::Released,
                        spec: Box::new([]),
                        dependencies: Box::new([]),
                        dependents: ThinVec::new(),
                        active_dependents: 0,
                        who_wants: SmallVec::new(),
                        priority: 0,
                        order,
                        prefix,
                        retries: 0,
                        suspicious: 0,
                        started: false,
                        orphaned: false,
                        restrictions: None,
                    })
                }
            };
            if holders.is_empty() {
                let err = TaskError::raised_here(&key, "lost", format!("scattered to unknown workers {addrs:?}"), "");
                if !matches!(self.task(id).state, TaskState::Memory { .. } | TaskState::Erred { .. }) {
                    self.set_state(id, TaskState::Erred { error: err }, out);
                }
            } else {
                match &self.task(id).state {
                    TaskState::Memory { .. } => {
                        for w in holders {
                            self.add_replica(id, w);
                        }
                    }
                    _ => {
                        self.set_state(id, TaskState::Memory { nbytes, who_has: holders }, out);
                    }
                }
            }
            self.want(id, client, out);
        }
    }

    // ------------------------------------------------------------------ workers

    fn worker_joined(&mut self, worker: WorkerId, spec: WorkerSpec, out: &mut Vec<Command>) {
        if let Some((_, other)) =
            self.workers.iter().find(|(_, w)| w.spec.name == spec.name || w.spec.address == spec.address)
        {
            let why = if other.spec.name == spec.name { "name" } else { "address" };
            out.push(Command::CloseWorker {
                restart: false,
                worker,
                reason: format!(
                    "a worker with {why} {:?} is already connected",
                    if why == "name" { &spec.name } else { &spec.address }
                ),
            });
            return;
        }
        self.workers.insert(
            worker,
            Worker {
                spec,
                processing: FxHashSet::default(),
                has_what: FxHashSet::default(),
                nbytes: 0,
                last_seen: self.now,
                closing: false,
                paused: false,
                retiring: None,
                memory: WorkerMemory::default(),
            },
        );
        self.by_occupancy.insert((0, worker));
        // Tasks that had nowhere to go may now run.
        self.reschedule_no_worker(out);
        self.fill(worker, out);
    }

    /// Forgets every task: every client is told its keys were cancelled, workers to drop what
    /// they hold or run. Workers stay (the shell restarts them through their nannies); measured
    /// durations stay too.
    fn restart(&mut self, reason: &str, out: &mut Vec<Command>) {
        self.restart_cancels_retirement(out);
        let why: Arc<str> = Arc::from(reason);
        let n = self.keys.len();
        let mut clients: Vec<ClientId> = self.clients.keys().copied().collect();
        clients.sort();
        for c in clients {
            let wants = std::mem::take(&mut self.clients.get_mut(&c).expect("listed").wants);
            if c == FIRE_AND_FORGET {
                continue;
            }
            let mut keys: Vec<Key> = wants.iter().map(|t| self.task(*t).key.clone()).collect();
            keys.sort();
            for key in keys {
                out.push(Command::Report { client: c, key, report: Report::Cancelled(Some(why.clone())) });
            }
        }
        for (id, w) in &mut self.workers {
            let mut held: Vec<TaskId> = w.has_what.drain().chain(w.processing.drain()).collect();
            held.sort();
            for t in held {
                let key = self.tasks.slot(t.0).as_ref().expect("live task").key.clone();
                out.push(Command::Free { worker: *id, key });
            }
            w.nbytes = 0;
        }
        self.by_occupancy = self.workers.iter().filter(|(_, w)| w.open()).map(|(id, _)| (0, *id)).collect();
        self.tasks = slab::Slab::default();
        self.free_ids.clear();
        self.keys.clear();
        self.queue = ReadyQueue::default();
        self.no_worker.clear();
        self.positions.clear();
        self.to_check.clear();
        self.freed.clear();
        self.replicating.clear();
        self.copy_failures.clear();
        out.push(Command::Notice {
            level: NoticeLevel::Warn,
            message: format!("restart: released every task ({n}); {reason}"),
        });
    }

    /// A worker paused (over its memory's `pause` threshold) or resumed. A paused worker gets
    /// no new tasks; what it has queued waits for it.
    fn set_paused(&mut self, worker: WorkerId, paused: bool, out: &mut Vec<Command>) {
        let w = self.workers.get_mut(&worker).expect("known worker");
        let was_open = w.open();
        w.paused = paused;
        let (addr, m, limit) = (w.spec.address.clone(), w.memory, w.spec.memory_limit);
        let key = (occupancy(w), worker);
        match (was_open, w.open()) {
            (true, false) => {
                self.by_occupancy.remove(&key);
            }
            (false, true) => {
                self.by_occupancy.insert(key);
            }
            _ => {}
        }
        let mb = |b: u64| b / 1_000_000;
        let message = if paused {
            format!(
                "worker {addr} paused: process memory {} MB is over its pause threshold (limit {} MB); \
                 it gets no new tasks until it resumes",
                mb(m.process),
                mb(limit)
            )
        } else {
            format!("worker {addr} resumed: process memory {} MB (limit {} MB)", mb(m.process), mb(limit))
        };
        out.push(Command::Notice { level: NoticeLevel::Warn, message });
        if !paused {
            self.reschedule_no_worker(out);
            self.fill(worker, out);
        }
    }

    /// Tasks that had nowhere to go are placed again (a worker joined or resumed).
    fn reschedule_no_worker(&mut self, out: &mut Vec<Command>) {
        let mut stuck: Vec<TaskId> = self.no_worker.iter().copied().collect();
        stuck.sort_by_key(|t| self.queue_key(*t));
        for t in stuck {
            self.schedule(t, out);
        }
    }

    /// Removes a worker. Unless its leaving was `expected` (retired, restarted), each task
    /// it was running counts it as a worker that died under it: a task that was running on more
    /// than `allowed_failures` workers that died is erred as killed-worker. Tasks only queued
    /// there count nothing (our queues are deep; a task waiting its turn did not kill anyone);
    /// they are marked `orphaned` so their next worker reports their start before running them,
    /// and a task that kills its worker at once is still caught the next time. If the worker
    /// reported nothing running, every task assigned there counts (as in dask): one of them
    /// may have killed it before its start could be reported.
    fn remove_worker(&mut self, worker: WorkerId, reason: &str, expected: bool, out: &mut Vec<Command>) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let was_open = w.open();
        w.closing = true;
        let key = (occupancy(w), worker);
        let addr = w.spec.address.clone();
        if was_open {
            self.by_occupancy.remove(&key);
        }
        // Values only it held are lost (their processing dependents go back to waiting).
        let mut held: Vec<TaskId> = w.has_what.drain().collect();
        w.nbytes = 0;
        held.sort_by_key(|t| self.task(*t).order);
        let mut lost = Vec::new();
        for t in held {
            let TaskState::Memory { who_has, .. } = &mut self.task_mut(t).state else {
                unreachable!("has_what lists a task not in memory")
            };
            who_has.retain(|x| *x != worker);
            if who_has.is_empty() {
                lost.push(t);
            }
        }
        self.data_lost(&lost, &format!("worker {addr} left ({reason})"), out);
        // Tasks it was running go elsewhere, unless workers keep dying under them.
        let mut processing: Vec<TaskId> = self.workers[&worker].processing.iter().copied().collect();
        processing.sort_by_key(|t| self.task(*t).order);
        let any_started = processing.iter().any(|t| self.task(*t).started);
        let allowed_failures = self.config.allowed_failures;
        for t in processing {
            let task = self.task_mut(t);
            if !expected && (task.started || !any_started) {
                task.suspicious += 1;
            } else if !expected {
                task.orphaned = true;
            }
            if task.suspicious > allowed_failures {
                let n = task.suspicious;
                let message = format!(
                    "Attempted to run task {:?} on {n} different workers, but all those workers died while \
                     running it (running on {n} workers that died; allowed-failures is {allowed_failures}). \
                     The last worker was {addr}: {reason}. The task may be crashing its workers or using \
                     too much memory: check that worker's log (dask's KilledWorker).",
                    &*task.key
                );
                out.push(Command::Notice {
                    level: NoticeLevel::Error,
                    message: format!("task {} marked as failed because {n} workers died while running it", task.key),
                });
                let err = TaskError::raised_here(&task.key, "killed-worker", message, &addr);
                self.set_state(t, TaskState::Erred { error: err }, out);
            } else {
                self.schedule(t, out);
            }
        }
        let w = self.workers.remove(&worker).expect("worker exists");
        debug_assert!(w.processing.is_empty() && w.has_what.is_empty());
        self.retire_worker_gone(worker, w.retiring, out);
        // The dead worker's commands are dropped by the shell; drop them here already.
        out.retain(
            |c| !matches!(c, Command::Compute { worker: x, .. } | Command::Free { worker: x, .. } if *x == worker),
        );
        if self.workers.is_empty() {
            while let Some(t) = self.queue.peek() {
                self.set_state(t, TaskState::NoWorker, out);
            }
        } else {
            let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
            for w in ids {
                self.fill(w, out);
            }
        }
    }

    /// The last replica of `t` is gone.
    /// The last replicas of `lost` are gone. All of them are released first, then the needed
    /// ones recomputed, so no Compute names a holder that is gone.
    fn data_lost(&mut self, lost: &[TaskId], why: &str, out: &mut Vec<Command>) {
        let mut recompute = Vec::new();
        for &t in lost {
            let needed = !self.task(t).who_wants.is_empty() || self.task(t).active_dependents > 0;
            if self.task(t).spec.is_empty() {
                // Scattered data cannot be recomputed.
                let message = format!("the only copy of this scattered value was lost: {why}");
                let err = TaskError::raised_here(&self.task(t).key, "lost", message, "");
                self.set_state(t, TaskState::Erred { error: err }, out);
                continue;
            }
            self.set_state(t, TaskState::Released, out);
            if needed {
                recompute.push(t);
            } else {
                self.to_check.push(t);
            }
        }
        for t in recompute {
            // Needed then; still needed unless an erred input failed its dependents meanwhile.
            let task = self.task(t);
            if !task.who_wants.is_empty() || task.active_dependents > 0 {
                self.compute(t, out);
            } else {
                self.to_check.push(t);
            }
        }
    }

    fn task_finished(&mut self, worker: WorkerId, key: Key, nbytes: u64, duration: Duration, out: &mut Vec<Command>) {
        let Some(&t) = self.keys.get(&key) else {
            out.push(Command::Free { worker, key });
            return;
        };
        match &self.task(t).state {
            TaskState::Processing { worker: w } if *w == worker => {}
            TaskState::Memory { who_has, .. } if who_has.contains(&worker) => return,
            _ => {
                // A stale result (the task was moved or released meanwhile).
                if self.workers.contains_key(&worker) {
                    out.push(Command::Free { worker, key });
                }
                return;
            }
        }
        self.record_duration(t, duration);
        self.set_state(t, TaskState::Memory { nbytes, who_has: SmallVec::from_elem(worker, 1) }, out);
        self.fill(worker, out);
    }

    fn task_failed(
        &mut self,
        worker: WorkerId,
        key: Key,
        mut error: TaskError,
        duration: Duration,
        out: &mut Vec<Command>,
    ) {
        let Some(&t) = self.keys.get(&key) else {
            return;
        };
        if !matches!(self.task(t).state, TaskState::Processing { worker: w } if w == worker) {
            return;
        }
        self.record_duration(t, duration);
        if self.task(t).retries > 0 {
            self.task_mut(t).retries -= 1;
            self.set_state(t, TaskState::Released, out);
            self.compute(t, out);
        } else {
            if error.key.is_empty() {
                error.key = key.to_string();
            }
            self.set_state(t, TaskState::Erred { error: Arc::new(error) }, out);
        }
        self.fill(worker, out);
    }

    fn missing_data(
        &mut self,
        worker: WorkerId,
        key: Key,
        dependency: Key,
        from: Vec<Arc<str>>,
        out: &mut Vec<Command>,
    ) {
        if let Some(&d) = self.keys.get(&dependency) {
            let gone: Vec<WorkerId> =
                self.workers.iter().filter(|(_, w)| from.contains(&w.spec.address)).map(|(id, _)| *id).collect();
            for w in gone {
                if let TaskState::Memory { who_has, nbytes } = &mut self.task_mut(d).state
                    && who_has.contains(&w)
                {
                    who_has.retain(|x| *x != w);
                    let empty = who_has.is_empty();
                    let nbytes = *nbytes;
                    let worker = self.workers.get_mut(&w).expect("worker exists");
                    worker.has_what.remove(&d);
                    worker.nbytes -= nbytes;
                    if empty {
                        self.data_lost(&[d], "a worker reported it missing", out);
                        break;
                    }
                }
            }
        }
        // If the task still waits on this worker, try again (with fresh locations).
        if let Some(&t) = self.keys.get(&key)
            && matches!(self.task(t).state, TaskState::Processing { worker: w } if w == worker)
        {
            self.set_state(t, TaskState::Released, out);
            self.compute(t, out);
        }
    }

    // ------------------------------------------------------------------ scheduling

    /// Makes a Released task (and, recursively, its released dependencies) head for Memory.
    fn compute(&mut self, root: TaskId, out: &mut Vec<Command>) {
        let mut stack = vec![root];
        while let Some(t) = stack.pop() {
            if !matches!(self.task(t).state, TaskState::Released) {
                continue;
            }
            if self.task(t).spec.is_empty() {
                // A key without a spec (scattered, then lost) cannot be recomputed.
                let message = "this value was scattered and is lost; it cannot be recomputed";
                let err = TaskError::raised_here(&self.task(t).key, "lost", message.into(), "");
                self.set_state(t, TaskState::Erred { error: err }, out);
                continue;
            }
            let mut remaining = 0;
            let mut erred = None;
            let mut released: SmallVec<[TaskId; 8]> = SmallVec::new();
            for &d in self.task(t).dependencies.iter() {
                match &self.task(d).state {
                    TaskState::Memory { .. } => {}
                    TaskState::Erred { error } => erred = Some(error.clone()),
                    TaskState::Released => {
                        remaining += 1;
                        released.push(d);
                    }
                    _ => remaining += 1,
                }
            }
            if let Some(error) = erred {
                self.set_state(t, TaskState::Erred { error }, out);
            } else if remaining > 0 {
                // Our released dependencies become active below, after we count on them.
                self.set_state(t, TaskState::Waiting { remaining }, out);
                stack.extend(released);
            } else {
                self.schedule(t, out);
            }
        }
    }

    /// Places a task whose dependencies are all in memory: on a worker with a free slot,
    /// in the queue, or in no-worker.
    fn schedule(&mut self, t: TaskId, out: &mut Vec<Command>) {
        let placement = self.pick_worker(t);
        match placement {
            Placement::Worker(w) => self.set_state(t, TaskState::Processing { worker: w }, out),
            Placement::Queue => {
                if !matches!(self.task(t).state, TaskState::Queued) {
                    self.set_state(t, TaskState::Queued, out);
                }
            }
            Placement::NoWorker => {
                if !matches!(self.task(t).state, TaskState::NoWorker) {
                    self.set_state(t, TaskState::NoWorker, out);
                }
            }
        }
    }

    fn pick_worker(&self, t: TaskId) -> Placement {
        let task = self.task(t);
        let eligible = |w: &Worker| {
            w.open()
                && match &task.restrictions {
                    None => true,
                    Some(r) => r.loose || r.workers.iter().any(|x| *x == w.spec.address || *x == w.spec.name),
                }
        };
        if let Some(r) = &task.restrictions
            && !r.loose
        {
            // Restricted tasks are not held back by the slot limit: only these workers may run them.
            return self
                .workers
                .iter()
                .filter(|(_, w)| eligible(w))
                .min_by_key(|(id, w)| (occupancy(w), **id))
                .map_or(Placement::NoWorker, |(id, _)| Placement::Worker(*id));
        }
        if self.workers.values().all(|w| w.closing) {
            return Placement::NoWorker;
        }
        let limit = self.depth(task.prefix);
        let has_slot =
            |w: &Worker| w.open() && (w.processing.len() as u64) < w.spec.nthreads.max(1) as u64 * limit as u64;
        // Loose restrictions (`allow_other_workers`): the named workers first, if they have room.
        if let Some(r) = &task.restrictions {
            let named = |w: &Worker| r.workers.iter().any(|x| *x == w.spec.address || *x == w.spec.name);
            if let Some((id, _)) =
                self.workers.iter().filter(|(_, w)| named(w) && has_slot(w)).min_by_key(|(id, w)| (occupancy(w), **id))
            {
                return Placement::Worker(*id);
            }
        }
        // Prefer the worker holding most of the inputs' bytes.
        if !task.dependencies.is_empty() {
            let mut bytes: SmallVec<[(WorkerId, u64); 4]> = SmallVec::new();
            for &d in task.dependencies.iter() {
                if let TaskState::Memory { nbytes, who_has } = &self.task(d).state {
                    for w in who_has {
                        match bytes.iter_mut().find(|(x, _)| x == w) {
                            Some((_, b)) => *b += nbytes,
                            None => bytes.push((*w, *nbytes)),
                        }
                    }
                }
            }
            let best = bytes
                .iter()
                .filter(|(w, _)| has_slot(&self.workers[w]))
                .max_by_key(|(w, b)| (*b, std::cmp::Reverse(occupancy(&self.workers[w])), std::cmp::Reverse(*w)));
            if let Some((w, _)) = best {
                return Placement::Worker(*w);
            }
        }
        // The least busy open worker has the most room per thread: if it has no free slot,
        // none has.
        match self.by_occupancy.first() {
            Some((_, id)) if has_slot(&self.workers[id]) => Placement::Worker(*id),
            _ => Placement::Queue,
        }
    }

    /// How many tasks of this kind a thread may have queued: as many as it can start "soon".
    fn depth(&self, prefix: u32) -> u32 {
        let avg = self.prefixes[prefix as usize].avg_ns.unwrap_or(self.config.unknown_duration.as_nanos() as f64);
        let n = self.config.soon.as_nanos() as f64 / avg.max(1.0);
        (n as u32).clamp(1, self.config.max_depth)
    }

    /// Gives `worker` queued tasks while it has free slots.
    fn fill(&mut self, worker: WorkerId, out: &mut Vec<Command>) {
        while let Some(t) = self.queue.peek() {
            let limit = self.depth(self.task(t).prefix);
            let Some(w) = self.workers.get(&worker) else {
                return;
            };
            if !w.open() || w.processing.len() as u64 >= w.spec.nthreads.max(1) as u64 * limit as u64 {
                return;
            }
            // Leaving Queued takes it out of the queue.
            self.set_state(t, TaskState::Processing { worker }, out);
        }
    }

    fn record_duration(&mut self, t: TaskId, d: Duration) {
        let prefix = self.task(t).prefix as usize;
        let p = &mut self.prefixes[prefix];
        let ns = d.as_nanos() as f64;
        p.avg_ns = Some(match p.avg_ns {
            None => ns,
            Some(avg) => 0.5 * avg + 0.5 * ns,
        });
    }

    fn prefix_of(&mut self, key: &str) -> u32 {
        let name = key_prefix(key);
        if let Some(&p) = self.prefix_ids.get(name) {
            return p;
        }
        let name: Arc<str> = Arc::from(name);
        let id = self.prefixes.len() as u32;
        self.prefixes.push(Prefix { avg_ns: None });
        self.prefix_ids.insert(name, id);
        id
    }

    // ------------------------------------------------------------------ transitions

    /// The one place task states change (except the two direct writes for tasks whose worker
    /// is already gone). Keeps every counter and index in step, and emits the commands.
    fn set_state(&mut self, t: TaskId, new: TaskState, out: &mut Vec<Command>) {
        let old = std::mem::replace(&mut self.task_mut(t).state, TaskState::Released);
        let (from, to) = (old.name(), new.name());
        if !allowed(&old, &new) {
            // A bug in the core. Keep the old state rather than corrupt the counters.
            self.task_mut(t).state = old;
            let err = InvalidTransition { key: self.task(t).key.to_string(), from, to };
            debug_assert!(false, "{err}");
            tracing::error!("{err}");
            return;
        }
        // Leave the old state.
        match &old {
            TaskState::Queued => {
                self.queue.remove(self.queue_key(t));
            }
            TaskState::NoWorker => {
                self.no_worker.remove(&t);
            }
            TaskState::Processing { worker } => {
                self.task_mut(t).started = false;
                if let Some(w) = self.workers.get_mut(worker) {
                    let before = occupancy(w);
                    w.processing.remove(&t);
                    if w.open() {
                        self.by_occupancy.remove(&(before, *worker));
                        self.by_occupancy.insert((occupancy(w), *worker));
                    }
                    self.freed.push(*worker);
                    if !matches!(new, TaskState::Memory { .. }) {
                        // Cancel the computation on the worker.
                        out.push(Command::Free { worker: *worker, key: self.task(t).key.clone() });
                    }
                }
            }
            TaskState::Memory { who_has, nbytes } => {
                self.replicating.remove(&t);
                self.copy_failures.remove(&t);
                for w in who_has {
                    if let Some(worker) = self.workers.get_mut(w) {
                        worker.has_what.remove(&t);
                        worker.nbytes = worker.nbytes.saturating_sub(*nbytes);
                        out.push(Command::Free { worker: *w, key: self.task(t).key.clone() });
                    }
                }
                // Dependents that were counting on this value wait for it again.
                let dependents = self.task(t).dependents.clone();
                for d in dependents {
                    match self.task(d).state {
                        TaskState::Waiting { .. } => {
                            if let TaskState::Waiting { remaining } = &mut self.task_mut(d).state {
                                *remaining += 1;
                            }
                        }
                        TaskState::Queued | TaskState::NoWorker | TaskState::Processing { .. } => {
                            self.set_state(d, TaskState::Waiting { remaining: 1 }, out);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        let was_active = old.is_active();
        let is_active = new.is_active();
        if was_active != is_active {
            let deps = self.task(t).dependencies.clone();
            for d in deps.iter() {
                let dep = self.task_mut(*d);
                if is_active {
                    dep.active_dependents += 1;
                } else {
                    dep.active_dependents -= 1;
                    if dep.active_dependents == 0 {
                        self.to_check.push(*d);
                    }
                }
            }
        }
        self.log_transition(t, from, to);
        // Enter the new state.
        match &new {
            TaskState::Queued => self.queue.push(self.queue_key(t)),
            TaskState::NoWorker => {
                self.no_worker.insert(t);
            }
            TaskState::Processing { worker } => {
                let w = self.workers.get_mut(worker).expect("processing on a known worker");
                let before = occupancy(w);
                w.processing.insert(t);
                let after = occupancy(w);
                if self.by_occupancy.remove(&(before, *worker)) {
                    self.by_occupancy.insert((after, *worker));
                }
                let task = self.task(t);
                let deps = task
                    .dependencies
                    .iter()
                    .map(|d| {
                        let dep = self.task(*d);
                        let TaskState::Memory { nbytes, who_has } = &dep.state else {
                            unreachable!("processing task with a dependency not in memory")
                        };
                        DepLocation {
                            key: dep.key.clone(),
                            workers: who_has.iter().map(|w| self.workers[w].spec.address.clone()).collect(),
                            nbytes: *nbytes,
                        }
                    })
                    .collect();
                out.push(Command::Compute {
                    worker: *worker,
                    key: task.key.clone(),
                    spec: Bytes::copy_from_slice(&task.spec),
                    deps,
                    priority: task.priority,
                    inline: task.who_wants.iter().any(|c| *c != FIRE_AND_FORGET),
                    announce: task.orphaned || task.suspicious > 0,
                });
            }
            TaskState::Memory { nbytes, who_has } => {
                for w in who_has {
                    let worker = self.workers.get_mut(w).expect("memory on a known worker");
                    worker.has_what.insert(t);
                    worker.nbytes += nbytes;
                }
            }
            _ => {}
        }
        self.task_mut(t).state = new;
        // Tell the clients, then wake or fail the dependents.
        match &self.task(t).state {
            TaskState::Memory { .. } => {
                self.report_to_wanters(t, out);
                let dependents = self.task(t).dependents.clone();
                for d in dependents {
                    if let TaskState::Waiting { remaining } = &mut self.task_mut(d).state {
                        *remaining -= 1;
                        if *remaining == 0 {
                            self.schedule(d, out);
                        }
                    }
                }
                if self.task(t).who_wants.is_empty() && self.task(t).active_dependents == 0 {
                    self.to_check.push(t);
                }
            }
            TaskState::Erred { error } if !self.erred_propagating => {
                let error = error.clone();
                self.report_to_wanters(t, out);
                // Dependents fail with the same cause; iterative, as chains can be long.
                let mut stack: Vec<TaskId> = self.task(t).dependents.to_vec();
                while let Some(d) = stack.pop() {
                    if self.task(d).state.is_active() {
                        self.erred_propagating = true;
                        self.set_state(d, TaskState::Erred { error: error.clone() }, out);
                        self.erred_propagating = false;
                        self.report_to_wanters(d, out);
                        stack.extend(self.task(d).dependents.iter().copied());
                    }
                }
            }
            _ => {}
        }
    }

    fn add_replica(&mut self, t: TaskId, w: WorkerId) {
        // The task's recorded size, whatever the new holder measured: `set_state` subtracts
        // this one when the value is released.
        let TaskState::Memory { who_has, nbytes } = &mut self.task_mut(t).state else {
            return;
        };
        let nbytes = *nbytes;
        if !who_has.contains(&w) {
            who_has.push(w);
            let worker = self.workers.get_mut(&w).expect("known worker");
            worker.has_what.insert(t);
            worker.nbytes += nbytes;
        }
    }

    fn report_of(&self, t: TaskId) -> Option<Report> {
        match &self.task(t).state {
            TaskState::Memory { nbytes, who_has } => Some(Report::Memory {
                value: match &self.inline {
                    Some((k, v)) if *k == self.task(t).key => Some(v.clone()),
                    _ => None,
                },
                nbytes: *nbytes,
                workers: who_has.iter().map(|w| self.workers[w].spec.address.clone()).collect(),
            }),
            TaskState::Erred { error } if error.kind == "lost" => Some(Report::Lost(error.message.clone())),
            TaskState::Erred { error } => Some(Report::Erred(error.clone())),
            _ => None,
        }
    }

    fn report_to_wanters(&mut self, t: TaskId, out: &mut Vec<Command>) {
        let task = self.task(t);
        if task.who_wants.is_empty() {
            return;
        }
        let mut forget = false;
        if let Some(report) = self.report_of(t) {
            for &client in &task.who_wants {
                if client == FIRE_AND_FORGET {
                    forget = true;
                } else {
                    out.push(Command::Report { client, key: task.key.clone(), report: report.clone() });
                }
            }
        }
        if forget {
            self.client_release(FIRE_AND_FORGET, t);
        }
    }

    /// Releases and forgets what is no longer needed, after an event's main work.
    fn settle(&mut self, out: &mut Vec<Command>) {
        while let Some(t) = self.to_check.pop() {
            let Some(task) = self.tasks.slot(t.0).as_ref() else {
                continue;
            };
            if !task.who_wants.is_empty() || task.active_dependents > 0 {
                continue;
            }
            match task.state {
                TaskState::Memory { .. } => self.set_state(t, TaskState::Released, out),
                ref s if s.is_active() => self.set_state(t, TaskState::Released, out),
                _ => {}
            }
            if self.task(t).dependents.is_empty() {
                self.forget(t);
            }
        }
    }

    fn forget(&mut self, t: TaskId) {
        let task = self.tasks.slot_mut(t.0).take().expect("forget a live task");
        debug_assert!(!task.state.is_active() && !matches!(task.state, TaskState::Memory { .. }));
        if self.config.log_len > 0 {
            self.push_log(log_key(&task.key), task.state.name(), "forgotten");
        }
        self.keys.remove(&task.key);
        self.free_ids.push(t.0);
        self.positions.remove(&t);
        for &d in task.dependencies.iter() {
            if self.remove_dependent(d, t) {
                self.to_check.push(d);
            }
        }
    }

    /// Adds `t` to `dep`'s dependents (indexed once the list is long).
    fn add_dependent(&mut self, dep: TaskId, t: TaskId) {
        let list = &mut self.tasks.slot_mut(dep.0).as_mut().expect("live task").dependents;
        list.push(t);
        // A list that shrank to 33..=64 keeps its index (see `remove_dependent`): it must learn
        // of every new dependent too, not only of those past the threshold.
        if let Some(index) = self.positions.get_mut(&dep) {
            index.insert(t, (list.len() - 1) as u32);
        } else if list.len() > INDEX_OVER {
            self.positions.insert(dep, list.iter().enumerate().map(|(i, d)| (*d, i as u32)).collect());
        }
    }

    /// Takes `t` out of `dep`'s dependents; returns whether none are left.
    fn remove_dependent(&mut self, dep: TaskId, t: TaskId) -> bool {
        let list = &mut self.tasks.slot_mut(dep.0).as_mut().expect("live task").dependents;
        let index = self.positions.get_mut(&dep);
        let pos = match &index {
            Some(index) => index.get(&t).map(|p| *p as usize),
            None => list.iter().position(|x| *x == t),
        };
        debug_assert!(pos.is_some(), "removing a dependent that is not in the list");
        if let Some(pos) = pos {
            list.swap_remove(pos);
            if let Some(index) = index {
                index.remove(&t);
                if let Some(moved) = list.get(pos) {
                    index.insert(*moved, pos as u32);
                }
            }
        }
        // Dropped well below the threshold only, so a list hovering at it is not re-indexed
        // on every change.
        if list.len() <= INDEX_OVER / 2 {
            self.positions.remove(&dep);
        }
        list.is_empty()
    }

    fn log_transition(&mut self, t: TaskId, from: &'static str, to: &'static str) {
        if self.config.log_len == 0 {
            return;
        }
        self.push_log(log_key(&self.task(t).key), from, to);
    }

    /// Callers check that the log is on first, so that no key is hashed for nothing.
    fn push_log(&mut self, key: u64, from: &'static str, to: &'static str) {
        let (from, to, cause) = (self.intern(from), self.intern(to), self.intern(self.cause));
        let at_ns = self.now.saturating_duration_since(self.started).as_nanos() as u64;
        self.log.push_back(LogEntry { key, from, to, cause, at_ns });
        self.trim_log();
    }

    /// A byte for one of the few names the log uses.
    fn intern(&mut self, name: &'static str) -> u8 {
        // By address first: names are literals, and comparing text for each would cost more
        // than the rest of logging a transition.
        let found = self.log_names.iter().position(|n| std::ptr::eq(*n, name));
        match found.or_else(|| self.log_names.iter().position(|n| *n == name)) {
            Some(i) => i as u8,
            None => {
                self.log_names.push(name);
                (self.log_names.len() - 1) as u8
            }
        }
    }

    fn trim_log(&mut self) {
        while self.log.len() > self.config.log_len {
            self.log.pop_front();
        }
    }

    // ------------------------------------------------------------------ storage

    fn insert(&mut self, task: Task) -> TaskId {
        let key = task.key.clone();
        let id = match self.free_ids.pop() {
            Some(i) => {
                *self.tasks.slot_mut(i) = Some(task);
                TaskId(i)
            }
            None => TaskId(self.tasks.push(task)),
        };
        self.keys.insert(key, id);
        id
    }

    fn task(&self, t: TaskId) -> &Task {
        self.tasks.slot(t.0).as_ref().expect("live task")
    }

    fn task_mut(&mut self, t: TaskId) -> &mut Task {
        self.tasks.slot_mut(t.0).as_mut().expect("live task")
    }

    fn queue_key(&self, t: TaskId) -> queue::QueueKey {
        let task = self.task(t);
        queue::QueueKey::new(task.priority, task.order, t)
    }

    // ------------------------------------------------------------------ validation

    /// Checks every invariant; panics with a description of the first one broken.
    pub fn validate(&self) {
        let mut n = 0;
        for (i, slot) in self.tasks.iter().enumerate() {
            let Some(task) = slot else { continue };
            n += 1;
            let t = TaskId(i as u32);
            let key = &task.key;
            assert_eq!(self.keys.get(key), Some(&t), "{key}: key index");
            // Counters.
            let active = task.dependents.iter().filter(|d| self.task(**d).state.is_active()).count() as u32;
            assert_eq!(task.active_dependents, active, "{key}: active_dependents");
            for d in task.dependencies.iter() {
                assert!(self.task(*d).dependents.contains(&t), "{key}: dependency link");
            }
            for d in &task.dependents {
                assert!(self.task(*d).dependencies.contains(&t), "{key}: dependent link");
            }
            match self.positions.get(&t) {
                Some(index) => {
                    assert!(task.dependents.len() > INDEX_OVER / 2, "{key}: an index for a short list");
                    assert_eq!(index.len(), task.dependents.len(), "{key}: index size");
                    for (d, p) in index {
                        assert_eq!(task.dependents.get(*p as usize), Some(d), "{key}: index position");
                    }
                }
                None => assert!(task.dependents.len() <= INDEX_OVER, "{key}: a long list without an index"),
            }
            for c in &task.who_wants {
                assert!(self.clients.get(c).is_some_and(|cl| cl.wants.contains(&t)), "{key}: who_wants vs client");
            }
            let wanted = !task.who_wants.is_empty();
            assert!(
                wanted || !task.dependents.is_empty(),
                "{key}: unwanted, no dependents, still here ({})",
                task.state.name()
            );
            let deps_in_memory =
                task.dependencies.iter().filter(|d| matches!(self.task(**d).state, TaskState::Memory { .. })).count()
                    as u32;
            if task.state.is_active() {
                assert!(wanted || task.active_dependents > 0, "{key}: {} but nobody needs it", task.state.name());
                for d in task.dependencies.iter() {
                    let s = &self.task(*d).state;
                    assert!(
                        matches!(s, TaskState::Memory { .. }) || s.is_active(),
                        "{key}: active with dependency in {}",
                        s.name()
                    );
                }
            }
            match &task.state {
                TaskState::Released => {
                    assert!(!wanted, "{key}: wanted but released");
                }
                TaskState::Waiting { remaining } => {
                    assert!(*remaining > 0, "{key}: waiting on nothing");
                    assert_eq!(*remaining, task.dependencies.len() as u32 - deps_in_memory, "{key}: remaining");
                }
                TaskState::Queued => {
                    assert_eq!(deps_in_memory as usize, task.dependencies.len(), "{key}: queued with deps missing");
                    assert!(self.queue.contains(self.queue_key(t)), "{key}: queued but not in queue");
                }
                TaskState::NoWorker => {
                    assert_eq!(deps_in_memory as usize, task.dependencies.len(), "{key}: no-worker with deps missing");
                    assert!(self.no_worker.contains(&t), "{key}: no-worker set");
                }
                TaskState::Processing { worker } => {
                    assert_eq!(deps_in_memory as usize, task.dependencies.len(), "{key}: processing with deps missing");
                    let w = self.workers.get(worker).unwrap_or_else(|| panic!("{key}: processing on unknown {worker}"));
                    assert!(w.processing.contains(&t), "{key}: not in worker's processing");
                }
                TaskState::Memory { who_has, .. } => {
                    assert!(!who_has.is_empty(), "{key}: memory without replicas");
                    assert!(wanted || task.active_dependents > 0, "{key}: memory but not needed");
                    for w in who_has {
                        let worker = self.workers.get(w).unwrap_or_else(|| panic!("{key}: held by unknown {w}"));
                        assert!(worker.has_what.contains(&t), "{key}: has_what");
                    }
                }
                TaskState::Erred { .. } => {}
            }
            if !matches!(task.state, TaskState::Queued) {
                assert!(!self.queue.contains(self.queue_key(t)), "{key}: in queue while {}", task.state.name());
            }
        }
        assert_eq!(n, self.keys.len(), "key index size");
        assert_eq!(
            self.queue.len(),
            self.tasks.iter().flatten().filter(|t| matches!(t.state, TaskState::Queued)).count(),
            "queue size"
        );
        let expected: BTreeSet<(u64, WorkerId)> =
            self.workers.iter().filter(|(_, w)| w.open()).map(|(id, w)| (occupancy(w), *id)).collect();
        assert_eq!(self.by_occupancy, expected, "workers by occupancy");
        for (id, w) in &self.workers {
            for t in &w.processing {
                assert_eq!(self.task(*t).state, TaskState::Processing { worker: *id }, "{id}: processing set");
            }
            let mut bytes = 0;
            for t in &w.has_what {
                match &self.task(*t).state {
                    TaskState::Memory { who_has, nbytes } => {
                        assert!(who_has.contains(id), "{id}: has_what");
                        bytes += nbytes;
                    }
                    s => panic!("{id}: has_what lists a task in {}", s.name()),
                }
            }
            assert_eq!(bytes, w.nbytes, "{id}: nbytes");
        }
        for (c, client) in &self.clients {
            for t in &client.wants {
                assert!(self.task(*t).who_wants.contains(c), "{c}: wants");
            }
        }
        for t in &self.no_worker {
            assert_eq!(self.task(*t).state, TaskState::NoWorker);
        }
        assert!(self.to_check.is_empty());
        self.validate_retirement();
    }
}

enum Placement {
    Worker(WorkerId),
    Queue,
    NoWorker,
}

fn occupancy(w: &Worker) -> u64 {
    // Tasks per thread, scaled so integer comparison keeps fractions.
    (w.processing.len() as u64 * 1024) / w.spec.nthreads.max(1) as u64
}

/// Which state changes make sense. Anything else is a bug.
fn allowed(old: &TaskState, new: &TaskState) -> bool {
    use TaskState::*;
    match (old, new) {
        (Released, Waiting { .. } | Queued | NoWorker | Processing { .. } | Erred { .. } | Memory { .. }) => true,
        (Waiting { .. }, Queued | NoWorker | Processing { .. } | Released | Erred { .. } | Memory { .. }) => true,
        (Queued, Processing { .. } | NoWorker | Waiting { .. } | Released | Erred { .. } | Memory { .. }) => true,
        (NoWorker, Processing { .. } | Queued | Waiting { .. } | Released | Erred { .. } | Memory { .. }) => true,
        (Processing { .. }, Memory { .. } | Released | Waiting { .. } | Erred { .. } | Queued | NoWorker) => true,
        (Processing { worker: a }, Processing { worker: b }) => a != b,
        (Memory { .. }, Released | Erred { .. }) => true,
        (Erred { .. }, Released | Memory { .. }) => true,
        _ => false,
    }
}

/// dask's `key_split`: `inc-1c8d...` -> `inc`, `x-1-2` -> `x`.
pub fn key_prefix(key: &str) -> &str {
    let key = key.trim_start_matches(['(', '\'', '"']);
    let end = key.find(['-', ',', '\'', '"', ')']).unwrap_or(key.len());
    if end == 0 { key } else { &key[..end] }
}
