//! `get_futures_error` and `recreate_error_locally` (dask's `ReplayTaskClient`): the failed
//! task at the root of a future's error, and a rerun of it in this process, with the same
//! inputs, so it fails where a debugger can see it.
use std::sync::Arc;

use dask_protocol::codec::Value;
use dask_protocol::pb;
use dask_protocol::task::execute_uncaught;
use prost::Message;
use rustc_hash::FxHashMap;

use crate::error::TaskFailure;
use crate::future::Future;
use crate::keys::KeyState;
use crate::{Client, Error, Result};

/// The task whose failure a future reports (dask's `get_futures_error`: function, arguments,
/// dependencies).
#[derive(Clone, Debug)]
pub struct FailedTask {
    /// The key of the task that failed (the future's own, or an input's it inherited).
    pub key: String,
    /// Its registered function.
    pub function: String,
    /// Its spec: the function and the argument tree (literals and references to `dependencies`).
    pub spec: pb::TaskSpec,
    pub dependencies: Vec<String>,
    /// The error it failed with on the cluster.
    pub error: TaskFailure,
}

impl Client {
    /// The failed task at the root of `future`'s error (waiting for the future first). Errors
    /// if the future did not fail, or the scheduler has forgotten the task.
    pub fn get_futures_error<T>(&self, future: &Future<T>) -> Result<FailedTask> {
        let error = future.exception().ok_or_else(|| {
            Error::InvalidArgument(format!("{} did not fail: there is no error to look at", future.key()))
        })?;
        let key = if error.key.is_empty() { future.key().to_string() } else { error.key.clone() };
        let entry = self.inner.block_on(async {
            let req = pb::KeysRequest { keys: vec![key.clone()] };
            Ok(self.inner.link.rpc().task_specs(req).await?.into_inner().tasks)
        })?;
        let entry = entry.into_iter().next().ok_or_else(|| {
            Error::Refused(format!(
                "the scheduler no longer has task {key}: hold the failed future (or one depending on it) \
                 while you look at its error"
            ))
        })?;
        if entry.spec.is_empty() {
            return Err(Error::InvalidArgument(format!("{key} is scattered data, not a task: nothing to rerun")));
        }
        let spec = pb::TaskSpec::decode(&entry.spec[..])
            .map_err(|e| Error::Refused(format!("the scheduler sent a malformed spec for {key}: {e}")))?;
        Ok(FailedTask { key, function: spec.function.clone(), spec, dependencies: entry.dependencies, error })
    }

    /// Runs the failed task at the root of `future`'s error here, in this thread, with the same
    /// inputs (fetched, or computed again if the cluster let them go): `Err` with the error it
    /// fails with here. A task that panicked panics here, unwinding into the caller, so a
    /// debugger breaks in it and `RUST_BACKTRACE` shows where (dask's
    /// `recreate_error_locally`). `Ok(())` if it did not fail here. Its function must be
    /// linked into this program, as the ones it submits are.
    pub fn recreate_error_locally<T>(&self, future: &Future<T>) -> Result<()> {
        let failed = self.get_futures_error(future)?;
        // Futures for the inputs: the scheduler recomputes any it released.
        let deps: Vec<Future<()>> = failed.dependencies.iter().map(|k| self.future_of::<()>(k)).collect();
        let refs: Vec<(Arc<str>, Arc<KeyState>)> =
            deps.iter().map(|f| (f.inner.key.clone(), f.inner.state.clone())).collect();
        let values: FxHashMap<Arc<str>, Value> = self.inner.block_on(self.inner.resolve(&refs, false))?;
        let r = execute_uncaught(&failed.spec, &|k| values.get(k).cloned());
        drop(deps);
        match r {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::Task(Box::new(TaskFailure {
                message: e.message(),
                kind: e.kind().to_string(),
                function: failed.function,
                key: failed.key,
                worker: String::new(),
                traceback: String::new(),
            }))),
        }
    }
}
