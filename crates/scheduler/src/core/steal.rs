//! Work stealing: tasks assigned to a busy worker but not started there move to a worker with
//! idle threads.
//!
//! Our workers hold few tasks beyond what their threads run (the slot limit keeps the rest in the
//! scheduler's queue, where any worker takes them), so stealing is for what the slot limit
//! cannot foresee: a worker that joins while others hold their slots, a worker slower than the
//! rest, durations that change after they were measured. See docs/scheduler.md.
//!
//! # When
//! A worker with an idle thread and nothing left in the queue looks at the busiest workers (at
//! the end of any event that freed one of its slots, and on every tick). A victim's *excess* is
//! what it holds beyond one task per thread, less what is already being stolen from it.
//!
//! # What
//! Tasks not known to have started, that the thief may run (hard restrictions hold; loose ones
//! may move), expected to take at least two handshakes (`2 × steal_latency`), the latest first
//! (they would start last on the victim). A task moves if it would finish sooner on the thief:
//! there after its inputs arrive (bytes over the configured bandwidth, plus a fixed latency)
//! and after what the thief holds beyond its threads; on the victim after the rest of its
//! excess; each at the measured duration of its kind over the worker's measured speed. The thief
//! takes at most its share of the excess by threads (and its own slot limit), so two workers do
//! not trade the same tasks back and forth.
//!
//! # The handshake
//! ```text
//!   Processing{victim} --balance--> Processing{victim} + Steal{id, thief}  (Command::Steal to the victim)
//!        |  the victim answers (StealResponse with the same id):
//!        |    stolen: it had not started it and dropped it --> Processing{thief} (or placed afresh
//!        |            if the thief left, paused or may no longer run it)
//!        |    not stolen: it runs (or ran) it --> stays; marked started, never asked again
//!        |  meanwhile the task finishes, fails, is released, or the victim dies: it leaves
//!        |  Processing{victim}, the steal is forgotten, and a late answer is ignored (ids differ)
//! ```
//! A task is never run twice because of a steal: it moves only once its victim said it dropped
//! it unstarted.

use super::{Command, Cx, Key, OCCUPANCY_PER_THREAD, SchedulerCore, TaskId, TaskState, Worker, WorkerId};

/// What stealing did so far (for `scheduler_info` and the benchmarks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StealStats {
    /// Steals asked of victims.
    pub asked: u64,
    /// Tasks that moved.
    pub stolen: u64,
    /// Asked, but the victim had started the task.
    pub refused: u64,
}

/// A steal asked of a victim and not yet answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Steal {
    pub(super) id: u64,
    pub(super) victim: WorkerId,
    pub(super) thief: WorkerId,
}

/// Busiest workers a thief looks at.
const VICTIMS: usize = 4;
/// Tasks of one victim looked at per attempt (a victim holds at most its slot limit).
const CANDIDATES: usize = 256;

/// Threads of `w` with nothing to run, counting tasks on their way to it.
fn idle_threads(w: &Worker) -> usize {
    (w.spec.nthreads.max(1) as usize).saturating_sub(w.busy() + w.steals_in as usize)
}

/// Tasks `w` holds beyond one per thread, less those being stolen from it.
fn excess(w: &Worker) -> usize {
    let threads = if w.open() { w.spec.nthreads.max(1) as usize } else { 0 };
    w.busy().saturating_sub(threads + w.steals_out as usize)
}

impl SchedulerCore {
    /// `thief` has idle threads and the queue is empty: asks the busiest workers for tasks.
    /// `also`: more victims to look at (workers that take no new work, which are not ranked by
    /// occupancy).
    pub(super) fn balance(&mut self, thief: WorkerId, also: &[WorkerId], cx: &mut Cx<'_>) {
        if !self.config.work_stealing || !self.queue.is_empty() {
            return;
        }
        let Some(w) = self.workers.get(&thief) else { return };
        let mut idle = if w.open() { idle_threads(w) } else { 0 };
        if idle == 0 || !self.any_excess(also) {
            return;
        }
        let victims: Vec<WorkerId> = self
            .by_occupancy
            .iter()
            .rev()
            .map(|(_, v)| *v)
            .filter(|v| *v != thief)
            .take(VICTIMS)
            .chain(also.iter().copied())
            .collect();
        for victim in victims {
            if idle == 0 {
                break;
            }
            let asked = self.steal_from(victim, thief, idle, cx);
            idle = idle.saturating_sub(asked);
        }
    }

    /// Steals tasks of `victim` for `thief` (`idle` threads); returns how many it asked for.
    fn steal_from(&mut self, victim: WorkerId, thief: WorkerId, idle: usize, cx: &mut Cx<'_>) -> usize {
        let (Some(v), Some(th)) = (self.workers.get(&victim), self.workers.get(&thief)) else {
            return 0;
        };
        let excess = excess(v);
        if excess == 0 {
            return 0;
        }
        // Tasks shorter than two handshakes are not worth moving: the victim runs them sooner
        // than the thief would get them (and for tasks of microseconds the scheduler's own
        // work per steal would cost more than it saves; dask's floor is 5 ms).
        let floor = 2.0 * self.config.steal_latency.as_nanos() as f64;
        let vthreads = v.spec.nthreads.max(1) as f64;
        let tthreads = th.spec.nthreads.max(1) as usize;
        let held = th.busy() + th.steals_in as usize;
        let (vspeed, tspeed) = (v.log_speed.exp(), th.log_speed.exp());
        // Latest first: they would start last there. A worker's tasks are mostly of a few
        // kinds: after 16 too short to move and none worth it, the rest are not looked at (a
        // victim holding 1,000 tasks of microseconds was scanned on every completion).
        let mut candidates: Vec<(u64, TaskId)> = Vec::new();
        let mut short = 0;
        for &t in v.processing.iter().filter(|t| !v.long_running.contains(t)).take(CANDIDATES) {
            let task = self.task(t);
            if self.expected_ns(t) < floor {
                short += 1;
                if short >= 16 && candidates.is_empty() {
                    break;
                }
            } else if !task.started && !self.steals.contains_key(&t) && self.may_run(task, th) {
                candidates.push((task.order, t));
            }
        }
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        // Its share of the excess by threads, so that both end up as busy (at least one task,
        // as the thief is idle).
        let share = (excess * tthreads / (tthreads + v.spec.nthreads.max(1) as usize)).max(1);
        let mut chosen: Vec<TaskId> = Vec::with_capacity(share.min(idle * 8));
        // Resources of tasks on their way to the thief (asked now or earlier) count as held.
        let mut reserved: Vec<(Key, f64)> = Vec::new();
        if th.steals_in > 0 {
            for (s, st) in &self.steals {
                if st.thief == thief
                    && let Some(r) = &self.task(*s).restrictions
                {
                    reserved.extend(r.resources.iter().cloned());
                }
            }
        }
        for (i, (_, t)) in candidates.into_iter().enumerate() {
            // No more than the thief's own slot limit for tasks of this kind.
            let room = tthreads * self.depth(self.task(t).prefix) as usize;
            if chosen.len() == share || held + chosen.len() >= room {
                break;
            }
            // On the victim it waits behind the rest of the excess and the tasks running there;
            // on the thief, for its inputs and whatever the thief holds beyond its threads. Each
            // runs at its worker's measured speed.
            let d = self.expected_ns(t);
            let ahead = excess.saturating_sub(i + 1) as f64 + 1.0;
            let victim_done = (ahead * d / vthreads + d) / vspeed;
            let queued = (held + chosen.len()).saturating_sub(tthreads) as f64;
            let thief_done = self.transfer_ns(t, thief) + (queued * d / tthreads as f64 + d) / tspeed;
            if thief_done >= victim_done {
                continue;
            }
            // Resources: what the tasks chosen so far will hold there counts too (each was
            // checked free on its own).
            if let Some(r) = self.task(t).restrictions.as_ref().filter(|r| !r.resources.is_empty()) {
                let th = &self.workers[&thief];
                let fits = r.resources.iter().all(|(n, amount)| {
                    let (total, used) = th.resource(n);
                    let taken: f64 = reserved.iter().filter(|(m, _)| m == n).map(|(_, a)| a).sum();
                    total - used - taken >= amount - super::RESOURCE_EPSILON
                });
                if !fits {
                    continue;
                }
                reserved.extend(r.resources.iter().cloned());
            }
            chosen.push(t);
        }
        for &t in &chosen {
            self.next_steal += 1;
            let id = self.next_steal;
            self.steals.insert(t, Steal { id, victim, thief });
            self.workers.get_mut(&victim).expect("victim").steals_out += 1;
            self.workers.get_mut(&thief).expect("thief").steals_in += 1;
            cx.out.push(Command::Steal { worker: victim, key: self.task(t).key.clone(), id });
        }
        self.stats.asked += chosen.len() as u64;
        chosen.len()
    }

    /// Expected run time of `t`: the measured average of its kind.
    pub(super) fn expected_ns(&self, t: TaskId) -> f64 {
        let p = &self.prefixes[self.task(t).prefix as usize];
        p.avg_ns.unwrap_or(self.config.unknown_duration.as_nanos() as f64)
    }

    /// Time to bring `t`'s inputs that `w` lacks to it: bytes over bandwidth, plus latency.
    fn transfer_ns(&self, t: TaskId, w: WorkerId) -> f64 {
        let mut bytes = 0u64;
        for &d in self.task(t).dependencies.iter() {
            if let TaskState::Memory { nbytes, who_has } = &self.task(d).state
                && !who_has.contains(&w)
            {
                bytes += nbytes;
            }
        }
        let latency = self.config.steal_latency.as_nanos() as f64;
        latency + bytes as f64 * 1e9 / self.config.bandwidth.max(1) as f64
    }

    /// The victim's answer to [`Command::Steal`].
    pub(super) fn steal_response(&mut self, victim: WorkerId, key: Key, id: u64, stolen: bool, cx: &mut Cx<'_>) {
        let Some(&t) = self.keys.get(&key) else { return };
        match self.steals.get(&t) {
            Some(s) if s.id == id && s.victim == victim => {}
            // Answer to a steal already settled (the task left the victim meanwhile).
            _ => return,
        }
        let s = self.forget_steal(t, cx).expect("present");
        if !stolen {
            // It runs there (or already ran): never ask again.
            self.stats.refused += 1;
            self.task_mut(t).started = true;
            return;
        }
        self.stats.stolen += 1;
        let thief_ok = self.workers.get(&s.thief).is_some_and(|w| self.may_run(self.task(t), w));
        if thief_ok {
            self.set_state(t, TaskState::Processing { worker: s.thief }, cx);
        } else {
            // The victim dropped it: it leaves the victim (giving back what it held there), then
            // goes wherever it fits now, as any task that has to wait would.
            self.set_state(t, TaskState::NoWorker, cx);
            self.schedule(t, cx);
        }
    }

    /// Ends the steal of `t`, if one is asked; returns it. The thief looks for work again at
    /// the event's end (an idle thief has no completions of its own to make it look).
    pub(super) fn forget_steal(&mut self, t: TaskId, cx: &mut Cx<'_>) -> Option<Steal> {
        let s = self.steals.remove(&t)?;
        if let Some(v) = self.workers.get_mut(&s.victim) {
            v.steals_out -= 1;
        }
        if let Some(th) = self.workers.get_mut(&s.thief) {
            th.steals_in -= 1;
            cx.freed.push(s.thief);
        }
        Some(s)
    }

    /// Every open worker with an idle thread looks for work (on a tick: catches what the
    /// event-driven attempts missed, e.g. a victim that paused).
    pub(super) fn balance_all(&mut self, cx: &mut Cx<'_>) {
        if !self.config.work_stealing || !self.queue.is_empty() || self.steals.len() > self.workers.len() {
            return;
        }
        // Paused or retiring workers start nothing new: what they hold beyond their running
        // tasks is theirs to give.
        let closed: Vec<WorkerId> = if self.workers.len() > self.by_occupancy.len() {
            self.workers.iter().filter(|(_, w)| !w.open() && excess(w) > 0).map(|(id, _)| *id).collect()
        } else {
            Vec::new()
        };
        // Most of the time nobody holds more than its threads run: nothing to look at (a scan
        // of every worker per event would cost more than the rest of the scheduler at 10,000).
        if !self.any_excess(&closed) {
            return;
        }
        let idle: Vec<WorkerId> =
            self.workers.iter().filter(|(_, w)| w.open() && idle_threads(w) > 0).map(|(id, _)| *id).collect();
        for w in idle {
            self.balance(w, &closed, cx);
            if !self.any_excess(&closed) {
                break;
            }
        }
    }

    /// Whether one of the busiest open workers, or of `closed`, holds tasks beyond its threads
    /// that are not being stolen already.
    fn any_excess(&self, closed: &[WorkerId]) -> bool {
        self.by_occupancy
            .iter()
            .rev()
            .take_while(|(occupancy, _)| *occupancy > OCCUPANCY_PER_THREAD)
            .take(VICTIMS)
            .any(|(_, v)| excess(&self.workers[v]) > 0)
            || closed.iter().any(|v| self.workers.get(v).is_some_and(|w| excess(w) > 0))
    }

    pub(super) fn validate_steals(&self) {
        for (t, s) in &self.steals {
            let key = &self.task(*t).key;
            assert_eq!(self.task(*t).state, TaskState::Processing { worker: s.victim }, "{key}: stolen from elsewhere");
            assert_ne!(s.victim, s.thief, "{key}: stolen by its own worker");
        }
        for (id, w) in self.workers.iter() {
            let out = self.steals.values().filter(|s| s.victim == *id).count();
            let inn = self.steals.values().filter(|s| s.thief == *id).count();
            assert_eq!(w.steals_out as usize, out, "{id}: steals out");
            assert_eq!(w.steals_in as usize, inn, "{id}: steals in");
        }
    }
}
