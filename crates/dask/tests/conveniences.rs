//! `progress` and `performance_report` (tier 2).
use dask::builtins::{inc, slowinc};
use dask::{Client, LocalCluster, SubmitOptions};

fn cluster(n: usize) -> (LocalCluster, Client) {
    let cluster = LocalCluster::builder().n_workers(n).threads_per_worker(1).build().expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    (cluster, client)
}

#[test]
fn progress_waits_for_every_future_and_counts_them_by_prefix() {
    let (_cluster, client) = cluster(2);
    let slow = client.map_args(slowinc, (0..6i64).map(|i| (i, 50u64))).unwrap();
    let fast = client.map(inc, 0..10i64).unwrap();
    let failing = client.submit(dask::builtins::fail, ("no".to_string(),)).unwrap();
    let all: Vec<dask::Future<()>> =
        dask::futures_of(&slow).into_iter().chain(dask::futures_of(&fast)).chain(dask::futures_of(&failing)).collect();
    // Not a terminal here: nothing is drawn, and it returns once everything is done.
    let counts = dask::progress(&all);
    assert!(all.iter().all(|f| f.done()));
    assert_eq!(counts["slowinc"], dask::PrefixProgress { done: 6, erred: 0, total: 6 });
    assert_eq!(counts["inc"], dask::PrefixProgress { done: 10, erred: 0, total: 10 });
    assert_eq!(counts["fail"].erred, 1);
}

#[test]
fn a_performance_report_is_one_self_contained_page_of_the_work_done() {
    let (cluster, client) = cluster(2);
    let dir = std::env::temp_dir().join(format!("dask-rs-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("report.html");
    let report = client.performance_report(&path);
    let w = cluster.worker_addresses();
    let on = |a: &str| SubmitOptions { workers: vec![a.to_string()], ..Default::default() };
    let xs = client.map(inc, 10..18i64).unwrap();
    client.gather(&xs).unwrap();
    let a = client.submit_with(inc, (1,), on(&w[0])).unwrap();
    let b = client.submit_with(inc, (&a,), on(&w[1])).unwrap();
    b.result().unwrap();
    assert_eq!(report.finish().unwrap(), path);
    let html = std::fs::read_to_string(&path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<svg id=\"task-stream\""));
    assert_eq!(html.matches("class=\"task\" data-prefix=\"inc\"").count(), 10, "every task of the block is drawn");
    assert!(html.contains("class=\"transfer\""), "b's input came from the other worker");
    assert!(html.contains("<table id=\"prefixes\">") && html.contains("&#9632;</span> inc</td><td>10</td>"));
    // Self-contained: nothing is fetched from elsewhere.
    assert!(!html.contains("src=") && !html.contains("href="), "no outside resources");
    std::fs::remove_dir_all(&dir).unwrap();
}
