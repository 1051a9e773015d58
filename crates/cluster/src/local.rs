//! `LocalCluster`: a scheduler and workers on this machine, started and stopped with the
//! client. Each worker runs under a nanny (`dask_nanny`, in this process): as tasks of an
//! in-process runtime with their executor threads (`processes(false)`, the default), or as child
//! processes (`processes(true)`). They run every `#[dask::task]` linked into this program.
use std::sync::Arc;
use std::time::Duration;

use dask_nanny::{Child, ExitStatus, Launcher, NannyConfig, NannyHandle, ProcessLauncher, Signal};
use dask_protocol::addr::Address;
use dask_protocol::config::Config;
use dask_protocol::tls::Security;
use dask_scheduler::server::{self as scheduler, SchedulerConfig, SchedulerHandle};
use dask_worker::server::{self as worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use dask_client::{Error, Result};

use crate::adaptive::{self, AdaptOptions};
use crate::pool::Pool;

/// Builder of a [`LocalCluster`] (dask's keyword arguments).
#[derive(Clone, Debug)]
pub struct LocalClusterBuilder {
    pub(crate) n_workers: Option<usize>,
    pub(crate) threads_per_worker: Option<usize>,
    pub(crate) processes: bool,
    pub(crate) worker_program: Option<std::path::PathBuf>,
    pub(crate) memory_limit: u64,
    scheduler_port: u16,
    simulate: bool,
    local_directory: Option<std::path::PathBuf>,
    pub(crate) resources: Vec<(String, f64)>,
    /// A command line that starts a worker (SpecCluster): `{scheduler}` and `{name}` are
    /// replaced; run under a nanny like any worker process.
    pub(crate) command: Option<Vec<String>>,
    /// Names of workers `scale` starts: `<prefix>-<n>`.
    pub(crate) prefix: &'static str,
    /// Scheduler plugins started with the scheduler.
    preload: Vec<String>,
    /// Where the scheduler serves HTTP.
    dashboard: Option<String>,
    http_api: bool,
    /// TLS credentials for every process of the cluster, and where worker processes read them.
    security: Option<Security>,
    tls_files: Option<(dask_protocol::tls::Files, Option<std::path::PathBuf>)>,
}

impl LocalClusterBuilder {
    /// TLS with mutual authentication on every connection of the cluster (dask's
    /// `LocalCluster(security=...)`): the scheduler and workers are at `tls://` addresses, and
    /// only holders of a certificate the credentials' CA signed get in. `Security::temporary()`
    /// makes throw-away credentials (dask's `security=True`); clients connect with
    /// `Client::connect_with_security(&cluster.scheduler_address(), cluster.security().cloned().unwrap())`.
    pub fn security(mut self, security: Security) -> Self {
        self.security = Some(security);
        self
    }

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

    /// Abstract resources of each worker (dask's `LocalCluster(resources={"GPU": 2})`): tasks
    /// submitted with `SubmitOptions::resources` run only where they are free.
    pub fn resources<S: Into<String>>(mut self, resources: impl IntoIterator<Item = (S, f64)>) -> Self {
        self.resources = resources.into_iter().map(|(n, a)| (n.into(), a)).collect();
        self
    }

    /// Memory limit per worker in bytes (0: none).
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = bytes;
        self
    }

    /// Where workers keep their files (spilled values), each in its own directory below
    /// (default: the system's temporary directory).
    pub fn local_directory(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.local_directory = Some(dir.into());
        self
    }

    /// Starts the scheduler plugin type `name` (registered in this program with
    /// `dask::register_scheduler_plugin!`) with the scheduler, from its `Default` (the
    /// scheduler's `--preload`).
    pub fn preload(mut self, name: impl Into<String>) -> Self {
        self.preload.push(name.into());
        self
    }

    /// Where the scheduler serves HTTP (`/health`, `/metrics`, `/info`, `/api/v1`): dask's
    /// `dashboard_address`, e.g. `":8787"` (on 127.0.0.1; a port in use falls back to a free
    /// one). Default `None`: nowhere (dask's default is `:8787`; a cluster inside a program
    /// opens no fixed port unless asked, see docs/choices.md).
    pub fn dashboard_address(mut self, address: Option<&str>) -> Self {
        self.dashboard = address.map(str::to_string);
        self
    }

    /// Serve dask's `/api/v1` routes on the HTTP side too (as dask's
    /// `distributed.scheduler.http.routes` listing `distributed.http.scheduler.api`, which is
    /// read from the configuration as well).
    pub fn http_api(mut self, on: bool) -> Self {
        self.http_api = on;
        self
    }

    /// Scheduler port (default 0: any free port, so several clusters can run at once).
    pub fn scheduler_port(mut self, port: u16) -> Self {
        self.scheduler_port = port;
        self
    }

    /// Starts the scheduler and the workers, and waits until every worker is registered.
    /// Threads of each worker: as set, or the cores divided among the workers.
    pub(crate) fn threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        self.threads_per_worker.unwrap_or_else(|| (cores / self.n_workers.unwrap_or(cores).max(1)).max(1))
    }

    pub(crate) fn memory_limit_bytes(&self) -> u64 {
        self.memory_limit
    }

    /// Every worker runs under a nanny (in this process), so `Client::restart` works and a
    /// worker that dies is replaced.
    pub fn build(mut self) -> Result<LocalCluster> {
        // A worker process started by a LocalCluster whose program did not call `init()`.
        crate::init();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let n_workers = self.n_workers.unwrap_or(cores);
        if self.threads() == 0 {
            return Err(Error::InvalidArgument("threads_per_worker must be at least 1".into()));
        }
        if let Some((n, a)) = self.resources.iter().find(|(n, a)| n.is_empty() || !(a.is_finite() && *a >= 0.0)) {
            return Err(Error::InvalidArgument(format!(
                "resource {n:?} = {a}: give a name and an amount of zero or more, e.g. (\"GPU\", 2.0)"
            )));
        }
        let settings = Config::load().map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // Worker processes read the credentials from files (written for temporary ones, readable
        // by this user only, removed with the cluster).
        if let (Some(s), true) = (&self.security, self.processes) {
            let dir = std::env::temp_dir().join(format!(
                "dask-rs-tls-{}-{}",
                std::process::id(),
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
            ));
            let files =
                s.files(&dir).map_err(|e| Error::Cluster(format!("failed to write the TLS credentials: {e}")))?;
            let ours = files.ca.starts_with(&dir).then_some(dir);
            self.tls_files = Some((files, ours));
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
            pool: None,
            shutdown: shutdown.clone(),
            adaptive: None,
            security: self.security.clone(),
            tls_dir: self.tls_files.as_ref().and_then(|(_, d)| d.clone()),
        };
        let result = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.scheduler_port))
                .await
                .map_err(|e| Error::Cluster(format!("failed to listen on 127.0.0.1:{}: {e}", self.scheduler_port)))?;
            let dashboard = match &self.dashboard {
                Some(spec) => Some(
                    dask_protocol::http::parse_dashboard_address(spec, "127.0.0.1").map_err(Error::InvalidArgument)?,
                ),
                None => None,
            };
            let mut config = SchedulerConfig {
                preload: self.preload.clone(),
                dashboard,
                security: self.security.clone(),
                ..Default::default()
            };
            config.apply_config(&settings).map_err(Error::InvalidArgument)?;
            config.http_api |= self.http_api;
            let (sched, run) =
                scheduler::run(listener, config, shutdown.clone()).await.map_err(|e| Error::Cluster(e.to_string()))?;
            tokio::spawn(run);
            let pool =
                Arc::new(Pool::new(self.clone(), self.prefix, settings.clone(), sched.clone(), shutdown.clone()));
            cluster.scheduler = Some(sched);
            cluster.pool = Some(pool.clone());
            pool.start(n_workers).await.map_err(|e| match e {
                Error::Cluster(why) => Error::Cluster(format!(
                    "{why}; if the workers are this program (processes(true)), call dask::init() first thing in main"
                )),
                e => e,
            })
        });
        cluster.runtime = Some(runtime);
        result?;
        Ok(cluster)
    }
}

/// Starts the nanny of worker `i` (named `local-{i}`) and the task that runs it.
pub(crate) async fn spawn_nanny(
    b: &LocalClusterBuilder,
    settings: &Config,
    address: &Address,
    name: String,
    shutdown: &CancellationToken,
) -> Result<(NannyHandle, tokio::task::JoinHandle<()>)> {
    let threads = b.threads();
    let launcher: Box<dyn Launcher> = if let Some(argv) = &b.command {
        Box::new(command_launcher(argv, address, &name)?)
    } else if b.processes {
        Box::new(process_launcher(b, address, &name, threads)?)
    } else {
        let mut config = WorkerConfig::new(address.clone());
        config.apply_config(settings).map_err(Error::InvalidArgument)?;
        config.nthreads = threads;
        config.memory_limit = b.memory_limit;
        config.name = Some(name.clone());
        config.death_timeout = Some(Duration::from_secs(10));
        config.simulate = b.simulate;
        config.resources = b.resources.clone();
        if let Some(d) = &b.local_directory {
            config.local_directory = d.display().to_string();
        }
        config.dashboard = b.dashboard.is_some().then(worker_dashboard);
        config.security = b.security.clone();
        Box::new(InProcess { config })
    };
    let mut nanny = NannyConfig::new(address.clone(), name);
    nanny.apply_config(settings).map_err(Error::InvalidArgument)?;
    nanny.memory_limit = b.memory_limit;
    nanny.death_timeout = Some(Duration::from_secs(10));
    nanny.security = b.security.clone();
    let (handle, run) =
        dask_nanny::start(nanny, launcher, shutdown.child_token()).await.map_err(|e| Error::Cluster(e.to_string()))?;
    let run = tokio::spawn(async move {
        if let Err(e) = run.await {
            tracing::warn!(error = %e, "local nanny stopped");
        }
    });
    Ok((handle, run))
}

/// How long workers may take to start and register.
pub(crate) const WORKER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment of a worker process started by a `LocalCluster` running this program again.
pub(crate) const ENV_SCHEDULER: &str = "DASK_RS_LOCAL_WORKER_OF";
const ENV_NAME: &str = "DASK_RS_LOCAL_WORKER_NAME";
const ENV_NTHREADS: &str = "DASK_RS_LOCAL_WORKER_NTHREADS";
const ENV_MEMORY: &str = "DASK_RS_LOCAL_WORKER_MEMORY_LIMIT";
const ENV_SIMULATE: &str = "DASK_RS_LOCAL_WORKER_SIMULATE";
const ENV_LOCAL_DIR: &str = "DASK_RS_LOCAL_WORKER_DIRECTORY";
const ENV_RESOURCES: &str = "DASK_RS_LOCAL_WORKER_RESOURCES";
const ENV_DASHBOARD: &str = "DASK_RS_LOCAL_WORKER_DASHBOARD";
/// The TLS credentials' files: CA, certificate and key, one per line.
const ENV_TLS: &str = "DASK_RS_LOCAL_WORKER_TLS";

/// Where a local worker serves its HTTP side when the cluster serves one: a free port.
fn worker_dashboard() -> (String, u16) {
    ("127.0.0.1".to_string(), 0)
}

/// Worker processes: this program started again (it becomes a worker in `init`), or the
/// `worker_program` with `dask-worker`'s flags.
fn process_launcher(b: &LocalClusterBuilder, address: &Address, name: &str, threads: usize) -> Result<ProcessLauncher> {
    Ok(match &b.worker_program {
        Some(program) => ProcessLauncher {
            program: program.clone(),
            args: b
                .local_directory
                .iter()
                .flat_map(|d| [std::ffi::OsString::from("--local-directory"), d.clone().into_os_string()])
                .chain(
                    [
                        address.to_string().as_str(),
                        "--no-nanny",
                        "--name",
                        name,
                        "--nthreads",
                        &threads.to_string(),
                        "--memory-limit",
                        &b.memory_limit.to_string(),
                        "--death-timeout",
                        "10",
                    ]
                    .iter()
                    .map(Into::into),
                )
                .chain(
                    (!b.resources.is_empty())
                        .then(|| ["--resources".into(), resources_flag(&b.resources).into()])
                        .into_iter()
                        .flatten(),
                )
                .chain(match b.dashboard {
                    Some(_) => vec!["--dashboard-address".into(), "127.0.0.1:0".into()],
                    None => vec!["--no-dashboard".into()],
                })
                .chain(b.tls_files.iter().flat_map(|(f, _)| {
                    [
                        "--tls-ca-file".into(),
                        f.ca.clone().into_os_string(),
                        "--tls-cert".into(),
                        f.cert.clone().into_os_string(),
                        "--tls-key".into(),
                        f.key.clone().into_os_string(),
                    ]
                }))
                .collect(),
            env: Vec::new(),
            stdout: false,
        },
        None => {
            let program =
                std::env::current_exe().map_err(|e| Error::Cluster(format!("failed to find this program: {e}")))?;
            let mut env = vec![
                (ENV_SCHEDULER.to_string(), address.to_string()),
                (ENV_NAME.to_string(), name.to_string()),
                (ENV_NTHREADS.to_string(), threads.to_string()),
                (ENV_MEMORY.to_string(), b.memory_limit.to_string()),
            ];
            if b.dashboard.is_some() {
                env.push((ENV_DASHBOARD.to_string(), "1".to_string()));
            }
            if let Some((f, _)) = &b.tls_files {
                env.push((
                    ENV_TLS.to_string(),
                    format!("{}\n{}\n{}", f.ca.display(), f.cert.display(), f.key.display()),
                ));
            }
            if b.simulate {
                env.push((ENV_SIMULATE.to_string(), "1".to_string()));
            }
            if let Some(d) = &b.local_directory {
                env.push((ENV_LOCAL_DIR.to_string(), d.display().to_string()));
            }
            if !b.resources.is_empty() {
                env.push((ENV_RESOURCES.to_string(), resources_flag(&b.resources)));
            }
            ProcessLauncher { program, args: Vec::new(), env, stdout: false }
        }
    })
}

/// A worker started by a command line of the user's, `{scheduler}` and `{name}` filled in.
fn command_launcher(argv: &[String], address: &Address, name: &str) -> Result<ProcessLauncher> {
    let fill = |a: &String| a.replace("{scheduler}", &address.to_string()).replace("{name}", name);
    let (program, args) =
        argv.split_first().ok_or_else(|| Error::InvalidArgument("a worker command line needs a program".into()))?;
    Ok(ProcessLauncher {
        program: fill(program).into(),
        args: args.iter().map(|a| fill(a).into()).collect(),
        env: Vec::new(),
        stdout: false,
    })
}

/// `GPU=2 MEM=1e9`, as `dask-worker --resources` takes it.
fn resources_flag(r: &[(String, f64)]) -> String {
    r.iter().map(|(n, a)| format!("{n}={a}")).collect::<Vec<_>>().join(" ")
}

/// Workers of a `LocalCluster` of threads: started in this process, on its runtime.
struct InProcess {
    config: WorkerConfig,
}

impl Launcher for InProcess {
    fn spawn(&mut self, nanny: &str) -> std::result::Result<Box<dyn Child>, String> {
        let mut config = self.config.clone();
        config.nanny = Some(nanny.to_string());
        let token = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stop = token.clone();
        tokio::spawn(async move {
            let status = match worker::start(config, stop).await {
                Ok((_, run)) => exit_status(run.await),
                Err(worker::WorkerError::Stopped) => ExitStatus::Code(0),
                Err(e) => {
                    tracing::warn!(error = %e, "a local worker failed to start");
                    ExitStatus::Code(1)
                }
            };
            let _ = tx.send(status);
        });
        Ok(Box::new(InProcessChild { token, done: rx, status: None, killed: false }))
    }
}

/// A worker run's end as a process exit status, as its nanny understands it.
fn exit_status(end: std::result::Result<worker::Closed, worker::WorkerError>) -> ExitStatus {
    match end {
        Ok(closed) if closed.restart => ExitStatus::Code(dask_nanny::EXIT_RESTART),
        Ok(_) => ExitStatus::Code(0),
        Err(worker::WorkerError::SchedulerLost(_)) => ExitStatus::Code(dask_nanny::EXIT_RESTART),
        Err(worker::WorkerError::Refused(why)) => {
            tracing::warn!(%why, "a local worker was refused");
            ExitStatus::Code(dask_nanny::EXIT_FATAL)
        }
        Err(e) => {
            tracing::warn!(error = %e, "a local worker stopped");
            ExitStatus::Code(1)
        }
    }
}

struct InProcessChild {
    token: CancellationToken,
    done: tokio::sync::oneshot::Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    /// Stopped as a kill (reported as SIGKILL, like a process).
    killed: bool,
}

impl Child for InProcessChild {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn signal(&mut self, signal: Signal) {
        self.killed |= signal == Signal::Kill;
        self.token.cancel();
    }

    fn wait(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ExitStatus> + Send + '_>> {
        Box::pin(async move {
            if let Some(s) = self.status {
                return s;
            }
            let status = (&mut self.done).await.unwrap_or(ExitStatus::Code(1));
            let status = if self.killed { ExitStatus::Signal(9) } else { status };
            self.status = Some(status);
            status
        })
    }
}

/// Makes this process a worker if a `LocalCluster` started it as one (and then exits);
/// otherwise returns at once. Call it first thing in `main` of programs that use
/// `LocalCluster::builder().processes(true)`.
pub fn init() {
    let Ok(address) = std::env::var(ENV_SCHEDULER) else { return };
    let code = match run_local_worker(&address) {
        Ok(ExitStatus::Code(c)) => c,
        Ok(ExitStatus::Signal(_)) => 1,
        Err(e) => {
            eprintln!("dask worker process: error: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn run_local_worker(address: &str) -> Result<ExitStatus> {
    let scheduler = Address::parse(address, None)?;
    let mut config = WorkerConfig::new(scheduler);
    let settings = Config::load().map_err(|e| Error::InvalidArgument(e.to_string()))?;
    config.apply_config(&settings).map_err(Error::InvalidArgument)?;
    config.name = std::env::var(ENV_NAME).ok();
    config.nthreads = std::env::var(ENV_NTHREADS).ok().and_then(|n| n.parse().ok()).unwrap_or(1);
    config.memory_limit = std::env::var(ENV_MEMORY).ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    config.death_timeout = Some(Duration::from_secs(10));
    config.simulate = std::env::var_os(ENV_SIMULATE).is_some();
    config.nanny = std::env::var(dask_nanny::NANNY_ENV).ok();
    if let Ok(r) = std::env::var(ENV_RESOURCES) {
        config.resources = dask_worker::cli::parse_resources(&r).map_err(Error::InvalidArgument)?;
    }
    if let Ok(d) = std::env::var(ENV_LOCAL_DIR) {
        config.local_directory = d;
    }
    config.dashboard = std::env::var_os(ENV_DASHBOARD).is_some().then(worker_dashboard);
    if let Ok(files) = std::env::var(ENV_TLS) {
        let f: Vec<&str> = files.lines().collect();
        let [ca, cert, key] = f[..] else {
            return Err(Error::InvalidArgument(format!("{ENV_TLS} must name three files, one per line")));
        };
        config.security = Some(
            Security::from_files(ca.as_ref(), cert.as_ref(), Some(key.as_ref()))
                .map_err(|e| Error::InvalidArgument(e.to_string()))?,
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Cluster(format!("failed to start a runtime: {e}")))?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        dask_protocol::cli::cancel_on_signals(&shutdown);
        if config.nanny.is_some() {
            dask_nanny::stop_with_parent(shutdown.clone());
        }
        match worker::start(config, shutdown).await {
            Ok((_handle, run)) => Ok(exit_status(run.await)),
            Err(worker::WorkerError::Stopped) => Ok(ExitStatus::Code(0)),
            Err(e) => Err(Error::Cluster(e.to_string())),
        }
    })
}

/// A scheduler and workers on this machine. The scheduler runs in this process; each worker
/// runs under a nanny in this process, in threads of this process (the default) or, with
/// `processes(true)`, as a child process.
pub struct LocalCluster {
    runtime: Option<tokio::runtime::Runtime>,
    scheduler: Option<SchedulerHandle>,
    /// Its workers (shared with `Adaptive`, which scales them in the background).
    pool: Option<Arc<Pool>>,
    shutdown: CancellationToken,
    /// Stops the running `adapt`, if any.
    adaptive: Option<CancellationToken>,
    security: Option<Security>,
    /// A directory of credentials written for worker processes, removed with the cluster.
    tls_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalCluster({}, workers={})", self.scheduler_address(), self.n_workers())
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
            local_directory: None,
            resources: Vec::new(),
            command: None,
            prefix: "local",
            preload: Vec::new(),
            dashboard: None,
            http_api: false,
            security: None,
            tls_files: None,
        }
    }

    fn sched(&self) -> &SchedulerHandle {
        self.scheduler.as_ref().expect("a built cluster has a scheduler")
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn scheduler_address(&self) -> String {
        self.scheduler.as_ref().map(|s| s.address.to_string()).unwrap_or_default()
    }

    /// Where the scheduler serves HTTP (`http://host:port`: `/health`, `/metrics`,
    /// `/info/*.json`, `/api/v1`), if it does.
    pub fn http_address(&self) -> Option<String> {
        Some(self.scheduler.as_ref()?.dashboard.as_ref()?.web_url())
    }

    pub fn address(&self) -> &Address {
        &self.sched().address
    }

    /// The cluster's TLS credentials, if it was built with some (for its clients).
    pub fn security(&self) -> Option<&Security> {
        self.security.as_ref()
    }

    /// Addresses of the workers now connected, in the order of their names (`local-0`,
    /// `local-1`, ...).
    pub fn worker_addresses(&self) -> Vec<String> {
        let info = match &self.runtime {
            Some(rt) => rt.block_on(self.sched().info()),
            None => None,
        };
        let mut workers: Vec<(String, String)> =
            info.map(|i| i.workers.into_iter().map(|w| (w.name, w.address)).collect()).unwrap_or_default();
        workers.sort_by_key(|(name, _)| name.trim_start_matches("local-").parse::<usize>().unwrap_or(usize::MAX));
        workers.into_iter().map(|(_, a)| a).collect()
    }

    /// Kills worker `i` at once, as if it died (a worker process gets SIGKILL); its nanny starts
    /// a fresh one.
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(pool) = &self.pool {
            pool.kill(i);
        }
    }

    /// Number of workers this cluster runs (each under its nanny).
    pub fn n_workers(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.len())
    }

    pub(crate) fn parts(&self) -> Result<(&tokio::runtime::Runtime, &Arc<Pool>)> {
        match (&self.runtime, &self.pool) {
            (Some(rt), Some(p)) => Ok((rt, p)),
            _ => Err(Error::Cluster("the cluster is closed".into())),
        }
    }

    /// Runs `n` workers (dask's `cluster.scale(n)`): starts new ones, alike, and waits until
    /// they have joined; or retires the newest ones gracefully (their values move to the
    /// others first, nothing is recomputed) and stops their nannies.
    pub fn scale(&mut self, n: usize) -> Result<()> {
        let (rt, pool) = self.parts()?;
        rt.block_on(pool.scale(n))
    }

    /// Scales with the work in hand (dask's `cluster.adapt(...)`): every `interval` the
    /// scheduler's `adaptive_target` says how many workers the queued and running work needs
    /// to finish in `target_duration`; within the bounds, workers are started, or idle ones
    /// retired gracefully (their values move first) once recommended `wait_count` times in a
    /// row. Replaces an earlier `adapt`; [`stop_adapt`](Self::stop_adapt) ends it.
    pub fn adapt(&mut self, options: AdaptOptions) -> Result<()> {
        options.check()?;
        let (rt, pool) = self.parts()?;
        let (handle, pool) = (rt.handle().clone(), pool.clone());
        let stop = self.shutdown.child_token();
        if let Some(old) = self.adaptive.replace(stop.clone()) {
            old.cancel();
        }
        handle.spawn(adaptive::run(pool, options, stop));
        Ok(())
    }

    /// Ends `adapt`: the workers stay as they are.
    pub fn stop_adapt(&mut self) {
        if let Some(stop) = self.adaptive.take() {
            stop.cancel();
        }
    }

    /// Stops the workers and the scheduler.
    pub fn close(mut self) {
        self.stop(true);
    }

    fn stop(&mut self, wait: bool) {
        self.shutdown.cancel();
        if let Some(d) = self.tls_dir.take() {
            // Worker processes read them at start; none starts after this.
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(rt) = self.runtime.take() {
            if wait {
                // The nannies stop their workers (SIGTERM to processes) and end.
                let runs = self.pool.as_ref().map(|p| p.take_runs()).unwrap_or_default();
                let _ = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(5), futures_util::future::join_all(runs)).await
                });
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
