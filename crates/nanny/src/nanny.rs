//! The nanny's shell: runs the [`Supervisor`]'s commands (start and signal the worker, report
//! to the scheduler) and feeds it what happens (the worker's exit, the scheduler's requests, the
//! memory monitor, time).
//!
//! * A stream to the scheduler (`NannyStream`), kept up for as long as the nanny lives: it is
//!   reopened when the scheduler restarts. Through it the scheduler asks for restarts and closes
//!   and learns why each worker ended.
//! * A gRPC service on `--nanny-port` (`Nanny`: `Info`, `Restart`, `Close`).
//! * A memory monitor: the worker process's resident memory, every `monitor_interval`
//!   (dask: 100 ms); past `terminate` × limit the worker is stopped and a fresh one started.
use std::sync::Arc;
use std::time::{Duration, Instant};

use dask_protocol::addr::Address;
use dask_protocol::pb::{self, nanny_server::NannyServer, scheduler_client::SchedulerClient};
use dask_protocol::sys::ProcessMemory;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::launcher::{Child, Launcher};
use crate::supervisor::{Command, Event, ExitStatus, Policy, Supervisor};

/// The environment variable through which a worker process learns its nanny's address.
pub const NANNY_ENV: &str = "DASK_RS_NANNY";

/// The environment variable holding the nanny's process id, for its worker process.
pub const NANNY_PID_ENV: &str = "DASK_RS_NANNY_PID";

/// For a worker process under a nanny: cancels `shutdown` when the nanny's process is gone
/// (killed with SIGKILL, say), so that no worker outlives its nanny unsupervised. The nanny's
/// pid comes from [`NANNY_PID_ENV`] (a nanny that died before this ran is noticed too). Call
/// from inside a tokio runtime.
pub fn stop_with_parent(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        let parent = std::env::var(NANNY_PID_ENV)
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or_else(std::os::unix::process::parent_id);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if std::os::unix::process::parent_id() != parent {
                    tracing::warn!("the nanny (pid {parent}) is gone; this worker stops too");
                    shutdown.cancel();
                    return;
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = shutdown;
}

/// How to run one nanny.
#[derive(Clone, Debug)]
pub struct NannyConfig {
    pub scheduler: Address,
    /// The name its workers register with (and the nanny's own).
    pub name: String,
    /// Host the nanny's service binds and advertises.
    pub host: String,
    /// `--nanny-port` (0: any free port).
    pub port: u16,
    /// The worker's memory limit (0: none) and dask's `terminate` fraction of it.
    pub memory_limit: u64,
    pub terminate: Option<f64>,
    pub monitor_interval: Duration,
    pub policy: Policy,
    /// Give up when the scheduler was never reached for this long (`None`: keep trying).
    pub death_timeout: Option<Duration>,
    /// TLS credentials for its own service and for reaching a `tls://` scheduler.
    pub security: Option<dask_protocol::tls::Security>,
}

impl NannyConfig {
    pub fn new(scheduler: Address, name: String) -> Self {
        NannyConfig {
            scheduler,
            name,
            host: "127.0.0.1".into(),
            port: 0,
            memory_limit: 0,
            terminate: Some(0.95),
            monitor_interval: Duration::from_millis(100),
            policy: Policy::default(),
            death_timeout: None,
            security: None,
        }
    }

    /// Reads `distributed.nanny.*` and `distributed.worker.memory.terminate`/`monitor-interval`.
    pub fn apply_config(&mut self, c: &dask_protocol::config::Config) -> Result<(), String> {
        let e = |e: dask_protocol::config::ConfigError| e.to_string();
        self.terminate = c.fraction("distributed.worker.memory.terminate").map_err(e)?;
        if let Some(t) = c.duration("distributed.worker.memory.monitor-interval").map_err(e)? {
            self.monitor_interval = t.max(Duration::from_millis(1));
        }
        let p = &mut self.policy;
        if let Some(t) = c.duration("distributed.nanny.restart-backoff-initial").map_err(e)? {
            p.backoff_initial = t;
        }
        if let Some(t) = c.duration("distributed.nanny.restart-backoff-max").map_err(e)? {
            p.backoff_max = t;
        }
        if let Some(t) = c.duration("distributed.nanny.restart-after-uptime").map_err(e)? {
            p.restart_after_uptime = t;
        }
        if let Some(n) = c.uint("distributed.nanny.max-failed-starts").map_err(e)? {
            p.max_failed_starts = n.clamp(1, u32::MAX as u64) as u32;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NannyError {
    #[error("failed to bind the nanny's port on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The supervisor gave up (the worker kept failing to start, or could not be started).
    #[error("{0}")]
    GaveUp(String),
}

/// A running nanny, as seen by whoever started it.
#[derive(Clone, Debug)]
pub struct NannyHandle {
    pub address: Address,
    /// The name it and its workers go by.
    pub name: String,
    to_loop: mpsc::UnboundedSender<Request_>,
    shutdown: CancellationToken,
}

impl NannyHandle {
    /// Stops the worker and the nanny.
    pub fn close(&self) {
        self.shutdown.cancel();
    }

    /// Restarts the worker (as the scheduler's restart does).
    pub fn restart(&self, reason: &str) {
        let _ = self.to_loop.send(Request_::Restart(reason.to_string()));
    }

    /// Kills the worker as a crash would (SIGKILL): the nanny sees it die and acts as on any
    /// death (for tests and fault drills).
    pub fn kill_worker(&self) {
        let _ = self.to_loop.send(Request_::KillWorker);
    }
}

/// What reaches the loop from the scheduler or the nanny's service.
#[derive(Debug)]
pub(crate) enum Request_ {
    Restart(String),
    Close(String),
    /// Close, having failed (exit 1).
    GiveUp(String),
    WorkerRegistered {
        address: String,
        pid: u32,
    },
    /// Kill the worker behind the supervisor's back, as if it crashed.
    KillWorker,
}

/// What the nanny's service reports.
#[derive(Clone, Debug, Default)]
struct Shared {
    state: &'static str,
    worker_pid: u32,
    worker_address: String,
    started: u64,
    last_exit: String,
}

/// Binds the nanny's port and returns a future that supervises the worker until the nanny is
/// closed (`Ok`) or gives up (`Err`).
pub async fn start(
    config: NannyConfig,
    launcher: Box<dyn Launcher>,
    shutdown: CancellationToken,
) -> Result<(NannyHandle, impl std::future::Future<Output = Result<(), NannyError>>), NannyError> {
    let bind = format!("{}:{}", config.host, config.port);
    let listener =
        tokio::net::TcpListener::bind(&bind).await.map_err(|source| NannyError::Bind { addr: bind.clone(), source })?;
    let local = listener.local_addr().map_err(|source| NannyError::Bind { addr: bind, source })?;
    let address = Address { host: config.host.clone(), port: local.port(), tls: config.security.is_some() };
    let (to_loop, from_outside) = mpsc::unbounded_channel();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let service = Service {
        to_loop: to_loop.clone(),
        shared: shared.clone(),
        address: address.clone(),
        name: config.name.clone(),
    };
    let server = dask_protocol::serve::server().add_service(NannyServer::new(service)).serve_with_incoming_shutdown(
        dask_protocol::serve::incoming(listener, Default::default(), "nanny", config.security.clone()),
        shutdown.clone().cancelled_owned(),
    );
    let handle = NannyHandle {
        address: address.clone(),
        name: config.name.clone(),
        to_loop: to_loop.clone(),
        shutdown: shutdown.clone(),
    };
    let run = async move {
        let server = tokio::spawn(server);
        let (to_scheduler, outgoing) = mpsc::unbounded_channel();
        let register =
            pb::NannyRegister { address: address.to_string(), name: config.name.clone(), pid: std::process::id() };
        let link_stop = CancellationToken::new();
        let plugins =
            Arc::new(crate::plugins::NannyPlugins::start(address.to_string(), to_scheduler.clone(), to_loop.clone()));
        let link = tokio::spawn(link(config.clone(), register, outgoing, to_loop, plugins.clone(), link_stop.clone()));
        let result = supervise(&config, &address, launcher, from_outside, to_scheduler, &shared, &shutdown).await;
        let _ = tokio::task::spawn_blocking(move || plugins.close()).await;
        // Let the last report (why the worker ended) reach the scheduler, briefly.
        tokio::time::sleep(Duration::from_millis(50)).await;
        link_stop.cancel();
        let _ = link.await;
        shutdown.cancel();
        let _ = server.await;
        result
    };
    Ok((handle, run))
}

async fn wait_child(child: &mut Option<Box<dyn Child>>) -> ExitStatus {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

async fn supervise(
    config: &NannyConfig,
    address: &Address,
    mut launcher: Box<dyn Launcher>,
    mut from_outside: mpsc::UnboundedReceiver<Request_>,
    to_scheduler: mpsc::UnboundedSender<pb::NannyEvent>,
    shared: &Mutex<Shared>,
    shutdown: &CancellationToken,
) -> Result<(), NannyError> {
    let mut sup = Supervisor::new(config.policy.clone());
    let mut child: Option<Box<dyn Child>> = None;
    let mut sampler: Option<ProcessMemory> = None;
    let mut worker_address = String::new();
    let mut out = Vec::new();
    let terminate = match config.terminate {
        Some(f) if config.memory_limit > 0 => Some((f * config.memory_limit as f64) as u64),
        _ => None,
    };
    let mut monitor = tokio::time::interval(config.monitor_interval);
    monitor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    sup.handle(Event::Start, Instant::now(), &mut out);
    loop {
        // Run what the supervisor decided.
        for cmd in std::mem::take(&mut out) {
            match cmd {
                Command::Spawn => match launcher.spawn(&address.to_string()) {
                    Ok(c) => {
                        sampler = c.pid().map(ProcessMemory::of);
                        let mut s = shared.lock().await;
                        s.worker_pid = c.pid().unwrap_or(0);
                        s.started = sup.spawned;
                        child = Some(c);
                        tracing::info!(nanny = %address, pid = s.worker_pid, "started a worker");
                    }
                    Err(why) => sup.handle(Event::SpawnFailed { why }, Instant::now(), &mut out),
                },
                Command::Signal(signal) => {
                    if let Some(c) = &mut child {
                        c.signal(signal);
                    }
                }
                Command::Exited { reason, restarting } => {
                    let pid = shared.lock().await.worker_pid;
                    if restarting {
                        tracing::warn!(nanny = %address, worker = %worker_address, pid, %reason, "worker ended; starting a fresh one");
                    } else {
                        tracing::info!(nanny = %address, worker = %worker_address, pid, %reason, "worker ended");
                    }
                    let _ = to_scheduler.send(pb::NannyEvent {
                        kind: Some(pb::nanny_event::Kind::Exited(pb::WorkerExited {
                            worker: std::mem::take(&mut worker_address),
                            pid,
                            reason: reason.clone(),
                            restarting,
                        })),
                    });
                    let mut s = shared.lock().await;
                    s.last_exit = reason;
                    s.worker_pid = 0;
                    s.worker_address.clear();
                }
                Command::Dying { reason } => {
                    let pid = shared.lock().await.worker_pid;
                    let _ = to_scheduler.send(pb::NannyEvent {
                        kind: Some(pb::nanny_event::Kind::Exited(pb::WorkerExited {
                            worker: worker_address.clone(),
                            pid,
                            reason,
                            restarting: true,
                        })),
                    });
                }
                Command::Exit { code, message } => {
                    shared.lock().await.state = "closed";
                    return if code == 0 {
                        tracing::info!(nanny = %address, "nanny closed: {message}");
                        Ok(())
                    } else {
                        Err(NannyError::GaveUp(message))
                    };
                }
            }
        }
        if !out.is_empty() {
            continue; // a failed spawn produced more to do
        }
        shared.lock().await.state = sup.state_name();
        let deadline = sup.next_deadline();
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                Event::CloseAsked { reason: "the nanny was asked to stop".into() }
            }
            status = wait_child(&mut child) => {
                child = None;
                sampler = None;
                Event::Exited { status }
            }
            Some(req) = from_outside.recv() => match req {
                Request_::Restart(reason) => Event::RestartAsked { reason },
                Request_::Close(reason) => {
                    closing = true;
                    Event::CloseAsked { reason }
                }
                Request_::GiveUp(reason) => {
                    closing = true;
                    Event::GiveUp { reason }
                }
                Request_::KillWorker => {
                    if let Some(c) = &mut child {
                        c.signal(crate::supervisor::Signal::Kill);
                    }
                    continue;
                }
                Request_::WorkerRegistered { address: worker, pid } => {
                    let ours = shared.lock().await.worker_pid;
                    if pid != 0 && ours != 0 && pid != ours {
                        continue; // a worker of ours that is gone already
                    }
                    worker_address = worker.clone();
                    shared.lock().await.worker_address = worker;
                    Event::Registered
                }
            },
            _ = monitor.tick(), if terminate.is_some() && sampler.is_some() => {
                let (Some(limit), Some(s)) = (terminate, sampler.as_mut()) else { continue };
                match s.sample() {
                    Some(rss) if rss > limit => Event::OverMemory { rss, limit: config.memory_limit },
                    _ => continue,
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() => Event::Tick,
        };
        if let Event::OverMemory { rss, .. } = &event
            && matches!(sup.state_name(), "starting" | "running")
        {
            tracing::warn!(
                nanny = %address,
                worker = %worker_address,
                "worker exceeded {:.0}% of its memory limit ({} MB of {} MB): restarting it",
                config.terminate.unwrap_or(0.95) * 100.0,
                rss / 1_000_000,
                config.memory_limit / 1_000_000
            );
        }
        sup.handle(event, Instant::now(), &mut out);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// Keeps a stream to the scheduler open for as long as the nanny lives: registers, forwards
/// the scheduler's requests to the loop and the loop's reports to the scheduler, and opens it
/// again when it breaks (the scheduler restarted). Gives up only if the scheduler was never
/// reached within `death_timeout`.
async fn link(
    config: NannyConfig,
    register: pb::NannyRegister,
    mut outgoing: mpsc::UnboundedReceiver<pb::NannyEvent>,
    to_loop: mpsc::UnboundedSender<Request_>,
    plugins: Arc<crate::plugins::NannyPlugins>,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let mut reached = false;
    let mut delay = Duration::from_millis(50);
    let mut last_warning: Option<Instant> = None;
    loop {
        let attempt = async {
            let endpoint = dask_protocol::serve::endpoint(&config.scheduler, Duration::from_secs(5))
                .map_err(|e| dask_protocol::error_chain(&e))?;
            let channel = dask_protocol::serve::connect(&endpoint, &config.scheduler, config.security.as_ref())
                .await
                .map_err(|e| dask_protocol::error_chain(&e))?;
            let mut client = SchedulerClient::new(channel);
            let (tx, rx) = mpsc::unbounded_channel();
            let hello = pb::NannyEvent { kind: Some(pb::nanny_event::Kind::Register(register.clone())) };
            let _ = tx.send(pb::NannyToScheduler { events: vec![hello] });
            let mut inbound = client
                .nanny_stream(UnboundedReceiverStream::new(rx))
                .await
                .map_err(|s| format!("{} ({})", s.message(), s.code()))?
                .into_inner();
            match inbound.message().await.map_err(|s| s.message().to_string())? {
                Some(batch) => match batch.commands.into_iter().next().and_then(|c| c.kind) {
                    Some(pb::nanny_command::Kind::Registered(_)) => Ok((tx, inbound)),
                    Some(pb::nanny_command::Kind::Close(c)) => Err(format!("refused: {}", c.reason)),
                    _ => Err("no registration reply".to_string()),
                },
                None => Err("the scheduler closed the stream".to_string()),
            }
        };
        let (tx, mut inbound) = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => match r {
                Ok(opened) => opened,
                Err(why) => {
                    if why.starts_with("refused") {
                        let _ = to_loop.send(Request_::GiveUp(format!("the scheduler {why}")));
                        return;
                    }
                    if !reached && config.death_timeout.is_some_and(|t| started.elapsed() >= t) {
                        let _ = to_loop.send(Request_::GiveUp(format!(
                            "failed to reach the scheduler at {} within the death timeout ({:?}): {why}; is \
                             dask-scheduler running there?",
                            config.scheduler,
                            config.death_timeout.unwrap_or_default()
                        )));
                        return;
                    }
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(scheduler = %config.scheduler, error = %why, "nanny: scheduler not reachable; retrying");
                        last_warning = Some(Instant::now());
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
        };
        if reached {
            tracing::info!(scheduler = %config.scheduler, "nanny: connected to the scheduler again");
        }
        reached = true;
        delay = Duration::from_millis(50);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                ev = outgoing.recv() => {
                    let Some(ev) = ev else { return };
                    let mut events = vec![ev];
                    while let Ok(more) = outgoing.try_recv() {
                        events.push(more);
                    }
                    if tx.send(pb::NannyToScheduler { events }).is_err() {
                        break;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(batch)) => {
                        for cmd in batch.commands {
                            let req = match cmd.kind {
                                Some(pb::nanny_command::Kind::Restart(r)) => Request_::Restart(r.reason),
                                Some(pb::nanny_command::Kind::Close(c)) => Request_::Close(c.reason),
                                Some(pb::nanny_command::Kind::WorkerRegistered(w)) => {
                                    Request_::WorkerRegistered { address: w.address, pid: w.pid }
                                }
                                Some(pb::nanny_command::Kind::Plugin(p)) => {
                                    plugins.submit(p);
                                    continue;
                                }
                                _ => continue,
                            };
                            let _ = to_loop.send(req);
                        }
                    }
                    Ok(None) | Err(_) => {
                        tracing::warn!(scheduler = %config.scheduler, "nanny: lost the scheduler; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

/// The nanny's own gRPC service.
struct Service {
    to_loop: mpsc::UnboundedSender<Request_>,
    shared: Arc<Mutex<Shared>>,
    address: Address,
    name: String,
}

fn gone() -> Status {
    Status::unavailable("the nanny is closing")
}

#[tonic::async_trait]
impl pb::nanny_server::Nanny for Service {
    async fn info(&self, _: Request<pb::Empty>) -> Result<Response<pb::NannyInfo>, Status> {
        let s = self.shared.lock().await.clone();
        Ok(Response::new(pb::NannyInfo {
            address: self.address.to_string(),
            name: self.name.clone(),
            state: s.state.to_string(),
            worker_pid: s.worker_pid,
            worker_address: s.worker_address,
            workers_started: s.started,
            last_exit: s.last_exit,
        }))
    }

    async fn restart(&self, request: Request<pb::NannyRequest>) -> Result<Response<pb::Empty>, Status> {
        let reason = non_empty(request.into_inner().reason, "restart asked on the nanny's port");
        self.to_loop.send(Request_::Restart(reason)).map_err(|_| gone())?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn logs(&self, request: Request<pb::LogsRequest>) -> Result<Response<pb::LogLines>, Status> {
        let n = request.into_inner().n;
        let lines = dask_protocol::logs::recent_logs::call(n, "dask_nanny".to_string())
            .into_iter()
            .map(|(level, text)| pb::LogLine { level, text })
            .collect();
        Ok(Response::new(pb::LogLines { lines }))
    }

    async fn close(&self, request: Request<pb::NannyRequest>) -> Result<Response<pb::Empty>, Status> {
        let reason = non_empty(request.into_inner().reason, "close asked on the nanny's port");
        self.to_loop.send(Request_::Close(reason)).map_err(|_| gone())?;
        Ok(Response::new(pb::Empty {}))
    }
}

fn non_empty(s: String, default: &str) -> String {
    if s.is_empty() { default.to_string() } else { s }
}
