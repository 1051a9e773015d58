//! Actors (tier 2): a stateful object on one worker, called from two clients; calls run one at
//! a time in order; attributes read by name; errors; the actor dies with its worker.
use std::time::Duration;

use dask::{Actor, Client, Error, LocalCluster};
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct Counter {
    n: i64,
    calls: u64,
}

#[derive(Serialize, Deserialize)]
enum CounterMsg {
    Add(i64),
    Get,
    Fail,
    Slow(u64),
}

impl Actor for Counter {
    const NAME: &'static str = "Counter";
    type Init = i64;
    type Msg = CounterMsg;
    type Reply = i64;
    fn new(init: i64) -> Self {
        Counter { n: init, calls: 0 }
    }
    fn handle(&mut self, msg: CounterMsg) -> Result<i64, String> {
        self.calls += 1;
        match msg {
            CounterMsg::Add(k) => {
                // Read, pause, write: concurrent calls would lose updates.
                let now = self.n;
                std::thread::sleep(Duration::from_micros(200));
                self.n = now + k;
                Ok(self.n)
            }
            CounterMsg::Get => Ok(self.n),
            CounterMsg::Fail => Err("told to fail".into()),
            CounterMsg::Slow(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(self.n)
            }
        }
    }
}

dask::register_actor!(Counter);

#[test]
fn an_actor_keeps_state_and_takes_calls_one_at_a_time() {
    let cluster = LocalCluster::builder().n_workers(2).threads_per_worker(2).build().unwrap();
    let a = Client::connect(&cluster.scheduler_address()).unwrap();
    let counter = a.submit_actor::<Counter>(10).unwrap();
    assert!(cluster.worker_addresses().contains(&counter.worker().to_string()));
    assert_eq!(counter.call(CounterMsg::Add(5)).unwrap(), 15);
    // Many callers at once: no update is lost, as calls run one at a time.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let c = counter.clone();
            std::thread::spawn(move || {
                for _ in 0..10 {
                    c.call(CounterMsg::Add(1)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(counter.call(CounterMsg::Get).unwrap(), 95);
    assert_eq!(counter.attribute::<i64>("n").unwrap(), 95);
    assert_eq!(counter.attribute::<u64>("calls").unwrap(), 82, "Add(5), 80 Adds, one Get");
    // Errors: the call's own, an unknown attribute; the actor lives on.
    assert!(matches!(counter.call(CounterMsg::Fail), Err(Error::Task(t)) if t.message.contains("told to fail")));
    assert!(matches!(counter.attribute::<i64>("nope"), Err(Error::Task(t)) if t.message.contains("no attribute")));
    assert_eq!(counter.call(CounterMsg::Get).unwrap(), 95);
}

#[test]
fn an_actor_dies_with_its_worker_and_says_so() {
    let mut cluster = LocalCluster::builder().n_workers(1).threads_per_worker(1).build().unwrap();
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    let counter = client.submit_actor::<Counter>(1).unwrap();
    let pending = {
        let c = counter.clone();
        std::thread::spawn(move || c.call(CounterMsg::Slow(3_000)))
    };
    std::thread::sleep(Duration::from_millis(300));
    cluster.kill_worker(0);
    let e = pending.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("left before"), "{e}");
    // Later calls are refused with the reason (the worker, or the actor on it, is gone).
    let e = counter.call(CounterMsg::Get).unwrap_err();
    assert!(e.to_string().contains("gone") || e.to_string().contains("no actor"), "{e}");
}
