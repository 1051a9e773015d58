//! Resources: tasks run only where what they need is free, never more at once than a worker
//! has; tasks that fit nowhere wait and say why.

use super::*;

fn gpu_worker(h: &mut Harness, i: u32, nthreads: u32, gpus: f64) -> Vec<Command> {
    let mut s = spec(i, nthreads);
    s.resources = vec![(Arc::from("GPU"), gpus)];
    h.handle(Event::WorkerJoined { worker: WorkerId(i), spec: s })
}

fn needs(key: &str, gpus: f64) -> NewTask {
    NewTask { resources: vec![(Arc::from("GPU"), gpus)], ..task(key, &[]) }
}

#[test]
fn a_task_runs_only_where_its_resources_are_free_and_waits_otherwise() {
    let mut h = Harness::new();
    h.join(0, 4);
    gpu_worker(&mut h, 1, 4, 1.0);
    let out = h.submit(C1, vec![needs("a", 1.0), needs("b", 1.0), task("c", &[])], &["a", "b", "c"]);
    // One GPU: one GPU task runs, on the GPU worker, whatever its free threads.
    let placed = computes(&out);
    assert!(placed.contains(&(1, "a".into())));
    assert!(!placed.iter().any(|(_, k)| k == "b"));
    assert_eq!(h.state("b"), TaskState::NoWorker);
    // It waits for a busy GPU, not for one nobody has: not listed as unrunnable.
    assert_eq!(h.core.unrunnable(10), (vec![], 0));
    assert_eq!(h.core.worker_resources_used(WorkerId(1)), vec![(Arc::from("GPU"), 1.0)]);
    // The GPU frees up: the waiting task takes it.
    let out = h.finish(1, "a", 8);
    assert_eq!(computes(&out), vec![(1, "b".to_string())]);
    h.finish(1, "b", 8);
    assert_eq!(h.core.worker_resources_used(WorkerId(1)), vec![(Arc::from("GPU"), 0.0)]);
}

#[test]
fn a_task_needing_more_than_any_worker_has_waits_and_is_logged_once() {
    let mut h = Harness::new();
    gpu_worker(&mut h, 0, 2, 1.0);
    let out = h.submit(C1, vec![needs("x", 2.0), needs("y", 2.0)], &["x", "y"]);
    let notices: Vec<&String> = out
        .iter()
        .filter_map(|c| match c {
            Command::Notice { message, .. } => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].contains("needs GPU=2") && notices[0].contains("--resources"), "{}", notices[0]);
    assert_eq!(h.core.n_no_worker(), 2);
    assert_eq!(h.core.unrunnable(1), (vec!["x: needs GPU=2".to_string()], 2));
    // A worker with two GPUs joins: both run there, one after the other.
    let out = gpu_worker(&mut h, 1, 2, 2.0);
    assert_eq!(computes(&out).len(), 1);
    assert_eq!(h.core.n_no_worker(), 1);
}

#[test]
fn a_worker_death_gives_its_resources_back_and_the_task_runs_elsewhere() {
    let mut h = Harness::new();
    gpu_worker(&mut h, 0, 1, 1.0);
    gpu_worker(&mut h, 1, 1, 1.0);
    h.submit(C1, vec![needs("a", 1.0), needs("b", 1.0), needs("c", 1.0)], &["a", "b", "c"]);
    assert_eq!(h.core.n_no_worker(), 1);
    let on = h.runs_on("a");
    h.lose(on);
    // The other worker's GPU is busy: a waits; when it frees, a (or c) runs there.
    let other = 1 - on;
    let running: Vec<&str> =
        ["a", "b", "c"].into_iter().filter(|k| matches!(h.state(k), TaskState::Processing { .. })).collect();
    assert_eq!(running.len(), 1);
    h.finish(other, running[0], 8);
    let running: Vec<&str> =
        ["a", "b", "c"].into_iter().filter(|k| matches!(h.state(k), TaskState::Processing { .. })).collect();
    assert_eq!(running.len(), 1);
}

#[test]
fn stealing_never_moves_a_task_to_a_worker_without_its_resources() {
    let mut h = Harness::with_config(Config { soon: Duration::from_millis(50), ..Config::default() });
    gpu_worker(&mut h, 0, 1, 10.0);
    h.submit(C1, vec![task("inc-warm", &[])], &["inc-warm"]);
    h.finish_in(0, "inc-warm", 8, Duration::from_millis(5));
    let keys: Vec<String> = (0..6).map(|i| format!("inc-{i}")).collect();
    let wants: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
    h.submit(C1, keys.iter().map(|k| needs(k, 1.0)).collect(), &wants);
    // A worker without GPUs joins and idles: it takes none of them.
    let out = h.join(1, 4);
    assert!(out.iter().all(|c| !matches!(c, Command::Steal { .. })), "{out:?}");
    // One with GPUs does.
    let out = gpu_worker(&mut h, 2, 4, 4.0);
    assert!(out.iter().any(|c| matches!(c, Command::Steal { .. })), "{out:?}");
}

#[test]
fn bad_amounts_err_the_task_with_the_reason() {
    let mut h = Harness::new();
    gpu_worker(&mut h, 0, 1, 1.0);
    h.submit(C1, vec![needs("n", f64::NAN), needs("m", -1.0)], &["n", "m"]);
    for k in ["n", "m"] {
        let err = erred_with(&h.state(k));
        assert!(err.message.contains("zero or more"), "{}", err.message);
    }
}

#[test]
fn a_waiting_gpu_task_starts_when_the_gpu_frees_even_with_plain_tasks_queued() {
    let mut h = Harness::new();
    gpu_worker(&mut h, 0, 1, 1.0);
    h.submit(C1, vec![needs("g1", 1.0), needs("g2", 1.0)], &["g1", "g2"]);
    let plain: Vec<String> = (0..50).map(|i| format!("p-{i}")).collect();
    let refs: Vec<&str> = plain.iter().map(|s| s.as_str()).collect();
    h.submit(C1, refs.iter().map(|k| task(k, &[])).collect(), &refs);
    assert_eq!(h.state("g2"), TaskState::NoWorker);
    let out = h.finish(0, "g1", 8);
    assert!(computes(&out).contains(&(0, "g2".to_string())), "{:?}", computes(&out));
}

#[test]
fn tasks_no_worker_can_run_do_not_hide_those_that_fit() {
    let mut h = Harness::new();
    gpu_worker(&mut h, 0, 1, 1.0);
    let big: Vec<String> = (0..300).map(|i| format!("big-{i}")).collect();
    let refs: Vec<&str> = big.iter().map(|s| s.as_str()).collect();
    h.submit(C1, refs.iter().map(|k| needs(k, 2.0)).collect(), &refs);
    h.submit(C1, vec![needs("g1", 1.0), needs("g2", 1.0)], &["g1", "g2"]);
    let out = h.finish(0, "g1", 8);
    assert!(computes(&out).contains(&(0, "g2".to_string())), "{:?}", computes(&out));
}

#[test]
fn a_resource_named_twice_counts_twice() {
    let mut h = Harness::new();
    gpu_worker(&mut h, 0, 2, 1.0);
    let twice = NewTask { resources: vec![(Arc::from("GPU"), 1.0), (Arc::from("GPU"), 1.0)], ..task("t", &[]) };
    h.submit(C1, vec![twice], &["t"]);
    // It needs two GPUs; the worker has one: it waits rather than oversubscribe.
    assert_eq!(h.state("t"), TaskState::NoWorker);
    assert_eq!(h.core.unrunnable(5).0, vec!["t: needs GPU=2".to_string()]);
}

#[test]
fn a_thief_is_asked_for_no_more_resource_tasks_than_it_has_room_for() {
    let mut h = Harness::with_config(Config { soon: Duration::from_millis(50), ..Config::default() });
    gpu_worker(&mut h, 0, 1, 10.0);
    h.submit(C1, vec![task("inc-warm", &[])], &["inc-warm"]);
    h.finish_in(0, "inc-warm", 8, Duration::from_millis(5));
    let keys: Vec<String> = (0..8).map(|i| format!("inc-{i}")).collect();
    let wants: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
    h.submit(C1, keys.iter().map(|k| needs(k, 1.0)).collect(), &wants);
    // One GPU on a worker of four threads: one steal, not its share of four.
    let out = gpu_worker(&mut h, 1, 4, 1.0);
    let asked = out.iter().filter(|c| matches!(c, Command::Steal { .. })).count();
    assert_eq!(asked, 1, "{out:?}");
}
