//! Errors, history and introspection (tier 2): retry of failed futures, a key's story, what
//! runs where, bytes in memory.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dask::builtins::{inc, slowinc};
use dask::{Client, LocalCluster};

fn cluster(n: usize, threads: usize) -> (LocalCluster, Client) {
    let cluster = LocalCluster::builder().n_workers(n).threads_per_worker(threads).build().expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    (cluster, client)
}

static TRIES: AtomicUsize = AtomicUsize::new(0);

#[dask::task]
fn fails_once(x: i64) -> Result<i64, String> {
    if TRIES.fetch_add(1, Ordering::SeqCst) == 0 { Err("the first try fails".into()) } else { Ok(x * 2) }
}

#[test]
fn retry_runs_a_failed_chain_again() {
    let (_cluster, client) = cluster(1, 1);
    let a = client.submit(fails_once, (21,)).unwrap();
    let b = client.submit(inc, (&a,)).unwrap();
    assert!(b.result().is_err());
    assert!(a.exception().is_some());
    b.retry();
    assert_eq!(b.result_timeout(Duration::from_secs(30)).unwrap(), 43);
    assert_eq!(a.result().unwrap(), 42);
    // Retrying a future that did not fail changes nothing.
    client.retry(std::slice::from_ref(&a)).unwrap();
    assert_eq!(a.result().unwrap(), 42);
}

#[test]
fn story_processing_and_nbytes_tell_where_things_are() {
    let (_cluster, client) = cluster(1, 1);
    let x = client.submit(inc, (1,)).unwrap();
    x.result().unwrap();
    let story = client.story(x.key()).unwrap();
    let steps: Vec<(&str, &str)> = story.iter().map(|l| (l.from.as_str(), l.to.as_str())).collect();
    assert!(steps.contains(&("processing", "memory")), "{steps:?}");
    assert!(story.iter().all(|l| l.key == x.key() && l.ago_s >= 0.0));
    assert!(client.story("nothing-like-it").unwrap().is_empty());

    let slow = client.submit(slowinc, (1, 1_000)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = client.processing().unwrap();
        if p.values().flatten().any(|k| k == slow.key()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slow never shows as processing: {p:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let sizes = client.nbytes(false).unwrap();
    assert!(sizes[x.key()] > 0);
    let by_prefix = client.nbytes(true).unwrap();
    assert!(by_prefix.contains_key("inc"), "{by_prefix:?}");
    assert_eq!(client.ncores().unwrap().values().sum::<u32>(), 1);
}

#[dask::task]
fn deep_panic(x: i64) -> i64 {
    if x > 0 {
        panic!("the bottom of deep_panic was reached");
    }
    x
}

#[test]
fn a_panicking_task_gives_its_worker_side_traceback() {
    let (_cluster, client) = cluster(1, 1);
    let f = client.submit(deep_panic, (1,)).unwrap();
    assert!(f.result().is_err());
    let tb = f.traceback().expect("a panic has a traceback");
    assert!(tb.contains("deep_panic"), "the task's frame is in it:\n{tb}");
    // A task that failed by returning Err, or did not fail, has none.
    let ok = client.submit(deep_panic, (0,)).unwrap();
    ok.result().unwrap();
    assert!(ok.traceback().is_none());
}

#[test]
fn get_versions_names_every_part_and_checks_them() {
    let (_cluster, client) = cluster(2, 1);
    let v = client.get_versions(true).unwrap();
    assert_eq!(v.scheduler, v.client);
    assert_eq!(v.workers.len(), 2);
    assert!(v.workers.values().all(|w| *w == v.client));
}

#[test]
fn the_task_stream_tells_when_and_where_each_task_ran() {
    let (cluster, client) = cluster(2, 2);
    let ts = client.task_stream();
    let fs = client.map_args(slowinc, (0..8i64).map(|i| (i, 20u64))).unwrap();
    client.gather(&fs).unwrap();
    let records = ts.records().unwrap();
    let keys: std::collections::HashSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert!(fs.iter().all(|f| keys.contains(f.key())), "every task is in the stream");
    let workers = cluster.worker_addresses();
    for r in records.iter().filter(|r| r.key.starts_with("slowinc")) {
        assert!(workers.contains(&r.worker), "{r:?}");
        assert!(r.thread < 2 && r.status == "OK");
        assert!(r.stop_s - r.start_s >= 0.019, "it ran 20 ms: {r:?}");
    }
    assert_eq!(client.get_task_stream(None, None, Some(3)).unwrap().len(), 3);
    let before = std::time::SystemTime::now() - Duration::from_secs(3600);
    assert!(client.get_task_stream(None, Some(before), None).unwrap().is_empty());
}

#[test]
fn futures_of_finds_the_futures_in_a_nested_collection() {
    let (_cluster, client) = cluster(1, 1);
    let a = client.map(inc, 0..3).unwrap();
    let b = vec![client.submit(inc, (10,)).unwrap()];
    let nested: std::collections::BTreeMap<&str, Vec<dask::Future<i64>>> = [("a", a.clone()), ("b", b.clone())].into();
    let found = dask::futures_of(&nested);
    let keys: Vec<&str> = found.iter().map(|f| f.key()).collect();
    let expected: Vec<&str> = a.iter().chain(&b).map(|f| f.key()).collect();
    assert_eq!(keys, expected);
    dask::wait(&found, None, dask::ReturnWhen::AllCompleted).unwrap();
}
