//! `LocalCluster`: a scheduler and workers on this machine, started and stopped with the
//! client. Workers run as tasks of an in-process runtime (`processes(false)`), with their
//! executor threads; they run every `#[dask::task]` linked into this program.
use std::time::Duration;

use dask_protocol::addr::Address;
use dask_scheduler::server::{self as scheduler, SchedulerConfig, SchedulerHandle};
use dask_worker::server::{self as worker, WorkerConfig, WorkerHandle};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// Builder of a [`LocalCluster`] (dask's keyword arguments).
#[derive(Clone, Debug)]
pub struct LocalClusterBuilder {
    n_workers: Option<usize>,
    threads_per_worker: Option<usize>,
    processes: bool,
    memory_limit: u64,
    scheduler_port: u16,
}

impl LocalClusterBuilder {
    /// Number of workers (default: one per core).
    pub fn n_workers(mut self, n: usize) -> Self {
        self.n_workers = Some(n);
        self
    }

    /// Threads per worker (default: cores divided among the workers).
    pub fn threads_per_worker(mut self, n: usize) -> Self {
        self.threads_per_worker = Some(n);
        self
    }

    /// Run workers in separate processes. Not implemented yet: `build` says so.
    pub fn processes(mut self, yes: bool) -> Self {
        self.processes = yes;
        self
    }

    /// Memory limit per worker in bytes (0: none).
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = bytes;
        self
    }

    /// Scheduler port (default 0: any free port, so several clusters can run at once).
    pub fn scheduler_port(mut self, port: u16) -> Self {
        self.scheduler_port = port;
        self
    }

    /// Starts the scheduler and the workers, and waits until every worker is registered.
    pub fn build(self) -> Result<LocalCluster> {
        if self.processes {
            return Err(Error::Cluster(
                "processes(true) is not implemented yet; use processes(false) (workers in threads), \
                 or start dask-scheduler and dask-worker processes yourself"
                    .into(),
            ));
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let n_workers = self.n_workers.unwrap_or(cores);
        let threads = self.threads_per_worker.unwrap_or_else(|| (cores / n_workers.max(1)).max(1));
        if threads == 0 {
            return Err(Error::InvalidArgument("threads_per_worker must be at least 1".into()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dask-local-cluster")
            .enable_all()
            .build()
            .map_err(|e| Error::Cluster(format!("failed to start a runtime: {e}")))?;
        let shutdown = CancellationToken::new();
        let (sched, workers) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.scheduler_port))
                .await
                .map_err(|e| Error::Cluster(format!("failed to listen on 127.0.0.1:{}: {e}", self.scheduler_port)))?;
            let (sched, run) = scheduler::run(listener, SchedulerConfig::default(), shutdown.clone())
                .await
                .map_err(|e| Error::Cluster(e.to_string()))?;
            tokio::spawn(run);
            let mut workers = Vec::new();
            for i in 0..n_workers {
                let mut config = WorkerConfig::new(sched.address.clone());
                config.nthreads = threads;
                config.memory_limit = self.memory_limit;
                config.name = Some(format!("local-{i}"));
                config.death_timeout = Some(Duration::from_secs(10));
                let (handle, run) =
                    worker::start(config, shutdown.child_token()).await.map_err(|e| Error::Cluster(e.to_string()))?;
                tokio::spawn(async move {
                    if let Err(e) = run.await {
                        tracing::warn!(error = %e, "local worker stopped");
                    }
                });
                workers.push(handle);
            }
            Ok::<_, Error>((sched, workers))
        })?;
        Ok(LocalCluster { runtime: Some(runtime), scheduler: sched, workers, shutdown })
    }
}

/// A scheduler and workers running in this process.
pub struct LocalCluster {
    runtime: Option<tokio::runtime::Runtime>,
    scheduler: SchedulerHandle,
    workers: Vec<WorkerHandle>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalCluster({}, workers={})", self.scheduler.address, self.workers.len())
    }
}

impl LocalCluster {
    pub fn builder() -> LocalClusterBuilder {
        LocalClusterBuilder {
            n_workers: None,
            threads_per_worker: None,
            processes: false,
            memory_limit: 0,
            scheduler_port: 0,
        }
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn scheduler_address(&self) -> String {
        self.scheduler.address.to_string()
    }

    pub fn address(&self) -> &Address {
        &self.scheduler.address
    }

    /// Addresses of the workers started.
    pub fn worker_addresses(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.address.to_string()).collect()
    }

    /// Stops worker `i` at once, as if it died (for tests of fault tolerance).
    pub fn kill_worker(&self, i: usize) {
        if let Some(w) = self.workers.get(i) {
            w.close();
        }
    }

    /// Stops the workers and the scheduler.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime inside async code would panic; let it wind down on its own.
            rt.shutdown_background();
        }
    }
}
