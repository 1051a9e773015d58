use super::*;

fn key(s: &str) -> Key {
    Arc::from(s)
}

fn compute(k: &str, deps: &[(&str, &[&str])]) -> Event {
    Event::Compute(ComputeRequest {
        key: key(k),
        spec: Bytes::from_static(b"spec"),
        deps: deps.iter().map(|(d, w)| (key(d), w.iter().map(|a| Arc::from(*a)).collect())).collect(),
        priority: 0,
    })
}

fn step(s: &mut WorkerState, e: Event) -> Vec<Instruction> {
    let mut out = Vec::new();
    s.handle(e, &mut out);
    s.validate();
    out
}

fn ok(k: &str) -> Event {
    Event::ExecDone {
        key: key(k),
        outcome: ExecOutcome::Ok { nbytes: 8, type_name: String::new() },
        duration: Duration::from_micros(5),
    }
}

#[test]
fn runs_no_more_than_nthreads_and_reports() {
    let mut s = WorkerState::new(1);
    let out = step(&mut s, compute("a", &[]));
    assert_eq!(out, vec![Instruction::Execute { key: key("a"), spec: Bytes::from_static(b"spec") }]);
    let out = step(&mut s, compute("b", &[]));
    assert!(out.is_empty(), "one thread: b waits");
    let out = step(&mut s, ok("a"));
    assert!(matches!(&out[0], Instruction::Send(pb::worker_event::Kind::Finished(f)) if f.key == "a" && f.nbytes == 8));
    assert!(matches!(&out[1], Instruction::Execute { key, .. } if &**key == "b"));
}

#[test]
fn fetches_dependencies_then_runs_then_drops_copies() {
    let mut s = WorkerState::new(2);
    let out = step(&mut s, compute("c", &[("a", &["tcp://p:1"]), ("b", &["tcp://p:1"])]));
    assert_eq!(out, vec![Instruction::Fetch { from: Arc::from("tcp://p:1"), keys: vec![key("a"), key("b")] }]);
    let out = step(
        &mut s,
        Event::FetchDone { from: Arc::from("tcp://p:1"), got: vec![(key("a"), 1), (key("b"), 1)], missing: vec![] },
    );
    assert!(matches!(&out[..], [Instruction::Execute { key, .. }] if &**key == "c"));
    let out = step(&mut s, ok("c"));
    assert!(out.contains(&Instruction::Drop(key("a"))) && out.contains(&Instruction::Drop(key("b"))));
    // Our own result stays until the scheduler frees it.
    assert!(!out.contains(&Instruction::Drop(key("c"))));
    let out = step(&mut s, Event::Free(key("c")));
    assert_eq!(out, vec![Instruction::Drop(key("c"))]);
}

#[test]
fn missing_dependency_tries_next_peer_then_tells_scheduler() {
    let mut s = WorkerState::new(1);
    step(&mut s, compute("c", &[("a", &["tcp://p:1", "tcp://q:2"])]));
    let out = step(&mut s, Event::FetchDone { from: Arc::from("tcp://p:1"), got: vec![], missing: vec![key("a")] });
    assert_eq!(out, vec![Instruction::Fetch { from: Arc::from("tcp://q:2"), keys: vec![key("a")] }]);
    let out = step(&mut s, Event::FetchDone { from: Arc::from("tcp://q:2"), got: vec![], missing: vec![key("a")] });
    assert!(
        matches!(&out[0], Instruction::Send(pb::worker_event::Kind::Missing(m)) if m.key == "c" && m.dependency == "a")
    );
    assert_eq!(s.n_compute(), 0);
}

#[test]
fn free_cancels_queued_and_drops_result_of_running() {
    let mut s = WorkerState::new(1);
    step(&mut s, compute("a", &[]));
    step(&mut s, compute("b", &[]));
    assert!(step(&mut s, Event::Free(key("b"))).is_empty());
    step(&mut s, Event::Free(key("a")));
    let out = step(&mut s, ok("a"));
    assert_eq!(out, vec![Instruction::Drop(key("a"))], "a cancelled result is dropped, not reported");
    assert_eq!(s.n_compute(), 0);
}

#[test]
fn compute_of_a_key_already_here_reports_at_once() {
    let mut s = WorkerState::new(1);
    step(&mut s, Event::Put { keys: vec![(key("x"), 3)] });
    let out = step(&mut s, compute("x", &[]));
    assert!(matches!(&out[..], [Instruction::Send(pb::worker_event::Kind::Finished(f))] if f.nbytes == 3));
}
