//! `LocalCluster`: a scheduler and workers on this machine, started and stopped with the
//! client. Workers run as tasks of an in-process runtime (`processes(false)`), with their
//! executor threads; they run every `#[dask::task]` linked into this program.
use std::time::Duration;

use dask_protocol::addr::Address;
use dask_scheduler::server::{self as scheduler, SchedulerConfig, SchedulerHandle};
use dask_worker::server::{self as worker, WorkerConfig, WorkerHandle};
use std::process::{Child, Command, Stdio};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// Builder of a [`LocalCluster`] (dask's keyword arguments).
#[derive(Clone, Debug)]
pub struct LocalClusterBuilder {
    n_workers: Option<usize>,
    threads_per_worker: Option<usize>,
    processes: bool,
    worker_program: Option<std::path::PathBuf>,
    memory_limit: u64,
    scheduler_port: u16,
    simulate: bool,
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

    /// Run each worker in its own process (default: in this process, on threads). The worker
    /// processes are this program started again: call [`crate::init`] first thing in `main`
    /// (creating a cluster calls it too, as a fallback) so they become workers and run your
    /// `#[dask::task]` functions. Or name another worker binary with [`worker_program`].
    ///
    /// [`worker_program`]: Self::worker_program
    pub fn processes(mut self, yes: bool) -> Self {
        self.processes = yes;
        self
    }

    /// With `processes(true)`: run this binary as each worker (one built with
    /// `dask::worker_main()`, such as `dask-worker`) instead of this program.
    pub fn worker_program(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.worker_program = Some(path.into());
        self
    }

    /// Benchmarks only: workers report every task done at once without running it.
    #[doc(hidden)]
    pub fn simulate_tasks(mut self, yes: bool) -> Self {
        self.simulate = yes;
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
        // A worker process started by a LocalCluster whose program did not call `init()`.
        crate::init();
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
        let mut cluster = LocalCluster {
            runtime: None,
            scheduler: None,
            workers: Vec::new(),
            children: Vec::new(),
            shutdown: shutdown.clone(),
        };
        let result = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.scheduler_port))
                .await
                .map_err(|e| Error::Cluster(format!("failed to listen on 127.0.0.1:{}: {e}", self.scheduler_port)))?;
            let (sched, run) = scheduler::run(listener, SchedulerConfig::default(), shutdown.clone())
                .await
                .map_err(|e| Error::Cluster(e.to_string()))?;
            tokio::spawn(run);
            let address = sched.address.clone();
            cluster.scheduler = Some(sched);
            for i in 0..n_workers {
                let name = format!("local-{i}");
                if self.processes {
                    cluster.children.push(spawn_worker(&self, &address, &name, threads)?);
                    continue;
                }
                let mut config = WorkerConfig::new(address.clone());
                config.nthreads = threads;
                config.memory_limit = self.memory_limit;
                config.name = Some(name);
                config.death_timeout = Some(Duration::from_secs(10));
                config.simulate = self.simulate;
                let (handle, run) =
                    worker::start(config, shutdown.child_token()).await.map_err(|e| Error::Cluster(e.to_string()))?;
                tokio::spawn(async move {
                    if let Err(e) = run.await {
                        tracing::warn!(error = %e, "local worker stopped");
                    }
                });
                cluster.workers.push(handle);
            }
            if self.processes {
                let sched = cluster.scheduler.as_ref().expect("started");
                let wait = sched.wait_for_workers(n_workers);
                match tokio::time::timeout(WORKER_START_TIMEOUT, wait).await {
                    Ok(Some(_)) => {}
                    _ => {
                        let exited: Vec<String> = cluster
                            .children
                            .iter_mut()
                            .filter_map(|c| c.try_wait().ok().flatten().map(|s| s.to_string()))
                            .collect();
                        return Err(Error::Cluster(format!(
                            "{n_workers} worker processes did not all register within {WORKER_START_TIMEOUT:?} \
                             (exited: {exited:?}); if the workers are this program, call dask::init() \
                             first thing in main"
                        )));
                    }
                }
            }
            Ok::<_, Error>(())
        });
        cluster.runtime = Some(runtime);
        result?;
        Ok(cluster)
    }
}

/// How long worker processes may take to start and register.
const WORKER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment of a worker process started by a `LocalCluster` running this program again.
pub(crate) const ENV_SCHEDULER: &str = "DASK_RS_LOCAL_WORKER_OF";
const ENV_NAME: &str = "DASK_RS_LOCAL_WORKER_NAME";
const ENV_NTHREADS: &str = "DASK_RS_LOCAL_WORKER_NTHREADS";
const ENV_MEMORY: &str = "DASK_RS_LOCAL_WORKER_MEMORY_LIMIT";
const ENV_SIMULATE: &str = "DASK_RS_LOCAL_WORKER_SIMULATE";

fn spawn_worker(b: &LocalClusterBuilder, address: &Address, name: &str, threads: usize) -> Result<Child> {
    let mut cmd = match &b.worker_program {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.arg(address.to_string()).args(["--name", name, "--nthreads", &threads.to_string()]).args([
                "--memory-limit",
                &b.memory_limit.to_string(),
                "--death-timeout",
                "10",
            ]);
            cmd
        }
        None => {
            let exe =
                std::env::current_exe().map_err(|e| Error::Cluster(format!("failed to find this program: {e}")))?;
            let mut cmd = Command::new(exe);
            cmd.env(ENV_SCHEDULER, address.to_string())
                .env(ENV_NAME, name)
                .env(ENV_NTHREADS, threads.to_string())
                .env(ENV_MEMORY, b.memory_limit.to_string());
            if b.simulate {
                cmd.env(ENV_SIMULATE, "1");
            }
            cmd
        }
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    cmd.spawn().map_err(|e| Error::Cluster(format!("failed to start a worker process: {e}")))
}

/// Makes this process a worker if a `LocalCluster` started it as one (and then exits);
/// otherwise returns at once. Call it first thing in `main` of programs that use
/// `LocalCluster::builder().processes(true)`.
pub fn init() {
    let Ok(address) = std::env::var(ENV_SCHEDULER) else { return };
    let code = match run_local_worker(&address) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("dask worker process: error: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn run_local_worker(address: &str) -> Result<()> {
    let scheduler = Address::parse(address, None)?;
    let mut config = WorkerConfig::new(scheduler);
    config.name = std::env::var(ENV_NAME).ok();
    config.nthreads = std::env::var(ENV_NTHREADS).ok().and_then(|n| n.parse().ok()).unwrap_or(1);
    config.memory_limit = std::env::var(ENV_MEMORY).ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    config.death_timeout = Some(Duration::from_secs(10));
    config.simulate = std::env::var_os(ENV_SIMULATE).is_some();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Cluster(format!("failed to start a runtime: {e}")))?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let (_handle, run) = worker::start(config, shutdown).await.map_err(|e| Error::Cluster(e.to_string()))?;
        // The worker ends when its scheduler (in the parent) closes or goes away.
        run.await.map_err(|e| Error::Cluster(e.to_string()))
    })
}

/// A scheduler and workers on this machine: the scheduler and threaded workers run in this
/// process; with `processes(true)` each worker is a child process.
pub struct LocalCluster {
    runtime: Option<tokio::runtime::Runtime>,
    scheduler: Option<SchedulerHandle>,
    workers: Vec<WorkerHandle>,
    children: Vec<Child>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalCluster({}, workers={})", self.scheduler_address(), self.workers.len() + self.children.len())
    }
}

impl LocalCluster {
    pub fn builder() -> LocalClusterBuilder {
        LocalClusterBuilder {
            n_workers: None,
            threads_per_worker: None,
            processes: false,
            worker_program: None,
            memory_limit: 0,
            scheduler_port: 0,
            simulate: false,
        }
    }

    fn sched(&self) -> &SchedulerHandle {
        self.scheduler.as_ref().expect("a built cluster has a scheduler")
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn scheduler_address(&self) -> String {
        self.scheduler.as_ref().map(|s| s.address.to_string()).unwrap_or_default()
    }

    pub fn address(&self) -> &Address {
        &self.sched().address
    }

    /// Addresses of the workers, in the order they were started (`local-0`, `local-1`, ...).
    pub fn worker_addresses(&self) -> Vec<String> {
        if !self.workers.is_empty() {
            return self.workers.iter().map(|w| w.address.to_string()).collect();
        }
        let info = match &self.runtime {
            Some(rt) => rt.block_on(self.sched().info()),
            None => None,
        };
        let mut workers: Vec<(String, String)> =
            info.map(|i| i.workers.into_iter().map(|w| (w.name, w.address)).collect()).unwrap_or_default();
        workers.sort_by_key(|(name, _)| name.trim_start_matches("local-").parse::<usize>().unwrap_or(usize::MAX));
        workers.into_iter().map(|(_, a)| a).collect()
    }

    /// Stops worker `i` at once, as if it died (a worker process gets SIGKILL).
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(w) = self.workers.get(i) {
            w.close();
        }
        if let Some(c) = self.children.get_mut(i) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the workers and the scheduler.
    pub fn close(mut self) {
        self.stop(true);
    }

    fn stop(&mut self, wait: bool) {
        self.shutdown.cancel();
        // Worker processes leave when the scheduler closes their stream; make sure of it.
        for c in &mut self.children {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while wait && std::time::Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        if let Some(rt) = self.runtime.take() {
            if wait {
                rt.shutdown_timeout(Duration::from_secs(2));
            } else {
                // Dropping a runtime inside async code would panic; let it wind down on its own.
                rt.shutdown_background();
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let in_async = tokio::runtime::Handle::try_current().is_ok();
        self.stop(!in_async);
    }
}
