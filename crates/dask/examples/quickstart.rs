//! A first computation on a local cluster: `cargo run --release --example quickstart`.
use std::time::Instant;

use dask::{Client, Graph, LocalCluster, Ref, as_completed};

/// Your own task function: registered by the attribute, callable by name on every worker.
#[dask::task]
fn square(x: i64) -> i64 {
    x * x
}

#[dask::task]
fn total(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

#[dask::task]
fn checked_div(a: i64, b: i64) -> Result<i64, String> {
    if b == 0 { Err(format!("cannot divide {a} by zero")) } else { Ok(a / b) }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let cluster = LocalCluster::builder().n_workers(2).threads_per_worker(1).build()?;
    let client = Client::connect(&cluster.scheduler_address())?;
    println!("cluster up at {} in {:?}", cluster.scheduler_address(), t0.elapsed());

    // submit and result; futures as arguments make dependencies.
    let a = client.submit(square, (7,))?;
    let b = client.submit(checked_div, (&a, 7))?;
    println!("square(7) / 7 = {}", b.result()?);

    // map + gather: 10,000 tasks.
    let t = Instant::now();
    let squares = client.map(square, 0..10_000)?;
    let values: Vec<i64> = client.gather(&squares)?;
    println!("map+gather of {} tasks in {:?}", values.len(), t.elapsed());

    // a reduction over futures in a list.
    let sum = client.submit(total, (&squares,))?;
    println!("sum of squares below 10,000 = {}", sum.result()?);

    // a graph, run with get.
    let mut graph = Graph::new();
    graph.add("x", square, (3,))?;
    graph.add("y", square, (4,))?;
    let z: Ref<i64> = graph.add("z", total, (vec![Ref::<i64>::new("x"), Ref::new("y")],))?;
    println!("graph: 3^2 + 4^2 = {}", client.get::<i64>(&graph, z.key())?);

    // errors come back with the task's message, function, key and worker.
    let bad = client.submit(checked_div, (1, 0))?;
    match bad.result() {
        Err(e) => println!("as expected: {e}"),
        Ok(v) => println!("unexpected: {v}"),
    }

    // as_completed.
    let some = client.map(square, 100..105)?;
    let done: Vec<i64> = as_completed(some).into_iter().map(|f| f.result()).collect::<Result<_, _>>()?;
    println!("as_completed gave {} results", done.len());

    client.close();
    cluster.close();
    println!("done in {:?}", t0.elapsed());
    Ok(())
}
