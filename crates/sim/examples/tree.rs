//! One tree reduction run, for profiling: `cargo run --release -p dask-sim --example tree`.
fn main() {
    let g = dask_sim::graphs::tree(100_000, 8, dask_sim::Dist::Jitter(50.0), 1);
    let o = dask_sim::simulate(&g, &dask_sim::Cluster::uniform(1000, 1), false);
    println!("tree: scheduler {:.2} µs/task, ratio {:.3}", o.sched_us_per_task, o.ratio());
}
