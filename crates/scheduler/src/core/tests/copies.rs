//! `replicate` and `rebalance`: copies asked of workers, counted when they arrive, and the
//! operation answered once every copy arrived or failed.

use super::*;

fn done(cmds: &[Command]) -> Option<(u64, u32)> {
    cmds.iter().find_map(|c| match c {
        Command::CopiesDone { op, failed } => Some((*op, *failed)),
        _ => None,
    })
}

fn added(h: &mut Harness, worker: u32, keys: &[&str], nbytes: u64) -> Vec<Command> {
    h.handle(Event::ReplicasAdded { worker: WorkerId(worker), keys: keys.iter().map(|x| (k(x), nbytes)).collect() })
}

/// Three workers; `x` (and `y`, `z`, `w` if asked) computed on worker 0.
fn three(values: &[&str]) -> Harness {
    let mut h = Harness::new();
    for i in 0..3 {
        h.join(i, 1);
    }
    let tasks: Vec<NewTask> = values.iter().map(|v| NewTask { workers: vec![addr(0)], ..task(v, &[]) }).collect();
    h.submit(C1, tasks, values);
    for v in values {
        h.finish(0, v, 100);
    }
    h
}

fn holders(h: &Harness, key: &str) -> Vec<Arc<str>> {
    let mut w = h.core.who_has(key);
    w.sort();
    w
}

#[test]
fn replicate_copies_to_every_worker_and_answers_when_all_arrived() {
    let mut h = three(&["x"]);
    let out = h.handle(Event::Replicate { op: 7, keys: vec![k("x")], n: None, workers: vec![] });
    assert_eq!(acquired(&out), vec![(1, vec![s("x")]), (2, vec![s("x")])]);
    assert_eq!(done(&out), None);
    let out = added(&mut h, 1, &["x"], 100);
    assert_eq!(done(&out), None);
    let out = added(&mut h, 2, &["x"], 100);
    assert_eq!(done(&out), Some((7, 0)));
    assert_eq!(holders(&h, "x"), vec![addr(0), addr(1), addr(2)]);
}

#[test]
fn replicate_to_fewer_than_there_are_drops_the_extra_copies() {
    let mut h = three(&["x"]);
    h.handle(Event::Replicate { op: 1, keys: vec![k("x")], n: None, workers: vec![] });
    added(&mut h, 1, &["x"], 100);
    added(&mut h, 2, &["x"], 100);
    let out = h.handle(Event::Replicate { op: 2, keys: vec![k("x")], n: Some(1), workers: vec![] });
    assert_eq!(frees(&out).len(), 2);
    assert_eq!(done(&out), Some((2, 0)));
    assert_eq!(h.core.who_has("x").len(), 1);
}

#[test]
fn a_copy_whose_target_dies_or_whose_value_goes_counts_as_failed() {
    let mut h = three(&["x", "y"]);
    h.handle(Event::Replicate {
        op: 3,
        keys: vec![k("x"), k("y")],
        n: Some(2),
        workers: vec![WorkerId(0), WorkerId(1)],
    });
    // Both copies were to go to worker 1.
    let out = h.lose(1);
    assert_eq!(done(&out), Some((3, 2)));
    let mut h = three(&["x"]);
    h.handle(Event::Replicate { op: 4, keys: vec![k("x")], n: None, workers: vec![] });
    let out = h.handle(Event::ReleaseKeys { client: C1, keys: vec![k("x")] });
    assert_eq!(done(&out), Some((4, 2)));
    // A copy arriving afterwards is nobody's: dropped.
    let out = added(&mut h, 1, &["x"], 100);
    assert_eq!(frees(&out), vec![(1, s("x"))]);
}

#[test]
fn rebalance_moves_values_from_the_loaded_worker_to_the_idle_ones() {
    let mut h = three(&["a", "b", "c", "d", "e", "f"]);
    let out = h.handle(Event::Rebalance { op: 9, keys: vec![], workers: vec![] });
    let asked = acquired(&out);
    let moved: usize = asked.iter().map(|(_, ks)| ks.len()).sum();
    assert_eq!(moved, 4, "{asked:?}");
    assert!(asked.iter().all(|(w, ks)| *w != 0 && ks.len() == 2), "{asked:?}");
    let mut last = Vec::new();
    for (w, keys) in &asked {
        let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        last = added(&mut h, *w, &keys, 100);
        // Each moved value is dropped where it was.
        for key in &keys {
            assert_eq!(holders(&h, key), vec![addr(*w)]);
        }
    }
    assert_eq!(done(&last), Some((9, 0)));
    let per_worker: Vec<usize> = h.core.workers().map(|(_, _, keys, _, _)| keys.len()).collect();
    assert_eq!(per_worker, vec![2, 2, 2]);
}

#[test]
fn a_value_moved_to_a_worker_that_is_leaving_stays_where_it_was() {
    let mut h = three(&["a", "b", "c", "d", "e", "f"]);
    let out = h.handle(Event::Rebalance { op: 5, keys: vec![], workers: vec![] });
    let (w, keys) = acquired(&out)[0].clone();
    h.handle(Event::WorkerClosing { worker: WorkerId(w) });
    let refs: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let out = added(&mut h, w, &refs, 100);
    assert!(frees(&out).iter().all(|(x, _)| *x != 0), "dropped at the source: {:?}", frees(&out));
    h.lose(w);
    for key in &refs {
        assert!(matches!(h.state(key), TaskState::Memory { .. }), "{key} lost");
    }
}

#[test]
fn a_second_replicate_counts_the_copies_the_first_has_on_their_way() {
    let mut h = three(&["x"]);
    let first = h.handle(Event::Replicate { op: 1, keys: vec![k("x")], n: Some(2), workers: vec![] });
    assert_eq!(acquired(&first).len(), 1);
    // Asked again before the copy arrived: two copies are made or coming, nothing more to do.
    let second = h.handle(Event::Replicate { op: 2, keys: vec![k("x")], n: Some(2), workers: vec![] });
    assert!(acquired(&second).is_empty(), "{second:?}");
    assert_eq!(done(&second), Some((2, 0)));
}
