//! `Adaptive`: scales a cluster with the work in hand (dask's `cluster.adapt(...)`), from the
//! scheduler's `adaptive_target`.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use dask_client::{Error, Result};

use crate::pool::Pool;

/// dask's `adapt` keyword arguments.
#[derive(Clone, Debug)]
pub struct AdaptOptions {
    /// Fewest workers (default 0).
    pub minimum: usize,
    /// Most workers (default: no bound).
    pub maximum: usize,
    /// Bounds in threads, turned into workers by the threads of each.
    pub minimum_cores: Option<usize>,
    pub maximum_cores: Option<usize>,
    /// Bounds in bytes of memory limit, turned into workers by the limit of each (ignored for
    /// workers without a limit).
    pub minimum_memory: Option<u64>,
    pub maximum_memory: Option<u64>,
    /// Aim to finish the work in hand in about this long (default 5 s).
    pub target_duration: Duration,
    /// A worker is retired once recommended this many times in a row (default 3).
    pub wait_count: u32,
    /// How often to look (default 1 s).
    pub interval: Duration,
}

impl Default for AdaptOptions {
    fn default() -> Self {
        AdaptOptions {
            minimum: 0,
            maximum: usize::MAX,
            minimum_cores: None,
            maximum_cores: None,
            minimum_memory: None,
            maximum_memory: None,
            target_duration: Duration::from_secs(5),
            wait_count: 3,
            interval: Duration::from_secs(1),
        }
    }
}

impl AdaptOptions {
    pub(crate) fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidArgument(format!("adapt: {why}")));
        if self.minimum > self.maximum {
            return bad(format!("minimum ({}) is above maximum ({})", self.minimum, self.maximum));
        }
        if let (Some(a), Some(b)) = (self.minimum_cores, self.maximum_cores)
            && a > b
        {
            return bad(format!("minimum_cores ({a}) is above maximum_cores ({b})"));
        }
        if let (Some(a), Some(b)) = (self.minimum_memory, self.maximum_memory)
            && a > b
        {
            return bad(format!("minimum_memory ({a}) is above maximum_memory ({b})"));
        }
        if self.interval.is_zero() || self.target_duration.is_zero() {
            return bad("interval and target_duration must be above zero".into());
        }
        Ok(())
    }

    /// The bounds in workers, for workers of `threads` threads and `memory` bytes.
    fn bounds(&self, threads: usize, memory: u64) -> (usize, usize) {
        let threads = threads.max(1);
        let mut lo = self.minimum;
        let mut hi = self.maximum;
        if let Some(c) = self.minimum_cores {
            lo = lo.max(c.div_ceil(threads));
        }
        if let Some(c) = self.maximum_cores {
            hi = hi.min(c / threads);
        }
        if memory > 0 {
            if let Some(m) = self.minimum_memory {
                lo = lo.max(m.div_ceil(memory) as usize);
            }
            if let Some(m) = self.maximum_memory {
                hi = hi.min((m / memory) as usize);
            }
        }
        (lo.min(hi), hi)
    }
}

/// What to do now (dask's `Adaptive.recommendations`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recommendation {
    Same,
    /// Run this many workers.
    Up(usize),
    /// Retire these workers.
    Down(Vec<String>),
}

/// dask's `Adaptive` decision: up at once to the scheduler's target; down only by workers the
/// scheduler named as idle `wait_count` times in a row (a lull between two bursts retires
/// nobody).
#[derive(Clone, Debug)]
pub struct Recommender {
    recommended: HashMap<String, u32>,
    wait_count: u32,
}

impl Recommender {
    pub fn new(wait_count: u32) -> Recommender {
        Recommender { recommended: HashMap::new(), wait_count: wait_count.max(1) }
    }

    /// `running` workers now; the scheduler wants `target` and could spare `to_close`.
    pub fn recommend(&mut self, running: usize, target: usize, to_close: &[String]) -> Recommendation {
        if target > running {
            self.recommended.clear();
            return Recommendation::Up(target);
        }
        if target == running {
            self.recommended.clear();
            return Recommendation::Same;
        }
        self.recommended.retain(|name, _| to_close.contains(name));
        for name in to_close {
            *self.recommended.entry(name.clone()).or_insert(0) += 1;
        }
        let mut ready: Vec<String> =
            self.recommended.iter().filter(|(_, c)| **c >= self.wait_count).map(|(n, _)| n.clone()).collect();
        ready.sort();
        ready.truncate(running - target);
        for name in &ready {
            self.recommended.remove(name);
        }
        if ready.is_empty() { Recommendation::Same } else { Recommendation::Down(ready) }
    }
}

/// Looks every `interval` until `stop`.
pub(crate) async fn run(pool: Arc<Pool>, options: AdaptOptions, stop: CancellationToken) {
    let (threads, memory) = pool.worker_size();
    let (lo, hi) = options.bounds(threads, memory);
    let mut rec = Recommender::new(options.wait_count);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(options.interval) => {}
        }
        let Some(t) = pool.sched.adaptive_target(options.target_duration, lo, hi).await else { return };
        let n = pool.len();
        match rec.recommend(n, (t.target as usize).clamp(lo, hi), &t.to_close) {
            Recommendation::Same => {}
            Recommendation::Up(target) => {
                tracing::info!(from = n, to = target, "adaptive: scaling up");
                if let Err(e) = pool.start(target - n).await {
                    tracing::warn!(error = %e, "adaptive: scaling up failed");
                }
            }
            Recommendation::Down(ready) => {
                tracing::info!(from = n, workers = ?ready, "adaptive: retiring idle workers");
                if let Err(e) = pool.retire(&ready).await {
                    tracing::warn!(error = %e, "adaptive: retiring failed");
                }
            }
        }
    }
}

/// A cluster manager of one's own that [`Adaptive`] can resize (dask's `Cluster` with
/// `scale_up` and `scale_down`): e.g. one that starts workers through a batch system.
pub trait ScalableCluster: Send + Sync + 'static {
    /// Workers it runs now.
    fn workers(&self) -> usize;
    /// Threads and memory limit (0: none) of each worker it starts, for the core and memory
    /// bounds of [`AdaptOptions`].
    fn worker_size(&self) -> (usize, u64) {
        (1, 0)
    }
    /// Run `n` workers in all.
    fn scale_up(&self, n: usize) -> Result<()>;
    /// Retire these workers (names or addresses, as the scheduler gave them).
    fn scale_down(&self, workers: &[String]) -> Result<()>;
}

/// dask's `Adaptive` for any [`ScalableCluster`]: every `interval` it asks the scheduler for
/// its target ([`Client::adaptive_target`](dask_client::Client::adaptive_target)) and scales
/// the cluster up, or down by the idle workers the scheduler names (see [`Recommender`]).
/// Stops when dropped.
#[derive(Debug)]
pub struct Adaptive {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Adaptive {
    pub fn start(
        client: dask_client::Client,
        cluster: Arc<dyn ScalableCluster>,
        options: AdaptOptions,
    ) -> Result<Adaptive> {
        options.check()?;
        let (threads, memory) = cluster.worker_size();
        let (lo, hi) = options.bounds(threads, memory);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("dask-adaptive".into())
            .spawn(move || {
                let mut rec = Recommender::new(options.wait_count);
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(options.interval) {
                    let (target, to_close) = match client.adaptive_target(options.target_duration, lo, hi) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::warn!(error = %e, "adaptive: the scheduler gave no target");
                            continue;
                        }
                    };
                    let n = cluster.workers();
                    let r = match rec.recommend(n, target.clamp(lo, hi), &to_close) {
                        Recommendation::Same => Ok(()),
                        Recommendation::Up(target) => cluster.scale_up(target),
                        Recommendation::Down(workers) => cluster.scale_down(&workers),
                    };
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "adaptive: scaling failed");
                    }
                }
            })
            .map_err(|e| Error::Cluster(format!("could not start the adaptive thread: {e}")))?;
        Ok(Adaptive { stop: Some(stop), thread: Some(thread) })
    }

    /// Stops adapting (the cluster stays as it is).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Adaptive {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn up_at_once_down_only_after_wait_count_looks() {
        let mut r = Recommender::new(3);
        assert_eq!(r.recommend(1, 4, &[]), Recommendation::Up(4));
        assert_eq!(r.recommend(4, 4, &[]), Recommendation::Same);
        let idle = names(&["a", "b", "c"]);
        assert_eq!(r.recommend(4, 2, &idle), Recommendation::Same);
        assert_eq!(r.recommend(4, 2, &idle), Recommendation::Same);
        // Third time in a row: two go (no more than the target asks), in name order.
        assert_eq!(r.recommend(4, 2, &idle), Recommendation::Down(names(&["a", "b"])));
        // A worker no longer named idle starts counting again.
        let mut r = Recommender::new(2);
        assert_eq!(r.recommend(3, 1, &names(&["a", "b"])), Recommendation::Same);
        assert_eq!(r.recommend(3, 1, &names(&["b"])), Recommendation::Down(names(&["b"])));
        assert_eq!(r.recommend(2, 1, &names(&["a"])), Recommendation::Same, "a's count began again");
        // Work coming back clears every count.
        assert_eq!(r.recommend(2, 3, &[]), Recommendation::Up(3));
        assert_eq!(r.recommend(3, 1, &names(&["a"])), Recommendation::Same);
    }
}
