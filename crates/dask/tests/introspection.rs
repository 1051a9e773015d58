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
    // A part on another version is named, scheduler first.
    let mut odd = v.clone();
    odd.scheduler = "0.0.9".into();
    odd.workers.insert("tcp://10.0.0.9:1234".into(), "9.9.9".into());
    let err = odd.check().unwrap_err().to_string();
    assert!(err.contains("scheduler: 0.0.9, tcp://10.0.0.9:1234: 9.9.9"), "{err}");
    assert!(err.contains(&format!("the client is dask-rs {}", v.client)), "{err}");
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
fn the_task_stream_shows_the_inputs_a_task_fetched() {
    let (cluster, client) = cluster(2, 1);
    let w = cluster.worker_addresses();
    let on = |a: &str| dask::SubmitOptions { workers: vec![a.to_string()], ..Default::default() };
    let x = client.submit_with(inc, (1,), on(&w[0])).unwrap();
    let y = client.submit_with(inc, (&x,), on(&w[1])).unwrap();
    assert_eq!(y.result().unwrap(), 3);
    let records = client.get_task_stream(None, None, None).unwrap();
    let r = records.iter().find(|r| r.key == y.key()).expect("y ran");
    assert_eq!(r.worker, w[1]);
    assert_eq!(r.transfers.len(), 1, "{r:?}");
    let t = &r.transfers[0];
    assert_eq!((t.key.as_str(), t.source.as_str()), (x.key(), w[0].as_str()));
    assert!(t.start_s <= t.stop_s && t.stop_s <= r.start_s && t.nbytes > 0, "{t:?} before {r:?}");
    let rx = records.iter().find(|r| r.key == x.key()).expect("x ran");
    assert!(rx.transfers.is_empty());
}

#[test]
fn call_stack_says_what_runs_where_and_for_how_long() {
    let (cluster, client) = cluster(2, 1);
    let slow = client.map_args(slowinc, [(1i64, 1500u64), (2, 1500)]).unwrap();
    let start = std::time::Instant::now();
    let running = loop {
        let now = client.call_stack::<&str>(&[]).unwrap();
        if now.values().map(Vec::len).sum::<usize>() == 2 {
            break now;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the two tasks never ran at once: {now:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut workers: Vec<&String> = running.keys().collect();
    workers.sort();
    let mut expected = cluster.worker_addresses();
    expected.sort();
    assert_eq!(workers, expected.iter().collect::<Vec<_>>(), "one on each worker");
    for tasks in running.values() {
        assert_eq!(tasks.len(), 1);
        assert!(slow.iter().any(|f| f.key() == tasks[0].key) && tasks[0].thread == 0, "{tasks:?}");
        assert!(tasks[0].started <= std::time::SystemTime::now());
    }
    // Only the keys asked about.
    let one = client.call_stack(&[slow[0].key()]).unwrap();
    assert_eq!(one.values().flatten().map(|t| t.key.as_str()).collect::<Vec<_>>(), [slow[0].key()]);
    client.gather(&slow).unwrap();
    assert!(client.call_stack::<&str>(&[]).unwrap().values().all(Vec::is_empty), "nothing runs now");
}

#[test]
fn profile_sums_the_time_of_each_task_prefix() {
    let (_cluster, client) = cluster(1, 2);
    let began = std::time::SystemTime::now();
    let fast = client.map(inc, 0..20i64).unwrap();
    let slow = client.map_args(slowinc, (0..4i64).map(|i| (i, 30u64))).unwrap();
    client.gather(&fast).unwrap();
    client.gather(&slow).unwrap();
    let profile = client.profile(Some(began), None).unwrap();
    let of = |p: &str| profile.iter().find(|x| x.prefix == p).cloned().unwrap_or_else(|| panic!("{p}: {profile:?}"));
    assert_eq!((of("inc").count, of("slowinc").count, of("slowinc").errors), (20, 4, 0));
    assert!(of("slowinc").compute >= Duration::from_millis(120) && of("slowinc").longest >= Duration::from_millis(30));
    assert_eq!(profile[0].prefix, "slowinc", "the costliest first: {profile:?}");
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
