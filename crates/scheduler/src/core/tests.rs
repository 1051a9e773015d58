//! Tests of the core: events in, commands out, `validate()` after every event.
//!
//! Unit tests first (one behaviour each), then a property test that runs random graphs on a
//! simulated cluster whose workers follow the commands faithfully.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

mod copies;
mod resources;
mod steal;

// ---------------------------------------------------------------------------- harness

const C1: ClientId = ClientId(1);
const C2: ClientId = ClientId(2);

fn k(s: &str) -> Key {
    Arc::from(s)
}

fn addr(i: u32) -> Arc<str> {
    Arc::from(format!("tcp://10.0.0.{i}:8786"))
}

fn spec(i: u32, nthreads: u32) -> WorkerSpec {
    WorkerSpec {
        address: addr(i),
        name: Arc::from(format!("w{i}")),
        nthreads,
        memory_limit: 1 << 30,
        pid: 0,
        resources: Vec::new(),
    }
}

fn task(key: &str, deps: &[&str]) -> NewTask {
    NewTask {
        key: k(key),
        spec: Box::from(&b"spec"[..]),
        dependencies: deps.iter().map(|d| k(d)).collect(),
        ..NewTask::default()
    }
}

fn error(msg: &str) -> TaskError {
    TaskError {
        message: msg.into(),
        kind: "ZeroDivisionError".into(),
        function: "f".into(),
        key: String::new(),
        worker: String::new(),
        traceback: String::new(),
    }
}

/// The core plus a clock; every event goes through [`Harness::handle`], which validates.
struct Harness {
    core: SchedulerCore,
    now: Instant,
}

impl Harness {
    fn new() -> Self {
        Self::with_config(Config::default())
    }

    fn with_config(config: Config) -> Self {
        let now = Instant::now();
        Harness { core: SchedulerCore::new(config, now), now }
    }

    fn handle(&mut self, event: Event) -> Vec<Command> {
        let mut out = self.handle_one(event);
        // As the shell does after each batch while workers retire.
        if self.core.is_retiring() {
            out.extend(self.handle_one(Event::RetireProgress));
        }
        out
    }

    fn handle_one(&mut self, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        self.core.handle(event, self.now, &mut out);
        self.core.validate();
        out
    }

    fn join(&mut self, i: u32, nthreads: u32) -> Vec<Command> {
        self.handle(Event::WorkerJoined { worker: WorkerId(i), spec: spec(i, nthreads) })
    }

    fn submit(&mut self, client: ClientId, tasks: Vec<NewTask>, wants: &[&str]) -> Vec<Command> {
        self.handle(Event::UpdateGraph {
            client,
            tasks,
            wants: wants.iter().map(|w| k(w)).collect(),
            fifo_timeout: Duration::ZERO,
        })
    }

    fn finish(&mut self, worker: u32, key: &str, nbytes: u64) -> Vec<Command> {
        self.finish_in(worker, key, nbytes, Duration::from_millis(1))
    }

    fn finish_in(&mut self, worker: u32, key: &str, nbytes: u64, duration: Duration) -> Vec<Command> {
        self.handle(Event::TaskFinished { worker: WorkerId(worker), key: k(key), nbytes, duration, value: None })
    }

    fn fail(&mut self, worker: u32, key: &str, error: TaskError) -> Vec<Command> {
        self.handle(Event::TaskFailed {
            worker: WorkerId(worker),
            key: k(key),
            error,
            duration: Duration::from_millis(1),
        })
    }

    fn lose(&mut self, worker: u32) -> Vec<Command> {
        self.handle(Event::WorkerLost { worker: WorkerId(worker), reason: "test".into(), expected: false })
    }

    fn state(&self, key: &str) -> TaskState {
        self.core.task_state(key).unwrap_or_else(|| panic!("{key} is unknown")).clone()
    }

    /// The worker `key` is processing on.
    fn runs_on(&self, key: &str) -> u32 {
        match self.state(key) {
            TaskState::Processing { worker } => worker.0,
            s => panic!("{key} is {}, not processing", s.name()),
        }
    }
}

/// `(worker, key)` of every Compute, in order.
fn computes(cmds: &[Command]) -> Vec<(u32, String)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Compute { worker, key, .. } => Some((worker.0, key.to_string())),
            _ => None,
        })
        .collect()
}

/// `(worker, key)` of every Free, in order.
fn frees(cmds: &[Command]) -> Vec<(u32, String)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Free { worker, key } => Some((worker.0, key.to_string())),
            _ => None,
        })
        .collect()
}

/// `(client, key, report)` of every Report, in order.
fn reports(cmds: &[Command]) -> Vec<(ClientId, String, Report)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Report { client, key, report } => Some((*client, key.to_string(), report.clone())),
            _ => None,
        })
        .collect()
}

fn compute_deps(cmds: &[Command], key: &str) -> Vec<DepLocation> {
    cmds.iter()
        .find_map(|c| match c {
            Command::Compute { key: x, deps, .. } if &**x == key => Some(deps.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Compute for {key} in {cmds:?}"))
}

fn s(x: &str) -> String {
    x.to_string()
}

fn memory(nbytes: u64, workers: &[u32]) -> Report {
    Report::Memory { nbytes, workers: workers.iter().map(|w| addr(*w)).collect(), value: None }
}

fn erred_with(state: &TaskState) -> Arc<TaskError> {
    match state {
        TaskState::Erred { error } => error.clone(),
        s => panic!("expected erred, got {}", s.name()),
    }
}

// ---------------------------------------------------------------------------- unit tests

#[test]
fn single_task_runs_and_is_reported() {
    let mut h = Harness::new();
    assert!(h.join(1, 1).is_empty());
    let out = h.submit(C1, vec![task("x", &[])], &["x"]);
    assert_eq!(
        out,
        vec![Command::Compute {
            worker: WorkerId(1),
            key: k("x"),
            spec: Bytes::from_static(b"spec"),
            deps: vec![],
            priority: 0,
            inline: true,
            announce: false,
            resources: vec![],
        }]
    );
    assert_eq!(h.state("x"), TaskState::Processing { worker: WorkerId(1) });

    let out = h.finish(1, "x", 10);
    assert_eq!(reports(&out), vec![(C1, s("x"), memory(10, &[1]))]);
    // A small value sent along with the completion is forwarded to the client, once.
    h.submit(C1, vec![task("y", &[])], &["y"]);
    let value: InlineValue = ("msgpack", Bytes::from_static(b"\x07"));
    let out = h.handle(Event::TaskFinished {
        worker: WorkerId(1),
        key: k("y"),
        nbytes: 1,
        duration: Duration::from_micros(3),
        value: Some(value.clone()),
    });
    let Some(Command::Report { report: Report::Memory { value: got, .. }, .. }) =
        out.iter().find(|c| matches!(c, Command::Report { .. }))
    else {
        panic!("no report: {out:?}")
    };
    assert_eq!(got.as_ref(), Some(&value));
    // Wanted again later: the scheduler kept no copy, the client fetches from the worker.
    let out = h.handle(Event::Want { client: C2, keys: vec![k("y")] });
    assert!(matches!(&out[..], [Command::Report { report: Report::Memory { value: None, .. }, .. }]), "{out:?}");
    assert_eq!(out.len(), 1);
    assert!(matches!(h.state("x"), TaskState::Memory { nbytes: 10, .. }));
    assert_eq!(h.core.who_has("x"), vec![addr(1)]);

    let out = h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("x")] });
    assert_eq!(frees(&out), vec![(1, s("x"))]);
    assert!(h.core.task_state("x").is_none());
    assert_eq!(h.core.story("x").last().map(|t| t.to), Some("forgotten"));
}

#[test]
fn chain_releases_intermediates_then_forgets_everything() {
    let mut h = Harness::new();
    h.join(1, 1);
    let out = h.submit(C1, vec![task("a", &[]), task("b", &["a"]), task("c", &["b"])], &["c"]);
    assert_eq!(computes(&out), vec![(1, s("a"))]);
    assert_eq!(h.state("b"), TaskState::Waiting { remaining: 1 });
    assert_eq!(h.state("c"), TaskState::Waiting { remaining: 1 });

    let out = h.finish(1, "a", 10);
    assert_eq!(computes(&out), vec![(1, s("b"))]);
    assert_eq!(
        compute_deps(&out, "b"),
        vec![DepLocation { key: k("a"), workers: [addr(1)].into_iter().collect(), nbytes: 10 }]
    );
    assert!(reports(&out).is_empty(), "nobody wants a");

    // b done: a is no longer needed by anything active.
    let out = h.finish(1, "b", 20);
    assert_eq!(computes(&out), vec![(1, s("c"))]);
    assert_eq!(frees(&out), vec![(1, s("a"))]);
    assert_eq!(h.state("a"), TaskState::Released);

    let out = h.finish(1, "c", 30);
    assert_eq!(reports(&out), vec![(C1, s("c"), memory(30, &[1]))]);
    assert_eq!(frees(&out), vec![(1, s("b"))]);
    assert_eq!(h.state("a"), TaskState::Released);
    assert_eq!(h.state("b"), TaskState::Released);
    assert!(matches!(h.state("c"), TaskState::Memory { .. }));
    assert_eq!(h.core.workers().next().unwrap().4, 30, "only c's bytes are held");

    let out = h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("c")] });
    assert_eq!(frees(&out), vec![(1, s("c"))]);
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn prefix_counts_give_tasks_by_state_now_and_transitions_since_the_start() {
    let mut h = Harness::new();
    h.join(1, 2);
    h.submit(C1, vec![task("inc-1", &[]), task("inc-2", &[]), task("sum-1", &["inc-1", "inc-2"])], &["sum-1"]);
    let counts = |h: &Harness, prefix: &str| {
        let p = h.core.prefix_states().into_iter().find(|p| &*p.name == prefix).expect("a known prefix");
        (p.now, p.entered)
    };
    let (processing, memory, waiting, released) = (4, 5, 1, 0);
    let (now, entered) = counts(&h, "inc");
    assert_eq!(now[processing], 2);
    assert_eq!(entered[processing], 2);
    assert_eq!(counts(&h, "sum").0[waiting], 1);

    h.finish(1, "inc-1", 8);
    h.finish(1, "inc-2", 8);
    h.finish(1, "sum-1", 8);
    let (now, entered) = counts(&h, "inc");
    assert_eq!(now[released], 2, "inputs no longer needed are released");
    assert_eq!((entered[processing], entered[memory], entered[released]), (2, 2, 2));
    assert_eq!(counts(&h, "sum").0[memory], 1);

    // Forgotten tasks leave the counts of now; the totals stay.
    h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("sum-1")] });
    let (now, entered) = counts(&h, "inc");
    assert_eq!(now, [0; 7]);
    assert_eq!(entered[memory], 2);
    assert_eq!(counts(&h, "sum").1[memory], 1);
}

#[test]
fn same_key_submitted_twice_runs_once() {
    let mut h = Harness::new();
    h.join(1, 4);
    // Twice in one graph.
    let out = h.submit(C1, vec![task("x", &[]), task("x", &[])], &["x"]);
    assert_eq!(computes(&out), vec![(1, s("x"))]);
    // Again, by another client.
    let out = h.submit(C2, vec![task("x", &[])], &["x"]);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(h.core.n_tasks(), 1);

    let out = h.finish(1, "x", 5);
    let mut got = reports(&out);
    got.sort_by_key(|r| r.0);
    assert_eq!(got, vec![(C1, s("x"), memory(5, &[1])), (C2, s("x"), memory(5, &[1]))]);

    // Submitted once more after it finished: reported at once, not recomputed.
    let out = h.submit(ClientId(3), vec![task("x", &[])], &["x"]);
    assert_eq!(out, vec![Command::Report { client: ClientId(3), key: k("x"), report: memory(5, &[1]) }]);
}

#[test]
fn failure_propagates_the_same_error_to_dependents_and_their_clients() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.submit(C1, vec![task("a", &[]), task("b", &["a"]), task("c", &["b"])], &["c"]);
    assert!(h.handle(Event::Want { client: C2, keys: vec![k("b")] }).is_empty());

    let out = h.fail(1, "a", error("division by zero"));
    assert!(computes(&out).is_empty());
    let ea = erred_with(&h.state("a"));
    assert_eq!(ea.key, "a", "the core fills in the failing key");
    assert_eq!(ea.message, "division by zero");
    let eb = erred_with(&h.state("b"));
    let ec = erred_with(&h.state("c"));
    assert!(Arc::ptr_eq(&ea, &eb) && Arc::ptr_eq(&ea, &ec), "one shared error");

    let mut got = reports(&out);
    got.sort_by_key(|r| r.0);
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].0, got[0].1.as_str()), (C1, "c"));
    assert_eq!((got[1].0, got[1].1.as_str()), (C2, "b"));
    for (_, _, r) in &got {
        let Report::Erred(e) = r else { panic!("{r:?}") };
        assert!(Arc::ptr_eq(e, &ea));
    }

    // Releasing the failed keys forgets the whole chain.
    h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("c")] });
    assert_eq!(h.core.n_tasks(), 2);
    h.handle(Event::ReleaseKeys { client: C2, keys: vec![k("b")] });
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn a_failed_task_with_retries_is_recomputed() {
    let mut h = Harness::new();
    h.join(1, 1);
    let mut t = task("x", &[]);
    t.retries = 1;
    h.submit(C1, vec![t], &["x"]);

    let out = h.fail(1, "x", error("flaky"));
    assert_eq!(computes(&out), vec![(1, s("x"))], "retried");
    assert!(reports(&out).is_empty());
    assert_eq!(h.state("x"), TaskState::Processing { worker: WorkerId(1) });

    // No retries left: the second failure is final.
    let out = h.fail(1, "x", error("flaky again"));
    assert!(computes(&out).is_empty());
    let e = erred_with(&h.state("x"));
    assert_eq!(e.message, "flaky again");
    assert_eq!(reports(&out), vec![(C1, s("x"), Report::Erred(e))]);
}

#[test]
fn a_retried_task_can_succeed() {
    let mut h = Harness::new();
    h.join(1, 1);
    let mut t = task("x", &[]);
    t.retries = 3;
    h.submit(C1, vec![t, task("y", &["x"])], &["y"]);
    h.fail(1, "x", error("flaky"));
    let out = h.finish(1, "x", 1);
    assert_eq!(computes(&out), vec![(1, s("y"))]);
    let out = h.finish(1, "y", 1);
    assert_eq!(reports(&out), vec![(C1, s("y"), memory(1, &[1]))]);
}

#[test]
fn a_task_processing_on_a_lost_worker_goes_to_another() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    h.submit(C1, vec![task("x", &[])], &["x"]);
    assert_eq!(h.runs_on("x"), 1);

    let out = h.lose(1);
    assert_eq!(out.len(), 1, "nothing goes to the dead worker: {out:?}");
    assert_eq!(computes(&out), vec![(2, s("x"))]);
    assert_eq!(h.core.n_workers(), 1);

    // A late result from the dead worker is ignored.
    assert!(h.finish(1, "x", 1).is_empty());
    assert_eq!(h.state("x"), TaskState::Processing { worker: WorkerId(2) });
    let out = h.finish(2, "x", 1);
    assert_eq!(reports(&out), vec![(C1, s("x"), memory(1, &[2]))]);
}

#[test]
fn the_lost_only_replica_of_a_needed_input_is_recomputed() {
    let mut h = Harness::new();
    for i in 1..=3 {
        h.join(i, 1);
    }
    // c needs b and x; x runs long.
    h.submit(C1, vec![task("b", &[]), task("x", &[]), task("c", &["b", "x"])], &["c"]);
    let wb = h.runs_on("b");
    let wx = h.runs_on("x");
    assert_ne!(wb, wx);
    h.finish(wb, "b", 100);
    assert_eq!(h.state("c"), TaskState::Waiting { remaining: 1 });

    let out = h.lose(wb);
    assert_eq!(h.state("c"), TaskState::Waiting { remaining: 2 });
    let free = (1..=3).find(|w| *w != wb && *w != wx).unwrap();
    assert_eq!(computes(&out), vec![(free, s("b"))], "b recomputed on the idle worker");

    h.finish(free, "b", 100);
    let out = h.finish(wx, "x", 1);
    assert_eq!(computes(&out).len(), 1);
    let wc = h.runs_on("c");
    let out = h.finish(wc, "c", 1);
    assert_eq!(reports(&out), vec![(C1, s("c"), memory(1, &[wc]))]);
}

#[test]
fn recompute_is_recursive_through_released_inputs() {
    let mut h = Harness::new();
    for i in 1..=3 {
        h.join(i, 1);
    }
    // a -> b -> c, and c also needs the slow x.
    h.submit(C1, vec![task("a", &[]), task("b", &["a"]), task("x", &[]), task("c", &["b", "x"])], &["c"]);
    let wa = h.runs_on("a");
    let wx = h.runs_on("x");
    let out = h.finish(wa, "a", 100);
    assert_eq!(computes(&out), vec![(wa, s("b"))], "b goes where its input is");
    let out = h.finish(wa, "b", 100);
    assert_eq!(frees(&out), vec![(wa, s("a"))]);
    assert_eq!(h.state("a"), TaskState::Released);

    // b's only replica dies; c still needs it, and b needs a, which was released.
    let out = h.lose(wa);
    let other = (1..=3).find(|w| *w != wa && *w != wx).unwrap();
    assert_eq!(computes(&out), vec![(other, s("a"))]);
    assert_eq!(h.state("b"), TaskState::Waiting { remaining: 1 });
    assert_eq!(h.state("c"), TaskState::Waiting { remaining: 2 });

    let out = h.finish(other, "a", 100);
    assert_eq!(computes(&out), vec![(other, s("b"))]);
    h.finish(other, "b", 100);
    h.finish(wx, "x", 1);
    let wc = h.runs_on("c");
    let out = h.finish(wc, "c", 7);
    assert_eq!(reports(&out), vec![(C1, s("c"), memory(7, &[wc]))]);
    assert_eq!(h.state("a"), TaskState::Released);
    assert_eq!(h.state("b"), TaskState::Released);
}

#[test]
fn a_task_that_kills_too_many_workers_errs() {
    let mut h = Harness::new();
    for i in 1..=5 {
        h.join(i, 1);
    }
    h.submit(C1, vec![task("bomb", &[])], &["bomb"]);
    for i in 1..=3 {
        assert_eq!(h.runs_on("bomb"), i);
        let out = h.lose(i);
        assert_eq!(computes(&out), vec![(i + 1, s("bomb"))]);
    }
    // The fourth death is one more than allowed_failures (3).
    let out = h.lose(4);
    assert!(computes(&out).is_empty(), "not sent to worker 5: {out:?}");
    let e = erred_with(&h.state("bomb"));
    assert_eq!(e.kind, "killed-worker");
    assert_eq!(reports(&out), vec![(C1, s("bomb"), Report::Erred(e))]);
}

#[test]
fn a_worker_death_counts_against_running_tasks_not_queued_ones() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    // Short tasks, so that many queue on each worker.
    for i in 0..4 {
        let key = format!("warm-{i}");
        h.submit(C1, vec![task(&key, &[])], &[&key]);
        let w = h.runs_on(&key);
        h.finish_in(w, &key, 1, Duration::from_micros(50));
    }
    let keys: Vec<String> = (0..20).map(|i| format!("warm-x{i}")).collect();
    let tasks: Vec<NewTask> = keys.iter().map(|k| task(k, &[])).collect();
    let wanted: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    h.submit(C1, tasks, &wanted);
    let on1: Vec<String> = keys.iter().filter(|k| h.runs_on(k) == 1).cloned().collect();
    assert!(on1.len() > 2, "several tasks queue on worker 1: {on1:?}");
    // Worker 1 reports one task running; it dies four times over (each time coming back).
    let running = on1[0].clone();
    for round in 0..4 {
        let w = h.runs_on(&running);
        h.handle(Event::TasksStarted { worker: WorkerId(w), keys: vec![k(&running)], ack: false });
        let out = h.lose(w);
        if round < 3 {
            assert!(computes(&out).iter().any(|(_, key)| *key == running), "rescheduled: {out:?}");
            let announced =
                out.iter().any(|c| matches!(c, Command::Compute { key, announce: true, .. } if **key == *running));
            assert!(announced, "a task that was running when its worker died announces its next start");
        }
        h.join(10 + round, 1);
    }
    let e = erred_with(&h.state(&running));
    assert_eq!(e.kind, "killed-worker");
    assert!(e.message.contains("running on 4 workers that died"), "{}", e.message);
    // Everything that was only queued where those workers died is still on its way.
    for key in &keys {
        if *key != running {
            assert!(!matches!(h.state(key), TaskState::Erred { .. }), "{key} erred");
        }
    }
}

#[test]
fn a_task_that_kills_its_worker_before_reporting_its_start_is_still_caught() {
    let mut h = Harness::new();
    h.join(1, 2);
    for i in 0..4 {
        let key = format!("quick-{i}");
        h.submit(C1, vec![task(&key, &[])], &[&key]);
        let w = h.runs_on(&key);
        h.finish_in(w, &key, 1, Duration::from_micros(50));
    }
    h.submit(C1, vec![task("quick-innocent", &[]), task("quick-bomb", &[])], &["quick-innocent", "quick-bomb"]);
    let mut bomb_announced = false;
    for next in 2..10 {
        if matches!(h.state("quick-bomb"), TaskState::Erred { .. }) {
            break;
        }
        let w = h.runs_on("quick-bomb");
        // Whatever else runs there reports its start; the bomb reports its start only when
        // asked to announce it (it kills the worker before a lazy report could go out).
        let mut started = Vec::new();
        if let TaskState::Processing { worker } = h.state("quick-innocent") {
            if worker.0 == w && next == 2 {
                // Running beside the bomb when the first worker dies.
                started.push(k("quick-innocent"));
            } else {
                h.finish(worker.0, "quick-innocent", 1);
            }
        }
        if bomb_announced {
            started.push(k("quick-bomb"));
        }
        h.handle(Event::TasksStarted { worker: WorkerId(w), keys: started, ack: false });
        h.join(next, 2);
        let out = h.lose(w);
        bomb_announced =
            out.iter().any(|c| matches!(c, Command::Compute { key, announce: true, .. } if &**key == "quick-bomb"));
    }
    let e = erred_with(&h.state("quick-bomb"));
    assert_eq!(e.kind, "killed-worker", "{}", e.message);
    if let TaskState::Processing { worker } = h.state("quick-innocent") {
        h.finish(worker.0, "quick-innocent", 1);
    }
    assert!(matches!(h.state("quick-innocent"), TaskState::Memory { .. }), "{:?}", h.state("quick-innocent"));
}

fn paused(worker: u32, paused: bool) -> Event {
    Event::Heartbeat {
        worker: WorkerId(worker),
        memory: Some(WorkerMemory { process: 900, managed: 100, paused, ..Default::default() }),
    }
}

#[test]
fn restart_forgets_everything_and_tells_every_client() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.submit(C1, vec![task("a", &[]), task("b", &["a"]), task("c", &[])], &["b", "c"]);
    h.finish(1, "a", 10);
    h.submit(C2, vec![task("c", &[])], &["c"]);
    let out = h.handle(Event::Restart { reason: "Client.restart".into() });
    // Every client hears of every key it held.
    let mut told = reports(&out);
    told.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let why: Arc<str> = Arc::from("Client.restart");
    assert_eq!(
        told,
        vec![
            (C1, s("b"), Report::Cancelled(Some(why.clone()))),
            (C1, s("c"), Report::Cancelled(Some(why.clone()))),
            (C2, s("c"), Report::Cancelled(Some(why)))
        ]
    );
    // The worker drops what it holds and runs (`c` only waited in the queue).
    let mut freed = frees(&out);
    freed.sort();
    assert_eq!(freed, vec![(1, s("a")), (1, s("b"))]);
    assert_eq!(h.core.n_tasks(), 0);
    // The same keys submitted again run afresh.
    let out = h.submit(C1, vec![task("c", &[])], &["c"]);
    assert_eq!(computes(&out), vec![(1, s("c"))]);
}

fn retire(op: u64, workers: &[u32], close: bool) -> Event {
    Event::RetireWorkers {
        op,
        workers: workers.iter().map(|w| WorkerId(*w)).collect(),
        close,
        restart: false,
        reason: "test".into(),
    }
}

fn acquired(cmds: &[Command]) -> Vec<(u32, Vec<String>)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::AcquireReplicas { worker, keys } => {
                Some((worker.0, keys.iter().map(|d| d.key.to_string()).collect()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn retiring_a_worker_moves_its_only_copies_then_closes_it_without_recomputing() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    let mut only1 = task("a", &[]);
    only1.workers = vec![addr(1)];
    h.submit(C1, vec![only1, task("b", &[])], &["a", "b"]);
    h.finish(1, "a", 10);
    let b_on = h.runs_on("b");
    h.finish(b_on, "b", 20);
    let out = h.handle(retire(7, &[1], true));
    // Worker 1's only copies go to worker 2; it is not closed before they arrive.
    let mut want: Vec<String> = vec![s("a")];
    if b_on == 1 {
        want.push(s("b"));
    }
    let moved = acquired(&out);
    assert_eq!(moved.len(), 1);
    let mut keys = moved[0].1.clone();
    keys.sort();
    assert_eq!((moved[0].0, keys.clone()), (2, want));
    assert!(!out.iter().any(|c| matches!(c, Command::CloseWorker { .. } | Command::Retired { .. })));
    assert_eq!(h.core.worker_status(WorkerId(1)), Some("closing_gracefully"));
    // New work does not go to it.
    let out = h.submit(C1, vec![task("c", &[])], &["c"]);
    assert_eq!(computes(&out), vec![(2, s("c"))]);
    // The copies arrive: closed, answered, and nothing was recomputed.
    let added: Vec<(Key, u64)> = keys.iter().map(|k| (k.as_str().into(), 10)).collect();
    let out = h.handle(Event::ReplicasAdded { worker: WorkerId(2), keys: added });
    assert!(computes(&out).is_empty(), "{out:?}");
    assert!(out.iter().any(|c| matches!(c, Command::CloseWorker { worker: WorkerId(1), restart: false, .. })));
    let addr1 = addr(1);
    assert!(out.contains(&Command::Retired { op: 7, workers: vec![addr1], refused: None }), "{out:?}");
    assert!(matches!(h.state("a"), TaskState::Memory { ref who_has, .. } if who_has.as_slice() == [WorkerId(2)]));
    assert_eq!(h.core.n_workers(), 1);
}

#[test]
fn a_retiring_worker_finishes_its_tasks_first_and_a_lost_target_is_replaced() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    h.join(3, 1);
    let mut on1 = task("x", &[]);
    on1.workers = vec![addr(1)];
    h.submit(C1, vec![on1], &["x"]);
    let out = h.handle(retire(1, &[1], true));
    assert!(acquired(&out).is_empty() && !out.iter().any(|c| matches!(c, Command::CloseWorker { .. })));
    // Its task finishes there; then its result is copied to the least loaded other worker.
    let out = h.finish(1, "x", 5);
    let moved = acquired(&out);
    assert_eq!(moved.len(), 1);
    let target = moved[0].0;
    // That worker dies before it has the copy: another one is asked.
    let out = h.lose(target);
    let again = acquired(&out);
    assert_eq!(again.len(), 1, "{out:?}");
    assert_ne!(again[0].0, target);
    let out = h.handle(Event::ReplicasAdded { worker: WorkerId(again[0].0), keys: vec![(k("x"), 5)] });
    assert!(out.iter().any(|c| matches!(c, Command::Retired { op: 1, .. })), "{out:?}");
}

#[test]
fn retiring_the_last_worker_with_data_is_refused_and_close_false_leaves_it_idle() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.submit(C1, vec![task("a", &[])], &["a"]);
    h.finish(1, "a", 1);
    let out = h.handle(retire(3, &[1], true));
    assert!(
        matches!(&out[..], [Command::Retired { op: 3, refused: Some(why), .. }] if why.contains("no other worker")),
        "{out:?}"
    );
    assert_eq!(h.core.worker_status(WorkerId(1)), Some("running"));
    // With a second worker and close: false, it gives its copy away and stays, idle.
    h.join(2, 1);
    h.handle(retire(4, &[1], false));
    let out = h.handle(Event::ReplicasAdded { worker: WorkerId(2), keys: vec![(k("a"), 1)] });
    assert!(out.iter().any(|c| matches!(c, Command::Retired { op: 4, .. })), "{out:?}");
    assert!(frees(&out).contains(&(1, s("a"))), "it drops its copy: {out:?}");
    assert_eq!(h.core.worker_status(WorkerId(1)), Some("closed"));
    assert_eq!(h.core.n_workers(), 2);
    let out = h.submit(C1, vec![task("b", &[])], &["b"]);
    assert_eq!(computes(&out), vec![(2, s("b"))], "a retired worker gets no work");
}

/// Two workers; `a` (1 byte) in memory on worker 1 only.
fn a_held_only_by_worker_1_of_2() -> Harness {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    let mut on1 = task("a", &[]);
    on1.workers = vec![addr(1)];
    h.submit(C1, vec![on1], &["a"]);
    h.finish(1, "a", 1);
    h
}

#[test]
fn a_retirement_with_no_one_left_to_take_the_values_is_given_up() {
    let mut h = a_held_only_by_worker_1_of_2();
    let out = h.handle(retire(5, &[1], true));
    assert_eq!(acquired(&out), vec![(2, vec![s("a")])]);
    // The only worker that could take the copy dies: worker 1 runs again, and the request
    // hears why.
    let out = h.lose(2);
    assert!(
        out.iter().any(
            |c| matches!(c, Command::Retired { op: 5, refused: Some(why), .. } if why.contains("no other worker"))
        ),
        "{out:?}"
    );
    assert_eq!(h.core.worker_status(WorkerId(1)), Some("running"));
    assert!(matches!(h.state("a"), TaskState::Memory { .. }), "nothing lost");
    // Copies that keep failing give up too.
    h.join(3, 1);
    h.handle(retire(6, &[1], true));
    let mut out = Vec::new();
    for _ in 0..3 {
        out = h.handle(Event::ReplicasFailed { worker: WorkerId(3), keys: vec![k("a")] });
    }
    assert!(
        out.iter().any(|c| matches!(c, Command::Retired { op: 6, refused: Some(why), .. } if why.contains("3 tries"))),
        "{out:?}"
    );
    assert_eq!(h.core.worker_status(WorkerId(1)), Some("running"));
}

#[test]
fn a_restart_ends_pending_retirements() {
    let mut h = a_held_only_by_worker_1_of_2();
    h.handle(retire(9, &[1], true));
    let out = h.handle(Event::Restart { reason: "r".into() });
    assert!(
        out.iter()
            .any(|c| matches!(c, Command::Retired { op: 9, refused: Some(why), .. } if why.contains("restarted"))),
        "{out:?}"
    );
    assert!(!h.core.is_retiring());
    assert_eq!(h.core.worker_status(WorkerId(1)), Some("running"));
}

#[test]
fn a_paused_worker_gets_no_new_tasks_until_it_resumes() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    let out = h.handle(paused(1, true));
    assert!(out.iter().any(|c| matches!(c, Command::Notice { message, .. } if message.contains("paused"))), "logged");
    let keys: Vec<String> = (0..6).map(|i| format!("p-{i}")).collect();
    let wanted: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let out = h.submit(C1, keys.iter().map(|k| task(k, &[])).collect(), &wanted);
    assert!(computes(&out).iter().all(|(w, _)| *w == 2), "only the running worker: {out:?}");
    // A task only worker 1 may run waits for it.
    let mut only1 = task("only1", &[]);
    only1.workers = vec![addr(1)];
    h.submit(C1, vec![only1], &["only1"]);
    assert_eq!(h.state("only1"), TaskState::NoWorker);
    // Resumed: it runs what waited for it and takes queued work.
    let out = h.handle(paused(1, false));
    let on1: Vec<String> = computes(&out).into_iter().filter(|(w, _)| *w == 1).map(|(_, k)| k).collect();
    assert!(on1.contains(&s("only1")), "{out:?}");
    assert_eq!(h.core.worker_memory(WorkerId(1)).unwrap().unmanaged(), 800);
}

#[test]
fn placement_prefers_the_worker_holding_most_input_bytes() {
    for (bytes_a, bytes_b) in [(10, 1000), (1000, 10)] {
        let mut h = Harness::new();
        h.join(1, 1);
        h.join(2, 1);
        h.submit(C1, vec![task("a", &[]), task("b", &[]), task("c", &["a", "b"])], &["c"]);
        let (wa, wb) = (h.runs_on("a"), h.runs_on("b"));
        assert_ne!(wa, wb);
        h.finish(wa, "a", bytes_a);
        let out = h.finish(wb, "b", bytes_b);
        let expected = if bytes_a > bytes_b { wa } else { wb };
        assert_eq!(computes(&out), vec![(expected, s("c"))]);
    }
}

#[test]
fn a_worker_gets_as_many_tasks_as_it_can_start_soon() {
    let mut h = Harness::with_config(Config { unknown_duration: Duration::from_secs(3600), ..Config::default() });
    h.join(1, 1);
    let keys: Vec<String> = (0..5).map(|i| format!("inc-{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(|x| x.as_str()).collect();
    let out = h.submit(C1, refs.iter().map(|x| task(x, &[])).collect(), &refs);
    assert_eq!(computes(&out), vec![(1, s("inc-0"))], "one slot for a thread");
    for key in &refs[1..] {
        assert_eq!(h.state(key), TaskState::Queued);
    }

    // inc tasks turn out to take a microsecond: the worker can start many soon.
    let out = h.finish_in(1, "inc-0", 1, Duration::from_micros(1));
    assert_eq!(computes(&out), refs[1..].iter().map(|x| (1, s(x))).collect::<Vec<_>>(), "in submission order");
}

#[test]
fn slow_tasks_are_handed_out_one_per_free_thread() {
    let mut h = Harness::new();
    h.join(1, 2);
    let keys: Vec<String> = (0..5).map(|i| format!("slow-{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(|x| x.as_str()).collect();
    let out = h.submit(C1, refs.iter().map(|x| task(x, &[])).collect(), &refs);
    assert_eq!(computes(&out), vec![(1, s("slow-0")), (1, s("slow-1"))]);
    let out = h.finish_in(1, "slow-0", 1, Duration::from_secs(5));
    assert_eq!(computes(&out), vec![(1, s("slow-2"))]);
}

#[test]
fn a_higher_priority_queued_task_goes_first() {
    // (Within one batch, free slots go by priority too: see the depth-first test.)
    let mut h = Harness::new();
    h.join(1, 1);
    let mut hi = task("hi", &[]);
    hi.priority = 10;
    h.submit(C1, vec![task("first", &[])], &["first"]);
    h.submit(C1, vec![task("lo", &[]), hi], &["lo", "hi"]);
    let out = h.finish(1, "first", 1);
    assert_eq!(computes(&out), vec![(1, s("hi"))]);
}

#[test]
fn restrictions_name_workers_by_address_or_name() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    let mut by_name = task("by-name", &[]);
    by_name.workers = vec![Arc::from("w2")];
    let mut by_addr = task("by-addr", &[]);
    by_addr.workers = vec![addr(2)];
    let out = h.submit(C1, vec![by_name, by_addr], &["by-name", "by-addr"]);
    // Only worker 2 may run them, so they are not held back by its slot limit.
    assert_eq!(computes(&out), vec![(2, s("by-name")), (2, s("by-addr"))]);

    let mut elsewhere = task("elsewhere", &[]);
    elsewhere.workers = vec![Arc::from("w3")];
    let out = h.submit(C1, vec![elsewhere], &["elsewhere"]);
    assert!(out.is_empty());
    assert_eq!(h.state("elsewhere"), TaskState::NoWorker);

    // Worker 3 joining is not enough for anyone else, but it is for this task.
    let out = h.join(3, 1);
    assert_eq!(computes(&out), vec![(3, s("elsewhere"))]);
}

#[test]
fn loose_restrictions_prefer_the_named_workers_and_fall_back_to_any() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    let loose = |key: &str, on: &str| {
        let mut t = task(key, &[]);
        t.workers = vec![Arc::from(on)];
        t.allow_other_workers = true;
        t
    };
    // Worker 2 is named and has room: it gets the task though worker 1 is as free.
    let out = h.submit(C1, vec![loose("a", "w2")], &["a"]);
    assert_eq!(computes(&out), vec![(2, s("a"))]);
    // A named worker that does not exist does not hold the task back.
    let out = h.submit(C1, vec![loose("b", "w9")], &["b"]);
    assert_eq!(computes(&out), vec![(1, s("b"))]);
    // Nor does its named worker being full: worker 2 still runs "a", worker 1 is free again.
    h.finish(1, "b", 1);
    let out = h.submit(C1, vec![loose("c", "w2")], &["c"]);
    assert_eq!(computes(&out), vec![(1, s("c"))]);
    // With room on both, the named one again.
    h.finish(2, "a", 1);
    let out = h.submit(C1, vec![loose("d", "w2")], &["d"]);
    assert_eq!(computes(&out), vec![(2, s("d"))]);
}

#[test]
fn a_restricted_task_waits_when_its_worker_dies() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    let mut t = task("pinned", &[]);
    t.workers = vec![Arc::from("w1")];
    h.submit(C1, vec![t], &["pinned"]);
    let out = h.lose(1);
    assert!(computes(&out).is_empty(), "worker 2 is not allowed: {out:?}");
    assert_eq!(h.state("pinned"), TaskState::NoWorker);
    let out = h.join(1, 1);
    assert_eq!(computes(&out), vec![(1, s("pinned"))]);
}

#[test]
fn a_disconnecting_client_releases_what_it_wanted() {
    let mut h = Harness::new();
    h.join(1, 2);
    h.submit(C1, vec![task("x", &[]), task("y", &["x"]), task("z", &[])], &["y", "z"]);
    h.handle(Event::Want { client: C2, keys: vec![k("z")] });
    assert_eq!(h.runs_on("x"), 1);
    assert_eq!(h.runs_on("z"), 1);

    let out = h.handle(Event::ClientDisconnected { client: C1 });
    assert_eq!(frees(&out), vec![(1, s("x"))], "x's computation is cancelled, z is still wanted");
    assert!(h.core.task_state("x").is_none() && h.core.task_state("y").is_none());
    assert_eq!(h.core.n_tasks(), 1);

    let out = h.handle(Event::ClientDisconnected { client: C2 });
    assert_eq!(frees(&out), vec![(1, s("z"))]);
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn cancel_reports_cancelled_and_stops_the_computation() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.submit(C1, vec![task("x", &[])], &["x"]);
    let out = h.handle(Event::CancelKeys { client: C1, keys: vec![k("x"), k("unknown")], force: false, reason: None });
    assert_eq!(frees(&out), vec![(1, s("x"))]);
    assert_eq!(reports(&out), vec![(C1, s("x"), Report::Cancelled(None)), (C1, s("unknown"), Report::Cancelled(None))]);
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn cancel_by_one_client_leaves_another_clients_future() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.submit(C1, vec![task("x", &[])], &["x"]);
    h.handle(Event::Want { client: C2, keys: vec![k("x")] });
    let out = h.handle(Event::CancelKeys { client: C1, keys: vec![k("x")], force: false, reason: None });
    assert_eq!(out, vec![Command::Report { client: C1, key: k("x"), report: Report::Cancelled(None) }]);
    assert_eq!(h.runs_on("x"), 1);
}

#[test]
fn cancel_takes_the_dependents_no_other_client_wants_with_it() {
    let mut h = Harness::new();
    h.join(1, 1);
    // y = f(x) and z = g(y) wanted by C1; w = h(x) wanted by C2 too.
    h.submit(C1, vec![task("x", &[]), task("y", &["x"]), task("z", &["y"]), task("w", &["x"])], &["x", "z", "w"]);
    h.handle(Event::Want { client: C2, keys: vec![k("w")] });
    let out = h.handle(Event::CancelKeys { client: C1, keys: vec![k("x")], force: false, reason: Some("stop".into()) });
    let mut got = reports(&out);
    got.sort_by(|a, b| a.1.cmp(&b.1));
    let why = |r: &Report| matches!(r, Report::Cancelled(Some(w)) if w.contains("stop"));
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], (C1, s("x"), Report::Cancelled(None)));
    assert!(got[1].0 == C1 && got[1].1 == "z" && why(&got[1].2), "{got:?}");
    // C2 still wants w, which needs x: both live on; y and z are gone.
    assert_eq!(h.runs_on("x"), 1);
    assert!(h.core.task_state("z").is_none() && h.core.task_state("y").is_none());
    assert!(h.core.task_state("w").is_some());
    // Forced, C2's w is cancelled too, and everything goes.
    let out = h.handle(Event::CancelKeys { client: C1, keys: vec![k("x")], force: true, reason: None });
    assert!(reports(&out).iter().any(|(c, key, r)| *c == C2 && key == "w" && matches!(r, Report::Cancelled(Some(_)))));
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn releasing_a_processing_task_frees_its_slot_for_queued_work() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.submit(C1, vec![task("a", &[]), task("b", &[])], &["a", "b"]);
    assert_eq!(h.runs_on("a"), 1);
    assert_eq!(h.state("b"), TaskState::Queued);
    let out = h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("a")] });
    assert_eq!(frees(&out), vec![(1, s("a"))]);
    assert_eq!(computes(&out), vec![(1, s("b"))], "the freed thread takes the queued task");
}

#[test]
fn scattered_data_is_in_memory_and_reported_lost_with_its_worker() {
    let mut h = Harness::new();
    h.join(1, 1);
    let out = h.handle(Event::Scattered { client: C1, keys: vec![(k("s"), vec![addr(1)], 100)] });
    assert_eq!(reports(&out), vec![(C1, s("s"), memory(100, &[1]))]);
    assert!(matches!(h.state("s"), TaskState::Memory { nbytes: 100, .. }));

    let out = h.submit(C1, vec![task("d", &["s"])], &["d"]);
    assert_eq!(computes(&out), vec![(1, s("d"))]);

    let out = h.lose(1);
    let got = reports(&out);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|(c, _, r)| *c == C1 && matches!(r, Report::Lost(_))), "{got:?}");
    assert_eq!(erred_with(&h.state("s")).kind, "lost");
    assert_eq!(erred_with(&h.state("d")).kind, "lost");

    h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("s"), k("d")] });
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn scattered_to_an_unknown_worker_is_lost() {
    let mut h = Harness::new();
    let out = h.handle(Event::Scattered { client: C1, keys: vec![(k("s"), vec![addr(9)], 1)] });
    assert!(matches!(&reports(&out)[..], [(C1, _, Report::Lost(_))]), "{out:?}");
    // Scattering it again (to a worker that is still unknown) stays lost.
    let out = h.handle(Event::Scattered { client: C2, keys: vec![(k("s"), vec![addr(9)], 1)] });
    assert!(matches!(&reports(&out)[..], [(C2, _, Report::Lost(_))]), "{out:?}");
}

#[test]
fn scattering_a_key_again_adds_a_replica() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    h.handle(Event::Scattered { client: C1, keys: vec![(k("s"), vec![addr(1)], 100)] });
    // Another client's measure of the size differs; the accounting must stay consistent.
    let out = h.handle(Event::Scattered { client: C2, keys: vec![(k("s"), vec![addr(2)], 60)] });
    assert_eq!(reports(&out), vec![(C2, s("s"), memory(100, &[1, 2]))]);
    h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("s")] });
    let out = h.handle(Event::ReleaseKeys { client: C2, keys: vec![k("s")] });
    let mut f = frees(&out);
    f.sort();
    assert_eq!(f, vec![(1, s("s")), (2, s("s"))]);
    assert!(h.core.workers().all(|(_, _, keys, _, nbytes)| keys.is_empty() && nbytes == 0));
}

#[test]
fn a_missing_dependency_key_errs_as_invalid_graph() {
    let mut h = Harness::new();
    h.join(1, 1);
    let out = h.submit(C1, vec![task("b", &["nope"]), task("c", &["b"])], &["c"]);
    assert!(computes(&out).is_empty());
    let e = erred_with(&h.state("c"));
    assert_eq!(e.kind, "invalid-graph");
    assert_eq!(e.key, "b");
    assert!(e.message.contains("nope"), "{}", e.message);
    assert_eq!(reports(&out), vec![(C1, s("c"), Report::Erred(e))]);
    h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("c")] });
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn a_cycle_errs() {
    let mut h = Harness::new();
    h.join(1, 1);
    let out = h.submit(
        C1,
        vec![task("a", &["b"]), task("b", &["a"]), task("self", &["self"]), task("ok", &[])],
        &["a", "self", "ok"],
    );
    assert_eq!(computes(&out), vec![(1, s("ok"))], "the rest of the graph still runs");
    let e = erred_with(&h.state("a"));
    assert_eq!(e.kind, "invalid-graph");
    assert!(e.message.contains("cycle"), "{}", e.message);
    assert_eq!(erred_with(&h.state("self")).kind, "invalid-graph");
    let mut erred: Vec<String> =
        reports(&out).into_iter().filter(|(_, _, r)| matches!(r, Report::Erred(_))).map(|r| r.1).collect();
    erred.sort();
    assert_eq!(erred, vec![s("a"), s("self")]);
    h.handle(Event::ClientDisconnected { client: C1 });
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn a_task_invalid_for_two_reasons_errs_once() {
    let mut h = Harness::new();
    let out = h.submit(C1, vec![task("a", &["a", "nope"]), task("b", &["c"]), task("c", &["b", "nope"])], &["a", "b"]);
    assert_eq!(erred_with(&h.state("a")).kind, "invalid-graph");
    assert_eq!(erred_with(&h.state("b")).kind, "invalid-graph");
    assert_eq!(reports(&out).len(), 2, "{out:?}");
    h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("a"), k("b")] });
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn a_worker_with_a_taken_name_or_address_is_closed() {
    let mut h = Harness::new();
    h.join(1, 1);
    let mut same_name = spec(2, 1);
    same_name.name = Arc::from("w1");
    let out = h.handle(Event::WorkerJoined { worker: WorkerId(2), spec: same_name });
    assert!(matches!(&out[..], [Command::CloseWorker { worker: WorkerId(2), .. }]), "{out:?}");
    let mut same_addr = spec(3, 1);
    same_addr.address = addr(1);
    let out = h.handle(Event::WorkerJoined { worker: WorkerId(3), spec: same_addr });
    assert!(matches!(&out[..], [Command::CloseWorker { worker: WorkerId(3), .. }]), "{out:?}");
    assert_eq!(h.core.n_workers(), 1);
    assert!(h.core.worker_spec(WorkerId(2)).is_none());
}

#[test]
fn tick_removes_a_worker_silent_for_longer_than_the_ttl() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    h.submit(C1, vec![task("x", &[])], &["x"]);
    assert_eq!(h.runs_on("x"), 1);

    h.now += Duration::from_secs(200);
    h.handle(Event::Heartbeat { worker: WorkerId(2), memory: None });
    assert!(h.handle(Event::Tick).is_empty(), "nobody is late yet");

    h.now += Duration::from_secs(101);
    let out = h.handle(Event::Tick);
    assert!(matches!(&out[0], Command::CloseWorker { worker: WorkerId(1), .. }), "{out:?}");
    assert_eq!(computes(&out), vec![(2, s("x"))]);
    assert_eq!(h.core.n_workers(), 1);
    assert!(h.handle(Event::Tick).is_empty());
}

#[test]
fn a_stale_result_is_freed_on_the_worker_that_sent_it() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    h.submit(C1, vec![task("x", &[])], &["x"]);
    assert_eq!(h.runs_on("x"), 1);
    let out = h.finish(2, "x", 1);
    assert_eq!(out, vec![Command::Free { worker: WorkerId(2), key: k("x") }]);
    assert_eq!(h.state("x"), TaskState::Processing { worker: WorkerId(1) });

    // A result for a key the scheduler forgot.
    let out = h.finish(2, "gone", 1);
    assert_eq!(out, vec![Command::Free { worker: WorkerId(2), key: k("gone") }]);
    // A failure from the wrong worker changes nothing.
    assert!(h.fail(2, "x", error("late")).is_empty());
    assert_eq!(h.runs_on("x"), 1);
}

#[test]
fn missing_data_drops_the_replica_and_retries_with_fresh_locations() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    h.handle(Event::Scattered { client: C1, keys: vec![(k("s"), vec![addr(1), addr(2)], 100)] });
    h.submit(C1, vec![task("d", &["s"])], &["d"]);
    let wd = h.runs_on("d");
    let other = 3 - wd;
    let out =
        h.handle(Event::MissingData { worker: WorkerId(wd), key: k("d"), dependency: k("s"), from: vec![addr(other)] });
    assert_eq!(h.core.who_has("s"), vec![addr(wd)]);
    assert_eq!(frees(&out), vec![(wd, s("d"))]);
    assert_eq!(computes(&out), vec![(wd, s("d"))]);
    assert_eq!(compute_deps(&out, "d")[0].workers.to_vec(), vec![addr(wd)]);
}

#[test]
fn missing_data_of_the_last_replica_recomputes_it() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.join(2, 1);
    let mut x = task("x", &["a"]);
    x.workers = vec![Arc::from("w2")];
    h.submit(C1, vec![task("a", &[]), x], &["x"]);
    assert_eq!(h.runs_on("a"), 1);
    let out = h.finish(1, "a", 100);
    assert_eq!(computes(&out), vec![(2, s("x"))]);

    let out =
        h.handle(Event::MissingData { worker: WorkerId(2), key: k("x"), dependency: k("a"), from: vec![addr(1)] });
    assert_eq!(frees(&out), vec![(2, s("x"))]);
    assert_eq!(computes(&out).len(), 1, "{out:?}");
    assert_eq!(computes(&out)[0].1, "a");
    assert_eq!(h.state("x"), TaskState::Waiting { remaining: 1 });
    assert!(h.core.workers().all(|(_, _, keys, _, nbytes)| keys.is_empty() && nbytes == 0));
}

#[test]
fn want_of_an_unknown_key_reports_lost() {
    let mut h = Harness::new();
    let out = h.handle(Event::Want { client: C1, keys: vec![k("who")] });
    assert!(matches!(&reports(&out)[..], [(C1, _, Report::Lost(_))]), "{out:?}");
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn tasks_wait_for_a_worker_and_run_when_one_joins() {
    let mut h = Harness::new();
    let out = h.submit(C1, vec![task("x", &[]), task("y", &["x"])], &["y"]);
    assert!(out.is_empty());
    assert_eq!(h.state("x"), TaskState::NoWorker);
    let out = h.join(1, 1);
    assert_eq!(computes(&out), vec![(1, s("x"))]);
}

#[test]
fn key_prefix_follows_dask_key_split() {
    assert_eq!(key_prefix("inc-1c8d"), "inc");
    assert_eq!(key_prefix("('x-1-2', 0)"), "x");
    assert_eq!(key_prefix("plain"), "plain");
}

// ---------------------------------------------------------------------------- property test

/// splitmix64: the schedule's randomness, from one proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// One task of a random graph: its dependencies (earlier tasks), who wants it, retries.
#[derive(Clone, Debug)]
struct GenTask {
    deps: Vec<usize>,
    /// Bit 0: client 0 wants it, bit 1: client 1.
    wanted_by: u8,
    retries: u32,
}

/// Random DAGs of up to 149 tasks; in some, every task also uses task 0 (a shared input with
/// more dependents than `INDEX_OVER`, so its list is indexed).
fn dag() -> impl Strategy<Value = Vec<GenTask>> {
    (1usize..150, any::<bool>()).prop_flat_map(|(n, hub)| {
        proptest::collection::vec((proptest::collection::vec(any::<prop::sample::Index>(), 0..4), 0u8..7, 0u32..3), n)
            .prop_map(move |raw| {
                raw.into_iter()
                    .enumerate()
                    .map(|(i, (deps, want, retries))| {
                        let mut deps: Vec<usize> = match i {
                            0 => vec![],
                            _ if hub => deps.iter().map(|x| x.index(i)).chain([0]).collect(),
                            _ => deps.iter().map(|x| x.index(i)).collect(),
                        };
                        deps.sort_unstable();
                        deps.dedup();
                        // 0..=3: nobody; 4: client 0; 5: client 1; 6: both.
                        let wanted_by = match want {
                            4 => 1,
                            5 => 2,
                            6 => 3,
                            _ => 0,
                        };
                        GenTask { deps, wanted_by, retries: u32::from(retries == 2) }
                    })
                    .collect()
            })
    })
}

#[derive(Clone, Debug)]
struct Scenario {
    dag: Vec<GenTask>,
    threads: Vec<u32>,
    seed: u64,
    errors: bool,
    kills: bool,
    releases: bool,
    /// Small: workers dying under tasks may err them as killed-worker.
    allowed_failures: u32,
    /// Short: the slot limit opens up at once; long: one task per thread until measured.
    unknown_duration: Duration,
    /// Every fifth task needs a GPU.
    gpus: bool,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        dag(),
        proptest::collection::vec(1u32..=3, 1..=5),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(1u32), Just(1000)],
        prop_oneof![Just(Duration::from_micros(1)), Just(Duration::from_millis(500))],
        any::<bool>(),
    )
        .prop_map(|(dag, threads, seed, errors, kills, releases, allowed_failures, unknown_duration, gpus)| {
            Scenario { dag, threads, seed, errors, kills, releases, allowed_failures, unknown_duration, gpus }
        })
}

fn sim_key(i: usize) -> Key {
    let prefix = ["inc", "add", "sum"][i % 3];
    Arc::from(format!("{prefix}-{i}"))
}

fn sim_client(c: usize) -> ClientId {
    ClientId(c as u32 + 10)
}

/// A cluster that does what the scheduler says: workers run what they are sent until they
/// finish, fail, are told to Free it, or die.
struct Sim {
    h: Harness,
    /// Each task's state as the plugin feed told it: every transition must start where the
    /// last one ended, and end where the core has the task.
    fed: HashMap<Key, &'static str>,
    rng: Rng,
    keys: Vec<Key>,
    index: HashMap<Key, usize>,
    /// `(worker, key, deps)` sent and neither finished, cancelled nor lost, oldest first.
    in_flight: Vec<(WorkerId, Key, Vec<DepLocation>)>,
    /// Live workers and what each holds.
    alive: BTreeMap<WorkerId, HashSet<Key>>,
    next_worker: u32,
    wants: [HashSet<Key>; 2],
    /// Last report per (client, key).
    last_report: HashMap<(ClientId, Key), Report>,
    failures_injected: bool,
    kills_done: u32,
    /// Workers that said they are paused.
    paused: HashSet<WorkerId>,
    /// Copies workers were asked to fetch and keep (retirement), not done yet.
    replica_requests: Vec<(WorkerId, Vec<DepLocation>)>,
    /// Workers the scheduler closed (retired).
    closed: Vec<WorkerId>,
    next_op: u64,
    /// Answers to steal requests not yet delivered: (victim, key, id, stolen).
    steal_answers: Vec<(WorkerId, Key, u64, bool)>,
    /// Tasks a worker said it started (or refused to give up): never stolen.
    started: HashSet<(WorkerId, Key)>,
    joins: u32,
    /// Workers with GPUs added because tasks waited for one.
    rescues: u32,
}

impl Sim {
    fn new(sc: &Scenario) -> Self {
        let config = Config {
            allowed_failures: sc.allowed_failures,
            unknown_duration: sc.unknown_duration,
            ..Config::default()
        };
        let keys: Vec<Key> = (0..sc.dag.len()).map(sim_key).collect();
        let index = keys.iter().cloned().enumerate().map(|(i, k)| (k, i)).collect();
        let mut h = Harness::with_config(config);
        h.core.set_feed(true);
        let mut sim = Sim {
            h,
            fed: HashMap::new(),
            rng: Rng(sc.seed),
            keys,
            index,
            in_flight: Vec::new(),
            replica_requests: Vec::new(),
            steal_answers: Vec::new(),
            started: HashSet::new(),
            joins: 0,
            rescues: 0,
            closed: Vec::new(),
            next_op: 1,
            alive: BTreeMap::new(),
            next_worker: 0,
            wants: [HashSet::new(), HashSet::new()],
            last_report: HashMap::new(),
            failures_injected: false,
            kills_done: 0,
            paused: HashSet::new(),
        };
        for &n in &sc.threads {
            sim.add_worker(n);
        }
        sim
    }

    fn add_worker(&mut self, nthreads: u32) {
        let id = self.next_worker;
        self.next_worker += 1;
        self.alive.insert(WorkerId(id), HashSet::new());
        let mut spec = spec(id, nthreads);
        if id.is_multiple_of(2) {
            spec.resources = vec![(Arc::from("GPU"), 2.0)];
        }
        self.step(Event::WorkerJoined { worker: WorkerId(id), spec });
    }

    fn worker_of(&self, address: &str) -> Option<WorkerId> {
        self.alive.keys().copied().find(|w| *addr(w.0) == *address)
    }

    /// Submits the whole graph for `client`, wanting the keys `wanted` selects.
    fn submit(&mut self, sc: &Scenario, client: usize, wanted: impl Fn(usize, &GenTask) -> bool) {
        let tasks = sc
            .dag
            .iter()
            .enumerate()
            .map(|(i, t)| NewTask {
                key: self.keys[i].clone(),
                spec: Box::from(&b"spec"[..]),
                dependencies: t.deps.iter().map(|d| self.keys[*d].clone()).collect(),
                priority: 0,
                retries: t.retries,
                workers: vec![],
                allow_other_workers: false,
                // Some tasks need a GPU (even-numbered workers have two).
                resources: if sc.gpus && i % 5 == 0 { vec![(Arc::from("GPU"), 1.0)] } else { Vec::new() },
            })
            .collect();
        let wants: Vec<Key> =
            sc.dag.iter().enumerate().filter(|(i, t)| wanted(*i, t)).map(|(i, _)| self.keys[i].clone()).collect();
        self.wants[client].extend(wants.iter().cloned());
        // Graphs of one client within 100 ms share a generation (dask's fifo_timeout).
        let fifo_timeout = Duration::from_millis(100);
        self.step(Event::UpdateGraph { client: sim_client(client), tasks, wants, fifo_timeout });
    }

    /// One event in; the commands go to the simulated workers and clients.
    fn step(&mut self, event: Event) {
        for cmd in self.h.handle(event) {
            match cmd {
                Command::Compute { worker, key, deps, .. } => {
                    assert!(self.alive.contains_key(&worker), "Compute {key} to dead {worker}");
                    assert!(
                        !self.in_flight.iter().any(|(w, k, _)| *w == worker && *k == key),
                        "{key} sent twice to {worker}"
                    );
                    // Never two runs at once (a steal moves a task only once its victim let go).
                    assert!(
                        !self.in_flight.iter().any(|(_, k, _)| *k == key),
                        "{key} sent to {worker} while it runs elsewhere: {:?}",
                        self.h.core.story(&key)
                    );
                    self.started.remove(&(worker, key.clone()));
                    self.in_flight.push((worker, key, deps));
                }
                Command::Free { worker, key } => {
                    let w = self.alive.get_mut(&worker).unwrap_or_else(|| panic!("Free {key} to dead {worker}"));
                    w.remove(&key);
                    self.in_flight.retain(|(x, k, _)| !(*x == worker && *k == key));
                }
                Command::Report { client, key, report } => {
                    let c = (client.0 - 10) as usize;
                    assert!(
                        self.wants[c].contains(&key) || matches!(report, Report::Cancelled(_)),
                        "{client} told about {key} it does not want: {report:?}"
                    );
                    if let Report::Memory { workers, .. } = &report {
                        for a in workers {
                            let w = self.worker_of(a).unwrap_or_else(|| panic!("{key} reported on dead {a}"));
                            assert!(self.alive[&w].contains(&key), "{key} reported on {a}, which does not hold it");
                        }
                    }
                    if let Report::Cancelled(Some(_)) = &report {
                        // Restarted: the client's future is over.
                        self.wants[c].remove(&key);
                        self.last_report.remove(&(client, key));
                        continue;
                    }
                    self.last_report.insert((client, key), report);
                }
                Command::CloseWorker { worker, reason, .. } => {
                    assert!(reason.starts_with("retired"), "unexpected CloseWorker {worker}: {reason}");
                    // The scheduler runs nothing there any more (frees sent to it in the same
                    // event are dropped with it).
                    assert!(
                        self.h.core.workers().all(|(id, _, _, processing, _)| id != worker || processing == 0),
                        "{worker} closed while processing"
                    );
                    self.in_flight.retain(|(w, _, _)| *w != worker);
                    // Anything only it held was copied first (checked by `check_consistency`).
                    self.alive.remove(&worker);
                    self.paused.remove(&worker);
                    self.closed.push(worker);
                }
                Command::AcquireReplicas { worker, keys } => {
                    assert!(self.alive.contains_key(&worker), "copies to dead {worker}");
                    self.replica_requests.push((worker, keys));
                }
                Command::Steal { worker, key, id } => {
                    // The victim decides as it reads the request (in stream order with the
                    // other commands); its answer reaches the scheduler later.
                    assert!(self.alive.contains_key(&worker), "steal from dead {worker}");
                    let pos = self.in_flight.iter().position(|(w, k, _)| *w == worker && *k == key);
                    let stolen = pos.is_some() && !self.started.contains(&(worker, key.clone())) && self.rng.chance(50);
                    if stolen {
                        self.in_flight.remove(pos.expect("in flight"));
                    } else if pos.is_some() {
                        // It runs there now.
                        self.started.insert((worker, key.clone()));
                    }
                    self.steal_answers.push((worker, key, id, stolen));
                }
                Command::Feed(Feed::Transition { key, from, to }) => {
                    let was = self.fed.get(&key).copied().unwrap_or("released");
                    assert_eq!(was, from, "the feed moved {key} from {from}, but it was {was}");
                    if to == "forgotten" {
                        self.fed.remove(&key);
                    } else {
                        self.fed.insert(key, to);
                    }
                }
                Command::Feed(_) | Command::Notice { .. } | Command::Retired { .. } | Command::CopiesDone { .. } => {}
            }
        }
        for (key, fed) in &self.fed {
            let state = self.h.core.task_state(key).map(|s| s.name());
            assert_eq!(state, Some(*fed), "the feed left {key} {fed}");
        }
    }

    /// The worker finishes (or fails) the `i`th in-flight task.
    fn complete(&mut self, i: usize, sc: &Scenario) {
        let (worker, key, deps) = self.in_flight.remove(i);
        // The worker fetches the inputs from where the scheduler said they are.
        for d in &deps {
            // (A copy it was asked to keep for a retiring worker may be here already.)
            let found = self.alive[&worker].contains(&d.key)
                || d.workers.iter().any(|a| self.worker_of(a).is_some_and(|w| self.alive[&w].contains(&d.key)));
            if !found {
                // The holders named when the task was sent are gone, but a copy made meanwhile
                // (for a retiring worker) lives on: the worker reports the input missing, and
                // the task is placed again with fresh locations. Anything else is a bug.
                let elsewhere = self.h.core.who_has(&d.key);
                let copy_alive =
                    elsewhere.iter().any(|a| self.worker_of(a).is_some_and(|w| self.alive[&w].contains(&d.key)));
                assert!(
                    copy_alive,
                    "{key} on {worker}: input {} is nowhere of {:?}\nstory: {:?}\nalive: {:?}\nclosed: {:?}",
                    d.key,
                    d.workers,
                    self.h.core.story(&d.key).iter().map(|t| (t.from, t.to, t.cause)).collect::<Vec<_>>(),
                    self.alive,
                    self.closed
                );
                let from: Vec<Arc<str>> = d.workers.to_vec();
                self.step(Event::MissingData { worker, key, dependency: d.key.clone(), from });
                return;
            }
        }
        let expected: Vec<&Key> = sc.dag[self.index[&key]].deps.iter().map(|d| &self.keys[*d]).collect();
        let sent: Vec<&Key> = deps.iter().map(|d| &d.key).collect();
        assert_eq!(sent.len(), expected.len(), "{key}: deps sent");
        assert!(expected.iter().all(|e| sent.contains(e)), "{key}: deps {sent:?} != {expected:?}");

        let duration = Duration::from_micros(1 + self.rng.next() % 2_000_000);
        self.h.now += Duration::from_millis(1);
        if sc.errors && self.rng.chance(8) {
            self.failures_injected = true;
            self.step(Event::TaskFailed { worker, key, error: error("boom"), duration });
        } else {
            let nbytes = 1 + self.rng.next() % 1_000_000;
            self.alive.get_mut(&worker).expect("live worker").insert(key.clone());
            self.step(Event::TaskFinished { worker, key, nbytes, duration, value: None });
        }
    }

    /// A worker fetches the copies it was asked to keep (from holders still alive).
    fn complete_replicas(&mut self, i: usize) {
        let (worker, keys) = self.replica_requests.remove(i);
        if !self.alive.contains_key(&worker) {
            return;
        }
        let (mut added, mut failed) = (Vec::new(), Vec::new());
        for d in keys {
            let there = d.workers.iter().any(|a| self.worker_of(a).is_some_and(|w| self.alive[&w].contains(&d.key)));
            if there {
                self.alive.get_mut(&worker).expect("alive").insert(d.key.clone());
                added.push((d.key, d.nbytes));
            } else {
                failed.push(d.key);
            }
        }
        if !added.is_empty() {
            self.step(Event::ReplicasAdded { worker, keys: added });
        }
        if !failed.is_empty() {
            self.step(Event::ReplicasFailed { worker, keys: failed });
        }
    }

    fn kill_one(&mut self) {
        let ids: Vec<WorkerId> = self.alive.keys().copied().collect();
        let victim = ids[self.rng.below(ids.len())];
        self.alive.remove(&victim);
        self.paused.remove(&victim);
        self.in_flight.retain(|(w, _, _)| *w != victim);
        // Its answers not sent yet die with it.
        self.steal_answers.retain(|(w, ..)| *w != victim);
        self.kills_done += 1;
        self.step(Event::WorkerLost { worker: victim, reason: "killed by the simulation".into(), expected: false });
        let nthreads = 1 + self.rng.below(3) as u32;
        self.add_worker(nthreads);
    }

    fn release_one(&mut self) {
        let c = self.rng.below(2);
        if self.wants[c].is_empty() {
            return;
        }
        let mut keys: Vec<Key> = self.wants[c].iter().cloned().collect();
        keys.sort();
        let key = keys[self.rng.below(keys.len())].clone();
        self.wants[c].remove(&key);
        self.last_report.remove(&(sim_client(c), key.clone()));
        self.step(Event::ReleaseKeys { client: sim_client(c), keys: vec![key] });
    }

    /// Checks that hold between any two events.
    fn check_consistency(&self) {
        // What the scheduler thinks a worker holds, the worker holds.
        for (id, _, keys, _, _) in self.h.core.workers() {
            let held = self.alive.get(&id).unwrap_or_else(|| panic!("scheduler knows dead {id}"));
            for key in keys {
                assert!(held.contains(&key), "scheduler thinks {id} holds {key}");
            }
        }
        // Every task the scheduler has processing is in flight on that worker (or that worker
        // gave it up to a steal and its answer is on the way).
        for (i, key) in self.keys.iter().enumerate() {
            if let Some(TaskState::Processing { worker }) = self.h.core.task_state(key) {
                assert!(
                    self.in_flight.iter().any(|(w, k, _)| w == worker && k == key)
                        || self.steal_answers.iter().any(|(w, k, _, stolen)| w == worker && k == key && *stolen),
                    "{key} (#{i}) processing on {worker} but not in flight there"
                );
            }
        }
    }
}

fn run_scenario(sc: Scenario) {
    let mut sim = Sim::new(&sc);
    // Client 0 submits at once; client 1 joins in later.
    sim.submit(&sc, 0, |_, t| t.wanted_by & 1 != 0);
    let mut client1_submitted = false;
    let mut steps = 0;
    loop {
        sim.check_consistency();
        steps += 1;
        assert!(steps < 100_000, "the schedule does not end");
        let roll = sim.rng.below(100);
        if !client1_submitted && (roll < 5 || sim.in_flight.is_empty()) {
            client1_submitted = true;
            sim.submit(&sc, 1, |_, t| t.wanted_by & 2 != 0);
        } else if sc.kills && roll < 8 && sim.kills_done < 8 {
            sim.kill_one();
        } else if sc.releases && roll < 12 {
            sim.release_one();
        } else if sc.releases && roll < 14 {
            // A client asks again for one key of the graph (resubmitting it, as a client would).
            let c = sim.rng.below(2);
            let target = sim.rng.below(sc.dag.len());
            sim.submit(&sc, c, |i, _| i == target);
        } else if sc.errors && roll == 20 {
            // A client retries a key (it may have failed, or not).
            let c = sim.rng.below(2);
            let key = sim.keys[sim.rng.below(sim.keys.len())].clone();
            sim.step(Event::Retry { client: sim_client(c), keys: vec![key] });
        } else if roll == 21 && !sim.in_flight.is_empty() {
            // A running task secedes (it waits on subtasks): its slot takes more work. It is
            // marked started too: a worker never gives up a task that runs.
            let (w, key, _) = sim.in_flight[sim.rng.below(sim.in_flight.len())].clone();
            sim.started.insert((w, key.clone()));
            sim.step(Event::TasksStarted { worker: w, keys: vec![key.clone()], ack: false });
            sim.step(Event::TasksSeceded { worker: w, keys: vec![key] });
        } else if sc.kills && roll == 22 && sim.kills_done < 8 {
            // Client.restart: everything is forgotten and every worker replaced.
            sim.kills_done += 1;
            sim.step(Event::Restart { reason: "test restart".into() });
            assert_eq!(sim.h.core.n_tasks(), 0);
            assert!(sim.in_flight.is_empty(), "every computation was freed");
            assert!(sim.wants.iter().all(|w| w.is_empty()), "every client heard");
            let old: Vec<WorkerId> = sim.alive.keys().copied().collect();
            for w in old {
                sim.alive.remove(&w);
                sim.paused.remove(&w);
                sim.step(Event::WorkerLost { worker: w, reason: "restarted".into(), expected: true });
                sim.add_worker(2);
            }
            // The clients submit their graphs again.
            sim.submit(&sc, 0, |_, t| t.wanted_by & 1 != 0);
        } else if sc.kills && roll == 23 && sim.kills_done < 8 {
            // Client.retire_workers of one worker; a fresh one joins.
            sim.kills_done += 1;
            let ids: Vec<WorkerId> = sim.alive.keys().copied().collect();
            let w = ids[sim.rng.below(ids.len())];
            let op = sim.next_op;
            sim.next_op += 1;
            sim.add_worker(2);
            sim.step(Event::RetireWorkers { op, workers: vec![w], close: true, restart: false, reason: "sim".into() });
        } else if sc.releases && (roll == 24 || roll == 25) {
            // Client.replicate of a few keys (to 2 workers, or all), or Client.rebalance.
            let op = sim.next_op;
            sim.next_op += 1;
            let keys: Vec<Key> = (0..3).map(|_| sim.keys[sim.rng.below(sim.keys.len())].clone()).collect();
            if roll == 24 {
                let n = if sim.rng.chance(50) { Some(2) } else { None };
                sim.step(Event::Replicate { op, keys, n, workers: vec![] });
            } else {
                sim.step(Event::Rebalance { op, keys: vec![], workers: vec![] });
            }
        } else if !sim.replica_requests.is_empty() && (roll < 30 || sim.in_flight.is_empty()) {
            let i = sim.rng.below(sim.replica_requests.len());
            sim.complete_replicas(i);
        } else if roll < 22 {
            // A worker pauses (memory) or resumes.
            let ids: Vec<WorkerId> = sim.alive.keys().copied().collect();
            let w = ids[sim.rng.below(ids.len())];
            let pause = !sim.paused.contains(&w);
            if pause {
                sim.paused.insert(w);
            } else {
                sim.paused.remove(&w);
            }
            sim.step(paused(w.0, pause));
        } else if roll < 25 && !sim.in_flight.is_empty() {
            // A worker reports that a task started running there.
            let (worker, key, _) = sim.in_flight[sim.rng.below(sim.in_flight.len())].clone();
            sim.started.insert((worker, key.clone()));
            sim.step(Event::TasksStarted { worker, keys: vec![key], ack: false });
        } else if !sim.steal_answers.is_empty() && (roll < 40 || sim.in_flight.is_empty()) {
            // A victim's answer to a steal arrives.
            let (worker, key, id, stolen) = sim.steal_answers.remove(sim.rng.below(sim.steal_answers.len()));
            sim.step(Event::StealResponse { worker, key, id, stolen });
        } else if roll < 42 && sim.joins < 4 {
            // A worker joins mid-graph: it should take over queued work.
            sim.joins += 1;
            let nthreads = 1 + sim.rng.below(3) as u32;
            sim.add_worker(nthreads);
        } else if roll < 44 {
            // A tick: idle workers look for work.
            sim.step(Event::Tick);
        } else if sim.in_flight.is_empty() && !sim.paused.is_empty() {
            // Nothing runs: the paused workers resume (memory freed by finished tasks).
            for w in std::mem::take(&mut sim.paused) {
                sim.step(paused(w.0, false));
            }
        } else if sim.in_flight.is_empty() && sim.h.core.n_no_worker() > 0 && sim.rescues < 10 {
            // Tasks wait for a GPU and every GPU worker is gone: one with GPUs joins.
            sim.rescues += 1;
            if !sim.next_worker.is_multiple_of(2) {
                sim.next_worker += 1;
            }
            sim.add_worker(1);
        } else if sim.in_flight.is_empty() {
            break;
        } else {
            let i = sim.rng.below(sim.in_flight.len());
            sim.complete(i, &sc);
        }
    }
    sim.check_consistency();

    // Everything settled: nothing is on its way anywhere.
    for key in &sim.keys {
        if let Some(state) = sim.h.core.task_state(key) {
            assert!(
                matches!(state, TaskState::Memory { .. } | TaskState::Erred { .. } | TaskState::Released),
                "{key} stuck in {}: {:?}\nworkers: {:?}",
                state.name(),
                sim.h.core.story(key),
                sim.h.core.workers().map(|(id, s, _, p, _)| (id, s.nthreads, p)).collect::<Vec<_>>()
            );
        }
    }
    for (c, wants) in sim.wants.iter().enumerate() {
        let client = sim_client(c);
        for key in wants {
            let report = sim.last_report.get(&(client, key.clone()));
            let state = sim.h.core.task_state(key).unwrap_or_else(|| panic!("wanted {key} forgotten"));
            match (state, report) {
                (TaskState::Memory { nbytes, .. }, Some(Report::Memory { nbytes: n, .. })) => {
                    assert_eq!(nbytes, n)
                }
                (TaskState::Erred { error }, Some(Report::Erred(e))) => {
                    assert!(Arc::ptr_eq(error, e));
                    assert!(
                        sim.failures_injected || error.kind == "killed-worker",
                        "{key} erred with no failure injected: {error:?}"
                    );
                }
                (s, r) => panic!("{client} wants {key} ({}), last report {r:?}: {:?}", s.name(), sim.h.core.story(key)),
            }
            if !sim.failures_injected && sc.allowed_failures > 8 {
                assert!(matches!(state, TaskState::Memory { .. }), "{key} is {}", state.name());
            }
        }
    }

    // Both clients let go (one key by key, one by leaving): the scheduler forgets everything
    // and the workers hold nothing.
    let mut keys: Vec<Key> = sim.wants[0].drain().collect();
    keys.sort();
    sim.step(Event::ReleaseKeys { client: sim_client(0), keys });
    sim.wants[1].clear();
    sim.step(Event::ClientDisconnected { client: sim_client(1) });
    assert!(sim.in_flight.is_empty());
    assert_eq!(sim.h.core.n_tasks(), 0);
    for (w, held) in &sim.alive {
        assert!(held.is_empty(), "{w} still holds {held:?}");
    }
    assert!(
        sim.h.core.workers().all(|(_, _, keys, processing, nbytes)| keys.is_empty() && processing == 0 && nbytes == 0)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_graphs_on_a_faulty_cluster_settle(sc in scenario()) {
        run_scenario(sc);
    }
}

#[test]
fn hot_structs_stay_small() {
    // Memory per held task is a target (docs/benchmarks.md); these dominate it.
    let task = std::mem::size_of::<Option<super::Task>>();
    assert!(task <= 160, "Option<Task> grew to {task} bytes");
    assert!(std::mem::size_of::<super::LogEntry>() <= 24);
}

#[test]
fn forgetting_many_dependents_of_one_task_unlinks_them_all() {
    // Enough dependents for the root to index them, released in bulk, one by one, and until
    // the list is short again (validate() checks the index after every event).
    let n = 4 * INDEX_OVER;
    let mut h = Harness::new();
    h.join(1, 2);
    let names: Vec<String> = (0..n).map(|i| format!("use-{i}")).collect();
    let mut tasks = vec![task("root", &[])];
    tasks.extend(names.iter().map(|name| task(name, &["root"])));
    let wants: Vec<&str> = names.iter().map(String::as_str).collect();
    h.submit(C1, tasks, &wants);
    h.finish(1, "root", 8);
    assert_eq!(h.core.n_tasks(), n + 1);

    // Half in one event, then one per event, then the rest: validate() runs after each.
    let (half, rest) = names.split_at(n / 2);
    h.handle(Event::ReleaseKeys { client: C1, keys: half.iter().map(|k| Arc::from(k.as_str())).collect() });
    assert_eq!(h.core.n_tasks(), n / 2 + 1);
    let (single, rest) = rest.split_at(INDEX_OVER + INDEX_OVER / 2);
    for name in single {
        h.handle(Event::ReleaseKeys { client: C1, keys: vec![k(name)] });
    }
    assert_eq!(h.core.n_tasks(), rest.len() + 1);
    assert!(matches!(h.state("root"), TaskState::Memory { .. }), "still needed by the rest");
    let out = h.handle(Event::ReleaseKeys { client: C1, keys: rest.iter().map(|k| Arc::from(k.as_str())).collect() });
    // The last dependent gone, the root goes too, and its worker is told to drop it.
    assert!(frees(&out).contains(&(1, s("root"))), "{out:?}");
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn a_shrunk_list_that_grows_again_keeps_its_index_exact() {
    // Past the threshold (indexed), down into 33..=64 (index kept), then a new dependent:
    // it must be indexed too, or forgetting it later would leave a dead id in the list.
    let mut h = Harness::new();
    h.join(1, 2);
    let names: Vec<String> = (0..=INDEX_OVER).map(|i| format!("use-{i}")).collect();
    let mut tasks = vec![task("root", &[])];
    tasks.extend(names.iter().map(|name| task(name, &["root"])));
    let wants: Vec<&str> = names.iter().map(String::as_str).collect();
    h.submit(C1, tasks, &wants);
    h.finish(1, "root", 8);
    let (gone, kept) = names.split_at(15);
    h.handle(Event::ReleaseKeys { client: C1, keys: gone.iter().map(|k| Arc::from(k.as_str())).collect() });
    h.submit(C1, vec![task("late", &["root"])], &["late"]);
    h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("late")] });
    let out = h.handle(Event::ReleaseKeys { client: C1, keys: kept.iter().map(|k| Arc::from(k.as_str())).collect() });
    assert!(frees(&out).contains(&(1, s("root"))), "{out:?}");
    assert_eq!(h.core.n_tasks(), 0);
}

#[test]
fn a_graph_runs_depth_first_towards_its_outputs() {
    // Leaves submitted first, their reducers' inputs interleaved: a, b, c, d; r1(a, c),
    // r2(b, d), root(r1, r2). One thread: each subtree is finished before the next begins.
    let mut h = Harness::new();
    h.join(0, 1);
    let out = h.submit(
        C1,
        vec![
            task("a", &[]),
            task("b", &[]),
            task("c", &[]),
            task("d", &[]),
            task("r1", &["a", "c"]),
            task("r2", &["b", "d"]),
            task("root", &["r1", "r2"]),
        ],
        &["root"],
    );
    let mut ran = vec![computes(&out)[0].1.clone()];
    while let Some(key) = ran.last().cloned() {
        let out = h.finish(0, &key, 8);
        match computes(&out).first() {
            Some((_, next)) => ran.push(next.clone()),
            None => break,
        }
    }
    assert_eq!(ran, ["a", "c", "r1", "b", "d", "r2", "root"]);
}

#[test]
fn graphs_sent_within_fifo_timeout_share_a_generation_and_later_ones_wait() {
    let mut h = Harness::new();
    h.join(0, 1);
    let graph = |h: &mut Harness, client: ClientId, keys: &[&str]| {
        let tasks = keys.iter().map(|k| task(k, &[])).collect();
        let wants = keys.iter().map(|x| k(x)).collect();
        h.handle(Event::UpdateGraph { client, tasks, wants, fifo_timeout: Duration::from_millis(100) })
    };
    let t0 = h.now;
    graph(&mut h, C1, &["x1", "x2"]);
    h.now = t0 + Duration::from_millis(10);
    graph(&mut h, C2, &["c1"]);
    // Within C1's generation (first in, first out there): before C2's task.
    h.now = t0 + Duration::from_millis(50);
    graph(&mut h, C1, &["x3"]);
    // Past it: a new generation, after C2's.
    h.now = t0 + Duration::from_millis(150);
    graph(&mut h, C1, &["x4"]);
    let mut ran = vec!["x1".to_string()];
    for _ in 0..4 {
        let out = h.finish(0, ran.last().unwrap(), 8);
        ran.push(computes(&out)[0].1.clone());
    }
    assert_eq!(ran, ["x1", "x2", "x3", "c1", "x4"]);
}

#[test]
fn a_seceded_task_gives_its_slot_to_the_next_one() {
    let mut h = Harness::new();
    h.join(1, 1);
    // Known to be slow: one per thread.
    h.submit(C1, vec![task("slow-0", &[])], &["slow-0"]);
    h.finish_in(1, "slow-0", 1, Duration::from_secs(5));
    let out = h.submit(C1, vec![task("slow-parent", &[])], &["slow-parent"]);
    assert_eq!(computes(&out), vec![(1, s("slow-parent"))]);
    // The parent submits a child: the only slot is taken.
    let out = h.submit(C1, vec![task("slow-child", &[])], &["slow-child"]);
    assert!(computes(&out).is_empty(), "{out:?}");
    // The parent secedes to wait for it: the slot goes to the child.
    let out = h.handle(Event::TasksSeceded { worker: WorkerId(1), keys: vec![k("slow-parent")] });
    assert_eq!(computes(&out), vec![(1, s("slow-child"))]);
    // Seceding again, or for a task not running there, changes nothing.
    let out = h.handle(Event::TasksSeceded { worker: WorkerId(1), keys: vec![k("slow-parent"), k("nope")] });
    assert!(out.is_empty(), "{out:?}");
    h.finish(1, "slow-child", 1);
    h.finish(1, "slow-parent", 1);
    assert_eq!(h.state("slow-parent").name(), "memory");
}

#[test]
fn adaptive_target_asks_for_workers_by_queued_work_and_frees_idle_ones() {
    let mut h = Harness::new();
    let five = Duration::from_secs(5);
    // No workers, work waiting: at least one.
    h.submit(C1, vec![task("slow-0", &[])], &["slow-0"]);
    assert_eq!(h.core.adaptive_target(five).target, 1);
    h.join(1, 1);
    h.finish_in(1, "slow-0", 1, Duration::from_secs(1));
    // Twenty tasks of a second each on one thread: 20 s of work, 5 s wanted: 4 workers.
    let keys: Vec<String> = (1..=20).map(|i| format!("slow-{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(|x| x.as_str()).collect();
    h.submit(C1, refs.iter().map(|x| task(x, &[])).collect(), &refs);
    assert_eq!(h.core.adaptive_target(five), AdaptiveTarget { target: 4, to_close: vec![] });
    // Three more workers of one thread; all done: one is enough, the idle others may go, the
    // emptiest first; the last one stays.
    for i in 2..=4 {
        h.join(i, 1);
    }
    for (n, k) in keys.iter().enumerate() {
        let w = h.runs_on(k);
        h.finish_in(w, k, 10 * (n as u64 + 1), Duration::from_secs(1));
    }
    let t = h.core.adaptive_target(five);
    assert_eq!(t.target, 1, "the last one keeps the values: {t:?}");
    assert_eq!(t.to_close.len(), 3);
    // Bounds: at least 2 (two of the idle ones go).
    assert_eq!(h.core.adaptive_target_within(five, 2, 10).to_close.len(), 2);
    let mut e = Harness::new();
    for i in 1..=3 {
        e.join(i, 1);
    }
    let t = e.core.adaptive_target_within(five, 1, 1);
    assert_eq!((t.target, t.to_close.len()), (1, 2), "kept at one: {t:?}");
    let t = e.core.adaptive_target(five);
    assert_eq!((t.target, t.to_close.len()), (0, 3), "idle and empty: all may go");
    // Few tasks do not ask for more workers than tasks, however long they are.
    let out = h.submit(C1, vec![task("slow-long", &[])], &["slow-long"]);
    let w = computes(&out)[0].0;
    h.finish_in(w, "slow-long", 1, Duration::from_secs(3600));
    h.submit(C1, vec![task("slow-x", &[])], &["slow-x"]);
    assert!(h.core.adaptive_target(five).target <= 4);
}

#[test]
fn retry_runs_the_failed_chain_again() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.submit(C1, vec![task("a", &[]), task("b", &["a"]), task("c", &["b"])], &["c"]);
    h.handle(Event::Want { client: C2, keys: vec![k("b")] });
    h.fail(1, "a", error("flaky"));
    assert_eq!(h.state("c").name(), "erred");
    // Retrying c runs a again; b and c wait for it.
    let out = h.handle(Event::Retry { client: C1, keys: vec![k("c"), k("unknown")] });
    assert_eq!(computes(&out), vec![(1, s("a"))]);
    assert_eq!(h.state("b").name(), "waiting");
    h.finish(1, "a", 1);
    h.finish(1, "b", 1);
    let out = h.finish(1, "c", 1);
    assert_eq!(reports(&out), vec![(C1, s("c"), memory(1, &[1]))]);
    // A key that did not fail is left alone.
    assert!(h.handle(Event::Retry { client: C1, keys: vec![k("c")] }).is_empty());
}

#[test]
fn a_task_that_asks_to_be_rescheduled_is_placed_again_not_failed() {
    let mut h = Harness::new();
    h.join(1, 1);
    h.submit(C1, vec![task("x", &[])], &["x"]);
    let mut e = error("asked");
    e.kind = dask_protocol::task::RESCHEDULE.into();
    let out = h.fail(1, "x", e);
    assert_eq!(computes(&out), vec![(1, s("x"))]);
    assert!(reports(&out).is_empty(), "the client hears nothing: {out:?}");
    let out = h.finish(1, "x", 1);
    assert_eq!(reports(&out), vec![(C1, s("x"), memory(1, &[1]))]);
}
