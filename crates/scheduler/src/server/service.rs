//! The gRPC service: stream handlers decode batches into events for the loop; queries and
//! operations (restart, retire, replicate, rebalance) are answered through it.

use super::*;

#[derive(Clone)]
pub(super) struct Service {
    pub(super) tx: mpsc::UnboundedSender<LoopMsg>,
    pub(super) stream: Arc<super::task_stream::TaskStream>,
    /// Cancelled by `Shutdown`: the scheduler closes, telling its workers and nannies to.
    pub(super) shutdown: CancellationToken,
    /// What put tickets are made with (`dask_protocol::ticket`).
    pub(super) put_secret: dask_protocol::ticket::Secret,
}

pub(super) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

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

pub(super) fn closed() -> Status {
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
        let version = reg.version;
        // Its HTTP side, on the host it advertises.
        let dashboard = u16::try_from(reg.dashboard_port).ok().filter(|&p| p != 0).map(|port| {
            let at = Address { host: address.host.clone(), port, tls: reg.dashboard_https };
            format!("{}/", at.web_url())
        });
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        let (address, name) = (spec.address.clone(), spec.name.clone());
        self.tx
            .send(LoopMsg::WorkerConnected { spec, nanny, version, dashboard, tx: out_tx, reply: reply_tx })
            .map_err(|_| closed())?;
        let id = reply_rx.await.map_err(|_| closed())?;
        let (tx, stream) = (self.tx.clone(), self.stream.clone());
        tokio::spawn(async move {
            let mut release = Release::default();
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(batch)) => {
                        release.count(batch.events.len());
                        release.if_due();
                        stream.record(&address, &batch.events);
                        let mut events: Vec<Event> = Vec::new();
                        for e in batch.events {
                            match e.kind {
                                Some(pb::worker_event::Kind::RunDone(done)) => {
                                    let _ = tx.send(LoopMsg::RunDone { worker: id, done });
                                }
                                _ => events.extend(worker_event(id, e)),
                            }
                        }
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
                        let inputs: Vec<ClientInput> =
                            batch.ops.into_iter().filter_map(|op| client_input(id, op)).collect();
                        if !inputs.is_empty() && tx.send(LoopMsg::Client(inputs)).is_err() {
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

    async fn adaptive_target(
        &self,
        request: Request<pb::AdaptiveRequest>,
    ) -> Result<Response<pb::AdaptiveReply>, Status> {
        let r = request.into_inner();
        let s = r.target_duration_s;
        let hi = if r.maximum == 0 { usize::MAX } else { r.maximum as usize };
        let d = match s {
            0.0 => Duration::from_secs(5),
            s => Duration::try_from_secs_f64(s)
                .map_err(|_| Status::invalid_argument(format!("target_duration {s} s is not a duration")))?,
        };
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::AdaptiveTarget(d, r.minimum as usize, hi, tx))).map_err(|_| closed())?;
        Ok(Response::new(rx.await.map_err(|_| closed())?))
    }

    async fn story(&self, request: Request<pb::KeysRequest>) -> Result<Response<pb::StoryReply>, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::Story(request.into_inner().keys, tx))).map_err(|_| closed())?;
        Ok(Response::new(rx.await.map_err(|_| closed())?))
    }

    async fn scatter_tickets(
        &self,
        request: Request<pb::ScatterPlan>,
    ) -> Result<Response<pb::ScatterTicketsReply>, Status> {
        use dask_protocol::ticket;
        let plan = request.into_inner();
        let expires_s = ticket::now_s() + ticket::TICKET_TTL.as_secs();
        let tickets = plan
            .keys
            .iter()
            .flat_map(|k| k.workers.iter().map(move |w| (k, w)))
            .map(|(k, w)| ticket::ticket(&self.put_secret, &k.key, &normalize_worker(w.clone()), expires_s).into())
            .collect();
        Ok(Response::new(pb::ScatterTicketsReply { tickets, expires_s }))
    }

    async fn task_specs(&self, request: Request<pb::KeysRequest>) -> Result<Response<pb::TaskSpecsReply>, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::TaskSpecs(request.into_inner().keys, tx))).map_err(|_| closed())?;
        Ok(Response::new(rx.await.map_err(|_| closed())?))
    }

    async fn processing(&self, _: Request<pb::Empty>) -> Result<Response<pb::HasWhatReply>, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::Processing(tx))).map_err(|_| closed())?;
        Ok(Response::new(rx.await.map_err(|_| closed())?))
    }

    async fn task_stream(
        &self,
        request: Request<pb::TaskStreamRequest>,
    ) -> Result<Response<pb::TaskStreamReply>, Status> {
        Ok(Response::new(pb::TaskStreamReply { records: self.stream.query(&request.into_inner()) }))
    }

    async fn shutdown(&self, request: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        let peer = request.remote_addr().map_or_else(|| "unknown".to_string(), |a| a.to_string());
        tracing::warn!(%peer, "a client asked the scheduler to shut down (Client.shutdown)");
        // Answered first; the loop then tells every worker and nanny to close.
        let token = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            token.cancel();
        });
        Ok(Response::new(pb::Empty {}))
    }

    async fn nbytes(&self, _: Request<pb::Empty>) -> Result<Response<pb::NbytesReply>, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LoopMsg::Query(Query::Nbytes(tx))).map_err(|_| closed())?;
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
