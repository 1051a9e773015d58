//! In-process cluster tests (tier 2): a scheduler and workers as tasks of this process, over
//! loopback gRPC; every client API call, and its error paths.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dask::builtins::{add, inc, slowinc, sum_list};
use dask::{
    Client, Error, Errors, FutureStatus, Graph, KeyTree, LocalCluster, Nested, Ref, ReturnWhen, ScatterOptions,
    SubmitOptions, as_completed, wait,
};

const LONG: Duration = Duration::from_secs(60);

fn cluster(n: usize, threads: usize) -> (LocalCluster, Client) {
    let cluster = LocalCluster::builder().n_workers(n).threads_per_worker(threads).build().expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    (cluster, client)
}

/// Polls `f` until it holds (state that settles asynchronously, such as releases).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + LONG;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[dask::task]
fn counted(x: i64) -> i64 {
    RUNS.fetch_add(1, Ordering::SeqCst);
    x * 10
}

static FLAKY: AtomicUsize = AtomicUsize::new(0);

#[dask::task]
fn flaky(x: i64) -> Result<i64, String> {
    if FLAKY.fetch_add(1, Ordering::SeqCst) == 0 { Err("first try fails".into()) } else { Ok(x) }
}

static ORDER: Mutex<Vec<i64>> = Mutex::new(Vec::new());

#[dask::task]
fn record(x: i64) -> i64 {
    ORDER.lock().unwrap().push(x);
    x
}

#[dask::task]
fn concat(parts: Vec<String>, sep: String) -> String {
    parts.join(&sep)
}

#[dask::task]
fn sum_map(m: BTreeMap<String, i64>) -> i64 {
    m.values().sum()
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
struct Point {
    x: f64,
    y: f64,
}

#[dask::task]
fn norm(p: Point) -> f64 {
    (p.x * p.x + p.y * p.y).sqrt()
}

#[dask::task]
fn boom(msg: String) -> i64 {
    panic!("{msg}")
}

#[dask::task]
fn fails(msg: String) -> Result<i64, String> {
    Err(msg)
}

static FORGOTTEN: AtomicUsize = AtomicUsize::new(0);

#[dask::task]
fn side_effect(ms: u64) -> i64 {
    std::thread::sleep(Duration::from_millis(ms));
    FORGOTTEN.fetch_add(1, Ordering::SeqCst);
    1
}

/// A task the workers do not know (no registration): implemented by hand.
struct Unregistered;
impl dask::__private::Task for Unregistered {
    const NAME: &'static str = "no-such-function";
    type Args = (i64,);
    type Output = i64;
    fn run(_: (i64,)) -> Result<i64, String> {
        unreachable!()
    }
}

/// Claims `inc` takes a string: the worker's `inc` cannot decode it.
struct WrongInc;
impl dask::__private::Task for WrongInc {
    const NAME: &'static str = "inc";
    type Args = (String,);
    type Output = i64;
    fn run(_: (String,)) -> Result<i64, String> {
        unreachable!()
    }
}

#[test]
fn submit_result_and_dependencies() {
    let (_c, client) = cluster(2, 1);
    let a = client.submit(inc, (1,)).unwrap();
    let b = client.submit(add, (&a, 10)).unwrap();
    assert_eq!(b.result().unwrap(), 12);
    assert_eq!(a.result().unwrap(), 2);
    assert!(a.done() && b.done());
    assert_eq!(b.status(), FutureStatus::Finished);
    assert!(a.key().starts_with("inc-") && a.key().len() == "inc-".len() + 32, "{}", a.key());
    // Struct arguments and futures inside a Vec.
    let n = client.submit(norm, (Point { x: 3.0, y: 4.0 },)).unwrap();
    assert_eq!(n.result().unwrap(), 5.0);
    let xs = client.map(inc, 0..10).unwrap();
    let total = client.submit(sum_list, (&xs,)).unwrap();
    assert_eq!(total.result().unwrap(), 55);
    let parts = client.scatter(vec!["a".to_string(), "b".to_string()]).unwrap();
    let joined = client.submit(concat, (parts.clone(), "-")).unwrap();
    assert_eq!(joined.result().unwrap(), "a-b");
}

#[test]
fn pure_keys_run_once_and_impure_keys_differ() {
    let (_c, client) = cluster(1, 1);
    let before = RUNS.load(Ordering::SeqCst);
    let a = client.submit(counted, (7,)).unwrap();
    let b = client.submit(counted, (7,)).unwrap();
    assert_eq!(a.key(), b.key());
    assert_eq!((a.result().unwrap(), b.result().unwrap()), (70, 70));
    assert_eq!(RUNS.load(Ordering::SeqCst) - before, 1, "identical pure submissions run once");
    let c = client.submit_with(counted, (7,), SubmitOptions { pure: false, ..Default::default() }).unwrap();
    let d = client.submit_with(counted, (7,), SubmitOptions { pure: false, ..Default::default() }).unwrap();
    assert_ne!(c.key(), d.key());
    assert_eq!(c.result().unwrap() + d.result().unwrap(), 140);
    let e = client.submit_with(inc, (1,), SubmitOptions { key: Some("my-key".into()), ..Default::default() }).unwrap();
    assert_eq!(e.key(), "my-key");
    assert_eq!(e.result().unwrap(), 2);
}

#[test]
fn workers_restrictions_retries_and_priority() {
    let (cluster, client) = cluster(2, 1);
    let target = cluster.worker_addresses()[1].clone();
    let f =
        client.submit_with(inc, (5,), SubmitOptions { workers: vec![target.clone()], ..Default::default() }).unwrap();
    assert_eq!(f.result().unwrap(), 6);
    assert_eq!(client.who_has(&f).unwrap()[f.key()], vec![target.clone()]);
    // By name too.
    let g =
        client.submit_with(inc, (6,), SubmitOptions { workers: vec!["local-0".into()], ..Default::default() }).unwrap();
    assert_eq!(g.result().unwrap(), 7);
    assert_eq!(client.who_has(&g).unwrap()[g.key()], vec![cluster.worker_addresses()[0].clone()]);

    let r = client.submit_with(flaky, (3,), SubmitOptions { retries: 1, ..Default::default() }).unwrap();
    assert_eq!(r.result().unwrap(), 3);

    // One thread busy with a blocker; then low and high priority tasks queue behind it.
    let only = SubmitOptions { workers: vec![target.clone()], ..Default::default() };
    let blocker = client.submit_with(slowinc, (0, 300), only.clone()).unwrap();
    let low = client.submit_with(record, (1,), SubmitOptions { priority: -10, ..only.clone() }).unwrap();
    let high = client.submit_with(record, (2,), SubmitOptions { priority: 10, ..only.clone() }).unwrap();
    blocker.result().unwrap();
    low.result().unwrap();
    high.result().unwrap();
    let order = ORDER.lock().unwrap().clone();
    assert_eq!(order, vec![2, 1], "higher priority runs first");
}

#[test]
fn map_keys_and_prefix() {
    let (_c, client) = cluster(2, 1);
    let fs = client.map(inc, 0..1000).unwrap();
    let v: Vec<i64> = client.gather(&fs).unwrap();
    assert_eq!(v, (1..=1000).collect::<Vec<_>>());
    let keys: Vec<String> = (0..3).map(|i| format!("x-{i}")).collect();
    let fs = client.map_with(inc, (0..3).map(|i| (i,)), SubmitOptions::default(), Some(keys.clone())).unwrap();
    assert_eq!(fs.iter().map(|f| f.key().to_string()).collect::<Vec<_>>(), keys);
    let prefix = SubmitOptions { key_prefix: Some("plusone".into()), batch_size: Some(2), ..Default::default() };
    let fs = client.map_with(inc, (0..3).map(|i| (i,)), prefix, None).unwrap();
    assert!(fs.iter().all(|f| f.key().starts_with("plusone-")));
    assert_eq!(client.gather(&fs).unwrap(), vec![1, 2, 3]);
    // `key` names one task: map_with refuses it rather than reading it as a prefix.
    let exact = SubmitOptions { key: Some("plusone".into()), ..Default::default() };
    let e = client.map_with(inc, (0..3).map(|i| (i,)), exact.clone(), None).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("key_prefix")), "{e}");
    assert_eq!(client.submit_with(inc, (7,), exact).unwrap().key(), "plusone");
    let sums = client.map_args(add, (0..5).map(|i| (i, i))).unwrap();
    assert_eq!(client.gather(&sums).unwrap(), vec![0, 2, 4, 6, 8]);
}

#[test]
fn gather_nested_and_skip() {
    let (_c, client) = cluster(2, 1);
    let one = client.submit(inc, (1,)).unwrap();
    assert_eq!(client.gather(&one).unwrap(), 2);
    let mut m: HashMap<String, Vec<dask::Future<i64>>> = HashMap::new();
    m.insert("a".into(), client.map(inc, 0..3).unwrap());
    m.insert("b".into(), client.map(inc, 10..12).unwrap());
    let got = client.gather(&m).unwrap();
    assert_eq!(got["a"], vec![1, 2, 3]);
    assert_eq!(got["b"], vec![11, 12]);
    let mixed = vec![
        client.submit(inc, (1,)).unwrap(),
        client.submit(fails, ("no".to_string(),)).unwrap(),
        client.submit(inc, (2,)).unwrap(),
    ];
    let err = client.gather(&mixed).unwrap_err();
    assert!(matches!(&err, Error::Task(t) if t.message == "no"), "{err}");
    assert_eq!(client.gather_with(&mixed, Errors::Skip).unwrap(), vec![2, 3]);
}

#[test]
fn scatter_forms_and_placement() {
    let (cluster, client) = cluster(2, 1);
    let fs = client.scatter(vec![1i64, 2, 3, 4]).unwrap();
    assert_eq!(client.gather(&fs).unwrap(), vec![1, 2, 3, 4]);
    let holders: std::collections::HashSet<String> = client.who_has(&fs).unwrap().into_values().flatten().collect();
    assert_eq!(holders.len(), 2, "spread over both workers");
    let one = client.scatter_one(Point { x: 1.0, y: 0.0 }).unwrap();
    assert_eq!(client.submit(norm, (&one,)).unwrap().result().unwrap(), 1.0);
    let mut m = HashMap::new();
    m.insert("k1", 5i64);
    m.insert("k2", 6i64);
    let fm = client.scatter_map(m).unwrap();
    assert_eq!(fm["k2"].result().unwrap(), 6);
    let target = cluster.worker_addresses()[0].clone();
    let placed = client
        .scatter_with(vec![100i64], ScatterOptions { workers: vec![target.clone()], ..Default::default() })
        .unwrap();
    assert_eq!(client.who_has(&placed).unwrap()[placed[0].key()], vec![target]);
    let everywhere =
        client.scatter_with(vec![200i64], ScatterOptions { broadcast: true, ..Default::default() }).unwrap();
    assert_eq!(client.who_has(&everywhere).unwrap()[everywhere[0].key()].len(), 2);
    let mut bm = BTreeMap::new();
    bm.insert("a".to_string(), 1i64);
    bm.insert("b".to_string(), 2i64);
    assert_eq!(client.submit(sum_map, (bm,)).unwrap().result().unwrap(), 3);
    let err = client
        .scatter_with(vec![1i64], ScatterOptions { workers: vec!["nobody".into()], ..Default::default() })
        .unwrap_err();
    assert!(err.to_string().contains("nobody"), "{err}");
}

#[test]
fn get_runs_a_graph() {
    let (_c, client) = cluster(2, 1);
    let mut g = Graph::new();
    g.add("a", inc, (1,)).unwrap();
    g.add("b", inc, (Ref::<i64>::new("a"),)).unwrap();
    g.add("c", add, (Ref::<i64>::new("a"), Ref::<i64>::new("b"))).unwrap();
    g.add("unused", inc, (100,)).unwrap();
    assert_eq!(client.get::<i64>(&g, "c").unwrap(), 5);
    assert_eq!(client.get_many::<i64>(&g, &["a", "b", "c"]).unwrap(), vec![2, 3, 5]);
    let nested = client.get_nested::<i64>(&g, KeyTree::from(vec![KeyTree::from(vec!["a", "b"]), "c".into()])).unwrap();
    assert_eq!(nested, Nested::List(vec![Nested::List(vec![Nested::Value(2), Nested::Value(3)]), Nested::Value(5)]));
    let err = client.get::<i64>(&g, "nope").unwrap_err();
    assert!(err.to_string().contains("not in the graph"), "{err}");
    // A reference to a key that is nowhere.
    let mut bad = Graph::new();
    bad.add("d", inc, (Ref::<i64>::new("missing"),)).unwrap();
    let err = client.get::<i64>(&bad, "d").unwrap_err();
    assert!(matches!(&err, Error::Task(t) if t.kind == "invalid-graph" && t.message.contains("missing")), "{err}");
    // A cycle.
    let mut cyc = Graph::new();
    cyc.add("p", inc, (Ref::<i64>::new("q"),)).unwrap();
    cyc.add("q", inc, (Ref::<i64>::new("p"),)).unwrap();
    let err = client.get::<i64>(&cyc, "p").unwrap_err();
    assert!(err.to_string().contains("cycle"), "{err}");
}

#[test]
fn future_timeout_cancel_callbacks_and_release() {
    let (_c, client) = cluster(1, 1);
    let slow = client.submit_with(slowinc, (1, 2000), SubmitOptions { pure: false, ..Default::default() }).unwrap();
    let err = slow.result_timeout(Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(!slow.done());
    slow.cancel();
    assert!(slow.cancelled());
    assert!(matches!(slow.result().unwrap_err(), Error::Cancelled { .. }));

    let (tx, rx) = std::sync::mpsc::channel();
    let f = client.submit(inc, (41,)).unwrap();
    f.add_done_callback(move |s| tx.send(s).unwrap());
    assert_eq!(rx.recv_timeout(LONG).unwrap(), FutureStatus::Finished);
    assert_eq!(f.result().unwrap(), 42);

    let e = client.submit(fails, ("bad input".to_string(),)).unwrap();
    let exc = e.exception().expect("an error");
    assert_eq!(exc.message, "bad input");
    assert_eq!(e.status(), FutureStatus::Error);

    // Dropping the last handle releases the task and its data on the cluster.
    let held = client.map(inc, 1000..1100).unwrap();
    client.gather(&held).unwrap();
    assert!(client.scheduler_info().unwrap().tasks >= 100);
    drop(held);
    drop((f, e, slow));
    eventually("every task released", || client.scheduler_info().unwrap().tasks == 0);
    eventually("every value freed on the worker", || client.has_what().unwrap().values().all(|k| k.is_empty()));
}

#[test]
fn wait_and_as_completed() {
    let (_c, client) = cluster(2, 1);
    let fast = client.submit(inc, (1,)).unwrap();
    let slow = client.submit_with(slowinc, (1, 1500), SubmitOptions { pure: false, ..Default::default() }).unwrap();
    let both = vec![fast.clone(), slow.clone()];
    let r = wait(&both, None, ReturnWhen::FirstCompleted).unwrap();
    assert!(!r.done.is_empty());
    assert!(r.done.iter().any(|f| f.key() == fast.key()));
    let err = wait(&both, Some(Duration::from_millis(10)), ReturnWhen::AllCompleted);
    // The slow one may not be done yet: a timeout, not a hang.
    if let Err(e) = err {
        assert!(matches!(e, Error::Timeout { .. }));
    }
    let r = wait(&both, None, ReturnWhen::AllCompleted).unwrap();
    assert_eq!((r.done.len(), r.not_done.len()), (2, 0));

    let mut ac = as_completed(client.map(inc, 0..5).unwrap());
    let mut seen = Vec::new();
    let mut added = false;
    while let Some(f) = ac.next() {
        seen.push(f.result().unwrap());
        if !added {
            ac.add(client.submit(inc, (100,)).unwrap());
            added = true;
        }
    }
    seen.sort();
    assert_eq!(seen, vec![1, 2, 3, 4, 5, 101]);
    let with: Vec<i64> = as_completed(client.map(inc, 0..3).unwrap()).with_results().map(|(_, r)| r.unwrap()).collect();
    assert_eq!(with.len(), 3);
    let n: usize = as_completed(client.map(inc, 10..20).unwrap()).batches().map(|b| b.len()).sum();
    assert_eq!(n, 10);
}

#[test]
fn fire_and_forget_runs_after_the_future_is_dropped() {
    let (_c, client) = cluster(1, 1);
    let before = FORGOTTEN.load(Ordering::SeqCst);
    let f = client.submit_with(side_effect, (200,), SubmitOptions { pure: false, ..Default::default() }).unwrap();
    client.fire_and_forget(f);
    // Another client disconnecting does not matter either.
    let other = Client::connect(&client.scheduler_address()).unwrap();
    other.close();
    eventually("the forgotten task ran", || FORGOTTEN.load(Ordering::SeqCst) > before);
    eventually("and was released", || client.scheduler_info().unwrap().tasks == 0);
}

#[test]
fn queries_and_scheduler_file() {
    let (cluster, client) = cluster(2, 3);
    client.wait_for_workers(2, Some(LONG)).unwrap();
    let err = client.wait_for_workers(5, Some(Duration::from_millis(100))).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let nthreads = client.nthreads().unwrap();
    assert_eq!(nthreads.len(), 2);
    assert!(nthreads.values().all(|n| *n == 3));
    let info = client.scheduler_info().unwrap();
    assert_eq!(info.address, cluster.scheduler_address());
    let mut names: Vec<_> = info.workers.iter().map(|w| w.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["local-0", "local-1"]);
    let f = client.submit(inc, (1,)).unwrap();
    f.result().unwrap();
    let who = client.who_has(&f).unwrap();
    let holder = &who[f.key()][0];
    assert!(client.has_what().unwrap()[holder].contains(&f.key().to_string()));
    let dir = std::env::temp_dir().join(format!("dask-rs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler.json");
    client.write_scheduler_file(&path).unwrap();
    let other = Client::from_scheduler_file(&path).unwrap();
    assert_eq!(other.submit(inc, (1,)).unwrap().result().unwrap(), 2);
    other.close();
    assert!(matches!(other.submit(inc, (1,)), Err(Error::Closed)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn task_errors_carry_context_and_propagate() {
    let (_c, client) = cluster(1, 1);
    let bad = client.submit(fails, ("broken".to_string(),)).unwrap();
    let dependent = client.submit(inc, (&bad,)).unwrap();
    let Error::Task(root) = bad.result().unwrap_err() else { panic!("a task error") };
    assert_eq!((root.message.as_str(), root.kind.as_str(), root.function.as_str()), ("broken", "error", "fails"));
    assert_eq!(root.key, bad.key());
    assert!(root.worker.starts_with("tcp://"), "{}", root.worker);
    let Error::Task(dep) = dependent.result().unwrap_err() else { panic!("a task error") };
    assert_eq!(dep, root, "a dependent fails with the same cause");

    let p = client.submit(boom, ("kaboom".to_string(),)).unwrap();
    let Error::Task(t) = p.result().unwrap_err() else { panic!("a task error") };
    assert_eq!((t.kind.as_str(), t.message.as_str()), ("panic", "kaboom"));
    // The worker survived its panic.
    assert_eq!(client.submit(inc, (1,)).unwrap().result().unwrap(), 2);

    let u = client.submit(Unregistered, (1,)).unwrap();
    let Error::Task(t) = u.result().unwrap_err() else { panic!("a task error") };
    assert_eq!(t.kind, "unknown-function");
    assert!(t.message.contains("no-such-function"), "{}", t.message);

    let w = client.submit(WrongInc, ("one".to_string(),)).unwrap();
    let Error::Task(t) = w.result().unwrap_err() else { panic!("a task error") };
    assert_eq!(t.kind, "bad-arguments", "{}", t.message);
}

#[test]
fn connecting_to_nothing_fails_fast_with_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = std::time::Instant::now();
    let err = Client::connect_with_timeout(&format!("tcp://127.0.0.1:{port}"), Duration::from_millis(500)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "bounded by the timeout");
    let msg = err.to_string();
    assert!(matches!(err, Error::Connect { .. }), "{msg}");
    assert!(msg.contains("is dask-scheduler running there?"), "{msg}");
    let err = Client::connect("udp://nowhere").unwrap_err();
    assert!(err.to_string().contains("expected tcp://HOST:PORT"), "{err}");
}

#[test]
fn scheduler_killed_while_waiting_is_an_error_not_a_hang() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sched_token = shutdown.child_token();
    let address = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (h, run) = dask_scheduler::server::run(listener, Default::default(), sched_token.clone()).await.unwrap();
        tokio::spawn(run);
        let mut config = dask_worker::server::WorkerConfig::new(h.address.clone());
        config.nthreads = 1;
        let (_w, run) = dask_worker::server::start(config, shutdown.child_token()).await.unwrap();
        tokio::spawn(run);
        h.address.to_string()
    });
    let client = Client::connect(&address).unwrap();
    let f = client.submit_with(slowinc, (1, 5000), SubmitOptions { pure: false, ..Default::default() }).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    sched_token.cancel();
    let err = f.result_timeout(LONG).unwrap_err();
    assert!(matches!(err, Error::SchedulerLost(_)), "{err}");
    assert!(matches!(client.submit(inc, (1,)), Err(Error::SchedulerLost(_))));
    shutdown.cancel();
    rt.shutdown_timeout(Duration::from_secs(1));
}

#[test]
fn worker_lost_mid_graph_results_still_right() {
    let (mut cluster, client) = cluster(3, 1);
    // A chain of slow tasks with a fan-in, so results live on every worker.
    let leaves = client.map_with(slowinc, (0..30).map(|i| (i, 20)), SubmitOptions::default(), None).unwrap();
    let total = client.submit(sum_list, (&leaves,)).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    cluster.kill_worker(0);
    assert_eq!(total.result_timeout(LONG).unwrap(), (1..=30).sum::<i64>());
    let values: Vec<i64> = client.gather(&leaves).unwrap();
    assert_eq!(values, (1..=30).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_api() {
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::builder().n_workers(1).threads_per_worker(1).build())
        .await
        .unwrap()
        .unwrap();
    let client = Client::connect_async(&cluster.scheduler_address()).await.unwrap();
    let a = client.submit(inc, (1,)).unwrap();
    assert_eq!((&a).await.unwrap(), 2);
    assert_eq!(a.await.unwrap(), 2);
    let fs = client.map(inc, 0..10).unwrap();
    assert_eq!(client.gather_async(&fs).await.unwrap().len(), 10);
    client.wait_for_workers_async(1, Some(LONG)).await.unwrap();
    // Blocking calls work from async code too (multi-thread runtime).
    assert_eq!(client.submit(inc, (5,)).unwrap().result().unwrap(), 6);
    let counter = Arc::new(AtomicUsize::new(0));
    let c2 = counter.clone();
    let f = client.submit(inc, (9,)).unwrap();
    f.add_done_callback(move |_| {
        c2.fetch_add(1, Ordering::SeqCst);
    });
    f.await.unwrap();
    client.close();
    tokio::task::spawn_blocking(move || cluster.close()).await.unwrap();
}

static TICKS: AtomicUsize = AtomicUsize::new(0);

#[dask::task]
fn tick(i: i64) -> i64 {
    TICKS.fetch_add(1, Ordering::SeqCst);
    i
}

#[test]
fn a_graph_of_more_than_ten_thousand_tasks() {
    let (_c, client) = cluster(2, 1);
    let mut g = Graph::new();
    let mut refs = Vec::new();
    for i in 0..12_000i64 {
        refs.push(g.add(format!("x-{i}"), inc, (i,)).unwrap());
    }
    g.add("total", sum_list, (refs,)).unwrap();
    assert_eq!(client.get::<i64>(&g, "total").unwrap(), (1..=12_000).sum::<i64>());
}

#[test]
fn a_finished_value_whose_holder_died_is_recomputed_for_result() {
    let (mut cluster, client) = cluster(2, 1);
    // Big enough not to travel with its report: the client must fetch it from the holder.
    let x = client.submit(concat, (vec!["a".repeat(5000), "b".into()], "")).unwrap();
    x.result().unwrap();
    let x_holder = client.who_has(&x).unwrap()[x.key()][0].clone();
    let i = cluster.worker_addresses().iter().position(|a| *a == x_holder).unwrap();
    cluster.kill_worker(i);
    // The client still believes the dead worker holds it; the fetch fails over to asking the
    // scheduler, which recomputes it on the survivor.
    let got = x.result_timeout(LONG).unwrap();
    assert_eq!(got.len(), 5001);
}

#[test]
fn close_sends_everything_submitted_first() {
    let (_c, client) = cluster(1, 1);
    let before = TICKS.load(Ordering::SeqCst);
    let other = Client::connect(&client.scheduler_address()).unwrap();
    for i in 0..10 {
        let f = other.submit_with(tick, (i,), SubmitOptions { pure: false, ..Default::default() }).unwrap();
        other.fire_and_forget(f);
    }
    other.close();
    eventually("all ten ran", || TICKS.load(Ordering::SeqCst) - before == 10);
    // Dropping instead of closing keeps them too.
    let third = Client::connect(&client.scheduler_address()).unwrap();
    for i in 0..10 {
        let f = third.submit_with(tick, (i,), SubmitOptions { pure: false, ..Default::default() }).unwrap();
        third.fire_and_forget(f);
    }
    drop(third);
    eventually("all twenty ran", || TICKS.load(Ordering::SeqCst) - before == 20);
}

#[test]
fn cancelled_then_resubmitted_runs_again() {
    let (_c, client) = cluster(1, 1);
    let f = client.submit(slowinc, (5, 300)).unwrap();
    f.cancel();
    assert!(matches!(f.result(), Err(Error::Cancelled { .. })));
    let g = client.submit(slowinc, (5, 300)).unwrap();
    assert_eq!(g.key(), f.key());
    assert_eq!(g.result_timeout(LONG).unwrap(), 6);
    assert!(f.cancelled(), "the old handle stays cancelled");
    let again = client.map_args(slowinc, vec![(5i64, 300u64)]).unwrap();
    assert_eq!(client.gather(&again).unwrap(), vec![6]);
}

#[test]
fn closed_client_fails_fast_everywhere() {
    let (_c, client) = cluster(1, 1);
    client.close();
    let f: dask::Future<i64> = client.future_of("anything");
    assert!(matches!(f.result_timeout(LONG), Err(Error::SchedulerLost(_))));
    assert!(matches!(client.submit(inc, (1,)), Err(Error::Closed)));
}

#[test]
fn blocking_on_a_current_thread_runtime_is_refused_not_a_deadlock() {
    let (c, _client) = cluster(1, 1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Client::connect_async(&c.scheduler_address()).await.unwrap();
        let f = client.submit(inc, (1,)).unwrap();
        let err = f.result().unwrap_err();
        assert!(err.to_string().contains("current-thread"), "{err}");
        assert_eq!(f.await.unwrap(), 2);
        client.close_async().await;
    });
}

#[dask::task]
fn make_blob(n: usize, seed: u8) -> dask::Bytes {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
}

#[dask::task]
fn blob_sum(parts: Vec<dask::Bytes>, whole: dask::Bytes) -> u64 {
    parts.iter().chain([&whole]).flat_map(|p| p.iter()).map(|&b| b as u64).sum()
}

#[dask::task]
fn vec_sum(v: Vec<u8>) -> u64 {
    v.iter().map(|&b| b as u64).sum()
}

fn checksum(b: &[u8]) -> u64 {
    b.iter().map(|&x| x as u64).sum()
}

#[test]
fn byte_buffers_move_raw_between_workers_and_the_client() {
    let (cluster, client) = cluster(2, 1);
    let (a, b) = (cluster.worker_addresses()[0].clone(), cluster.worker_addresses()[1].clone());
    let on = |w: &str| SubmitOptions { workers: vec![w.to_string()], ..Default::default() };
    // One large value and many small ones made on b, consumed on a: one fetch of many keys.
    let big = client.submit_with(make_blob, (3usize << 20, 1u8), on(&b)).unwrap();
    let small: Vec<_> = (0..300).map(|i| client.submit_with(make_blob, (i as usize, 2u8), on(&b)).unwrap()).collect();
    let total = client.submit_with(blob_sum, (&small, &big), on(&a)).unwrap();
    let mut expected = checksum(&make_blob::call(3 << 20, 1));
    expected += (0..300).map(|i| checksum(&make_blob::call(i, 2))).sum::<u64>();
    assert_eq!(total.result().unwrap(), expected);
    assert_eq!(big.result().unwrap(), make_blob::call(3 << 20, 1));
    let smalls: Vec<dask::Bytes> = client.gather(&small).unwrap();
    assert_eq!(smalls[299], make_blob::call(299, 2));
    // A Vec<u8> is stored raw as well, and read back by tasks and the client.
    let v = client.scatter_one(vec![7u8; 1000]).unwrap();
    assert_eq!(client.submit(vec_sum, (&v,)).unwrap().result().unwrap(), 7000);
    assert_eq!(v.result().unwrap(), vec![7u8; 1000]);

    // Scatter: hashed keys name equal data once; hash: false gives fresh keys.
    let data = make_blob::call(100_000, 3);
    let h1 = client.scatter_one(data.clone()).unwrap();
    let h2 = client.scatter_one(data.clone()).unwrap();
    assert_eq!(h1.key(), h2.key());
    let opts = ScatterOptions { workers: vec![a.clone()], hash: false, ..Default::default() };
    let u = client.scatter_with(vec![data.clone(), data.clone()], opts).unwrap();
    assert_ne!(u[0].key(), u[1].key());
    assert_eq!(client.who_has(&u).unwrap()[u[0].key()], vec![a.clone()]);
    let back: Vec<dask::Bytes> = client.gather(&u).unwrap();
    assert_eq!(back, vec![data.clone(), data.clone()]);
    let on_b = client.submit_with(blob_sum, (Vec::<dask::Bytes>::new(), &u[1]), on(&b)).unwrap();
    assert_eq!(on_b.result().unwrap(), checksum(&data));
}

#[test]
fn restart_works_on_a_local_cluster_of_threads() {
    let (cluster, client) = cluster(2, 1);
    let before = cluster.worker_addresses();
    let fs = client.map(inc, 0..50).unwrap();
    let _: Vec<i64> = client.gather(&fs).unwrap();
    client.restart().unwrap();
    let err = fs[0].result_timeout(LONG).unwrap_err();
    assert!(matches!(err, Error::Cancelled { ref reason, .. } if reason.contains("restarted")), "{err}");
    assert_eq!(fs[0].status(), dask::FutureStatus::Cancelled);
    let after = cluster.worker_addresses();
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|a| !before.contains(a)), "fresh workers: {before:?} -> {after:?}");
    assert_eq!(client.gather(&client.map(inc, 0..50).unwrap()).unwrap(), (1..=50).collect::<Vec<i64>>());
}

static SCALED_RUNS: AtomicUsize = AtomicUsize::new(0);

#[dask::task]
fn scaled_nap(x: i64) -> i64 {
    SCALED_RUNS.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(20));
    x * 2
}

#[test]
fn scale_up_gives_new_workers_work_and_scale_down_keeps_every_result() {
    let (mut cluster, client) = cluster(1, 1);
    let impure = SubmitOptions { pure: false, ..Default::default() };
    let fs = client.map_with(scaled_nap, (0..60).map(|i| (i,)), impure, None).unwrap();
    // 1.2 s of work on one thread: the new workers join while most of it waits.
    cluster.scale(3).unwrap();
    assert_eq!(cluster.n_workers(), 3);
    let got: Vec<i64> = client.gather(&fs).unwrap();
    assert_eq!(got, (0..60).map(|i| i * 2).collect::<Vec<_>>());
    let holders: std::collections::HashSet<String> = client.who_has(&fs).unwrap().into_values().flatten().collect();
    assert!(holders.len() >= 2, "the workers that joined ran nothing: {holders:?}");
    let runs = SCALED_RUNS.load(Ordering::SeqCst);
    assert_eq!(runs, 60, "a task ran twice");

    // Down to one: the two newest retire, their values move to the one left first.
    cluster.scale(1).unwrap();
    assert_eq!(cluster.n_workers(), 1);
    eventually("two workers gone", || client.scheduler_info().unwrap().workers.len() == 1);
    let left = client.scheduler_info().unwrap().workers[0].address.clone();
    let got: Vec<i64> = client.gather(&fs).unwrap();
    assert_eq!(got, (0..60).map(|i| i * 2).collect::<Vec<_>>());
    assert_eq!(SCALED_RUNS.load(Ordering::SeqCst), runs, "retiring recomputed something");
    for (key, workers) in client.who_has(&fs).unwrap() {
        assert_eq!(workers, vec![left.clone()], "{key}");
    }
    // And back up: names are not reused, the new worker takes work.
    cluster.scale(2).unwrap();
    let names: Vec<String> = client.scheduler_info().unwrap().workers.into_iter().map(|w| w.name).collect();
    assert!(names.contains(&"local-3".to_string()), "{names:?}");
    client.close();
    cluster.close();
}

static GPU_NOW: AtomicUsize = AtomicUsize::new(0);
static GPU_MAX: AtomicUsize = AtomicUsize::new(0);

#[dask::task]
fn on_gpu(x: i64) -> i64 {
    let now = GPU_NOW.fetch_add(1, Ordering::SeqCst) + 1;
    GPU_MAX.fetch_max(now, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(30));
    GPU_NOW.fetch_sub(1, Ordering::SeqCst);
    x + 100
}

#[test]
fn resources_limit_where_and_how_many_tasks_run() {
    // Two workers of 3 threads, one GPU each: at most two GPU tasks at once in all.
    let cluster = LocalCluster::builder().n_workers(2).threads_per_worker(3).resources([("GPU", 1.0)]).build().unwrap();
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    let gpu = |n: f64| SubmitOptions {
        pure: false,
        resources: [("GPU".to_string(), n)].into_iter().collect(),
        ..Default::default()
    };
    let fs = client.map_with(on_gpu, (0..8).map(|i| (i,)), gpu(1.0), None).unwrap();
    let got: Vec<i64> = client.gather(&fs).unwrap();
    assert_eq!(got, (100..108).collect::<Vec<_>>());
    assert_eq!(GPU_MAX.load(Ordering::SeqCst), 2, "GPU tasks ran more at once than there are GPUs");
    let info = client.scheduler_info().unwrap();
    for w in &info.workers {
        assert_eq!(w.resources.len(), 1);
        assert_eq!((w.resources[0].name.as_str(), w.resources[0].amount), ("GPU", 1.0));
    }

    // More than any worker has: it waits, and the scheduler says why.
    let big = client.submit_with(on_gpu, (1,), gpu(4.0)).unwrap();
    eventually("the task listed as unrunnable", || {
        client.scheduler_info().unwrap().unrunnable.iter().any(|u| u.contains("needs GPU=4"))
    });
    assert_eq!(big.status(), FutureStatus::Pending);
    big.cancel();

    // A bad amount is refused before anything is sent.
    let err = client.submit_with(on_gpu, (1,), gpu(-1.0)).unwrap_err();
    assert!(err.to_string().contains("zero or more"), "{err}");
    assert!(LocalCluster::builder().resources([("GPU", f64::NAN)]).build().is_err());
    client.close();
    cluster.close();
}

#[test]
fn replicate_and_rebalance_copy_values_between_workers() {
    let (cluster, client) = cluster(3, 1);
    client.wait_for_workers(3, None).unwrap();
    let first = cluster.worker_addresses()[0].clone();
    let on_first = SubmitOptions { pure: false, workers: vec![first.clone()], ..Default::default() };
    let fs = client.map_with(inc, (0..6).map(|i| (i,)), on_first, None).unwrap();
    let _: Vec<i64> = client.gather(&fs).unwrap();
    let holders = |client: &Client| -> Vec<usize> {
        let mut n: Vec<usize> = client.who_has(&fs).unwrap().into_values().map(|w| w.len()).collect();
        n.sort();
        n
    };
    assert_eq!(holders(&client), vec![1; 6]);

    // On every worker, then back to one copy each.
    client.replicate(&fs, None, &[] as &[&str]).unwrap();
    assert_eq!(holders(&client), vec![3; 6]);
    client.replicate(&fs, Some(1), &[] as &[&str]).unwrap();
    assert_eq!(holders(&client), vec![1; 6]);

    // Six more values, all on the first worker, spread: two per worker, one copy each.
    let on_first = SubmitOptions { pure: false, workers: vec![first.clone()], ..Default::default() };
    let gs = client.map_with(inc, (10..16).map(|i| (i,)), on_first, None).unwrap();
    client.rebalance(&gs, &[] as &[&str]).unwrap();
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for (_, workers) in client.who_has(&gs).unwrap() {
        assert_eq!(workers.len(), 1);
        *per_worker.entry(workers[0].clone()).or_default() += 1;
    }
    assert_eq!(per_worker.values().copied().collect::<Vec<_>>(), vec![2, 2, 2], "{per_worker:?}");
    let got: Vec<i64> = client.gather(&gs).unwrap();
    assert_eq!(got, (11..17).collect::<Vec<_>>());

    let err = client.replicate(&fs, Some(2), &["tcp://127.0.0.1:1"]).unwrap_err();
    assert!(err.to_string().contains("no worker"), "{err}");
    assert!(client.replicate(&fs, Some(0), &[] as &[&str]).is_err());
    client.close();
    cluster.close();
}

static GRAPH_ORDER: Mutex<Vec<i64>> = Mutex::new(Vec::new());

#[dask::task]
fn record_in_graph(x: i64) -> i64 {
    GRAPH_ORDER.lock().unwrap().push(x);
    x
}

#[test]
fn graph_tasks_take_priorities() {
    let (cluster, client) = cluster(1, 1);
    let mut g = Graph::new();
    g.add("low", record_in_graph, (1,)).unwrap();
    g.add("mid", record_in_graph, (2,)).unwrap();
    g.add("high", record_in_graph, (3,)).unwrap();
    assert!(g.set_priority("low", -5));
    assert!(g.set_priority("high", 5));
    assert!(!g.set_priority("nope", 1));
    let got: Vec<i64> = client.get_many(&g, &["low", "mid", "high"]).unwrap();
    assert_eq!(got, vec![1, 2, 3]);
    assert_eq!(*GRAPH_ORDER.lock().unwrap(), vec![3, 2, 1], "higher priority runs first");
    client.close();
    cluster.close();
}

#[dask::task]
fn nap_ms(x: i64, ms: u64) -> i64 {
    std::thread::sleep(Duration::from_millis(ms));
    x
}

#[test]
fn a_worker_that_joins_steals_tasks_another_holds() {
    // One worker of one thread learns the kind takes ~2 ms, so it is given 2 or more at a time
    // (its slots cover 10 ms); then 2 that take 400 ms each both go to it (the queue stays
    // empty). A second worker joins and takes the one waiting there through the real handshake
    // (the executor gives it up).
    let (mut cluster, client) = cluster(1, 1);
    let impure = SubmitOptions { pure: false, ..Default::default() };
    let warm = client.map_with(nap_ms, (0..20).map(|i| (i, 2u64)), impure.clone(), None).unwrap();
    let _: Vec<i64> = client.gather(&warm).unwrap();
    let long = client.map_with(nap_ms, (100..102).map(|i| (i, 400u64)), impure, None).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    cluster.scale(2).unwrap();
    let got: Vec<i64> = client.gather(&long).unwrap();
    assert_eq!(got, vec![100, 101]);
    let info = client.scheduler_info().unwrap();
    assert!(info.steals_done >= 1, "nothing was stolen: {} asked, {} refused", info.steals_asked, info.steals_refused);
    let newcomer = info.workers.iter().find(|w| w.name == "local-1").unwrap().address.clone();
    let holders: Vec<String> = client.who_has(&long).unwrap().into_values().flatten().collect();
    assert!(holders.contains(&newcomer), "the stolen task ran elsewhere: {holders:?}");
    client.close();
    cluster.close();
}
