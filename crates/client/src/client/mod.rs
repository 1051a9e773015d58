//! `Client`: the connection to a scheduler and the dask.distributed API.
//!
//! All network work runs on a tokio runtime: the caller's, when the client was made with
//! [`Client::connect_async`], or one the client owns (one IO thread) when made from plain
//! code. Blocking calls wait on condition variables or `block_on`; each has an `_async` twin.
//! Messages to the scheduler go through one writer task that sends whatever has accumulated as
//! one batch: no RPC per task.
mod operations;
pub use operations::{PrefixProfile, TaskStreamRecorder, Versions, profile_of};
mod results;
mod submit;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dask_protocol::addr::Address;
use dask_protocol::codec::Value;
use dask_protocol::pb::{self, scheduler_client::SchedulerClient};
use dask_protocol::task::Task;
use dask_protocol::tls::Security;
use dask_protocol::{MAX_MESSAGE, data};
use futures_util::future::join_all;
use parking_lot::Mutex;
use prost::Message;
use rustc_hash::FxHashMap;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::args::{IntoArg, IntoArgs, OneArg};
use crate::future::{Future, FutureRef};
use crate::gather::{Errors, Gatherable, ValueMap};
use crate::graph::{Graph, KeyTree, Nested};
use crate::keys::{self, Done, Held, KeyOwner, KeyState, KeyTable, Status};
use crate::options::{FIFO_TIMEOUT, ScatterOptions, SubmitOptions};
use crate::{Error, Result};

/// How `Client::new` starts a local cluster: registered (with `inventory`) by the crate that
/// has `LocalCluster`, so the client depends on no server crate. Gives the scheduler's address
/// and the cluster, which closes when dropped.
#[doc(hidden)]
pub struct ClusterStarter(pub fn() -> Result<StartedCluster>);

/// A started cluster: the scheduler's address, and the cluster (closed when dropped).
#[doc(hidden)]
pub type StartedCluster = (String, Box<dyn std::any::Any + Send>);
inventory::collect!(ClusterStarter);

/// How many times a value whose holders failed to give it is asked for again: the scheduler
/// may take a moment to notice that its holder died (it waits up to 0.5 s for the nanny to say
/// why), so the rounds back off, 50 ms doubling (3 s in all).
const FETCH_ROUNDS: usize = 7;

pub(crate) struct ClientInner {
    address: Address,
    /// The runtime this client owns, if it was created from blocking code.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    table: Arc<KeyTable>,
    /// The connection to the scheduler: replaced when the client reconnects.
    pub(crate) link: Arc<Link>,
    peers: data::DataPool,
    /// TLS credentials, for the scheduler, workers and nannies at `tls://` addresses.
    pub(crate) security: Option<Security>,
    disconnected: Arc<Mutex<Option<String>>>,
    closed: AtomicBool,
    /// Tells the writer to send what is queued and end the stream.
    shutdown: CancellationToken,
    /// Cancelled when the scheduler has seen the end of our stream (or the connection is gone).
    finished: CancellationToken,
    /// A cluster started for this client by `Client::new`, closed (dropped) with it.
    cluster: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    counter: AtomicU64,
    /// Where the next scattered value goes (round-robin across calls, as dask's).
    pub(crate) scatter_next: std::sync::atomic::AtomicUsize,
    random: std::collections::hash_map::RandomState,
}

/// What a reconnection replaces: the gRPC client for queries, our side of the client stream,
/// and the name this client gave the scheduler.
pub(crate) struct Link {
    scheduler: Mutex<SchedulerClient<Channel>>,
    /// Where ops go: the writer of the current session, which sends them on its stream. A new
    /// session (a reconnection) gets a new writer: what was queued for the old one never
    /// reaches the new scheduler.
    ops: Mutex<mpsc::UnboundedSender<pb::ClientOp>>,
    /// What this client calls itself to the scheduler (`Client-<hex>`).
    client_id: Mutex<String>,
    /// The scheduler's id (`Scheduler-<hex>`): another one after a reconnection means it
    /// restarted.
    scheduler_id: Mutex<String>,
    /// Answers to coordination requests, messages on subscribed topics.
    pub(crate) replies: crate::replies::Replies,
}

impl Link {
    /// A client for one query.
    pub(crate) fn rpc(&self) -> SchedulerClient<Channel> {
        self.scheduler.lock().clone()
    }
}

/// How long `close` waits for the scheduler to take everything queued.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

impl ClientInner {
    pub(crate) fn block_on<F: std::future::Future<Output = Result<R>>, R>(&self, f: F) -> Result<R> {
        keys::block_on(&self.handle, f)
    }

    pub(crate) fn send(&self, kind: pb::client_op::Kind) {
        let _ = self.link.ops.lock().send(pb::ClientOp { kind: Some(kind) });
    }

    /// A new handle for `key`; `true` if this client did not hold the key before.
    fn new_ref(self: &Arc<Self>, key: &str) -> (Arc<FutureRef>, bool) {
        let mut keys = self.table.keys.lock();
        let (key, state, generation, fresh) = match keys.get_key_value(key) {
            Some((k, _)) => {
                let k = k.clone();
                let h = keys.get_mut(&k).expect("present");
                h.count += 1;
                (k, h.state.clone(), h.generation, false)
            }
            None => {
                let s = KeyState::new();
                if let Some(why) = self.disconnected.lock().clone() {
                    s.set(Status::Disconnected(why));
                }
                let k: Arc<str> = Arc::from(key);
                let generation = self.table.next_gen.fetch_add(1, Ordering::Relaxed);
                keys.insert(k.clone(), Held { count: 1, state: s.clone(), generation });
                (k, s, generation, true)
            }
        };
        (Arc::new(FutureRef { key, state, generation, client: self.clone() }), fresh)
    }

    /// Fetches values from the workers that hold them: one request per worker, all at once,
    /// then the next holder for whatever failed. Returns the values and the keys no holder gave.
    async fn fetch(&self, wanted: Vec<(Arc<str>, Vec<String>)>) -> (FxHashMap<Arc<str>, Value>, Vec<Arc<str>>) {
        let mut out: FxHashMap<Arc<str>, Value> = FxHashMap::default();
        let mut pending = wanted;
        let mut failed = Vec::new();
        let mut attempt = 0;
        while !pending.is_empty() {
            let mut by_worker: HashMap<&str, Vec<Arc<str>>> = HashMap::new();
            for (key, workers) in &pending {
                match workers.get(attempt) {
                    Some(w) => by_worker.entry(w.as_str()).or_default().push(key.clone()),
                    None => failed.push(key.clone()),
                }
            }
            let requests = by_worker.into_iter().map(|(worker, keys)| async move {
                let r = self.peers.get_data(worker, keys.iter().map(|k| k.to_string()).collect()).await;
                (worker.to_string(), keys, r)
            });
            for (worker, keys, r) in join_all(requests).await {
                match r {
                    Ok(values) => {
                        // One entry per key asked, in order (`get_data`).
                        for (key, (_, v)) in keys.into_iter().zip(values) {
                            if let Some(v) = v {
                                out.insert(key, v);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%worker, error = %e, "fetching from a worker failed; trying other holders");
                        self.peers.forget(&worker);
                    }
                }
            }
            pending.retain(|(k, w)| !out.contains_key(k) && w.len() > attempt);
            attempt += 1;
        }
        (out, failed)
    }

    /// The values of done keys: those that came with their reports, and those fetched from
    /// workers. A value its holders cannot give (a worker died, a report was stale) is asked
    /// of the scheduler again, which answers with where it is now, or once it is recomputed.
    /// With `skip`, failed keys are left out; otherwise the first failure is returned.
    pub(crate) async fn resolve(
        &self,
        refs: &[(Arc<str>, Arc<KeyState>)],
        skip: bool,
    ) -> Result<FxHashMap<Arc<str>, Value>> {
        let mut values: FxHashMap<Arc<str>, Value> = FxHashMap::default();
        let mut pending: Vec<&(Arc<str>, Arc<KeyState>)> = refs.iter().collect();
        for round in 0..FETCH_ROUNDS {
            let mut wanted = Vec::new();
            let mut versions: FxHashMap<Arc<str>, (u64, &Arc<KeyState>)> = FxHashMap::default();
            for (key, state) in pending.iter().copied() {
                if values.contains_key(key) || versions.contains_key(key) {
                    continue;
                }
                let (status, version) = Done(state).await;
                match status_to_result(key, status) {
                    Ok(Located::Here(v)) => {
                        values.insert(key.clone(), v);
                    }
                    Ok(Located::On(workers)) => {
                        versions.insert(key.clone(), (version, state));
                        wanted.push((key.clone(), workers));
                    }
                    Err(_) if skip => {}
                    Err(e) => return Err(e),
                }
            }
            if wanted.is_empty() {
                break;
            }
            let (got, failed) = self.fetch(wanted).await;
            values.extend(got);
            if failed.is_empty() {
                break;
            }
            if round + 1 == FETCH_ROUNDS {
                if skip {
                    break;
                }
                return Err(Error::Fetch {
                    key: failed[0].to_string(),
                    workers: Vec::new(),
                    why: format!("no holder could give it after {FETCH_ROUNDS} attempts"),
                });
            }
            // Ask the scheduler where these are now, once it has had time to notice.
            tokio::time::sleep(Duration::from_millis(50 << round)).await;
            for k in &failed {
                let (version, state) = versions[k];
                state.reset_if(version);
            }
            self.send(pb::client_op::Kind::Want(pb::KeyList { keys: failed.iter().map(|k| k.to_string()).collect() }));
            pending.retain(|(k, _)| failed.contains(k));
        }
        Ok(values)
    }

    pub(crate) fn unique_key(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let a = self.random.hash_one((n, std::process::id()));
        let b = self.random.hash_one((a, n, "dask"));
        format!("{prefix}-{a:016x}{b:016x}")
    }

    /// Sends what is queued, ends the stream, and waits (bounded) for the scheduler to see
    /// the end, so nothing submitted before `close` is lost.
    async fn finish(&self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.finished.cancelled()).await;
    }
}

impl KeyOwner for ClientInner {
    fn release_ref(&self, key: &str, generation: u64) {
        let mut keys = self.table.keys.lock();
        if let Some(h) = keys.get_mut(key)
            && h.generation == generation
        {
            h.count -= 1;
            if h.count == 0 {
                keys.remove(key);
                drop(keys);
                self.send(pb::client_op::Kind::Release(pb::KeyList { keys: vec![key.to_string()] }));
            }
        }
    }

    fn cancel(&self, keys: &[Arc<str>], force: bool, reason: Option<&str>) {
        let why: Arc<str> = Arc::from(reason.unwrap_or("cancelled by this client"));
        for k in keys {
            if let Some(s) = self.table.get(k) {
                s.set(Status::Cancelled(why.clone()));
            }
            // A later submission of the key is a new computation, not this cancelled one.
            self.table.detach(k);
        }
        self.send(pb::client_op::Kind::Cancel(pb::CancelKeys {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            force,
            reason: reason.unwrap_or_default().to_string(),
        }));
    }

    fn value<'a>(
        &'a self,
        key: &'a Arc<str>,
        state: &'a Arc<KeyState>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value>> + Send + 'a>> {
        Box::pin(async move {
            let refs = [(key.clone(), state.clone())];
            let mut values = self.resolve(&refs, false).await?;
            Ok(values.remove(key).expect("resolve returns every key or fails"))
        })
    }

    fn retry(&self, keys: &[Arc<str>]) {
        self.send(pb::client_op::Kind::Retry(pb::KeyList { keys: keys.iter().map(|k| k.to_string()).collect() }));
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

/// Where a finished key's value is.
pub(crate) enum Located {
    /// It came with the report.
    Here(Value),
    /// On these workers.
    On(Vec<String>),
}

/// Where the value of a finished key is, else the error its status stands for.
pub(crate) fn status_to_result(key: &str, status: Status) -> Result<Located> {
    match status {
        Status::Finished { value: Some(v), .. } => Ok(Located::Here(v)),
        Status::Finished { workers, value: None } => Ok(Located::On(workers)),
        Status::Error(e) => Err(Error::Task(Box::new((*e).clone()))),
        Status::Cancelled(why) => Err(Error::Cancelled { key: key.to_string(), reason: why.to_string() }),
        Status::Lost(why) => Err(Error::Lost { key: key.to_string(), why }),
        Status::Disconnected(why) => Err(Error::SchedulerLost(why)),
        Status::Pending => unreachable!("value of a pending key"),
    }
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        let runtime = self.runtime.lock().take();
        match runtime {
            Some(rt) => {
                // Our own runtime: let the writer send what is queued before it stops.
                if tokio::runtime::Handle::try_current().is_err() {
                    rt.block_on(self.finish());
                } else {
                    self.shutdown.cancel();
                }
                rt.shutdown_background();
            }
            // The caller's runtime: the writer drains and ends the stream on its own.
            None => self.shutdown.cancel(),
        }
    }
}

/// A connection to a dask-rs scheduler. Cheap to clone; the connection closes when the last
/// clone is dropped (or on [`close`](Client::close)).
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<Client: scheduler={}>", self.inner.address)
    }
}

/// The client `Client::current` gives (held weakly: it does not keep a client open).
static DEFAULT_CLIENT: Mutex<Option<std::sync::Weak<ClientInner>>> = Mutex::new(None);

/// Default time allowed to reach a scheduler (dask: `distributed.comm.timeouts.connect`, 30 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time `Client::restart` waits for the workers to come back (dask: 4 × the connect
/// timeout).
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the futures of a restarted cluster were cancelled.
const RESTARTED: &str = "the cluster was restarted (Client.restart): every task and value was released; submit again";

impl Client {
    /// Starts a `LocalCluster` with default settings and connects to it. The cluster comes
    /// from the `dask` crate (`dask-cluster`): a program that depends on `dask-client` alone
    /// builds no server and connects with [`Client::connect`].
    pub fn new() -> Result<Client> {
        let Some(starter) = inventory::iter::<ClusterStarter>.into_iter().next() else {
            return Err(Error::InvalidArgument(
                "Client::new() starts a LocalCluster, which lives in the `dask` crate (dask-cluster): \
                 depend on `dask`, or connect to a running scheduler with Client::connect(address)"
                    .into(),
            ));
        };
        let (address, cluster) = (starter.0)()?;
        let client = Client::connect(&address)?;
        *client.inner.cluster.lock() = Some(cluster);
        Ok(client)
    }

    /// Connects to the scheduler at `address` (`tcp://host:port`), blocking.
    pub fn connect(address: &str) -> Result<Client> {
        Client::connect_with_timeout(address, CONNECT_TIMEOUT)
    }

    /// Connects, giving up with a clear error after `timeout`.
    pub fn connect_with_timeout(address: &str, timeout: Duration) -> Result<Client> {
        let client = Client::connect_quietly(address, timeout)?;
        client.set_as_default();
        Ok(client)
    }

    /// Connects without becoming the default client (dask's `set_as_default=False`; a worker's
    /// own client is made so).
    pub fn connect_quietly(address: &str, timeout: Duration) -> Result<Client> {
        Client::connect_secure(address, timeout, None)
    }

    /// Connects with these TLS credentials (dask's `Client(address, security=...)`), for a
    /// scheduler at a `tls://` address, e.g. a `LocalCluster` built with `.security(...)`.
    pub fn connect_with_security(address: &str, security: Security) -> Result<Client> {
        let client = Client::connect_secure(address, CONNECT_TIMEOUT, Some(security))?;
        client.set_as_default();
        Ok(client)
    }

    /// Connects without becoming the default client; without `security`, a `tls://` address's
    /// credentials come from dask's configuration (`distributed.comm.tls.ca-file`,
    /// `distributed.comm.tls.client.cert` and `.key`).
    pub fn connect_secure(address: &str, timeout: Duration, security: Option<Security>) -> Result<Client> {
        let addr = Address::parse(address, Some(dask_protocol::DEFAULT_SCHEDULER_PORT))?;
        let security = match security {
            Some(s) => Some(s),
            None if addr.tls => configured_security()?,
            None => None,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dask-client-io")
            .enable_all()
            .build()
            .map_err(|e| Error::InvalidArgument(format!("failed to start the client's runtime: {e}")))?;
        let handle = rt.handle().clone();
        let client = handle.block_on(connect_inner(addr, timeout, handle.clone(), security))?;
        *client.inner.runtime.lock() = Some(rt);
        Ok(client)
    }

    /// Connects to the scheduler named in a scheduler file (`dask-scheduler --scheduler-file`).
    pub fn from_scheduler_file(path: impl AsRef<std::path::Path>) -> Result<Client> {
        Client::connect(&read_scheduler_file(path.as_ref())?)
    }

    /// Connects from async code, on the current tokio runtime (multi-thread flavour).
    pub async fn connect_async(address: &str) -> Result<Client> {
        let addr = Address::parse(address, Some(dask_protocol::DEFAULT_SCHEDULER_PORT))?;
        let security = if addr.tls { configured_security()? } else { None };
        let client = connect_inner(addr, CONNECT_TIMEOUT, tokio::runtime::Handle::current(), security).await?;
        client.set_as_default();
        Ok(client)
    }

    /// Makes this the client [`Client::current`] gives (as dask, every client connected
    /// becomes the default when made).
    pub fn set_as_default(&self) {
        *DEFAULT_CLIENT.lock() = Some(Arc::downgrade(&self.inner));
    }

    /// The default client: the last one connected, or the one [`set_as_default`] named, if it
    /// is still open (dask's `Client.current()`). In a task, `dask::get_client()` gives the
    /// worker's client instead.
    ///
    /// [`set_as_default`]: Self::set_as_default
    pub fn current() -> Result<Client> {
        let inner = DEFAULT_CLIENT.lock().as_ref().and_then(std::sync::Weak::upgrade);
        match inner {
            Some(inner) if !inner.closed.load(Ordering::SeqCst) => Ok(Client { inner }),
            _ => Err(Error::InvalidArgument(
                "no default client: connect one first (Client::new or Client::connect), or call \
                 set_as_default on one"
                    .into(),
            )),
        }
    }

    /// The scheduler's address.
    pub fn scheduler_address(&self) -> String {
        self.inner.address.to_string()
    }

    /// Writes dask's scheduler file (JSON with the scheduler's address) for other clients.
    pub fn write_scheduler_file(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let json = serde_json::json!({ "type": "Scheduler", "address": self.inner.address.to_string() });
        std::fs::write(path.as_ref(), serde_json::to_vec_pretty(&json).expect("json"))
            .map_err(|e| Error::InvalidArgument(format!("failed to write {}: {e}", path.as_ref().display())))
    }

    /// Closes the connection (the scheduler releases everything this client wanted) and the
    /// local cluster it started, if any. Futures of a closed client fail with `SchedulerLost`.
    pub fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Everything submitted so far reaches the scheduler first (bounded wait).
        let _ = self.inner.block_on(async {
            self.inner.finish().await;
            Ok(())
        });
        self.mark_closed();
    }

    /// [`close`](Self::close) for async code.
    pub async fn close_async(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner.finish().await;
        self.mark_closed();
    }

    fn mark_closed(&self) {
        self.inner.disconnected.lock().get_or_insert_with(|| "the client was closed".into());
        self.inner.table.disconnect_all("the client was closed");
        // Dropping the cluster closes it.
        drop(self.inner.cluster.lock().take());
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        if let Some(why) = self.inner.disconnected.lock().clone() {
            return Err(Error::SchedulerLost(why));
        }
        Ok(())
    }

    /// A future for a key this or another client computed (dask's `Future(key)`).
    pub fn future_of<T>(&self, key: &str) -> Future<T> {
        let (r, fresh) = self.inner.new_ref(key);
        if fresh {
            self.inner.send(pb::client_op::Kind::Want(pb::KeyList { keys: vec![key.to_string()] }));
        }
        Future::from_ref(r)
    }

    /// Wraps a value usable as an argument, for generic code: `client.literal(5)`.
    pub fn literal<T: Serialize>(value: T) -> impl IntoArg<T> {
        value
    }
}

fn req_names<S: AsRef<str>>(workers: &[S]) -> Vec<&str> {
    workers.iter().map(|w| w.as_ref()).collect()
}

fn short_type_name<T>() -> String {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base).to_string()
}

pub(crate) fn read_scheduler_file(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::InvalidArgument(format!("failed to read scheduler file {}: {e}", path.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::InvalidArgument(format!("failed to parse scheduler file {}: {e}", path.display())))?;
    v["address"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::InvalidArgument(format!("scheduler file {} has no \"address\"", path.display())))
}

/// A client stream to the scheduler: the gRPC client, the sender of our side, the scheduler's
/// side.
type Opened = (
    SchedulerClient<Channel>,
    mpsc::UnboundedSender<pb::ClientToScheduler>,
    tonic::Streaming<pb::SchedulerToClient>,
    String,
);

/// Connects and opens the client stream, retrying (with backoff) until `timeout`: a scheduler
/// that is starting, restarting or turning connections away for a moment is waited for, as dask
/// waits for `distributed.comm.timeouts.connect`.
async fn open_stream(addr: &Address, timeout: Duration, security: Option<&Security>) -> Result<Opened> {
    let started = Instant::now();
    let connect_err = |why: String| Error::Connect { address: addr.to_string(), timeout, why };
    let endpoint = dask_protocol::serve::endpoint(addr, timeout).map_err(|e| connect_err(e.to_string()))?;
    let mut delay = Duration::from_millis(20);
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let attempt = async {
            let channel = dask_protocol::serve::connect(&endpoint, addr, security).await.map_err(|e| {
                // Missing or refused credentials do not come right with time: give up at once.
                (dask_protocol::error_chain(&e), if e.is_fatal() { Fatal::Tls } else { Fatal::No })
            })?;
            let mut scheduler = SchedulerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            let (stream_tx, stream_rx) = mpsc::unbounded_channel::<pb::ClientToScheduler>();
            let client_id =
                format!("Client-{:x}", std::collections::hash_map::RandomState::new().hash_one(std::process::id()));
            let _ = stream_tx.send(pb::ClientToScheduler {
                ops: vec![pb::ClientOp {
                    kind: Some(pb::client_op::Kind::Hello(pb::ClientHello { client_id: client_id.clone() })),
                }],
            });
            let inbound = scheduler.client_stream(UnboundedReceiverStream::new(stream_rx)).await.map_err(|s| {
                let why = format!("{} ({})", s.message(), s.code());
                (why, if not_a_scheduler(&s) { Fatal::NotAScheduler } else { Fatal::No })
            })?;
            let mut scheduler = scheduler;
            // Something answers: make sure it is a dask scheduler before saying we are connected.
            scheduler.info(pb::Empty {}).await.map_err(|s| {
                let why = format!("{} ({})", s.message(), s.code());
                (why, if not_a_scheduler(&s) { Fatal::NotAScheduler } else { Fatal::No })
            })?;
            Ok::<_, (String, Fatal)>((scheduler, stream_tx, inbound.into_inner(), client_id))
        };
        let why = match tokio::time::timeout(left, attempt).await {
            Ok(Ok(opened)) => return Ok(opened),
            Ok(Err((why, Fatal::Tls))) => return Err(connect_err(why)),
            Ok(Err((why, Fatal::NotAScheduler))) => {
                return Err(connect_err(format!(
                    "the server there is not a dask scheduler ({why}); check the address and port (the \
                     scheduler listens on 8786 by default)"
                )));
            }
            // A TLS server given a tcp:// address answers with alerts, never with HTTP/2.
            Ok(Err((why, Fatal::No))) => match dask_protocol::serve::tls_behind_tcp(addr).await {
                Some(tls) => return Err(connect_err(format!("{tls} ({why})"))),
                None => why,
            },
            Err(_) => "timed out".to_string(),
        };
        if started.elapsed() + delay >= timeout {
            return Err(connect_err(why));
        }
        tracing::debug!(error = %why, "scheduler not reachable yet");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Why a connection attempt is not worth repeating.
enum Fatal {
    /// It is: the scheduler may be starting or busy.
    No,
    /// TLS: credentials missing or refused, or the wrong scheme.
    Tls,
    /// Some other server answers there.
    NotAScheduler,
}

/// An answer that shows the peer is some other server, not a dask scheduler starting up.
fn not_a_scheduler(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unimplemented | tonic::Code::NotFound)
        || (s.code() == tonic::Code::Unknown && s.message().contains("content-type"))
        || s.message().contains("grpc-status header missing")
        || s.message().contains("invalid content-type")
}

/// The client's credentials from dask's configuration, if it names any.
fn configured_security() -> Result<Option<Security>> {
    let settings = dask_protocol::config::Config::load().map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Security::from_flags_or_config(None, None, None, &settings, dask_protocol::tls::Role::Client)
        .map_err(Error::InvalidArgument)
}

async fn connect_inner(
    addr: Address,
    timeout: Duration,
    handle: tokio::runtime::Handle,
    security: Option<Security>,
) -> Result<Client> {
    let (scheduler, stream_tx, inbound, client_id) = open_stream(&addr, timeout, security.as_ref()).await?;
    let scheduler_id = scheduler.clone().info(pb::Empty {}).await.map(|r| r.into_inner().id).unwrap_or_default();
    let (ops_tx, ops_rx) = mpsc::unbounded_channel();
    let link = Arc::new(Link {
        scheduler: Mutex::new(scheduler),
        ops: Mutex::new(ops_tx),
        client_id: Mutex::new(client_id),
        scheduler_id: Mutex::new(scheduler_id),
        replies: Default::default(),
    });
    let shutdown = CancellationToken::new();
    let finished = CancellationToken::new();
    let table = Arc::new(KeyTable::default());
    let disconnected = Arc::new(Mutex::new(None));
    handle.spawn(writer(ops_rx, stream_tx, shutdown.clone()));
    let session = Session {
        address: addr.clone(),
        security: security.clone(),
        table: table.clone(),
        link: link.clone(),
        disconnected: disconnected.clone(),
        shutdown: shutdown.clone(),
        finished: finished.clone(),
    };
    handle.spawn(reader(inbound, session));
    let inner = Arc::new(ClientInner {
        address: addr,
        runtime: Mutex::new(None),
        handle,
        table,
        link,
        peers: data::DataPool::with_security(security.clone()),
        security,
        disconnected,
        closed: AtomicBool::new(false),
        shutdown,
        finished,
        cluster: Mutex::new(None),
        counter: AtomicU64::new(0),
        scatter_next: std::sync::atomic::AtomicUsize::new(0),
        random: std::collections::hash_map::RandomState::new(),
    });
    Ok(Client { inner })
}

/// Sends everything queued as one message, as often as the stream takes it.
async fn writer(
    mut ops: mpsc::UnboundedReceiver<pb::ClientOp>,
    stream: mpsc::UnboundedSender<pb::ClientToScheduler>,
    shutdown: CancellationToken,
) {
    loop {
        let (first, closing) = tokio::select! {
            op = ops.recv() => (op, false),
            _ = shutdown.cancelled() => (None, true),
        };
        let mut batch = Vec::new();
        let mut size = 0;
        if let Some(op) = first {
            size += op.encoded_len();
            batch.push(op);
        } else if !closing {
            break; // every sender is gone
        }
        // Everything queued, up to ~16 MiB per message.
        while size < 16 << 20 {
            match ops.try_recv() {
                Ok(op) => {
                    size += op.encoded_len();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        // A stream that is gone (its session lost) takes nothing; this writer then only drains
        // what was queued for it, until a new session's writer replaces it.
        if !batch.is_empty() {
            let _ = stream.send(pb::ClientToScheduler { ops: batch });
        }
        if closing && ops.is_empty() {
            break;
        }
    }
    // Dropping `stream` ends the client stream: the scheduler releases our keys, then ends
    // its side, which the reader sees.
}

/// What the reader shares with the client.
struct Session {
    address: Address,
    security: Option<Security>,
    table: Arc<KeyTable>,
    link: Arc<Link>,
    disconnected: Arc<Mutex<Option<String>>>,
    /// Cancelled when this client closes (then the stream's end is expected).
    shutdown: CancellationToken,
    finished: CancellationToken,
}

/// Applies the scheduler's reports. If the connection breaks while the scheduler did not say it
/// was closing (it crashed, or restarted, or the network failed), it reconnects within the
/// connect timeout, as dask's client does: the scheduler has forgotten this client's tasks by
/// then, so every future it held ends as lost, saying whether the scheduler restarted. New calls
/// fail while it reconnects; if it cannot, everything fails with `SchedulerLost`.
async fn reader(mut inbound: tonic::Streaming<pb::SchedulerToClient>, s: Session) {
    loop {
        let mut closing = None;
        let why = loop {
            match inbound.message().await {
                Ok(Some(batch)) => {
                    for r in batch.reports {
                        s.table.apply(r);
                    }
                    for r in batch.replies {
                        for mut undo in s.link.replies.answer(r) {
                            // Keys this client holds futures of stay wanted.
                            if let pb::client_op::Kind::Release(l) = &mut undo {
                                l.keys.retain(|k| s.table.get(k).is_none());
                                if l.keys.is_empty() {
                                    continue;
                                }
                            }
                            let _ = s.link.ops.lock().send(pb::ClientOp { kind: Some(undo) });
                        }
                    }
                    for m in batch.messages {
                        s.link.replies.deliver(m);
                    }
                    if !batch.closing.is_empty() {
                        closing = Some(batch.closing);
                    }
                }
                Ok(None) => break "the scheduler closed the connection".to_string(),
                Err(e) => break format!("{} ({})", e.message(), e.code()),
            }
        };
        if s.shutdown.is_cancelled() || closing.is_some() {
            let why = match closing {
                Some(c) => format!("the scheduler closed ({c})"),
                None => why,
            };
            s.finished.cancel();
            lost_for_good(&s, why);
            return;
        }
        tracing::warn!(scheduler = %s.address, reason = %why, "lost the scheduler; reconnecting");
        *s.disconnected.lock() =
            Some(format!("the connection to the scheduler was lost ({why}); the client is reconnecting"));
        s.link.replies.fail_all();
        let reopened = tokio::select! {
            r = open_stream(&s.address, CONNECT_TIMEOUT, s.security.as_ref()) => r,
            _ = s.shutdown.cancelled() => {
                s.finished.cancel();
                lost_for_good(&s, why);
                return;
            }
        };
        match reopened {
            Ok((scheduler, stream, new_inbound, client_id)) => {
                let id = scheduler.clone().info(pb::Empty {}).await.map(|r| r.into_inner().id).unwrap_or_default();
                let restarted = *s.link.scheduler_id.lock() != id;
                let reason = if restarted {
                    "the scheduler restarted: its tasks and results are gone; submit again"
                } else {
                    "the connection to the scheduler was lost, and with it this client's tasks; submit again"
                };
                if s.shutdown.is_cancelled() {
                    // Closed while reconnecting: the new stream ends here (dropped).
                    s.finished.cancel();
                    lost_for_good(&s, "the client was closed".into());
                    return;
                }
                s.table.lose_all(reason);
                s.link.replies.fail_all();
                // A new writer for the new session; the old one drains into its dead stream.
                let (ops_tx, ops_rx) = mpsc::unbounded_channel();
                tokio::spawn(writer(ops_rx, stream, s.shutdown.clone()));
                *s.link.ops.lock() = ops_tx;
                *s.link.scheduler.lock() = scheduler;
                *s.link.client_id.lock() = client_id;
                *s.link.scheduler_id.lock() = id;
                *s.disconnected.lock() = None;
                // Subscriptions live on: the new session subscribes again.
                for topic in s.link.replies.topics() {
                    let subscribe = s.link.replies.request(topic, pb::coord_request::Op::Subscribe(pb::Empty {}));
                    let _ = s.link.ops.lock().send(pb::ClientOp { kind: Some(subscribe) });
                }
                tracing::warn!(scheduler = %s.address, restarted, "reconnected to the scheduler; every future held was lost");
                inbound = new_inbound;
            }
            Err(e) => {
                s.finished.cancel();
                lost_for_good(&s, format!("{why}; reconnecting failed: {e}"));
                return;
            }
        }
    }
}

/// The scheduler is gone for good: every pending future fails with `SchedulerLost`.
fn lost_for_good(s: &Session, why: String) {
    let mut d = s.disconnected.lock();
    if d.as_ref().is_none_or(|x| x.contains("reconnecting")) {
        tracing::warn!(reason = %why, "lost the scheduler");
        *d = Some(why.clone());
        drop(d);
        s.table.disconnect_all(&why);
    }
    s.link.replies.fail_all();
}
