//! Adaptive scaling of a local cluster (tier 2): a burst of work scales it from one worker to
//! its maximum, and it shrinks back when idle without losing a held result.
use std::time::{Duration, Instant};

use dask::builtins::slowinc;
use dask::{AdaptOptions, Client, Error, LocalCluster};

fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_burst_scales_up_to_the_maximum_and_idle_workers_go_without_losing_data() {
    let mut cluster = LocalCluster::builder().n_workers(1).threads_per_worker(1).build().unwrap();
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    let opts = AdaptOptions {
        minimum: 1,
        maximum: 4,
        target_duration: Duration::from_secs(1),
        interval: Duration::from_millis(100),
        wait_count: 2,
        ..Default::default()
    };
    cluster.adapt(opts).unwrap();
    // 40 tasks of 150 ms: 6 s of work for 1 s wanted.
    let futures = client.map_args(slowinc, (0..40i64).map(|i| (i, 150u64))).unwrap();
    eventually("scaled up to 4 workers", Duration::from_secs(30), || cluster.n_workers() == 4);
    let values: Vec<i64> = client.gather(&futures).unwrap();
    assert_eq!(values, (1..=40).collect::<Vec<_>>());
    // Idle now: back to the minimum, the held results moved off the workers that went.
    eventually("scaled down to 1 worker", Duration::from_secs(30), || cluster.n_workers() == 1);
    eventually("the scheduler sees one worker", Duration::from_secs(30), || {
        client.scheduler_info().unwrap().workers.len() == 1
    });
    let again: Vec<i64> = client.gather(&futures).unwrap();
    assert_eq!(again, values, "every held result survived the scale-down");
    cluster.stop_adapt();
}

#[test]
fn adapt_refuses_crossed_bounds() {
    let mut cluster = LocalCluster::builder().n_workers(1).threads_per_worker(1).build().unwrap();
    let bad = AdaptOptions { minimum: 3, maximum: 2, ..Default::default() };
    assert!(matches!(cluster.adapt(bad), Err(Error::InvalidArgument(m)) if m.contains("minimum")));
    let bad = AdaptOptions { minimum_cores: Some(8), maximum_cores: Some(2), ..Default::default() };
    assert!(cluster.adapt(bad).is_err());
    // Bounds in cores: workers of one thread, at least 4 cores: 4 workers, with no work at all.
    let opts = AdaptOptions { minimum_cores: Some(4), interval: Duration::from_millis(50), ..Default::default() };
    cluster.adapt(opts).unwrap();
    eventually("minimum_cores keeps 4 one-thread workers", Duration::from_secs(30), || cluster.n_workers() == 4);
}

/// A cluster manager of the user's own (here a LocalCluster behind a lock), resized by the
/// generic `Adaptive`.
struct MyCluster {
    inner: std::sync::Mutex<LocalCluster>,
    downs: std::sync::atomic::AtomicUsize,
}

impl dask::ScalableCluster for MyCluster {
    fn workers(&self) -> usize {
        self.inner.lock().unwrap().n_workers()
    }
    fn scale_up(&self, n: usize) -> dask::Result<()> {
        self.inner.lock().unwrap().scale(n)
    }
    fn scale_down(&self, workers: &[String]) -> dask::Result<()> {
        self.downs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // As many fewer as named (a LocalCluster retires its newest; their values move first).
        let mut c = self.inner.lock().unwrap();
        let n = c.n_workers() - workers.len();
        c.scale(n)
    }
}

#[test]
fn adaptive_resizes_a_cluster_manager_of_ones_own() {
    let cluster = LocalCluster::builder().n_workers(1).threads_per_worker(1).build().unwrap();
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    let mine = std::sync::Arc::new(MyCluster { inner: std::sync::Mutex::new(cluster), downs: Default::default() });
    let opts = AdaptOptions {
        minimum: 1,
        maximum: 3,
        target_duration: Duration::from_secs(1),
        interval: Duration::from_millis(100),
        wait_count: 2,
        ..Default::default()
    };
    let adaptive = dask::Adaptive::start(client.clone(), mine.clone(), opts).unwrap();
    let futures = client.map_args(slowinc, (0..30i64).map(|i| (i, 150u64))).unwrap();
    eventually("scaled up to 3", Duration::from_secs(30), || dask::ScalableCluster::workers(&*mine) == 3);
    let values: Vec<i64> = client.gather(&futures).unwrap();
    eventually("scaled down to 1", Duration::from_secs(30), || dask::ScalableCluster::workers(&*mine) == 1);
    assert!(mine.downs.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(client.gather(&futures).unwrap(), values, "held results survived");
    adaptive.stop();
    let bad = AdaptOptions { minimum: 5, maximum: 2, ..Default::default() };
    assert!(matches!(dask::Adaptive::start(client.clone(), mine, bad), Err(Error::InvalidArgument(_))));
}
