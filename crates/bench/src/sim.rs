//! `dask-bench sim`: the deterministic simulator (`crates/sim`) at scale, and the cases where
//! work stealing is what saves the makespan, each with stealing on and off. Times are simulated
//! seconds (a property of the schedule); only "scheduler µs per task" is this machine's time.
use dask_sim::{Cluster, Dist, Graph, Outcome, WorkerKind, graphs, simulate};

/// One simulated run, as figures.
fn figures(name: &str, o: &Outcome, record: &mut dyn FnMut(String, f64)) {
    record(format!("sim {name}: makespan over lower bound"), o.ratio());
    record(format!("sim {name}: makespan (simulated s)"), o.makespan);
    record(format!("sim {name}: lower bound (simulated s)"), o.lower_bound);
    record(format!("sim {name}: MB moved"), o.bytes_moved as f64 / 1e6);
    record(format!("sim {name}: tasks moved by stealing"), o.steals.stolen as f64);
    record(format!("sim {name}: scheduler µs per task"), o.sched_us_per_task);
    record(format!("sim {name}: peak MB on one worker"), o.peak_worker_bytes as f64 / 1e6);
    assert_eq!(o.outputs_done, o.outputs, "sim {name}: not every output computed");
}

fn both(name: &str, g: &Graph, c: &Cluster, record: &mut dyn FnMut(String, f64)) {
    let mut c = c.clone();
    for on in [true, false] {
        c.work_stealing = on;
        let o = simulate(g, &c, false);
        figures(&format!("{name}, stealing {}", if on { "on" } else { "off" }), &o, record);
    }
}

pub fn run(quick: bool, seed: u64, record: &mut dyn FnMut(String, f64)) {
    let scale = if quick { 10 } else { 1 };
    // Stealing cases (8 workers x 1 thread).
    let workers = 8;
    let mut c = Cluster::uniform(workers, 1);
    c.seed = seed;
    let changing = graphs::changing(1000 / scale, 64, 200.0, seed);
    both("changing durations (1,000 x 1 ms then 64 x ~200 ms), 8 workers", &changing, &c, record);
    let mut slow = c.clone();
    slow.workers[0].speed = 0.5;
    let skewed = graphs::merge(2000 / scale, Dist::Heavy(20.0), seed);
    both("one worker at half speed, merge of 2,000 x ~20 ms, 8 workers", &skewed, &slow, record);
    both("one worker at half speed, changing durations, 8 workers", &changing, &slow, record);
    let mut joins = Cluster::uniform(4, 1);
    joins.seed = seed;
    joins.joins = (0..4).map(|_| (1.0, WorkerKind { nthreads: 1, speed: 1.0 })).collect();
    let late = graphs::changing(1000 / scale, 64, 400.0, seed);
    both("4 workers join at 1 s while 4 hold deep queues (changing durations)", &late, &joins, record);

    // Shapes at scale: 100,000 tasks on 1,000 workers.
    let n = 100_000 / scale;
    let big = Cluster { seed, ..Cluster::uniform(1000 / scale, 1) };
    let shapes = [
        graphs::merge(n, Dist::Jitter(50.0), seed),
        graphs::tree(n, 8, Dist::Jitter(50.0), seed),
        graphs::crossv(100, n / 200, Dist::Jitter(50.0), seed),
        graphs::merge(n, Dist::Heavy(50.0), seed),
        graphs::tree(n, 8, Dist::Heavy(50.0), seed),
        graphs::crossv(100, n / 200, Dist::Heavy(50.0), seed),
        graphs::shuffle(300 / scale.min(3), 10_000_000, seed),
    ];
    for g in &shapes {
        let o = simulate(g, &big, false);
        figures(&format!("{} ({} tasks) on {} workers", g.name, g.tasks.len(), big.workers.len()), &o, record);
    }
    // Scheduler cost per task against cluster size: one graph on 10 and on 10,000 workers.
    let g = graphs::merge(n, Dist::Jitter(50.0), seed);
    for w in [10, 10_000 / scale] {
        let c = Cluster { seed, ..Cluster::uniform(w, 1) };
        let o = simulate(&g, &c, false);
        figures(&format!("{} on {w} workers", g.name), &o, record);
    }
}
