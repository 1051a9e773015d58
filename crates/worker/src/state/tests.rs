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
        inline: false,
        announce: false,
        resources: Vec::new(),
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
fn dispatches_and_reports() {
    let mut s = WorkerState::new(1);
    let out = step(&mut s, compute("a", &[]));
    assert_eq!(
        out,
        vec![Instruction::Execute {
            key: key("a"),
            spec: Bytes::from_static(b"spec"),
            priority: 0,
            order: 0,
            announce: false
        }]
    );
    let out = step(&mut s, ok("a"));
    assert!(matches!(&out[0], Instruction::Send(pb::worker_event::Kind::Finished(f)) if f.key == "a" && f.nbytes == 8));
}

#[test]
fn fetches_dependencies_then_runs_then_drops_copies() {
    let mut s = WorkerState::new(2);
    let out = step(&mut s, compute("c", &[("a", &["tcp://p:1"]), ("b", &["tcp://p:1"])]));
    assert_eq!(out, vec![Instruction::Fetch { from: Arc::from("tcp://p:1"), keys: vec![key("a"), key("b")] }]);
    let out = step(
        &mut s,
        Event::FetchDone {
            from: Arc::from("tcp://p:1"),
            got: vec![(key("a"), 1), (key("b"), 1)],
            missing: vec![],
            span: (0.0, 0.0),
        },
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
    let out = step(
        &mut s,
        Event::FetchDone { from: Arc::from("tcp://p:1"), got: vec![], missing: vec![key("a")], span: (0.0, 0.0) },
    );
    assert_eq!(out, vec![Instruction::Fetch { from: Arc::from("tcp://q:2"), keys: vec![key("a")] }]);
    let out = step(
        &mut s,
        Event::FetchDone { from: Arc::from("tcp://q:2"), got: vec![], missing: vec![key("a")], span: (0.0, 0.0) },
    );
    assert!(
        matches!(&out[0], Instruction::Send(pb::worker_event::Kind::Missing(m)) if m.key == "c" && m.dependency == "a")
    );
    assert_eq!(s.n_compute(), 0);
}

#[test]
fn dispatch_is_bounded_and_refilled() {
    let mut s = WorkerState::new(1);
    let mut dispatched = 0;
    for i in 0..100 {
        dispatched += step(&mut s, compute(&format!("t{i}"), &[])).len();
    }
    assert_eq!(dispatched, 64, "at most 64 per thread handed to the executor");
    let out = step(&mut s, ok("t0"));
    assert!(matches!(&out[1], Instruction::Execute { key, .. } if &**key == "t64"), "{out:?}");
}

#[test]
fn free_cancels_waiting_and_dispatched_tasks() {
    let mut s = WorkerState::new(1);
    step(&mut s, compute("a", &[]));
    step(&mut s, compute("w", &[("x", &["tcp://p:1"])]));
    assert!(step(&mut s, Event::Free(key("w"))).contains(&Instruction::Drop(key("x"))) || s.n_compute() == 1);
    let out = step(&mut s, Event::Free(key("a")));
    assert_eq!(out, vec![Instruction::Cancel(key("a"))]);
    // Started already: its result is dropped, not reported.
    let out = step(&mut s, ok("a"));
    assert_eq!(out, vec![Instruction::Drop(key("a"))]);
    assert_eq!(s.n_compute(), 0);
    // Or skipped before it started: nothing to drop.
    step(&mut s, compute("b", &[]));
    step(&mut s, Event::Free(key("b")));
    let out = step(&mut s, Event::ExecDone { key: key("b"), outcome: ExecOutcome::Skipped, duration: Duration::ZERO });
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(s.executing(), 0);
}

#[test]
fn compute_of_a_key_already_here_reports_at_once() {
    let mut s = WorkerState::new(1);
    step(&mut s, Event::Put { keys: vec![(key("x"), 3)] });
    let out = step(&mut s, compute("x", &[]));
    assert!(matches!(&out[..], [Instruction::Send(pb::worker_event::Kind::Finished(f))] if f.nbytes == 3));
}

#[test]
fn freed_then_asked_again_while_running_reports_after_all() {
    let mut s = WorkerState::new(1);
    step(&mut s, compute("k", &[]));
    assert_eq!(step(&mut s, Event::Free(key("k"))), vec![Instruction::Cancel(key("k"))]);
    assert!(step(&mut s, compute("k", &[])).is_empty());
    // It was running: the result counts.
    let out = step(&mut s, ok("k"));
    assert!(matches!(&out[..], [Instruction::Send(pb::worker_event::Kind::Finished(f))] if f.key == "k"), "{out:?}");
    // It had not started: skipped, then run again.
    step(&mut s, compute("j", &[]));
    step(&mut s, Event::Free(key("j")));
    step(&mut s, compute("j", &[]));
    let out = step(&mut s, Event::ExecDone { key: key("j"), outcome: ExecOutcome::Skipped, duration: Duration::ZERO });
    assert!(matches!(&out[..], [Instruction::Execute { key, .. }] if &**key == "j"), "{out:?}");
}

#[test]
fn a_value_put_while_being_fetched_counts_as_arrived() {
    let mut s = WorkerState::new(1);
    step(&mut s, compute("c", &[("x", &["tcp://p:1"])]));
    let out = step(&mut s, Event::Put { keys: vec![(key("x"), 4)] });
    assert!(matches!(&out[..], [Instruction::Execute { key, .. }] if &**key == "c"), "{out:?}");
    // The fetch ending later changes nothing.
    let out = step(
        &mut s,
        Event::FetchDone { from: Arc::from("tcp://p:1"), got: vec![(key("x"), 4)], missing: vec![], span: (0.0, 0.0) },
    );
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn missing_data_names_every_holder_tried() {
    let mut s = WorkerState::new(1);
    step(&mut s, compute("c", &[("a", &["tcp://p:1", "tcp://q:2"])]));
    step(
        &mut s,
        Event::FetchDone { from: Arc::from("tcp://p:1"), got: vec![], missing: vec![key("a")], span: (0.0, 0.0) },
    );
    let out = step(
        &mut s,
        Event::FetchDone { from: Arc::from("tcp://q:2"), got: vec![], missing: vec![key("a")], span: (0.0, 0.0) },
    );
    assert!(
        matches!(&out[0], Instruction::Send(pb::worker_event::Kind::Missing(m)) if m.workers == ["tcp://p:1", "tcp://q:2"]),
        "{out:?}"
    );
}

#[test]
fn started_reports_only_tasks_still_running() {
    let mut w = WorkerState::new(2);
    let mut out = Vec::new();
    w.handle(compute("a", &[]), &mut out);
    w.handle(compute("b", &[]), &mut out);
    w.validate();
    out.clear();
    // `a` finished before the batch went out; `b` still runs; `zzz` is unknown.
    w.handle(ok("a"), &mut out);
    out.clear();
    w.handle(Event::Started(vec![key("a"), key("b"), key("zzz")]), &mut out);
    w.validate();
    assert_eq!(
        out,
        vec![Instruction::Send(pb::worker_event::Kind::Started(pb::TasksStarted {
            keys: vec!["b".into()],
            ack: false
        }))]
    );
    // Nothing running: nothing to say.
    out.clear();
    w.handle(Event::Started(vec![key("a")]), &mut out);
    assert!(out.is_empty());
}

#[test]
fn a_paused_worker_fetches_nothing_until_it_resumes() {
    let mut w = WorkerState::new(1);
    let mut out = Vec::new();
    w.handle(Event::Paused(true), &mut out);
    w.handle(compute("t", &[("d", &["tcp://peer:1"])]), &mut out);
    w.validate();
    assert!(!out.iter().any(|i| matches!(i, Instruction::Fetch { .. })), "no fetch while paused: {out:?}");
    out.clear();
    w.handle(Event::Paused(false), &mut out);
    w.validate();
    assert!(
        matches!(&out[..], [Instruction::Fetch { from, keys }] if &**from == "tcp://peer:1" && keys.len() == 1),
        "{out:?}"
    );
}

#[test]
fn copies_asked_for_are_fetched_kept_and_reported() {
    let mut w = WorkerState::new(1);
    let mut out = Vec::new();
    // One value is here already (fetched for a task), one must be fetched, one is nowhere.
    w.handle(compute("t", &[("here", &["tcp://a:1"])]), &mut out);
    w.handle(
        Event::FetchDone {
            from: Arc::from("tcp://a:1"),
            got: vec![(key("here"), 3)],
            missing: vec![],
            span: (0.0, 0.0),
        },
        &mut out,
    );
    out.clear();
    w.handle(
        Event::Acquire(vec![
            (key("here"), vec![Arc::from("tcp://a:1")]),
            (key("far"), vec![Arc::from("tcp://b:1")]),
            (key("lost"), vec![]),
        ]),
        &mut out,
    );
    w.validate();
    let sends: Vec<&Instruction> = out.iter().filter(|i| matches!(i, Instruction::Send(_))).collect();
    assert!(
        sends.iter().any(
            |i| matches!(i, Instruction::Send(pb::worker_event::Kind::ReplicasAdded(r)) if r.keys[0].key == "here")
        ),
        "{out:?}"
    );
    assert!(
        sends
            .iter()
            .any(|i| matches!(i, Instruction::Send(pb::worker_event::Kind::ReplicasFailed(r)) if r.keys == ["lost"])),
        "{out:?}"
    );
    assert!(out.iter().any(|i| matches!(i, Instruction::Fetch { from, .. } if &**from == "tcp://b:1")));
    out.clear();
    w.handle(
        Event::FetchDone {
            from: Arc::from("tcp://b:1"),
            got: vec![(key("far"), 7)],
            missing: vec![],
            span: (0.0, 0.0),
        },
        &mut out,
    );
    w.validate();
    assert!(
        matches!(&out[..], [Instruction::Send(pb::worker_event::Kind::ReplicasAdded(r))] if r.keys[0].key == "far" && r.keys[0].nbytes == 7),
        "{out:?}"
    );
    // Kept after the task that needed `here` is done, until the scheduler frees them.
    w.handle(ok("t"), &mut out);
    out.clear();
    w.handle(Event::Free(key("here")), &mut out);
    w.handle(Event::Free(key("far")), &mut out);
    w.validate();
    assert_eq!(out.iter().filter(|i| matches!(i, Instruction::Drop(_))).count(), 2, "{out:?}");
}

fn steal_answer(out: &[Instruction]) -> Option<(String, u64, bool)> {
    out.iter().find_map(|i| match i {
        Instruction::Send(pb::worker_event::Kind::StealResponse(r)) => Some((r.key.clone(), r.id, r.stolen)),
        _ => None,
    })
}

#[test]
fn a_task_waiting_for_its_inputs_is_given_up_at_once() {
    let mut s = WorkerState::new(1);
    step(&mut s, compute("c", &[("a", &["tcp://p:1"])]));
    let out = step(&mut s, Event::Steal { key: key("c"), id: 7 });
    assert_eq!(steal_answer(&out), Some(("c".into(), 7, true)));
    assert_eq!(s.n_compute(), 0);
    // The input arriving later is not kept for nothing.
    let out = step(
        &mut s,
        Event::FetchDone { from: Arc::from("tcp://p:1"), got: vec![(key("a"), 1)], missing: vec![], span: (0.0, 0.0) },
    );
    assert_eq!(out, vec![Instruction::Drop(key("a"))]);
}

#[test]
fn a_dispatched_task_is_given_up_only_if_the_executor_had_not_started_it() {
    let mut s = WorkerState::new(1);
    step(&mut s, compute("a", &[]));
    step(&mut s, compute("b", &[]));
    assert_eq!(s.executing(), 2);
    // Queued on the executor: it answers.
    let out = step(&mut s, Event::Steal { key: key("b"), id: 1 });
    assert_eq!(out, vec![Instruction::Unqueue { key: key("b"), id: 1 }]);
    let out = step(&mut s, Event::Unqueued { key: key("b"), id: 1, removed: true });
    assert_eq!(steal_answer(&out), Some(("b".into(), 1, true)));
    assert_eq!(s.executing(), 1);
    assert!(!s.is_running("b"));
    // Running: it stays, and its result is reported as usual.
    step(&mut s, Event::Steal { key: key("a"), id: 2 });
    let out = step(&mut s, Event::Unqueued { key: key("a"), id: 2, removed: false });
    assert_eq!(steal_answer(&out), Some(("a".into(), 2, false)));
    let out = step(&mut s, ok("a"));
    assert!(matches!(&out[0], Instruction::Send(pb::worker_event::Kind::Finished(f)) if f.key == "a"));
}

#[test]
fn a_finished_or_freed_task_is_not_given_up() {
    let mut s = WorkerState::new(1);
    step(&mut s, compute("a", &[]));
    step(&mut s, ok("a"));
    let out = step(&mut s, Event::Steal { key: key("a"), id: 3 });
    assert_eq!(steal_answer(&out), Some(("a".into(), 3, false)));
    let out = step(&mut s, Event::Steal { key: key("never-sent"), id: 4 });
    assert_eq!(steal_answer(&out), Some(("never-sent".into(), 4, false)));
}

#[test]
fn a_steal_answered_before_a_free_and_compute_of_the_same_key_leaves_the_new_run() {
    // The shell answers a steal before the next command of its batch ([Steal, Free, Compute]):
    // the new run must survive.
    let mut s = WorkerState::new(1);
    step(&mut s, compute("a", &[]));
    step(&mut s, compute("k", &[]));
    let out = step(&mut s, Event::Steal { key: key("k"), id: 1 });
    assert_eq!(out, vec![Instruction::Unqueue { key: key("k"), id: 1 }]);
    let out = step(&mut s, Event::Unqueued { key: key("k"), id: 1, removed: true });
    assert_eq!(steal_answer(&out), Some(("k".into(), 1, true)));
    step(&mut s, Event::Free(key("k")));
    let out = step(&mut s, compute("k", &[]));
    assert!(matches!(&out[..], [Instruction::Execute { key, .. }] if &**key == "k"), "{out:?}");
    assert!(s.is_running("k"));
}

#[test]
fn a_task_freed_while_it_runs_holds_its_resources_until_it_ends() {
    let gpu = |k: &str| {
        Event::Compute(ComputeRequest {
            key: key(k),
            spec: Bytes::from_static(b"spec"),
            deps: Vec::new(),
            priority: 0,
            inline: false,
            announce: false,
            resources: vec![(Arc::from("GPU"), 1.0)],
        })
    };
    let mut s = WorkerState::new(4).with_resources(&[("GPU".to_string(), 1.0)]);
    let out = step(&mut s, gpu("g1"));
    assert!(matches!(&out[..], [Instruction::Execute { .. }]));
    // The scheduler cancels g1 (its run goes on) and sends g2: g2 waits for the GPU.
    step(&mut s, Event::Free(key("g1")));
    let out = step(&mut s, gpu("g2"));
    assert!(out.is_empty(), "{out:?}");
    // A task that needs nothing runs meanwhile.
    let out = step(&mut s, compute("plain", &[]));
    assert!(matches!(&out[..], [Instruction::Execute { key, .. }] if &**key == "plain"), "{out:?}");
    // g1's run ends: g2 starts.
    let out = step(&mut s, ok("g1"));
    assert!(out.iter().any(|i| matches!(i, Instruction::Execute { key, .. } if &**key == "g2")), "{out:?}");
}

/// The transitions of `out`, as "key start->finish".
fn transitions(out: &[Instruction]) -> Vec<String> {
    out.iter()
        .filter_map(|i| match i {
            Instruction::Transition { key, start, finish } => Some(format!("{key} {start}->{finish}")),
            _ => None,
        })
        .collect()
}

#[test]
fn transitions_are_reported_only_when_traced_and_follow_each_keys_life() {
    let mut s = WorkerState::new(1);
    assert!(transitions(&step(&mut s, compute("x", &[]))).is_empty(), "off by default");
    step(&mut s, ok("x"));
    s.set_trace(true);
    let out = step(&mut s, compute("c", &[("a", &["tcp://p:1"])]));
    assert_eq!(transitions(&out), ["a released->fetch", "c released->waiting", "a fetch->flight"]);
    let out = step(
        &mut s,
        Event::FetchDone { from: Arc::from("tcp://p:1"), got: vec![(key("a"), 1)], missing: vec![], span: (0.0, 0.0) },
    );
    assert_eq!(transitions(&out), ["a flight->memory", "c waiting->ready", "c ready->executing"]);
    let out = step(&mut s, ok("c"));
    assert_eq!(transitions(&out), ["a memory->released", "c executing->memory"]);
    let out = step(&mut s, Event::Free(key("c")));
    assert_eq!(transitions(&out), ["c memory->released"]);
    // A cancelled run ends released; a put arrives from nowhere.
    step(&mut s, compute("d", &[]));
    let out = step(&mut s, Event::Free(key("d")));
    assert_eq!(transitions(&out), ["d executing->cancelled"]);
    assert_eq!(transitions(&step(&mut s, ok("d"))), ["d cancelled->released"]);
    let out = step(&mut s, Event::Put { keys: vec![(key("p"), 3)] });
    assert_eq!(transitions(&out), ["p released->memory"]);
    s.set_trace(false);
    assert!(transitions(&step(&mut s, Event::Free(key("p")))).is_empty());
}

#[test]
fn fetched_inputs_are_reported_with_the_task_as_transfers() {
    let mut s = WorkerState::new(1);
    step(&mut s, compute("c", &[("a", &["tcp://p:1"]), ("b", &["tcp://q:2"])]));
    step(
        &mut s,
        Event::FetchDone { from: Arc::from("tcp://p:1"), got: vec![(key("a"), 10)], missing: vec![], span: (1.0, 2.0) },
    );
    step(
        &mut s,
        Event::FetchDone { from: Arc::from("tcp://q:2"), got: vec![(key("b"), 20)], missing: vec![], span: (1.5, 3.0) },
    );
    let out = step(&mut s, ok("c"));
    let Some(Instruction::Send(pb::worker_event::Kind::Finished(f))) =
        out.iter().find(|i| matches!(i, Instruction::Send(_)))
    else {
        panic!("{out:?}")
    };
    let got: Vec<(&str, &str, f64, f64, u64)> =
        f.transfers.iter().map(|t| (t.key.as_str(), t.source.as_str(), t.start_s, t.stop_s, t.nbytes)).collect();
    assert_eq!(got, [("a", "tcp://p:1", 1.0, 2.0, 10), ("b", "tcp://q:2", 1.5, 3.0, 20)]);
    // A task whose input was put here (not fetched) reports none.
    step(&mut s, Event::Put { keys: vec![(key("p"), 5)] });
    step(&mut s, compute("d", &[("p", &[])]));
    let out = step(&mut s, ok("d"));
    assert!(
        matches!(&out[..], [.., Instruction::Send(pb::worker_event::Kind::Finished(f))] if f.key == "d" && f.transfers.is_empty()),
        "{out:?}"
    );
}
