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
        Ok(())
    }
}

/// A running scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    pub address: Address,
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
    WorkerConnected {
        spec: WorkerSpec,
        /// Its nanny's address, if it has one.
        nanny: Option<String>,
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
    Query(Query),
}

enum Query {
    WhoHas(Vec<String>, oneshot::Sender<pb::WhoHasReply>),
    HasWhat(oneshot::Sender<pb::HasWhatReply>),
    Info(oneshot::Sender<pb::SchedulerInfo>),
    WaitForWorkers(usize, oneshot::Sender<pb::SchedulerInfo>),
}

/// Starts a scheduler on `listener`; it runs until `shutdown` is cancelled.
/// Returns the handle and a future that runs the scheduler to the end.
pub async fn run(
    listener: TcpListener,
    config: SchedulerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<(SchedulerHandle, impl std::future::Future<Output = ()>)> {
    let local = listener.local_addr()?;
    // Listening on all interfaces: advertise loopback, which always reaches us here.
    let address = if local.ip().is_unspecified() {
        Address { host: "127.0.0.1".into(), port: local.port() }
    } else {
        Address::from(local)
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let id = format!("Scheduler-{:x}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    if let Some(path) = &config.scheduler_file {
        write_scheduler_file(path, &id, &address)?;
    }
    let started = SystemTime::now();
    let service = Service { tx: tx.clone() };
    let svc = SchedulerServer::new(service)
        .max_decoding_message_size(dask_protocol::MAX_MESSAGE)
        .max_encoding_message_size(dask_protocol::MAX_MESSAGE);
    let handle = SchedulerHandle { address: address.clone(), shutdown: shutdown.clone(), tx: tx.clone() };
    let core_config = config.core.clone();
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
            waiters: Vec::new(),
            id,
            address: address.clone(),
            started,
            release: Release::default(),
        };
        let loop_task = tokio::spawn(lp.run(rx, shutdown.clone()));
        let incoming = dask_protocol::serve::incoming(listener, config.limits, "scheduler");
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
pub fn write_scheduler_file(path: &std::path::Path, id: &str, address: &Address) -> std::io::Result<()> {
    let json = serde_json::json!({
        "type": "Scheduler",
        "id": id,
        "address": address.to_string(),
        "services": {},
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

impl EventLoop {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<LoopMsg>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.on_msg(msg);
                    // Drain what else is waiting: one batch per peer per wake-up.
                    for _ in 0..1024 {
                        match rx.try_recv() {
                            Ok(msg) => self.on_msg(msg),
                            Err(_) => break,
                        }
                    }
                }
                _ = tick.tick() => {
                    self.handle(Event::Tick);
                    self.check_restarts();
                    self.release.if_due();
                }
            }
            // Once per batch: retirement walks the retiring workers' values.
            if self.core.is_retiring() {
                self.handle(Event::RetireProgress);
            }
            self.flush();
        }
        for n in self.nannies.values() {
            let _ = n.tx.send(Ok(nanny_command(pb::nanny_command::Kind::Close(pb::CloseNanny {
                reason: "scheduler closing".into(),
            }))));
        }
        // Clients need not try to reconnect.
        for tx in self.clients.values() {
            let _ = tx.send(Ok(pb::SchedulerToClient { reports: Vec::new(), closing: "scheduler closing".into() }));
        }
        // Tell workers to go only if asked to close; dropping the senders ends the streams.
        for tx in self.workers.values() {
            let _ = tx.send(Ok(pb::SchedulerToWorker {
                commands: vec![pb::SchedulerCommand {
                    kind: Some(pb::scheduler_command::Kind::Close(pb::CloseWorker {
                        reason: "scheduler closing".into(),
                        restart: false,
                    })),
                }],
            }));
        }
    }

    fn handle(&mut self, event: Event) {
        self.core.handle(event, Instant::now(), &mut self.commands);
        #[cfg(debug_assertions)]
        if std::env::var_os("DASK_VALIDATE").is_some() {
            self.core.validate();
        }
    }

    fn on_msg(&mut self, msg: LoopMsg) {
        match msg {
            LoopMsg::Events(events) => {
                self.release.count(events.len());
                for e in events {
                    let gone = match &e {
                        Event::ClientDisconnected { client } => Some((None, Some(*client))),
                        Event::WorkerLost { worker, .. } => Some((Some(*worker), None)),
                        _ => None,
                    };
                    // Taken: a worker may now run the tasks whose start it announced.
                    let ack = match &e {
                        Event::TasksStarted { worker, keys, ack: true } => {
                            Some((*worker, keys.iter().map(|k| k.to_string()).collect::<Vec<_>>()))
                        }
                        _ => None,
                    };
                    self.handle(e);
                    if let Some((w, keys)) = ack
                        && let Some(tx) = self.workers.get(&w)
                    {
                        let _ = tx.send(Ok(pb::SchedulerToWorker {
                            commands: vec![pb::SchedulerCommand {
                                kind: Some(pb::scheduler_command::Kind::StartedAck(pb::StartedAck { keys })),
                            }],
                        }));
                    }
                    // Forget its channel: for a client, that ends our side of its stream,
                    // which tells it everything it sent was taken.
                    match gone {
                        Some((Some(w), _)) => {
                            self.workers.remove(&w);
                        }
                        Some((_, Some(c))) => {
                            self.clients.remove(&c);
                        }
                        _ => {}
                    }
                }
            }
            LoopMsg::WorkerConnected { spec, nanny, tx, reply } => {
                let id = WorkerId(self.next_worker);
                self.next_worker += 1;
                let _ = reply.send(id);
                self.replaced_by(&spec.name, nanny.as_deref());
                let (address, name, nthreads, pid) = (spec.address.clone(), spec.name.clone(), spec.nthreads, spec.pid);
                let before = self.commands.len();
                self.handle(Event::WorkerJoined { worker: id, spec });
                // Refused (a duplicate name or address): the first thing it hears is why.
                if let Some(pos) = self.commands[before..]
                    .iter()
                    .position(|c| matches!(c, Command::CloseWorker { worker, .. } if *worker == id))
                {
                    let Command::CloseWorker { reason, .. } = self.commands.remove(before + pos) else {
                        unreachable!()
                    };
                    tracing::warn!(worker = %address, %name, %reason, "worker refused");
                    let _ = tx.send(Ok(pb::SchedulerToWorker {
                        commands: vec![pb::SchedulerCommand {
                            kind: Some(pb::scheduler_command::Kind::Close(pb::CloseWorker { reason, restart: false })),
                        }],
                    }));
                    return;
                }
                // Registered goes out before the work `handle` just gave it (sent at flush).
                let _ = tx.send(Ok(pb::SchedulerToWorker {
                    commands: vec![pb::SchedulerCommand {
                        kind: Some(pb::scheduler_command::Kind::Registered(pb::Registered {
                            worker_id: id.0,
                            heartbeat_interval_s: 1.0,
                        })),
                    }],
                }));
                self.workers.insert(id, tx);
                tracing::info!(worker = %address, %name, nthreads, nanny = nanny.as_deref().unwrap_or("none"), "worker joined");
                if let Some(n) = nanny.as_ref().and_then(|a| self.nanny_at(a)) {
                    let _ =
                        n.tx.send(Ok(nanny_command(pb::nanny_command::Kind::WorkerRegistered(pb::WorkerRegistered {
                            address: address.to_string(),
                            pid,
                        }))));
                }
                self.worker_meta.insert(id, WorkerMeta { address, name, nanny });
                self.answer_waiters();
                self.check_restarts();
            }
            LoopMsg::WorkerStreamEnded { worker, reason } => self.worker_stream_ended(worker, reason),
            LoopMsg::LossDue(worker) => {
                if let Some(reason) = self.pending_loss.remove(&worker) {
                    self.lose_worker(worker, reason, false);
                }
            }
            LoopMsg::NannyConnected { register, tx, reply } => {
                let id = self.next_nanny;
                self.next_nanny += 1;
                // A nanny that reconnects replaces its old entry.
                self.nannies.retain(|_, n| n.address != register.address);
                let _ = tx.send(Ok(nanny_command(pb::nanny_command::Kind::Registered(pb::Empty {}))));
                // Its worker may have registered before it did (it reconnected after we restarted).
                for m in self.worker_meta.values() {
                    if m.nanny.as_deref() == Some(register.address.as_str()) {
                        let _ = tx.send(Ok(nanny_command(pb::nanny_command::Kind::WorkerRegistered(
                            pb::WorkerRegistered { address: m.address.to_string(), pid: 0 },
                        ))));
                    }
                }
                tracing::info!(nanny = %register.address, name = %register.name, "nanny connected");
                self.nannies
                    .insert(id, NannyEntry { address: register.address, name: register.name, tx, last_exit: None });
                let _ = reply.send(id);
            }
            LoopMsg::NannyEvents { nanny, events } => {
                for e in events {
                    if let Some(pb::nanny_event::Kind::Exited(x)) = e.kind {
                        self.nanny_says_worker_exited(nanny, x);
                    }
                }
            }
            LoopMsg::NannyGone(nanny) => {
                if let Some(n) = self.nannies.remove(&nanny) {
                    tracing::info!(nanny = %n.address, name = %n.name, "nanny disconnected");
                }
            }
            LoopMsg::Restart { timeout, reason, reply } => self.restart(timeout, reason, reply),
            LoopMsg::RestartsDue => self.check_restarts(),
            LoopMsg::Retire { workers, n, close, reply } => self.retire(workers, n, close, reply),
            LoopMsg::Copies { keys, n, workers, reply } => self.copies(keys, n, workers, reply),
            LoopMsg::ClientConnected { tx, reply } => {
                let id = ClientId(self.next_client);
                self.next_client += 1;
                self.clients.insert(id, tx);
                let _ = reply.send(id);
                self.handle(Event::ClientConnected { client: id });
            }
            LoopMsg::Query(q) => self.query(q),
        }
    }

    fn nanny_at(&self, address: &str) -> Option<&NannyEntry> {
        self.nannies.values().find(|n| n.address == address)
    }

    /// A worker's stream ended. If it has a nanny, the nanny knows why (an exit status, a
    /// signal, over its memory limit): that reason is waited for, briefly, so it reaches the
    /// log and any killed-worker error.
    fn worker_stream_ended(&mut self, worker: WorkerId, reason: String) {
        if self.expected_gone.remove(&worker) {
            self.lose_worker(worker, reason, true);
            return;
        }
        let Some(meta) = self.worker_meta.get(&worker) else {
            self.lose_worker(worker, reason, false);
            return;
        };
        if let Some(why) = self.exit_reasons.remove(&*meta.address) {
            self.lose_worker(worker, why, false);
            return;
        }
        if meta.nanny.as_deref().is_some_and(|a| self.nanny_at(a).is_some()) {
            // No new work for it meanwhile.
            self.handle(Event::WorkerClosing { worker });
            self.pending_loss.insert(worker, reason);
            let tx = self.self_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(NANNY_REASON_WAIT).await;
                let _ = tx.send(LoopMsg::LossDue(worker));
            });
        } else {
            self.lose_worker(worker, reason, false);
        }
    }

    /// A worker registers: a worker of the same nanny, or of the same name whose stream has
    /// ended already, is gone (a nanny runs one worker at a time): it is removed now, so the new
    /// one does not find its name taken.
    fn replaced_by(&mut self, name: &str, nanny: Option<&str>) {
        let old: Vec<WorkerId> = self
            .worker_meta
            .iter()
            .filter(|(id, m)| {
                (nanny.is_some() && m.nanny.as_deref() == nanny)
                    || (*m.name == *name && self.pending_loss.contains_key(id))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            let address = self.worker_meta[&id].address.to_string();
            let reason = self
                .pending_loss
                .remove(&id)
                .or_else(|| self.exit_reasons.remove(&address))
                .unwrap_or_else(|| "its nanny started a new worker in its place".to_string());
            let expected = self.expected_gone.remove(&id);
            self.lose_worker(id, reason, expected);
        }
    }

    fn nanny_says_worker_exited(&mut self, nanny: u32, x: pb::WorkerExited) {
        let Some(n) = self.nannies.get_mut(&nanny) else { return };
        n.last_exit = Some(x.reason.clone());
        let what = if x.restarting { "a fresh one follows" } else { "no new one follows" };
        tracing::warn!(worker = %x.worker, nanny = %n.address, pid = x.pid, reason = %x.reason, "worker process ended; {what}");
        if x.worker.is_empty() {
            return;
        }
        let found = self.worker_meta.iter().find(|(_, m)| *m.address == *x.worker).map(|(id, _)| *id);
        match found {
            Some(id) if self.pending_loss.remove(&id).is_some() => self.lose_worker(id, x.reason, false),
            Some(_) => {
                self.exit_reasons.insert(x.worker, x.reason);
            }
            None => {}
        }
    }

    fn lose_worker(&mut self, worker: WorkerId, reason: String, expected: bool) {
        if let Some(m) = self.worker_meta.remove(&worker) {
            tracing::info!(worker = %m.address, name = %m.name, %reason, expected, "worker removed");
            self.exit_reasons.remove(&*m.address);
        }
        self.handle(Event::WorkerLost { worker, reason, expected });
        self.workers.remove(&worker);
        self.check_restarts();
    }

    /// `Client::restart`: every worker must have a nanny; then every task is forgotten, every
    /// nanny restarts its worker, and the reply goes out once as many workers as before are
    /// back (all of them new), or at `timeout`.
    fn restart(&mut self, timeout: Duration, reason: String, reply: oneshot::Sender<Result<u32, Status>>) {
        let mut without: Vec<String> = self
            .worker_meta
            .values()
            .filter(|m| m.nanny.as_deref().is_none_or(|a| self.nanny_at(a).is_none()))
            .map(|m| m.address.to_string())
            .collect();
        if !without.is_empty() {
            without.sort();
            let _ = reply.send(Err(Status::failed_precondition(format!(
                "restarting workers needs a nanny, and {} of them have none connected: {without:?} (started \
                 with --no-nanny, or their nanny is reconnecting); run them under a nanny (dask-worker's \
                 default) or restart them yourself",
                without.len()
            ))));
            return;
        }
        tracing::warn!(%reason, workers = self.worker_meta.len(), "restarting every worker and releasing every task");
        self.handle(Event::Restart { reason: reason.clone() });
        let old: BTreeSet<WorkerId> = self.worker_meta.keys().copied().collect();
        self.expected_gone.extend(old.iter().copied());
        for n in self.nannies.values() {
            let _ = n.tx.send(Ok(nanny_command(pb::nanny_command::Kind::Restart(pb::RestartWorker {
                reason: reason.clone(),
            }))));
        }
        let n = old.len();
        self.restarts.push(RestartWaiter { old, n, deadline: Instant::now() + timeout, reply });
        let tx = self.self_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(LoopMsg::RestartsDue);
        });
        self.check_restarts();
    }

    /// `Client::replicate` / `Client::rebalance`.
    fn copies(
        &mut self,
        keys: Vec<String>,
        n: Option<Option<usize>>,
        names: Vec<String>,
        reply: oneshot::Sender<Result<u32, Status>>,
    ) {
        let mut workers = Vec::new();
        for name in &names {
            match self.worker_meta.iter().find(|(_, m)| *m.address == **name || *m.name == **name) {
                Some((id, _)) => workers.push(*id),
                None => {
                    let _ = reply.send(Err(Status::not_found(format!(
                        "no worker {name:?} is connected (give addresses or names from scheduler_info)"
                    ))));
                    return;
                }
            }
        }
        let op = self.next_op;
        self.next_op += 1;
        self.copies.insert(op, reply);
        let keys = keys.into_iter().map(Arc::from).collect();
        self.handle(match n {
            Some(n) => Event::Replicate { op, keys, n, workers },
            None => Event::Rebalance { op, keys, workers },
        });
    }

    /// `Client::retire_workers`: by address or name, or the `n` workers holding the least.
    fn retire(
        &mut self,
        names: Vec<String>,
        n: usize,
        close: bool,
        reply: oneshot::Sender<Result<Vec<String>, Status>>,
    ) {
        let mut chosen = Vec::new();
        if names.is_empty() {
            let mut by_bytes: Vec<(u64, WorkerId)> =
                self.core.workers().map(|(id, _, _, _, nbytes)| (nbytes, id)).collect();
            by_bytes.sort();
            chosen.extend(by_bytes.into_iter().take(n).map(|(_, id)| id));
        } else {
            for name in &names {
                let found = self.worker_meta.iter().find(|(_, m)| *m.address == **name || *m.name == **name);
                match found {
                    Some((id, _)) => chosen.push(*id),
                    None => {
                        let _ = reply.send(Err(Status::not_found(format!(
                            "no worker {name:?} is connected (give addresses or names from scheduler_info)"
                        ))));
                        return;
                    }
                }
            }
        }
        if chosen.is_empty() {
            let _ = reply.send(Ok(Vec::new()));
            return;
        }
        let op = self.next_op;
        self.next_op += 1;
        self.retires.insert(op, reply);
        self.handle(Event::RetireWorkers {
            op,
            workers: chosen,
            close,
            restart: false,
            reason: "Client.retire_workers".into(),
        });
    }

    fn check_restarts(&mut self) {
        if self.restarts.is_empty() {
            return;
        }
        let now = Instant::now();
        let connected = self.core.n_workers();
        for w in std::mem::take(&mut self.restarts) {
            let old_left = w.old.iter().filter(|id| self.worker_meta.contains_key(id)).count();
            if old_left == 0 && connected >= w.n {
                tracing::info!(workers = connected, "restart done: the workers are back");
                let _ = w.reply.send(Ok(connected as u32));
            } else if now >= w.deadline {
                let _ = w.reply.send(Err(Status::deadline_exceeded(format!(
                    "restarted {} workers, but after the timeout {} of the old ones had not gone and {} of {} \
                     are back; consider a longer timeout",
                    w.n,
                    old_left,
                    connected.saturating_sub(old_left),
                    w.n
                ))));
            } else {
                self.restarts.push(w);
            }
        }
    }

    fn query(&mut self, q: Query) {
        match q {
            Query::WhoHas(keys, reply) => {
                let entries = keys
                    .into_iter()
                    .map(|k| {
                        let workers = self.core.who_has(&k).iter().map(|a| a.to_string()).collect();
                        pb::KeyWorkers { key: k, workers }
                    })
                    .collect();
                let _ = reply.send(pb::WhoHasReply { entries });
            }
            Query::HasWhat(reply) => {
                let entries = self
                    .core
                    .workers()
                    .map(|(_, spec, keys, _, _)| pb::WorkerKeys {
                        worker: spec.address.to_string(),
                        keys: keys.iter().map(|k| k.to_string()).collect(),
                    })
                    .collect();
                let _ = reply.send(pb::HasWhatReply { entries });
            }
            Query::Info(reply) => {
                let _ = reply.send(self.info());
            }
            Query::WaitForWorkers(n, reply) => {
                if self.core.n_workers() >= n {
                    let _ = reply.send(self.info());
                } else {
                    self.waiters.push((n, reply));
                }
            }
        }
    }

    fn answer_waiters(&mut self) {
        let n = self.core.n_workers();
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiters).into_iter().partition(|(want, _)| *want <= n);
        self.waiters = waiting;
        for (_, reply) in ready {
            let _ = reply.send(self.info());
        }
    }

    fn info(&self) -> pb::SchedulerInfo {
        let now = Instant::now();
        let workers = self
            .core
            .workers()
            .map(|(id, spec, keys, processing, nbytes)| pb::WorkerInfo {
                address: spec.address.to_string(),
                name: spec.name.to_string(),
                nthreads: spec.nthreads,
                memory_limit: spec.memory_limit,
                id: id.0,
                processing: processing as u32,
                in_memory: keys.len() as u32,
                memory: nbytes,
                pid: spec.pid,
                local_directory: String::new(),
                last_seen_s: self
                    .core
                    .worker_last_seen(id)
                    .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64()),
                nanny: self.worker_meta.get(&id).and_then(|m| m.nanny.clone()).unwrap_or_default(),
                previous_exit: self
                    .worker_meta
                    .get(&id)
                    .and_then(|m| m.nanny.as_deref())
                    .and_then(|a| self.nanny_at(a))
                    .and_then(|n| n.last_exit.clone())
                    .unwrap_or_default(),
                status: self.core.worker_status(id).unwrap_or("running").to_string(),
                resources: resources_to_pb(&spec.resources),
                resources_used: resources_to_pb(&self.core.worker_resources_used(id)),
                ..worker_memory_info(self.core.worker_memory(id).unwrap_or_default())
            })
            .collect();
        pb::SchedulerInfo {
            id: self.id.clone(),
            address: self.address.to_string(),
            workers,
            tasks: self.core.n_tasks() as u64,
            started_s: self.started.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
            steals_asked: self.core.steal_stats().asked,
            steals_done: self.core.steal_stats().stolen,
            steals_refused: self.core.steal_stats().refused,
            unrunnable: self.core.unrunnable(100).0,
            unrunnable_count: self.core.unrunnable(0).1 as u64,
        }
    }

    /// Sends the commands of this iteration: one message per worker and per client.
    fn flush(&mut self) {
        if self.commands.is_empty() {
            return;
        }
        let mut to_workers: HashMap<WorkerId, Vec<pb::SchedulerCommand>> = HashMap::new();
        let mut to_clients: HashMap<ClientId, Vec<pb::KeyReport>> = HashMap::new();
        for cmd in self.commands.drain(..) {
            match cmd {
                Command::Compute { worker, key, spec, deps, priority, inline, announce, resources } => {
                    to_workers.entry(worker).or_default().push(pb::SchedulerCommand {
                        kind: Some(pb::scheduler_command::Kind::Compute(pb::ComputeTask {
                            key: key.to_string(),
                            spec,
                            dependencies: deps.into_iter().map(location_to_pb).collect(),
                            priority,
                            inline_result: inline,
                            announce,
                            resources: resources_to_pb(&resources),
                        })),
                    });
                }
                Command::Free { worker, key } => {
                    let batch = to_workers.entry(worker).or_default();
                    // Consecutive frees share one message; order with computes is kept.
                    if let Some(pb::SchedulerCommand { kind: Some(pb::scheduler_command::Kind::Free(f)) }) =
                        batch.last_mut()
                    {
                        f.keys.push(key.to_string());
                    } else {
                        batch.push(pb::SchedulerCommand {
                            kind: Some(pb::scheduler_command::Kind::Free(pb::FreeKeys { keys: vec![key.to_string()] })),
                        });
                    }
                }
                Command::Report { client, key, report } => {
                    to_clients.entry(client).or_default().push(report_to_pb(key, report));
                }
                Command::AcquireReplicas { worker, keys } => {
                    to_workers.entry(worker).or_default().push(pb::SchedulerCommand {
                        kind: Some(pb::scheduler_command::Kind::AcquireReplicas(pb::AcquireReplicas {
                            keys: keys.into_iter().map(location_to_pb).collect(),
                        })),
                    });
                }
                Command::CopiesDone { op, failed } => {
                    if let Some(reply) = self.copies.remove(&op) {
                        let _ = reply.send(Ok(failed));
                    }
                }
                Command::Steal { worker, key, id } => {
                    to_workers.entry(worker).or_default().push(pb::SchedulerCommand {
                        kind: Some(pb::scheduler_command::Kind::Steal(pb::StealRequest { key: key.to_string(), id })),
                    });
                }
                Command::Retired { op, workers, refused } => {
                    if let Some(reply) = self.retires.remove(&op) {
                        let _ = reply.send(match refused {
                            Some(why) => Err(Status::failed_precondition(why)),
                            None => Ok(workers.iter().map(|w| w.to_string()).collect()),
                        });
                    }
                }
                Command::Notice { level, message } => match level {
                    core::NoticeLevel::Info => tracing::info!("{message}"),
                    core::NoticeLevel::Warn => tracing::warn!("{message}"),
                    core::NoticeLevel::Error => tracing::error!("{message}"),
                },
                Command::CloseWorker { worker, reason, restart } => {
                    let address = self.worker_meta.get(&worker).map(|m| m.address.to_string()).unwrap_or_default();
                    tracing::warn!(worker = %address, %reason, restart, "closing worker");
                    to_workers.entry(worker).or_default().push(pb::SchedulerCommand {
                        kind: Some(pb::scheduler_command::Kind::Close(pb::CloseWorker { reason, restart })),
                    });
                }
            }
        }
        for (w, commands) in to_workers {
            if let Some(tx) = self.workers.get(&w) {
                let _ = tx.send(Ok(pb::SchedulerToWorker { commands }));
            }
        }
        for (c, reports) in to_clients {
            if let Some(tx) = self.clients.get(&c) {
                let _ = tx.send(Ok(pb::SchedulerToClient { reports, closing: String::new() }));
            }
        }
    }
}

fn location_to_pb(d: core::DepLocation) -> pb::DependencyLocation {
    pb::DependencyLocation {
        key: d.key.to_string(),
        workers: d.workers.iter().map(|w| w.to_string()).collect(),
        nbytes: d.nbytes,
    }
}

fn nanny_command(kind: pb::nanny_command::Kind) -> pb::SchedulerToNanny {
    pb::SchedulerToNanny { commands: vec![pb::NannyCommand { kind: Some(kind) }] }
}

fn report_to_pb(key: Key, report: Report) -> pb::KeyReport {
    use pb::key_report::Kind;
    let kind = match report {
        Report::Memory { nbytes, workers, value } => {
            let (has_value, (codec, value)) = match value {
                Some(v) => (true, v),
                None => (false, ("", bytes::Bytes::new())),
            };
            Kind::Memory(pb::KeyInMemory {
                nbytes,
                // With the value at hand the client never fetches: spare it the addresses.
                workers: if has_value { Vec::new() } else { workers.iter().map(|w| w.to_string()).collect() },
                type_name: String::new(),
                has_value,
                value,
                codec: codec.to_string(),
            })
        }
        Report::Erred(e) => Kind::Erred(pb::TaskError {
            message: e.message.clone(),
            kind: e.kind.clone(),
            function: e.function.clone(),
            key: e.key.clone(),
            worker: e.worker.clone(),
        }),
        Report::Cancelled(None) => {
            Kind::Cancelled(pb::KeyCancelled { reason: "cancelled".into(), by_scheduler: false })
        }
        Report::Cancelled(Some(why)) => {
            Kind::Cancelled(pb::KeyCancelled { reason: why.to_string(), by_scheduler: true })
        }
        Report::Lost(why) => Kind::Lost(pb::KeyLost { reason: why }),
    };
    pb::KeyReport { key: key.to_string(), kind: Some(kind) }
}

#[derive(Clone)]
struct Service {
    tx: mpsc::UnboundedSender<LoopMsg>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Service {
    async fn copies(
        &self,
        keys: Vec<String>,
        n: Option<Option<usize>>,
        workers: Vec<String>,
    ) -> Result<Response<pb::CopiesReply>, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Copies { keys, n, workers, reply: tx }).map_err(|_| closed())?;
        let failed = rx.await.map_err(|_| closed())??;
        Ok(Response::new(pb::CopiesReply { failed }))
    }
}

fn closed() -> Status {
    Status::unavailable("the scheduler is shutting down")
}

#[tonic::async_trait]
impl pb::scheduler_server::Scheduler for Service {
    type WorkerStreamStream = BoxStream<pb::SchedulerToWorker>;
    type ClientStreamStream = BoxStream<pb::SchedulerToClient>;

    async fn worker_stream(
        &self,
        request: Request<Streaming<pb::WorkerToScheduler>>,
    ) -> Result<Response<Self::WorkerStreamStream>, Status> {
        let peer = request.remote_addr().map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty worker stream"))?;
        let Some(pb::worker_event::Kind::Register(reg)) = first.events.into_iter().next().and_then(|e| e.kind) else {
            return Err(Status::invalid_argument("the first message of a worker stream must be Register"));
        };
        let address = Address::parse(&reg.address, None).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(r) = reg.resources.iter().find(|r| !(r.amount.is_finite() && r.amount >= 0.0)) {
            return Err(Status::invalid_argument(format!(
                "resource {} = {} is not a number of zero or more (e.g. --resources \"GPU=2 MEM=10e9\")",
                r.name, r.amount
            )));
        }
        let spec = WorkerSpec {
            address: Arc::from(address.to_string()),
            name: Arc::from(if reg.name.is_empty() { address.to_string() } else { reg.name }),
            nthreads: reg.nthreads.max(1),
            memory_limit: reg.memory_limit,
            pid: reg.pid,
            resources: reg.resources.into_iter().map(|r| (Arc::from(r.name), r.amount)).collect(),
        };
        let nanny = (!reg.nanny.is_empty()).then_some(reg.nanny);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        let (address, name) = (spec.address.clone(), spec.name.clone());
        self.tx.send(LoopMsg::WorkerConnected { spec, nanny, tx: out_tx, reply: reply_tx }).map_err(|_| closed())?;
        let id = reply_rx.await.map_err(|_| closed())?;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut release = Release::default();
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(batch)) => {
                        release.count(batch.events.len());
                        release.if_due();
                        let events: Vec<Event> = batch.events.into_iter().filter_map(|e| worker_event(id, e)).collect();
                        if !events.is_empty() && tx.send(LoopMsg::Events(events)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break "the worker closed its stream (it exited or was closed)".to_string(),
                    Err(s) => break stream_error(&s),
                }
            };
            tracing::info!(worker = %address, %name, %peer, %reason, "worker connection ended");
            let _ = tx.send(LoopMsg::WorkerStreamEnded { worker: id, reason });
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(out_rx))))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<pb::ClientToScheduler>>,
    ) -> Result<Response<Self::ClientStreamStream>, Status> {
        let peer = request.remote_addr().map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let mut inbound = request.into_inner();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx.send(LoopMsg::ClientConnected { tx: out_tx, reply: reply_tx }).map_err(|_| closed())?;
        let id = reply_rx.await.map_err(|_| closed())?;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            // A client that vanishes (stream end or error) has its wants released below.
            let mut release = Release::default();
            let mut name = String::new();
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(batch)) => {
                        release.count(batch.ops.iter().map(client_op_size).sum());
                        release.if_due();
                        for op in &batch.ops {
                            if let Some(pb::client_op::Kind::Hello(h)) = &op.kind {
                                name = h.client_id.clone();
                                tracing::info!(client = %name, %peer, "client connected");
                            }
                        }
                        let events: Vec<Event> = batch.ops.into_iter().filter_map(|op| client_event(id, op)).collect();
                        if !events.is_empty() && tx.send(LoopMsg::Events(events)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break "it closed the connection".to_string(),
                    Err(s) => break stream_error(&s),
                }
            };
            tracing::info!(client = %name, %peer, %reason, "client disconnected");
            let _ = tx.send(LoopMsg::Events(vec![Event::ClientDisconnected { client: id }]));
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(out_rx))))
    }

    type NannyStreamStream = BoxStream<pb::SchedulerToNanny>;

    async fn nanny_stream(
        &self,
        request: Request<Streaming<pb::NannyToScheduler>>,
    ) -> Result<Response<Self::NannyStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty nanny stream"))?;
        let Some(pb::nanny_event::Kind::Register(register)) = first.events.into_iter().next().and_then(|e| e.kind)
        else {
            return Err(Status::invalid_argument("the first message of a nanny stream must be Register"));
        };
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx.send(LoopMsg::NannyConnected { register, tx: out_tx, reply: reply_tx }).map_err(|_| closed())?;
        let id = reply_rx.await.map_err(|_| closed())?;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(batch)) = inbound.message().await {
                if tx.send(LoopMsg::NannyEvents { nanny: id, events: batch.events }).is_err() {
                    return;
                }
            }
            let _ = tx.send(LoopMsg::NannyGone(id));
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(out_rx))))
    }

    async fn restart(&self, request: Request<pb::RestartRequest>) -> Result<Response<pb::RestartReply>, Status> {
        let req = request.into_inner();
        let timeout =
            if req.timeout_s > 0.0 { Duration::from_secs_f64(req.timeout_s) } else { Duration::from_secs(120) };
        let reason = if req.reason.is_empty() {
            "the cluster was restarted (Client.restart): every task and value was released; submit again".to_string()
        } else {
            req.reason
        };
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Restart { timeout, reason, reply: tx }).map_err(|_| closed())?;
        let workers = rx.await.map_err(|_| closed())??;
        Ok(Response::new(pb::RestartReply { workers }))
    }

    async fn retire_workers(&self, request: Request<pb::RetireRequest>) -> Result<Response<pb::RetireReply>, Status> {
        let req = request.into_inner();
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(LoopMsg::Retire { workers: req.workers, n: req.n as usize, close: req.close, reply: tx })
            .map_err(|_| closed())?;
        let wait = async { rx.await.map_err(|_| closed())? };
        let workers = if req.timeout_s > 0.0 {
            tokio::time::timeout(Duration::from_secs_f64(req.timeout_s), wait).await.map_err(|_| {
                Status::deadline_exceeded(format!(
                    "the workers did not finish retiring within {}s (their values are still moving)",
                    req.timeout_s
                ))
            })??
        } else {
            wait.await?
        };
        Ok(Response::new(pb::RetireReply { workers }))
    }

    async fn replicate(&self, request: Request<pb::ReplicateRequest>) -> Result<Response<pb::CopiesReply>, Status> {
        let req = request.into_inner();
        let n = (req.n > 0).then_some(req.n as usize);
        self.copies(req.keys, Some(n), req.workers).await
    }

    async fn rebalance(&self, request: Request<pb::RebalanceRequest>) -> Result<Response<pb::CopiesReply>, Status> {
        let req = request.into_inner();
        self.copies(req.keys, None, req.workers).await
    }

    async fn who_has(&self, request: Request<pb::KeysRequest>) -> Result<Response<pb::WhoHasReply>, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::WhoHas(request.into_inner().keys, tx))).map_err(|_| closed())?;
        Ok(Response::new(rx.await.map_err(|_| closed())?))
    }

    async fn has_what(&self, _: Request<pb::Empty>) -> Result<Response<pb::HasWhatReply>, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::HasWhat(tx))).map_err(|_| closed())?;
        Ok(Response::new(rx.await.map_err(|_| closed())?))
    }

    async fn info(&self, _: Request<pb::Empty>) -> Result<Response<pb::SchedulerInfo>, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::Info(tx))).map_err(|_| closed())?;
        Ok(Response::new(rx.await.map_err(|_| closed())?))
    }

    async fn wait_for_workers(
        &self,
        request: Request<pb::WaitForWorkersRequest>,
    ) -> Result<Response<pb::SchedulerInfo>, Status> {
        let req = request.into_inner();
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::WaitForWorkers(req.n as usize, tx))).map_err(|_| closed())?;
        let wait = async { rx.await.map_err(|_| closed()) };
        if req.timeout_s > 0.0 {
            match tokio::time::timeout(Duration::from_secs_f64(req.timeout_s), wait).await {
                Ok(r) => Ok(Response::new(r?)),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "fewer than {} workers connected within {}s",
                    req.n, req.timeout_s
                ))),
            }
        } else {
            Ok(Response::new(wait.await?))
        }
    }
}

/// The memory fields of `WorkerInfo`.
fn worker_memory_info(m: core::WorkerMemory) -> pb::WorkerInfo {
    pb::WorkerInfo {
        memory_process: m.process,
        memory_managed: m.managed,
        memory_unmanaged: m.unmanaged(),
        memory_spilled: m.spilled,
        spilled_total: m.spilled_total,
        ..Default::default()
    }
}

/// Why a stream ended, in words: h2's keep-alive timeout and resets say little on their own.
fn stream_error(s: &Status) -> String {
    let cause = dask_protocol::root_cause(s);
    if cause.contains("keep-alive") || cause.contains("keepalive") || s.message().contains("keep-alive") {
        format!("the connection stopped answering keep-alive pings (hung, stopped or partitioned): {cause}")
    } else if cause.contains("broken pipe") || cause.contains("reset") {
        format!("the connection broke (the process died or was killed): {cause}")
    } else {
        format!("the connection failed: {}: {cause}", s.message())
    }
}

fn resources_to_pb(r: &[(Arc<str>, f64)]) -> Vec<pb::Resource> {
    r.iter().map(|(name, amount)| pb::Resource { name: name.to_string(), amount: *amount }).collect()
}

fn worker_event(worker: WorkerId, e: pb::WorkerEvent) -> Option<Event> {
    use pb::worker_event::Kind;
    Some(match e.kind? {
        Kind::Finished(f) => Event::TaskFinished {
            worker,
            key: Arc::from(f.key),
            nbytes: f.nbytes,
            duration: Duration::from_micros(f.duration_us),
            value: match (f.has_value, dask_protocol::codec::codec_name(&f.codec)) {
                (true, Ok(codec)) => Some((codec, f.value)),
                _ => None,
            },
        },
        Kind::Failed(f) => {
            let e = f.error.unwrap_or_default();
            Event::TaskFailed {
                worker,
                key: Arc::from(f.key),
                error: TaskError {
                    message: e.message,
                    kind: e.kind,
                    function: e.function,
                    key: e.key,
                    worker: e.worker,
                },
                duration: Duration::from_micros(f.duration_us),
            }
        }
        Kind::Missing(m) => Event::MissingData {
            worker,
            key: Arc::from(m.key),
            dependency: Arc::from(m.dependency),
            from: m.workers.into_iter().map(Arc::from).collect(),
        },
        Kind::Heartbeat(h) => Event::Heartbeat {
            worker,
            memory: Some(core::WorkerMemory {
                process: h.memory,
                managed: h.managed,
                spilled: h.spilled,
                spilled_total: h.spilled_total,
                paused: h.paused,
            }),
        },
        Kind::Started(s) => {
            Event::TasksStarted { worker, keys: s.keys.into_iter().map(Arc::from).collect(), ack: s.ack }
        }
        Kind::ReplicasAdded(r) => {
            Event::ReplicasAdded { worker, keys: r.keys.into_iter().map(|k| (Arc::from(k.key), k.nbytes)).collect() }
        }
        Kind::ReplicasFailed(r) => Event::ReplicasFailed { worker, keys: r.keys.into_iter().map(Arc::from).collect() },
        Kind::RetireMe(r) => Event::RetireWorkers {
            op: 0,
            workers: vec![worker],
            close: true,
            restart: r.restart,
            reason: if r.reason.is_empty() { "its lifetime is over".into() } else { r.reason },
        },
        Kind::StealResponse(s) => Event::StealResponse { worker, key: Arc::from(s.key), id: s.id, stolen: s.stolen },
        Kind::Released(_) | Kind::Register(_) => return None,
    })
}

fn client_event(client: ClientId, op: pb::ClientOp) -> Option<Event> {
    use pb::client_op::Kind;
    let keys = |l: pb::KeyList| l.keys.into_iter().map(Arc::from).collect::<Vec<Key>>();
    Some(match op.kind? {
        Kind::Hello(_) => return None,
        Kind::UpdateGraph(g) => Event::UpdateGraph {
            client,
            fifo_timeout: Duration::try_from_secs_f64(g.fifo_timeout_s).unwrap_or(Duration::ZERO),
            tasks: g
                .tasks
                .into_iter()
                .map(|t| NewTask {
                    key: Arc::from(t.key),
                    // Its own small buffer: a slice would keep the whole received batch alive.
                    spec: Box::from(&t.spec[..]),
                    dependencies: t.dependencies.into_iter().map(Arc::from).collect(),
                    priority: t.priority,
                    retries: t.retries,
                    workers: t.workers.into_iter().map(|w| Arc::from(normalize_worker(w))).collect(),
                    allow_other_workers: t.allow_other_workers,
                    resources: t.resources.into_iter().map(|r| (Arc::from(r.name), r.amount)).collect(),
                })
                .collect(),
            wants: g.wants.into_iter().map(Arc::from).collect(),
        },
        Kind::Release(l) => Event::ReleaseKeys { client, keys: keys(l) },
        Kind::Cancel(l) => Event::CancelKeys { client, keys: keys(l) },
        Kind::Want(l) => Event::Want { client, keys: keys(l) },
        Kind::FireAndForget(l) => Event::Want { client: core::FIRE_AND_FORGET, keys: keys(l) },
        Kind::Scattered(s) => Event::Scattered {
            client,
            keys: s
                .keys
                .into_iter()
                .map(|k| (Arc::from(k.key), k.workers.into_iter().map(Arc::from).collect(), k.nbytes))
                .collect(),
        },
    })
}

/// Worker restrictions may name an address in any accepted spelling; names pass through.
fn normalize_worker(w: String) -> String {
    match Address::parse(&w, None) {
        Ok(a) if w.contains(':') => a.to_string(),
        _ => w,
    }
}
