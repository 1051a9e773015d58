//! Graceful retirement (dask's `retire_workers`, and a worker's `--lifetime`): a retiring worker
//! gets no new tasks and finishes those it has; every value only it holds is copied to another
//! worker first (`AcquireReplicas`; the copy is kept there as a replica); then it closes (or,
//! with `close: false`, drops its copies and stays idle). Nothing is recomputed.
//!
//! Its leaving is expected: no task counts it as a death. A retiring worker that dies instead
//! is simply lost (its values are recomputed if needed, as for any death).
use std::sync::Arc;

use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use super::{Command, Cx, DepLocation, Key, NoticeLevel, SchedulerCore, TaskId, TaskState, WorkerId};

/// A worker being retired.
#[derive(Clone, Debug)]
pub(super) struct Retiring {
    /// The request it belongs to (0: its own, from `--lifetime`; nobody waits for a reply).
    op: u64,
    close: bool,
    /// Its nanny starts a fresh worker in its place (`--lifetime-restart`).
    restart: bool,
    reason: Arc<str>,
    /// Done, but left connected (`close: false`).
    done: bool,
}

impl Retiring {
    pub(super) fn is_done(&self) -> bool {
        self.done
    }
}

/// A retire request waiting for its workers.
#[derive(Debug, Default)]
pub(super) struct RetireOp {
    waiting: Vec<WorkerId>,
    retired: Vec<Arc<str>>,
    /// Workers whose retirement was given up, and why.
    failed: Vec<String>,
}

/// Copies of one value that failed in a row before its worker's retirement is given up.
const MAX_COPY_FAILURES: u32 = 3;

impl SchedulerCore {
    /// Starts retiring `workers`. Refused (reported at once) when no other worker could take
    /// their values.
    pub(super) fn retire(
        &mut self,
        op: u64,
        workers: Vec<WorkerId>,
        close: bool,
        restart: bool,
        reason: &str,
        cx: &mut Cx<'_>,
    ) {
        let chosen: Vec<WorkerId> = workers
            .into_iter()
            .filter(|w| self.workers.get(w).is_some_and(|x| !x.closing && x.retiring.is_none()))
            .collect();
        let others = self.workers.iter().any(|(id, w)| w.open() && !chosen.contains(id));
        let holds_data = chosen.iter().any(|w| !self.workers[w].has_what.is_empty());
        if chosen.is_empty() || (!others && holds_data) {
            if op == 0 {
                // A worker's own lifetime is over and nobody can take its values: it goes
                // anyway (they are recomputed if needed), as dask's does.
                for w in chosen {
                    let why = format!("{reason} (its values could not move: no other worker)");
                    cx.out.push(Command::CloseWorker { worker: w, reason: why.clone(), restart });
                    self.remove_worker(w, &why, true, cx);
                }
            } else {
                let why = if chosen.is_empty() {
                    "none of them is connected (or they are closing already)".to_string()
                } else {
                    "no other worker is running to take their data; start one first".to_string()
                };
                cx.out.push(Command::Retired { op, workers: Vec::new(), refused: Some(why) });
            }
            return;
        }
        let reason: Arc<str> = Arc::from(reason);
        for &w in &chosen {
            let worker = self.workers.get_mut(&w).expect("chosen from the map");
            let key = (super::occupancy(worker), w);
            let was_open = worker.open();
            worker.retiring = Some(Retiring { op, close, restart, reason: reason.clone(), done: false });
            if was_open {
                self.by_occupancy.remove(&key);
            }
            cx.out.push(Command::Notice {
                level: NoticeLevel::Info,
                message: format!("retiring worker {} ({reason})", worker.spec.address),
            });
        }
        if op != 0 {
            self.retire_ops.insert(op, RetireOp { waiting: chosen, ..Default::default() });
        }
        self.progress_retirement(cx);
    }

    /// Values only retiring workers hold get a copy elsewhere; workers with nothing left to give
    /// are closed; finished requests are answered. Runs after every event while any worker
    /// retires.
    pub(super) fn progress_retirement(&mut self, cx: &mut Cx<'_>) {
        let retiring: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.retiring.as_ref().is_some_and(|r| !r.done) && !w.closing)
            .map(|(id, _)| *id)
            .collect();
        if retiring.is_empty() {
            return;
        }
        // Copies to make, per target.
        let mut plan: FxHashMap<WorkerId, Vec<DepLocation>> = FxHashMap::default();
        let mut planned_bytes: FxHashMap<WorkerId, u64> = FxHashMap::default();
        let mut finished = Vec::new();
        let mut stuck = Vec::new();
        for &w in &retiring {
            let mut unique = 0;
            let mut held: Vec<TaskId> = self.workers[&w].has_what.iter().copied().collect();
            held.sort();
            for t in held {
                let TaskState::Memory { who_has, nbytes } = &self.task(t).state else { continue };
                if who_has.iter().any(|h| self.workers.get(h).is_some_and(|x| x.retiring.is_none() && !x.closing)) {
                    continue; // safe elsewhere already
                }
                unique += 1;
                if self.replicating.contains_key(&t) {
                    continue; // on its way
                }
                let nbytes = *nbytes;
                let Some(target) = self.replica_target(&planned_bytes) else {
                    stuck.push(w);
                    break;
                };
                *planned_bytes.entry(target).or_default() += nbytes;
                let workers: SmallVec<[Arc<str>; 2]> =
                    who_has.iter().map(|h| self.workers[h].spec.address.clone()).collect();
                plan.entry(target).or_default().push(DepLocation { key: self.task(t).key.clone(), workers, nbytes });
                self.replicating.insert(t, target);
            }
            if unique == 0 && self.workers[&w].processing.is_empty() {
                finished.push(w);
            }
        }
        let mut plan: Vec<(WorkerId, Vec<DepLocation>)> = plan.into_iter().collect();
        plan.sort_by_key(|(w, _)| *w);
        for (worker, keys) in plan {
            cx.out.push(Command::AcquireReplicas { worker, keys });
        }
        for w in finished {
            self.retired(w, cx);
        }
        for w in stuck {
            self.abort_retirement(w, "no other worker is running to take its values (they left or paused)", cx);
        }
    }

    /// Gives up retiring `w`: it runs again as before, and its request hears why.
    fn abort_retirement(&mut self, w: WorkerId, why: &str, cx: &mut Cx<'_>) {
        let Some(worker) = self.workers.get_mut(&w) else { return };
        let Some(r) = worker.retiring.take() else { return };
        let address = worker.spec.address.clone();
        if worker.open() {
            self.by_occupancy.insert((super::occupancy(worker), w));
        }
        self.replicating.retain(|t, _| !self.workers[&w].has_what.contains(t));
        cx.out.push(Command::Notice {
            level: NoticeLevel::Warn,
            message: format!("gave up retiring worker {address}: {why}; it runs again"),
        });
        if let Some(o) = self.retire_ops.get_mut(&r.op) {
            o.failed.push(format!("{address}: {why}"));
        }
        self.retire_op_done(r.op, w, None, cx);
        self.fill(w, cx);
        // Tasks only it may run waited while it retired (rare: every waiting task is placed again).
        self.reschedule_no_worker(cx);
    }

    /// `Client::restart` during a retirement: the workers are being replaced anyway; their
    /// requests end, saying so.
    pub(super) fn restart_cancels_retirement(&mut self, cx: &mut Cx<'_>) {
        for w in self.workers.values_mut() {
            w.retiring = None;
        }
        self.replicating.clear();
        self.copy_failures.clear();
        let mut ops: Vec<u64> = self.retire_ops.keys().copied().collect();
        ops.sort();
        for op in ops {
            self.retire_ops.remove(&op);
            cx.out.push(Command::Retired {
                op,
                workers: Vec::new(),
                refused: Some("the cluster was restarted while the workers retired".into()),
            });
        }
    }

    /// The open worker that should take the next copy: the one holding the fewest bytes
    /// (counting what this round already sends it).
    fn replica_target(&self, planned: &FxHashMap<WorkerId, u64>) -> Option<WorkerId> {
        self.workers
            .iter()
            .filter(|(_, w)| w.open())
            .min_by_key(|(id, w)| (w.nbytes + planned.get(id).copied().unwrap_or(0), **id))
            .map(|(id, _)| *id)
    }

    /// Worker `w` holds nothing that exists only there and runs nothing: close it (or leave
    /// it idle), and answer its request if it was the last.
    fn retired(&mut self, w: WorkerId, cx: &mut Cx<'_>) {
        let Some(r) = self.workers.get(&w).and_then(|x| x.retiring.clone()) else { return };
        let address = self.workers[&w].spec.address.clone();
        // Done: its leaving below is not its request's failure.
        if let Some(x) = self.workers.get_mut(&w).and_then(|x| x.retiring.as_mut()) {
            x.done = true;
        }
        if r.close {
            cx.out.push(Command::CloseWorker {
                worker: w,
                reason: format!("retired: {}", r.reason),
                restart: r.restart,
            });
            self.remove_worker(w, &format!("retired ({})", r.reason), true, cx);
        } else {
            // Its copies exist elsewhere: it drops them and stays, idle.
            let held: Vec<TaskId> = self.workers[&w].has_what.iter().copied().collect();
            for t in held {
                if let TaskState::Memory { who_has, .. } = &mut self.task_mut(t).state {
                    who_has.retain(|x| *x != w);
                }
                let nbytes = match &self.task(t).state {
                    TaskState::Memory { nbytes, .. } => *nbytes,
                    _ => 0,
                };
                let worker = self.workers.get_mut(&w).expect("known worker");
                worker.has_what.remove(&t);
                worker.nbytes = worker.nbytes.saturating_sub(nbytes);
                cx.out.push(Command::Free { worker: w, key: self.task(t).key.clone() });
            }
        }
        cx.out.push(Command::Notice { level: NoticeLevel::Info, message: format!("worker {address} retired") });
        self.retire_op_done(r.op, w, Some(address), cx);
    }

    /// `w` left its request `op`: retired (with its address) or gone otherwise.
    pub(super) fn retire_op_done(&mut self, op: u64, w: WorkerId, address: Option<Arc<str>>, cx: &mut Cx<'_>) {
        let Some(o) = self.retire_ops.get_mut(&op) else { return };
        o.waiting.retain(|x| *x != w);
        if let Some(a) = address {
            o.retired.push(a);
        }
        if o.waiting.is_empty() {
            let o = self.retire_ops.remove(&op).expect("present");
            // Some retired: the answer lists them; none did and some failed: the reasons.
            let refused = (o.retired.is_empty() && !o.failed.is_empty()).then(|| o.failed.join("; "));
            cx.out.push(Command::Retired { op, workers: o.retired, refused });
        }
    }

    /// A worker now holds copies it was sent for safekeeping.
    pub(super) fn replicas_added(&mut self, worker: WorkerId, keys: Vec<(Key, u64)>, cx: &mut Cx<'_>) {
        for (key, _) in keys {
            let Some(&t) = self.keys.get(&key) else {
                cx.out.push(Command::Free { worker, key });
                continue;
            };
            if self.replicating.get(&t) == Some(&worker) {
                self.replicating.remove(&t);
            }
            self.copy_failures.remove(&t);
            match self.task(t).state {
                TaskState::Memory { .. } if self.workers.contains_key(&worker) => {
                    self.add_replica(t, worker);
                    self.copy_arrived(t, worker, true, cx);
                }
                // Released meanwhile: the copy is nobody's.
                _ => cx.out.push(Command::Free { worker, key }),
            }
        }
    }

    /// A worker could not fetch copies it was asked to keep: they are planned again, up to
    /// [`MAX_COPY_FAILURES`] times in a row; then the retirement of the workers holding that value
    /// is given up.
    pub(super) fn replicas_failed(&mut self, worker: WorkerId, keys: Vec<Key>, cx: &mut Cx<'_>) {
        for key in keys {
            let Some(&t) = self.keys.get(&key) else { continue };
            self.copy_arrived(t, worker, false, cx);
            if self.replicating.get(&t) != Some(&worker) {
                continue;
            }
            self.replicating.remove(&t);
            let n = self.copy_failures.entry(t).or_default();
            *n += 1;
            if *n >= MAX_COPY_FAILURES {
                self.copy_failures.remove(&t);
                let holders: Vec<WorkerId> = match &self.task(t).state {
                    TaskState::Memory { who_has, .. } => who_has.to_vec(),
                    _ => Vec::new(),
                };
                let why =
                    format!("its value {key:?} could not be copied to another worker ({MAX_COPY_FAILURES} tries)");
                for h in holders {
                    self.abort_retirement(h, &why, cx);
                }
            }
        }
    }

    /// A worker left: copies it was to take are planned again elsewhere; if it was retiring,
    /// its request no longer waits for it.
    pub(super) fn retire_worker_gone(&mut self, w: WorkerId, retiring: Option<Retiring>, cx: &mut Cx<'_>) {
        self.replicating.retain(|_, target| *target != w);
        if let Some(r) = retiring
            && !r.done
        {
            self.retire_op_done(r.op, w, None, cx);
        }
    }

    /// For `validate`: copies on their way are of values in memory, to live workers.
    pub(super) fn validate_retirement(&self) {
        for (t, w) in &self.replicating {
            assert!(matches!(self.task(*t).state, TaskState::Memory { .. }), "replicating a task not in memory");
            assert!(self.workers.contains_key(w), "replicating to a gone worker");
        }
        for (op, o) in &self.retire_ops {
            for w in &o.waiting {
                let r = self.workers.get(w).and_then(|x| x.retiring.as_ref());
                assert!(r.is_some_and(|r| r.op == *op), "retire op {op} waits for {w}, which is not retiring for it");
            }
        }
    }
}
