//! `Client::run` and `run_on_scheduler` (tier 2): a registered function on every worker or on
//! the scheduler, its errors, and a worker that dies during it.
use std::time::Duration;

use dask::builtins::inc;
use dask::{Client, Error, LocalCluster, OnError, RunOptions};

fn cluster(n: usize) -> (LocalCluster, Client) {
    let cluster = LocalCluster::builder().n_workers(n).threads_per_worker(1).build().expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    (cluster, client)
}

/// The worker it runs on, and what it was given.
#[dask::task]
fn where_am_i(tag: String) -> Result<(String, String), String> {
    let w = dask::get_worker().map_err(|e| e.to_string())?;
    Ok((w.address, tag))
}

#[dask::task]
fn always_fails(_x: i64) -> Result<i64, String> {
    Err("nope".into())
}

#[dask::task]
fn nap_then_one(ms: u64) -> i64 {
    std::thread::sleep(Duration::from_millis(ms));
    1
}

/// How many workers the scheduler had when asked.
#[dask::task]
fn count_workers(_x: i64) -> Result<usize, String> {
    dask::get_scheduler().map(|s| s.workers.len()).ok_or_else(|| "not in the scheduler".to_string())
}

#[test]
fn run_reaches_every_worker_or_the_chosen_ones() {
    let (cluster, client) = cluster(2);
    let all = client.run(where_am_i, ("hi",)).unwrap();
    let mut addresses: Vec<&String> = all.keys().collect();
    addresses.sort();
    let mut expected = cluster.worker_addresses();
    expected.sort();
    assert_eq!(addresses, expected.iter().collect::<Vec<_>>());
    assert!(all.iter().all(|(w, (seen, tag))| w == seen && tag == "hi"), "each ran on its own worker: {all:?}");
    let one = RunOptions { workers: vec![expected[0].clone()], ..Default::default() };
    let got = client.run_with(where_am_i, ("x",), one).unwrap();
    assert_eq!(got.len(), 1);
    // Not waited for: an empty answer at once.
    let nowait = RunOptions { wait: false, ..Default::default() };
    assert!(client.run_with(inc, (1,), nowait).unwrap().is_empty());
    // Bad input: an unknown worker, a future as an argument.
    let nobody = RunOptions { workers: vec!["nobody".into()], ..Default::default() };
    assert!(matches!(client.run_with(inc, (1,), nobody), Err(Error::Refused(m)) if m.contains("nobody")));
    let f = client.submit(inc, (1,)).unwrap();
    assert!(matches!(client.run(inc, (&f,)), Err(Error::InvalidArgument(_))));
}

#[test]
fn run_errors_raise_return_or_are_ignored() {
    let (_cluster, client) = cluster(2);
    let e = client.run(always_fails, (1,)).unwrap_err();
    assert!(matches!(&e, Error::Task(t) if t.message.contains("nope")), "{e}");
    let returned = client.run_with(always_fails, (1,), RunOptions { on_error: OnError::Return, ..Default::default() });
    let returned = returned.unwrap();
    assert_eq!(returned.len(), 2);
    assert!(returned.values().all(|r| r.is_err()));
    let ignored = client.run_with(always_fails, (1,), RunOptions { on_error: OnError::Ignore, ..Default::default() });
    assert!(ignored.unwrap().is_empty());
}

#[test]
fn run_on_scheduler_sees_a_snapshot() {
    let (_cluster, client) = cluster(2);
    assert_eq!(client.run_on_scheduler(count_workers, (0,)).unwrap(), 2);
    assert_eq!(client.run_on_scheduler(inc, (41,)).unwrap(), 42);
    assert!(matches!(client.run_on_scheduler(always_fails, (0,)), Err(Error::Task(_))));
}

#[test]
fn a_worker_that_dies_during_run_answers_with_why() {
    let (mut cluster, client) = cluster(2);
    let victim = cluster.worker_addresses()[0].clone();
    let runner = {
        let client = client.clone();
        std::thread::spawn(move || {
            client.run_with(nap_then_one, (3_000u64,), RunOptions { on_error: OnError::Return, ..Default::default() })
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    cluster.kill_worker(0);
    let got = runner.join().unwrap().unwrap();
    let lost = &got[&victim];
    assert!(matches!(lost, Err(Error::Task(t)) if t.kind == "worker-died"), "{lost:?}");
    assert_eq!(got.values().filter(|r| matches!(r, Ok(1))).count(), 1, "the other worker answered");
}
