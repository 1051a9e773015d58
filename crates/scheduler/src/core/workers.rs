//! Workers coming and going: joins, pauses, deaths and what they lose, restarts, and what
//! workers report of their tasks.

use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashSet;
use smallvec::SmallVec;

use super::{
    ClientId, Command, Cx, Key, NoticeLevel, ReadyQueue, Report, SchedulerCore, TaskError, TaskId, TaskState, Worker,
    WorkerId, WorkerMemory, WorkerSpec, occupancy, slab,
};

impl SchedulerCore {
    pub(super) fn worker_joined(&mut self, worker: WorkerId, mut spec: WorkerSpec, cx: &mut Cx<'_>) {
        spec.resources = super::graph::merge_resources(std::mem::take(&mut spec.resources));
        let taken = if self.by_name.contains_key(&spec.name) {
            Some("name")
        } else if self.by_address.contains_key(&spec.address) {
            Some("address")
        } else {
            None
        };
        if let Some(why) = taken {
            cx.out.push(Command::CloseWorker {
                restart: false,
                worker,
                reason: format!(
                    "a worker with {why} {:?} is already connected",
                    if why == "name" { &spec.name } else { &spec.address }
                ),
            });
            return;
        }
        let used = vec![0.0; spec.resources.len()].into_boxed_slice();
        // Needs said to be beyond every worker may be met now.
        self.unrunnable_said.clear();
        for (n, amount) in &spec.resources {
            if *amount > 0.0 {
                self.by_resource.entry(n.clone()).or_default().insert(worker);
            }
        }
        self.by_address.insert(spec.address.clone(), worker);
        self.by_name.insert(spec.name.clone(), worker);
        if self.feed {
            cx.out.push(Command::Feed(super::Feed::AddWorker { worker: spec.address.clone() }));
        }
        self.workers.insert(
            worker,
            Worker {
                spec,
                processing: FxHashSet::default(),
                long_running: FxHashSet::default(),
                has_what: FxHashSet::default(),
                nbytes: 0,
                last_seen: cx.now,
                closing: false,
                paused: false,
                retiring: None,
                steals_out: 0,
                steals_in: 0,
                log_speed: 0.0,
                used,
                memory: WorkerMemory::default(),
            },
        );
        self.by_occupancy.insert((0, worker));
        // Tasks that had nowhere to go may now run.
        self.reschedule_no_worker(cx);
        self.fill(worker, cx);
        // It may also take what paused or retiring workers hold and will not start.
        self.balance_all(cx);
    }

    /// Forgets every task: every client is told its keys were cancelled, workers to drop what
    /// they hold or run. Workers stay (the shell restarts them through their nannies); measured
    /// durations stay too.
    pub(super) fn restart(&mut self, reason: &str, cx: &mut Cx<'_>) {
        self.restart_cancels_retirement(cx);
        self.restart_ends_copies(cx);
        let why: Arc<str> = Arc::from(reason);
        let n = self.keys.len();
        let mut clients: Vec<ClientId> = self.clients.keys().copied().collect();
        clients.sort();
        for c in clients {
            let wants = std::mem::take(&mut self.clients.get_mut(&c).expect("listed").wants);
            if c.is_holder() {
                continue;
            }
            let mut keys: Vec<Key> = wants.iter().map(|t| self.task(*t).key.clone()).collect();
            keys.sort();
            for key in keys {
                cx.out.push(Command::Report { client: c, key, report: Report::Cancelled(Some(why.clone())) });
            }
        }
        for (id, w) in self.workers.iter_mut() {
            w.long_running.clear();
            let mut held: Vec<TaskId> = w.has_what.drain().chain(w.processing.drain()).collect();
            held.sort();
            for t in held {
                let key = self.tasks.slot(t.0).as_ref().expect("live task").key.clone();
                cx.out.push(Command::Free { worker: *id, key });
            }
            w.nbytes = 0;
            w.steals_out = 0;
            w.steals_in = 0;
            w.used.iter_mut().for_each(|u| *u = 0.0);
        }
        self.by_occupancy = self.workers.iter().filter(|(_, w)| w.open()).map(|(id, _)| (0, *id)).collect();
        if self.feed {
            let mut gone: Vec<(Key, &'static str)> =
                self.keys.values().map(|t| (self.task(*t).key.clone(), self.task(*t).state.name())).collect();
            gone.sort();
            for (key, from) in gone {
                cx.out.push(Command::Feed(super::Feed::Transition { key, from, to: "forgotten" }));
            }
        }
        self.tasks = slab::Slab::default();
        for p in &mut self.prefixes {
            p.now = [0; super::TASK_STATES.len()];
        }
        self.free_ids.clear();
        self.keys.clear();
        self.queue = ReadyQueue::default();
        self.no_worker.clear();
        self.res_waiting.clear();
        self.positions.clear();
        cx.to_check.clear();
        cx.freed.clear();
        self.replicating.clear();
        self.copy_failures.clear();
        self.steals.clear();
        cx.out.push(Command::Notice {
            level: NoticeLevel::Warn,
            message: format!("restart: released every task ({n}); {reason}"),
        });
    }

    /// A worker paused (over its memory's `pause` threshold) or resumed. A paused worker gets
    /// no new tasks; what it has queued waits for it.
    pub(super) fn set_paused(&mut self, worker: WorkerId, paused: bool, cx: &mut Cx<'_>) {
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
        cx.out.push(Command::Notice { level: NoticeLevel::Warn, message });
        if paused {
            // What it holds and has not started may go to idle workers.
            self.balance_all(cx);
        } else {
            self.reschedule_no_worker(cx);
            self.fill(worker, cx);
        }
    }

    /// Tasks that had nowhere to go are placed again (a worker joined or resumed).
    pub(super) fn reschedule_no_worker(&mut self, cx: &mut Cx<'_>) {
        let mut stuck: Vec<TaskId> = self.no_worker.iter().copied().collect();
        stuck.sort_by_key(|t| self.queue_key(*t));
        for t in stuck {
            self.schedule(t, cx);
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
    pub(super) fn remove_worker(&mut self, worker: WorkerId, reason: &str, expected: bool, cx: &mut Cx<'_>) {
        if !self.workers.contains_key(&worker) {
            return;
        }
        // Copies it was to take will not come.
        self.copies_lost(None, Some(worker), cx);
        let w = self.workers.get_mut(&worker).expect("checked");
        let was_open = w.open();
        w.closing = true;
        let key = (occupancy(w), worker);
        let addr = w.spec.address.clone();
        if was_open {
            self.by_occupancy.remove(&key);
        }
        if self.feed {
            cx.out.push(Command::Feed(super::Feed::RemoveWorker { worker: addr.clone(), reason: reason.to_string() }));
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
        self.data_lost(&lost, &format!("worker {addr} left ({reason})"), cx);
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
                cx.out.push(Command::Notice {
                    level: NoticeLevel::Error,
                    message: format!("task {} marked as failed because {n} workers died while running it", task.key),
                });
                let err = TaskError::raised_here(&task.key, "killed-worker", message, &addr);
                self.set_state(t, TaskState::Erred { error: err }, cx);
            } else {
                self.schedule(t, cx);
            }
        }
        let w = self.workers.remove(&worker).expect("worker exists");
        self.by_address.remove(&w.spec.address);
        for (n, _) in &w.spec.resources {
            if let Some(set) = self.by_resource.get_mut(n) {
                set.remove(&worker);
                if set.is_empty() {
                    self.by_resource.remove(n);
                }
            }
        }
        self.by_name.remove(&w.spec.name);
        debug_assert!(w.processing.is_empty() && w.has_what.is_empty());
        self.retire_worker_gone(worker, w.retiring, cx);
        // The dead worker's commands are dropped by the shell; drop them here already.
        cx.out.retain(
            |c| !matches!(c, Command::Compute { worker: x, .. } | Command::Free { worker: x, .. } if *x == worker),
        );
        if self.workers.is_empty() {
            while let Some(t) = self.queue.peek() {
                self.set_state(t, TaskState::NoWorker, cx);
            }
        } else {
            let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
            for w in ids {
                self.fill(w, cx);
            }
        }
    }

    /// The last replica of `t` is gone.
    /// The last replicas of `lost` are gone. All of them are released first, then the needed
    /// ones recomputed, so no Compute names a holder that is gone.
    pub(super) fn data_lost(&mut self, lost: &[TaskId], why: &str, cx: &mut Cx<'_>) {
        let mut recompute = Vec::new();
        for &t in lost {
            let needed = !self.task(t).who_wants.is_empty() || self.task(t).active_dependents > 0;
            if self.task(t).spec.is_empty() {
                // Scattered data cannot be recomputed.
                let message = format!("the only copy of this scattered value was lost: {why}");
                let err = TaskError::raised_here(&self.task(t).key, "lost", message, "");
                self.set_state(t, TaskState::Erred { error: err }, cx);
                continue;
            }
            self.set_state(t, TaskState::Released, cx);
            if needed {
                recompute.push(t);
            } else {
                cx.to_check.push(t);
            }
        }
        for t in recompute {
            // Needed then; still needed unless an erred input failed its dependents meanwhile.
            let task = self.task(t);
            if !task.who_wants.is_empty() || task.active_dependents > 0 {
                self.compute(t, cx);
            } else {
                cx.to_check.push(t);
            }
        }
    }

    pub(super) fn task_finished(
        &mut self,
        worker: WorkerId,
        key: Key,
        nbytes: u64,
        duration: Duration,
        cx: &mut Cx<'_>,
    ) {
        let Some(&t) = self.keys.get(&key) else {
            cx.out.push(Command::Free { worker, key });
            return;
        };
        match &self.task(t).state {
            TaskState::Processing { worker: w } if *w == worker => {}
            TaskState::Memory { who_has, .. } if who_has.contains(&worker) => return,
            _ => {
                // A stale result (the task was moved or released meanwhile).
                if self.workers.contains_key(&worker) {
                    cx.out.push(Command::Free { worker, key });
                }
                return;
            }
        }
        let slower = self.record_duration(t, duration, worker);
        self.set_state(t, TaskState::Memory { nbytes, who_has: SmallVec::from_elem(worker, 1) }, cx);
        self.fill(worker, cx);
        if slower {
            // Tasks of this kind were handed out by a figure far too short: idle workers may
            // take some of them now rather than at the next tick.
            self.balance_all(cx);
        }
    }

    pub(super) fn task_failed(
        &mut self,
        worker: WorkerId,
        key: Key,
        mut error: TaskError,
        duration: Duration,
        cx: &mut Cx<'_>,
    ) {
        let Some(&t) = self.keys.get(&key) else {
            return;
        };
        if !matches!(self.task(t).state, TaskState::Processing { worker: w } if w == worker) {
            return;
        }
        if error.kind == dask_protocol::task::RESCHEDULE {
            // dask's Reschedule: not a failure; it is placed again (anywhere), counting nothing.
            self.set_state(t, TaskState::Released, cx);
            self.compute(t, cx);
            self.fill(worker, cx);
            return;
        }
        self.record_duration(t, duration, worker);
        if self.task(t).retries > 0 {
            self.task_mut(t).retries -= 1;
            self.set_state(t, TaskState::Released, cx);
            self.compute(t, cx);
        } else {
            if error.key.is_empty() {
                error.key = key.to_string();
            }
            self.set_state(t, TaskState::Erred { error: Arc::new(error) }, cx);
        }
        self.fill(worker, cx);
    }

    pub(super) fn missing_data(
        &mut self,
        worker: WorkerId,
        key: Key,
        dependency: Key,
        from: Vec<Arc<str>>,
        cx: &mut Cx<'_>,
    ) {
        if let Some(&d) = self.keys.get(&dependency) {
            let gone: Vec<WorkerId> = from.iter().filter_map(|a| self.by_address.get(a).copied()).collect();
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
                        self.data_lost(&[d], "a worker reported it missing", cx);
                        break;
                    }
                }
            }
        }
        // If the task still waits on this worker, try again (with fresh locations).
        if let Some(&t) = self.keys.get(&key)
            && matches!(self.task(t).state, TaskState::Processing { worker: w } if w == worker)
        {
            self.set_state(t, TaskState::Released, cx);
            self.compute(t, cx);
        }
    }

    /// Tasks on `worker` seceded: they stop counting against its slots, which take more work.
    pub(super) fn seceded(&mut self, worker: WorkerId, keys: Vec<Key>, cx: &mut Cx<'_>) {
        for key in keys {
            let Some(&t) = self.keys.get(&key) else { continue };
            if !matches!(self.task(t).state, TaskState::Processing { worker: w } if w == worker) {
                continue; // done, stolen or lost meanwhile
            }
            let Some(w) = self.workers.get_mut(&worker) else { continue };
            let before = occupancy(w);
            if w.long_running.insert(t) {
                if w.open() {
                    self.by_occupancy.remove(&(before, worker));
                    self.by_occupancy.insert((occupancy(w), worker));
                }
                cx.freed.push(worker);
            }
        }
    }
}
