//! Results and data: gather, scatter, cancel, fire-and-forget.

use super::*;

impl Client {
    /// Waits for and returns the values: of a `Vec` of futures, of one future, or of nested
    /// vectors and maps of futures. The first failed task's error is returned.
    pub fn gather<G: Gatherable + ?Sized>(&self, what: &G) -> Result<G::Output> {
        self.gather_with(what, Errors::Raise)
    }

    /// `gather` with `errors = skip`: failed, cancelled and lost futures are left out.
    pub fn gather_with<G: Gatherable + ?Sized>(&self, what: &G, errors: Errors) -> Result<G::Output> {
        self.inner.block_on(self.gather_async_with(what, errors))
    }

    /// [`gather`](Self::gather), giving up with [`Error::Timeout`] after `timeout`.
    pub fn gather_timeout<G: Gatherable + ?Sized>(&self, what: &G, timeout: Duration) -> Result<G::Output> {
        self.inner.block_on(async {
            tokio::time::timeout(timeout, self.gather_async_with(what, Errors::Raise))
                .await
                .map_err(|_| Error::Timeout { what: "the values gathered".into(), after: timeout })?
        })
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

    /// Puts each value of a map on the workers, under the map's keys as task keys (as dask
    /// does with a dict); the result maps the same keys to futures.
    pub fn scatter_map<K: Eq + Hash + Clone + std::fmt::Display, T: Serialize + 'static>(
        &self,
        values: HashMap<K, T>,
    ) -> Result<HashMap<K, Future<T>>> {
        let (ks, vs): (Vec<K>, Vec<T>) = values.into_iter().unzip();
        let keys = ks.iter().map(|k| k.to_string()).collect();
        let opts = ScatterOptions { keys: Some(keys), ..Default::default() };
        Ok(ks.into_iter().zip(self.scatter_with(vs, opts)?).collect())
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
        if let Some(keys) = &opts.keys {
            if keys.len() != values.len() {
                return Err(Error::InvalidArgument(format!(
                    "scatter of {} values was given {} keys: give one key per value",
                    values.len(),
                    keys.len()
                )));
            }
            if let Some(k) = keys.iter().find(|k| k.is_empty()) {
                return Err(Error::InvalidArgument(format!("a scatter key must not be empty ({k:?})")));
            }
            // A worker never replaces a value it holds: scattering another value under a key
            // in memory would silently keep the old one.
            let req = pb::KeysRequest { keys: keys.clone() };
            let held = self.inner.link.rpc().who_has(req).await?.into_inner();
            if let Some(e) = held.entries.iter().find(|e| !e.workers.is_empty()) {
                return Err(Error::InvalidArgument(format!(
                    "key {:?} holds a value already, and scatter does not replace values: release it first, or \
                     scatter under another key",
                    e.key
                )));
            }
        }
        let mut info = self.scheduler_info_async().await?;
        if info.workers.is_empty() && opts.workers.is_empty() {
            // As dask: wait (up to the timeout) for a worker to put the data on.
            match self.wait_for_workers_async(1, Some(opts.timeout)).await {
                Ok(()) => info = self.scheduler_info_async().await?,
                Err(Error::Timeout { .. }) => {
                    return Err(Error::Timeout {
                        what: "a worker to scatter to (none is connected: start some)".into(),
                        after: opts.timeout,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let mut targets: Vec<String> = info
            .workers
            .iter()
            .filter(|w| opts.workers.is_empty() || opts.workers.iter().any(|x| *x == w.address || *x == w.name))
            .map(|w| w.address.clone())
            .collect();
        if targets.is_empty() {
            return Err(Error::InvalidArgument(format!("none of the workers {:?} is connected", opts.workers)));
        }
        targets.sort();
        // Round-robin across calls: ten one-value scatters spread over the workers.
        let first = self.inner.scatter_next.fetch_add(values.len(), std::sync::atomic::Ordering::Relaxed);
        let copies = match (opts.broadcast, opts.broadcast_n) {
            (true, Some(n)) => n.clamp(1, targets.len()),
            (true, None) => targets.len(),
            (false, _) => 1,
        };
        let mut given_keys = opts.keys.clone().map(Vec::into_iter);
        let type_name = short_type_name::<T>();
        let mut encoded: Vec<Value> = Vec::with_capacity(values.len());
        let mut placed: Vec<pb::ScatteredKey> = Vec::with_capacity(values.len());
        for (i, v) in values.into_iter().enumerate() {
            let value = Value::from_owned(v)?;
            let key = match given_keys.as_mut().and_then(Iterator::next) {
                Some(k) => k,
                None if opts.hash => dask_protocol::tokenize::key(&type_name, &value.data),
                None => self.inner.unique_key(&type_name),
            };
            let holders: Vec<String> = (0..copies).map(|c| targets[(first + i + c) % targets.len()].clone()).collect();
            placed.push(pb::ScatteredKey { key, workers: holders, nbytes: value.data.len() as u64 });
            encoded.push(value);
        }
        // The scheduler announces each key to its workers first: they take puts only with its
        // ticket (one per key and worker, in the plan's order).
        let plan = pb::ScatterPlan { keys: placed.clone() };
        let granted = self.inner.link.rpc().scatter_tickets(plan).await?.into_inner();
        let expires_s = granted.expires_s;
        let mut tickets = granted.tickets.into_iter();
        // By worker: the values to put there, and their tickets.
        type Puts = (Vec<(String, Value)>, Vec<Vec<u8>>);
        let mut per_worker: HashMap<String, Puts> = HashMap::new();
        for (p, value) in placed.iter().zip(encoded) {
            for w in &p.workers {
                let ticket = tickets.next().map(|t| t.to_vec()).unwrap_or_default();
                let entry = per_worker.entry(w.clone()).or_default();
                entry.0.push((p.key.clone(), value.clone()));
                entry.1.push(ticket);
            }
        }
        let puts = per_worker.into_iter().map(|(worker, (vals, tickets))| async move {
            self.inner.peers.put_data(&worker, vals, tickets, expires_s).await.map_err(|e| Error::Fetch {
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
            crate::keys::Done(&f.inner.state).await;
        }
        Ok(futures)
    }

    /// Cancels these futures, and the tasks downstream of them that no other client wants
    /// (their futures turn `cancelled` too). Another client's future of the same key runs on.
    pub fn cancel<T>(&self, futures: &[Future<T>]) {
        self.cancel_with(futures, false, None);
    }

    /// [`cancel`](Self::cancel) with dask's `force` (cancel them for every client that holds
    /// them) and a `reason` the other cancelled futures give.
    pub fn cancel_with<T>(&self, futures: &[Future<T>], force: bool, reason: Option<&str>) {
        let keys: Vec<Arc<str>> = futures.iter().map(|f| f.inner.key.clone()).collect();
        self.inner.cancel(&keys, force, reason);
    }

    /// Lets the task run to completion even though nobody holds its future, even after this
    /// client disconnects (dask's `fire_and_forget`). Its result is dropped when done.
    pub fn fire_and_forget<T>(&self, future: Future<T>) {
        self.inner.send(pb::client_op::Kind::FireAndForget(pb::KeyList { keys: vec![future.key().to_string()] }));
        drop(future);
    }
}
