//! Peak memory of a tree reduction (fan-in 8) over 10,000 values of 10 MB on 2 workers, its
//! leaves grouped in submission order or at random:
//! `cargo run --release -p dask-sim --example reduction`.
fn main() {
    use dask_sim::{Cluster, Dist, graphs, simulate};
    for g in [
        graphs::tree_of(10_000, 8, Dist::Jitter(5.0), 10_000_000, 1),
        graphs::tree_scattered(10_000, 8, Dist::Jitter(5.0), 10_000_000, 1),
    ] {
        for threads in [1, 2] {
            let o = simulate(&g, &Cluster::uniform(2, threads), false);
            println!(
                "{}, 2 workers x {threads}: peak {:.0} MB on one worker ({:.1} inputs), makespan {:.2} s, ratio {:.3}",
                g.name,
                o.peak_worker_bytes as f64 / 1e6,
                o.peak_worker_bytes as f64 / 1e7,
                o.makespan,
                o.ratio()
            );
        }
    }
}
