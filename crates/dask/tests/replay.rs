//! `get_futures_error` and `recreate_error_locally` (tier 2): the failed task behind a
//! future's error, rerun in the test's own thread with the same inputs.
use dask::builtins::inc;
use dask::{Client, Error, LocalCluster};

#[dask::task]
fn divide(a: i64, b: i64) -> Result<i64, String> {
    if b == 0 { Err(format!("cannot divide {a} by zero")) } else { Ok(a / b) }
}

#[dask::task]
fn boom(x: i64) -> i64 {
    if x > 0 {
        panic!("boom at {x}");
    }
    x
}

fn cluster() -> (LocalCluster, Client) {
    let cluster = LocalCluster::builder().n_workers(1).threads_per_worker(1).build().expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    (cluster, client)
}

#[test]
fn the_failed_task_is_found_and_fails_again_here_with_the_same_inputs() {
    let (_cluster, client) = cluster();
    let x = client.submit(inc, (41,)).unwrap();
    let y = client.submit(divide, (&x, 0)).unwrap();
    let z = client.submit(inc, (&y,)).unwrap();
    assert!(z.result().is_err());

    // z failed because y did: the error leads to y.
    let failed = client.get_futures_error(&z).unwrap();
    assert_eq!(failed.key, y.key());
    assert_eq!(failed.function, "divide");
    assert_eq!(failed.dependencies, vec![x.key().to_string()]);
    assert!(failed.error.message.contains("cannot divide 42 by zero"), "{:?}", failed.error);

    // The input is let go of; rerunning fetches it again (recomputed).
    drop(x);
    let err = client.recreate_error_locally(&z).unwrap_err();
    match err {
        Error::Task(t) => {
            assert_eq!(t.message, "cannot divide 42 by zero");
            assert_eq!(t.worker, "", "it ran here, on no worker");
        }
        other => panic!("{other}"),
    }

    // A future that did not fail has no error to replay.
    let ok = client.submit(inc, (1,)).unwrap();
    assert!(matches!(client.recreate_error_locally(&ok), Err(Error::InvalidArgument(_))));
}

#[test]
fn a_panicking_task_panics_in_the_callers_thread() {
    let (_cluster, client) = cluster();
    let f = client.submit(boom, (3,)).unwrap();
    assert!(f.result().is_err());
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| client.recreate_error_locally(&f)));
    let payload = caught.expect_err("the panic reaches the caller");
    assert_eq!(payload.downcast_ref::<String>().map(String::as_str), Some("boom at 3"));
}
