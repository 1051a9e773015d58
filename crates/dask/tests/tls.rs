//! TLS with mutual authentication (tier 2): a cluster built with credentials talks TLS on
//! every connection, and whoever lacks a certificate its CA signed is refused with a clear
//! error.
use std::time::Duration;

use dask::builtins::inc;
use dask::{Bytes, Client, LocalCluster, ScatterOptions, Security, SubmitOptions};

/// A task that submits more work through its worker's own client.
#[dask::task]
fn inc_through_the_workers_client(x: i64) -> i64 {
    let client = dask::get_client().expect("the worker's client");
    client.submit(inc, (x,)).unwrap().result().unwrap()
}

fn secure_cluster() -> (LocalCluster, Security) {
    let security = Security::temporary().expect("temporary credentials");
    let cluster = LocalCluster::builder()
        .n_workers(2)
        .threads_per_worker(1)
        .security(security.clone())
        .build()
        .expect("a TLS cluster");
    (cluster, security)
}

#[test]
fn a_tls_cluster_computes_moves_data_and_refuses_strangers() {
    let (cluster, security) = secure_cluster();
    let address = cluster.scheduler_address();
    assert!(address.starts_with("tls://127.0.0.1:"), "{address}");
    let workers = cluster.worker_addresses();
    assert!(workers.iter().all(|w| w.starts_with("tls://")), "{workers:?}");

    let client =
        Client::connect_with_security(&address, security.clone()).expect("connect with the cluster's credentials");
    let xs = client.map(inc, 0..100i64).unwrap();
    assert_eq!(client.gather(&xs).unwrap().iter().sum::<i64>(), (1..=100).sum::<i64>());
    // A value made on one worker and used on the other: a worker-to-worker data connection.
    let on = |w: &str| SubmitOptions { workers: vec![w.to_string()], pure: false, ..Default::default() };
    let a = client.submit_with(inc, (1i64,), on(&workers[0])).unwrap();
    let b = client.submit_with(inc, (&a,), on(&workers[1])).unwrap();
    assert_eq!(b.result().unwrap(), 3);
    // Scatter and gather straight to and from a worker: the client's data connections.
    let value = Bytes::from(vec![7u8; 3 << 20]);
    let to = ScatterOptions { workers: vec![workers[1].clone()], hash: false, ..Default::default() };
    let f = client.scatter_with(vec![value.clone()], to).unwrap().pop().unwrap();
    let back: Bytes = f.result().unwrap();
    assert_eq!(back, value);

    // A task's own client (get_client) connects with the worker's credentials.
    let via = client.submit(inc_through_the_workers_client, (10i64,)).unwrap();
    assert_eq!(via.result().unwrap(), 11);

    // No credentials: refused at once, saying what is missing.
    let t = std::time::Instant::now();
    let e = Client::connect_quietly(&address, Duration::from_secs(10)).unwrap_err().to_string();
    assert!(e.contains("no TLS credentials were given") && e.contains("--tls-ca-file"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "no retrying for credentials that will not come");

    // Another CA's certificate: the client sees the scheduler is not one of its cluster, and
    // the scheduler refuses it.
    let stranger = Security::temporary().unwrap();
    let t = std::time::Instant::now();
    let e = Client::connect_secure(&address, Duration::from_secs(20), Some(stranger.clone())).unwrap_err().to_string();
    assert!(e.contains("not signed by this cluster's CA"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "a refused certificate is not retried");

    // Our CA, but a certificate it did not sign: the scheduler refuses it, and says so.
    let dir = std::env::temp_dir().join(format!("dask-rs-tls-mixed-{}", std::process::id()));
    let (ours, theirs) = (security.files(&dir.join("ours")).unwrap(), stranger.files(&dir.join("theirs")).unwrap());
    let mixed = Security::from_files(&ours.ca, &theirs.cert, Some(&theirs.key)).unwrap();
    let e = Client::connect_secure(&address, Duration::from_secs(20), Some(mixed)).unwrap_err().to_string();
    assert!(e.contains("does not accept this process's certificate"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();

    // A tcp:// address for a TLS scheduler: told at once to use tls://.
    let t = std::time::Instant::now();
    let plain_address = address.replacen("tls://", "tcp://", 1);
    let e = Client::connect_quietly(&plain_address, Duration::from_secs(20)).unwrap_err().to_string();
    assert!(e.contains("speaks TLS: use its tls:// address"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "no retrying against a TLS server");

    // Plain TCP to a worker's data port: no key can be read or written.
    let plain = workers[0].replacen("tls://", "tcp://", 1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let got = rt.block_on(dask_protocol::data::DataPool::default().get_data(&plain, vec![a.key().to_string()]));
    assert!(got.is_err(), "a plain peer reads nothing: {got:?}");
    // And with the stranger's credentials over TLS, neither.
    let got = rt.block_on(
        dask_protocol::data::DataPool::with_security(Some(stranger)).get_data(&workers[0], vec![a.key().to_string()]),
    );
    let e = got.unwrap_err().to_string();
    assert!(e.contains("not signed by this cluster's CA"), "{e}");

    // The cluster is unharmed.
    assert_eq!(client.submit(inc, (41i64,)).unwrap().result().unwrap(), 42);
}
