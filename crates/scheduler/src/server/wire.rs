//! Conversions between the wire (protobuf) and the core's events, commands and reports.

use super::*;

pub(super) fn location_to_pb(d: core::DepLocation) -> pb::DependencyLocation {
    pb::DependencyLocation {
        key: d.key.to_string(),
        workers: d.workers.iter().map(|w| w.to_string()).collect(),
        nbytes: d.nbytes,
    }
}

pub(super) fn nanny_command(kind: pb::nanny_command::Kind) -> pb::SchedulerToNanny {
    pb::SchedulerToNanny { commands: vec![pb::NannyCommand { kind: Some(kind) }] }
}

pub(super) fn report_to_pb(key: Key, report: Report) -> pb::KeyReport {
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
            traceback: e.traceback.clone(),
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

/// The memory fields of `WorkerInfo`.
pub(super) fn worker_memory_info(m: core::WorkerMemory) -> pb::WorkerInfo {
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
pub(super) fn stream_error(s: &Status) -> String {
    let cause = dask_protocol::root_cause(s);
    if cause.contains("keep-alive") || cause.contains("keepalive") || s.message().contains("keep-alive") {
        format!("the connection stopped answering keep-alive pings (hung, stopped or partitioned): {cause}")
    } else if cause.contains("broken pipe") || cause.contains("reset") {
        format!("the connection broke (the process died or was killed): {cause}")
    } else {
        format!("the connection failed: {}: {cause}", s.message())
    }
}

pub(super) fn resources_to_pb(r: &[(Arc<str>, f64)]) -> Vec<pb::Resource> {
    r.iter().map(|(name, amount)| pb::Resource { name: name.to_string(), amount: *amount }).collect()
}

pub(super) fn worker_event(worker: WorkerId, e: pb::WorkerEvent) -> Option<Event> {
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
                    traceback: e.traceback,
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
        Kind::RunDone(_) => return None, // to the shell: see the worker stream
        Kind::Seceded(l) => Event::TasksSeceded { worker, keys: l.keys.into_iter().map(Arc::from).collect() },
        Kind::Released(_) | Kind::Register(_) => return None,
    })
}

/// What a client sends: work for the core, or a coordination request.
pub(super) enum ClientInput {
    Event(Event),
    /// A request, and how long it may wait if it waits for a while.
    Coord(coord::Request, Option<Duration>),
    /// `Client.run` / `run_on_scheduler`.
    Run {
        client: ClientId,
        id: u64,
        req: pb::RunRequest,
    },
    /// A request that cannot be understood: answered with why.
    BadCoord {
        client: ClientId,
        id: u64,
        why: String,
    },
}

pub(super) fn client_input(client: ClientId, op: pb::ClientOp) -> Option<ClientInput> {
    match op.kind? {
        pb::client_op::Kind::Coord(r) => Some(coord_request(client, r)),
        kind => client_event(client, kind).map(ClientInput::Event),
    }
}

fn item_from_pb(i: pb::Item) -> coord::Item {
    if i.key.is_empty() {
        coord::Item::Data { codec: i.codec, data: i.data }
    } else {
        coord::Item::Future(Arc::from(i.key))
    }
}

pub(super) fn item_to_pb(i: coord::Item) -> pb::Item {
    match i {
        coord::Item::Data { codec, data } => pb::Item { codec, data, key: String::new() },
        coord::Item::Future(k) => pb::Item { key: k.to_string(), ..Default::default() },
    }
}

fn coord_request(client: ClientId, r: pb::CoordRequest) -> ClientInput {
    use coord::Op;
    use pb::coord_request::Op as P;
    let bad = |why: String| ClientInput::BadCoord { client, id: r.id, why };
    let (wait, limit) = match r.timeout_s {
        t if t < 0.0 => (coord::Wait::Forever, None),
        0.0 => (coord::Wait::No, None),
        t => match Duration::try_from_secs_f64(t) {
            Ok(d) => (coord::Wait::Limited, Some(d)),
            Err(_) => return bad(format!("timeout {t} s is not a duration")),
        },
    };
    let Some(op) = r.op else {
        return bad("a coordination request without an operation (a client newer than this scheduler?)".into());
    };
    let item = |i: Option<pb::Item>| i.map(item_from_pb).ok_or("a put without an item");
    let op = match op {
        P::Run(req) => return ClientInput::Run { client, id: r.id, req },
        P::Acquire(a) => Op::Acquire { lease: a.lease, max_leases: a.max_leases },
        P::Release(lease) => Op::Release { lease },
        P::Leases(_) => Op::Leases,
        P::QueuePut(p) => match item(p.item) {
            Ok(item) => Op::QueuePut { item, maxsize: p.maxsize },
            Err(why) => return bad(why.into()),
        },
        P::QueueGet(g) => Op::QueueGet { count: g.count, batch: g.batch, maxsize: g.maxsize },
        P::QueueSize(_) => Op::QueueSize,
        P::VariableSet(i) => Op::VariableSet(item_from_pb(i)),
        P::VariableGet(_) => Op::VariableGet,
        P::VariableDelete(_) => Op::VariableDelete,
        P::EventSet(_) => Op::EventSet,
        P::EventClear(_) => Op::EventClear,
        P::EventWait(_) => Op::EventWait,
        P::EventIsSet(_) => Op::EventIsSet,
        P::Publish(i) => Op::Publish(item_from_pb(i)),
        P::Subscribe(_) => Op::Subscribe,
        P::Unsubscribe(_) => Op::Unsubscribe,
        P::DatasetPublish(d) => {
            Op::DatasetPublish { items: d.items.into_iter().map(item_from_pb).collect(), replace: d.replace }
        }
        P::DatasetGet(_) => Op::DatasetGet,
        P::DatasetList(_) => Op::DatasetList,
        P::DatasetUnpublish(_) => Op::DatasetUnpublish,
        P::MetaSet(m) => match serde_json::from_str(&m.json) {
            Ok(value) => Op::MetaSet { path: m.path, value },
            Err(e) => return bad(format!("metadata value is not JSON: {e}")),
        },
        P::MetaGet(m) => Op::MetaGet { path: m.path },
        P::Ack(answered) => Op::Ack(answered),
    };
    ClientInput::Coord(coord::Request { client, id: r.id, name: r.name, wait, op }, limit)
}

pub(super) fn reply_to_pb(id: u64, reply: coord::Reply) -> pb::CoordReply {
    use coord::Reply;
    use pb::coord_reply::Kind;
    let kind = match reply {
        Reply::Done => Kind::Done(pb::Empty {}),
        Reply::Flag(f) => Kind::Flag(f),
        Reply::Count(n) => Kind::Count(n),
        Reply::Items(items) => Kind::Items(pb::ItemList { items: items.into_iter().map(item_to_pb).collect() }),
        Reply::Names(names) => Kind::Names(pb::NameList { names }),
        Reply::Json(j) => Kind::Json(j),
        Reply::Error(e) => Kind::Error(e),
        Reply::TimedOut => Kind::TimedOut(pb::Empty {}),
    };
    pb::CoordReply { id, kind: Some(kind) }
}

fn client_event(client: ClientId, kind: pb::client_op::Kind) -> Option<Event> {
    use pb::client_op::Kind;
    let keys = |l: pb::KeyList| l.keys.into_iter().map(Arc::from).collect::<Vec<Key>>();
    Some(match kind {
        Kind::Hello(_) | Kind::Coord(_) => return None,
        Kind::Retry(l) => Event::Retry { client, keys: keys(l) },
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
        Kind::Cancel(c) => Event::CancelKeys {
            client,
            keys: c.keys.into_iter().map(Arc::from).collect(),
            force: c.force,
            reason: Some(c.reason).filter(|r| !r.is_empty()),
        },
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
pub(super) fn normalize_worker(w: String) -> String {
    match Address::parse(&w, None) {
        Ok(a) if w.contains(':') => a.to_string(),
        _ => w,
    }
}
