//! The workers of a local cluster: started alike from its builder, each under a nanny, named
//! `local-N` (never reused). `scale`, `adapt` and `kill_worker` act on it; the list is never
//! locked across an await.
use std::sync::Arc;

use dask_nanny::NannyHandle;
use dask_protocol::config::Config;
use dask_scheduler::server::SchedulerHandle;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use dask_client::{Error, Result};

use crate::local::{LocalClusterBuilder, WORKER_START_TIMEOUT, spawn_nanny};

pub(crate) struct Pool {
    /// How workers started by `scale` and `adapt` are made.
    builder: LocalClusterBuilder,
    /// Their names: `<prefix>-<n>`.
    prefix: String,
    settings: Config,
    pub(crate) sched: SchedulerHandle,
    shutdown: CancellationToken,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    nannies: Vec<NannyHandle>,
    runs: Vec<tokio::task::JoinHandle<()>>,
    next_index: usize,
}

impl Pool {
    pub(crate) fn new(
        builder: LocalClusterBuilder,
        prefix: &str,
        settings: Config,
        sched: SchedulerHandle,
        shutdown: CancellationToken,
    ) -> Pool {
        Pool { builder, prefix: prefix.to_string(), settings, sched, shutdown, state: Mutex::new(State::default()) }
    }

    pub(crate) fn len(&self) -> usize {
        self.state.lock().nannies.len()
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.state.lock().nannies.iter().map(|n| n.name.clone()).collect()
    }

    /// Threads and memory limit of each worker.
    pub(crate) fn worker_size(&self) -> (usize, u64) {
        (self.builder.threads(), self.builder.memory_limit_bytes())
    }

    pub(crate) fn kill(&self, i: usize) {
        if let Some(n) = self.state.lock().nannies.get(i) {
            n.kill_worker();
        }
    }

    /// The nannies' tasks, to wait for when the cluster closes.
    pub(crate) fn take_runs(&self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(&mut self.state.lock().runs)
    }

    /// Starts `k` more workers and waits until every worker of the pool has registered.
    pub(crate) async fn start(self: &Arc<Self>, k: usize) -> Result<()> {
        let first = {
            let mut s = self.state.lock();
            s.next_index += k;
            s.next_index - k
        };
        for i in first..first + k {
            self.add(&self.builder, format!("{}-{i}", self.prefix)).await?;
        }
        self.wait_all().await
    }

    /// Starts one worker of its own kind and name (a SpecCluster's entry).
    pub(crate) async fn add(&self, spec: &LocalClusterBuilder, name: String) -> Result<()> {
        if self.names().contains(&name) {
            return Err(Error::InvalidArgument(format!("a worker named {name:?} is running already")));
        }
        let (handle, run) = spawn_nanny(spec, &self.settings, &self.sched.address, name, &self.shutdown).await?;
        let mut s = self.state.lock();
        s.nannies.push(handle);
        s.runs.push(run);
        Ok(())
    }

    /// Waits until every worker of the pool has registered.
    pub(crate) async fn wait_all(&self) -> Result<()> {
        let n = self.len();
        match tokio::time::timeout(WORKER_START_TIMEOUT, self.sched.wait_for_workers(n)).await {
            Ok(Some(_)) => Ok(()),
            _ => Err(Error::Cluster(format!("{n} workers did not all register within {WORKER_START_TIMEOUT:?}"))),
        }
    }

    /// Retires the named workers gracefully (their values move to the others first) and stops
    /// their nannies.
    pub(crate) async fn retire(&self, names: &[String]) -> Result<()> {
        let leaving: Vec<NannyHandle> = {
            let mut s = self.state.lock();
            let (go, stay): (Vec<_>, Vec<_>) = s.nannies.drain(..).partition(|n| names.contains(&n.name));
            s.nannies = stay;
            go
        };
        if leaving.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = leaving.iter().map(|h| h.name.clone()).collect();
        // Those not connected now (restarting) have nothing to hand over.
        let connected: Vec<String> = self
            .sched
            .info()
            .await
            .map(|i| i.workers.into_iter().map(|w| w.name).filter(|w| names.contains(w)).collect())
            .unwrap_or_default();
        let retired =
            if connected.is_empty() { Ok(Vec::new()) } else { self.sched.retire_workers(connected, true).await };
        for h in &leaving {
            h.close();
        }
        retired.map(drop).map_err(|why| Error::Cluster(format!("retiring {names:?}: {why}")))
    }

    /// Runs `n` workers: starts more, or retires the newest.
    pub(crate) async fn scale(self: &Arc<Self>, n: usize) -> Result<()> {
        let names = self.names();
        if n > names.len() { self.start(n - names.len()).await } else { self.retire(&names[n..]).await }
    }
}
