//! One simulated run, for profiling: `cargo run --release -p dask-sim --example scale -- WORKERS TASKS`.
fn main() {
    let mut args = std::env::args().skip(1);
    let workers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let g = dask_sim::graphs::merge(tasks, dask_sim::Dist::Jitter(50.0), 1);
    let c = dask_sim::Cluster::uniform(workers, 1);
    let t = std::time::Instant::now();
    let o = dask_sim::simulate(&g, &c, false);
    println!(
        "{workers} workers, {} tasks: ratio {:.3}, scheduler {:.2} µs/task, {} events, wall {:.2?}",
        g.tasks.len(),
        o.ratio(),
        o.sched_us_per_task,
        o.events,
        t.elapsed()
    );
}
