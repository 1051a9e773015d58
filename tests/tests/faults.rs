//! Tier 3, faults and memory: real binaries (the test worker `custom-worker`, which has the
//! crashing and memory-hungry functions of `dask_system_tests`), started, starved and killed.
use std::path::Path;
use std::time::{Duration, Instant};

use dask::builtins::slowinc;
use dask::{Client, SubmitOptions};
use dask_system_tests::{
    Proc, TempDir, alive, checksum, counted, die, expected_checksum, hog, noise, panic_holding, runs_counted, signal,
    start_scheduler, start_with_env, triple,
};

const LONG: Duration = Duration::from_secs(120);
const MB: u64 = 1_000_000;

fn test_worker() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_custom-worker"))
}

/// Waits until `f` holds, polling; panics with `what` after `timeout`.
fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn workers_with_300_mb_compute_1_2_gb_by_spilling_and_clean_up() {
    let dir = TempDir::new("spill");
    let local = dir.path("local");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| {
            let args = [
                address.as_str(),
                "--no-nanny",
                "--nthreads",
                "1",
                "--memory-limit",
                "300MB",
                "--local-directory",
                local.to_str().unwrap(),
                "--name",
                if i == 0 { "s0" } else { "s1" },
            ];
            Proc::start(test_worker(), &args, dir.path(&format!("w{i}.log")))
        })
        .collect();
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();

    // 60 values of 20 MB held at once: 1.2 GB on workers with 300 MB each.
    let n = 20 * MB;
    let arrays = client.map_args(noise, (0..60u64).map(|i| (i, n))).unwrap();
    let sums = client.map(checksum, &arrays).unwrap();
    let got: Vec<u64> = client.gather(&sums).unwrap();
    let want: Vec<u64> = (0..60u64).map(|i| expected_checksum(i, n)).collect();
    assert_eq!(got, want);

    // The arrays are still held: most of them are on disk, and the workers say so.
    eventually(Duration::from_secs(20), "spilled bytes in scheduler_info", || {
        let info = client.scheduler_info().unwrap();
        let spilled: u64 = info.workers.iter().map(|w| w.memory_spilled).sum();
        let managed: u64 = info.workers.iter().map(|w| w.memory_managed).sum();
        spilled + managed >= 60 * n && spilled >= 600 * MB
    });
    let info = client.scheduler_info().unwrap();
    for w in &info.workers {
        assert!(w.memory_managed <= 180 * MB, "{} holds {} bytes in memory (target 60%)", w.name, w.memory_managed);
    }
    // Read back from disk, still right.
    let again: Vec<u64> = client.gather(&client.map(checksum, &arrays[..10]).unwrap()).unwrap();
    assert_eq!(again, want[..10]);

    // A clean exit removes the spilled files.
    drop((arrays, sums));
    client.close();
    for w in &mut workers {
        w.terminate();
        assert!(w.wait_exit(LONG).is_some(), "{}", w.log());
    }
    let left: Vec<_> = std::fs::read_dir(local.join("dask-scratch-space"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "files left after close: {left:?}");
}

/// Workers (each under its nanny, the default) of the test worker binary.
fn nanny_workers(dir: &TempDir, address: &str, n: usize, extra: &[&str], env: &[(&str, &str)]) -> Vec<Proc> {
    (0..n)
        .map(|i| {
            let name = format!("n{i}");
            let mut args = vec![address, "--name", name.as_str()];
            if !extra.contains(&"--nthreads") {
                args.extend_from_slice(&["--nthreads", "1"]);
            }
            args.extend_from_slice(extra);
            start_with_env(test_worker(), &args, env, dir.path(&format!("n{i}.log")))
        })
        .collect()
}

/// `name -> pid` of the workers connected now.
fn worker_pids(client: &Client) -> std::collections::HashMap<String, u32> {
    client.scheduler_info().unwrap().workers.into_iter().map(|w| (w.name, w.pid)).collect()
}

/// A fast backoff for tests (dask-rs's default is 1 s doubling to 30 s).
const FAST_BACKOFF: (&str, &str) = ("DASK_DISTRIBUTED__NANNY__RESTART_BACKOFF_INITIAL", "50ms");

#[test]
fn a_nanny_restarts_a_killed_worker_and_the_scheduler_says_why() {
    let dir = TempDir::new("nanny-kill");
    let (sched, address) = start_scheduler(&dir, &[]);
    let _w = nanny_workers(&dir, &address, 1, &[], &[FAST_BACKOFF]);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    let info = client.scheduler_info().unwrap();
    assert!(!info.workers[0].nanny.is_empty(), "the worker names its nanny");
    let old = info.workers[0].pid;
    signal(old, "KILL");
    eventually(LONG, "a fresh worker", || worker_pids(&client).get("n0").is_some_and(|p| *p != old));
    let info = client.scheduler_info().unwrap();
    assert!(info.workers[0].previous_exit.contains("signal 9"), "{:?}", info.workers[0].previous_exit);
    assert!(sched.log().contains("signal 9"), "the scheduler's log says why: {}", sched.log());
    assert_eq!(client.submit(triple, (3,)).unwrap().result_timeout(LONG).unwrap(), 9);
}

#[test]
fn restart_replaces_every_worker_and_cancels_every_future_even_mid_graph() {
    let dir = TempDir::new("restart");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let _w = nanny_workers(&dir, &address, 2, &[], &[]);
    let client = Client::connect(&address).unwrap();
    let other = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    let before = worker_pids(&client);
    let held = client.map(triple, 0..100).unwrap();
    let _: Vec<i64> = client.gather(&held).unwrap();
    // Tasks still running when the restart comes, and another client's future.
    let running = client.map_args(slowinc, (0..20).map(|i| (i, 200u64))).unwrap();
    let theirs = other.submit(slowinc, (1, 60_000)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    client.restart().unwrap();
    let after = worker_pids(&client);
    assert_eq!(after.len(), 2);
    for (name, pid) in &after {
        assert_ne!(before.get(name), Some(pid), "{name} is a new process");
    }
    for f in held.iter().chain(&running) {
        let e = f.result_timeout(LONG).unwrap_err();
        assert!(matches!(e, dask::Error::Cancelled { ref reason, .. } if reason.contains("restarted")), "{e}");
    }
    let e = theirs.result_timeout(LONG).unwrap_err();
    assert!(e.to_string().contains("restarted"), "the other client hears why: {e}");
    // The cluster works afterwards, and the same keys compute afresh.
    assert_eq!(
        client.gather(&client.map(triple, 0..100).unwrap()).unwrap(),
        (0..100).map(|i| i * 3).collect::<Vec<i64>>()
    );
}

#[test]
fn restart_without_a_nanny_fails_and_changes_nothing() {
    let dir = TempDir::new("restart-no-nanny");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let _w = Proc::start(test_worker(), &[&address, "--no-nanny", "--name", "bare"], dir.path("w.log"));
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    let x = client.submit(triple, (5,)).unwrap();
    assert_eq!(x.result_timeout(LONG).unwrap(), 15);
    let e = client.restart().unwrap_err().to_string();
    assert!(e.contains("nanny") && e.contains("--no-nanny"), "{e}");
    assert_eq!(x.result().unwrap(), 15, "nothing was released");
}

#[test]
fn a_worker_that_cannot_start_makes_its_nanny_give_up_after_five_tries() {
    let dir = TempDir::new("no-start");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let mut n = start_with_env(
        test_worker(),
        &[&address],
        &[("DASK_TEST_WORKER_EXITS_AT_ONCE", "1"), FAST_BACKOFF],
        dir.path("n.log"),
    );
    let status = n.wait_exit(LONG);
    let log = n.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(log.contains("5 times in a row") && log.contains("exit code 3"), "{log}");
    assert_eq!(log.matches("exiting at once, as asked").count(), 5, "exactly five starts, no storm: {log}");
    // A worker the scheduler refuses (its name is taken) is not started again at all.
    let _first = Proc::start(test_worker(), &[&address, "--no-nanny", "--name", "taken"], dir.path("a.log"));
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    let mut dup = Proc::start(test_worker(), &[&address, "--name", "taken"], dir.path("dup.log"));
    assert_eq!(dup.wait_exit(LONG).and_then(|s| s.code()), Some(1), "{}", dup.log());
    assert!(dup.log().contains("already connected") && dup.log().contains("not starting it again"), "{}", dup.log());
}

#[test]
fn a_task_past_terminate_restarts_its_worker_and_ends_as_killed_worker() {
    let dir = TempDir::new("terminate");
    let (sched, address) = start_scheduler(&dir, &["--allowed-failures", "1"]);
    let _w = nanny_workers(&dir, &address, 2, &["--memory-limit", "200MB"], &[FAST_BACKOFF]);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    // Holds 400 MB for a while: past 95% of 200 MB, wherever it runs.
    let e = client.submit(hog, (400, 5_000)).unwrap().result_timeout(LONG).unwrap_err().to_string();
    assert!(e.contains("killed-worker") && e.contains("over memory limit"), "{e}");
    assert!(sched.log().contains("over memory limit"), "{}", sched.log());
    // The cluster keeps serving, both workers back.
    client.wait_for_workers(2, Some(LONG)).unwrap();
    assert_eq!(client.submit(triple, (2,)).unwrap().result_timeout(LONG).unwrap(), 6);
}

#[test]
fn a_task_that_panics_holding_memory_is_an_error_and_its_worker_lives_on() {
    let dir = TempDir::new("panic");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let _w = nanny_workers(&dir, &address, 1, &["--memory-limit", "1GB"], &[]);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    let pid = worker_pids(&client)["n0"];
    let e = client.submit(panic_holding, (100,)).unwrap().result_timeout(LONG).unwrap_err().to_string();
    assert!(e.contains("panic") && e.contains("gave up holding 100 MB"), "{e}");
    assert_eq!(client.submit(triple, (1,)).unwrap().result_timeout(LONG).unwrap(), 3);
    assert_eq!(worker_pids(&client)["n0"], pid, "no restart for a task error");
}

#[test]
fn a_worker_stopped_past_the_ttl_is_replaced_and_its_tasks_rerun() {
    let dir = TempDir::new("sigstop");
    let (sched, address) = start_scheduler(&dir, &["--worker-ttl", "2s"]);
    let _w = nanny_workers(&dir, &address, 2, &[], &[]);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    let before = worker_pids(&client);
    let stopped = before["n0"];
    let fs = client.map_args(slowinc, (0..40).map(|i| (i, 100u64))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    signal(stopped, "STOP");
    // Removed for silence; everything finishes on the other worker.
    let got: Vec<i64> = client.gather(&fs).unwrap();
    assert_eq!(got, (1..=40).collect::<Vec<_>>());
    assert!(!worker_pids(&client).values().any(|p| *p == stopped), "the stopped worker was removed");
    assert!(sched.log().contains("worker-ttl"), "{}", sched.log());
    // Woken, it is told it is gone and leaves; its nanny starts a fresh one.
    signal(stopped, "CONT");
    eventually(LONG, "the stopped worker to exit", || !alive(stopped));
    eventually(LONG, "a fresh n0", || worker_pids(&client).get("n0").is_some_and(|p| *p != stopped));
}

#[test]
fn a_task_that_kills_its_worker_ends_as_killed_worker_and_queued_tasks_do_not() {
    let dir = TempDir::new("crasher");
    let (sched, address) = start_scheduler(&dir, &[]);
    let _w = nanny_workers(&dir, &address, 2, &[], &[FAST_BACKOFF]);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    // Short tasks queue deep on both workers; one task kills whichever worker runs it.
    let innocents = client.map_args(slowinc, (0..300).map(|i| (i, 10u64))).unwrap();
    let bomb = client.submit(die, (1,)).unwrap();
    let e = bomb.result_timeout(LONG).unwrap_err().to_string();
    assert!(e.contains("killed-worker") && e.contains("running on 4 workers that died"), "{e}");
    assert!(e.contains("exit code 1"), "the error says how the last worker ended: {e}");
    let got: Vec<i64> = client.gather(&innocents).unwrap();
    assert_eq!(got, (1..=300).collect::<Vec<_>>(), "no queued task paid for the crashes");
    assert!(sched.log().contains("marked as failed because 4 workers died"), "{}", sched.log());
}

#[test]
fn retiring_a_worker_with_the_only_copies_recomputes_nothing() {
    let dir = TempDir::new("retire");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let mut w = nanny_workers(&dir, &address, 2, &[], &[]);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    let count = dir.path("runs");
    let path = count.to_str().unwrap().to_string();
    // 100 results, all on n0.
    let opts = SubmitOptions { workers: vec!["n0".into()], ..Default::default() };
    let fs = client.map_with(counted, (0..100).map(|i| (path.clone(), i, 0u64)), opts, None).unwrap();
    let want: Vec<i64> = (0..100).collect();
    assert_eq!(client.gather(&fs).unwrap(), want);
    assert_eq!(runs_counted(&count), 100);
    let n0 = client.scheduler_info().unwrap().workers.into_iter().find(|x| x.name == "n0").unwrap();
    let retired = client.retire_workers(&["n0"], true).unwrap();
    assert_eq!(retired, vec![n0.address.clone()]);
    // n0 is gone (its nanny too); every value is on n1, and nothing ran again.
    assert_eq!(w[0].wait_exit(LONG).and_then(|s| s.code()), Some(0), "{}", w[0].log());
    let info = client.scheduler_info().unwrap();
    assert_eq!(info.workers.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), vec!["n1"]);
    assert_eq!(client.gather(&fs).unwrap(), want);
    assert_eq!(runs_counted(&count), 100, "no result was recomputed");
    // Retiring the last worker holding data is refused, and says why.
    let e = client.retire_workers(&["n1"], true).unwrap_err().to_string();
    assert!(e.contains("no other worker"), "{e}");
    let e = client.retire_workers(&["nobody"], true).unwrap_err().to_string();
    assert!(e.contains("nobody"), "{e}");
}

#[test]
fn a_worker_past_its_lifetime_retires_and_its_nanny_starts_a_fresh_one() {
    let dir = TempDir::new("lifetime");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let _steady = nanny_workers(&dir, &address, 1, &[], &[]);
    let _short = start_with_env(
        test_worker(),
        &[&address, "--nthreads", "1", "--name", "short", "--lifetime", "3s", "--lifetime-restart"],
        &[],
        dir.path("short.log"),
    );
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    let count = dir.path("runs");
    let path = count.to_str().unwrap().to_string();
    let opts = SubmitOptions { workers: vec!["short".into()], ..Default::default() };
    let fs = client.map_with(counted, (0..20).map(|i| (path.clone(), i, 0u64)), opts, None).unwrap();
    let want: Vec<i64> = (0..20).collect();
    assert_eq!(client.gather(&fs).unwrap(), want);
    let first = worker_pids(&client)["short"];
    eventually(LONG, "a fresh worker after the lifetime", || {
        worker_pids(&client).get("short").is_some_and(|p| *p != first)
    });
    assert!(!alive(first), "the old worker exited");
    assert_eq!(client.gather(&fs).unwrap(), want, "its values moved before it left");
    assert_eq!(runs_counted(&count), 20, "nothing was recomputed");
}

#[test]
fn a_scheduler_restarted_at_the_same_address_gets_its_workers_and_clients_back() {
    let dir = TempDir::new("sched-restart");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let sched_args = ["--host", "127.0.0.1", "--port", port.as_str(), "--dashboard-address", ":0"];
    let mut sched = Proc::start(&dask_system_tests::binary("dask-scheduler"), &sched_args, dir.path("s1.log"));
    let address = format!("tcp://127.0.0.1:{port}");
    let _w = nanny_workers(&dir, &address, 2, &[], &[]);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    let done = client.submit(triple, (7,)).unwrap();
    assert_eq!(done.result_timeout(LONG).unwrap(), 21);
    let pending = client.submit(slowinc, (1, 60_000)).unwrap();
    // The scheduler dies and comes back at the same address.
    sched.kill();
    let _sched2 = Proc::start(&dask_system_tests::binary("dask-scheduler"), &sched_args, dir.path("s2.log"));
    // The client reconnects, and says every future it held is lost because the scheduler restarted.
    for f in [&pending, &done] {
        let e = f.result_timeout(LONG).unwrap_err().to_string();
        assert!(e.contains("scheduler restarted"), "{e}");
    }
    eventually(LONG, "the client to reconnect", || client.scheduler_info().is_ok());
    // The nannies' workers register again, and the cluster computes.
    client.wait_for_workers(2, Some(LONG)).unwrap();
    assert_eq!(client.submit(triple, (8,)).unwrap().result_timeout(LONG).unwrap(), 24);
}

#[test]
fn chaos_a_worker_sigkilled_every_one_to_two_seconds_loses_nothing() {
    let dir = TempDir::new("chaos");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let _w = nanny_workers(&dir, &address, 2, &["--nthreads", "2"], &[]);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    // 20,000 tasks of 4 ms on 4 threads: about 20 s of work, the whole fault window.
    let n = 20_000;
    let leaves = client.map_args(slowinc, (0..n).map(|i| (i, 4u64))).unwrap();
    let chunks: Vec<dask::Future<i64>> =
        leaves.chunks(100).map(|c| client.submit(dask::builtins::sum_list, (c,)).unwrap()).collect();
    let t = Instant::now();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut kills = 0;
    while t.elapsed() < Duration::from_secs(20) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(1000 + x % 1000));
        let workers = client.scheduler_info().unwrap().workers;
        if let Some(w) = workers.get((x >> 20) as usize % workers.len().max(1)) {
            signal(w.pid, "KILL");
            kills += 1;
        }
    }
    assert!(kills >= 5, "{kills} kills");
    let sums: Vec<i64> = client.gather(&chunks).unwrap();
    let expected: Vec<i64> = (0..n).collect::<Vec<_>>().chunks(100).map(|c| c.iter().map(|i| i + 1).sum()).collect();
    assert_eq!(sums, expected, "every result right, none erred as killed-worker");
    // The nannies brought every worker back.
    if let Err(e) = client.wait_for_workers(2, Some(LONG)) {
        let logs: Vec<String> = _w.iter().map(|p| p.log()).collect();
        panic!(
            "{e}: {}",
            logs.iter().map(|l| l[l.len().saturating_sub(3000)..].to_string()).collect::<Vec<_>>().join("\n-----\n")
        );
    }
    let info = client.scheduler_info().unwrap();
    assert!(info.workers.iter().all(|w| alive(w.pid)), "{:?}", info.workers);
}

#[test]
fn nworkers_starts_a_nanny_each_and_dask_nanny_runs_one() {
    let dir = TempDir::new("nworkers");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let mut many = Proc::start(
        &dask_system_tests::binary("dask-worker"),
        &[&address, "--nworkers", "2", "--nthreads", "1", "--name", "pool"],
        dir.path("pool.log"),
    );
    let _one =
        Proc::start(&dask_system_tests::binary("dask-nanny"), &[&address, "--name", "solo"], dir.path("solo.log"));
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(3, Some(LONG)).unwrap();
    let info = client.scheduler_info().unwrap();
    let mut names: Vec<&str> = info.workers.iter().map(|w| w.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["pool-0", "pool-1", "solo"]);
    // Each worker is a process of its own, under a nanny of its own.
    let pids: std::collections::HashSet<u32> = info.workers.iter().map(|w| w.pid).collect();
    assert_eq!(pids.len(), 3);
    assert!(!pids.contains(&many.child.id()), "workers are not the dask-worker process itself");
    let nannies: std::collections::HashSet<&str> = info.workers.iter().map(|w| w.nanny.as_str()).collect();
    assert!(nannies.len() == 3 && !nannies.contains(""), "{nannies:?}");
    // SIGTERM stops the nannies and their workers cleanly.
    let pool_pids: Vec<u32> = info.workers.iter().filter(|w| w.name.starts_with("pool")).map(|w| w.pid).collect();
    many.terminate();
    assert_eq!(many.wait_exit(LONG).and_then(|s| s.code()), Some(0), "{}", many.log());
    for pid in pool_pids {
        eventually(LONG, "the pool's workers to exit", || !alive(pid));
    }
}

#[test]
fn a_nanny_whose_worker_cannot_bind_its_port_gives_up_saying_why() {
    let dir = TempDir::new("bad-port");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let mut n = start_with_env(test_worker(), &[&address, "--worker-port", &port], &[FAST_BACKOFF], dir.path("n.log"));
    assert_eq!(n.wait_exit(LONG).and_then(|s| s.code()), Some(1), "{}", n.log());
    let log = n.log();
    assert!(log.contains("failed to bind") && log.contains("5 times in a row"), "{log}");
}

#[test]
fn a_worker_over_its_pause_threshold_gets_no_new_tasks_until_it_resumes() {
    let dir = TempDir::new("pause");
    let (sched, address) = start_scheduler(&dir, &[]);
    // Pauses past 80% of 300 MB (240 MB); restarts only past 95% (285 MB).
    let _w = nanny_workers(&dir, &address, 1, &["--memory-limit", "300MB"], &[]);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    // 230 MiB (241 MB) and the worker's own ~20 MB: between the two.
    let holding = client.submit(hog, (230, 3_000)).unwrap();
    eventually(LONG, "the worker to pause", || client.scheduler_info().unwrap().workers[0].status == "paused");
    // Work submitted now waits; it runs once the memory is given back.
    let later = client.submit(triple, (5,)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(later.status(), dask::FutureStatus::Pending, "a paused worker starts nothing");
    assert_eq!(holding.result_timeout(LONG).unwrap(), 230 << 20);
    assert_eq!(later.result_timeout(LONG).unwrap(), 15);
    eventually(LONG, "the worker to resume", || client.scheduler_info().unwrap().workers[0].status == "running");
    let log = sched.log();
    assert!(log.contains("paused") && log.contains("resumed"), "{log}");
}

#[test]
fn a_worker_never_outlives_its_nanny_and_sigterm_to_the_worker_alone_replaces_it() {
    let dir = TempDir::new("orphans");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let mut w = nanny_workers(&dir, &address, 2, &[], &[]);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    let pids = worker_pids(&client);
    // SIGTERM sent to a worker itself (an OOM helper, an operator): its nanny starts a new one.
    signal(pids["n1"], "TERM");
    eventually(LONG, "a fresh n1", || worker_pids(&client).get("n1").is_some_and(|p| *p != pids["n1"]));
    // Its nanny SIGKILLed: the worker notices and stops too.
    w[0].kill();
    eventually(LONG, "n0's worker to stop with its nanny", || !alive(pids["n0"]));
    eventually(LONG, "n0 to leave the scheduler", || !worker_pids(&client).contains_key("n0"));
}
