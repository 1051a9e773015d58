//! The worker's state machine: plain synchronous Rust, no IO, no clock.
//!
//! One entry point, [`WorkerState::handle`]: an [`Event`] in, [`Instruction`]s out. The shell
//! (`crate::server`) runs `Execute` on the thread pool, `Fetch` as a data-service request to a
//! peer, `Send` on the scheduler stream, and `Drop` on the store; each finishes by feeding an
//! event back in. See `docs/worker.md`.
//!
//! ```text
//! compute tasks:  Waiting{missing} --deps fetched--> Ready --room in the executor--> Dispatched --> (done: reported, removed)
//!                                                                                   \-- freed --> Cancelled --> (dropped)
//! dependency data: Fetch{who_has} --> Flight{from} --> Memory (local copy, dropped when no local task needs it)
//! own results:     Memory (kept until the scheduler frees the key)
//! ```
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dask_protocol::pb;
use rustc_hash::{FxHashMap, FxHashSet};

pub type Key = Arc<str>;

/// A task the scheduler asked this worker to run.
#[derive(Clone, Debug)]
pub struct ComputeRequest {
    pub key: Key,
    pub spec: Bytes,
    /// Each dependency and the peers that hold it.
    pub deps: Vec<(Key, Vec<Arc<str>>)>,
    pub priority: i32,
    /// A client wants the result: send small values back with the completion.
    pub inline: bool,
    /// Report the start before running it (a worker died while it was assigned there).
    pub announce: bool,
    /// Resources it holds while it runs: it starts only when they are free here.
    pub resources: Vec<(Key, f64)>,
}

/// Largest value sent back with its completion (through the scheduler) rather than fetched.
pub const INLINE_MAX: u64 = 4096;

/// Outcome of one execution.
#[derive(Clone, Debug)]
pub enum ExecOutcome {
    Ok {
        nbytes: u64,
        type_name: String,
    },
    Err(pb::TaskError),
    /// Cancelled before it started.
    Skipped,
}

#[derive(Clone, Debug)]
pub enum Event {
    Compute(ComputeRequest),
    /// The scheduler no longer needs this key here: drop its value or cancel its computation.
    Free(Key),
    ExecDone {
        key: Key,
        outcome: ExecOutcome,
        duration: Duration,
    },
    /// A fetch from `from` ended: `got` are now in the store, `missing` were not there (or the
    /// peer could not be reached).
    FetchDone {
        from: Arc<str>,
        got: Vec<(Key, u64)>,
        missing: Vec<Key>,
        /// When the fetch began and ended (seconds since the Unix epoch): the transfer parts
        /// of the task stream.
        span: (f64, f64),
    },
    /// A client put these values into the store (scatter).
    Put {
        keys: Vec<(Key, u64)>,
    },
    /// These dispatched tasks started running.
    Started(Vec<Key>),
    /// Memory is over the pause threshold (`true`) or back under it: while paused, nothing is
    /// fetched (the executor starts no task either).
    Paused(bool),
    /// Fetch these values from the peers named and keep them (copies off a retiring worker).
    Acquire(Vec<(Key, Vec<Arc<str>>)>),
    /// The scheduler wants `key` elsewhere (work stealing): give it up unless it started.
    Steal {
        key: Key,
        id: u64,
    },
    /// The executor's answer to [`Instruction::Unqueue`]: `removed` if the task had not
    /// started and is off its queue (it will not be reported).
    Unqueued {
        key: Key,
        id: u64,
        removed: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Instruction {
    /// Queue on the executor (highest priority first, then oldest).
    Execute {
        key: Key,
        spec: Bytes,
        priority: i32,
        order: u64,
        /// Wait until the start is reported before running it.
        announce: bool,
    },
    /// Skip this dispatched task if it has not started.
    Cancel(Key),
    /// Take this dispatched task off the executor's queue if no thread has started it, and
    /// answer with [`Event::Unqueued`] at once, before the next command is handled (always the
    /// last instruction of its event).
    Unqueue {
        key: Key,
        id: u64,
    },
    Fetch {
        from: Arc<str>,
        keys: Vec<Key>,
    },
    /// Remove the value from the store.
    Drop(Key),
    /// `key` went from `start` to `finish` (dask's worker states), for worker plugins; only
    /// while [`WorkerState::set_trace`] is on.
    Transition {
        key: Key,
        start: &'static str,
        finish: &'static str,
    },
    Send(pb::worker_event::Kind),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ComputeState {
    Waiting {
        missing: u32,
    },
    Ready,
    /// Handed to the executor: queued there (by priority) or running. Every dispatched task
    /// comes back as exactly one `ExecDone`.
    Dispatched,
    /// Freed after it was dispatched: the executor is told to skip it; its result is dropped.
    Cancelled,
}

struct ComputeTask {
    state: ComputeState,
    spec: Bytes,
    deps: Vec<Key>,
    priority: i32,
    order: u64,
    inline: bool,
    announce: bool,
    /// Held from dispatch until the executor gives it back (its run ended or was skipped).
    resources: Vec<(Key, f64)>,
    /// Inputs fetched from peers for it, reported with its end (the task stream).
    transfers: Vec<pb::Transfer>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum DataState {
    /// Not here yet; these peers should have it.
    Fetch {
        who_has: Vec<Arc<str>>,
    },
    /// Being fetched from `from`; `rest` are the holders to try next, `tried` those that
    /// failed.
    Flight {
        from: Arc<str>,
        rest: Vec<Arc<str>>,
        tried: Vec<Arc<str>>,
    },
    Memory {
        nbytes: u64,
    },
}

struct DataKey {
    state: DataState,
    /// Local compute tasks that need this value (a set: a shared input of a whole `map` has
    /// thousands, and each finishing task takes itself out).
    dependents: FxHashSet<Key>,
    /// Computed or put here: the scheduler knows this replica and decides when it goes.
    own: bool,
    /// The scheduler asked for a copy to keep (a retiring worker's value): kept and reported
    /// when it arrives.
    replica: bool,
}

/// The worker's whole state.
pub struct WorkerState {
    /// Tasks handed to the executor at once, at most: deep enough that threads never wait for
    /// the event loop, shallow enough that priorities and cancellation stay cheap.
    max_dispatched: usize,
    dispatched: usize,
    compute: FxHashMap<Key, ComputeTask>,
    data: FxHashMap<Key, DataKey>,
    ready: BinaryHeap<(i32, Reverse<u64>, Key)>,
    next_order: u64,
    paused: bool,
    /// Dependencies left in `Fetch` while paused, to fetch on resuming.
    deferred: Vec<Key>,
    /// This worker's resources not held by a dispatched task (dask's `available_resources`):
    /// the scheduler assigns by what it counts free, but a task it freed while it ran holds
    /// them here until it really ends.
    available: Vec<(Key, f64)>,
    /// All of them (for `validate`).
    total: Vec<(Key, f64)>,
    /// Report transitions ([`Instruction::Transition`]).
    trace: bool,
}

impl WorkerState {
    pub fn new(nthreads: usize) -> Self {
        WorkerState {
            max_dispatched: nthreads.max(1) * 64,
            dispatched: 0,
            compute: FxHashMap::default(),
            data: FxHashMap::default(),
            ready: BinaryHeap::new(),
            next_order: 0,
            paused: false,
            deferred: Vec::new(),
            available: Vec::new(),
            total: Vec::new(),
            trace: false,
        }
    }

    /// The worker's resources (`--resources`).
    pub fn with_resources(mut self, resources: &[(String, f64)]) -> Self {
        self.available = resources.iter().map(|(n, a)| (Arc::from(n.as_str()), *a)).collect();
        self.total = self.available.clone();
        self
    }

    fn fits(&self, needs: &[(Key, f64)]) -> bool {
        needs.iter().all(|(n, a)| self.available.iter().any(|(m, free)| m == n && *free >= *a - 1e-9))
    }

    /// Takes (`sign` -1) or gives back (1) what a dispatched task holds.
    fn hold(&mut self, needs: &[(Key, f64)], sign: f64) {
        for (n, a) in needs {
            if let Some((_, free)) = self.available.iter_mut().find(|(m, _)| m == n) {
                *free += sign * a;
            }
        }
    }

    /// Tasks queued on or running in the executor.
    pub fn executing(&self) -> usize {
        self.dispatched
    }

    /// Keys whose values are in memory here.
    pub fn in_memory(&self) -> usize {
        self.data.values().filter(|d| matches!(d.state, DataState::Memory { .. })).count()
    }

    /// Whether `key` is handed to the executor (and not cancelled).
    pub fn is_running(&self, key: &str) -> bool {
        self.compute.get(key).is_some_and(|t| t.state == ComputeState::Dispatched)
    }

    /// Report transitions from now on (`true`) or not.
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on;
    }

    pub fn n_compute(&self) -> usize {
        self.compute.len()
    }

    pub fn handle(&mut self, event: Event, out: &mut Vec<Instruction>) {
        match event {
            Event::Compute(req) => self.on_compute(req, out),
            Event::Free(key) => self.on_free(key, out),
            Event::ExecDone { key, outcome, duration } => self.on_exec_done(key, outcome, duration, out),
            Event::FetchDone { from, got, missing, span } => self.on_fetch_done(from, got, missing, span, out),
            Event::Started(keys) => {
                // Those that finished (or were cancelled) meanwhile need no report.
                let mut ack = false;
                let running: Vec<String> = keys
                    .into_iter()
                    .filter(|k| {
                        let t = self.compute.get(k);
                        ack |= t.is_some_and(|t| t.announce);
                        t.is_some_and(|t| t.state == ComputeState::Dispatched)
                    })
                    .map(|k| k.to_string())
                    .collect();
                if !running.is_empty() {
                    out.push(Instruction::Send(pb::worker_event::Kind::Started(pb::TasksStarted {
                        keys: running,
                        ack,
                    })));
                }
            }
            Event::Paused(paused) => {
                self.paused = paused;
                if !paused {
                    let mut to_fetch = Vec::new();
                    for dep in std::mem::take(&mut self.deferred) {
                        if let Some(d) = self.data.get_mut(&dep) {
                            start_flight(&dep, d, &mut to_fetch);
                        }
                    }
                    group_fetches(self.trace, to_fetch, out);
                }
            }
            Event::Acquire(keys) => self.on_acquire(keys, out),
            Event::Steal { key, id } => self.on_steal(key, id, out),
            Event::Unqueued { key, id, removed } => {
                let stolen = removed && self.compute.get(&key).is_some_and(|t| t.state == ComputeState::Dispatched);
                if removed && let Some(task) = self.compute.remove(&key) {
                    note(self.trace, &key, compute_state_name(&task.state), "released", out);
                    // Off the queue: no ExecDone will come for it.
                    self.dispatched -= 1;
                    self.hold(&task.resources, 1.0);
                    self.release_deps(&key, &task.deps, out);
                }
                answer_steal(key, id, stolen, out);
            }
            Event::Put { keys } => {
                for (key, nbytes) in keys {
                    let from = if self.data.contains_key(&key) { None } else { Some("released") };
                    let d = self.data.entry(key.clone()).or_insert_with(|| DataKey {
                        state: DataState::Fetch { who_has: Vec::new() },
                        dependents: FxHashSet::default(),
                        own: true,
                        replica: false,
                    });
                    d.own = true;
                    // Possibly a value we were fetching: its waiting tasks count it as arrived.
                    self.arrived(&key, nbytes, from, None, out);
                }
            }
        }
        self.start_ready(out);
    }

    fn on_compute(&mut self, req: ComputeRequest, out: &mut Vec<Instruction>) {
        if let Some(task) = self.compute.get_mut(&req.key) {
            // Freed and asked again before the executor gave it back: resume it, and report
            // its result after all (dask's "resumed").
            if task.state == ComputeState::Cancelled {
                task.state = ComputeState::Dispatched;
                note(self.trace, &req.key, "cancelled", "executing", out);
            }
            task.inline |= req.inline;
            task.announce |= req.announce;
            return; // already on it
        }
        if let Some(DataKey { state: DataState::Memory { nbytes }, .. }) = self.data.get(&req.key) {
            // We hold the value already (fetched or put): it is ours now.
            let nbytes = *nbytes;
            self.data.get_mut(&req.key).expect("present").own = true;
            out.push(Instruction::Send(pb::worker_event::Kind::Finished(pb::TaskFinished {
                key: req.key.to_string(),
                nbytes,
                has_value: req.inline && nbytes <= INLINE_MAX,
                ..Default::default()
            })));
            return;
        }
        let mut missing = 0;
        let mut to_fetch: Vec<(Arc<str>, Key)> = Vec::new();
        let mut deps = Vec::with_capacity(req.deps.len());
        for (dep, who_has) in req.deps {
            if self.trace && !self.data.contains_key(&dep) {
                note(true, &dep, "released", "fetch", out);
            }
            let d = self.data.entry(dep.clone()).or_insert_with(|| DataKey {
                state: DataState::Fetch { who_has: Vec::new() },
                dependents: FxHashSet::default(),
                own: false,
                replica: false,
            });
            d.dependents.insert(req.key.clone());
            match &mut d.state {
                DataState::Memory { .. } => {}
                DataState::Flight { .. } => missing += 1,
                DataState::Fetch { who_has: have } => {
                    missing += 1;
                    *have = who_has;
                    if self.paused && !have.is_empty() {
                        self.deferred.push(dep.clone());
                    } else {
                        start_flight(&dep, d, &mut to_fetch);
                    }
                }
            }
            deps.push(dep);
        }
        let order = self.next_order;
        self.next_order += 1;
        let state = if missing == 0 { ComputeState::Ready } else { ComputeState::Waiting { missing } };
        note(self.trace, &req.key, "released", compute_state_name(&state), out);
        if state == ComputeState::Ready {
            self.ready.push((req.priority, Reverse(order), req.key.clone()));
        }
        self.compute.insert(
            req.key.clone(),
            ComputeTask {
                state,
                spec: req.spec,
                deps,
                priority: req.priority,
                order,
                inline: req.inline,
                announce: req.announce,
                resources: req.resources,
                transfers: Vec::new(),
            },
        );
        // A dependency nobody can give us.
        let unreachable: Vec<Key> = self
            .compute
            .get(&req.key)
            .map(|t| t.deps.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|d| matches!(&self.data[d].state, DataState::Fetch { who_has } if who_has.is_empty()))
            .collect();
        for dep in unreachable {
            self.dependency_missing(&dep, Vec::new(), out);
        }
        group_fetches(self.trace, to_fetch, out);
    }

    fn on_acquire(&mut self, keys: Vec<(Key, Vec<Arc<str>>)>, out: &mut Vec<Instruction>) {
        let mut here = Vec::new();
        let mut to_fetch = Vec::new();
        let mut nowhere = Vec::new();
        for (key, who_has) in keys {
            let d = self.data.entry(key.clone()).or_insert_with(|| DataKey {
                state: DataState::Fetch { who_has: Vec::new() },
                dependents: FxHashSet::default(),
                own: false,
                replica: false,
            });
            match &mut d.state {
                DataState::Memory { nbytes } => {
                    // Here already (a local copy): the scheduler now counts it.
                    d.own = true;
                    here.push(pb::ScatteredKey { key: key.to_string(), workers: Vec::new(), nbytes: *nbytes });
                }
                DataState::Flight { .. } => d.replica = true,
                DataState::Fetch { who_has: have } => {
                    d.replica = true;
                    *have = who_has;
                    if have.is_empty() {
                        nowhere.push(key.clone());
                    } else if self.paused {
                        self.deferred.push(key.clone());
                    } else {
                        start_flight(&key, d, &mut to_fetch);
                    }
                }
            }
        }
        if !here.is_empty() {
            out.push(Instruction::Send(pb::worker_event::Kind::ReplicasAdded(pb::ReplicasAdded { keys: here })));
        }
        for key in nowhere {
            self.dependency_missing(&key, Vec::new(), out);
        }
        group_fetches(self.trace, to_fetch, out);
    }

    /// Gives `key` up if it has not started: waiting or ready here, it goes at once; handed to
    /// the executor, the executor decides ([`Instruction::Unqueue`]); running, done or freed,
    /// it stays and the answer is no.
    fn on_steal(&mut self, key: Key, id: u64, out: &mut Vec<Instruction>) {
        match self.compute.get(&key).map(|t| &t.state) {
            Some(ComputeState::Waiting { .. } | ComputeState::Ready) => {
                let task = self.compute.remove(&key).expect("present");
                note(self.trace, &key, compute_state_name(&task.state), "released", out);
                // A stale entry stays in `ready` and is skipped when popped.
                self.release_deps(&key, &task.deps, out);
                answer_steal(key, id, true, out);
            }
            Some(ComputeState::Dispatched) => out.push(Instruction::Unqueue { key, id }),
            Some(ComputeState::Cancelled) | None => answer_steal(key, id, false, out),
        }
    }

    fn on_free(&mut self, key: Key, out: &mut Vec<Instruction>) {
        if let Some(task) = self.compute.get_mut(&key) {
            match task.state {
                ComputeState::Dispatched => {
                    task.state = ComputeState::Cancelled;
                    note(self.trace, &key, "executing", "cancelled", out);
                    out.push(Instruction::Cancel(key.clone()));
                }
                ComputeState::Cancelled => {}
                ComputeState::Waiting { .. } | ComputeState::Ready => {
                    let task = self.compute.remove(&key).expect("present");
                    note(self.trace, &key, compute_state_name(&task.state), "released", out);
                    self.release_deps(&key, &task.deps, out);
                    // Stale entries in `ready` are skipped when popped.
                }
            }
        }
        if let Some(d) = self.data.get_mut(&key) {
            d.own = false;
            d.replica = false;
            if d.dependents.is_empty() {
                self.drop_data(&key, out);
            }
        }
    }

    fn on_exec_done(&mut self, key: Key, outcome: ExecOutcome, duration: Duration, out: &mut Vec<Instruction>) {
        self.dispatched = self.dispatched.saturating_sub(1);
        // Its run is over (or skipped): what it held is free again.
        if let Some(needs) = self.compute.get(&key).map(|t| t.resources.clone()) {
            self.hold(&needs, 1.0);
        }
        if let (ExecOutcome::Skipped, Some(task)) = (&outcome, self.compute.get_mut(&key))
            && task.state == ComputeState::Dispatched
        {
            // Skipped on a cancel, then resumed: run it after all.
            task.state = ComputeState::Ready;
            note(self.trace, &key, "executing", "ready", out);
            self.ready.push((task.priority, Reverse(task.order), key));
            return;
        }
        let Some(task) = self.compute.remove(&key) else {
            return;
        };
        self.release_deps(&key, &task.deps, out);
        let cancelled = task.state == ComputeState::Cancelled;
        if self.trace {
            let finish = match &outcome {
                _ if cancelled => "released",
                ExecOutcome::Ok { .. } => "memory",
                ExecOutcome::Err(e) if e.kind == dask_protocol::task::RESCHEDULE => "rescheduled",
                ExecOutcome::Err(_) => "error",
                ExecOutcome::Skipped => "released",
            };
            note(true, &key, compute_state_name(&task.state), finish, out);
        }
        match outcome {
            ExecOutcome::Ok { nbytes, type_name } => {
                if cancelled {
                    out.push(Instruction::Drop(key));
                    return;
                }
                let d = self.data.entry(key.clone()).or_insert_with(|| DataKey {
                    state: DataState::Memory { nbytes },
                    dependents: FxHashSet::default(),
                    own: true,
                    replica: false,
                });
                d.state = DataState::Memory { nbytes };
                d.own = true;
                out.push(Instruction::Send(pb::worker_event::Kind::Finished(pb::TaskFinished {
                    key: key.to_string(),
                    nbytes,
                    duration_us: duration.as_micros() as u64,
                    type_name,
                    // The shell attaches the value from the store.
                    has_value: task.inline && nbytes <= INLINE_MAX,
                    transfers: task.transfers,
                    ..Default::default()
                })));
            }
            ExecOutcome::Skipped => {}
            ExecOutcome::Err(error) => {
                if cancelled {
                    return;
                }
                out.push(Instruction::Send(pb::worker_event::Kind::Failed(pb::TaskFailed {
                    key: key.to_string(),
                    error: Some(error),
                    duration_us: duration.as_micros() as u64,
                    transfers: task.transfers,
                    ..Default::default()
                })));
            }
        }
    }

    fn on_fetch_done(
        &mut self,
        from: Arc<str>,
        got: Vec<(Key, u64)>,
        missing: Vec<Key>,
        span: (f64, f64),
        out: &mut Vec<Instruction>,
    ) {
        for (key, nbytes) in got {
            if self.data.contains_key(&key) {
                self.arrived(&key, nbytes, None, Some((&from, span)), out);
            } else {
                out.push(Instruction::Drop(key));
            }
        }
        let mut retry: Vec<(Arc<str>, Key)> = Vec::new();
        for key in missing {
            let Some(d) = self.data.get_mut(&key) else {
                continue;
            };
            match &mut d.state {
                DataState::Flight { from: f, rest, tried } if *f == from => {
                    note(self.trace, &key, "flight", "fetch", out);
                    tried.push(from.clone());
                    if let Some(next) = (!rest.is_empty()).then(|| rest.remove(0)) {
                        *f = next.clone();
                        retry.push((next, key.clone()));
                    } else {
                        let tried = std::mem::take(tried);
                        self.dependency_missing(&key, tried, out);
                    }
                }
                _ => {}
            }
        }
        group_fetches(self.trace, retry, out);
    }

    /// The value of `key` is in the store now (fetched or put).
    /// `from` names the state it came from when the entry is new (a put); `fetched`: the peer
    /// it came from, and when.
    fn arrived(
        &mut self,
        key: &Key,
        nbytes: u64,
        from: Option<&'static str>,
        fetched: Option<(&Arc<str>, (f64, f64))>,
        out: &mut Vec<Instruction>,
    ) {
        let Some(d) = self.data.get_mut(key) else { return };
        if matches!(d.state, DataState::Memory { .. }) {
            return;
        }
        note(self.trace, key, from.unwrap_or(data_state_name(&d.state)), "memory", out);
        d.state = DataState::Memory { nbytes };
        if d.replica {
            // Kept for safekeeping: the scheduler counts it now.
            d.replica = false;
            d.own = true;
            out.push(Instruction::Send(pb::worker_event::Kind::ReplicasAdded(pb::ReplicasAdded {
                keys: vec![pb::ScatteredKey { key: key.to_string(), workers: Vec::new(), nbytes }],
            })));
        }
        if d.dependents.is_empty() && !d.own {
            self.drop_data(key, out);
            return;
        }
        for t in d.dependents.clone() {
            if let Some(task) = self.compute.get_mut(&t)
                && let ComputeState::Waiting { missing } = &mut task.state
            {
                *missing -= 1;
                if let Some((source, (start_s, stop_s))) = fetched {
                    task.transfers.push(pb::Transfer {
                        key: key.to_string(),
                        source: source.to_string(),
                        start_s,
                        stop_s,
                        nbytes,
                    });
                }
                if *missing == 0 {
                    note(self.trace, &t, "waiting", "ready", out);
                    task.state = ComputeState::Ready;
                    self.ready.push((task.priority, Reverse(task.order), t.clone()));
                }
            }
        }
    }

    /// No peer could give us `dep`: every local task needing it goes back to the scheduler.
    fn dependency_missing(&mut self, dep: &Key, tried: Vec<Arc<str>>, out: &mut Vec<Instruction>) {
        let Some(d) = self.data.get_mut(dep) else { return };
        if d.replica {
            d.replica = false;
            out.push(Instruction::Send(pb::worker_event::Kind::ReplicasFailed(pb::KeysReleased {
                keys: vec![dep.to_string()],
            })));
            if d.dependents.is_empty() {
                self.drop_data(dep, out);
                return;
            }
        }
        let Some(d) = self.data.get(dep) else { return };
        let dependents = d.dependents.clone();
        for t in dependents {
            if let Some(task) = self.compute.remove(&t) {
                note(self.trace, &t, compute_state_name(&task.state), "released", out);
                out.push(Instruction::Send(pb::worker_event::Kind::Missing(pb::MissingData {
                    key: t.to_string(),
                    dependency: dep.to_string(),
                    workers: tried.iter().map(|w| w.to_string()).collect(),
                })));
                self.release_deps(&t, &task.deps, out);
            }
        }
    }

    /// `task` no longer needs `deps`; fetched copies nobody needs are dropped.
    fn release_deps(&mut self, task: &Key, deps: &[Key], out: &mut Vec<Instruction>) {
        for dep in deps {
            if let Some(d) = self.data.get_mut(dep) {
                d.dependents.remove(task);
                if d.dependents.is_empty() && !d.own && !d.replica {
                    self.drop_data(dep, out);
                }
            }
        }
    }

    fn drop_data(&mut self, key: &Key, out: &mut Vec<Instruction>) {
        let Some(d) = self.data.remove(key) else { return };
        // A key computed here is reported once, as a task.
        if !self.compute.contains_key(key) {
            note(self.trace, key, data_state_name(&d.state), "released", out);
        }
        if matches!(d.state, DataState::Memory { .. } | DataState::Flight { .. }) {
            out.push(Instruction::Drop(key.clone()));
        }
    }

    fn start_ready(&mut self, out: &mut Vec<Instruction>) {
        // Ready tasks whose resources are held by others wait here (without blocking the rest).
        let mut waiting = Vec::new();
        while self.dispatched < self.max_dispatched {
            let Some((priority, order, key)) = self.ready.pop() else {
                break;
            };
            let Some(task) = self.compute.get(&key) else {
                continue;
            };
            if task.state != ComputeState::Ready {
                continue;
            }
            if !task.resources.is_empty() {
                if !self.fits(&task.resources) {
                    waiting.push((priority, order, key));
                    continue;
                }
                let needs = task.resources.clone();
                self.hold(&needs, -1.0);
            }
            let task = self.compute.get_mut(&key).expect("present");
            note(self.trace, &key, "ready", "executing", out);
            task.state = ComputeState::Dispatched;
            self.dispatched += 1;
            out.push(Instruction::Execute {
                key,
                spec: task.spec.clone(),
                priority: task.priority,
                order: task.order,
                announce: task.announce,
            });
        }
        self.ready.extend(waiting);
    }

    /// Checks the invariants; panics on the first one broken.
    pub fn validate(&self) {
        // What dispatched tasks hold is what is missing from the free amounts, never more than
        // there is.
        for ((n, free), (_, total)) in self.available.iter().zip(&self.total) {
            let held: f64 = self
                .compute
                .values()
                .filter(|t| matches!(t.state, ComputeState::Dispatched | ComputeState::Cancelled))
                .flat_map(|t| t.resources.iter().filter(|(m, _)| m == n).map(|(_, a)| *a))
                .sum();
            assert!(*free >= -1e-9, "{n} oversubscribed: {free} free");
            assert!((free + held - total).abs() < 1e-6, "{n}: {free} free + {held} held != {total}");
        }
        let executing = self
            .compute
            .values()
            .filter(|t| matches!(t.state, ComputeState::Dispatched | ComputeState::Cancelled))
            .count();
        assert_eq!(executing, self.dispatched, "dispatched count");
        assert!(self.dispatched <= self.max_dispatched, "more dispatched than allowed");
        for (key, t) in &self.compute {
            let mut missing = 0;
            for dep in &t.deps {
                let d = self.data.get(dep).unwrap_or_else(|| panic!("{key}: dependency {dep} has no entry"));
                assert!(d.dependents.contains(key), "{key}: not a dependent of {dep}");
                if !matches!(d.state, DataState::Memory { .. }) {
                    missing += 1;
                }
            }
            match t.state {
                ComputeState::Waiting { missing: m } => {
                    assert_eq!(m, missing, "{key}: missing count")
                }
                ComputeState::Ready | ComputeState::Dispatched => {
                    assert_eq!(missing, 0, "{key}: runs without its inputs")
                }
                ComputeState::Cancelled => {}
            }
        }
        for (key, d) in &self.data {
            assert!(d.own || d.replica || !d.dependents.is_empty(), "{key}: unneeded entry kept");
            if d.replica {
                assert!(!matches!(d.state, DataState::Memory { .. }), "{key}: a replica in memory not yet reported");
            }
            if d.own {
                assert!(matches!(d.state, DataState::Memory { .. }), "{key}: own but not in memory");
            }
            for t in &d.dependents {
                assert!(self.compute.get(t).is_some_and(|c| c.deps.contains(key)), "{key}: dependent {t} gone");
            }
        }
    }
}

fn answer_steal(key: Key, id: u64, stolen: bool, out: &mut Vec<Instruction>) {
    out.push(Instruction::Send(pb::worker_event::Kind::StealResponse(pb::StealResponse {
        key: key.to_string(),
        id,
        stolen,
    })));
}

/// Starts fetching `dep` (in `Fetch`) from its first holder.
fn start_flight(dep: &Key, d: &mut DataKey, to_fetch: &mut Vec<(Arc<str>, Key)>) {
    if let DataState::Fetch { who_has } = &d.state
        && let Some(first) = who_has.first().cloned()
    {
        let rest = who_has[1..].to_vec();
        d.state = DataState::Flight { from: first.clone(), rest, tried: Vec::new() };
        to_fetch.push((first, dep.clone()));
    }
}

/// Reports a transition when `trace` is on.
fn note(trace: bool, key: &Key, start: &'static str, finish: &'static str, out: &mut Vec<Instruction>) {
    if trace {
        out.push(Instruction::Transition { key: key.clone(), start, finish });
    }
}

fn compute_state_name(s: &ComputeState) -> &'static str {
    match s {
        ComputeState::Waiting { .. } => "waiting",
        ComputeState::Ready => "ready",
        ComputeState::Dispatched => "executing",
        ComputeState::Cancelled => "cancelled",
    }
}

fn data_state_name(s: &DataState) -> &'static str {
    match s {
        DataState::Fetch { .. } => "fetch",
        DataState::Flight { .. } => "flight",
        DataState::Memory { .. } => "memory",
    }
}

/// One `Fetch` per peer, with every key wanted from it.
fn group_fetches(trace: bool, mut wanted: Vec<(Arc<str>, Key)>, out: &mut Vec<Instruction>) {
    for (_, key) in &wanted {
        note(trace, key, "fetch", "flight", out);
    }
    wanted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut i = 0;
    while i < wanted.len() {
        let from = wanted[i].0.clone();
        let mut keys = Vec::new();
        while i < wanted.len() && wanted[i].0 == from {
            keys.push(wanted[i].1.clone());
            i += 1;
        }
        out.push(Instruction::Fetch { from, keys });
    }
}
