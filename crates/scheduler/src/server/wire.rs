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

pub(super) fn client_event(client: ClientId, op: pb::ClientOp) -> Option<Event> {
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
pub(super) fn normalize_worker(w: String) -> String {
    match Address::parse(&w, None) {
        Ok(a) if w.contains(':') => a.to_string(),
        _ => w,
    }
}
