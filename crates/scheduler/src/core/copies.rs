//! `Client::replicate` and `Client::rebalance`: one-shot copies of values between workers, as
//! dask does them. A worker is asked to fetch a value and keep it ([`Command::AcquireReplicas`],
//! the safekeeping copies retirement uses); once it has, the scheduler counts the replica (and,
//! for a rebalance, drops the one on the worker it moved from). Nothing re-replicates later:
//! after a loss the records stay right (replicas are removed with their worker), and that is all.
//!
//! An operation is answered ([`Command::CopiesDone`]) when every copy it asked for arrived or
//! failed (the value was released meanwhile, the target or every holder left, the fetch failed).

use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;

use super::{Command, Cx, DepLocation, Key, SchedulerCore, TaskId, TaskState, WorkerId};

/// A replicate or rebalance waiting for its copies.
#[derive(Default)]
pub(super) struct CopyOp {
    /// Copies asked for and not yet arrived: (value, target).
    pending: FxHashSet<(TaskId, WorkerId)>,
    /// For a rebalance: the worker each copy moves the value away from.
    from: FxHashMap<(TaskId, WorkerId), WorkerId>,
    failed: u32,
}

impl SchedulerCore {
    /// Copies each value of `keys` in memory until `n` workers of `workers` hold it (every one of
    /// them if `n` is `None`), or drops copies beyond `n` (dask's `replicate`). `workers` empty:
    /// every worker that takes work. Values not in memory are skipped.
    pub(super) fn replicate(
        &mut self,
        op: u64,
        keys: Vec<Key>,
        n: Option<usize>,
        workers: Vec<WorkerId>,
        cx: &mut Cx<'_>,
    ) {
        let pool = self.copy_pool(&workers);
        let mut plan: FxHashMap<WorkerId, Vec<DepLocation>> = FxHashMap::default();
        let mut o = CopyOp::default();
        let mut tasks: Vec<TaskId> = keys.iter().filter_map(|k| self.keys.get(k).copied()).collect();
        tasks.sort();
        tasks.dedup();
        for t in tasks {
            let TaskState::Memory { who_has, nbytes } = &self.task(t).state else { continue };
            let nbytes = *nbytes;
            let holders: SmallVec<[WorkerId; 4]> = who_has.iter().copied().filter(|w| pool.contains(w)).collect();
            let want = n.unwrap_or(pool.len()).min(pool.len()).max(1);
            if holders.len() > want {
                // More copies than asked: drop those on the workers holding the most.
                let mut extra: Vec<WorkerId> = holders.to_vec();
                extra.sort_by_key(|w| (std::cmp::Reverse(self.workers[w].nbytes), *w));
                for w in extra.into_iter().take(holders.len() - want) {
                    self.drop_replica(t, w, cx);
                }
                continue;
            }
            // Copies already on their way (for another request) count as made.
            let coming: SmallVec<[WorkerId; 4]> = self.copy_waiters.get(&t).map_or_else(SmallVec::new, |v| {
                v.iter().map(|(w, _)| *w).filter(|w| pool.contains(w) && !who_has.contains(w)).collect()
            });
            let have = holders.len() + coming.iter().collect::<FxHashSet<_>>().len();
            let mut targets: Vec<WorkerId> =
                pool.iter().copied().filter(|w| !who_has.contains(w) && !coming.contains(w)).collect();
            targets.sort_by_key(|w| (self.workers[w].nbytes, *w));
            for target in targets.into_iter().take(want.saturating_sub(have)) {
                self.plan_copy(t, target, nbytes, &mut plan);
                o.pending.insert((t, target));
            }
        }
        self.start_copies(op, o, plan, cx);
    }

    /// Moves values of `keys` (every value in memory if empty) among `workers` (every worker
    /// that takes work if empty) so that each holds about the same bytes of them: from the
    /// most loaded, largest values first, to the least loaded.
    pub(super) fn rebalance(&mut self, op: u64, keys: Vec<Key>, workers: Vec<WorkerId>, cx: &mut Cx<'_>) {
        let pool = self.copy_pool(&workers);
        let chosen: Option<FxHashSet<TaskId>> =
            (!keys.is_empty()).then(|| keys.iter().filter_map(|k| self.keys.get(k).copied()).collect());
        let mut load: Vec<(WorkerId, u64)> = pool
            .iter()
            .map(|w| {
                let bytes = self.workers[w]
                    .has_what
                    .iter()
                    .filter(|t| chosen.as_ref().is_none_or(|c| c.contains(t)))
                    .map(|t| self.nbytes_of(*t))
                    .sum();
                (*w, bytes)
            })
            .collect();
        let mut plan: FxHashMap<WorkerId, Vec<DepLocation>> = FxHashMap::default();
        let mut o = CopyOp::default();
        if load.len() > 1 {
            let mean = load.iter().map(|(_, b)| *b).sum::<u64>() / load.len() as u64;
            load.sort_by_key(|(w, b)| (std::cmp::Reverse(*b), *w));
            for i in 0..load.len() {
                let (sender, _) = load[i];
                let mut values: Vec<(u64, TaskId)> = self.workers[&sender]
                    .has_what
                    .iter()
                    .filter(|t| chosen.as_ref().is_none_or(|c| c.contains(t)))
                    .map(|t| (self.nbytes_of(*t), *t))
                    .collect();
                values.sort_by_key(|(b, t)| (std::cmp::Reverse(*b), *t));
                for (nbytes, t) in values {
                    if load[i].1 <= mean {
                        break;
                    }
                    // The least loaded worker that lacks it and would not go past the mean by
                    // more than half the value.
                    let holders = match &self.task(t).state {
                        TaskState::Memory { who_has, .. } => who_has.clone(),
                        _ => continue,
                    };
                    let Some(j) = (0..load.len())
                        .filter(|j| *j != i && !holders.contains(&load[*j].0))
                        .filter(|j| load[*j].1 + nbytes / 2 <= mean)
                        .min_by_key(|j| (load[*j].1, load[*j].0))
                    else {
                        continue;
                    };
                    let target = load[j].0;
                    load[j].1 += nbytes;
                    load[i].1 -= nbytes;
                    self.plan_copy(t, target, nbytes, &mut plan);
                    o.pending.insert((t, target));
                    o.from.insert((t, target), sender);
                }
            }
        }
        self.start_copies(op, o, plan, cx);
    }

    /// Workers a copy may go to: those named (that take work), or every one that does.
    fn copy_pool(&self, workers: &[WorkerId]) -> Vec<WorkerId> {
        let open = |w: &WorkerId| self.workers.get(w).is_some_and(|x| x.open());
        if workers.is_empty() {
            self.workers.iter().filter(|(_, w)| w.open()).map(|(id, _)| *id).collect()
        } else {
            let mut ws: Vec<WorkerId> = workers.iter().copied().filter(open).collect();
            ws.sort();
            ws.dedup();
            ws
        }
    }

    fn nbytes_of(&self, t: TaskId) -> u64 {
        match &self.task(t).state {
            TaskState::Memory { nbytes, .. } => *nbytes,
            _ => 0,
        }
    }

    fn plan_copy(&self, t: TaskId, target: WorkerId, nbytes: u64, plan: &mut FxHashMap<WorkerId, Vec<DepLocation>>) {
        let TaskState::Memory { who_has, .. } = &self.task(t).state else { return };
        let workers = who_has.iter().map(|h| self.workers[h].spec.address.clone()).collect();
        plan.entry(target).or_default().push(DepLocation { key: self.task(t).key.clone(), workers, nbytes });
    }

    fn start_copies(&mut self, op: u64, o: CopyOp, plan: FxHashMap<WorkerId, Vec<DepLocation>>, cx: &mut Cx<'_>) {
        for &(t, w) in &o.pending {
            self.copy_waiters.entry(t).or_default().push((w, op));
        }
        let mut plan: Vec<(WorkerId, Vec<DepLocation>)> = plan.into_iter().collect();
        plan.sort_by_key(|(w, _)| *w);
        for (worker, keys) in plan {
            cx.out.push(Command::AcquireReplicas { worker, keys });
        }
        self.copy_ops.insert(op, o);
        self.copy_op_check(op, cx);
    }

    /// Drops `w`'s replica of `t` (another worker holds it too).
    fn drop_replica(&mut self, t: TaskId, w: WorkerId, cx: &mut Cx<'_>) {
        let key = self.task(t).key.clone();
        let TaskState::Memory { who_has, nbytes } = &mut self.task_mut(t).state else { return };
        if who_has.len() < 2 || !who_has.contains(&w) {
            return;
        }
        who_has.retain(|x| *x != w);
        let nbytes = *nbytes;
        if let Some(worker) = self.workers.get_mut(&w) {
            worker.has_what.remove(&t);
            worker.nbytes -= nbytes;
        }
        cx.out.push(Command::Free { worker: w, key });
    }

    /// A copy for an operation arrived at `w` (`ok`), or will not.
    pub(super) fn copy_arrived(&mut self, t: TaskId, w: WorkerId, ok: bool, cx: &mut Cx<'_>) {
        let Some(waiters) = self.copy_waiters.get_mut(&t) else { return };
        let mine: Vec<u64> = waiters.iter().filter(|(x, _)| *x == w).map(|(_, op)| *op).collect();
        waiters.retain(|(x, _)| *x != w);
        if waiters.is_empty() {
            self.copy_waiters.remove(&t);
        }
        for op in mine {
            let Some(o) = self.copy_ops.get_mut(&op) else { continue };
            o.pending.remove(&(t, w));
            let from = o.from.remove(&(t, w));
            if !ok {
                o.failed += 1;
            } else if let Some(from) = from
                && self.workers.get(&w).is_some_and(|x| !x.closing)
            {
                // Moved: the copy where it was goes (not if the new holder is leaving).
                self.drop_replica(t, from, cx);
            }
            self.copy_op_check(op, cx);
        }
    }

    /// Copies of `t` that will not come (it left memory), or to `w` (it left).
    pub(super) fn copies_lost(&mut self, t: Option<TaskId>, w: Option<WorkerId>, cx: &mut Cx<'_>) {
        let lost: Vec<(TaskId, WorkerId)> = match (t, w) {
            (Some(t), _) => {
                self.copy_waiters.get(&t).map_or_else(Vec::new, |v| v.iter().map(|(w, _)| (t, *w)).collect())
            }
            (None, Some(w)) => self
                .copy_waiters
                .iter()
                .flat_map(|(t, v)| v.iter().filter(|(x, _)| *x == w).map(|(x, _)| (*t, *x)))
                .collect(),
            (None, None) => Vec::new(),
        };
        for (t, w) in lost {
            self.copy_arrived(t, w, false, cx);
        }
    }

    fn copy_op_check(&mut self, op: u64, cx: &mut Cx<'_>) {
        if self.copy_ops.get(&op).is_some_and(|o| o.pending.is_empty()) {
            let o = self.copy_ops.remove(&op).expect("present");
            cx.out.push(Command::CopiesDone { op, failed: o.failed });
        }
    }

    /// Every operation ends (a restart forgets every value).
    pub(super) fn restart_ends_copies(&mut self, cx: &mut Cx<'_>) {
        let mut ops: Vec<(u64, CopyOp)> = self.copy_ops.drain().collect();
        ops.sort_by_key(|(op, _)| *op);
        for (op, o) in ops {
            cx.out.push(Command::CopiesDone { op, failed: o.failed + o.pending.len() as u32 });
        }
        self.copy_waiters.clear();
    }

    pub(super) fn validate_copies(&self) {
        let mut n = 0;
        for (t, v) in &self.copy_waiters {
            assert!(matches!(self.task(*t).state, TaskState::Memory { .. }), "a copy awaited of a value not in memory");
            for (w, op) in v {
                n += 1;
                assert!(self.workers.contains_key(w), "a copy awaited at a gone worker");
                assert!(self.copy_ops.get(op).is_some_and(|o| o.pending.contains(&(*t, *w))), "copy op {op}");
            }
        }
        assert_eq!(n, self.copy_ops.values().map(|o| o.pending.len()).sum::<usize>(), "copies awaited");
    }
}
