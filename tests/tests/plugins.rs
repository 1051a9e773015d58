//! Tier 3: `upload_file` of a plugin library into stock `dask-worker` processes (which know none
//! of its functions), and worker plugins a stock worker does not have.
use std::time::Duration;

use dask::{Client, Graph, Ref, SubmitOptions};
use dask_system_tests::{Proc, TempDir, binary, plugin_library, start_scheduler};
use dask_test_plugin::{explode, quadruple, refuse, total};

const LONG: Duration = Duration::from_secs(60);

#[test]
fn upload_file_teaches_running_and_later_workers_a_librarys_functions() {
    let dir = TempDir::new("upload");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let w = binary("dask-worker");
    let _w1 = Proc::start(&w, &[&address, "--nthreads", "1", "--name", "w1"], dir.path("w1.log"));
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();

    // Unknown before the upload, and the error says what to do.
    let err = client.submit(quadruple, (5,)).unwrap().result_timeout(LONG).unwrap_err().to_string();
    assert!(err.contains("unknown-function") && err.contains("upload_file"), "{err}");

    client.upload_file(plugin_library()).unwrap();
    assert_eq!(client.submit(quadruple, (5,)).unwrap().result_timeout(LONG).unwrap(), 20);
    // A dependency's value crosses into the library; errors and panics come back as such.
    let mut g = Graph::new();
    g.add("q1", quadruple, (1,)).unwrap();
    g.add("q2", quadruple, (2,)).unwrap();
    g.add("sum", total, (vec![Ref::<i64>::new("q1"), Ref::<i64>::new("q2")],)).unwrap();
    assert_eq!(client.compute_graph::<i64>(&g, &["sum"]).unwrap()[0].result_timeout(LONG).unwrap(), 12);
    let err = client.submit(refuse, ("no thanks".to_string(),)).unwrap().result_timeout(LONG).unwrap_err();
    assert!(err.to_string().contains("no thanks"), "{err}");
    let f = client.submit(explode, (7,)).unwrap();
    let err = f.result_timeout(LONG).unwrap_err();
    assert!(err.to_string().contains("exploded on 7") && err.to_string().contains("panic"), "{err}");
    assert!(f.traceback().is_some(), "a panic in a library keeps its backtrace");

    // A worker that joins later gets the library before it takes tasks.
    let _w2 = Proc::start(&w, &[&address, "--nthreads", "1", "--name", "w2"], dir.path("w2.log"));
    client.wait_for_workers(2, Some(LONG)).unwrap();
    let on_w2 = SubmitOptions { workers: vec!["w2".into()], allow_other_workers: false, ..Default::default() };
    let f = client.submit_with(quadruple, (10,), on_w2).unwrap();
    assert_eq!(f.result_timeout(LONG).unwrap(), 40);

    // Bad uploads are refused with the reason, and the cluster goes on.
    let junk = dir.path("junk.so");
    std::fs::write(&junk, b"not a library").unwrap();
    let err = client.upload_file(&junk).unwrap_err().to_string();
    assert!(err.contains("could not load") && err.contains("junk.so"), "{err}");
    let err = client.upload_file(dir.path("missing.so")).unwrap_err().to_string();
    assert!(err.contains("cannot read"), "{err}");
    // Any other file is only stored.
    let notes = dir.path("notes.txt");
    std::fs::write(&notes, b"data for tasks").unwrap();
    client.upload_file(&notes).unwrap();
    assert_eq!(client.submit(quadruple, (3,)).unwrap().result_timeout(LONG).unwrap(), 12);
}

/// A plugin type the stock worker binary does not have.
#[derive(serde::Serialize, serde::Deserialize)]
struct OnlyInTests;

impl dask::WorkerPlugin for OnlyInTests {
    const NAME: &'static str = "only-in-tests";
}

#[test]
fn a_plugin_type_unknown_to_the_worker_binary_is_refused_clearly() {
    let dir = TempDir::new("plugin-unknown");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let _w = Proc::start(&binary("dask-worker"), &[&address, "--nthreads", "1"], dir.path("w.log"));
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    let err = client.register_plugin(OnlyInTests).unwrap_err().to_string();
    assert!(err.contains("no worker plugin type named \"only-in-tests\""), "{err}");
    // Registered all the same (dask keeps it); removing it works, twice does not.
    client.unregister_worker_plugin("only-in-tests").unwrap();
    let err = client.unregister_worker_plugin("only-in-tests").unwrap_err().to_string();
    assert!(err.contains("no worker plugin named"), "{err}");
}

#[test]
fn a_scheduler_preload_it_does_not_have_stops_it_with_the_reason() {
    let dir = TempDir::new("preload");
    let mut s = Proc::start(
        &binary("dask-scheduler"),
        &["--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--preload", "no-such-plugin"],
        dir.path("s.log"),
    );
    assert_eq!(s.wait_exit(LONG).and_then(|s| s.code()), Some(1), "{}", s.log());
    assert!(s.log().contains("--preload no-such-plugin: no scheduler plugin type named"), "{}", s.log());
}

#[test]
fn a_worker_preloads_a_plugin_library_before_it_joins() {
    let dir = TempDir::new("preload-lib");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let lib = plugin_library();
    let _w = Proc::start(
        &binary("dask-worker"),
        &[&address, "--nthreads", "1", "--preload", lib.to_str().unwrap()],
        dir.path("w.log"),
    );
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    assert_eq!(client.submit(quadruple, (6,)).unwrap().result_timeout(LONG).unwrap(), 24);
    // A library that is not one stops the worker with the reason.
    let junk = dir.path("libjunk.so");
    std::fs::write(&junk, b"junk").unwrap();
    let mut bad = Proc::start(
        &binary("dask-worker"),
        &[&address, "--no-nanny", "--preload", junk.to_str().unwrap()],
        dir.path("bad.log"),
    );
    assert_eq!(bad.wait_exit(LONG).and_then(|s| s.code()), Some(1), "{}", bad.log());
    assert!(bad.log().contains("--preload") && bad.log().contains("could not load"), "{}", bad.log());
}
