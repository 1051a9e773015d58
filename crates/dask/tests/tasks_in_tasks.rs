//! Tasks that use the cluster (tier 2): a task submits subtasks through its worker's client and
//! waits on them without deadlocking a one-thread worker; tasks share locks, queues and
//! variables with clients.
use std::time::Duration;

use dask::builtins::inc;
use dask::{Client, Error, LocalCluster, Lock, Queue, Variable};

fn cluster(n: usize, threads: usize) -> (LocalCluster, Client) {
    let cluster = LocalCluster::builder().n_workers(n).threads_per_worker(threads).build().expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    (cluster, client)
}

/// Fibonacci by subtasks: each level waits on the two below it, seceded.
#[dask::task]
fn fib(n: i64) -> Result<i64, String> {
    if n < 2 {
        return Ok(n);
    }
    let client = dask::worker_client().map_err(|e| e.to_string())?;
    let a = client.submit(fib, (n - 1,)).map_err(|e| e.to_string())?;
    let b = client.submit(fib, (n - 2,)).map_err(|e| e.to_string())?;
    Ok(a.result().map_err(|e| e.to_string())? + b.result().map_err(|e| e.to_string())?)
}

#[test]
fn a_task_waits_on_its_subtasks_without_deadlocking_a_one_thread_worker() {
    let (_cluster, client) = cluster(1, 1);
    assert_eq!(client.submit(fib, (8,)).unwrap().result_timeout(Duration::from_secs(60)).unwrap(), 21);
}

#[dask::task]
fn whoami(_x: i64) -> Result<(String, String), String> {
    let w = dask::get_worker().map_err(|e| e.to_string())?;
    Ok((w.address, w.key))
}

#[test]
fn get_worker_names_the_worker_and_the_task() {
    let (cluster, client) = cluster(1, 1);
    let f = client.submit(whoami, (1,)).unwrap();
    let (address, key) = f.result().unwrap();
    assert_eq!(address, cluster.worker_addresses()[0]);
    assert_eq!(key, f.key());
    // Outside a task there is no worker.
    assert!(matches!(dask::get_worker(), Err(Error::InvalidArgument(m)) if m.contains("not inside a task")));
    assert!(matches!(dask::secede(), Err(Error::InvalidArgument(_))));
}

/// Takes the lock, adds one to a shared counter in a Variable, releases.
#[dask::task]
fn locked_increment(_i: i64) -> Result<i64, String> {
    let client = dask::get_client().map_err(|e| e.to_string())?;
    let lock = Lock::new(&client, "counter-lock");
    let var: Variable<i64> = Variable::new(&client, "counter");
    let _guard = lock.guard().map_err(|e| e.to_string())?;
    let now = var.get().map_err(|e| e.to_string())?.result().map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(2));
    var.set(&(now + 1)).map_err(|e| e.to_string())?;
    Ok(now)
}

#[test]
fn tasks_share_a_lock_and_a_variable_with_the_client() {
    let (_cluster, client) = cluster(2, 2);
    let var: Variable<i64> = Variable::new(&client, "counter");
    var.set(&0).unwrap();
    let futures = client.map(locked_increment, 0..20i64).unwrap();
    let mut seen: Vec<i64> = client.gather(&futures).unwrap();
    seen.sort();
    // Under the lock every task saw a different count: no increment was lost.
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    assert_eq!(var.get().unwrap().result().unwrap(), 20);
}

/// Puts its input, plus one computed by a subtask, in a queue the client reads.
#[dask::task]
fn produce(x: i64) -> Result<i64, String> {
    let client = dask::get_client().map_err(|e| e.to_string())?;
    let q: Queue<i64> = Queue::new(&client, "results");
    q.put(&x).map_err(|e| e.to_string())?;
    let f = client.submit(inc, (x,)).map_err(|e| e.to_string())?;
    q.put_future(&f).map_err(|e| e.to_string())?;
    Ok(x)
}

#[test]
fn a_task_feeds_a_queue_with_values_and_futures() {
    let (_cluster, client) = cluster(1, 2);
    client.submit(produce, (5,)).unwrap().result().unwrap();
    let q: Queue<i64> = Queue::new(&client, "results");
    let mut got: Vec<i64> =
        q.get_batch(2, Some(Duration::from_secs(30))).unwrap().into_iter().map(|s| s.result().unwrap()).collect();
    got.sort();
    assert_eq!(got, vec![5, 6]);
}

#[test]
fn the_default_client_is_the_last_connected() {
    let (_cluster, client) = cluster(1, 1);
    let current = Client::current().unwrap();
    assert_eq!(current.scheduler_address(), client.scheduler_address());
    assert_eq!(dask::get_client().unwrap().scheduler_address(), client.scheduler_address());
}

static RESCHEDULED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Asks to run elsewhere the first time.
#[dask::task]
fn picky(x: i64) -> i64 {
    if RESCHEDULED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
        dask::reschedule();
    }
    x * 3
}

#[test]
fn a_task_that_asks_to_be_rescheduled_runs_again() {
    let (_cluster, client) = cluster(2, 1);
    let f = client.submit(picky, (5,)).unwrap();
    assert_eq!(f.result_timeout(Duration::from_secs(30)).unwrap(), 15);
    assert_eq!(RESCHEDULED.load(std::sync::atomic::Ordering::SeqCst), 2, "ran twice, no error in between");
    let story = client.story(f.key()).unwrap();
    let processing = story.iter().filter(|l| l.to == "processing").count();
    assert_eq!(processing, 2, "placed twice: {story:?}");
}
