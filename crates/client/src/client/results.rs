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
            crate::keys::Done(&f.inner.state).await;
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
}
