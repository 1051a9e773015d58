//! The simulator in CI: small random graphs complete under random joins and deaths, never
//! running a task twice at once (nor at all twice without a death), with the core's
//! `validate()` after every event; and the same seed gives the same schedule.
use dask_sim::{Cluster, Dist, Graph, WorkerKind, graphs, simulate};
use proptest::prelude::*;

fn shapes(seed: u64) -> Vec<Graph> {
    vec![
        graphs::merge(60, Dist::Heavy(5.0), seed),
        graphs::tree(64, 4, Dist::Jitter(5.0), seed),
        graphs::shuffle(8, 1_000_000, seed),
        graphs::crossv(3, 4, Dist::Heavy(20.0), seed),
        graphs::changing(40, 20, 50.0, seed),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_graph_completes_under_joins_and_deaths(
        seed in any::<u64>(),
        n in 1usize..6,
        threads in 1u32..4,
        joins in proptest::collection::vec((0.0f64..0.5, 1u32..3), 0..3),
        deaths in proptest::collection::vec(0.0f64..0.5, 0..3),
        stealing in any::<bool>(),
        slow in any::<bool>(),
    ) {
        for g in shapes(seed) {
            let mut c = Cluster::uniform(n, threads);
            c.seed = seed;
            c.work_stealing = stealing;
            if slow {
                c.workers[0].speed = 0.5;
            }
            c.joins = joins.iter().map(|(t, k)| (*t, WorkerKind { nthreads: *k, speed: 1.0 })).collect();
            c.deaths = deaths.clone();
            let o = simulate(&g, &c, true);
            prop_assert_eq!(o.outputs_done, o.outputs, "{}: not every output computed", g.name);
            prop_assert!(o.makespan >= o.lower_bound * 0.999, "{}: makespan under the lower bound", g.name);
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_schedule() {
    let g = graphs::crossv(4, 5, Dist::Heavy(20.0), 3);
    let mut c = Cluster::uniform(3, 2);
    c.deaths = vec![0.05];
    c.joins = vec![(0.02, WorkerKind { nthreads: 1, speed: 1.0 })];
    let a = simulate(&g, &c, true);
    let b = simulate(&g, &c, true);
    assert_eq!(
        (a.makespan, a.bytes_moved, a.executions, a.events),
        (b.makespan, b.bytes_moved, b.executions, b.events)
    );
}

#[test]
fn stealing_rescues_misjudged_durations() {
    // 1,000 tasks measured at 1 ms, then 64 heavy-tailed ones around 200 ms: handed out ten
    // deep per thread by the short figure. (Simulated time: a property of the schedule.)
    let g = graphs::changing(1000, 64, 200.0, 1);
    let mut c = Cluster::uniform(8, 1);
    let on = simulate(&g, &c, true);
    c.work_stealing = false;
    let off = simulate(&g, &c, true);
    assert!(on.steals.stolen > 0);
    assert!(on.makespan < off.makespan, "on {} vs off {}", on.makespan, off.makespan);
}

#[test]
fn a_reduction_keeps_few_inputs_in_memory_however_its_leaves_were_submitted() {
    // 2,000 values of 10 MB, fan-in 8, siblings scattered through the submission order; 2
    // workers of 2 threads. Without depth-first ordering this peaked at hundreds of inputs.
    let g = graphs::tree_scattered(2000, 8, Dist::Jitter(5.0), 10_000_000, 1);
    let o = simulate(&g, &Cluster::uniform(2, 2), true);
    let inputs = o.peak_worker_bytes / 10_000_000;
    assert!(inputs <= 64, "peak of {inputs} inputs on one worker");
}
