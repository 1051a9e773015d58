//! Coordination primitives across clients (tier 2): locks, semaphores, queues, variables,
//! events, topics, datasets and metadata held by an in-process scheduler, used by two clients
//! of it, with their error paths.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dask::builtins::inc;
use dask::{Client, Error, Event, LocalCluster, Lock, Pub, Queue, Semaphore, Shared, Sub, Variable};

fn cluster() -> (LocalCluster, Client, Client) {
    let cluster = LocalCluster::builder().n_workers(1).threads_per_worker(2).build().expect("cluster");
    let a = Client::connect(&cluster.scheduler_address()).expect("connect");
    let b = Client::connect(&cluster.scheduler_address()).expect("connect");
    (cluster, a, b)
}

const SHORT: Duration = Duration::from_millis(200);

#[test]
fn a_lock_excludes_another_client_until_released_or_its_holder_goes() {
    let (_cluster, a, b) = cluster();
    let la = Lock::new(&a, "resource");
    let lb = Lock::new(&b, "resource");
    assert!(la.acquire().unwrap());
    assert!(la.locked().unwrap() && lb.locked().unwrap());
    assert!(!lb.try_acquire().unwrap(), "held by a: blocking=false fails at once");
    let started = Instant::now();
    assert!(!lb.acquire_timeout(SHORT).unwrap(), "a timeout gives false");
    assert!(started.elapsed() >= SHORT);
    // Releasing through a handle that holds nothing is an error, and changes nothing.
    let e = lb.release().unwrap_err();
    assert!(matches!(&e, Error::Refused(m) if m.contains("released more often")), "{e}");
    assert!(lb.locked().unwrap());
    // b waits on another thread; a's release hands the lock over.
    let got = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (lb, got) = (Lock::new(&b, "resource"), got.clone());
        std::thread::spawn(move || {
            assert!(lb.acquire().unwrap());
            got.store(true, Ordering::SeqCst);
            lb
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!got.load(Ordering::SeqCst), "still held by a");
    la.release().unwrap();
    let lb2 = waiter.join().unwrap();
    assert!(got.load(Ordering::SeqCst));
    // b's client goes while holding it: the lock is free again.
    drop(lb2);
    drop(lb);
    b.close();
    let deadline = Instant::now() + Duration::from_secs(10);
    while la.locked().unwrap() {
        assert!(Instant::now() < deadline, "a gone client's lock was never released");
        std::thread::sleep(Duration::from_millis(10));
    }
    {
        let _g = la.guard().unwrap();
        assert!(la.locked().unwrap());
    }
    assert!(!la.locked().unwrap(), "the guard released it");
}

#[test]
fn a_semaphore_gives_out_max_leases() {
    let (_cluster, a, b) = cluster();
    let sa = Semaphore::new(&a, "pool", 2).unwrap();
    let sb = Semaphore::new(&b, "pool", 2).unwrap();
    assert!(sa.acquire().unwrap());
    assert!(sb.acquire().unwrap());
    assert_eq!(sa.get_value().unwrap(), 2);
    assert!(!sb.acquire_timeout(Duration::from_millis(50)).unwrap(), "both leases are out");
    sa.release().unwrap();
    assert!(sb.acquire_timeout(Duration::from_secs(10)).unwrap());
    assert!(matches!(Semaphore::new(&a, "x", 0), Err(Error::InvalidArgument(_))));
}

#[test]
fn a_queue_carries_values_and_futures_between_clients() {
    let (_cluster, a, b) = cluster();
    let qa: Queue<i64> = Queue::new(&a, "work");
    let qb: Queue<i64> = Queue::new(&b, "work");
    qa.put(&1).unwrap();
    qa.put(&2).unwrap();
    // A future in the queue stays alive after its submitter lets go of it.
    let f = a.submit(inc, (41,)).unwrap();
    let key = f.key().to_string();
    qa.put_future(&f).unwrap();
    drop(f);
    assert_eq!(qb.qsize().unwrap(), 3);
    assert!(matches!(qb.get().unwrap(), Shared::Value(1)));
    let rest = qb.get_batch(2, Some(Duration::from_secs(10))).unwrap();
    assert!(matches!(rest[0], Shared::Value(2)));
    let Shared::Future(g) = &rest[1] else { panic!("a future was put") };
    assert_eq!(g.key(), key);
    assert_eq!(g.result().unwrap(), 42);
    assert!(qb.get_all().unwrap().is_empty());
    let e = qb.get_timeout(Duration::from_millis(50)).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    // A get waiting on another thread is served by a later put.
    let waiter = std::thread::spawn(move || qb.get().unwrap().result().unwrap());
    std::thread::sleep(Duration::from_millis(50));
    qa.put(&7).unwrap();
    assert_eq!(waiter.join().unwrap(), 7);
}

#[test]
fn a_bounded_queue_makes_a_put_wait_for_room() {
    let (_cluster, a, b) = cluster();
    let qa: Queue<String> = Queue::bounded(&a, "small", 1);
    qa.put(&"one".to_string()).unwrap();
    let e = qa.put_timeout(&"two".to_string(), Duration::from_millis(50)).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    let qb: Queue<String> = Queue::new(&b, "small");
    assert_eq!(qb.get().unwrap().result().unwrap(), "one");
    qa.put_timeout(&"two".to_string(), Duration::from_secs(10)).unwrap();
    assert_eq!(qb.qsize().unwrap(), 1);
}

#[test]
fn a_variable_keeps_its_future_alive_and_waits_to_be_set() {
    let (_cluster, a, b) = cluster();
    let va: Variable<i64> = Variable::new(&a, "x");
    let vb: Variable<i64> = Variable::new(&b, "x");
    let e = vb.get_timeout(Duration::from_millis(50)).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    let waiter = std::thread::spawn(move || vb.get().unwrap().result().unwrap());
    std::thread::sleep(Duration::from_millis(50));
    let f = a.submit(inc, (9,)).unwrap();
    va.set_future(&f).unwrap();
    drop(f);
    assert_eq!(waiter.join().unwrap(), 10);
    // Still there for anyone, though no client held the future in between.
    let vb: Variable<i64> = Variable::new(&b, "x");
    assert_eq!(vb.get().unwrap().result().unwrap(), 10);
    va.set(&5).unwrap();
    assert!(matches!(vb.get().unwrap(), Shared::Value(5)));
    va.delete().unwrap();
    assert!(matches!(vb.get_timeout(Duration::ZERO), Err(Error::Timeout { .. })));
}

#[test]
fn an_event_wakes_a_waiter_in_another_client() {
    let (_cluster, a, b) = cluster();
    let ea = Event::new(&a, "go");
    let eb = Event::new(&b, "go");
    assert!(!eb.is_set().unwrap());
    assert!(!eb.wait_timeout(Duration::from_millis(50)).unwrap());
    let waiter = std::thread::spawn(move || eb.wait().unwrap());
    std::thread::sleep(Duration::from_millis(50));
    ea.set().unwrap();
    assert!(waiter.join().unwrap());
    ea.clear().unwrap();
    assert!(!ea.is_set().unwrap());
}

#[test]
fn topics_reach_every_subscriber() {
    let (_cluster, a, b) = cluster();
    let s1: Sub<String> = Sub::new(&b, "news").unwrap();
    let s2: Sub<String> = Sub::new(&a, "news").unwrap();
    let p: Pub<String> = Pub::new(&a, "news");
    p.put(&"hello".to_string()).unwrap();
    assert_eq!(s1.get_timeout(Duration::from_secs(10)).unwrap(), "hello");
    assert_eq!(s2.get_timeout(Duration::from_secs(10)).unwrap(), "hello");
    drop(s1);
    p.put(&"again".to_string()).unwrap();
    assert_eq!(s2.get_timeout(Duration::from_secs(10)).unwrap(), "again");
    assert!(matches!(s2.get_timeout(Duration::from_millis(50)), Err(Error::Timeout { .. })));
}

#[test]
fn datasets_are_shared_by_name_and_kept_alive() {
    let (_cluster, a, b) = cluster();
    let f = a.submit(inc, (1,)).unwrap();
    a.publish_dataset("ones", std::slice::from_ref(&f)).unwrap();
    let e = a.publish_dataset("ones", std::slice::from_ref(&f)).unwrap_err();
    assert!(matches!(&e, Error::Refused(m) if m.contains("published already")), "{e}");
    drop(f);
    assert_eq!(b.list_datasets().unwrap(), vec!["ones".to_string()]);
    assert!(b.datasets().contains("ones").unwrap());
    let got = b.get_dataset::<i64>("ones").unwrap();
    assert_eq!(got[0].result().unwrap(), 2);
    let e = b.get_dataset::<i64>("twos").unwrap_err();
    assert!(matches!(&e, Error::Refused(m) if m.contains("no dataset named \"twos\"")), "{e}");
    b.unpublish_dataset("ones").unwrap();
    assert!(b.datasets().is_empty().unwrap());
    assert!(matches!(b.unpublish_dataset("ones"), Err(Error::Refused(_))));
}

#[test]
fn metadata_merges_nested_paths() {
    let (_cluster, a, b) = cluster();
    a.set_metadata(&["x"], &1).unwrap();
    a.set_metadata(&["x", "w", "z"], &2).unwrap();
    a.set_metadata(&["x", "w", "y"], &vec![3]).unwrap();
    assert_eq!(b.get_metadata::<i64>(&["x", "w", "z"]).unwrap(), 2);
    let x: serde_json::Value = b.get_metadata(&["x"]).unwrap();
    assert_eq!(x, serde_json::json!({"w": {"z": 2, "y": [3]}}));
    assert_eq!(b.get_metadata_or(&["nope"], 9).unwrap(), 9);
    assert!(matches!(b.get_metadata::<i64>(&["nope"]), Err(Error::Refused(_))));
    assert!(matches!(b.get_metadata::<String>(&["x", "w", "z"]), Err(Error::InvalidArgument(_))));
    assert!(matches!(a.set_metadata(&[], &1), Err(Error::InvalidArgument(_))));
}

#[test]
fn a_future_handed_over_in_one_client_survives_its_producer_dropping_it() {
    let (_cluster, a, _b) = cluster();
    for i in 0..20i64 {
        let q: Queue<i64> = Queue::new(&a, "handover");
        let consumer = {
            let q: Queue<i64> = Queue::new(&a, "handover");
            std::thread::spawn(move || q.get().unwrap().result().unwrap())
        };
        std::thread::sleep(Duration::from_millis(5));
        // The producer shares the consumer's client and lets go of its future at once.
        let f = a.submit(inc, (i,)).unwrap();
        q.put_future(&f).unwrap();
        drop(f);
        assert_eq!(consumer.join().unwrap(), i + 1);
    }
}

#[test]
fn a_client_hears_its_own_topic() {
    let (_cluster, a, _b) = cluster();
    let p: Pub<i64> = Pub::new(&a, "nums");
    let s: Sub<i64> = Sub::new(&a, "nums").unwrap();
    p.put(&3).unwrap();
    assert_eq!(s.get_timeout(Duration::from_secs(10)).unwrap(), 3);
}

#[test]
fn an_async_acquire_given_up_leaves_no_lease_behind() {
    let (_cluster, a, b) = cluster();
    let held = Lock::new(&b, "given-up");
    assert!(held.acquire().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let waiter = Lock::new(&a, "given-up");
    // The caller gives up (its own timeout drops the call) while the scheduler still waits.
    let gave_up =
        rt.block_on(async { tokio::time::timeout(Duration::from_millis(50), waiter.acquire_async(None)).await });
    assert!(gave_up.is_err());
    // When b releases, the lease granted to the abandoned call is handed back at once.
    held.release().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.locked().unwrap() {
        assert!(Instant::now() < deadline, "the abandoned acquire kept the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(Lock::new(&b, "given-up").try_acquire().unwrap());
}
