//! Queries and cluster operations: scheduler info, who has what, waiting for workers, restart,
//! retirement, replicate and rebalance.

use super::*;

/// The task stream from the moment [`Client::task_stream`] was called.
#[derive(Debug)]
pub struct TaskStreamRecorder {
    client: Client,
    began: std::time::SystemTime,
}

impl TaskStreamRecorder {
    /// The tasks that ended since it began.
    pub fn records(&self) -> Result<Vec<pb::TaskRecord>> {
        self.client.get_task_stream(Some(self.began), None, None)
    }
}

impl Versions {
    /// `Err` naming every part whose version is not the client's (`get_versions(check=True)`).
    pub fn check(&self) -> Result<()> {
        let mut odd: Vec<String> =
            self.workers.iter().filter(|(_, x)| **x != self.client).map(|(w, x)| format!("{w}: {x}")).collect();
        odd.sort();
        if self.scheduler != self.client {
            odd.insert(0, format!("scheduler: {}", self.scheduler));
        }
        if odd.is_empty() {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "mismatched versions: the client is dask-rs {} but {}; run one version across the cluster",
            self.client,
            odd.join(", ")
        )))
    }
}

/// The time of one task prefix ([`Client::profile`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefixProfile {
    pub prefix: String,
    pub count: usize,
    pub errors: usize,
    /// Time its tasks ran, in all, and the longest one.
    pub compute: Duration,
    pub longest: Duration,
    /// Time fetching inputs from other workers before they ran, in all.
    pub transfer: Duration,
    pub transfer_bytes: u64,
}

/// Task stream records summed by task prefix, the costliest (compute + transfer) first.
pub fn profile_of(records: &[pb::TaskRecord]) -> Vec<PrefixProfile> {
    let mut by: HashMap<&str, PrefixProfile> = HashMap::new();
    let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
    for r in records {
        let prefix = dask_protocol::tokenize::key_prefix(&r.key);
        let p = by.entry(prefix).or_insert_with(|| PrefixProfile { prefix: prefix.to_string(), ..Default::default() });
        p.count += 1;
        p.errors += usize::from(r.status != "OK");
        let ran = secs(r.stop_s - r.start_s);
        p.compute += ran;
        p.longest = p.longest.max(ran);
        for t in &r.transfers {
            p.transfer += secs(t.stop_s - t.start_s);
            p.transfer_bytes += t.nbytes;
        }
    }
    let mut out: Vec<PrefixProfile> = by.into_values().collect();
    out.sort_by(|a, b| (b.compute + b.transfer).cmp(&(a.compute + a.transfer)).then_with(|| a.prefix.cmp(&b.prefix)));
    out
}

/// What [`Client::get_versions`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    pub client: String,
    pub scheduler: String,
    /// By worker address.
    pub workers: HashMap<String, String>,
}

impl Client {
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

    /// The dask-rs versions of this client, the scheduler and each worker (dask's
    /// `get_versions`); with `check`, an error if any differs from the client's.
    pub fn get_versions(&self, check: bool) -> Result<Versions> {
        let info = self.scheduler_info()?;
        let v = Versions {
            client: env!("CARGO_PKG_VERSION").to_string(),
            scheduler: info.version,
            workers: info.workers.into_iter().map(|w| (w.address, w.version)).collect(),
        };
        if check {
            v.check()?;
        }
        Ok(v)
    }

    /// Tasks run lately: key, worker, thread, start and stop, status (dask's
    /// `get_task_stream`), those that ended within `start..stop`, the last `count` of them.
    /// The scheduler keeps the last 100,000.
    pub fn get_task_stream(
        &self,
        start: Option<std::time::SystemTime>,
        stop: Option<std::time::SystemTime>,
        count: Option<usize>,
    ) -> Result<Vec<pb::TaskRecord>> {
        let secs = |t: Option<std::time::SystemTime>| {
            t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0.0, |d| d.as_secs_f64())
        };
        let req = pb::TaskStreamRequest { start_s: secs(start), stop_s: secs(stop), count: count.unwrap_or(0) as u32 };
        self.inner.block_on(async { Ok(self.inner.link.rpc().task_stream(req).await?.into_inner().records) })
    }

    /// dask's `Scheduler.adaptive_target` and `workers_to_close`: how many workers the work in
    /// hand needs to finish in about `target_duration` (kept within `minimum..=maximum`; 0:
    /// no bound), and, when fewer are wanted, the names of the idle workers that could go
    /// (their values fit on the others). What `Adaptive` acts on.
    pub fn adaptive_target(
        &self,
        target_duration: Duration,
        minimum: usize,
        maximum: usize,
    ) -> Result<(usize, Vec<String>)> {
        let req = pb::AdaptiveRequest {
            target_duration_s: target_duration.as_secs_f64(),
            minimum: minimum as u32,
            maximum: maximum.min(u32::MAX as usize) as u32,
        };
        self.inner.block_on(async {
            let r = self.inner.link.rpc().adaptive_target(req).await?.into_inner();
            Ok((r.target as usize, r.to_close))
        })
    }

    /// Where the cluster's time went, by task prefix (dask's `profile`), over the tasks that
    /// ended within `start..stop`: how many ran and failed, compute time (total and longest),
    /// time fetching their inputs, and bytes fetched; the costliest first. (dask samples the
    /// Python stacks of worker threads; here the unit is the task: Rust threads' stacks cannot
    /// be sampled from outside them.)
    pub fn profile(
        &self,
        start: Option<std::time::SystemTime>,
        stop: Option<std::time::SystemTime>,
    ) -> Result<Vec<PrefixProfile>> {
        Ok(profile_of(&self.get_task_stream(start, stop, None)?))
    }

    /// Records the task stream of a block of code (dask's `with get_task_stream() as ts`):
    /// `let ts = client.task_stream(); ...; let records = ts.records()?;`.
    pub fn task_stream(&self) -> TaskStreamRecorder {
        TaskStreamRecorder { client: self.clone(), began: std::time::SystemTime::now() }
    }

    /// Closes the cluster (dask's `Client.shutdown`): the scheduler, and with it every worker
    /// and nanny; a local cluster this client started closes too. Then this client closes.
    pub fn shutdown(&self) -> Result<()> {
        self.check_open()?;
        let asked = self.inner.block_on(async { Ok(self.inner.link.rpc().shutdown(pb::Empty {}).await?) });
        self.close();
        asked.map(drop)
    }

    /// dask's `ncores`: [`nthreads`](Self::nthreads).
    pub fn ncores(&self) -> Result<HashMap<String, u32>> {
        self.nthreads()
    }

    /// The keys each worker is running or about to run (dask's `processing`).
    pub fn processing(&self) -> Result<HashMap<String, Vec<String>>> {
        self.inner.block_on(async {
            let reply = self.inner.link.rpc().processing(pb::Empty {}).await?.into_inner();
            Ok(reply.entries.into_iter().map(|e| (e.worker, e.keys)).collect())
        })
    }

    /// Bytes of each value in memory, by key; with `summary`, summed by task prefix (`inc`,
    /// `add`: dask's `nbytes(summary=True)`).
    pub fn nbytes(&self, summary: bool) -> Result<HashMap<String, u64>> {
        let keys =
            self.inner.block_on(async { Ok(self.inner.link.rpc().nbytes(pb::Empty {}).await?.into_inner().keys) })?;
        let mut out: HashMap<String, u64> = HashMap::new();
        for k in keys {
            let name = if summary { dask_protocol::tokenize::key_prefix(&k.key).to_string() } else { k.key };
            *out.entry(name).or_default() += k.nbytes;
        }
        Ok(out)
    }

    /// The scheduler's transitions of `key` still in its log, oldest first (dask's `story`):
    /// where it went and why.
    pub fn story(&self, key: &str) -> Result<Vec<pb::StoryLine>> {
        self.inner.block_on(async {
            let req = pb::KeysRequest { keys: vec![key.to_string()] };
            Ok(self.inner.link.rpc().story(req).await?.into_inner().lines)
        })
    }

    /// Runs these failed futures again, with the failed tasks they depend on (dask's `retry`).
    pub fn retry<T>(&self, futures: &[Future<T>]) -> Result<()> {
        self.check_open()?;
        for f in futures {
            f.reset_if_failed();
        }
        let keys: Vec<Arc<str>> = futures.iter().map(|f| f.inner.key.clone()).collect();
        self.inner.retry(&keys);
        Ok(())
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
        join_all(refs.iter().map(|r| crate::keys::Done(&r.state))).await;
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
}
