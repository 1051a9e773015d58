//! Submitting work: tasks, maps and graphs.

use super::*;

impl Client {
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
        let mut def = self.task_def::<T>(arg, deps, opts.key.clone(), opts.pure, &opts)?;
        if let (None, Some(prefix)) = (&opts.key, &opts.key_prefix) {
            with_prefix(&mut def.key, prefix);
        }
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
        let mut def = pb::TaskDef { key, spec: Bytes::from(spec), dependencies: deps, ..Default::default() };
        opts.apply_to(&mut def)?;
        Ok(def)
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

    /// `map_args` with options; `keys` (when given) names each task; otherwise
    /// `opts.key_prefix`, if set, is a prefix (`prefix-<token>`). `opts.key` names one task, so
    /// it is refused here.
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
        if let Some(k) = &opts.key {
            return Err(Error::InvalidArgument(format!(
                "SubmitOptions.key ({k:?}) names one task: give map_with a key_prefix, or a key per item"
            )));
        }
        let batch = opts.batch_size.unwrap_or(10_000).max(1);
        let items = items.into_iter();
        // Sized once for the whole map rather than grown (and rehashed) on the way.
        let expected = items.size_hint().0;
        self.inner.table.reserve(expected);
        let mut futures = Vec::with_capacity(expected);
        let mut tasks = Vec::with_capacity(expected.min(batch));
        let mut wants = Vec::with_capacity(expected.min(batch));
        let mut keys = keys.map(|k| k.into_iter());
        for args in items {
            let mut deps = Vec::new();
            let arg = args.into_args(&mut deps)?;
            let key = match &mut keys {
                Some(k) => Some(k.next().ok_or_else(|| Error::InvalidArgument("fewer keys than items".into()))?),
                None => None,
            };
            let mut def = self.task_def::<T>(arg, deps, key.clone(), opts.pure, &opts)?;
            if let (None, Some(prefix)) = (&key, &opts.key_prefix) {
                with_prefix(&mut def.key, prefix);
            }
            let (r, fresh) = self.inner.new_ref(&def.key);
            futures.push(Future::from_ref(r));
            if fresh {
                wants.push(def.key.clone());
                tasks.push(def);
            }
            if tasks.len() >= batch {
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

    /// [`get`](Self::get), giving up with [`Error::Timeout`] after `timeout` (the tasks go on).
    pub fn get_timeout<T: DeserializeOwned + 'static>(&self, graph: &Graph, key: &str, timeout: Duration) -> Result<T> {
        let futures = self.compute_graph::<T>(graph, &[key])?;
        Ok(self.gather_timeout(&futures, timeout)?.pop().expect("one key"))
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
}

/// `inc-<token>` becomes `<prefix>-<token>`.
fn with_prefix(key: &mut String, prefix: &str) {
    let token = key.rsplit('-').next().unwrap_or_default().to_string();
    *key = format!("{prefix}-{token}");
}
