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

mod adaptive;
mod copies;
mod events;
mod graph;
mod placement;
mod queue;
mod retire;
mod slab;
mod state;
mod steal;
mod story;
#[cfg(test)]
mod tests;
mod validate;
mod worker_table;
mod workers;

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;
use thin_vec::ThinVec;

pub use adaptive::AdaptiveTarget;
pub use events::{Command, DepLocation, Event, Feed, InlineValue, NewTask, NoticeLevel, Report, TaskError, WorkerSpec};
pub use placement::key_prefix;
pub use queue::ReadyQueue;
pub use steal::StealStats;
use story::LogEntry;
pub use story::Transition;

/// A worker, numbered by the shell in the order workers join. Never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

/// A connected client, numbered by the shell. Never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u32);

/// The holder of `fire_and_forget` keys: wants a key until it is done, then lets it go.
pub const FIRE_AND_FORGET: ClientId = ClientId(u32::MAX);

/// The holder of keys put in coordination state (queues, variables, datasets: see
/// `crate::coord`): wants a key while something there holds it.
pub const HOLDER: ClientId = ClientId(u32::MAX - 1);

impl ClientId {
    /// One of the scheduler's own holders, not a connected client: nothing is reported to it.
    pub fn is_holder(self) -> bool {
        self == FIRE_AND_FORGET || self == HOLDER
    }
}

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
    /// Move tasks not started from busy workers to idle ones (dask:
    /// `scheduler.work-stealing`, on).
    pub work_stealing: bool,
    /// Assumed network bandwidth, bytes per second, to weigh moving inputs (dask:
    /// `scheduler.bandwidth`, 100 MB/s).
    pub bandwidth: u64,
    /// Fixed cost of moving a task (the handshake, a fetch's round trip), added to its
    /// inputs' transfer time.
    pub steal_latency: Duration,
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
            work_stealing: true,
            bandwidth: 100_000_000,
            steal_latency: Duration::from_millis(1),
        }
    }
}

/// The names of [`TaskState`]s, in the order [`SchedulerCore::prefix_states`] counts them.
pub const TASK_STATES: [&str; 7] = ["released", "waiting", "queued", "no-worker", "processing", "memory", "erred"];

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
    /// Its place in [`TASK_STATES`].
    pub fn index(&self) -> usize {
        match self {
            TaskState::Released => 0,
            TaskState::Waiting { .. } => 1,
            TaskState::Queued => 2,
            TaskState::NoWorker => 3,
            TaskState::Processing { .. } => 4,
            TaskState::Memory { .. } => 5,
            TaskState::Erred { .. } => 6,
        }
    }

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

/// Where a task may run: named workers (none: any), and resources it needs free there.
struct Restrictions {
    workers: Box<[Arc<str>]>,
    /// The names are a preference (`allow_other_workers`), not a rule.
    loose: bool,
    resources: Needs,
}

impl Restrictions {
    /// Only the named workers may run it.
    fn hard(&self) -> bool {
        !self.workers.is_empty() && !self.loose
    }

    fn names(&self, w: &Worker) -> bool {
        self.workers.iter().any(|x| *x == w.spec.address || *x == w.spec.name)
    }
}

struct Worker {
    spec: WorkerSpec,
    processing: FxHashSet<TaskId>,
    /// Processing tasks that seceded (dask's long-running): they run on without a thread slot,
    /// so they count neither in its slots nor in its occupancy.
    long_running: FxHashSet<TaskId>,
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
    /// Steals asked of it, and for it, not yet answered.
    steals_out: u32,
    steals_in: u32,
    /// Natural log of how fast it runs tasks against their kinds' averages (0: average).
    log_speed: f64,
    /// How much of each of `spec.resources` its processing tasks hold.
    used: Box<[f64]>,
}

impl Worker {
    /// Takes new work.
    fn open(&self) -> bool {
        !self.closing && !self.paused && self.retiring.is_none()
    }

    /// How much of resource `name` it has (0 if none), and how much its tasks hold now.
    fn resource(&self, name: &str) -> (f64, f64) {
        match self.spec.resources.iter().position(|(n, _)| **n == *name) {
            Some(i) => (self.spec.resources[i].1, self.used[i]),
            None => (0.0, 0.0),
        }
    }

    /// Whether `needs` are free on it now.
    fn has_free(&self, needs: &[(Arc<str>, f64)]) -> bool {
        needs.iter().all(|(n, amount)| {
            let (total, used) = self.resource(n);
            total - used >= *amount - RESOURCE_EPSILON
        })
    }

    /// Whether it has `needs` at all (free or not).
    fn has_total(&self, needs: &[(Arc<str>, f64)]) -> bool {
        needs.iter().all(|(n, amount)| self.resource(n).0 >= *amount - RESOURCE_EPSILON)
    }

    /// Takes (`sign` 1) or gives back (-1) what a task holds.
    /// Tasks taking its thread slots: processing, less those that seceded.
    fn busy(&self) -> usize {
        self.processing.len() - self.long_running.len()
    }

    fn hold(&mut self, needs: &[(Arc<str>, f64)], sign: f64) {
        for (n, amount) in needs {
            if let Some(i) = self.spec.resources.iter().position(|(x, _)| **x == **n) {
                self.used[i] += sign * amount;
                if self.used[i].abs() < RESOURCE_EPSILON {
                    self.used[i] = 0.0;
                }
            }
        }
    }
}

/// Resources a task holds while it runs: names and amounts.
type Needs = Box<[(Arc<str>, f64)]>;

/// Resource amounts are floats (`MEM=10e9`, `GPU=0.5`): sums are compared with this slack.
const RESOURCE_EPSILON: f64 = 1e-9;

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
    /// Its current generation (see `fifo_timeout`), when it began, and the next position in it.
    generation: u64,
    generation_began: Option<Instant>,
    next_position: u64,
}

/// Measured durations of one kind of task (keys share a prefix: `inc-<token>` -> `inc`).
struct Prefix {
    /// Exponential moving average in nanoseconds; `None` until one finished.
    avg_ns: Option<f64>,
    /// Its tasks in each state now ([`TASK_STATES`] order).
    now: [u64; TASK_STATES.len()],
    /// How many times its tasks entered each state, since the start (dask's
    /// `TaskPrefix.state_counts`).
    entered: [u64; TASK_STATES.len()],
}

/// One task prefix's tasks by state now, and its transitions into each state since the start
/// (both in [`TASK_STATES`] order).
#[derive(Clone, Debug)]
pub struct PrefixCounts {
    pub name: Arc<str>,
    pub now: [u64; TASK_STATES.len()],
    pub entered: [u64; TASK_STATES.len()],
}

/// A task with more dependents than this keeps an index of where each sits in its list:
/// forgetting the 100k dependents of one task searched the list for each (3 s, quadratic).
const INDEX_OVER: usize = 64;

/// The scheduler's whole state.
pub struct SchedulerCore {
    config: Config,
    tasks: slab::Slab<Task>,
    free_ids: Vec<u32>,
    keys: FxHashMap<Key, TaskId>,
    workers: worker_table::WorkerTable,
    /// Workers by address and by name (each unique among connected workers).
    by_address: FxHashMap<Arc<str>, WorkerId>,
    by_name: FxHashMap<Arc<str>, WorkerId>,
    /// Workers by resource they have (an amount over zero): where a task needing it may go.
    by_resource: FxHashMap<Arc<str>, BTreeSet<WorkerId>>,
    clients: FxHashMap<ClientId, Client>,
    queue: ReadyQueue,
    no_worker: FxHashSet<TaskId>,
    /// The NoWorker tasks that need resources, by priority: a worker whose resources free up
    /// takes those that fit.
    res_waiting: BTreeSet<queue::QueueKey>,
    /// Resource needs already announced in the log as beyond every worker.
    unrunnable_said: FxHashSet<String>,
    /// Open (not closing) workers by occupancy, least busy first: placement of a task without
    /// inputs is O(log workers), not a scan.
    by_occupancy: BTreeSet<(u64, WorkerId)>,
    prefixes: Vec<Prefix>,
    prefix_ids: FxHashMap<Arc<str>, u32>,
    next_order: u64,
    /// Generations given to clients' graphs (the high half of a task's `order`).
    next_generation: u64,
    log: VecDeque<LogEntry>,
    /// Names used in the log (states, events), interned to a byte.
    log_names: Vec<&'static str>,
    started: Instant,
    /// Buffers lent to each event's [`Cx`] (kept to reuse their allocations).
    spare: (Vec<TaskId>, Vec<WorkerId>),
    /// For tasks with more than [`INDEX_OVER`] dependents: each dependent's position in the
    /// task's `dependents`.
    positions: FxHashMap<TaskId, FxHashMap<TaskId, u32>>,
    /// Values being copied off retiring workers, and the worker taking each copy.
    replicating: FxHashMap<TaskId, WorkerId>,
    /// Failed copies of a value in a row (retirement gives up after a few).
    copy_failures: FxHashMap<TaskId, u32>,
    retire_ops: FxHashMap<u64, retire::RetireOp>,
    /// Replicate and rebalance operations waiting for their copies, and the copies awaited of
    /// each value: (target, operation).
    copy_ops: FxHashMap<u64, copies::CopyOp>,
    copy_waiters: FxHashMap<TaskId, SmallVec<[(WorkerId, u64); 2]>>,
    /// Steals asked and not yet answered, by task.
    steals: FxHashMap<TaskId, steal::Steal>,
    next_steal: u64,
    stats: StealStats,
    /// Emit [`Command::Feed`] (a scheduler plugin listens).
    feed: bool,
}

/// What the handling of one event carries along: its cause and time, the commands it emits,
/// and the follow-ups it leaves for its end.
pub(crate) struct Cx<'a> {
    now: Instant,
    /// The event's name, the cause of transitions in the story log.
    cause: &'static str,
    out: &'a mut Vec<Command>,
    /// The value of the task finishing in this event, if its worker sent it along: forwarded
    /// to the clients that want it, never kept.
    inline: Option<(Key, InlineValue)>,
    /// Tasks to re-check for release/forget at the event's end.
    to_check: Vec<TaskId>,
    /// Workers a task stopped processing on: at the event's end they take queued tasks into
    /// the freed slots (a released or moved task frees one too).
    freed: Vec<WorkerId>,
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
            workers: worker_table::WorkerTable::default(),
            by_address: FxHashMap::default(),
            by_name: FxHashMap::default(),
            by_resource: FxHashMap::default(),
            clients: FxHashMap::default(),
            queue: ReadyQueue::default(),
            no_worker: FxHashSet::default(),
            res_waiting: BTreeSet::new(),
            unrunnable_said: FxHashSet::default(),
            by_occupancy: BTreeSet::new(),
            prefixes: Vec::new(),
            prefix_ids: FxHashMap::default(),
            next_order: 0,
            next_generation: 0,
            log: VecDeque::new(),
            log_names: Vec::new(),
            started: now,
            spare: (Vec::new(), Vec::new()),
            positions: FxHashMap::default(),
            replicating: FxHashMap::default(),
            copy_failures: FxHashMap::default(),
            retire_ops: FxHashMap::default(),
            steals: FxHashMap::default(),
            copy_ops: FxHashMap::default(),
            copy_waiters: FxHashMap::default(),
            next_steal: 0,
            stats: StealStats::default(),
            feed: false,
        }
    }

    pub fn n_tasks(&self) -> usize {
        self.keys.len()
    }

    /// Tasks by key prefix and state (in [`TASK_STATES`] order), now and since the start, for
    /// metrics and the dashboard's progress: O(prefixes), from counters kept as states change.
    pub fn prefix_states(&self) -> Vec<PrefixCounts> {
        let mut out: Vec<PrefixCounts> = self
            .prefix_ids
            .iter()
            .map(|(name, id)| {
                let p = &self.prefixes[*id as usize];
                PrefixCounts { name: name.clone(), now: p.now, entered: p.entered }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// No task is on its way to memory: none queued, without a worker or processing (dask's
    /// idle check). A waiting task waits on one of those, so none is waiting either.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.no_worker.is_empty() && self.workers.iter().all(|(_, w)| w.processing.is_empty())
    }

    /// The spec, dependencies and state of `key`, if the scheduler has it.
    pub fn task_spec(&self, key: &str) -> Option<(&[u8], Vec<Key>, &'static str)> {
        let task = self.task(*self.keys.get(key)?);
        let deps = task.dependencies.iter().map(|d| self.task(*d).key.clone()).collect();
        Some((&task.spec, deps, task.state.name()))
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

    /// Each worker with how many values it holds (not which: no key is cloned), its tasks
    /// processing and its bytes in memory.
    pub fn worker_counts(&self) -> impl Iterator<Item = (WorkerId, &WorkerSpec, usize, usize, u64)> + '_ {
        self.workers.iter().map(|(id, w)| (*id, &w.spec, w.has_what.len(), w.processing.len(), w.nbytes))
    }

    /// The keys each worker is running (or about to), by address (dask's `processing`).
    pub fn processing(&self) -> Vec<(Arc<str>, Vec<Key>)> {
        self.workers
            .iter()
            .map(|(_, w)| (w.spec.address.clone(), w.processing.iter().map(|t| self.task(*t).key.clone()).collect()))
            .collect()
    }

    /// Bytes of every value in memory, by key (dask's `nbytes`).
    pub fn nbytes(&self) -> Vec<(Key, u64)> {
        self.keys
            .values()
            .filter_map(|t| match &self.task(*t).state {
                TaskState::Memory { nbytes, .. } => Some((self.task(*t).key.clone(), *nbytes)),
                _ => None,
            })
            .collect()
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

    /// How much of each of its resources the tasks running on a worker hold.
    pub fn worker_resources_used(&self, id: WorkerId) -> Vec<(Arc<str>, f64)> {
        self.workers.get(&id).map_or_else(Vec::new, |w| {
            w.spec.resources.iter().zip(w.used.iter()).map(|((n, _), u)| (n.clone(), *u)).collect()
        })
    }

    /// Tasks that wait with nowhere to run (no worker with their resources or names), at most
    /// `limit`, each as `key: why`.
    /// (Tasks waiting only for busy resources are not listed: they run when those free up.)
    /// Returns them and how many there are in all.
    pub fn unrunnable(&self, limit: usize) -> (Vec<String>, usize) {
        let mut keys: Vec<TaskId> = self.no_worker.iter().copied().filter(|t| !self.could_run_somewhere(*t)).collect();
        let n = keys.len();
        keys.sort_by_key(|t| self.queue_key(*t));
        let listed = keys
            .into_iter()
            .take(limit)
            .map(|t| {
                let task = self.task(t);
                match &task.restrictions {
                    Some(r) if !r.resources.is_empty() => format!("{}: needs {}", task.key, self.needs_text(t)),
                    Some(r) if r.hard() => format!("{}: may run only on {:?}", task.key, r.workers),
                    _ => format!("{}: no worker is running", task.key),
                }
            })
            .collect();
        (listed, n)
    }

    /// Tasks waiting with nowhere to run.
    pub fn n_no_worker(&self) -> usize {
        self.no_worker.len()
    }

    /// What work stealing did so far.
    pub fn steal_stats(&self) -> StealStats {
        self.stats
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

    /// Applies one event. Commands are appended to `out`.
    pub fn handle(&mut self, event: Event, now: Instant, out: &mut Vec<Command>) {
        let (to_check, freed) = std::mem::take(&mut self.spare);
        let mut cx = Cx { now, cause: event.name(), out, inline: None, to_check, freed };
        self.dispatch(event, &mut cx);
        self.settle(&mut cx);
        while let Some(w) = cx.freed.pop() {
            self.fill(w, &mut cx);
        }
        debug_assert!(cx.to_check.is_empty());
        self.spare = (cx.to_check, cx.freed);
    }

    fn dispatch(&mut self, event: Event, cx: &mut Cx<'_>) {
        let now = cx.now;
        match event {
            Event::ClientConnected { client } => {
                self.clients.entry(client).or_default();
                if self.feed && !client.is_holder() {
                    cx.out.push(Command::Feed(Feed::AddClient { client }));
                }
            }
            Event::ClientDisconnected { client } => {
                if let Some(c) = self.clients.remove(&client) {
                    for t in c.wants {
                        self.unwant(t, client, cx);
                    }
                }
                if self.feed && !client.is_holder() {
                    cx.out.push(Command::Feed(Feed::RemoveClient { client }));
                }
            }
            Event::UpdateGraph { client, tasks, wants, fifo_timeout } => {
                if self.feed {
                    let keys = tasks.iter().map(|t| t.key.clone()).collect();
                    cx.out.push(Command::Feed(Feed::UpdateGraph { client, keys }));
                }
                self.update_graph(client, tasks, wants, fifo_timeout, cx)
            }
            Event::Want { client, keys } => {
                for key in keys {
                    if let Some(&t) = self.keys.get(&key) {
                        self.want(t, client, cx);
                    } else if !client.is_holder() {
                        cx.out.push(Command::Report {
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
                        self.client_release(client, t, cx);
                    }
                }
            }
            Event::CancelKeys { client, keys, force, reason } => self.cancel(client, keys, force, reason, cx),
            Event::Scattered { client, keys } => self.scattered(client, keys, cx),
            Event::WorkerJoined { worker, spec } => self.worker_joined(worker, spec, cx),
            Event::WorkerLost { worker, reason, expected } => self.remove_worker(worker, &reason, expected, cx),
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
            Event::Restart { reason } => self.restart(&reason, cx),
            Event::RetireWorkers { op, workers, close, restart, reason } => {
                self.retire(op, workers, close, restart, &reason, cx)
            }
            Event::ReplicasAdded { worker, keys } => self.replicas_added(worker, keys, cx),
            Event::ReplicasFailed { worker, keys } => self.replicas_failed(worker, keys, cx),
            Event::RetireProgress => self.progress_retirement(cx),
            Event::TaskFinished { worker, key, nbytes, duration, value } => {
                cx.inline = value.map(|v| (key.clone(), v));
                self.task_finished(worker, key, nbytes, duration, cx);
                cx.inline = None;
            }
            Event::TaskFailed { worker, key, error, duration } => self.task_failed(worker, key, error, duration, cx),
            Event::MissingData { worker, key, dependency, from } => {
                self.missing_data(worker, key, dependency, from, cx)
            }
            Event::Heartbeat { worker, memory } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.last_seen = now;
                    if let Some(m) = memory {
                        w.memory = m;
                        if m.paused != w.paused {
                            self.set_paused(worker, m.paused, cx);
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
                    cx.out.push(Command::CloseWorker { worker: w, reason: reason.clone(), restart: true });
                    self.remove_worker(w, &reason, false, cx);
                }
                self.balance_all(cx);
            }
            Event::StealResponse { worker, key, id, stolen } => self.steal_response(worker, key, id, stolen, cx),
            Event::TasksSeceded { worker, keys } => self.seceded(worker, keys, cx),
            Event::Retry { keys, .. } => self.retry(keys, cx),
            Event::Replicate { op, keys, n, workers } => self.replicate(op, keys, n, workers, cx),
            Event::Rebalance { op, keys, workers } => self.rebalance(op, keys, workers, cx),
        }
    }

    /// Whether any worker is retiring: the shell then sends [`Event::RetireProgress`] after each
    /// batch of events.
    pub fn is_retiring(&self) -> bool {
        !self.retire_ops.is_empty() || self.workers.values().any(|w| w.retiring.as_ref().is_some_and(|r| !r.is_done()))
    }
}

/// [`occupancy`] of a worker running one task per thread.
const OCCUPANCY_PER_THREAD: u64 = 1024;

/// Tasks per thread, scaled so that integer comparison keeps fractions.
fn occupancy(w: &Worker) -> u64 {
    (w.busy() as u64 * OCCUPANCY_PER_THREAD) / w.spec.nthreads.max(1) as u64
}
