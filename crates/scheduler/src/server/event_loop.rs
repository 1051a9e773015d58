//! The event loop: the one task that owns the core, turns messages into events and flushes the
//! commands the core produced, one batch per worker and per client.

use super::*;

impl EventLoop {
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<LoopMsg>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut woke;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    woke = Instant::now();
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
                    woke = Instant::now();
                    // A late tick shows how long the loop was held up.
                    if let Some(prev) = self.last_tick_at.replace(woke) {
                        self.loop_stats.note_tick_gap(woke - prev);
                    }
                    self.last_tick.store(dask_protocol::sys::epoch_secs().to_bits(), std::sync::atomic::Ordering::Relaxed);
                    self.handle(Event::Tick);
                    self.check_restarts();
                    self.release.if_due();
                    self.note_idle();
                    if let (Some(limit), Some(since)) = (self.idle_timeout, self.idle_since)
                        && since.elapsed().unwrap_or_default() >= limit
                    {
                        tracing::info!("scheduler closing after being idle for {limit:?} (--idle-timeout)");
                        shutdown.cancel();
                        break;
                    }
                    self.loop_stats.ticks += 1;
                }
            }
            // Once per batch: retirement walks the retiring workers' values.
            if self.core.is_retiring() {
                self.handle(Event::RetireProgress);
            }
            self.flush();
            self.loop_stats.wakeups += 1;
            self.loop_stats.busy += woke.elapsed();
        }
        for n in self.nannies.values() {
            let _ = n.tx.send(Ok(nanny_command(pb::nanny_command::Kind::Close(pb::CloseNanny {
                reason: "scheduler closing".into(),
            }))));
        }
        self.scheduler_plugins.close();
        // Clients need not try to reconnect.
        for tx in self.clients.values() {
            let _ = tx.send(Ok(pb::SchedulerToClient { closing: "scheduler closing".into(), ..Default::default() }));
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

    /// One event for the core, with what the shell does around it.
    fn on_event(&mut self, e: Event) {
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
        if let Some((_, Some(c))) = gone {
            // Its leases are released and its waits end; what it put in queues stays.
            let mut out = std::mem::take(&mut self.coord_out);
            self.coord.client_gone(c, &mut out);
            self.coord_out = out;
            self.apply_coord();
        }
    }

    /// A coordination request; a wait with a time limit gets a timer.
    fn on_coord(&mut self, req: coord::Request, limit: Option<Duration>) {
        let (client, id) = (req.client, req.id);
        // A request that reuses the id of one still waiting is refused, and must not time it out.
        let was_waiting = self.coord.is_waiting(client, id);
        let mut out = std::mem::take(&mut self.coord_out);
        self.coord.handle(req, &mut out);
        if let Some(limit) = limit
            && !was_waiting
            && self.coord.is_waiting(client, id)
        {
            let tx = self.self_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                let _ = tx.send(LoopMsg::CoordTimeout { client, id });
            });
        }
        self.coord_out = out;
        self.apply_coord();
    }

    /// Turns what coordination said about keys into core events: the holder keeps keys alive,
    /// and a client given a key wants it (before the holder lets go: the order is kept). Replies
    /// and messages wait for the flush.
    fn apply_coord(&mut self) {
        let mut keep = Vec::new();
        for out in std::mem::take(&mut self.coord_out) {
            let event = match out {
                coord::Out::Hold(k) => Event::Want { client: core::HOLDER, keys: vec![k] },
                coord::Out::Unhold(k) => Event::ReleaseKeys { client: core::HOLDER, keys: vec![k] },
                coord::Out::Give { client, key } => {
                    if !self.clients.contains_key(&client) {
                        continue; // gone: nothing to keep for it
                    }
                    Event::Want { client, keys: vec![key] }
                }
                other => {
                    keep.push(other);
                    continue;
                }
            };
            self.handle(event);
        }
        self.coord_out = keep;
        #[cfg(debug_assertions)]
        if std::env::var_os("DASK_VALIDATE").is_some() {
            self.coord.validate();
        }
    }

    fn on_msg(&mut self, msg: LoopMsg) {
        if matches!(msg, LoopMsg::Client(_)) {
            // Clients asking for work: the scheduler is not idle (dask's check_idle).
            self.activity += 1;
        }
        match msg {
            LoopMsg::Events(events) => {
                self.release.count(events.len());
                for e in events {
                    self.on_event(e);
                }
            }
            LoopMsg::Client(inputs) => {
                self.release.count(inputs.len());
                for input in inputs {
                    match input {
                        ClientInput::Event(e) => self.on_event(e),
                        ClientInput::Coord(req, limit) => self.on_coord(req, limit),
                        ClientInput::Run { client, id, req } => self.on_run(client, id, req),
                        ClientInput::BadCoord { client, id, why } => {
                            self.coord_out.push(coord::Out::Reply { client, id, reply: coord::Reply::Error(why) })
                        }
                    }
                }
            }
            LoopMsg::SchedulerRunDone { client, id, result } => self.on_scheduler_run_done(client, id, result),
            LoopMsg::RunDone { worker, done } => self.on_run_done(worker, done),
            LoopMsg::CoordTimeout { client, id } => {
                let mut out = std::mem::take(&mut self.coord_out);
                self.coord.timeout(client, id, &mut out);
                self.coord_out = out;
                self.apply_coord();
            }
            LoopMsg::WorkerConnected { spec, nanny, version, dashboard, tx, reply } => {
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
                            plugins: self.worker_plugins.clone(),
                            put_secret: self.put_secret.to_vec().into(),
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
                self.worker_meta.insert(id, WorkerMeta { address, name, nanny, version, dashboard });
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
                // A nanny that reconnects replaces its old entry (which answers what it was asked).
                let old: Vec<u32> =
                    self.nannies.iter().filter(|(_, n)| n.address == register.address).map(|(i, _)| *i).collect();
                for o in old {
                    if let Some(n) = self.nannies.remove(&o) {
                        self.nanny_runs_gone(o, &n.address);
                    }
                }
                let _ = tx.send(Ok(nanny_command(pb::nanny_command::Kind::Registered(pb::Empty {}))));
                // Its worker may have registered before it did (it reconnected after we restarted).
                for m in self.worker_meta.values() {
                    if m.nanny.as_deref() == Some(register.address.as_str()) {
                        let _ = tx.send(Ok(nanny_command(pb::nanny_command::Kind::WorkerRegistered(
                            pb::WorkerRegistered { address: m.address.to_string(), pid: 0 },
                        ))));
                    }
                }
                for spec in &self.nanny_plugins {
                    let cmd = pb::nanny_command::Kind::Plugin(pb::PluginCommand {
                        id: 0,
                        op: Some(pb::PluginOp { op: Some(pb::plugin_op::Op::Add(spec.clone())) }),
                    });
                    let _ = tx.send(Ok(nanny_command(cmd)));
                }
                tracing::info!(nanny = %register.address, name = %register.name, "nanny connected");
                self.nannies
                    .insert(id, NannyEntry { address: register.address, name: register.name, tx, last_exit: None });
                let _ = reply.send(id);
            }
            LoopMsg::NannyEvents { nanny, events } => {
                for e in events {
                    match e.kind {
                        Some(pb::nanny_event::Kind::Exited(x)) => self.nanny_says_worker_exited(nanny, x),
                        Some(pb::nanny_event::Kind::PluginDone(d)) => self.on_nanny_plugin_done(nanny, d),
                        _ => {}
                    }
                }
            }
            LoopMsg::NannyGone(nanny) => {
                if let Some(n) = self.nannies.remove(&nanny) {
                    tracing::info!(nanny = %n.address, name = %n.name, "nanny disconnected");
                    self.nanny_runs_gone(nanny, &n.address);
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
            LoopMsg::SchedulerPluginFailed(name, add, replacing) => self.scheduler_plugin_failed(name, add, replacing),
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
            self.runs_worker_gone(worker, &m.address);
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
        let mut out = std::mem::take(&mut self.coord_out);
        self.coord.restarted(&mut out);
        self.coord_out = out;
        self.apply_coord();
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

    /// The connected workers with these addresses or names, or which one is not connected.
    fn workers_named(&self, names: &[String]) -> Result<Vec<WorkerId>, Status> {
        names
            .iter()
            .map(|name| {
                self.worker_meta
                    .iter()
                    .find(|(_, m)| *m.address == **name || *m.name == **name)
                    .map(|(id, _)| *id)
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "no worker {name:?} is connected (give addresses or names from scheduler_info)"
                        ))
                    })
            })
            .collect()
    }

    /// `Client::replicate` / `Client::rebalance`.
    fn copies(
        &mut self,
        keys: Vec<String>,
        n: Option<Option<usize>>,
        names: Vec<String>,
        reply: oneshot::Sender<Result<u32, Status>>,
    ) {
        let workers = match self.workers_named(&names) {
            Ok(ids) => ids,
            Err(status) => {
                let _ = reply.send(Err(status));
                return;
            }
        };
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
            match self.workers_named(&names) {
                Ok(ids) => chosen = ids,
                Err(status) => {
                    let _ = reply.send(Err(status));
                    return;
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
            Query::TaskSpecs(keys, reply) => {
                let tasks = keys
                    .iter()
                    .filter_map(|k| {
                        let (spec, deps, state) = self.core.task_spec(k)?;
                        Some(pb::TaskSpecEntry {
                            key: k.clone(),
                            spec: bytes::Bytes::copy_from_slice(spec),
                            dependencies: deps.iter().map(|d| d.to_string()).collect(),
                            state: state.to_string(),
                        })
                    })
                    .collect();
                let _ = reply.send(pb::TaskSpecsReply { tasks });
            }
            Query::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Query::Story(keys, reply) => {
                let now = Instant::now();
                let lines = keys
                    .iter()
                    .flat_map(|k| self.core.story(k))
                    .map(|t| pb::StoryLine {
                        key: t.key.to_string(),
                        from: t.from.to_string(),
                        to: t.to.to_string(),
                        cause: t.cause.to_string(),
                        ago_s: now.saturating_duration_since(t.at).as_secs_f64(),
                    })
                    .collect();
                let _ = reply.send(pb::StoryReply { lines });
            }
            Query::Processing(reply) => {
                let entries = self
                    .core
                    .processing()
                    .into_iter()
                    .map(|(w, keys)| pb::WorkerKeys {
                        worker: w.to_string(),
                        keys: keys.iter().map(|k| k.to_string()).collect(),
                    })
                    .collect();
                let _ = reply.send(pb::HasWhatReply { entries });
            }
            Query::Nbytes(reply) => {
                let keys = self
                    .core
                    .nbytes()
                    .into_iter()
                    .map(|(k, nbytes)| pb::KeyBytes { key: k.to_string(), nbytes })
                    .collect();
                let _ = reply.send(pb::NbytesReply { keys });
            }
            Query::AdaptiveTarget(d, lo, hi, reply) => {
                let t = self.core.adaptive_target_within(d, lo, hi);
                let _ = reply.send(pb::AdaptiveReply {
                    target: t.target as u32,
                    to_close: t.to_close.iter().map(|n| n.to_string()).collect(),
                });
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

    pub(super) fn info(&self) -> pb::SchedulerInfo {
        let now = Instant::now();
        let workers = self
            .core
            .worker_counts()
            .map(|(id, spec, n_keys, processing, nbytes)| pb::WorkerInfo {
                address: spec.address.to_string(),
                name: spec.name.to_string(),
                nthreads: spec.nthreads,
                memory_limit: spec.memory_limit,
                id: id.0,
                processing: processing as u32,
                in_memory: n_keys as u32,
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
                version: self.worker_meta.get(&id).map(|m| m.version.clone()).unwrap_or_default(),
                dashboard: self.worker_meta.get(&id).and_then(|m| m.dashboard.clone()).unwrap_or_default(),
                ..worker_memory_info(self.core.worker_memory(id).unwrap_or_default())
            })
            .collect();
        let (unrunnable, unrunnable_count) = self.core.unrunnable(100);
        pb::SchedulerInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            id: self.id.clone(),
            address: self.address.to_string(),
            workers,
            tasks: self.core.n_tasks() as u64,
            started_s: self.started.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
            steals_asked: self.core.steal_stats().asked,
            steals_done: self.core.steal_stats().stolen,
            steals_refused: self.core.steal_stats().refused,
            unrunnable,
            unrunnable_count: unrunnable_count as u64,
        }
    }

    /// Sends the commands of this iteration: one message per worker and per client.
    fn flush(&mut self) {
        if self.commands.is_empty() && self.coord_out.is_empty() {
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
                Command::Feed(f) => self.scheduler_plugins.push_feed(f),
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
        self.scheduler_plugins.flush_feed();
        let mut to_clients: HashMap<ClientId, pb::SchedulerToClient> = to_clients
            .into_iter()
            .map(|(c, reports)| (c, pb::SchedulerToClient { reports, ..Default::default() }))
            .collect();
        for out in self.coord_out.drain(..) {
            match out {
                coord::Out::Reply { client, id, reply } => {
                    to_clients.entry(client).or_default().replies.push(reply_to_pb(id, reply))
                }
                coord::Out::Deliver { client, topic, item } => to_clients
                    .entry(client)
                    .or_default()
                    .messages
                    .push(pb::TopicMessage { topic, item: Some(item_to_pb(item)) }),
                // Turned into core events as they came (`apply_coord`).
                coord::Out::Hold(_) | coord::Out::Unhold(_) | coord::Out::Give { .. } => {}
            }
        }
        for (c, batch) in to_clients {
            if let Some(tx) = self.clients.get(&c) {
                let _ = tx.send(Ok(batch));
            }
        }
    }
}
