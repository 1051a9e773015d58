//! `LocalCluster` with worker processes: this test binary is started again as each worker, so
//! its own `#[dask::task]` functions run there. Like a user program, `main` calls
//! `dask::init()` first; the tests then run under libtest-mimic, which speaks libtest's command
//! line (`--list`, `--exact`, filters), so `cargo test` and `cargo nextest run` both list and run
//! them (the default harness would start every test again in each worker).
use std::time::Duration;

use dask::{Client, LocalCluster, SubmitOptions};

#[dask::task]
fn whoami(x: i64) -> (i64, u32) {
    (x, std::process::id())
}

#[dask::task]
fn slow_square(x: i64) -> i64 {
    std::thread::sleep(Duration::from_millis(20));
    x * x
}

#[dask::task]
fn total(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

fn main() {
    dask::init();
    let args = libtest_mimic::Arguments::from_args();
    let tests = vec![
        libtest_mimic::Trial::test("user_functions_run_in_worker_processes_that_may_die", || {
            worker_processes();
            Ok(())
        }),
        libtest_mimic::Trial::test("worker_processes_have_their_resources_and_scale", || {
            resources_and_scale();
            Ok(())
        }),
        libtest_mimic::Trial::test("worker_processes_of_a_tls_cluster_read_the_credentials_from_files", || {
            tls_worker_processes();
            Ok(())
        }),
    ];
    libtest_mimic::run(&args, tests).exit();
}

/// Worker processes get the cluster's resources; a GPU task runs on one; scaling starts and
/// retires processes.
fn resources_and_scale() {
    let mut cluster = LocalCluster::builder()
        .n_workers(1)
        .threads_per_worker(2)
        .processes(true)
        .resources([("GPU", 1.0)])
        .build()
        .unwrap();
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    let info = client.scheduler_info().unwrap();
    let r = &info.workers[0].resources;
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].name.as_str(), r[0].amount), ("GPU", 1.0));
    let gpu = SubmitOptions { resources: [("GPU".to_string(), 1.0)].into_iter().collect(), ..Default::default() };
    let (x, pid) = client.submit_with(whoami, (7,), gpu).unwrap().result().unwrap();
    assert_eq!((x, pid), (7, info.workers[0].pid));
    cluster.scale(2).unwrap();
    assert_eq!(client.scheduler_info().unwrap().workers.len(), 2);
    cluster.scale(1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client.scheduler_info().unwrap().workers.len() != 1 {
        assert!(std::time::Instant::now() < deadline, "the retired worker process never left");
        std::thread::sleep(Duration::from_millis(20));
    }
    client.close();
    cluster.close();
    println!("processes: resources and scale ok");
}

fn worker_processes() {
    let mut cluster = LocalCluster::builder().n_workers(2).threads_per_worker(1).processes(true).build().unwrap();
    let client = Client::connect(&cluster.scheduler_address()).unwrap();

    // The user's functions run in two other processes.
    let info = client.scheduler_info().unwrap();
    assert_eq!(info.workers.len(), 2);
    let me = std::process::id();
    let pids: std::collections::HashSet<u32> = info.workers.iter().map(|w| w.pid).collect();
    assert!(!pids.contains(&me) && pids.len() == 2, "worker pids {pids:?}, mine {me}");
    let ran: Vec<(i64, u32)> = client.gather(&client.map(whoami, 0..20).unwrap()).unwrap();
    assert!(ran.iter().all(|(_, pid)| pids.contains(pid)));
    println!("processes: functions ran in worker processes {pids:?}");

    // Kill a worker process mid-graph: every result is still right.
    let squares = client
        .map_with(slow_square, (0..60).map(|i| (i,)), SubmitOptions { pure: false, ..Default::default() }, None)
        .unwrap();
    let sum = client.submit(total, (&squares,)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    cluster.kill_worker(0);
    assert_eq!(sum.result_timeout(Duration::from_secs(60)).unwrap(), (0..60).map(|i| i * i).sum::<i64>());
    println!("processes: a killed worker process lost nothing");

    client.close();
    cluster.close();
    println!("processes: ok");
}

/// Worker processes of a cluster with temporary credentials read them from files written for
/// them (readable by this user only), and those files go with the cluster.
fn tls_worker_processes() {
    let security = dask::Security::temporary().unwrap();
    let cluster = LocalCluster::builder()
        .n_workers(2)
        .threads_per_worker(1)
        .processes(true)
        .security(security.clone())
        .build()
        .unwrap();
    let client = Client::connect_with_security(&cluster.scheduler_address(), security).unwrap();
    let workers = cluster.worker_addresses();
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|w| w.starts_with("tls://")), "{workers:?}");
    let on = |w: &str| SubmitOptions { workers: vec![w.to_string()], ..Default::default() };
    let xs: Vec<_> =
        (0..10i64).map(|i| client.submit_with(slow_square, (i,), on(&workers[i as usize % 2])).unwrap()).collect();
    // Half the inputs cross from one worker process to the other, over TLS.
    let t = client.submit_with(total, (xs.clone(),), on(&workers[0])).unwrap();
    assert_eq!(t.result().unwrap(), (0..10i64).map(|i| i * i).sum::<i64>());
    let pids: std::collections::HashSet<u32> =
        client.gather(&client.map(whoami, 0..4i64).unwrap()).unwrap().into_iter().map(|(_, p)| p).collect();
    assert!(!pids.contains(&std::process::id()), "the tasks ran in the worker processes");
    let dir = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with(&format!("dask-rs-tls-{}-", std::process::id())))
        .expect("the credentials' directory");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is the owner's only: {mode:o}");
    }
    drop(client);
    cluster.close();
    assert!(!dir.path().exists(), "the credentials go with the cluster");
}
