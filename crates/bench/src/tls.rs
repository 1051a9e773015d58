//! What TLS costs: the same workloads on a cluster with and without it, side by side in one
//! run (runs alternate which goes first): map+gather, and a value scattered to a worker and
//! gathered back (the client's data connections), and moved between the two workers.
use std::time::Instant;

use dask::builtins::inc;
use dask::{Client, LocalCluster, Security, SubmitOptions};

/// One cluster's figures: map+gather tasks/s, scatter and gather MB/s, worker->worker MB/s.
pub struct Figures {
    pub tasks_per_s: f64,
    pub scatter_mb_s: f64,
    pub gather_mb_s: f64,
    pub worker_to_worker_mb_s: f64,
}

pub fn run(n: usize, bytes: usize, tls: bool) -> Figures {
    let security = tls.then(|| Security::temporary().expect("temporary credentials"));
    let mut b = LocalCluster::builder().n_workers(2).threads_per_worker(1).processes(true);
    if let Some(s) = &security {
        b = b.security(s.clone());
    }
    let cluster = b.build().expect("start a local cluster");
    let client = match &security {
        Some(s) => Client::connect_with_security(&cluster.scheduler_address(), s.clone()),
        None => Client::connect(&cluster.scheduler_address()),
    }
    .unwrap();
    let warm = client.map(inc, 0..200).unwrap();
    client.gather(&warm).unwrap();
    drop(warm);
    super::settle(&client);

    let t = Instant::now();
    let fs = client.map(inc, 0..n as i64).unwrap();
    let v: Vec<i64> = client.gather(&fs).unwrap();
    let tasks_per_s = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(v[n - 1], n as i64);
    drop(fs);
    super::settle(&client);

    let workers = cluster.worker_addresses();
    let value = super::make_bytes::call(bytes);
    let (f, back, scatter, gather) = super::scatter_and_gather(&client, &value, &workers[0]);
    // From worker a to worker b: a task on b that takes the scattered value.
    let on_b = SubmitOptions { workers: vec![workers[1].clone()], pure: false, ..Default::default() };
    let t = Instant::now();
    let len = client.submit_with(super::consume, (&f,), on_b).unwrap();
    assert_eq!(len.result().unwrap(), bytes as u64);
    let moved = t.elapsed().as_secs_f64();
    drop((f, back, len, value));
    super::settle(&client);
    client.close();
    cluster.close();
    let mb = bytes as f64 / 1e6;
    Figures { tasks_per_s, scatter_mb_s: mb / scatter, gather_mb_s: mb / gather, worker_to_worker_mb_s: mb / moved }
}
