//! Where a ready task runs: the worker holding most of its inputs, else the least busy one
//! with a free slot, else the queue; and how deep a worker's slots are.

use std::sync::Arc;

use rustc_hash::FxHashMap;
use std::time::Duration;

use smallvec::SmallVec;

use super::{Cx, Prefix, SchedulerCore, TASK_STATES, Task, TaskId, TaskState, Worker, WorkerId, occupancy};

impl SchedulerCore {
    /// Places a task whose dependencies are all in memory: on a worker with a free slot,
    /// in the queue, or in no-worker.
    pub(super) fn schedule(&mut self, t: TaskId, cx: &mut Cx<'_>) {
        let placement = self.pick_worker(t);
        match placement {
            Placement::Worker(w) => self.set_state(t, TaskState::Processing { worker: w }, cx),
            Placement::Queue => {
                if !matches!(self.task(t).state, TaskState::Queued) {
                    self.set_state(t, TaskState::Queued, cx);
                }
            }
            Placement::NoWorker => {
                if !matches!(self.task(t).state, TaskState::NoWorker) {
                    self.set_state(t, TaskState::NoWorker, cx);
                }
            }
        }
    }

    pub(super) fn pick_worker(&self, t: TaskId) -> Placement {
        let task = self.task(t);
        if let Some(r) = &task.restrictions
            && (r.hard() || !r.resources.is_empty())
        {
            // Tasks only some workers may run (named, or with the resources free) are not held
            // back by the slot limit: they go to the least busy of those, or wait (NoWorker).
            // Resources limit how many run at once; a named worker is preferred if loosely named.
            // Candidates come from the indexes (the named workers, or those with the first
            // resource needed), not from a scan of every worker.
            let best = |candidates: &mut dyn Iterator<Item = WorkerId>| {
                candidates
                    .filter_map(|id| self.workers.get(&id).map(|w| (id, w)))
                    .filter(|(_, w)| self.may_run(task, w))
                    .min_by_key(|(id, w)| (occupancy(w), *id))
                    .map(|(id, _)| id)
            };
            let named = || self.named_workers(&r.workers);
            let with_resource = || {
                let first = r.resources.first().map(|(n, _)| n);
                first.and_then(|n| self.by_resource.get(n)).into_iter().flatten().copied()
            };
            let pick = if !r.workers.is_empty() {
                let named_pick = best(&mut named());
                match named_pick {
                    None if r.loose => best(&mut with_resource()),
                    p => p,
                }
            } else {
                best(&mut with_resource())
            };
            return pick.map_or(Placement::NoWorker, Placement::Worker);
        }
        if self.by_occupancy.is_empty() && self.workers.values().all(|w| w.closing) {
            return Placement::NoWorker;
        }
        let limit = self.depth(task.prefix);
        let has_slot = |w: &Worker| w.open() && (w.busy() as u64) < w.spec.nthreads.max(1) as u64 * limit as u64;
        // Loose restrictions (`allow_other_workers`): the named workers first, if they have room.
        if let Some(r) = &task.restrictions
            && let Some((id, _)) = self
                .workers
                .iter()
                .filter(|(_, w)| r.names(w) && has_slot(w))
                .min_by_key(|(id, w)| (occupancy(w), **id))
        {
            return Placement::Worker(*id);
        }
        // Prefer the worker holding most of the inputs' bytes.
        if !task.dependencies.is_empty() {
            // A few holders are summed in a small list; a big fan-in over many workers (a merge
            // of 100,000 inputs on 10,000 workers) in a map, or the search is quadratic.
            let mut bytes: SmallVec<[(WorkerId, u64); 4]> = SmallVec::new();
            let mut many: FxHashMap<WorkerId, u64> = FxHashMap::default();
            for &d in task.dependencies.iter() {
                if let TaskState::Memory { nbytes, who_has } = &self.task(d).state {
                    for w in who_has {
                        if !many.is_empty() {
                            *many.entry(*w).or_default() += nbytes;
                        } else if let Some((_, b)) = bytes.iter_mut().find(|(x, _)| x == w) {
                            *b += nbytes;
                        } else if bytes.len() < 16 {
                            bytes.push((*w, *nbytes));
                        } else {
                            many.extend(bytes.drain(..));
                            many.insert(*w, *nbytes);
                        }
                    }
                }
            }
            bytes.extend(many);
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
    pub(super) fn depth(&self, prefix: u32) -> u32 {
        let avg = self.prefixes[prefix as usize].avg_ns.unwrap_or(self.config.unknown_duration.as_nanos() as f64);
        let n = self.config.soon.as_nanos() as f64 / avg.max(1.0);
        (n as u32).clamp(1, self.config.max_depth)
    }

    /// Gives `worker` queued tasks while it has free slots.
    pub(super) fn fill(&mut self, worker: WorkerId, cx: &mut Cx<'_>) {
        let Some(w) = self.workers.get(&worker) else { return };
        let has_resources = !w.spec.resources.is_empty();
        while let Some(t) = self.queue.peek() {
            let limit = self.depth(self.task(t).prefix);
            let w = &self.workers[&worker];
            if !w.open() || w.busy() as u64 >= w.spec.nthreads.max(1) as u64 * limit as u64 {
                break;
            }
            // Leaving Queued takes it out of the queue.
            self.set_state(t, TaskState::Processing { worker }, cx);
        }
        // Tasks waiting for resources this worker has (some may have freed up here), whatever
        // its slots (resources bound how many run). Those it can never run are passed over
        // without counting (they wait for a bigger worker).
        if has_resources && !self.res_waiting.is_empty() {
            let w = &self.workers[&worker];
            let waiting: Vec<TaskId> = self
                .res_waiting
                .iter()
                .take(RESOURCE_SCAN)
                .map(|k| k.task())
                .filter(|t| self.task(*t).restrictions.as_ref().is_some_and(|r| w.has_total(&r.resources)))
                .collect();
            for t in waiting {
                if self.may_run(self.task(t), &self.workers[&worker]) {
                    self.set_state(t, TaskState::Processing { worker }, cx);
                }
            }
        }
        // Nothing queued: a thread left idle may take what busy workers hold.
        self.balance(worker, &[], cx);
    }

    /// The connected workers with these addresses or names, each once.
    pub(super) fn named_workers(&self, names: &[std::sync::Arc<str>]) -> impl Iterator<Item = WorkerId> + use<> {
        let mut ids: Vec<WorkerId> =
            names.iter().filter_map(|n| self.by_address.get(n).or_else(|| self.by_name.get(n)).copied()).collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
    }

    /// Whether `task` may start on `w` now: it takes work, the task's worker names allow it
    /// (loose ones allow any), and the resources it needs are free there.
    pub(super) fn may_run(&self, task: &Task, w: &Worker) -> bool {
        w.open()
            && match &task.restrictions {
                None => true,
                Some(r) => (!r.hard() || r.names(w)) && w.has_free(&r.resources),
            }
    }

    /// Learns from a task that ran `d` on `worker`: the average of its kind, and the worker's
    /// speed (how its durations compare with its kinds' averages: a geometric moving average,
    /// so one long task does not make a worker look slow). Returns whether the kind now looks
    /// at least twice as long as before (queues sized by the old figure are too deep).
    pub(super) fn record_duration(&mut self, t: TaskId, d: Duration, worker: WorkerId) -> bool {
        let prefix = self.task(t).prefix as usize;
        let p = &mut self.prefixes[prefix];
        let ns = (d.as_nanos() as f64).max(1.0);
        let old = p.avg_ns;
        p.avg_ns = Some(match old {
            None => ns,
            Some(avg) => 0.5 * avg + 0.5 * ns,
        });
        let Some(old) = old else { return false };
        if let Some(w) = self.workers.get_mut(&worker) {
            let sample = (old / ns).clamp(1.0 / 64.0, 64.0).ln();
            w.log_speed = 0.9 * w.log_speed + 0.1 * sample;
        }
        // Only kinds long enough to be stolen at all (see `steal.rs`) are worth a look.
        ns > 3.0 * old && ns >= 2.0 * self.config.steal_latency.as_nanos() as f64
    }

    pub(super) fn prefix_of(&mut self, key: &str) -> u32 {
        let name = key_prefix(key);
        if let Some(&p) = self.prefix_ids.get(name) {
            return p;
        }
        let name: Arc<str> = Arc::from(name);
        let id = self.prefixes.len() as u32;
        self.prefixes.push(Prefix { avg_ns: None, now: [0; TASK_STATES.len()], entered: [0; TASK_STATES.len()] });
        self.prefix_ids.insert(name, id);
        id
    }
}

/// Tasks waiting for resources looked at when a worker's free up (the most urgent first).
const RESOURCE_SCAN: usize = 4096;

pub(super) enum Placement {
    Worker(WorkerId),
    Queue,
    NoWorker,
}

pub use dask_protocol::tokenize::key_prefix;
