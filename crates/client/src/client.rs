//! `Client`: the connection to a scheduler and the dask.distributed API.
//!
//! All network work runs on a tokio runtime: the caller's, when the client was made with
//! [`Client::connect_async`], or one the client owns (one IO thread) when made from plain
//! code. Blocking calls wait on condition variables or `block_on`; each has an `_async` twin.
//! Messages to the scheduler go through one writer task that sends whatever has accumulated as
//! one batch: no RPC per task.
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
use crate::error::TaskFailure;
use crate::future::{Done, Future, FutureRef, KeyState, Status};
use crate::gather::{Errors, Gatherable, ValueMap};
use crate::graph::{Graph, KeyTree, Nested};
use crate::{Error, LocalCluster, Result};

/// Options of [`Client::submit_with`] (dask's keyword arguments).
#[derive(Clone, Debug)]
pub struct SubmitOptions {
    /// Use this key instead of a generated one.
    pub key: Option<String>,
    /// Same function and arguments give the same key, and run once (default true).
    pub pure: bool,
    /// Worker addresses or names the task may run on.
    pub workers: Vec<String>,
    /// With `workers`: may run elsewhere if those are busy or gone.
    pub allow_other_workers: bool,
    /// Times to rerun the task if it fails.
    pub retries: u32,
    /// Higher runs first.
    pub priority: i32,
    /// Abstract resources the task holds while it runs (dask's `resources={"GPU": 1}`): it runs
    /// only on a worker with that much free (`dask-worker --resources "GPU=2"`).
    pub resources: std::collections::BTreeMap<String, f64>,
    /// dask's `fifo_timeout` (default 100 ms): submitted within this long of this client's
    /// previous submission, the task shares its priority (the two are ordered together, by
    /// graph order); submitted later, it runs after everything submitted before.
    pub fifo_timeout: Duration,
}

/// dask's default `fifo_timeout`.
pub const FIFO_TIMEOUT: Duration = Duration::from_millis(100);

impl Default for SubmitOptions {
    fn default() -> Self {
        SubmitOptions {
            key: None,
            pure: true,
            workers: Vec::new(),
            allow_other_workers: false,
            retries: 0,
            priority: 0,
            resources: std::collections::BTreeMap::new(),
            fifo_timeout: FIFO_TIMEOUT,
        }
    }
}

/// Options of [`Client::scatter_with`].
#[derive(Clone, Debug)]
pub struct ScatterOptions {
    /// Put the data on these workers (addresses or names); default: spread over all.
    pub workers: Vec<String>,
    /// Put every value on every (chosen) worker.
    pub broadcast: bool,
    /// Name each value by a hash of its bytes (dask's `hash=True`, the default), so scattering
    /// equal data twice gives one key; `false` gives each value a fresh random key and skips
    /// hashing (worth it for values of hundreds of MB).
    pub hash: bool,
}

impl Default for ScatterOptions {
    fn default() -> Self {
        ScatterOptions { workers: Vec::new(), broadcast: false, hash: true }
    }
}

/// The keys this client holds futures for: a count of handles and the shared state.
#[derive(Default)]
pub(crate) struct KeyTable {
    keys: Mutex<FxHashMap<Arc<str>, Held>>,
    /// Numbers each entry, so a handle from before a cancel cannot release its successor.
    next_gen: AtomicU64,
    /// Entries numbered from here on were made after this client's last `restart` began: a
    /// restart's late cancellation must not end them (the same key submitted again).
    restart_floor: AtomicU64,
}

/// Handles this client holds for one key, the key's shared state, and the entry's number.
struct Held {
    count: u32,
    state: Arc<KeyState>,
    generation: u64,
}

impl KeyTable {
    /// Makes room for `n` more keys.
    fn reserve(&self, n: usize) {
        self.keys.lock().reserve(n);
    }

    fn get(&self, key: &str) -> Option<Arc<KeyState>> {
        self.keys.lock().get(key).map(|h| h.state.clone())
    }

    fn apply(&self, report: pb::KeyReport) {
        use pb::key_report::Kind;
        let Some(state) = self.get(&report.key) else {
            return;
        };
        let status = match report.kind {
            Some(Kind::Memory(m)) => {
                let value = match (m.has_value, dask_protocol::codec::codec_name(&m.codec)) {
                    (true, Ok(codec)) => Some(Value { codec, data: m.value }),
                    _ => None,
                };
                Status::Finished { workers: m.workers, value }
            }
            Some(Kind::Erred(e)) => Status::Error(Arc::new(TaskFailure::from(e))),
            // The scheduler cancelled it (a restart): the future is over, and a later submission
            // of the key is a new computation. Not an entry made after this client's own
            // restart began: that report is late, for the key's previous life.
            Some(Kind::Cancelled(c)) if c.by_scheduler => {
                let floor = self.restart_floor.load(Ordering::Relaxed);
                let mut keys = self.keys.lock();
                match keys.get(report.key.as_str()) {
                    Some(h) if floor != 0 && h.generation >= floor => return,
                    Some(_) => {
                        keys.remove(report.key.as_str());
                    }
                    None => return,
                }
                drop(keys);
                Status::Cancelled(Arc::from(c.reason))
            }
            // This client's own cancel, marked already; a late confirmation must not cancel a
            // newer submission of the same key.
            Some(Kind::Cancelled(_)) => return,
            Some(Kind::Lost(l)) => {
                // Gone for good: a later submission of the key starts afresh.
                self.detach(&report.key);
                Status::Lost(l.reason)
            }
            None => return,
        };
        state.set(status);
    }

    /// Forgets the entry of `key` (its handles keep their state and release nothing).
    fn detach(&self, key: &str) {
        self.keys.lock().remove(key);
    }

    /// Every future ends as lost, with `why`; later submissions of the same keys are new.
    fn lose_all(&self, why: &str) {
        let states: Vec<_> = self.keys.lock().drain().map(|(_, h)| h.state).collect();
        for s in states {
            s.set(Status::Lost(why.to_string()));
        }
    }

    /// Every future made before entry number `floor` ends as cancelled, with `why`; later
    /// submissions of the same keys are new.
    fn cancel_below(&self, floor: u64, why: &str) {
        let why: Arc<str> = Arc::from(why);
        let states: Vec<_> = {
            let mut keys = self.keys.lock();
            let gone: Vec<Arc<str>> =
                keys.iter().filter(|(_, h)| h.generation < floor).map(|(k, _)| k.clone()).collect();
            gone.into_iter().filter_map(|k| keys.remove(&k)).map(|h| h.state).collect()
        };
        for s in states {
            s.set(Status::Cancelled(why.clone()));
        }
    }

    fn disconnect_all(&self, why: &str) {
        let states: Vec<_> = self.keys.lock().values().map(|h| h.state.clone()).collect();
        for s in states {
            s.set(Status::Disconnected(why.to_string()));
        }
    }
}

/// How many times a value whose holders failed to give it is asked for again.
const FETCH_ROUNDS: usize = 4;

pub(crate) struct ClientInner {
    address: Address,
    /// The runtime this client owns, if it was created from blocking code.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    table: Arc<KeyTable>,
    /// The connection to the scheduler: replaced when the client reconnects.
    link: Arc<Link>,
    peers: data::DataPool,
    disconnected: Arc<Mutex<Option<String>>>,
    closed: AtomicBool,
    /// Tells the writer to send what is queued and end the stream.
    shutdown: CancellationToken,
    /// Cancelled when the scheduler has seen the end of our stream (or the connection is gone).
    finished: CancellationToken,
    /// A cluster started for this client by `Client::new`, closed with it.
    cluster: Mutex<Option<LocalCluster>>,
    counter: AtomicU64,
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
    /// Runs `f` to completion from blocking code, also when called from async code on a
    /// multi-thread runtime. On a current-thread runtime blocking would stop the very task
    /// that has to answer, so it is refused.
    pub(crate) fn block_on<F: std::future::Future<Output = Result<R>>, R>(&self, f: F) -> Result<R> {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => Err(Error::InvalidArgument(
                "a blocking call on a current-thread tokio runtime would deadlock: use the .await / _async form".into(),
            )),
            Ok(_) => tokio::task::block_in_place(|| self.handle.block_on(f)),
            Err(_) => self.handle.block_on(f),
        }
    }

    /// Runs a blocking wait (a condition variable), telling tokio first when called from
    /// async code so the runtime's other work goes on.
    pub(crate) fn blocking<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => Err(Error::InvalidArgument(
                "a blocking call on a current-thread tokio runtime would deadlock: use the .await / _async form".into(),
            )),
            Ok(_) => Ok(tokio::task::block_in_place(f)),
            Err(_) => Ok(f()),
        }
    }

    fn send(&self, kind: pb::client_op::Kind) {
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

    pub(crate) fn release_ref(&self, key: &str, generation: u64) {
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

    pub(crate) fn cancel(&self, keys: &[Arc<str>]) {
        for k in keys {
            if let Some(s) = self.table.get(k) {
                s.set(Status::Cancelled(Arc::from("cancelled by this client")));
            }
            // A later submission of the key is a new computation, not this cancelled one.
            self.table.detach(k);
        }
        self.send(pb::client_op::Kind::Cancel(pb::KeyList { keys: keys.iter().map(|k| k.to_string()).collect() }));
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
            // Ask the scheduler where these are now.
            for k in &failed {
                let (version, state) = versions[k];
                state.reset_if(version);
            }
            self.send(pb::client_op::Kind::Want(pb::KeyList { keys: failed.iter().map(|k| k.to_string()).collect() }));
            pending.retain(|(k, _)| failed.contains(k));
        }
        Ok(values)
    }

    /// The value of one key, once it is done.
    pub(crate) async fn value_of<T: DeserializeOwned + 'static>(
        &self,
        key: &Arc<str>,
        state: &Arc<KeyState>,
    ) -> Result<T> {
        let refs = [(key.clone(), state.clone())];
        let mut values = self.resolve(&refs, false).await?;
        let v = values.remove(key).expect("resolve returns every key or fails");
        Ok(v.decode()?)
    }

    fn unique_key(&self, prefix: &str) -> String {
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
        Status::Error(e) => Err(Error::Task((*e).clone())),
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

/// Default time allowed to reach a scheduler (dask: `distributed.comm.timeouts.connect`, 30 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time `Client::restart` waits for the workers to come back (dask: 4 × the connect
/// timeout).
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the futures of a restarted cluster were cancelled.
const RESTARTED: &str = "the cluster was restarted (Client.restart): every task and value was released; submit again";

impl Client {
    /// Starts a [`LocalCluster`] with default settings and connects to it.
    pub fn new() -> Result<Client> {
        let cluster = LocalCluster::builder().build()?;
        let client = Client::connect(&cluster.scheduler_address())?;
        *client.inner.cluster.lock() = Some(cluster);
        Ok(client)
    }

    /// Connects to the scheduler at `address` (`tcp://host:port`), blocking.
    pub fn connect(address: &str) -> Result<Client> {
        Client::connect_with_timeout(address, CONNECT_TIMEOUT)
    }

    /// Connects, giving up with a clear error after `timeout`.
    pub fn connect_with_timeout(address: &str, timeout: Duration) -> Result<Client> {
        let addr = Address::parse(address, Some(dask_protocol::DEFAULT_SCHEDULER_PORT))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dask-client-io")
            .enable_all()
            .build()
            .map_err(|e| Error::InvalidArgument(format!("failed to start the client's runtime: {e}")))?;
        let handle = rt.handle().clone();
        let client = handle.block_on(connect_inner(addr, timeout, handle.clone()))?;
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
        connect_inner(addr, CONNECT_TIMEOUT, tokio::runtime::Handle::current()).await
    }

    /// The scheduler's address.
    pub fn scheduler_address(&self) -> String {
        self.inner.address.to_string()
    }

    // ------------------------------------------------------------------ submitting work

    /// Runs `f(args...)` on the cluster. Returns at once.
    pub fn submit<T: Task, A: IntoArgs<T::Args>>(&self, f: T, args: A) -> Result<Future<T::Output>> {
        self.submit_with(f, args, SubmitOptions::default())
    }

    /// [`submit`](Self::submit) with dask's options (key, pure, workers, retries, priority).
    pub fn submit_with<T: Task, A: IntoArgs<T::Args>>(
        &self,
        _f: T,
        args: A,
        opts: SubmitOptions,
    ) -> Result<Future<T::Output>> {
        self.check_open()?;
        let mut deps = Vec::new();
        let arg = args.into_args(&mut deps)?;
        let def = self.task_def::<T>(arg, deps, opts.key.clone(), opts.pure, &opts)?;
        let (r, _) = self.inner.new_ref(&def.key);
        let key = def.key.clone();
        self.inner.send(pb::client_op::Kind::UpdateGraph(pb::UpdateGraph {
            tasks: vec![def],
            wants: vec![key],
            fifo_timeout_s: opts.fifo_timeout.as_secs_f64(),
        }));
        Ok(Future::from_ref(r))
    }

    fn task_def<T: Task>(
        &self,
        arg: pb::Arg,
        deps: Vec<String>,
        key: Option<String>,
        pure: bool,
        opts: &SubmitOptions,
    ) -> Result<pb::TaskDef> {
        let spec = pb::TaskSpec { function: T::NAME.to_string(), args: Some(arg) }.encode_to_vec();
        let key = match key {
            Some(k) if k.is_empty() => {
                return Err(Error::InvalidArgument("a key must not be empty".into()));
            }
            Some(k) => k,
            None if pure => dask_protocol::tokenize::key(T::NAME, &spec),
            None => self.inner.unique_key(T::NAME),
        };
        if let Some((name, amount)) =
            opts.resources.iter().find(|(n, a)| n.is_empty() || !(a.is_finite() && **a >= 0.0))
        {
            return Err(Error::InvalidArgument(format!(
                "resource {name:?} = {amount}: give a name and an amount of zero or more, e.g. GPU = 1"
            )));
        }
        Ok(pb::TaskDef {
            key,
            spec: Bytes::from(spec),
            dependencies: deps,
            priority: opts.priority,
            retries: opts.retries,
            workers: opts.workers.clone(),
            allow_other_workers: opts.allow_other_workers,
            resources: opts
                .resources
                .iter()
                .map(|(name, amount)| pb::Resource { name: name.clone(), amount: *amount })
                .collect(),
        })
    }

    /// Runs a one-parameter function over each item: `client.map(inc, 0..100)`.
    pub fn map<T, I, X>(&self, f: T, items: I) -> Result<Vec<Future<T::Output>>>
    where
        T: Task,
        T::Args: OneArg,
        (X,): IntoArgs<T::Args>,
        I: IntoIterator<Item = X>,
    {
        self.map_args(f, items.into_iter().map(|x| (x,)))
    }

    /// Runs a function over each tuple of arguments: `client.map_args(add, xs.zip(ys))`
    /// (dask's `map(add, xs, ys)`).
    pub fn map_args<T, I, A>(&self, f: T, items: I) -> Result<Vec<Future<T::Output>>>
    where
        T: Task,
        A: IntoArgs<T::Args>,
        I: IntoIterator<Item = A>,
    {
        self.map_with(f, items, SubmitOptions::default(), None)
    }

    /// `map_args` with options; `keys` (when given) names each task; otherwise `opts.key`, if set,
    /// is a prefix (`prefix-<token>`).
    pub fn map_with<T, I, A>(
        &self,
        _f: T,
        items: I,
        opts: SubmitOptions,
        keys: Option<Vec<String>>,
    ) -> Result<Vec<Future<T::Output>>>
    where
        T: Task,
        A: IntoArgs<T::Args>,
        I: IntoIterator<Item = A>,
    {
        self.check_open()?;
        const BATCH: usize = 10_000;
        let items = items.into_iter();
        // Sized once for the whole map rather than grown (and rehashed) on the way.
        let expected = items.size_hint().0;
        self.inner.table.reserve(expected);
        let mut futures = Vec::with_capacity(expected);
        let mut tasks = Vec::with_capacity(expected.min(BATCH));
        let mut wants = Vec::with_capacity(expected.min(BATCH));
        let mut keys = keys.map(|k| k.into_iter());
        for args in items {
            let mut deps = Vec::new();
            let arg = args.into_args(&mut deps)?;
            let key = match &mut keys {
                Some(k) => Some(k.next().ok_or_else(|| Error::InvalidArgument("fewer keys than items".into()))?),
                None => None,
            };
            let mut def = self.task_def::<T>(arg, deps, key.clone(), opts.pure, &opts)?;
            if let (None, Some(prefix)) = (&key, &opts.key) {
                let token = def.key.rsplit('-').next().unwrap_or_default().to_string();
                def.key = format!("{prefix}-{token}");
            }
            let (r, fresh) = self.inner.new_ref(&def.key);
            futures.push(Future::from_ref(r));
            if fresh {
                wants.push(def.key.clone());
                tasks.push(def);
            }
            if tasks.len() >= BATCH {
                self.inner.send(pb::client_op::Kind::UpdateGraph(pb::UpdateGraph {
                    tasks: std::mem::take(&mut tasks),
                    wants: std::mem::take(&mut wants),
                    fifo_timeout_s: opts.fifo_timeout.as_secs_f64(),
                }));
            }
        }
        if !tasks.is_empty() {
            self.inner.send(pb::client_op::Kind::UpdateGraph(pb::UpdateGraph {
                tasks,
                wants,
                fifo_timeout_s: opts.fifo_timeout.as_secs_f64(),
            }));
        }
        Ok(futures)
    }

    /// Runs a whole graph and returns the value of `key`.
    pub fn get<T: DeserializeOwned + 'static>(&self, graph: &Graph, key: &str) -> Result<T> {
        let mut v = self.get_many::<T>(graph, &[key])?;
        Ok(v.pop().expect("one key"))
    }

    /// Runs a whole graph and returns the values of `keys`, in order.
    pub fn get_many<T: DeserializeOwned + 'static>(&self, graph: &Graph, keys: &[&str]) -> Result<Vec<T>> {
        let futures = self.compute_graph::<T>(graph, keys)?;
        self.gather(&futures)
    }

    /// Runs a whole graph and returns the values of nested lists of keys, in the same shape:
    /// `client.get_nested::<i64>(&g, vec![KeyTree::from(vec!["x", "y"]), "z".into()].into())`.
    pub fn get_nested<T: DeserializeOwned + 'static>(&self, graph: &Graph, keys: KeyTree) -> Result<Nested<T>> {
        let mut flat = Vec::new();
        keys.flatten(&mut flat);
        let values = self.get_many::<T>(graph, &flat)?;
        Ok(keys.fill(&mut values.into_iter()))
    }

    /// Submits a graph and returns futures for `keys` (dask's `client.compute` of a graph).
    pub fn compute_graph<T>(&self, graph: &Graph, keys: &[&str]) -> Result<Vec<Future<T>>> {
        self.check_open()?;
        for k in keys {
            if !graph.contains(k) && self.inner.table.get(k).is_none() {
                return Err(Error::InvalidArgument(format!("key {k:?} is not in the graph")));
            }
        }
        let mut futures = Vec::with_capacity(keys.len());
        let mut wants = Vec::new();
        for k in keys {
            let (r, _) = self.inner.new_ref(k);
            futures.push(Future::from_ref(r));
            wants.push(k.to_string());
        }
        // One message, so every key of the graph is known when the wants are applied.
        self.inner.send(pb::client_op::Kind::UpdateGraph(pb::UpdateGraph {
            tasks: graph.task_defs(),
            wants,
            fifo_timeout_s: FIFO_TIMEOUT.as_secs_f64(),
        }));
        Ok(futures)
    }

    // ------------------------------------------------------------------ results

    /// Waits for and returns the values: of a `Vec` of futures, of one future, or of nested
    /// vectors and maps of futures. The first failed task's error is returned.
    pub fn gather<G: Gatherable + ?Sized>(&self, what: &G) -> Result<G::Output> {
        self.gather_with(what, Errors::Raise)
    }

    /// `gather` with `errors = skip`: failed, cancelled and lost futures are left out.
    pub fn gather_with<G: Gatherable + ?Sized>(&self, what: &G, errors: Errors) -> Result<G::Output> {
        self.inner.block_on(self.gather_async_with(what, errors))
    }

    pub async fn gather_async<G: Gatherable + ?Sized>(&self, what: &G) -> Result<G::Output> {
        self.gather_async_with(what, Errors::Raise).await
    }

    pub async fn gather_async_with<G: Gatherable + ?Sized>(&self, what: &G, errors: Errors) -> Result<G::Output> {
        let mut handles = Vec::new();
        what.collect(&mut handles);
        let refs: Vec<(Arc<str>, Arc<KeyState>)> = handles.iter().map(|r| (r.key.clone(), r.state.clone())).collect();
        let values = self.inner.resolve(&refs, errors == Errors::Skip).await?;
        let mut map = ValueMap { values, skip: errors == Errors::Skip };
        what.build(&mut map)?.ok_or_else(|| Error::InvalidArgument("nothing to gather".into()))
    }

    /// Puts values on the workers and returns futures to them.
    pub fn scatter<T: Serialize + 'static>(&self, values: Vec<T>) -> Result<Vec<Future<T>>> {
        self.scatter_with(values, ScatterOptions::default())
    }

    /// Puts one value on the workers.
    pub fn scatter_one<T: Serialize + 'static>(&self, value: T) -> Result<Future<T>> {
        Ok(self.scatter(vec![value])?.pop().expect("one value"))
    }

    /// Puts each value of a map on the workers; the result maps the same keys to futures.
    pub fn scatter_map<K: Eq + Hash + Clone, T: Serialize + 'static>(
        &self,
        values: HashMap<K, T>,
    ) -> Result<HashMap<K, Future<T>>> {
        let (ks, vs): (Vec<K>, Vec<T>) = values.into_iter().unzip();
        Ok(ks.into_iter().zip(self.scatter(vs)?).collect())
    }

    pub fn scatter_with<T: Serialize + 'static>(&self, values: Vec<T>, opts: ScatterOptions) -> Result<Vec<Future<T>>> {
        self.inner.block_on(self.scatter_async_with(values, opts))
    }

    pub async fn scatter_async_with<T: Serialize + 'static>(
        &self,
        values: Vec<T>,
        opts: ScatterOptions,
    ) -> Result<Vec<Future<T>>> {
        self.check_open()?;
        let info = self.scheduler_info_async().await?;
        let mut targets: Vec<String> = info
            .workers
            .iter()
            .filter(|w| opts.workers.is_empty() || opts.workers.iter().any(|x| *x == w.address || *x == w.name))
            .map(|w| w.address.clone())
            .collect();
        if targets.is_empty() {
            return Err(Error::InvalidArgument(if opts.workers.is_empty() {
                "no workers to scatter to: start some, or wait_for_workers first".into()
            } else {
                format!("none of the workers {:?} is connected", opts.workers)
            }));
        }
        targets.sort();
        let type_name = short_type_name::<T>();
        let mut per_worker: HashMap<String, Vec<(String, Value)>> = HashMap::new();
        let mut placed: Vec<pb::ScatteredKey> = Vec::with_capacity(values.len());
        for (i, v) in values.into_iter().enumerate() {
            let value = Value::from_owned(v)?;
            let key = if opts.hash {
                dask_protocol::tokenize::key(&type_name, &value.data)
            } else {
                self.inner.unique_key(&type_name)
            };
            let holders: Vec<String> =
                if opts.broadcast { targets.clone() } else { vec![targets[i % targets.len()].clone()] };
            for w in &holders {
                per_worker.entry(w.clone()).or_default().push((key.clone(), value.clone()));
            }
            placed.push(pb::ScatteredKey { key, workers: holders, nbytes: value.data.len() as u64 });
        }
        let puts = per_worker.into_iter().map(|(worker, vals)| async move {
            self.inner.peers.put_data(&worker, vals).await.map_err(|e| Error::Fetch {
                key: String::new(),
                workers: vec![worker.clone()],
                why: format!("failed to put data: {e}"),
            })?;
            Ok::<_, Error>(())
        });
        for r in join_all(puts).await {
            r?;
        }
        let futures: Vec<Future<T>> = placed.iter().map(|p| Future::from_ref(self.inner.new_ref(&p.key).0)).collect();
        self.inner.send(pb::client_op::Kind::Scattered(pb::Scattered { keys: placed }));
        // As in dask, scatter returns once the scheduler knows the keys (its report that they
        // are in memory), so who_has and the like see them at once.
        for f in &futures {
            crate::future::Done(&f.inner.state).await;
        }
        Ok(futures)
    }

    /// Cancels these futures.
    pub fn cancel<T>(&self, futures: &[Future<T>]) {
        let keys: Vec<Arc<str>> = futures.iter().map(|f| f.inner.key.clone()).collect();
        self.inner.cancel(&keys);
    }

    /// Lets the task run to completion even though nobody holds its future, even after this
    /// client disconnects (dask's `fire_and_forget`). Its result is dropped when done.
    pub fn fire_and_forget<T>(&self, future: Future<T>) {
        self.inner.send(pb::client_op::Kind::FireAndForget(pb::KeyList { keys: vec![future.key().to_string()] }));
        drop(future);
    }

    // ------------------------------------------------------------------ queries

    pub fn scheduler_info(&self) -> Result<pb::SchedulerInfo> {
        self.inner.block_on(self.scheduler_info_async())
    }

    pub async fn scheduler_info_async(&self) -> Result<pb::SchedulerInfo> {
        Ok(self.inner.link.rpc().info(pb::Empty {}).await?.into_inner())
    }

    /// [`who_has`](Self::who_has) for async code.
    pub async fn who_has_async<G: Gatherable + ?Sized>(&self, futures: &G) -> Result<HashMap<String, Vec<String>>> {
        let mut refs = Vec::new();
        futures.collect(&mut refs);
        let keys = refs.iter().map(|r| r.key.to_string()).collect();
        let reply = self.inner.link.rpc().who_has(pb::KeysRequest { keys }).await?.into_inner();
        Ok(reply.entries.into_iter().map(|e| (e.key, e.workers)).collect())
    }

    /// [`has_what`](Self::has_what) for async code.
    pub async fn has_what_async(&self) -> Result<HashMap<String, Vec<String>>> {
        let reply = self.inner.link.rpc().has_what(pb::Empty {}).await?.into_inner();
        Ok(reply.entries.into_iter().map(|e| (e.worker, e.keys)).collect())
    }

    /// Worker addresses holding each future's key.
    pub fn who_has<G: Gatherable + ?Sized>(&self, futures: &G) -> Result<HashMap<String, Vec<String>>> {
        self.inner.block_on(self.who_has_async(futures))
    }

    /// Keys held by each worker.
    pub fn has_what(&self) -> Result<HashMap<String, Vec<String>>> {
        self.inner.block_on(self.has_what_async())
    }

    /// Threads of each worker.
    pub fn nthreads(&self) -> Result<HashMap<String, u32>> {
        Ok(self.scheduler_info()?.workers.into_iter().map(|w| (w.address, w.nthreads)).collect())
    }

    /// Blocks until at least `n` workers are connected, or `timeout` passes.
    pub fn wait_for_workers(&self, n: usize, timeout: Option<Duration>) -> Result<()> {
        self.inner.block_on(self.wait_for_workers_async(n, timeout))
    }

    pub async fn wait_for_workers_async(&self, n: usize, timeout: Option<Duration>) -> Result<()> {
        let req = pb::WaitForWorkersRequest { n: n as u32, timeout_s: timeout.map_or(0.0, |t| t.as_secs_f64()) };
        match self.inner.link.rpc().wait_for_workers(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => {
                Err(Error::Timeout { what: format!("{n} workers"), after: timeout.unwrap_or_default() })
            }
            Err(s) => Err(s.into()),
        }
    }

    /// Restarts every worker through its nanny and forgets every task: every future of every
    /// client ends as cancelled, saying why (dask's `Client.restart`). Returns once as many
    /// workers as before are back, all of them new; fails at once if a worker has no nanny
    /// (started with `--no-nanny`), and after [`RESTART_TIMEOUT`] if they do not come back.
    pub fn restart(&self) -> Result<()> {
        self.restart_with_timeout(RESTART_TIMEOUT)
    }

    /// [`restart`](Self::restart) with a timeout of your own.
    pub fn restart_with_timeout(&self, timeout: Duration) -> Result<()> {
        self.inner.block_on(self.restart_async(timeout))
    }

    /// [`restart`](Self::restart) for async code.
    pub async fn restart_async(&self, timeout: Duration) -> Result<()> {
        self.check_open()?;
        let req = pb::RestartRequest { timeout_s: timeout.as_secs_f64(), reason: String::new() };
        // Futures made before this point end with the restart (the scheduler's reports say so
        // in stream order; the guard makes sure of it even if this call is dropped half-way).
        // Those made from here on belong to the restarted cluster.
        let table = &self.inner.table;
        let floor = table.next_gen.load(Ordering::Relaxed);
        table.restart_floor.store(floor.max(1), Ordering::Relaxed);
        struct CancelOnDrop<'a>(Option<(&'a KeyTable, u64)>);
        impl Drop for CancelOnDrop<'_> {
            fn drop(&mut self) {
                if let Some((table, floor)) = self.0.take() {
                    table.cancel_below(floor, RESTARTED);
                }
            }
        }
        let mut guard = CancelOnDrop(Some((table, floor)));
        match self.inner.link.rpc().restart(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => Err(Error::Timeout {
                what: format!("the workers to come back after a restart ({})", s.message()),
                after: timeout,
            }),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                // Refused before anything was released.
                guard.0 = None;
                Err(Error::InvalidArgument(format!("cannot restart: {}", s.message())))
            }
            Err(s) => Err(s.into()),
        }
    }

    /// Retires these workers (addresses or names) gracefully (dask's `retire_workers`): they get
    /// no new tasks and finish those they have, every value only they hold is copied to
    /// another worker first (nothing is recomputed), then they close (`close`; their nannies
    /// too) or stay idle. Returns the addresses of the workers retired. Refused when no other
    /// worker could take their values.
    pub fn retire_workers<S: AsRef<str>>(&self, workers: &[S], close: bool) -> Result<Vec<String>> {
        self.inner.block_on(self.retire_workers_async(workers, close))
    }

    /// [`retire_workers`](Self::retire_workers) for async code.
    pub async fn retire_workers_async<S: AsRef<str>>(&self, workers: &[S], close: bool) -> Result<Vec<String>> {
        self.check_open()?;
        if workers.is_empty() {
            return Ok(Vec::new());
        }
        let req = pb::RetireRequest {
            workers: workers.iter().map(|w| w.as_ref().to_string()).collect(),
            n: 0,
            close,
            timeout_s: RESTART_TIMEOUT.as_secs_f64(),
        };
        match self.inner.link.rpc().retire_workers(req).await {
            Ok(r) => Ok(r.into_inner().workers),
            Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound) => {
                Err(Error::InvalidArgument(format!("cannot retire {:?}: {}", req_names(workers), s.message())))
            }
            Err(s) => Err(s.into()),
        }
    }

    /// Copies each future's value onto `n` workers (`None`: every worker), among `workers` if
    /// any are named (addresses or names), as dask's `Client.replicate`: once the futures are
    /// done, the least loaded workers fetch a copy each; copies beyond `n` are dropped. A
    /// one-shot copy: nothing re-replicates after a loss (the scheduler's records stay right).
    /// Returns once every copy arrived or failed (a copy fails if its value is released or its
    /// holders leave meanwhile); the number that failed is logged.
    pub fn replicate<G: Gatherable + ?Sized, S: AsRef<str>>(
        &self,
        futures: &G,
        n: Option<usize>,
        workers: &[S],
    ) -> Result<()> {
        self.inner.block_on(self.replicate_async(futures, n, workers))
    }

    /// [`replicate`](Self::replicate) for async code.
    pub async fn replicate_async<G: Gatherable + ?Sized, S: AsRef<str>>(
        &self,
        futures: &G,
        n: Option<usize>,
        workers: &[S],
    ) -> Result<()> {
        if n == Some(0) {
            return Err(Error::InvalidArgument("replicate needs n of at least 1 (or None: every worker)".into()));
        }
        let keys = self.done_keys(futures).await?;
        let req = pb::ReplicateRequest {
            keys,
            n: n.map_or(0, |n| n.min(u32::MAX as usize) as u32),
            workers: workers.iter().map(|w| w.as_ref().to_string()).collect(),
        };
        let failed = self.copies_reply(self.inner.link.rpc().replicate(req).await, workers)?;
        if failed > 0 {
            tracing::warn!(failed, "replicate: some copies could not be made (values or their holders went meanwhile)");
        }
        Ok(())
    }

    /// Moves the futures' values among `workers` (every worker if none are named) so that each
    /// holds about the same bytes of them, as dask's `Client.rebalance`: from the most loaded
    /// worker, largest values first, to the least loaded; each value is copied first, then
    /// dropped where it was. [`rebalance_all`](Self::rebalance_all) moves every value.
    pub fn rebalance<G: Gatherable + ?Sized, S: AsRef<str>>(&self, futures: &G, workers: &[S]) -> Result<()> {
        self.inner.block_on(self.rebalance_async(futures, workers))
    }

    /// [`rebalance`](Self::rebalance) for async code.
    pub async fn rebalance_async<G: Gatherable + ?Sized, S: AsRef<str>>(
        &self,
        futures: &G,
        workers: &[S],
    ) -> Result<()> {
        let keys = self.done_keys(futures).await?;
        if keys.is_empty() {
            return Ok(());
        }
        self.rebalance_keys(keys, workers).await
    }

    /// Rebalances every value the scheduler holds (dask's `rebalance()` without futures).
    pub fn rebalance_all<S: AsRef<str>>(&self, workers: &[S]) -> Result<()> {
        self.inner.block_on(self.rebalance_keys(Vec::new(), workers))
    }

    async fn rebalance_keys<S: AsRef<str>>(&self, keys: Vec<String>, workers: &[S]) -> Result<()> {
        self.check_open()?;
        let req = pb::RebalanceRequest { keys, workers: workers.iter().map(|w| w.as_ref().to_string()).collect() };
        let failed = self.copies_reply(self.inner.link.rpc().rebalance(req).await, workers)?;
        if failed > 0 {
            tracing::warn!(failed, "rebalance: some values could not be moved (they or their holders went meanwhile)");
        }
        Ok(())
    }

    /// The keys of `futures`, once every one is done.
    async fn done_keys<G: Gatherable + ?Sized>(&self, futures: &G) -> Result<Vec<String>> {
        self.check_open()?;
        let mut refs = Vec::new();
        futures.collect(&mut refs);
        join_all(refs.iter().map(|r| crate::future::Done(&r.state))).await;
        Ok(refs.iter().map(|r| r.key.to_string()).collect())
    }

    fn copies_reply<S: AsRef<str>>(
        &self,
        reply: std::result::Result<tonic::Response<pb::CopiesReply>, tonic::Status>,
        workers: &[S],
    ) -> Result<u32> {
        match reply {
            Ok(r) => Ok(r.into_inner().failed),
            Err(s) if s.code() == tonic::Code::NotFound => {
                Err(Error::InvalidArgument(format!("cannot copy to {:?}: {}", req_names(workers), s.message())))
            }
            Err(s) => Err(s.into()),
        }
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
        if let Some(cluster) = self.inner.cluster.lock().take() {
            cluster.close();
        }
    }

    fn check_open(&self) -> Result<()> {
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
async fn open_stream(addr: &Address, timeout: Duration) -> Result<Opened> {
    let started = Instant::now();
    let connect_err = |why: String| Error::Connect { address: addr.to_string(), timeout, why };
    let endpoint = dask_protocol::serve::endpoint(addr, timeout).map_err(|e| connect_err(e.to_string()))?;
    let mut delay = Duration::from_millis(20);
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let attempt = async {
            let channel = endpoint.connect().await.map_err(|e| dask_protocol::error_chain(&e))?;
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
            let inbound = scheduler
                .client_stream(UnboundedReceiverStream::new(stream_rx))
                .await
                .map_err(|s| format!("{} ({})", s.message(), s.code()))?
                .into_inner();
            Ok::<_, String>((scheduler, stream_tx, inbound, client_id))
        };
        let why = match tokio::time::timeout(left, attempt).await {
            Ok(Ok(opened)) => return Ok(opened),
            Ok(Err(why)) => why,
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

async fn connect_inner(addr: Address, timeout: Duration, handle: tokio::runtime::Handle) -> Result<Client> {
    let (scheduler, stream_tx, inbound, client_id) = open_stream(&addr, timeout).await?;
    let scheduler_id = scheduler.clone().info(pb::Empty {}).await.map(|r| r.into_inner().id).unwrap_or_default();
    let (ops_tx, ops_rx) = mpsc::unbounded_channel();
    let link = Arc::new(Link {
        scheduler: Mutex::new(scheduler),
        ops: Mutex::new(ops_tx),
        client_id: Mutex::new(client_id),
        scheduler_id: Mutex::new(scheduler_id),
    });
    let shutdown = CancellationToken::new();
    let finished = CancellationToken::new();
    let table = Arc::new(KeyTable::default());
    let disconnected = Arc::new(Mutex::new(None));
    handle.spawn(writer(ops_rx, stream_tx, shutdown.clone()));
    let session = Session {
        address: addr.clone(),
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
        peers: data::DataPool::default(),
        disconnected,
        closed: AtomicBool::new(false),
        shutdown,
        finished,
        cluster: Mutex::new(None),
        counter: AtomicU64::new(0),
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
        let reopened = tokio::select! {
            r = open_stream(&s.address, CONNECT_TIMEOUT) => r,
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
                // A new writer for the new session; the old one drains into its dead stream.
                let (ops_tx, ops_rx) = mpsc::unbounded_channel();
                tokio::spawn(writer(ops_rx, stream, s.shutdown.clone()));
                *s.link.ops.lock() = ops_tx;
                *s.link.scheduler.lock() = scheduler;
                *s.link.client_id.lock() = client_id;
                *s.link.scheduler_id.lock() = id;
                *s.disconnected.lock() = None;
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
}
