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

/// Looks every `interval` until `stop`.
pub(crate) async fn run(pool: Arc<Pool>, options: AdaptOptions, stop: CancellationToken) {
    let (threads, memory) = pool.worker_size();
    let (lo, hi) = options.bounds(threads, memory);
    // Times in a row each worker was recommended for retirement.
    let mut recommended: HashMap<String, u32> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(options.interval) => {}
        }
        let Some(rec) = pool.sched.adaptive_target(options.target_duration, lo, hi).await else { return };
        let n = pool.len();
        let target = (rec.target as usize).clamp(lo, hi);
        if target > n {
            recommended.clear();
            tracing::info!(from = n, to = target, "adaptive: scaling up");
            if let Err(e) = pool.start(target - n).await {
                tracing::warn!(error = %e, "adaptive: scaling up failed");
            }
        } else if target < n {
            recommended.retain(|name, _| rec.to_close.contains(name));
            for name in &rec.to_close {
                *recommended.entry(name.clone()).or_insert(0) += 1;
            }
            let mut ready: Vec<String> =
                recommended.iter().filter(|(_, c)| **c >= options.wait_count).map(|(n, _)| n.clone()).collect();
            ready.sort();
            ready.truncate(n - target);
            if !ready.is_empty() {
                tracing::info!(from = n, workers = ?ready, "adaptive: retiring idle workers");
                for name in &ready {
                    recommended.remove(name);
                }
                if let Err(e) = pool.retire(&ready).await {
                    tracing::warn!(error = %e, "adaptive: retiring failed");
                }
            }
        } else {
            recommended.clear();
        }
    }
}
