//! Work stealing: which tasks move, and the handshake's races (each ends in one consistent
//! state; `validate()` runs after every event).

use super::*;

/// `(worker, key, id)` of every Steal, in order.
fn steals(cmds: &[Command]) -> Vec<(u32, String, u64)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Steal { worker, key, id } => Some((worker.0, key.to_string(), *id)),
            _ => None,
        })
        .collect()
}

fn answer(h: &mut Harness, worker: u32, key: &str, id: u64, stolen: bool) -> Vec<Command> {
    h.handle(Event::StealResponse { worker: WorkerId(worker), key: k(key), id, stolen })
}

/// Slot limits of 10 tasks per thread for tasks of 5 ms.
fn cfg() -> Config {
    Config { soon: Duration::from_millis(50), ..Config::default() }
}

/// Worker 0 (one thread) holds `n` tasks `inc-i` of a kind measured at 5 ms (its slot limit
/// is 10 per thread); no other worker yet.
fn loaded(n: usize, config: Config) -> Harness {
    let mut h = Harness::with_config(config);
    h.join(0, 1);
    h.submit(C1, vec![task("inc-warm", &[])], &["inc-warm"]);
    h.finish_in(0, "inc-warm", 8, Duration::from_millis(5));
    let tasks: Vec<NewTask> = (0..n).map(|i| task(&format!("inc-{i}"), &[])).collect();
    let keys: Vec<String> = (0..n).map(|i| format!("inc-{i}")).collect();
    let wants: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
    let out = h.submit(C1, tasks, &wants);
    assert_eq!(computes(&out).len(), n, "all on worker 0");
    h
}

#[test]
fn a_worker_that_joins_takes_its_share_of_what_another_holds() {
    let mut h = loaded(10, cfg());
    let out = h.join(1, 1);
    let asked = steals(&out);
    // 9 beyond the running one; half of them, the latest first.
    assert_eq!(asked.len(), 4, "{asked:?}");
    assert!(asked.iter().all(|(w, _, _)| *w == 0));
    let keys: Vec<&str> = asked.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(keys, ["inc-9", "inc-8", "inc-7", "inc-6"]);
    // Nothing moves before the victim answers.
    assert_eq!(h.runs_on("inc-9"), 0);
    let (_, key, id) = asked[0].clone();
    let out = answer(&mut h, 0, &key, id, true);
    assert_eq!(computes(&out), vec![(1, key.clone())]);
    assert_eq!(h.runs_on(&key), 1);
    assert_eq!(h.core.stats, StealStats { asked: 4, stolen: 1, refused: 0 });
}

#[test]
fn a_refused_steal_leaves_the_task_and_never_asks_again() {
    let mut h = loaded(3, cfg());
    let out = h.join(1, 1);
    let (_, key, id) = steals(&out)[0].clone();
    let out = answer(&mut h, 0, &key, id, false);
    assert!(computes(&out).is_empty());
    assert_eq!(h.runs_on(&key), 0);
    // The thief looks again (a tick): the refused task is not asked for again.
    let out = h.handle(Event::Tick);
    assert!(steals(&out).iter().all(|(_, k, _)| *k != key), "{:?}", steals(&out));
    assert_eq!(h.core.stats.refused, 1);
}

#[test]
fn a_completion_that_overtakes_the_answer_wins() {
    let mut h = loaded(3, cfg());
    let out = h.join(1, 1);
    let (_, key, id) = steals(&out)[0].clone();
    // The victim had started it and finished before it read the request.
    h.finish(0, &key, 8);
    assert!(matches!(h.state(&key), TaskState::Memory { .. }));
    let out = answer(&mut h, 0, &key, id, false);
    assert!(computes(&out).is_empty() && frees(&out).is_empty());
    assert!(matches!(h.state(&key), TaskState::Memory { .. }));
}

#[test]
fn a_victim_that_dies_before_answering_loses_nothing() {
    let mut h = loaded(3, cfg());
    let out = h.join(1, 1);
    let (_, key, _) = steals(&out)[0].clone();
    let out = h.lose(0);
    // Everything it held goes to the thief (once each).
    let sent = computes(&out);
    assert_eq!(sent.iter().filter(|(_, k)| *k == key).count(), 1);
    assert!(sent.iter().all(|(w, _)| *w == 1));
    assert_eq!(h.runs_on(&key), 1);
}

#[test]
fn a_task_given_up_for_a_thief_that_left_is_placed_again() {
    let mut h = loaded(3, cfg());
    let out = h.join(1, 1);
    let (_, key, id) = steals(&out)[0].clone();
    h.lose(1);
    // The victim dropped it: it must run somewhere, and not on the dead thief.
    let out = answer(&mut h, 0, &key, id, true);
    let state = h.state(&key);
    assert!(
        matches!(state, TaskState::Queued | TaskState::Processing { worker: WorkerId(0) }),
        "{state:?} {:?}",
        computes(&out)
    );
    // Worker 0 finishes what it runs, the given-up task too (once).
    for _ in 0..3 {
        let running: Vec<String> = ["inc-0", "inc-1", "inc-2"]
            .iter()
            .filter(|k| matches!(h.core.task_state(k), Some(TaskState::Processing { .. })))
            .map(|k| k.to_string())
            .collect();
        for k in running {
            assert_eq!(h.runs_on(&k), 0);
            h.finish(0, &k, 8);
        }
    }
    for k in ["inc-0", "inc-1", "inc-2"] {
        assert!(matches!(h.state(k), TaskState::Memory { .. }), "{k}");
    }
}

#[test]
fn a_cancel_during_the_handshake_ignores_the_late_answer() {
    let mut h = loaded(3, cfg());
    let out = h.join(1, 1);
    let (_, key, id) = steals(&out)[0].clone();
    h.handle(Event::ReleaseKeys { client: C1, keys: vec![k(&key)] });
    assert!(h.core.task_state(&key).is_none(), "forgotten");
    let out = answer(&mut h, 0, &key, id, true);
    assert!(out.is_empty(), "{out:?}");
    // Asked again, it runs once.
    let out = h.submit(C1, vec![task(&key, &[])], &[&key]);
    assert_eq!(computes(&out).len(), 1);
}

#[test]
fn an_answer_to_an_older_steal_of_the_same_key_is_ignored() {
    let mut h = loaded(3, cfg());
    let out = h.join(1, 1);
    let (_, key, old) = steals(&out)[0].clone();
    // Released and submitted again before the answer: it lands on the least busy worker.
    h.handle(Event::ReleaseKeys { client: C1, keys: vec![k(&key)] });
    h.lose(1);
    h.submit(C1, vec![task(&key, &[])], &[&key]);
    assert_eq!(h.runs_on(&key), 0);
    h.join(2, 1);
    // The old answer ("dropped") must not move the new run, which worker 0 may have started.
    let out = answer(&mut h, 0, &key, old, true);
    assert!(computes(&out).is_empty(), "{out:?}");
    assert!(matches!(h.state(&key), TaskState::Processing { .. }));
}

#[test]
fn hard_restrictions_hold_and_loose_ones_may_move() {
    let mut h = Harness::with_config(cfg());
    h.join(0, 1);
    h.submit(C1, vec![task("inc-warm", &[])], &["inc-warm"]);
    h.finish_in(0, "inc-warm", 8, Duration::from_millis(5));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let mut t = task(&format!("inc-{i}"), &[]);
        t.workers = vec![addr(0)];
        t.allow_other_workers = i >= 3;
        tasks.push(t);
    }
    let wants: Vec<String> = (0..6).map(|i| format!("inc-{i}")).collect();
    let wants: Vec<&str> = wants.iter().map(|s| s.as_str()).collect();
    h.submit(C1, tasks, &wants);
    let out = h.join(1, 4);
    let asked = steals(&out);
    assert!(!asked.is_empty());
    for (_, key, _) in &asked {
        let i: usize = key.trim_start_matches("inc-").parse().unwrap();
        assert!(i >= 3, "{key} may run only on worker 0");
    }
}

#[test]
fn paused_workers_do_not_steal_but_are_stolen_from() {
    // A paused thief takes nothing.
    let mut h = loaded(6, cfg());
    h.join(1, 1);
    let (_, key, id) = steals(&h.handle(Event::Tick)).first().cloned().unwrap_or_default();
    if !key.is_empty() {
        answer(&mut h, 0, &key, id, false);
    }
    h.handle(paused(1, true));
    let out = h.handle(Event::Tick);
    assert!(steals(&out).is_empty(), "a paused worker stole {:?}", steals(&out));
    // A paused victim gives up what it has not started, to an idle worker.
    let mut h = loaded(6, cfg());
    h.handle(paused(0, true));
    let out = h.join(1, 1);
    assert!(!steals(&out).is_empty(), "the joiner takes from the paused worker");
}

#[test]
fn stealing_off_moves_nothing() {
    let mut h = loaded(10, Config { work_stealing: false, ..cfg() });
    let out = h.join(1, 1);
    assert!(steals(&out).is_empty());
    let out = h.handle(Event::Tick);
    assert!(steals(&out).is_empty());
}

#[test]
fn a_task_with_big_inputs_stays_where_they_are() {
    let mut h = Harness::with_config(cfg());
    h.join(0, 1);
    h.submit(C1, vec![task("big", &[])], &["big"]);
    // 1 GB: ten seconds at the assumed 100 MB/s, against tasks of 5 ms.
    h.finish(0, "big", 1_000_000_000);
    h.submit(C1, vec![task("inc-warm", &["big"])], &["inc-warm"]);
    h.finish_in(0, "inc-warm", 8, Duration::from_millis(5));
    let tasks: Vec<NewTask> = (0..10).map(|i| task(&format!("inc-{i}"), &["big"])).collect();
    let wants: Vec<String> = (0..10).map(|i| format!("inc-{i}")).collect();
    let wants: Vec<&str> = wants.iter().map(|s| s.as_str()).collect();
    h.submit(C1, tasks, &wants);
    let out = h.join(1, 1);
    assert!(steals(&out).is_empty(), "{:?}", steals(&out));
}

#[test]
fn tasks_shorter_than_two_handshakes_stay() {
    // Measured at 1 ms (under 2 x the 1 ms steal latency), 10 queued behind one thread.
    let mut h = Harness::with_config(Config { soon: Duration::from_millis(10), ..Config::default() });
    h.join(0, 1);
    h.submit(C1, vec![task("inc-warm", &[])], &["inc-warm"]);
    h.finish_in(0, "inc-warm", 8, Duration::from_millis(1));
    let keys: Vec<String> = (0..10).map(|i| format!("inc-{i}")).collect();
    let wants: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
    h.submit(C1, keys.iter().map(|k| task(k, &[])).collect(), &wants);
    assert_eq!(h.core.workers().next().map(|w| w.3), Some(10));
    let out = h.join(1, 1);
    assert!(steals(&out).is_empty(), "{:?}", steals(&out));
}

#[test]
fn a_hard_restricted_task_given_up_for_a_thief_that_paused_stays_with_its_workers() {
    let mut h = Harness::with_config(cfg());
    h.join(0, 1);
    h.submit(C1, vec![task("inc-warm", &[])], &["inc-warm"]);
    h.finish_in(0, "inc-warm", 8, Duration::from_millis(5));
    let keys: Vec<String> = (0..6).map(|i| format!("inc-{i}")).collect();
    let wants: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
    let tasks = keys.iter().map(|k| NewTask { workers: vec![addr(0), addr(1)], ..task(k, &[]) }).collect();
    h.submit(C1, tasks, &wants);
    let (_, key, id) = steals(&h.join(1, 1))[0].clone();
    h.handle(paused(1, true));
    answer(&mut h, 0, &key, id, true);
    assert!(!matches!(h.state(&key), TaskState::Queued), "queued: any worker could take it");
    let out = h.join(2, 4);
    assert!(computes(&out).iter().all(|(w, _)| *w != 2), "ran on a worker it may not: {:?}", computes(&out));
}
