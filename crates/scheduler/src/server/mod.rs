//! The scheduler's shell: tonic services for the worker and client streams and the queries,
//! and one event loop task that owns the [`SchedulerCore`]. Stream handlers only decode
//! batches into events and forward them; commands are grouped per worker and per client and
//! sent as one batch per loop iteration.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dask_protocol::addr::Address;
use dask_protocol::pb::{self, scheduler_server::SchedulerServer};
use dask_protocol::serve::serve_until;
use futures_util::Stream;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

mod dashboard;
mod event_loop;
mod http;
mod plugins;
mod run;
mod service;
mod task_stream;
mod wire;

pub use run::get_scheduler;
use service::Service;
use wire::*;

use crate::coord;
use crate::core::{
    self, ClientId, Command, Event, Key, NewTask, Report, SchedulerCore, TaskError, WorkerId, WorkerSpec,
};

/// How to run a scheduler.
#[derive(Clone, Debug, Default)]
pub struct SchedulerConfig {
    pub core: core::Config,
    /// Where to write the scheduler file (dask's JSON), if anywhere.
    pub scheduler_file: Option<std::path::PathBuf>,
    /// Connections accepted at once, and the handshake deadline.
    pub limits: dask_protocol::serve::Limits,
    /// Scheduler plugin types to start with the scheduler, from their `Default` (dask's
    /// `--preload`; here a registered plugin type's name).
    pub preload: Vec<String>,
    /// Where to serve HTTP (`/health`, `/metrics`, ...): host and port (a port in use falls
    /// back to a free one); `None`: nowhere (`--no-dashboard`).
    pub dashboard: Option<(String, u16)>,
    /// Close once nothing has been on its way to memory for this long (dask's
    /// `--idle-timeout`).
    pub idle_timeout: Option<Duration>,
    /// Serve dask's `/api/v1` routes (retire workers, adaptive target...) too: opt-in, as in
    /// dask (`distributed.scheduler.http.routes` with `distributed.http.scheduler.api`).
    pub http_api: bool,
    /// TLS credentials: with them the scheduler is at a `tls://` address and accepts only
    /// peers whose certificates the cluster's CA signed.
    pub security: Option<dask_protocol::tls::Security>,
    /// Serve HTTP as HTTPS with this certificate (dask's
    /// `distributed.scheduler.dashboard.tls.cert` and `.key`).
    pub https: Option<dask_protocol::tls::Https>,
}

impl SchedulerConfig {
    /// Takes the scheduler's keys from dask's configuration (files, `DASK_*` variables).
    pub fn apply_config(&mut self, settings: &dask_protocol::config::Config) -> Result<(), String> {
        let bad = |e: dask_protocol::config::ConfigError| e.to_string();
        if let Some(ttl) = settings.duration("distributed.scheduler.worker-ttl").map_err(bad)? {
            if ttl.is_zero() {
                return Err("distributed.scheduler.worker-ttl must be more than zero (e.g. 300s)".into());
            }
            self.core.worker_ttl = ttl;
        }
        if let Some(n) = settings.uint("distributed.scheduler.allowed-failures").map_err(bad)? {
            self.core.allowed_failures = n.min(u32::MAX as u64) as u32;
        }
        if let Some(on) = settings.boolean("distributed.scheduler.work-stealing").map_err(bad)? {
            self.core.work_stealing = on;
        }
        if let Some(bw) = settings.bytes("distributed.scheduler.bandwidth").map_err(bad)? {
            self.core.bandwidth = bw.max(1);
        }
        // dask's list of HTTP route modules: its `/api/v1` module is opt-in there too.
        const API: &str = "distributed.http.scheduler.api";
        use dask_protocol::config::Value;
        match settings.get("distributed.scheduler.http.routes") {
            Some(Value::List(routes)) => {
                self.http_api = routes.iter().any(|r| matches!(r, Value::Str(s) if s.trim() == API));
            }
            Some(Value::Str(s)) => self.http_api = s.contains(API),
            _ => {}
        }
        if self.https.is_none() {
            self.https = dask_protocol::tls::Https::from_config(settings)?;
        }
        Ok(())
    }
}

/// A running scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    pub address: Address,
    /// Where it serves HTTP, if it does.
    pub dashboard: Option<Address>,
    shutdown: CancellationToken,
    tx: mpsc::UnboundedSender<LoopMsg>,
}

impl SchedulerHandle {
    pub fn close(&self) {
        self.shutdown.cancel();
    }

    /// What `Client::scheduler_info` returns, for whoever started the scheduler in-process.
    pub async fn info(&self) -> Option<pb::SchedulerInfo> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::Info(tx))).ok()?;
        rx.await.ok()
    }

    /// Retires the workers with these names or addresses (their values move to others first);
    /// with `close`, they then exit. Returns the addresses retired.
    pub async fn retire_workers(&self, workers: Vec<String>, close: bool) -> Result<Vec<String>, String> {
        let (tx, rx) = oneshot::channel();
        let gone = || "the scheduler stopped".to_string();
        self.tx.send(LoopMsg::Retire { workers, n: 0, close, reply: tx }).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?.map_err(|s| s.message().to_string())
    }

    /// Waits until `n` workers are connected; `None` if the scheduler stopped first.
    /// dask's `adaptive_target(target_duration)`, within `minimum..=maximum` workers.
    pub async fn adaptive_target(
        &self,
        target_duration: Duration,
        minimum: usize,
        maximum: usize,
    ) -> Option<pb::AdaptiveReply> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::AdaptiveTarget(target_duration, minimum, maximum, tx))).ok()?;
        rx.await.ok()
    }

    pub async fn wait_for_workers(&self, n: usize) -> Option<pb::SchedulerInfo> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::WaitForWorkers(n, tx))).ok()?;
        rx.await.ok()
    }
}

type WorkerTx = mpsc::UnboundedSender<Result<pb::SchedulerToWorker, Status>>;
type NannyTx = mpsc::UnboundedSender<Result<pb::SchedulerToNanny, Status>>;

enum LoopMsg {
    Events(Vec<Event>),
    /// What a client sent, in order.
    Client(Vec<ClientInput>),
    /// A function run in the scheduler (`run_on_scheduler`) returned.
    SchedulerRunDone {
        client: ClientId,
        id: u64,
        result: pb::RunResult,
    },
    /// A worker's answer to a run.
    RunDone {
        worker: WorkerId,
        done: pb::RunDone,
    },
    /// The wait of a coordination request may be over.
    CoordTimeout {
        client: ClientId,
        id: u64,
    },
    WorkerConnected {
        spec: WorkerSpec,
        /// Its nanny's address, if it has one.
        nanny: Option<String>,
        version: String,
        /// Its HTTP side's address, if it serves one.
        dashboard: Option<String>,
        tx: WorkerTx,
        reply: oneshot::Sender<WorkerId>,
    },
    /// A worker's stream ended (it exited, was killed, or the connection broke).
    WorkerStreamEnded {
        worker: WorkerId,
        reason: String,
    },
    /// The wait for a nanny's account of a lost worker is over.
    LossDue(WorkerId),
    NannyConnected {
        register: pb::NannyRegister,
        tx: NannyTx,
        reply: oneshot::Sender<u32>,
    },
    NannyEvents {
        nanny: u32,
        events: Vec<pb::NannyEvent>,
    },
    NannyGone(u32),
    Restart {
        timeout: Duration,
        reason: String,
        reply: oneshot::Sender<Result<u32, Status>>,
    },
    /// Time to look at pending restarts again.
    RestartsDue,
    Retire {
        /// Addresses or names; empty: the scheduler picks `n`.
        workers: Vec<String>,
        n: usize,
        close: bool,
        reply: oneshot::Sender<Result<Vec<String>, Status>>,
    },
    /// `Client::replicate` (`n`: `Some`) or `Client::rebalance` (`n`: `None`).
    Copies {
        keys: Vec<String>,
        n: Option<Option<usize>>,
        workers: Vec<String>,
        reply: oneshot::Sender<Result<u32, Status>>,
    },
    ClientConnected {
        tx: mpsc::UnboundedSender<Result<pb::SchedulerToClient, Status>>,
        reply: oneshot::Sender<ClientId>,
    },
    /// A scheduler plugin's start failed (its name, its add, whether it was to replace one).
    SchedulerPluginFailed(String, u64, bool),
    Query(Query),
}

enum Query {
    WhoHas(Vec<String>, oneshot::Sender<pb::WhoHasReply>),
    HasWhat(oneshot::Sender<pb::HasWhatReply>),
    Info(oneshot::Sender<pb::SchedulerInfo>),
    WaitForWorkers(usize, oneshot::Sender<pb::SchedulerInfo>),
    /// Target duration, minimum and maximum workers.
    AdaptiveTarget(Duration, usize, usize, oneshot::Sender<pb::AdaptiveReply>),
    Story(Vec<String>, oneshot::Sender<pb::StoryReply>),
    TaskSpecs(Vec<String>, oneshot::Sender<pb::TaskSpecsReply>),
    /// What the HTTP side shows.
    Snapshot(oneshot::Sender<Arc<http::Snapshot>>),
    Processing(oneshot::Sender<pb::HasWhatReply>),
    Nbytes(oneshot::Sender<pb::NbytesReply>),
}

/// Starts a scheduler on `listener`; it runs until `shutdown` is cancelled.
/// Returns the handle and a future that runs the scheduler to the end.
pub async fn run(
    listener: TcpListener,
    config: SchedulerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<(SchedulerHandle, impl std::future::Future<Output = ()>)> {
    let local = listener.local_addr()?;
    // Listening on all interfaces: advertise the host's address for others (dask's `get_ip`:
    // the source of the default route; loopback when there is none).
    let address = if local.ip().is_unspecified() {
        Address { host: dask_protocol::addr::external_ip().to_string(), port: local.port(), tls: false }
    } else {
        Address::from(local)
    }
    .with_tls(config.security.is_some());
    let (tx, rx) = mpsc::unbounded_channel();
    let id = format!("Scheduler-{:x}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    let dashboard = match &config.dashboard {
        Some((host, port)) => Some(dask_protocol::http::bind(host, *port, "the scheduler").await?),
        None => None,
    };
    let dashboard_address = match &dashboard {
        Some(l) => {
            let a = l.local_addr()?;
            let host = if a.ip().is_unspecified() { address.host.clone() } else { a.ip().to_string() };
            // `tls` here: HTTPS (`Address::web_url`).
            Some(Address { host, port: a.port(), tls: config.https.is_some() })
        }
        None => None,
    };
    if let Some(path) = &config.scheduler_file {
        write_scheduler_file(path, &id, &address, dashboard_address.as_ref().map(|a| a.port))?;
    }
    let started = SystemTime::now();
    let put_secret = dask_protocol::ticket::new_secret();
    let stream: Arc<task_stream::TaskStream> = Default::default();
    let service = Service { tx: tx.clone(), stream: stream.clone(), shutdown: shutdown.clone(), put_secret };
    let svc = SchedulerServer::new(service)
        .max_decoding_message_size(dask_protocol::MAX_MESSAGE)
        .max_encoding_message_size(dask_protocol::MAX_MESSAGE);
    let handle = SchedulerHandle {
        address: address.clone(),
        dashboard: dashboard_address.clone(),
        shutdown: shutdown.clone(),
        tx: tx.clone(),
    };
    let last_tick: http::LastTick = Default::default();
    if let (Some(listener), Some(at)) = (dashboard, &dashboard_address) {
        tracing::info!(dashboard = %format!("{}/status", at.web_url()), "dashboard at");
        tokio::spawn(dask_protocol::http::serve(
            listener,
            http::router(handle.clone(), stream, last_tick.clone(), config.http_api),
            shutdown.clone(),
            config.https.clone(),
        ));
    }
    let core_config = config.core.clone();
    let preload = plugins::preload(&config.preload, &address.to_string()).map_err(std::io::Error::other)?;
    let fut = async move {
        let lp = EventLoop {
            core: SchedulerCore::new(core_config, Instant::now()),
            workers: HashMap::new(),
            worker_meta: HashMap::new(),
            nannies: HashMap::new(),
            next_nanny: 0,
            exit_reasons: HashMap::new(),
            pending_loss: HashMap::new(),
            expected_gone: HashSet::new(),
            restarts: Vec::new(),
            retires: HashMap::new(),
            copies: HashMap::new(),
            next_op: 1,
            self_tx: tx.clone(),
            clients: HashMap::new(),
            next_worker: 0,
            next_client: 0,
            commands: Vec::new(),
            coord: coord::Coordination::new(),
            coord_out: Vec::new(),
            runs: Default::default(),
            worker_plugins: Vec::new(),
            idle_since: None,
            idle_timeout: config.idle_timeout,
            activity: 0,
            activity_seen: 0,
            last_tick: last_tick.clone(),
            last_tick_at: None,
            loop_stats: Default::default(),
            put_secret,
            nanny_plugins: Vec::new(),
            nanny_runs: Default::default(),
            scheduler_plugins: Default::default(),
            waiters: Vec::new(),
            id,
            address: address.clone(),
            started,
            release: Release::default(),
        };
        let mut lp = lp;
        lp.install_preloaded(preload);
        let loop_task = tokio::spawn(lp.run(rx, shutdown.clone()));
        let incoming = dask_protocol::serve::incoming(listener, config.limits, "scheduler", config.security.clone());
        let server = dask_protocol::serve::server()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        serve_until(server, &shutdown, "scheduler").await;
        tracing::debug!("server stopped");
        let _ = loop_task.await;
        tracing::debug!("event loop stopped");
        if let Some(path) = &config.scheduler_file {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("scheduler closed");
    };
    Ok((handle, fut))
}

/// dask's scheduler file: JSON with at least `address`.
pub fn write_scheduler_file(
    path: &std::path::Path,
    id: &str,
    address: &Address,
    dashboard: Option<u16>,
) -> std::io::Result<()> {
    let services = match dashboard {
        Some(port) => serde_json::json!({ "dashboard": port }),
        None => serde_json::json!({}),
    };
    let json = serde_json::json!({
        "type": "Scheduler",
        "id": id,
        "address": address.to_string(),
        "services": services,
        "started": SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
        "workers": {},
    });
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&json)?)?;
    std::fs::rename(&tmp, path)
}

/// What the shell knows of a connected worker beyond the core's view.
struct WorkerMeta {
    address: Arc<str>,
    name: Arc<str>,
    nanny: Option<String>,
    version: String,
    dashboard: Option<String>,
}

/// A connected nanny.
struct NannyEntry {
    address: String,
    name: String,
    tx: NannyTx,
    /// Why its previous worker ended.
    last_exit: Option<String>,
}

/// A `Client::restart` waiting for the workers to come back.
struct RestartWaiter {
    old: BTreeSet<WorkerId>,
    n: usize,
    deadline: Instant,
    reply: oneshot::Sender<Result<u32, Status>>,
}

/// How long the loss of a worker with a nanny waits for the nanny to say why it ended (it
/// usually does within a millisecond; the reason ends up in killed-worker errors).
const NANNY_REASON_WAIT: Duration = Duration::from_millis(500);

struct EventLoop {
    core: SchedulerCore,
    workers: HashMap<WorkerId, WorkerTx>,
    worker_meta: HashMap<WorkerId, WorkerMeta>,
    nannies: HashMap<u32, NannyEntry>,
    next_nanny: u32,
    /// Why workers ended, as their nannies said, before their streams closed (by address).
    exit_reasons: HashMap<String, String>,
    /// Workers whose streams ended, waiting (up to [`NANNY_REASON_WAIT`]) for their nanny's
    /// account; the stream's own reason otherwise.
    pending_loss: HashMap<WorkerId, String>,
    /// Workers asked to go (restart): their loss is no one's fault.
    expected_gone: HashSet<WorkerId>,
    restarts: Vec<RestartWaiter>,
    /// Retire requests waiting for the core's answer, by op.
    retires: HashMap<u64, oneshot::Sender<Result<Vec<String>, Status>>>,
    copies: HashMap<u64, oneshot::Sender<Result<u32, Status>>>,
    next_op: u64,
    /// For timers that report back to the loop.
    self_tx: mpsc::UnboundedSender<LoopMsg>,
    clients: HashMap<ClientId, mpsc::UnboundedSender<Result<pb::SchedulerToClient, Status>>>,
    next_worker: u32,
    next_client: u32,
    commands: Vec<Command>,
    /// Locks, queues, variables, events, topics, datasets, metadata.
    coord: coord::Coordination,
    /// What `coord` said, to send with the next flush.
    coord_out: Vec<coord::Out>,
    /// `Client.run` requests waiting for workers, by run id.
    runs: run::Runs<WorkerId>,
    /// Worker plugins, in the order registered: given to every worker that joins.
    worker_plugins: Vec<pb::PluginSpec>,
    /// The HTTP side's last snapshot, and when it was made.
    idle_since: Option<SystemTime>,
    idle_timeout: Option<Duration>,
    /// Client messages so far, and as of the last tick (work between ticks is not idle).
    activity: u64,
    activity_seen: u64,
    /// When the loop last ticked, for `/health`.
    last_tick: http::LastTick,
    last_tick_at: Option<Instant>,
    loop_stats: http::LoopStats,
    /// Given to each worker: put tickets are checked with it.
    put_secret: dask_protocol::ticket::Secret,
    /// Nanny plugins, in the order registered: given to every nanny that connects.
    nanny_plugins: Vec<pb::PluginSpec>,
    nanny_runs: run::Runs<u32>,
    scheduler_plugins: plugins::SchedulerPlugins,
    waiters: Vec<(usize, oneshot::Sender<pb::SchedulerInfo>)>,
    id: String,
    address: Address,
    started: SystemTime,
    /// Events handled since memory was last given back to the system (on a tick, once a burst
    /// is over).
    release: Release,
}

/// Items handled on a thread between two gives-back of its freed memory (see [`Release`]).
const RELEASE_AFTER_EVENTS: usize = 10_000;

pub use dask_protocol::sys::release_free_memory;

/// Counts items handled on one thread and gives freed memory back after every
/// [`RELEASE_AFTER_EVENTS`]. Each thread that allocates much keeps one (the event loop, each
/// stream's reader): memory freed by other threads returns to the heap of the thread that
/// allocated it, which only a call on that thread gives back.
#[derive(Default)]
struct Release(usize);

impl Release {
    fn count(&mut self, n: usize) {
        self.0 += n;
    }

    /// Gives freed memory back if enough was handled since the last time.
    fn if_due(&mut self) {
        if self.0 >= RELEASE_AFTER_EVENTS {
            self.0 = 0;
            release_free_memory();
        }
    }
}

/// Tasks in an op (an `UpdateGraph` carries many), for [`Release`].
fn client_op_size(op: &pb::ClientOp) -> usize {
    match &op.kind {
        Some(pb::client_op::Kind::UpdateGraph(g)) => g.tasks.len(),
        _ => 1,
    }
}
