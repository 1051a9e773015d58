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

impl Run {
    /// Its figures, named `name: ...`; `bound` is what the lower bound is called.
    pub fn record(&self, name: &str, what: &str, bound: &str, record: &mut dyn FnMut(String, f64)) {
        record(format!("{name}: {what}, makespan (s)"), self.makespan);
        record(format!("{name}: {bound} (s)"), self.lower_bound);
        record(format!("{name}: makespan over {bound}"), self.makespan / self.lower_bound);
        record(format!("{name}: steals asked"), self.asked);
        record(format!("{name}: tasks moved by stealing"), self.moved);
    }
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

/// Bytes of a leaf of `reduction`: incompressible, different for each seed.
#[dask::task]
pub fn leaf(seed: u64, n: usize) -> dask::Bytes {
    crate::faults::make_array::call(seed, n)
}

/// The first level of `reduction`: the sizes of its inputs.
#[dask::task]
pub fn sizes(parts: Vec<dask::Bytes>) -> u64 {
    parts.iter().map(|p| p.len() as u64).sum()
}

/// The upper levels of `reduction`.
#[dask::task]
pub fn total_of(parts: Vec<u64>) -> u64 {
    parts.iter().sum()
}

/// A tree reduction (fan-in 8) over `n` values of 10 MB on 2 worker processes of 1 thread,
/// submitted as one graph, every leaf first. Returns (wall seconds, the most bytes the scheduler
/// counted on one worker, the most process memory a worker reported).
pub fn reduction(n: usize) -> (f64, u64, u64) {
    const SIZE: usize = 10_000_000;
    let (cluster, client) = cluster(2);
    let mut g = dask::Graph::new();
    let mut level: Vec<String> = (0..n)
        .map(|i| {
            let key = format!("leaf-{i}");
            g.add(key.clone(), leaf, (i as u64, SIZE)).unwrap();
            key
        })
        .collect();
    let mut depth = 0;
    while level.len() > 1 {
        depth += 1;
        level = level
            .chunks(8)
            .enumerate()
            .map(|(j, c)| {
                let key = format!("sum-{depth}-{j}");
                if depth == 1 {
                    let parts: Vec<dask::Ref<dask::Bytes>> = c.iter().map(|k| dask::Ref::new(k.clone())).collect();
                    g.add(key.clone(), sizes, (parts,)).unwrap();
                } else {
                    let parts: Vec<dask::Ref<u64>> = c.iter().map(|k| dask::Ref::new(k.clone())).collect();
                    g.add(key.clone(), total_of, (parts,)).unwrap();
                }
                key
            })
            .collect();
    }
    // Watch what each worker holds while it runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let client = Client::connect(&cluster.scheduler_address()).expect("connect");
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut held, mut process) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(info) = client.scheduler_info() {
                    for w in &info.workers {
                        held = held.max(w.memory);
                        process = process.max(w.memory_process);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            client.close();
            (held, process)
        })
    };
    let t = Instant::now();
    let got: u64 = client.get(&g, &level[0]).expect("reduction");
    let wall = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (held, process) = watcher.join().expect("watcher");
    assert_eq!(got, (n * SIZE) as u64);
    client.close();
    cluster.close();
    (wall, held, process)
}
