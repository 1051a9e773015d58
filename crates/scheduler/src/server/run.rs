//! `Client.run` and `Client.run_on_scheduler`: a registered function (as tasks are) run now on
//! every chosen worker, outside their task pools, or in the scheduler on a thread of its own
//! (never in the event loop, and never in the core: it sees a read-only snapshot,
//! [`get_scheduler`]). Answers go back on the client's stream as coordination answers do.
use std::cell::RefCell;

use dask_protocol::task::{execute, run_result};
use prost::Message;

use super::*;

/// Bytes of worker plugins the scheduler keeps, at most: a joining worker gets them all with its
/// registration, in one message.
const MAX_WORKER_PLUGINS: usize = dask_protocol::MAX_MESSAGE / 2;

/// Operations waiting for answers from several peers (workers, `W = WorkerId`; or nannies),
/// by operation number.
pub(super) struct Runs<W>(HashMap<u64, PendingRun<W>>);

impl<W> Default for Runs<W> {
    fn default() -> Self {
        Runs(HashMap::new())
    }
}

struct PendingRun<W> {
    client: ClientId,
    id: u64,
    waiting: HashSet<W>,
    results: Vec<pb::RunResult>,
}

/// An operation every peer answered: the client's request `id`, with each peer's result.
pub(super) struct Answered {
    client: ClientId,
    id: u64,
    results: Vec<pb::RunResult>,
}

impl<W: std::hash::Hash + Eq + Copy> Runs<W> {
    fn wait(&mut self, run: u64, client: ClientId, id: u64, waiting: HashSet<W>) {
        self.0.insert(run, PendingRun { client, id, waiting, results: Vec::new() });
    }

    /// `who`'s result for `run` (none awaited: `None`); the operation if it was the last.
    fn answer(&mut self, run: u64, who: W, result: pb::RunResult) -> Option<Answered> {
        let p = self.0.get_mut(&run)?;
        if !p.waiting.remove(&who) {
            return None;
        }
        p.results.push(result);
        self.finished(run)
    }

    /// `who` went: every operation awaiting it takes `result()` for it; those now complete.
    fn gone(&mut self, who: W, result: impl Fn() -> pb::RunResult) -> Vec<Answered> {
        let runs: Vec<u64> = self.0.iter().filter(|(_, p)| p.waiting.contains(&who)).map(|(r, _)| *r).collect();
        runs.into_iter().filter_map(|r| self.answer(r, who, result())).collect()
    }

    fn awaits(&self, run: u64) -> bool {
        self.0.contains_key(&run)
    }

    fn finished(&mut self, run: u64) -> Option<Answered> {
        if !self.0.get(&run)?.waiting.is_empty() {
            return None;
        }
        let p = self.0.remove(&run)?;
        let mut results = p.results;
        results.sort_by(|a, b| a.worker.cmp(&b.worker));
        Some(Answered { client: p.client, id: p.id, results })
    }
}

thread_local! {
    static SNAPSHOT: RefCell<Option<pb::SchedulerInfo>> = const { RefCell::new(None) };
}

/// In a function run by `run_on_scheduler`: the scheduler as it was when the function was
/// asked for (its workers, tasks, address). `None` elsewhere.
pub fn get_scheduler() -> Option<pb::SchedulerInfo> {
    SNAPSHOT.with(|s| s.borrow().clone())
}

fn failed(worker: &str, kind: &str, message: String) -> pb::RunResult {
    pb::RunResult {
        worker: worker.to_string(),
        ok: false,
        error: Some(pb::TaskError { message, kind: kind.into(), worker: worker.to_string(), ..Default::default() }),
        ..Default::default()
    }
}

impl EventLoop {
    fn run_reply(&self, client: ClientId, id: u64, kind: pb::coord_reply::Kind) {
        if let Some(tx) = self.clients.get(&client) {
            let reply = pb::CoordReply { id, kind: Some(kind) };
            let _ = tx.send(Ok(pb::SchedulerToClient { replies: vec![reply], ..Default::default() }));
        }
    }

    pub(super) fn on_run(&mut self, client: ClientId, id: u64, req: pb::RunRequest) {
        use pb::coord_reply::Kind;
        if req.actor.is_some() && (req.on_scheduler || req.workers.len() != 1) {
            return self.run_reply(client, id, Kind::Error("an actor lives on one worker: name it".into()));
        }
        if req.on_scheduler
            && let Some(pb::PluginOp { op: Some(op) }) = req.plugin
        {
            return self.on_scheduler_plugin(client, id, op);
        }
        if req.nanny
            && let Some(pb::PluginOp { op: Some(op) }) = req.plugin
        {
            return self.on_nanny_plugin(client, id, op);
        }
        if let Some(pb::PluginOp { op: Some(op) }) = &req.plugin {
            match op {
                pb::plugin_op::Op::Add(spec) => {
                    let at = self.worker_plugins.iter().position(|p| p.name == spec.name);
                    // Every worker that joins gets them all in one message.
                    let kept: usize = self
                        .worker_plugins
                        .iter()
                        .filter(|p| p.name != spec.name)
                        .map(|p| p.state.len() + p.name.len() + p.kind.len())
                        .sum();
                    let total = kept + spec.state.len() + spec.name.len() + spec.kind.len();
                    if total > MAX_WORKER_PLUGINS && !(at.is_some() && spec.idempotent) {
                        return self.run_reply(
                            client,
                            id,
                            Kind::Error(format!(
                                "the worker plugins would take {total} bytes, and at most {MAX_WORKER_PLUGINS} go to a \
                                 joining worker: unregister some, or upload a smaller (release-built, stripped) library"
                            )),
                        );
                    }
                    match at {
                        // dask: an idempotent registration of a known name changes nothing.
                        Some(_) if spec.idempotent => {
                            return self.run_reply(client, id, Kind::Run(pb::RunResults::default()));
                        }
                        Some(i) => self.worker_plugins[i] = spec.clone(),
                        None => self.worker_plugins.push(spec.clone()),
                    }
                    tracing::info!(plugin = %spec.name, kind = %spec.kind, "worker plugin registered");
                }
                pb::plugin_op::Op::Remove(name) => {
                    let Some(i) = self.worker_plugins.iter().position(|p| p.name == *name) else {
                        let known: Vec<&str> = self.worker_plugins.iter().map(|p| p.name.as_str()).collect();
                        return self.run_reply(
                            client,
                            id,
                            Kind::Error(format!(
                                "no worker plugin named {name:?} is registered (registered: {known:?})"
                            )),
                        );
                    };
                    self.worker_plugins.remove(i);
                    tracing::info!(plugin = %name, "worker plugin removed");
                }
            }
        }
        if req.on_scheduler {
            let spec = match pb::TaskSpec::decode(&req.spec[..]) {
                Ok(s) => s,
                Err(e) => return self.run_reply(client, id, Kind::Error(format!("a malformed function to run: {e}"))),
            };
            let info = self.info();
            let tx = self.self_tx.clone();
            tokio::task::spawn_blocking(move || {
                SNAPSHOT.with(|s| *s.borrow_mut() = Some(info));
                let r = execute(&spec, &|_| None);
                SNAPSHOT.with(|s| s.borrow_mut().take());
                let result = run_result("", &spec.function, r);
                let _ = tx.send(LoopMsg::SchedulerRunDone { client, id, result });
            });
            return;
        }
        let mut targets: Vec<WorkerId> = Vec::new();
        if req.workers.is_empty() {
            targets.extend(self.worker_meta.keys().copied());
        } else {
            for w in &req.workers {
                let w = normalize_worker(w.clone());
                match self.worker_meta.iter().find(|(_, m)| *m.address == *w || *m.name == *w) {
                    Some((id, _)) => targets.push(*id),
                    None if req.actor.is_some() => {
                        return self.run_reply(
                            client,
                            id,
                            Kind::Error(format!("the actor's worker {w} is gone, and the actor with it")),
                        );
                    }
                    None => {
                        return self.run_reply(
                            client,
                            id,
                            Kind::Error(format!("no worker named or at {w:?} is connected: see scheduler_info()")),
                        );
                    }
                }
            }
        }
        targets.sort();
        targets.dedup();
        let run = self.next_op;
        self.next_op += 1;
        for w in &targets {
            if let Some(tx) = self.workers.get(w) {
                let _ = tx.send(Ok(pb::SchedulerToWorker {
                    commands: vec![pb::SchedulerCommand {
                        kind: Some(pb::scheduler_command::Kind::Run(pb::RunFunction {
                            id: run,
                            spec: req.spec.clone(),
                            actor: req.actor.clone(),
                            plugin: req.plugin.clone(),
                        })),
                    }],
                }));
            }
        }
        if !req.wait || targets.is_empty() {
            // Not waited for: whatever the workers answer is dropped.
            return self.run_reply(client, id, Kind::Run(pb::RunResults::default()));
        }
        let waiting = targets.into_iter().collect();
        self.runs.wait(run, client, id, waiting);
    }

    /// A worker's answer to a run.
    pub(super) fn on_run_done(&mut self, worker: WorkerId, done: pb::RunDone) {
        if !self.runs.awaits(done.id) {
            return;
        }
        let address = self.worker_meta.get(&worker).map(|m| m.address.to_string()).unwrap_or_default();
        let mut result = done.result.unwrap_or_else(|| failed(&address, "error", "the worker gave no result".into()));
        result.worker = address;
        if let Some(a) = self.runs.answer(done.id, worker, result) {
            self.answered(a);
        }
    }

    /// A worker that went answers every run it was in with the reason.
    pub(super) fn runs_worker_gone(&mut self, worker: WorkerId, address: &str) {
        let why = format!("worker {address} left before the function returned");
        for a in self.runs.gone(worker, || failed(address, "worker-died", why.clone())) {
            self.answered(a);
        }
    }

    fn answered(&self, a: Answered) {
        self.run_reply(a.client, a.id, pb::coord_reply::Kind::Run(pb::RunResults { results: a.results }));
    }

    /// A client's nanny plugin registration or removal: kept for nannies that connect later,
    /// sent to every nanny now, answered when each has (a nanny that goes answers for itself).
    fn on_nanny_plugin(&mut self, client: ClientId, id: u64, op: pb::plugin_op::Op) {
        use pb::coord_reply::Kind;
        match &op {
            pb::plugin_op::Op::Add(spec) => match self.nanny_plugins.iter().position(|p| p.name == spec.name) {
                Some(_) if spec.idempotent => return self.run_reply(client, id, Kind::Run(pb::RunResults::default())),
                Some(i) => self.nanny_plugins[i] = spec.clone(),
                None => self.nanny_plugins.push(spec.clone()),
            },
            pb::plugin_op::Op::Remove(name) => match self.nanny_plugins.iter().position(|p| p.name == *name) {
                Some(i) => {
                    self.nanny_plugins.remove(i);
                }
                None => {
                    return self.run_reply(
                        client,
                        id,
                        Kind::Error(format!("no nanny plugin named {name:?} is registered")),
                    );
                }
            },
        }
        let run = self.next_op;
        self.next_op += 1;
        let cmd =
            pb::nanny_command::Kind::Plugin(pb::PluginCommand { id: run, op: Some(pb::PluginOp { op: Some(op) }) });
        let mut waiting = HashSet::new();
        for (nid, n) in &self.nannies {
            if n.tx.send(Ok(super::nanny_command(cmd.clone()))).is_ok() {
                waiting.insert(*nid);
            }
        }
        if waiting.is_empty() {
            return self.run_reply(client, id, Kind::Run(pb::RunResults::default()));
        }
        self.nanny_runs.wait(run, client, id, waiting);
    }

    /// A nanny's answer to a plugin command.
    pub(super) fn on_nanny_plugin_done(&mut self, nanny: u32, done: pb::RunDone) {
        if !self.nanny_runs.awaits(done.id) {
            return;
        }
        let address = self.nannies.get(&nanny).map(|n| n.address.clone()).unwrap_or_default();
        let mut result = done.result.unwrap_or_else(|| failed(&address, "error", "the nanny gave no result".into()));
        result.worker = address;
        if let Some(a) = self.nanny_runs.answer(done.id, nanny, result) {
            self.answered(a);
        }
    }

    /// A nanny that went answers for itself.
    pub(super) fn nanny_runs_gone(&mut self, nanny: u32, address: &str) {
        let why = format!("nanny {address} left before it answered");
        for a in self.nanny_runs.gone(nanny, || failed(address, "nanny-died", why.clone())) {
            self.answered(a);
        }
    }

    /// The answer of a function run in the scheduler.
    pub(super) fn on_scheduler_run_done(&mut self, client: ClientId, id: u64, result: pb::RunResult) {
        self.run_reply(client, id, pb::coord_reply::Kind::Run(pb::RunResults { results: vec![result] }));
    }
}
