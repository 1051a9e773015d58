//! The worker's shell: connects to the scheduler, serves its values to peers and clients,
//! runs tasks on the thread pool, and feeds every outcome back into [`WorkerState`].
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dask_protocol::addr::Address;
use dask_protocol::codec::Value;
use dask_protocol::data;
use dask_protocol::pb::{self, scheduler_client::SchedulerClient};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::executor::Executor;
use crate::state::{ComputeRequest, Event, ExecOutcome, Instruction, Key, WorkerState};

mod data_service;

/// Values held by this worker, shared by the event loop, the executor threads and the data
/// service.
pub type Store = Arc<DashMap<Key, Value, rustc_hash::FxBuildHasher>>;

/// How to run one worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub scheduler: Address,
    pub nthreads: usize,
    /// Unique name; defaults to the worker's address.
    pub name: Option<String>,
    /// Bytes; 0 = no limit. Reported now, enforced with the nanny.
    pub memory_limit: u64,
    /// Host the data service binds and advertises.
    pub host: String,
    /// 0 = any free port.
    pub port: u16,
    pub local_directory: String,
    /// Give up if the scheduler cannot be reached for this long (None: keep trying).
    pub death_timeout: Option<Duration>,
    pub heartbeat: Duration,
    /// Benchmarks only ("zero worker", as in the RSDS paper): report every task done at once,
    /// with a nil value, without running it. Isolates the scheduler's cost per task.
    pub simulate: bool,
}

impl WorkerConfig {
    pub fn new(scheduler: Address) -> Self {
        WorkerConfig {
            scheduler,
            nthreads: 1,
            name: None,
            memory_limit: 0,
            host: "127.0.0.1".into(),
            port: 0,
            local_directory: std::env::temp_dir().display().to_string(),
            death_timeout: None,
            heartbeat: Duration::from_secs(1),
            simulate: false,
        }
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
}

/// A running worker, as seen by whoever started it.
#[derive(Clone, Debug)]
pub struct WorkerHandle {
    pub address: Address,
    pub name: String,
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
) -> Result<(WorkerHandle, impl std::future::Future<Output = Result<(), WorkerError>>), WorkerError> {
    let bind = format!("{}:{}", config.host, config.port);
    let listener = TcpListener::bind(&bind).await.map_err(|source| WorkerError::Bind { addr: bind.clone(), source })?;
    let local = listener.local_addr().map_err(|source| WorkerError::Bind { addr: bind, source })?;
    let address = Address { host: config.host.clone(), port: local.port() };
    let name = config.name.clone().unwrap_or_else(|| address.to_string());
    let store: Store = Arc::new(DashMap::with_hasher(rustc_hash::FxBuildHasher));
    let (events_tx, events_rx) = mpsc::unbounded_channel::<Event>();

    // The data service.
    let service = Arc::new(data_service::DataService { store: store.clone(), events: events_tx.clone() });
    let server = tokio::spawn(data::serve(listener, service, shutdown.clone()));

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
    };
    let _ = out_tx.send(pb::WorkerToScheduler {
        events: vec![pb::WorkerEvent { kind: Some(pb::worker_event::Kind::Register(register)) }],
    });
    let mut inbound = client
        .worker_stream(UnboundedReceiverStream::new(out_rx))
        .await
        .map_err(|s| WorkerError::SchedulerUnreachable {
            addr: config.scheduler.to_string(),
            waited: Duration::ZERO,
            why: s.message().to_string(),
        })?
        .into_inner();
    let first = inbound.message().await.map_err(|s| WorkerError::SchedulerLost(s.message().to_string()))?;
    let heartbeat = match first.and_then(|b| b.commands.into_iter().next()).and_then(|c| c.kind) {
        Some(pb::scheduler_command::Kind::Registered(r)) => {
            Duration::from_secs_f64(r.heartbeat_interval_s.max(0.05)).min(config.heartbeat)
        }
        Some(pb::scheduler_command::Kind::Close(c)) => return Err(WorkerError::Refused(c.reason)),
        _ => return Err(WorkerError::Refused("no registration reply".into())),
    };
    tracing::info!(address = %address, name = %name, nthreads = config.nthreads, scheduler = %config.scheduler, "worker registered");

    let handle = WorkerHandle { address: address.clone(), name, shutdown: shutdown.clone() };
    let run = async move {
        let executor = Executor::new(config.nthreads, store.clone(), address.to_string());
        let results = executor.results();
        let mut lp = Loop {
            state: WorkerState::new(config.nthreads),
            store,
            executor,
            events_tx,
            out_tx,
            peers: Arc::new(data::DataPool::default()),
            outgoing: Vec::new(),
            instructions: Vec::new(),
            simulate: config.simulate,
            shutdown: shutdown.clone(),
        };
        let result = lp.run(&mut inbound, events_rx, &results, heartbeat, shutdown.clone()).await;
        shutdown.cancel();
        lp.executor.shutdown();
        let _ = server.await;
        result
    };
    Ok((handle, run))
}

async fn connect_scheduler(config: &WorkerConfig) -> Result<Channel, WorkerError> {
    let started = Instant::now();
    let endpoint = dask_protocol::serve::endpoint(&config.scheduler, Duration::from_secs(5)).map_err(|e| {
        WorkerError::SchedulerUnreachable {
            addr: config.scheduler.to_string(),
            waited: Duration::ZERO,
            why: e.to_string(),
        }
    })?;
    let mut delay = Duration::from_millis(50);
    loop {
        match endpoint.connect().await {
            Ok(ch) => return Ok(ch),
            Err(e) => {
                let waited = started.elapsed();
                if config.death_timeout.is_some_and(|t| waited >= t) {
                    return Err(WorkerError::SchedulerUnreachable {
                        addr: config.scheduler.to_string(),
                        waited,
                        why: error_chain(&e),
                    });
                }
                tracing::warn!(scheduler = %config.scheduler, error = %error_chain(&e), "scheduler not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

pub use dask_protocol::error_chain;

struct Loop {
    state: WorkerState,
    store: Store,
    executor: Executor,
    events_tx: mpsc::UnboundedSender<Event>,
    out_tx: mpsc::UnboundedSender<pb::WorkerToScheduler>,
    peers: Arc<data::DataPool>,
    outgoing: Vec<pb::WorkerEvent>,
    instructions: Vec<Instruction>,
    simulate: bool,
    /// Ends fetches in flight when the worker stops.
    shutdown: CancellationToken,
}

/// msgpack's nil: the value of `()`, stored for simulated tasks.
static NIL: bytes::Bytes = bytes::Bytes::from_static(&[0xc0]);

impl Loop {
    async fn run(
        &mut self,
        inbound: &mut tonic::Streaming<pb::SchedulerToWorker>,
        mut events: mpsc::UnboundedReceiver<Event>,
        results: &crate::executor::Results,
        heartbeat: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let mut ticker = tokio::time::interval(heartbeat);
        let mut announced = 0;
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                msg = inbound.message() => match msg {
                    Ok(Some(batch)) => {
                        for cmd in batch.commands {
                            if let Some(closed) = self.on_command(cmd) {
                                tracing::info!(reason = %closed, "scheduler asked this worker to close");
                                return Ok(());
                            }
                        }
                    }
                    Ok(None) => return Err(WorkerError::SchedulerLost("the scheduler closed the stream".into())),
                    Err(s) => return Err(WorkerError::SchedulerLost(s.message().to_string())),
                },
                _ = results.wake.notified() => {
                    let batch = results.take();
                    for (key, outcome, duration) in batch.done {
                        self.state.handle(Event::ExecDone { key, outcome, duration }, &mut self.instructions);
                    }
                    if !batch.started.is_empty() {
                        self.state.handle(Event::Started(batch.started), &mut self.instructions);
                    }
                    announced = batch.announces;
                }
                Some(ev) = events.recv() => {
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
                    let memory: u64 = self.store.iter().map(|e| e.value().data.len() as u64).sum();
                    self.outgoing.push(pb::WorkerEvent { kind: Some(pb::worker_event::Kind::Heartbeat(pb::Heartbeat {
                        memory,
                        executing: self.state.executing() as u32,
                        in_memory: self.state.in_memory() as u32,
                    }))});
                }
            }
            self.apply();
            if !self.outgoing.is_empty() {
                let events = std::mem::take(&mut self.outgoing);
                if self.out_tx.send(pb::WorkerToScheduler { events }).is_err() {
                    return Err(WorkerError::SchedulerLost("the outgoing stream closed".into()));
                }
            }
            // Threads waiting to run an announced task may go: its start is on its way.
            results.sent(announced);
        }
    }

    /// Returns `Some(reason)` when the scheduler asks us to close.
    fn on_command(&mut self, cmd: pb::SchedulerCommand) -> Option<String> {
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
                };
                self.state.handle(Event::Compute(req), &mut self.instructions);
            }
            pb::scheduler_command::Kind::Free(f) => {
                for k in f.keys {
                    self.state.handle(Event::Free(Arc::from(k)), &mut self.instructions);
                }
            }
            pb::scheduler_command::Kind::Close(c) => return Some(c.reason),
            pb::scheduler_command::Kind::Registered(_) => {}
        }
        None
    }

    fn apply(&mut self) {
        loop {
            let mut simulated = Vec::new();
            self.apply_once(&mut simulated);
            if simulated.is_empty() {
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
                Instruction::Drop(key) => {
                    self.store.remove(&key);
                }
                Instruction::Send(mut kind) => {
                    if let pb::worker_event::Kind::Finished(f) = &mut kind
                        && f.has_value
                    {
                        match self.store.get(f.key.as_str()) {
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

async fn fetch(
    from: Arc<str>,
    keys: Vec<Key>,
    peers: Arc<data::DataPool>,
    store: Store,
    events: mpsc::UnboundedSender<Event>,
) {
    let result = peers.get_data(&from, keys.iter().map(|k| k.to_string()).collect()).await;
    let (mut got, mut missing) = (Vec::new(), Vec::new());
    match result {
        Ok(values) => {
            // One entry per key asked, in order (`get_data`).
            for (key, (_, v)) in keys.into_iter().zip(values) {
                match v {
                    Some(v) => {
                        let n = v.data.len() as u64;
                        store.insert(key.clone(), v);
                        got.push((key, n));
                    }
                    None => missing.push(key),
                }
            }
        }
        Err(e) => {
            tracing::warn!(peer = %from, error = %e, "fetching dependencies failed");
            peers.forget(&from);
            missing = keys;
        }
    }
    let _ = events.send(Event::FetchDone { from, got, missing });
}
