//! The worker's shell: connects to the scheduler, serves its values to peers and clients,
//! runs tasks on the thread pool, and feeds every outcome back into [`WorkerState`].
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dask_protocol::addr::Address;
use dask_protocol::codec::Value;
use dask_protocol::data;
use dask_protocol::pb::{self, scheduler_client::SchedulerClient};
use dask_protocol::sys::ProcessMemory;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::context::WorkerContext;
use crate::executor::Executor;
use crate::memory::{MemoryPolicy, Thresholds};
use crate::state::{ComputeRequest, Event, ExecOutcome, Instruction, Key, WorkerState};
use crate::store::{SpillConfig, Store};

mod data_service;
mod http;
mod io;
use io::{bind_in_range, connect_scheduler, fetch, spill_until};

/// How to run one worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub scheduler: Address,
    pub nthreads: usize,
    /// Unique name; defaults to the worker's address.
    pub name: Option<String>,
    /// Bytes; 0 = no limit (and no spilling, pausing or restarting for memory).
    pub memory_limit: u64,
    /// dask's memory thresholds (`distributed.worker.memory.*`).
    pub thresholds: Thresholds,
    /// How often process memory is sampled (dask: 100 ms).
    pub monitor_interval: Duration,
    /// Bytes of spilled values kept on disk at most (`None`: no cap).
    pub max_spill: Option<u64>,
    /// Compress spilled values (LZ4).
    pub spill_compression: bool,
    /// Largest value a data connection accepts (`None`: memory limit plus spill room decide).
    pub max_value_size: Option<u64>,
    /// Host the data service binds and advertises.
    pub host: String,
    /// 0 = any free port.
    pub port: u16,
    /// The worker keeps its files (spilled values) in its own directory under this one
    /// (`dask-scratch-space/worker-<pid>-<port>`), removed when it exits cleanly.
    pub local_directory: String,
    /// Give up if the scheduler cannot be reached for this long (None: keep trying).
    pub death_timeout: Option<Duration>,
    pub heartbeat: Duration,
    /// The address of the nanny supervising this worker, if any (told to the scheduler).
    pub nanny: Option<String>,
    /// Retire gracefully after this long (`--lifetime`).
    pub lifetime: Option<Duration>,
    /// After its lifetime, ask the nanny for a fresh worker.
    pub lifetime_restart: bool,
    /// Benchmarks only ("zero worker", as in the RSDS paper): report every task done at once,
    /// with a nil value, without running it. Isolates the scheduler's cost per task.
    pub simulate: bool,
    /// Abstract resources (`--resources "GPU=2 MEM=10e9"`): tasks that need them run only
    /// where they are free.
    pub resources: Vec<(String, f64)>,
    /// Where to serve `/health` and `/metrics` (host, port; port 0: any, a port in use falls
    /// back to a free one); `None`: nowhere (`--no-dashboard`).
    pub dashboard: Option<(String, u16)>,
    /// Serve that HTTP side as HTTPS with this certificate: dask reads
    /// `distributed.scheduler.dashboard.tls.cert` and `.key` for every server's HTTP port.
    pub https: Option<dask_protocol::tls::Https>,
    /// With `port`, a range of ports (`--worker-port 18810:18820`): the first free one is taken.
    pub port_to: Option<u16>,
    /// The address others reach this worker by, when not where it listens (dask's
    /// `--contact-address`: behind address translation, a container's port mapping). `None`:
    /// the listening address; listening on all interfaces, the address that routes to the
    /// scheduler.
    pub contact: Option<Address>,
    /// TLS credentials: the worker is then at a `tls://` address, reaches a `tls://` scheduler
    /// and peers with them, and accepts only peers the cluster's CA signed.
    pub security: Option<dask_protocol::tls::Security>,
}

impl WorkerConfig {
    pub fn new(scheduler: Address) -> Self {
        WorkerConfig {
            scheduler,
            nthreads: 1,
            name: None,
            memory_limit: 0,
            thresholds: Thresholds::default(),
            monitor_interval: Duration::from_millis(100),
            max_spill: None,
            spill_compression: false,
            max_value_size: None,
            host: "127.0.0.1".into(),
            port: 0,
            local_directory: std::env::temp_dir().display().to_string(),
            death_timeout: None,
            heartbeat: Duration::from_secs(1),
            nanny: None,
            lifetime: None,
            lifetime_restart: false,
            simulate: false,
            resources: Vec::new(),
            dashboard: None,
            https: None,
            port_to: None,
            contact: None,
            security: None,
        }
    }

    /// Reads the `distributed.worker.*` settings dask-rs knows (thresholds, monitor interval,
    /// max-spill, spill compression, max-value-size).
    pub fn apply_config(&mut self, c: &dask_protocol::config::Config) -> Result<(), String> {
        let e = |e: dask_protocol::config::ConfigError| e.to_string();
        self.thresholds = Thresholds::from_config(c)?;
        if let Some(t) = c.duration("distributed.worker.memory.monitor-interval").map_err(e)? {
            self.monitor_interval = t.max(Duration::from_millis(1));
        }
        self.max_spill = c.bytes("distributed.worker.memory.max-spill").map_err(e)?;
        self.spill_compression = match c.string("distributed.worker.memory.spill-compression").as_deref() {
            None | Some("false" | "False" | "none" | "None") => false,
            Some("auto" | "lz4") => true,
            Some(other) => {
                return Err(format!(
                    "distributed.worker.memory.spill-compression = {other:?} is not known (use lz4, auto or false)"
                ));
            }
        };
        self.max_value_size = c.bytes("distributed.worker.max-value-size").map_err(e)?;
        if self.https.is_none() {
            self.https = dask_protocol::tls::Https::from_config(c)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("failed to bind the worker's data service on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to reach the scheduler at {addr} within {waited:?}: {why}; is dask-scheduler running there?")]
    SchedulerUnreachable { addr: String, waited: Duration, why: String },
    #[error("the scheduler refused this worker: {0}")]
    Refused(String),
    #[error("the connection to the scheduler was lost: {0}")]
    SchedulerLost(String),
    /// Stopped (a signal, or its owner closed it) before it registered.
    #[error("stopped before it registered with the scheduler")]
    Stopped,
    #[error("failed to make the worker's directory under {dir}: {source}; check --local-directory")]
    Directory {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a worker's run ended, when it ended well.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub reason: String,
    /// Its nanny should start a fresh worker in its place (the scheduler removed it, say).
    pub restart: bool,
    /// Stopped by its owner (a signal, the program that started it), not by the scheduler.
    pub by_owner: bool,
}

impl Closed {
    fn by_owner() -> Closed {
        Closed {
            reason: "closed by its owner (a signal, or the program that started it)".into(),
            restart: false,
            by_owner: true,
        }
    }
}

/// A running worker, as seen by whoever started it.
#[derive(Clone, Debug)]
pub struct WorkerHandle {
    pub address: Address,
    pub name: String,
    /// The port of its HTTP side (`/health`, `/metrics`), if it serves one.
    pub dashboard: Option<u16>,
    shutdown: CancellationToken,
}

impl WorkerHandle {
    pub fn close(&self) {
        self.shutdown.cancel();
    }
}

/// Binds the data service and starts the worker; returns once it is registered with the
/// scheduler, with a future that runs it to the end.
pub async fn start(
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<(WorkerHandle, impl std::future::Future<Output = Result<Closed, WorkerError>>), WorkerError> {
    let (listener, bind) = bind_in_range(&config.host, config.port, config.port_to).await?;
    let local = listener.local_addr().map_err(|source| WorkerError::Bind { addr: bind, source })?;
    let address = match &config.contact {
        Some(c) => c.clone(),
        None if local.ip().is_unspecified() => {
            // Listening everywhere: advertise the address that routes to the scheduler (dask).
            let ip = dask_protocol::addr::route_ip_to(&config.scheduler.host, config.scheduler.port)
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
            Address { host: ip.to_string(), port: local.port(), tls: false }
        }
        None => Address { host: config.host.clone(), port: local.port(), tls: false },
    }
    .with_tls(config.security.is_some());
    let name = config.name.clone().unwrap_or_else(|| address.to_string());
    let policy = MemoryPolicy::new(config.memory_limit, config.thresholds);
    let scratch = Path::new(&config.local_directory).join("dask-scratch-space");
    crate::store::remove_stale_dirs(&scratch);
    let spill = policy.spills().then(|| SpillConfig {
        dir: scratch.join(format!("worker-{}-{}", std::process::id(), address.port)),
        target: policy.target_bytes(),
        max_spill: config.max_spill,
        compress: config.spill_compression,
    });
    let store =
        Store::new(spill).map_err(|source| WorkerError::Directory { dir: scratch.display().to_string(), source })?;
    let (events_tx, events_rx) = mpsc::unbounded_channel::<Event>();

    // The data service.
    let service = Arc::new(data_service::DataService {
        store: store.clone(),
        events: events_tx.clone(),
        memory_limit: config.memory_limit,
        max_value_size: config.max_value_size,
        address: address.to_string(),
        put_secret: Default::default(),
    });
    let server = tokio::spawn(data::serve(listener, service.clone(), shutdown.clone(), config.security.clone()));
    let published: http::Shared = Default::default();
    {
        let mut p = published.lock();
        p.nthreads = config.nthreads;
        p.memory_limit = config.memory_limit;
    }
    let dashboard = match &config.dashboard {
        Some((host, port)) => {
            let l = dask_protocol::http::bind(host, *port, "the worker")
                .await
                .map_err(|source| WorkerError::Bind { addr: format!("{host}:{port}"), source })?;
            let at = l.local_addr().map_err(|source| WorkerError::Bind { addr: format!("{host}:{port}"), source })?;
            let router = http::router(published.clone());
            tokio::spawn(dask_protocol::http::serve(l, router, shutdown.clone(), config.https.clone()));
            Some(at.port())
        }
        None => None,
    };

    // Register with the scheduler.
    let channel = tokio::select! {
        r = connect_scheduler(&config) => r?,
        // Retrying forever must not make SIGTERM or Ctrl-C wait (systemd stop would hang).
        _ = shutdown.cancelled() => return Err(WorkerError::Stopped),
    };
    let mut client = SchedulerClient::new(channel)
        .max_decoding_message_size(dask_protocol::MAX_MESSAGE)
        .max_encoding_message_size(dask_protocol::MAX_MESSAGE);
    let (out_tx, out_rx) = mpsc::unbounded_channel::<pb::WorkerToScheduler>();
    let register = pb::WorkerRegister {
        name: name.clone(),
        address: address.to_string(),
        nthreads: config.nthreads as u32,
        memory_limit: config.memory_limit,
        local_directory: config.local_directory.clone(),
        pid: std::process::id(),
        host: config.host.clone(),
        nanny: config.nanny.clone().unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        dashboard_port: dashboard.map_or(0, u32::from),
        dashboard_https: config.https.is_some(),
        resources: config
            .resources
            .iter()
            .map(|(name, amount)| pb::Resource { name: name.clone(), amount: *amount })
            .collect(),
    };
    let _ = out_tx.send(pb::WorkerToScheduler {
        events: vec![pb::WorkerEvent { kind: Some(pb::worker_event::Kind::Register(register)) }],
    });
    let opened = client.worker_stream(UnboundedReceiverStream::new(out_rx)).await;
    let mut inbound = match opened {
        Ok(r) => r.into_inner(),
        Err(status) => {
            let s = &config.scheduler;
            // A TLS scheduler given as tcp:// answers with alerts, never with HTTP/2.
            let why = match dask_protocol::serve::tls_behind_tcp(s).await {
                Some(tls) => tls.to_string(),
                None => status.message().to_string(),
            };
            return Err(WorkerError::SchedulerUnreachable { addr: s.to_string(), waited: Duration::ZERO, why });
        }
    };
    let first = inbound.message().await.map_err(|s| WorkerError::SchedulerLost(s.message().to_string()))?;
    let (heartbeat, plugin_specs) = match first.and_then(|b| b.commands.into_iter().next()).and_then(|c| c.kind) {
        Some(pb::scheduler_command::Kind::Registered(r)) => {
            let secret: dask_protocol::ticket::Secret = r.put_secret[..].try_into().map_err(|_| {
                WorkerError::Refused(
                    "the scheduler gave no put secret: it is of another dask-rs version; run one version".into(),
                )
            })?;
            *service.put_secret.write() = Some(secret);
            (Duration::from_secs_f64(r.heartbeat_interval_s.max(0.05)).min(config.heartbeat), r.plugins)
        }
        Some(pb::scheduler_command::Kind::Close(c)) => return Err(WorkerError::Refused(c.reason)),
        _ => return Err(WorkerError::SchedulerLost("the scheduler did not answer the registration".into())),
    };
    tracing::info!(
        address = %address,
        name = %name,
        scheduler = %config.scheduler,
        threads = config.nthreads,
        memory_limit = %if config.memory_limit == 0 { "none".to_string() } else { format!("{:.2} GiB", config.memory_limit as f64 / (1u64 << 30) as f64) },
        local_directory = %scratch.display(),
        dashboard = ?dashboard,
        "worker registered"
    );

    let handle = WorkerHandle { address: address.clone(), name: name.clone(), dashboard, shutdown: shutdown.clone() };
    let run = async move {
        let context = WorkerContext::new(
            address.to_string(),
            name.clone(),
            config.scheduler.to_string(),
            config.nthreads,
            config.security.clone(),
        );
        let plugins =
            crate::plugins::Plugins::new(scratch.join(format!("files-{}-{}", std::process::id(), address.port)));
        // The cluster's plugins are set up before the first task runs (dask's order).
        if !plugin_specs.is_empty() {
            let (p, c) = (plugins.clone(), context.clone());
            let _ = tokio::task::spawn_blocking(move || p.install_all(&c, plugin_specs)).await;
        }
        let executor = Executor::new(config.nthreads, store.clone(), context.clone());
        let results = executor.results();
        let mut lp = Loop {
            state: WorkerState::new(config.nthreads).with_resources(&config.resources),
            store: store.clone(),
            policy,
            sampler: ProcessMemory::this_process(),
            rss: 0,
            spilling: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            last_collect: None,
            executor,
            events_tx,
            out_tx,
            peers: Arc::new(data::DataPool::with_security(config.security.clone())),
            outgoing: Vec::new(),
            instructions: Vec::new(),
            simulate: config.simulate,
            shutdown: shutdown.clone(),
            context,
            actors: Default::default(),
            plugins: plugins.clone(),
            published,
            run_threads: Default::default(),
            timing: Default::default(),
        };
        let timers = Timers {
            heartbeat,
            monitor_interval: config.monitor_interval,
            lifetime: config.lifetime.map(|d| (d, config.lifetime_restart)),
        };
        let result = lp.run(&mut inbound, events_rx, &results, timers, shutdown.clone()).await;
        shutdown.cancel();
        lp.executor.shutdown();
        let context = lp.context.clone();
        let _ = tokio::task::spawn_blocking(move || plugins.teardown_all(&context)).await;
        // No put is served after this; then the files go.
        let _ = server.await;
        store.close();
        result
    };
    Ok((handle, run))
}

pub use dask_protocol::error_chain;

/// The worker loop's clocks.
struct Timers {
    heartbeat: Duration,
    /// The memory monitor's.
    monitor_interval: Duration,
    /// `--lifetime`, and whether a fresh worker should follow.
    lifetime: Option<(Duration, bool)>,
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `f`, which reads or writes spilled values on disk: on a multi-thread runtime the thread
/// steps out of the async scheduling first, so other tasks (heartbeats, the scheduler stream)
/// are not held up by the disk. Callers check first that the disk is involved at all
/// ([`Store::get_in_memory`], [`Store::may_spill`]): stepping out costs more than a map lookup.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi { tokio::task::block_in_place(f) } else { f() }
}

/// The value of `key`, from memory, or read back from disk off the async threads.
pub(crate) fn get_value(store: &Store, key: &str) -> Option<Value> {
    match store.get_in_memory(key) {
        Ok(v) => v,
        Err(_) => blocking(|| store.get(key)),
    }
}

/// Stores a value, off the async threads when that may spill to disk.
pub(crate) fn put_value(store: &Store, key: Key, value: Value) {
    if store.may_spill(value.data.len() as u64) {
        blocking(|| store.insert(key, value));
    } else {
        store.insert(key, value);
    }
}

struct Loop {
    state: WorkerState,
    store: Arc<Store>,
    policy: MemoryPolicy,
    sampler: ProcessMemory,
    /// Last sample of this process's resident memory.
    rss: u64,
    /// A spill to bring process memory down is under way (on a blocking thread).
    spilling: Arc<std::sync::atomic::AtomicBool>,
    /// When freed memory was last given back to the system while over the pause threshold.
    last_collect: Option<Instant>,
    executor: Executor,
    events_tx: mpsc::UnboundedSender<Event>,
    out_tx: mpsc::UnboundedSender<pb::WorkerToScheduler>,
    peers: Arc<data::DataPool>,
    outgoing: Vec<pb::WorkerEvent>,
    instructions: Vec<Instruction>,
    simulate: bool,
    /// Ends fetches in flight when the worker stops.
    shutdown: CancellationToken,
    /// What tasks (and `Client.run` functions) see of this worker.
    context: Arc<WorkerContext>,
    /// The actors it hosts.
    actors: crate::actors::Actors,
    plugins: Arc<crate::plugins::Plugins>,
    /// What the HTTP side shows, published with each heartbeat.
    published: http::Shared,
    /// `Client.run` functions running now, each on a thread.
    run_threads: Arc<std::sync::atomic::AtomicUsize>,
    /// When and on which thread tasks just done ran, until their report goes out.
    timing: rustc_hash::FxHashMap<Key, crate::executor::Timing>,
}

/// `Client.run` functions running at once on one worker, at most.
const MAX_RUN_THREADS: usize = 256;

/// msgpack's nil: the value of `()`, stored for simulated tasks.
static NIL: bytes::Bytes = bytes::Bytes::from_static(&[0xc0]);

impl Loop {
    async fn run(
        &mut self,
        inbound: &mut tonic::Streaming<pb::SchedulerToWorker>,
        mut events: mpsc::UnboundedReceiver<Event>,
        results: &crate::executor::Results,
        timers: Timers,
        shutdown: CancellationToken,
    ) -> Result<Closed, WorkerError> {
        let Timers { heartbeat, monitor_interval, lifetime } = timers;
        // `--lifetime`: when it is over, the worker asks the scheduler to retire it (its values
        // move to others first); the scheduler then closes it.
        let retire_at = lifetime.map(|(d, _)| tokio::time::Instant::now() + d);
        let mut retire_asked = false;
        let mut ticker = tokio::time::interval(heartbeat);
        let mut monitor = tokio::time::interval(monitor_interval);
        monitor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let monitoring = self.policy.limit() > 0;
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(Closed::by_owner()),
                msg = inbound.message() => match msg {
                    Ok(Some(batch)) => {
                        self.sync_trace();
                        for cmd in batch.commands {
                            if let Some(closed) = self.on_command(cmd) {
                                tracing::info!(reason = %closed.reason, restart = closed.restart, "scheduler asked this worker to close");
                                return Ok(closed);
                            }
                        }
                    }
                    Ok(None) => return Err(WorkerError::SchedulerLost("the scheduler closed the stream".into())),
                    Err(s) => return Err(WorkerError::SchedulerLost(s.message().to_string())),
                },
                _ = results.wake.notified() => {
                    self.sync_trace();
                    let batch = results.take();
                    for (key, outcome, duration, timing) in batch.done {
                        self.timing.insert(key.clone(), timing);
                        self.state.handle(Event::ExecDone { key, outcome, duration }, &mut self.instructions);
                    }
                    if !batch.seceded.is_empty() {
                        self.outgoing.push(pb::WorkerEvent {
                            kind: Some(pb::worker_event::Kind::Seceded(pb::KeysReleased {
                                keys: batch.seceded.iter().map(|k| k.to_string()).collect(),
                            })),
                        });
                    }
                    if !batch.started.is_empty() {
                        // Starts of tasks no longer running are not reported: nothing to wait for.
                        let gone: Vec<Key> =
                            batch.started.iter().filter(|k| !self.state.is_running(k)).cloned().collect();
                        self.state.handle(Event::Started(batch.started), &mut self.instructions);
                        results.acknowledge(gone);
                    }
                }
                Some(ev) = events.recv() => {
                    self.sync_trace();
                    self.state.handle(ev, &mut self.instructions);
                    // Take whatever else is ready: one batch out per wake-up.
                    for _ in 0..4096 {
                        match events.try_recv() {
                            Ok(ev) => self.state.handle(ev, &mut self.instructions),
                            Err(_) => break,
                        }
                    }
                }
                _ = ticker.tick() => {
                    if !monitoring {
                        self.rss = self.sampler.sample().unwrap_or(0);
                    }
                    self.heartbeat();
                }
                _ = monitor.tick(), if monitoring => self.on_monitor(),
                _ = sleep_until(retire_at), if retire_at.is_some() && !retire_asked => {
                    retire_asked = true;
                    let (d, restart) = lifetime.expect("set with retire_at");
                    tracing::info!(?d, restart, "lifetime over: asking the scheduler to retire this worker");
                    self.outgoing.push(pb::WorkerEvent {
                        kind: Some(pb::worker_event::Kind::RetireMe(pb::RetireMe {
                            reason: format!("its lifetime ({d:?}) is over"),
                            restart,
                        })),
                    });
                }
            }
            self.apply();
            if !self.outgoing.is_empty() {
                let events = std::mem::take(&mut self.outgoing);
                if self.out_tx.send(pb::WorkerToScheduler { events }).is_err() {
                    return Err(WorkerError::SchedulerLost("the outgoing stream closed".into()));
                }
            }
        }
    }

    /// Transitions are reported only while a plugin listens (read on each wake-up: a plugin
    /// installed on the plugin thread is seen by the next event).
    fn sync_trace(&mut self) {
        self.state.set_trace(self.plugins.active());
    }

    fn heartbeat(&mut self) {
        let stats = self.store.stats();
        let hb = pb::Heartbeat {
            memory: self.rss,
            executing: self.state.executing() as u32,
            in_memory: self.state.in_memory() as u32,
            managed: stats.managed,
            spilled: stats.spilled,
            spilled_count: stats.spilled_count,
            paused: self.policy.paused(),
            spilled_total: stats.spilled_total,
        };
        {
            let mut p = self.published.lock();
            p.heartbeat = hb;
            p.at = Some(Instant::now());
        }
        self.outgoing.push(pb::WorkerEvent { kind: Some(pb::worker_event::Kind::Heartbeat(hb)) });
    }

    /// One memory sample: pause or resume, and spill if the process is over `spill`.
    fn on_monitor(&mut self) {
        let Some(mut rss) = self.sampler.sample() else { return };
        // Over the pause threshold: first give freed memory back to the system (at most once a
        // second), as dask collects garbage while paused. A large value just dropped by a task
        // otherwise stays in the allocator's caches and keeps the worker paused.
        if self.policy.over_pause(rss) && self.last_collect.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            self.last_collect = Some(Instant::now());
            dask_protocol::sys::release_free_memory();
            rss = self.sampler.sample().unwrap_or(rss);
        }
        self.rss = rss;
        let decision = self.policy.on_sample(rss);
        if let Some(paused) = decision.pause {
            let limit = self.policy.limit();
            let pct = rss as f64 * 100.0 / limit.max(1) as f64;
            if paused {
                tracing::warn!(
                    "worker is at {pct:.0}% memory usage ({} MB of {} MB): pausing (no task starts, no \
                     fetches) until it is below the pause threshold",
                    rss / 1_000_000,
                    limit / 1_000_000
                );
            } else {
                tracing::warn!("worker is at {pct:.0}% memory usage: resuming");
            }
            self.executor.pause(paused);
            self.state.handle(Event::Paused(paused), &mut self.instructions);
            // The scheduler hears of it now, not at the next heartbeat.
            self.heartbeat();
        }
        if let Some(until) = decision.spill_until
            && !self.spilling.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let (store, spilling) = (self.store.clone(), self.spilling.clone());
            tokio::task::spawn_blocking(move || {
                spill_until(&store, until);
                spilling.store(false, std::sync::atomic::Ordering::Release);
            });
        }
    }

    /// Returns `Some(reason)` when the scheduler asks us to close.
    fn on_command(&mut self, cmd: pb::SchedulerCommand) -> Option<Closed> {
        match cmd.kind? {
            pb::scheduler_command::Kind::Compute(c) => {
                let req = ComputeRequest {
                    key: Arc::from(c.key),
                    spec: c.spec,
                    deps: c
                        .dependencies
                        .into_iter()
                        .map(|d| (Arc::from(d.key), d.workers.into_iter().map(Arc::from).collect()))
                        .collect(),
                    priority: c.priority,
                    inline: c.inline_result,
                    announce: c.announce,
                    resources: c.resources.into_iter().map(|r| (Arc::from(r.name), r.amount)).collect(),
                };
                self.state.handle(Event::Compute(req), &mut self.instructions);
            }
            pb::scheduler_command::Kind::Free(f) => {
                for k in f.keys {
                    self.state.handle(Event::Free(Arc::from(k)), &mut self.instructions);
                }
            }
            pb::scheduler_command::Kind::Close(c) => {
                return Some(Closed { reason: c.reason, restart: c.restart, by_owner: false });
            }
            pb::scheduler_command::Kind::Registered(_) => {}
            pb::scheduler_command::Kind::AcquireReplicas(a) => {
                let keys = a
                    .keys
                    .into_iter()
                    .map(|d| (Arc::from(d.key), d.workers.into_iter().map(Arc::from).collect()))
                    .collect();
                self.state.handle(Event::Acquire(keys), &mut self.instructions);
            }
            pb::scheduler_command::Kind::Steal(s) => {
                self.state.handle(Event::Steal { key: Arc::from(s.key), id: s.id }, &mut self.instructions);
                // The executor answers now, before the next command of the batch: a Free and a
                // Compute of the same key later in the batch must find the task as the answer
                // left it (an Unqueue applied after them dropped the new run for good).
                if let Some(Instruction::Unqueue { .. }) = self.instructions.last()
                    && let Some(Instruction::Unqueue { key, id }) = self.instructions.pop()
                {
                    // A task whose Execute is still among the instructions is not on the
                    // executor's queue yet: "not removed", and it runs here.
                    let removed = !self.simulate && self.executor.unqueue(&key);
                    self.state.handle(Event::Unqueued { key, id, removed }, &mut self.instructions);
                }
            }
            pb::scheduler_command::Kind::Run(pb::RunFunction { id, actor: Some(op), .. }) => {
                self.actors.handle(id, op, &self.context.address, &self.out_tx);
            }
            pb::scheduler_command::Kind::Run(pb::RunFunction {
                id,
                plugin: Some(pb::PluginOp { op: Some(op) }),
                ..
            }) => {
                self.plugins.submit(id, op, self.context.clone(), self.out_tx.clone());
            }
            pb::scheduler_command::Kind::Run(r) => {
                // On a thread of its own, beside the task pool; the answer goes straight out.
                let (out, context, id) = (self.out_tx.clone(), self.context.clone(), r.id);
                let send = move |out: &mpsc::UnboundedSender<pb::WorkerToScheduler>, result| {
                    let done = pb::RunDone { id, result: Some(result) };
                    let _ = out.send(pb::WorkerToScheduler {
                        events: vec![pb::WorkerEvent { kind: Some(pb::worker_event::Kind::RunDone(done)) }],
                    });
                };
                // Each on a thread of its own, but not without bound: a client firing runs
                // without waiting must not make the worker start thousands of threads.
                let running = self.run_threads.clone();
                if running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_RUN_THREADS {
                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    let why = dask_protocol::task::ExecErrorKind::Error(format!(
                        "{MAX_RUN_THREADS} Client.run functions run on this worker already: wait for them \
                         (run with wait=true) before asking for more"
                    ));
                    send(&out, dask_protocol::task::run_result(&self.context.address, "", Err(why)));
                    return None;
                }
                let (to, spec) = (out.clone(), r.spec.clone());
                let done = running.clone();
                let spawned = std::thread::Builder::new().name("dask-run".into()).spawn(move || {
                    send(&to, crate::context::run_function(&context, id, &spec));
                    done.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    // Answered anyway: the caller must not wait for a run that never started.
                    let why =
                        dask_protocol::task::ExecErrorKind::Error(format!("could not start a thread to run it: {e}"));
                    send(&out, dask_protocol::task::run_result(&self.context.address, "", Err(why)));
                }
            }
            pb::scheduler_command::Kind::StartedAck(a) => {
                self.executor.results().acknowledge(a.keys.into_iter().map(Arc::from));
            }
        }
        None
    }

    fn apply(&mut self) {
        loop {
            let mut simulated = Vec::new();
            self.apply_once(&mut simulated);
            if simulated.is_empty() {
                // Tasks whose end sent nothing (cancelled) leave no timing behind.
                self.timing.clear();
                return;
            }
            for ev in simulated {
                self.state.handle(ev, &mut self.instructions);
            }
        }
    }

    fn apply_once(&mut self, simulated: &mut Vec<Event>) {
        for ins in std::mem::take(&mut self.instructions) {
            match ins {
                Instruction::Execute { key, spec, priority, order, announce } => {
                    if self.simulate {
                        self.store
                            .insert(key.clone(), Value { codec: dask_protocol::codec::MSGPACK, data: NIL.clone() });
                        simulated.push(Event::ExecDone {
                            key,
                            outcome: ExecOutcome::Ok { nbytes: 1, type_name: String::new() },
                            duration: Duration::ZERO,
                        });
                    } else {
                        self.executor.submit(key, spec, priority, order, announce)
                    }
                }
                Instruction::Cancel(key) => self.executor.cancel(&key),
                Instruction::Unqueue { key, id } => {
                    // Handled where the Steal arrives (`on_command`); here only if another
                    // path ever emits one.
                    let removed = !self.simulate && self.executor.unqueue(&key);
                    simulated.push(Event::Unqueued { key, id, removed });
                }
                Instruction::Drop(key) => self.store.remove(&key),
                Instruction::Transition { key, start, finish } => self.plugins.transition(&key, start, finish),
                Instruction::Send(mut kind) => {
                    // When and where it ran, for the task stream.
                    match &mut kind {
                        pb::worker_event::Kind::Finished(f) => {
                            if let Some(t) = self.timing.remove(f.key.as_str()) {
                                (f.start_s, f.thread) = (t.start_s, t.thread);
                            }
                        }
                        pb::worker_event::Kind::Failed(f) => {
                            if let Some(t) = self.timing.remove(f.key.as_str()) {
                                (f.start_s, f.thread) = (t.start_s, t.thread);
                            }
                        }
                        _ => {}
                    }
                    if let pb::worker_event::Kind::Finished(f) = &mut kind
                        && f.has_value
                    {
                        match get_value(&self.store, &f.key) {
                            Some(v) => {
                                f.value = v.data.clone();
                                f.codec = v.codec.to_string();
                            }
                            None => f.has_value = false,
                        }
                    }
                    self.outgoing.push(pb::WorkerEvent { kind: Some(kind) })
                }
                Instruction::Fetch { from, keys } => {
                    let peers = self.peers.clone();
                    let store = self.store.clone();
                    let events = self.events_tx.clone();
                    let shutdown = self.shutdown.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = fetch(from, keys, peers, store, events) => {}
                        }
                    });
                }
            }
        }
    }
}
