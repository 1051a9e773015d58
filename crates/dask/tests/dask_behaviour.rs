//! Behaviour a dask user expects, found by trying dask's documented examples (tier 2): cancel
//! takes the dependents with it, scatter names and spreads like dask's, connect checks its
//! peer, as_completed's count does not consume it, and every wait can be bounded.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use dask::builtins::{inc, slowinc};
use dask::{Client, Error, FutureStatus, Graph, LocalCluster, ScatterOptions, SubmitOptions, as_completed};

fn cluster(n: usize, threads: usize) -> (LocalCluster, Client) {
    let cluster = LocalCluster::builder().n_workers(n).threads_per_worker(threads).build().expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    (cluster, client)
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn cancel_takes_the_dependents_with_it() {
    let (_cluster, client) = cluster(1, 1);
    let x = client.submit(slowinc, (1, 2_000)).unwrap();
    let y = client.submit(inc, (&x,)).unwrap();
    let z = client.submit(inc, (&y,)).unwrap();
    client.cancel_with(std::slice::from_ref(&x), false, Some("not needed"));
    assert_eq!(x.status(), FutureStatus::Cancelled);
    eventually("the dependents report cancelled", || z.status() == FutureStatus::Cancelled && y.cancelled());
    let e = z.result().unwrap_err();
    assert!(matches!(&e, Error::Cancelled { reason, .. } if reason.contains("not needed")), "{e}");
    // Using a cancelled future is a cancelled error at once, not an unknown key.
    let e = client.submit(inc, (&x,)).unwrap_err();
    assert!(matches!(e, Error::Cancelled { .. }), "{e}");
}

/// Returns once the scheduler has taken everything `client` sent before: a request on the same
/// stream, answered after them.
fn barrier(client: &Client) {
    dask::Event::new(client, "barrier").is_set().unwrap();
}

#[test]
fn cancel_leaves_what_another_client_wants() {
    let (cluster, client) = cluster(1, 1);
    let other = Client::connect(&cluster.scheduler_address()).unwrap();
    let x = client.submit(slowinc, (1, 300)).unwrap();
    let y = client.submit(inc, (&x,)).unwrap();
    eventually("the scheduler has the graph", || client.scheduler_info().unwrap().tasks >= 2);
    let y2 = other.future_of::<i64>(y.key());
    barrier(&other);
    client.cancel(std::slice::from_ref(&x));
    assert_eq!(y2.result_timeout(Duration::from_secs(30)).unwrap(), 3, "the other client's y runs on");
    // Forced, it is cancelled for everyone.
    let a = client.submit(slowinc, (5, 2_000)).unwrap();
    eventually("the scheduler has a", || {
        client.who_has(std::slice::from_ref(&a)).is_ok_and(|_| client.scheduler_info().unwrap().tasks >= 3)
    });
    let a2 = other.future_of::<i64>(a.key());
    barrier(&other);
    client.cancel_with(std::slice::from_ref(&a), true, Some("shutting down"));
    eventually("a forced cancel reaches the other client", || a2.cancelled());
}

#[test]
fn scatter_uses_a_maps_keys_and_spreads_single_values() {
    let (cluster, client) = cluster(2, 1);
    let m: HashMap<String, i64> = [("x".to_string(), 1), ("y".to_string(), 2)].into();
    let fm = client.scatter_map(m).unwrap();
    assert_eq!(fm["x"].key(), "x");
    assert_eq!(fm["y"].result().unwrap(), 2);
    // Ten one-value scatters land on both workers, as dask's round-robin does.
    let fs: Vec<_> = (0..10i64).map(|i| client.scatter_one(i + 100).unwrap()).collect();
    let who = client.who_has(&fs).unwrap();
    let holders: std::collections::HashSet<&String> = who.values().flatten().collect();
    assert_eq!(holders.len(), 2, "{who:?}");
    // broadcast=n: copies on n workers.
    let opts = ScatterOptions { broadcast: true, broadcast_n: Some(1), ..Default::default() };
    let b = client.scatter_with(vec![555i64], opts).unwrap();
    assert_eq!(client.who_has(&b).unwrap()[b[0].key()].len(), 1);
    let e = client
        .scatter_with(vec![1i64, 2], ScatterOptions { keys: Some(vec!["only-one".into()]), ..Default::default() });
    assert!(matches!(e, Err(Error::InvalidArgument(_))));
    drop(cluster);
}

#[test]
fn scatter_waits_for_a_worker_up_to_its_timeout() {
    let (_cluster, client) = cluster(0, 1);
    let started = Instant::now();
    let opts = ScatterOptions { timeout: Duration::from_millis(300), ..Default::default() };
    let e = client.scatter_with(vec![1i64], opts).unwrap_err();
    assert!(matches!(&e, Error::Timeout { what, .. } if what.contains("worker")), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[test]
fn connect_refuses_a_server_that_is_not_a_scheduler() {
    let (_cluster, client) = cluster(1, 1);
    // A nanny speaks gRPC, but not the scheduler's service.
    let nanny = client.scheduler_info().unwrap().workers[0].nanny.clone();
    assert!(!nanny.is_empty(), "LocalCluster workers run under nannies");
    let started = Instant::now();
    let e = Client::connect_with_timeout(&nanny, Duration::from_secs(20)).unwrap_err();
    assert!(e.to_string().contains("not a dask scheduler"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10), "refused at once, not retried until the timeout");
}

#[test]
fn as_completed_counts_without_consuming_and_takes_batches() {
    let (_cluster, client) = cluster(1, 2);
    let mut ac = as_completed(client.map(inc, 0..4).unwrap());
    assert_eq!(ac.count(), 4);
    assert_eq!(ac.count(), 4, "count does not consume");
    let first = ac.next().unwrap();
    assert!(first.done());
    assert_eq!(ac.count(), 3);
    eventually("the rest are ready", || {
        ac.has_ready() && {
            std::thread::sleep(Duration::from_millis(50));
            true
        }
    });
    let batch = ac.next_batch(false).unwrap();
    assert!(!batch.is_empty());
    let mut rest: Vec<_> = batch;
    while let Some(f) = ac.next() {
        rest.push(f);
    }
    assert_eq!(rest.len(), 3);
    assert!(ac.next_batch(false).is_none(), "all taken");
    ac.update(vec![client.submit(slowinc, (1, 2_000)).unwrap()]);
    let e = ac.next_timeout(Some(Duration::from_millis(50))).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }));
    ac.clear();
    assert_eq!(ac.count(), 0);
    let n = as_completed(client.map(inc, 10..13).unwrap()).into_iter().count();
    assert_eq!(n, 3, "a for loop (or Iterator::count) over it still works");
}

#[test]
fn every_wait_can_be_bounded() {
    let (_cluster, client) = cluster(1, 1);
    let slow = client.submit(slowinc, (1, 3_000)).unwrap();
    let t = Duration::from_millis(50);
    assert!(matches!(client.gather_timeout(std::slice::from_ref(&slow), t), Err(Error::Timeout { .. })));
    assert!(matches!(slow.exception_timeout(t), Err(Error::Timeout { .. })));
    assert!(matches!(slow.result_timeout(t), Err(Error::Timeout { .. })));
    let mut g = Graph::new();
    g.add("s", slowinc, (2, 3_000)).unwrap();
    assert!(matches!(client.get_timeout::<i64>(&g, "s", t), Err(Error::Timeout { .. })));
    // Per-task options on graph tasks.
    let mut g = Graph::new();
    g.add("a", inc, (1,)).unwrap();
    let bad = SubmitOptions { resources: [("GPU".to_string(), -1.0)].into(), ..Default::default() };
    assert!(g.set_options("a", &bad).is_err());
    let retried = SubmitOptions { retries: 2, priority: 5, ..Default::default() };
    assert!(g.set_options("a", &retried).unwrap());
    assert!(!g.set_options("nope", &retried).unwrap());
    assert_eq!(client.get::<i64>(&g, "a").unwrap(), 2);
}

#[test]
fn scatter_under_a_key_in_memory_is_refused() {
    let (_cluster, client) = cluster(1, 1);
    let m: HashMap<String, i64> = [("a".to_string(), 1)].into();
    let first = client.scatter_map(m).unwrap();
    let again: HashMap<String, i64> = [("a".to_string(), 2)].into();
    let e = client.scatter_map(again).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("holds a value already")), "{e}");
    assert_eq!(first["a"].result().unwrap(), 1);
}

#[test]
fn a_worker_takes_puts_only_for_keys_the_scheduler_announced() {
    let cluster = LocalCluster::builder().n_workers(1).threads_per_worker(1).build().expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    let x = client.scatter_one(41i64).unwrap();
    let worker = cluster.worker_addresses()[0].clone();
    // A stranger on the data port: no ticket, no put, and the scattered value stays.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pool = dask_protocol::data::DataPool::default();
    let forged = dask_protocol::codec::Value::from_owned(1000i64).unwrap();
    let err =
        rt.block_on(pool.put_data(&worker, vec![(x.key().to_string(), forged.clone())], Vec::new(), 0)).unwrap_err();
    assert!(err.to_string().contains("did not announce"), "{err}");
    let err = rt.block_on(pool.put_data(&worker, vec![("new-key".into(), forged)], vec![vec![0; 32]], u64::MAX));
    assert!(err.is_err(), "a made-up ticket is refused");
    assert_eq!(client.submit(dask::builtins::add, (&x, 1)).unwrap().result().unwrap(), 42);
}

#[test]
fn no_built_in_function_can_take_a_worker_down() {
    // The stock workers' functions: none exits the process (a fault test brings its own).
    let (_cluster, client) = cluster(1, 1);
    let crash = client.submit(dask::builtins::panic_task, ("boom".to_string(),)).unwrap();
    assert!(crash.result().is_err());
    assert_eq!(client.submit(inc, (1,)).unwrap().result().unwrap(), 2, "the worker is still there");
    let names = dask_protocol::task::registered_names();
    assert!(!names.contains(&"crash"), "{names:?}");
}
