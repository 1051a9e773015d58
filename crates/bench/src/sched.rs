//! The placement workloads of `../shared/bench/peers/dask_sched_bench.py` (`skew`, `late_join`):
//! tasks sleep, so the 2 cores are not the bottleneck, and the figure is the makespan against
//! the best possible one. Same seeded durations and shapes as the script; each run uses a fresh
//! `LocalCluster` of worker processes with 1 thread each, every worker under its nanny.
use std::time::{Duration, Instant};

use dask::builtins::inc;
use dask::{Client, LocalCluster, SubmitOptions};

/// The script's `source`: one small task every other task depends on.
#[dask::task]
pub fn source() -> i64 {
    1
}

/// The script's `nap`: `x + 1` after sleeping `d` seconds.
#[dask::task]
pub fn nap_s(x: i64, d: f64) -> i64 {
    std::thread::sleep(Duration::from_secs_f64(d));
    x + 1
}

/// `durations_skew()` of the script, as Python computed it (`random.Random(7)`).
pub fn skew_durations() -> Vec<f64> {
    include_str!("skew_durations.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.trim().parse().expect("a duration"))
        .collect()
}

fn impure() -> SubmitOptions {
    SubmitOptions { pure: false, ..Default::default() }
}

fn cluster(n: usize) -> (LocalCluster, Client) {
    let cluster =
        LocalCluster::builder().n_workers(n).threads_per_worker(1).processes(true).build().expect("a local cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    client.wait_for_workers(n, None).expect("workers");
    let warm = client.map_with(inc, (0..100).map(|i| (i,)), impure(), None).expect("warm up");
    let _: Vec<i64> = client.gather(&warm).expect("warm up");
    (cluster, client)
}

/// What stealing did in a run, from the scheduler: (steals asked, tasks moved).
fn steals(client: &Client) -> (f64, f64) {
    let info = client.scheduler_info().expect("scheduler info");
    (info.steals_asked as f64, info.steals_done as f64)
}

/// A run: makespan, lower bound, steals asked, tasks moved.
pub struct Run {
    pub makespan: f64,
    pub lower_bound: f64,
    pub asked: f64,
    pub moved: f64,
}

/// `skew`: 4 workers; one source task, then 400 tasks that use it and sleep for heavy-tailed
/// durations, submitted one by one. Lower bound: max(total / 4, longest).
pub fn skew() -> Run {
    let ds = skew_durations();
    let (cluster, client) = cluster(4);
    let t = Instant::now();
    let s = client.submit_with(source, (), impure()).expect("submit");
    let fs: Vec<_> = ds.iter().map(|d| client.submit_with(nap_s, (&s, *d), impure()).expect("submit")).collect();
    let _: Vec<i64> = client.gather(&fs).expect("gather");
    let makespan = t.elapsed().as_secs_f64();
    let (asked, moved) = steals(&client);
    client.close();
    cluster.close();
    let lower_bound = (ds.iter().sum::<f64>() / 4.0).max(ds.iter().copied().fold(0.0, f64::max));
    Run { makespan, lower_bound, asked, moved }
}

/// `late_join`: 2 workers; one source task, then 800 tasks of 10 ms that use it; 0.5 s after
/// submission the cluster scales to 4. Ideal: 0.5 + (800 × 0.01 − 2 × 0.5) / 4 = 2.25 s.
pub fn late_join() -> Run {
    let (mut cluster, client) = cluster(2);
    let t = Instant::now();
    let s = client.submit_with(source, (), impure()).expect("submit");
    let fs: Vec<_> = (0..800).map(|_| client.submit_with(nap_s, (&s, 0.01), impure()).expect("submit")).collect();
    std::thread::sleep(Duration::from_millis(500));
    cluster.scale(4).expect("scale up");
    let _: Vec<i64> = client.gather(&fs).expect("gather");
    let makespan = t.elapsed().as_secs_f64();
    let (asked, moved) = steals(&client);
    client.close();
    cluster.close();
    Run { makespan, lower_bound: 0.5 + (800.0 * 0.01 - 2.0 * 0.5) / 4.0, asked, moved }
}
