//! dask's `Scheduler.adaptive_target`: how many workers the work in hand asks for, and which
//! workers could go, for `Adaptive` (and for dask's Kubernetes operator's `adaptive_target`).
use std::sync::Arc;
use std::time::Duration;

use super::{SchedulerCore, TaskId, WorkerId};

/// Tasks looked at to estimate the queue's work (dask looks at 100 too).
const SAMPLE: usize = 100;

/// Share of the cluster's memory limit in use past which it asks for twice the workers.
const MEMORY_HIGH: f64 = 0.6;

/// What [`SchedulerCore::adaptive_target`] recommends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdaptiveTarget {
    /// Workers wanted.
    pub target: usize,
    /// When fewer are wanted: idle workers to retire (by name), emptiest first.
    pub to_close: Vec<Arc<str>>,
}

impl SchedulerCore {
    /// Workers wanted to finish the work in hand in about `target_duration`: running and queued
    /// tasks by their kinds' measured durations, no more than there are tasks, and twice the
    /// workers when over 60% of their memory limit holds values. Fewer: the idle workers that
    /// can go (their values fit in the others' memory).
    pub fn adaptive_target(&self, target_duration: Duration) -> AdaptiveTarget {
        self.adaptive_target_within(target_duration, 0, usize::MAX)
    }

    /// [`adaptive_target`](Self::adaptive_target) kept within `minimum..=maximum` workers (an
    /// `Adaptive`'s bounds): above the maximum, idle workers are named to go too.
    pub fn adaptive_target_within(&self, target_duration: Duration, minimum: usize, maximum: usize) -> AdaptiveTarget {
        let open: Vec<WorkerId> = self.workers.iter().filter(|(_, w)| w.open()).map(|(id, _)| *id).collect();
        let n = open.len();
        let target_ns = target_duration.as_nanos().max(1) as f64;
        // Work waiting: a sample of the queue and of the tasks no worker can take now.
        let waiting: Vec<TaskId> =
            self.queue.iter().take(SAMPLE).chain(self.no_worker.iter().copied().take(SAMPLE)).collect();
        let ready = self.queue.len() + self.no_worker.len();
        let mut queued_ns: f64 = waiting.iter().take(SAMPLE).map(|t| self.expected_ns(*t)).sum();
        if ready > SAMPLE {
            queued_ns *= ready as f64 / SAMPLE as f64;
        }
        let mut running_ns = 0.0;
        let mut tasks = ready;
        for (_, w) in self.workers.iter() {
            running_ns += w.processing.iter().map(|t| self.expected_ns(*t)).sum::<f64>();
            tasks += w.processing.len();
        }
        let mut cpu = ((running_ns + queued_ns) / target_ns).ceil() as usize;
        // A few long tasks do not ask for more workers than there are tasks.
        cpu = cpu.min(tasks);
        // From threads to workers, by the threads workers have on average.
        let threads: usize = open.iter().map(|id| self.workers[id].spec.nthreads.max(1) as usize).sum();
        if n > 0 && threads > 0 {
            cpu = (cpu * n).div_ceil(threads);
        }
        if ready > 0 && n == 0 {
            cpu = cpu.max(1);
        }
        let limit: u64 = open.iter().map(|id| self.workers[id].spec.memory_limit).sum();
        let used: u64 = open.iter().map(|id| self.workers[id].nbytes).sum();
        let memory = if limit > 0 && used as f64 > MEMORY_HIGH * limit as f64 { 2 * n } else { 0 };
        let target = cpu.max(memory).clamp(minimum, maximum.max(minimum));
        if target >= n {
            return AdaptiveTarget { target, to_close: Vec::new() };
        }
        let to_close = self.idle_to_close(&open, n - target);
        AdaptiveTarget { target: n - to_close.len(), to_close }
    }

    /// Up to `n` idle workers of `open` whose values the others can take, emptiest first.
    fn idle_to_close(&self, open: &[WorkerId], n: usize) -> Vec<Arc<str>> {
        let mut idle: Vec<(u64, WorkerId)> = open
            .iter()
            .map(|id| (id, &self.workers[id]))
            .filter(|(_, w)| w.processing.is_empty())
            .map(|(id, w)| (w.nbytes, *id))
            .collect();
        idle.sort();
        // Room of the open workers, kept up to date as some are picked (linear, not cubic, in
        // workers: the HTTP side asks for the target often).
        let room_of = |id: &WorkerId| {
            let w = &self.workers[id];
            (w.spec.memory_limit > 0).then(|| w.spec.memory_limit.saturating_sub(w.nbytes))
        };
        let mut room: u64 = open.iter().filter_map(room_of).sum();
        let mut unbounded = open.iter().filter(|id| room_of(id).is_none()).count();
        let mut closing: Vec<WorkerId> = Vec::new();
        for (nbytes, id) in idle {
            if closing.len() == n {
                break;
            }
            // Its values need a worker that stays, with room for them (no limit: room enough).
            let mine = room_of(&id);
            let staying = open.len() - closing.len() - 1;
            let staying_unbounded = unbounded - usize::from(mine.is_none());
            let staying_room = room - mine.unwrap_or(0);
            if nbytes > 0 && (staying == 0 || (staying_unbounded == 0 && staying_room < nbytes)) {
                continue;
            }
            room = staying_room;
            unbounded = staying_unbounded;
            closing.push(id);
        }
        closing.iter().map(|id| self.workers[id].spec.name.clone()).collect()
    }
}
