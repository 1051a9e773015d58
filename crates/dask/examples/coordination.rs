//! Coordination, tasks that submit tasks, and actors: `cargo run --release --example coordination`.
use std::time::Duration;

use dask::{Actor, AdaptOptions, Client, LocalCluster, Lock, Queue, Variable};
use serde::{Deserialize, Serialize};

/// A task that takes a shared lock to bump a shared counter.
#[dask::task]
fn bump(_i: i64) -> Result<i64, String> {
    let client = dask::get_client().map_err(|e| e.to_string())?;
    let lock = Lock::new(&client, "counter");
    let _held = lock.guard().map_err(|e| e.to_string())?;
    let counter: Variable<i64> = Variable::new(&client, "count");
    let n = counter.get().and_then(|v| v.result()).map_err(|e| e.to_string())?;
    counter.set(&(n + 1)).map_err(|e| e.to_string())?;
    Ok(n + 1)
}

/// Fibonacci by subtasks: each waits on its two, seceded, so even one thread never deadlocks.
#[dask::task]
fn fib(n: i64) -> Result<i64, String> {
    if n < 2 {
        return Ok(n);
    }
    let c = dask::worker_client().map_err(|e| e.to_string())?;
    let (a, b) =
        (c.submit(fib, (n - 1,)).map_err(|e| e.to_string())?, c.submit(fib, (n - 2,)).map_err(|e| e.to_string())?);
    Ok(a.result().map_err(|e| e.to_string())? + b.result().map_err(|e| e.to_string())?)
}

/// A stateful object on one worker.
#[derive(Serialize)]
struct Tally {
    seen: Vec<String>,
}

#[derive(Serialize, Deserialize)]
enum TallyMsg {
    Add(String),
    Count,
}

impl Actor for Tally {
    const NAME: &'static str = "Tally";
    type Init = ();
    type Msg = TallyMsg;
    type Reply = usize;
    fn new(_: ()) -> Self {
        Tally { seen: Vec::new() }
    }
    fn handle(&mut self, msg: TallyMsg) -> Result<usize, String> {
        if let TallyMsg::Add(s) = msg {
            self.seen.push(s);
        }
        Ok(self.seen.len())
    }
}

dask::register_actor!(Tally);

#[dask::task]
fn slow(x: i64) -> i64 {
    std::thread::sleep(Duration::from_millis(100));
    x
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut cluster = LocalCluster::builder().n_workers(1).threads_per_worker(1).build()?;
    let client = Client::connect(&cluster.scheduler_address())?;

    // A variable and a lock shared by twenty tasks: no increment is lost.
    Variable::<i64>::new(&client, "count").set(&0)?;
    client.gather(&client.map(bump, 0..20)?)?;
    println!("counter after 20 locked bumps: {}", Variable::<i64>::new(&client, "count").get()?.result()?);

    // A queue from tasks to the client, holding futures.
    let q: Queue<i64> = Queue::new(&client, "results");
    for i in 0..3 {
        q.put_future(&client.submit(fib, (10 + i,))?)?;
    }
    let got: Vec<i64> =
        q.get_batch(3, Some(Duration::from_secs(60)))?.into_iter().map(|s| s.result()).collect::<Result<_, _>>()?;
    println!("fib(10..13) by subtasks on one thread: {got:?}");

    // An actor.
    let tally = client.submit_actor::<Tally>(())?;
    for w in ["a", "b", "c"] {
        tally.call(TallyMsg::Add(w.into()))?;
    }
    println!(
        "the actor on {} saw {} items: {:?}",
        tally.worker(),
        tally.call(TallyMsg::Count)?,
        tally.attribute::<Vec<String>>("seen")?
    );

    // Adaptive scaling: a burst scales up, idleness scales back down.
    let opts = AdaptOptions {
        minimum: 1,
        maximum: 4,
        target_duration: Duration::from_secs(1),
        interval: Duration::from_millis(200),
        wait_count: 2,
        ..Default::default()
    };
    cluster.adapt(opts)?;
    let burst = client.map(slow, 0..60)?;
    let mut peak = 1;
    while !burst.iter().all(|f| f.done()) {
        peak = peak.max(cluster.n_workers());
        std::thread::sleep(Duration::from_millis(50));
    }
    client.gather(&burst)?;
    println!("adaptive: peaked at {peak} workers for the burst");
    let t = std::time::Instant::now();
    while cluster.n_workers() > 1 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("adaptive: back to {} worker(s) when idle", cluster.n_workers());
    Ok(())
}
