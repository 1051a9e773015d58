//! Options of submissions and scatters (dask's keyword arguments), shared by the client and
//! graphs.
use std::time::Duration;

use dask_protocol::pb;

use crate::{Error, Result};

/// Options of [`Client::submit_with`] (dask's keyword arguments).
#[derive(Clone, Debug)]
pub struct SubmitOptions {
    /// Use this key instead of a generated one.
    pub key: Option<String>,
    /// Same function and arguments give the same key, and run once (default true).
    pub pure: bool,
    /// Worker addresses or names the task may run on.
    pub workers: Vec<String>,
    /// With `workers`: may run elsewhere if those are busy or gone.
    pub allow_other_workers: bool,
    /// Times to rerun the task if it fails.
    pub retries: u32,
    /// Higher runs first.
    pub priority: i32,
    /// For `map_with`: name each task `<prefix>-<token>` (dask's `map(key="prefix")`); `key`
    /// names one task exactly and is refused by `map_with`.
    pub key_prefix: Option<String>,
    /// For `map_with`: tasks per message to the scheduler (dask's `batch_size`; default
    /// 10,000).
    pub batch_size: Option<usize>,
    /// Abstract resources the task holds while it runs (dask's `resources={"GPU": 1}`): it runs
    /// only on a worker with that much free (`dask-worker --resources "GPU=2"`).
    pub resources: std::collections::BTreeMap<String, f64>,
    /// dask's `fifo_timeout` (default 100 ms): submitted within this long of this client's
    /// previous submission, the task shares its priority (the two are ordered together, by
    /// graph order); submitted later, it runs after everything submitted before.
    pub fifo_timeout: Duration,
}

/// dask's default `fifo_timeout`.
pub const FIFO_TIMEOUT: Duration = Duration::from_millis(100);

impl Default for SubmitOptions {
    fn default() -> Self {
        SubmitOptions {
            key: None,
            key_prefix: None,
            batch_size: None,
            pure: true,
            workers: Vec::new(),
            allow_other_workers: false,
            retries: 0,
            priority: 0,
            resources: std::collections::BTreeMap::new(),
            fifo_timeout: FIFO_TIMEOUT,
        }
    }
}

/// Options of [`Client::scatter_with`].
#[derive(Clone, Debug)]
pub struct ScatterOptions {
    /// Put the data on these workers (addresses or names); default: spread over all.
    pub workers: Vec<String>,
    /// Put every value on every (chosen) worker.
    pub broadcast: bool,
    /// With `broadcast`: on this many workers only (dask's `broadcast=n`).
    pub broadcast_n: Option<usize>,
    /// Task keys to give the values, one per value, in order (`scatter_map` uses the map's
    /// keys, as dask uses a dict's); default: a hash of each value (see `hash`).
    pub keys: Option<Vec<String>>,
    /// How long to wait for a worker to scatter to when none is connected (default: the
    /// connect timeout, 30 s, as dask's `timeout`).
    pub timeout: Duration,
    /// Name each value by a hash of its bytes (dask's `hash=True`, the default), so scattering
    /// equal data twice gives one key; `false` gives each value a fresh random key and skips
    /// hashing (worth it for values of hundreds of MB).
    pub hash: bool,
}

impl Default for ScatterOptions {
    fn default() -> Self {
        ScatterOptions {
            workers: Vec::new(),
            broadcast: false,
            broadcast_n: None,
            keys: None,
            timeout: crate::CONNECT_TIMEOUT,
            hash: true,
        }
    }
}

impl SubmitOptions {
    /// Refuses resources without a name or with an amount below zero (or not a number).
    pub(crate) fn check_resources(&self) -> Result<()> {
        match self.resources.iter().find(|(n, a)| n.is_empty() || !(a.is_finite() && **a >= 0.0)) {
            Some((name, amount)) => Err(Error::InvalidArgument(format!(
                "resource {name:?} = {amount}: give a name and an amount of zero or more, e.g. GPU = 1"
            ))),
            None => Ok(()),
        }
    }

    /// Puts the per-task options (priority, retries, workers, resources) on a task.
    pub(crate) fn apply_to(&self, def: &mut pb::TaskDef) -> Result<()> {
        self.check_resources()?;
        def.priority = self.priority;
        def.retries = self.retries;
        def.workers = self.workers.clone();
        def.allow_other_workers = self.allow_other_workers;
        def.resources =
            self.resources.iter().map(|(name, amount)| pb::Resource { name: name.clone(), amount: *amount }).collect();
        Ok(())
    }
}
