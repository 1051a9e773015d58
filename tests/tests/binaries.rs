//! Tier 3: the real `dask-scheduler` and `dask-worker` binaries, started and killed as
//! processes.
use std::path::Path;
use std::time::Duration;

use dask::builtins::{add, inc, slowinc};
use dask::{Client, Graph, Ref};
use dask_system_tests::{Proc, TempDir, binary, start_scheduler, triple};

const LONG: Duration = Duration::from_secs(60);

fn worker(dir: &TempDir, program: &Path, args: &[&str], log: &str) -> Proc {
    Proc::start(program, args, dir.path(log))
}

#[test]
fn graph_survives_a_worker_killed_with_sigkill() {
    let dir = TempDir::new("kill");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let file = dir.path("scheduler.json");
    let w = binary("dask-worker");
    // Without a nanny: killed, it stays dead (with one it would come back; see faults.rs).
    let mut w1 = worker(&dir, &w, &[&address, "--no-nanny", "--nthreads", "2", "--name", "w1"], "w1.log");
    let _w2 =
        worker(&dir, &w, &["--scheduler-file", file.to_str().unwrap(), "--nthreads", "2", "--name", "w2"], "w2.log");
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();

    // 64 slow leaves, then a binary tree of additions: results spread over both workers.
    let mut g = Graph::new();
    for i in 0..64 {
        g.add(format!("leaf-{i}"), slowinc, (i as i64, 25u64)).unwrap();
    }
    let mut level: Vec<String> = (0..64).map(|i| format!("leaf-{i}")).collect();
    let mut depth = 0;
    while level.len() > 1 {
        let mut next = Vec::new();
        for (j, pair) in level.chunks(2).enumerate() {
            let k = format!("sum-{depth}-{j}");
            g.add(k.clone(), add, (Ref::<i64>::new(&pair[0]), Ref::<i64>::new(&pair[1]))).unwrap();
            next.push(k);
        }
        level = next;
        depth += 1;
    }
    let root = level[0].clone();
    let futures = client.compute_graph::<i64>(&g, &[&root]).unwrap();
    // Let part of it run, then kill one worker outright.
    std::thread::sleep(Duration::from_millis(250));
    w1.kill();
    let expected: i64 = (1..=64).sum();
    assert_eq!(futures[0].result_timeout(LONG).unwrap(), expected);
    // The surviving worker still serves new work; the dead one is gone from the scheduler.
    assert_eq!(client.submit(inc, (1,)).unwrap().result_timeout(LONG).unwrap(), 2);
    let info = client.scheduler_info().unwrap();
    assert_eq!(info.workers.len(), 1, "the killed worker was removed");
    assert_eq!(info.workers[0].name, "w2");
}

#[test]
fn user_worker_binary_runs_user_functions_and_cli_flags_show() {
    let dir = TempDir::new("custom");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let custom = Path::new(env!("CARGO_BIN_EXE_custom-worker"));
    let _w = worker(&dir, custom, &[&address, "--nthreads", "1", "--memory-limit", "4GB", "--name", "mine"], "w.log");
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    assert_eq!(client.submit(triple, (14,)).unwrap().result_timeout(LONG).unwrap(), 42);
    // The stock functions are there too.
    assert_eq!(client.submit(inc, (1,)).unwrap().result_timeout(LONG).unwrap(), 2);
    let info = client.scheduler_info().unwrap();
    assert_eq!(info.workers[0].memory_limit, 4_000_000_000);
    assert_eq!(info.workers[0].name, "mine");
    assert_eq!(info.workers[0].nthreads, 1);
    // A second worker with the same name is refused, and says so.
    let mut dup = worker(&dir, custom, &[&address, "--name", "mine"], "dup.log");
    assert_eq!(dup.wait_exit(LONG).and_then(|s| s.code()), Some(1), "{}", dup.log());
    assert!(dup.log().contains("already connected"), "{}", dup.log());
    assert_eq!(client.scheduler_info().unwrap().workers.len(), 1);
}

#[test]
fn stock_worker_reports_unknown_user_function_clearly() {
    let dir = TempDir::new("unknown");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let _w = worker(&dir, &binary("dask-worker"), &[&address, "--nthreads", "1"], "w.log");
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    let err = client.submit(triple, (1,)).unwrap().result_timeout(LONG).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("unknown-function") && msg.contains("\"triple\""), "{msg}");
}

#[test]
fn bad_input_to_the_clis_gets_clear_errors() {
    let dir = TempDir::new("cli");
    let w = binary("dask-worker");
    let mut p = worker(&dir, &w, &["udp://x:1"], "bad-addr.log");
    assert_eq!(p.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(p.log().contains("expected tcp://HOST:PORT"), "{}", p.log());

    let mut p = worker(&dir, &w, &["tcp://127.0.0.1:1", "--memory-limit", "4XB"], "bad-mem.log");
    assert_eq!(p.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(p.log().contains("failed to parse memory limit"), "{}", p.log());

    let mut p = worker(&dir, &w, &["tcp://127.0.0.1:1", "--death-timeout", "0.3"], "dead.log");
    assert_eq!(p.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(p.log().contains("is dask-scheduler running there?"), "{}", p.log());

    let mut p = Proc::start(&w, &[], dir.path("none.log"));
    assert_eq!(p.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(p.log().contains("no scheduler given"), "{}", p.log());

    // A port already in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let mut s = Proc::start(
        &binary("dask-scheduler"),
        &["--host", "127.0.0.1", "--port", &port, "--no-dashboard"],
        dir.path("taken.log"),
    );
    assert_eq!(s.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(s.log().contains("failed to listen"), "{}", s.log());
}

#[test]
fn sigterm_stops_the_scheduler_and_its_workers_cleanly() {
    let dir = TempDir::new("term");
    let (mut sched, address) = start_scheduler(&dir, &[]);
    let mut w = worker(&dir, &binary("dask-worker"), &[&address, "--nthreads", "1"], "w.log");
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    let f = client.submit(slowinc, (1, 60_000)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    sched.terminate();
    assert_eq!(sched.wait_exit(LONG).and_then(|s| s.code()), Some(0), "{}", sched.log());
    assert!(!dir.path("scheduler.json").exists(), "the scheduler file is removed on exit");
    // The worker leaves when its scheduler is gone; the client gets an error, not a hang.
    assert!(w.wait_exit(LONG).is_some(), "worker still running: {}", w.log());
    let err = f.result_timeout(LONG).unwrap_err();
    assert!(matches!(err, dask::Error::SchedulerLost(_)), "{err}");
}

#[test]
fn a_worker_still_looking_for_its_scheduler_stops_at_once_on_sigterm() {
    let dir = TempDir::new("term-retry");
    // Nothing listens there: the worker keeps retrying (no --death-timeout).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("tcp://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut w = worker(&dir, &binary("dask-worker"), &[&address, "--no-nanny"], "w.log");
    let deadline = std::time::Instant::now() + LONG;
    while !w.log().contains("retrying") {
        assert!(std::time::Instant::now() < deadline, "{}", w.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    w.terminate();
    let status = w.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "SIGTERM must stop a retrying worker: {}", w.log());
}

#[test]
fn idle_sockets_cannot_starve_the_scheduler() {
    use std::io::Read;
    let dir = TempDir::new("idle-sockets");
    let file = dir.path("scheduler.json");
    let mut cmd = std::process::Command::new(binary("dask-scheduler"));
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--max-connections", "20", "--scheduler-file"])
        .arg(&file)
        .env("DASK_DISTRIBUTED__SCHEDULER__HANDSHAKE_TIMEOUT", "1s")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path("scheduler.log")).unwrap());
    let mut sched = Proc { child: cmd.spawn().unwrap(), log: dir.path("scheduler.log") };
    let address = dask_system_tests::wait_for_scheduler_file(&file, LONG);
    let target = address.trim_start_matches("tcp://").to_string();
    // Many sockets that never say anything.
    let mut idle: Vec<std::net::TcpStream> =
        (0..200).filter_map(|_| std::net::TcpStream::connect(&target).ok()).collect();
    assert!(idle.len() > 20, "connected {} idle sockets", idle.len());
    // A real client still gets in (the idle ones are closed after the handshake timeout, the
    // ones past the cap at once), and the cluster works.
    let client = Client::connect(&address).unwrap();
    let _w = worker(&dir, &binary("dask-worker"), &[&address, "--no-nanny", "--nthreads", "1"], "w.log");
    client.wait_for_workers(1, Some(LONG)).unwrap();
    assert_eq!(client.submit(inc, (1,)).unwrap().result_timeout(LONG).unwrap(), 2);
    // Every idle socket was closed by the scheduler.
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue, // an HTTP/2 server preface or GOAWAY before the close
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    panic!("an idle socket was left open")
                }
                Err(_) => break, // reset
            }
        }
    }
    let log = sched.log();
    assert!(log.contains("too many connections"), "the cap is logged: {log}");
    sched.terminate();
    assert_eq!(sched.wait_exit(LONG).and_then(|s| s.code()), Some(0), "{}", sched.log());
}

#[test]
fn a_spec_cluster_runs_workers_from_a_command_line() {
    let custom = env!("CARGO_BIN_EXE_custom-worker").to_string();
    let command = vec![custom, "{scheduler}".into(), "--name".into(), "{name}".into(), "--no-nanny".into()];
    let mut workers = std::collections::BTreeMap::new();
    workers.insert(
        "cmd".to_string(),
        dask::WorkerSpec {
            launch: dask::Launch::Command(command),
            group: vec!["-0".into(), "-1".into()],
            ..Default::default()
        },
    );
    let cluster = dask::SpecCluster::new(workers, None).unwrap();
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    let mut names: Vec<String> = client.scheduler_info().unwrap().workers.into_iter().map(|w| w.name).collect();
    names.sort();
    assert_eq!(names, vec!["cmd-0", "cmd-1"]);
    // They are the user's binary: its own function runs.
    assert_eq!(client.submit(triple, (5,)).unwrap().result_timeout(LONG).unwrap(), 15);
    cluster.close();
}

#[test]
fn scheduler_and_worker_logs_are_kept_and_read_from_the_client() {
    let dir = TempDir::new("logs");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let _w =
        worker(&dir, &binary("dask-worker"), &[&address, "--nthreads", "1", "--name", "logged", "--no-nanny"], "w.log");
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    let lines = client.get_scheduler_logs(100).unwrap();
    assert!(
        lines.iter().any(|(_, text)| text.contains("logged")),
        "the scheduler logged the worker joining: {lines:?}"
    );
    let by_worker = client.get_worker_logs(100, &[] as &[&str]).unwrap();
    assert_eq!(by_worker.len(), 1);
    let worker_lines = by_worker.values().next().unwrap();
    assert!(
        worker_lines.iter().any(|(level, text)| level == "INFO" && text.contains("registered")),
        "{worker_lines:?}"
    );
    assert!(client.get_scheduler_logs(2).unwrap().len() <= 2);
    // That worker has no nanny: no nanny logs for it.
    assert!(client.get_nanny_logs(100, &[] as &[&str]).unwrap().is_empty());

    // A worker under its nanny (the default): the nanny's lines, keyed by the worker.
    let _n = worker(&dir, &binary("dask-worker"), &[&address, "--nthreads", "1", "--name", "nannied"], "n.log");
    client.wait_for_workers(2, Some(LONG)).unwrap();
    let nanny_logs = client.get_nanny_logs(100, &["nannied"]).unwrap();
    assert_eq!(nanny_logs.len(), 1, "{nanny_logs:?}");
    let lines = nanny_logs.values().next().unwrap();
    assert!(lines.iter().any(|(_, text)| text.contains("started a worker")), "{lines:?}");
}

#[test]
fn client_shutdown_closes_the_scheduler_and_its_workers() {
    let dir = TempDir::new("shutdown");
    let (mut sched, address) = start_scheduler(&dir, &[]);
    let mut w = worker(&dir, &binary("dask-worker"), &[&address, "--nthreads", "1", "--no-nanny"], "w.log");
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    client.shutdown().unwrap();
    assert_eq!(sched.wait_exit(LONG).and_then(|s| s.code()), Some(0), "{}", sched.log());
    assert!(w.wait_exit(LONG).is_some(), "the worker closed too: {}", w.log());
    assert!(client.submit(inc, (1,)).is_err(), "the client is closed");
}

#[test]
fn scheduler_and_worker_serve_health_and_metrics_over_http() {
    let dir = TempDir::new("http");
    let (_sched, address) = start_scheduler(&dir, &[]);
    // The scheduler file says where the dashboard is, as dask's does.
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("scheduler.json")).unwrap()).unwrap();
    let port = file["services"]["dashboard"].as_u64().expect("services.dashboard in the scheduler file");
    let base = format!("127.0.0.1:{port}");
    assert_eq!(dask_system_tests::http_get(&base, "/health").1, "ok");

    let w = worker(
        &dir,
        &binary("dask-worker"),
        &[&address, "--nthreads", "2", "--no-nanny", "--dashboard-address", "127.0.0.1:0"],
        "w.log",
    );
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    client.submit(inc, (1,)).unwrap().result_timeout(LONG).unwrap();
    let log = w.log();
    let wport: u16 = log
        .split("dashboard=Some(")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the worker logs its dashboard port: {log}"));
    let wbase = format!("127.0.0.1:{wport}");
    assert_eq!(dask_system_tests::http_get(&wbase, "/health"), (200, "ok".to_string()));
    let start = std::time::Instant::now();
    loop {
        // Published with the next heartbeat.
        let (status, page) = dask_system_tests::http_get(&wbase, "/metrics");
        assert_eq!(status, 200);
        if page.contains("dask_worker_threads 2") {
            assert!(page.contains("dask_worker_memory_bytes{type=\"managed\"}"), "{page}");
            break;
        }
        assert!(start.elapsed() < LONG, "{page}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, page) = dask_system_tests::http_get(&base, "/metrics");
    assert!(page.contains("dask_scheduler_workers{state=\"idle\"} 1"), "{page}");
}

#[test]
fn a_worker_waits_for_its_scheduler_file_to_appear() {
    let dir = TempDir::new("sched-file-wait");
    let file = dir.path("later.json");
    // The worker first, as batch job scripts start them.
    let _w = worker(
        &dir,
        &binary("dask-worker"),
        &["--scheduler-file", file.to_str().unwrap(), "--nthreads", "1", "--no-nanny"],
        "w.log",
    );
    std::thread::sleep(Duration::from_millis(500));
    let _s = Proc::start(
        &binary("dask-scheduler"),
        &[
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            ":0",
            "--scheduler-file",
            file.to_str().unwrap(),
        ],
        dir.path("s.log"),
    );
    let address = dask_system_tests::wait_for_scheduler_file(&file, LONG);
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    assert_eq!(client.submit(inc, (1,)).unwrap().result_timeout(LONG).unwrap(), 2);

    // dask's values: --nworkers 0 is an error, a death timeout in words gives up in time.
    let mut p = worker(&dir, &binary("dask-worker"), &["tcp://127.0.0.1:1", "--nworkers", "0"], "zero.log");
    assert_eq!(p.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(p.log().contains("--nworkers 0 starts no worker"), "{}", p.log());
    let missing = dir.path("never.json");
    let mut p = worker(
        &dir,
        &binary("dask-worker"),
        &["--scheduler-file", missing.to_str().unwrap(), "--death-timeout", "300ms"],
        "never.log",
    );
    assert_eq!(p.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(p.log().contains("did not appear within the death timeout"), "{}", p.log());
}

#[test]
fn pid_files_idle_timeout_and_port_ranges_as_in_dask() {
    let dir = TempDir::new("pid-idle");
    let pid_file = dir.path("scheduler.pid");
    let file = dir.path("s.json");
    let mut s = Proc::start(
        &binary("dask-scheduler"),
        &[
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            file.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--idle-timeout",
            "3s",
        ],
        dir.path("s.log"),
    );
    let address = dask_system_tests::wait_for_scheduler_file(&file, LONG);
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(dask_system_tests::alive(pid));
    // A worker on a port of a range (the first free one).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let from = taken.local_addr().unwrap().port();
    let range = format!("{from}:{}", from.saturating_add(20));
    let _w = worker(&dir, &binary("dask-worker"), &[&address, "--no-nanny", "--worker-port", &range], "w.log");
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    let port: u16 = client.scheduler_info().unwrap().workers[0].address.rsplit(':').next().unwrap().parse().unwrap();
    assert!(port > from && port <= from + 20, "{port} in {range}, past the taken {from}");
    // Idle for 3 s: the scheduler closes by itself, exits 0 and removes its pid file.
    assert_eq!(s.wait_exit(LONG).and_then(|s| s.code()), Some(0), "{}", s.log());
    assert!(s.log().contains("idle"), "{}", s.log());
    assert!(!pid_file.exists());
}

#[test]
fn workers_advertise_an_address_others_can_reach() {
    let dir = TempDir::new("advertise");
    let (_sched, address) = start_scheduler(&dir, &[]);
    let w = binary("dask-worker");
    // Listening everywhere, it advertises the address that routes to the scheduler, never
    // 0.0.0.0; --interface names the interface; --host takes dask's URI form.
    let _a = worker(&dir, &w, &[&address, "--no-nanny", "--name", "all", "--host", "0.0.0.0"], "a.log");
    let _b = worker(&dir, &w, &[&address, "--no-nanny", "--name", "lo", "--interface", "lo"], "b.log");
    let _c = worker(&dir, &w, &[&address, "--no-nanny", "--name", "uri", "--host", "tcp://127.0.0.1"], "c.log");
    // Behind a port mapping: listen on one address, advertise another (here the same host).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("tcp://0.0.0.0:{port}");
    let contact = format!("tcp://127.0.0.1:{port}");
    let _d = worker(
        &dir,
        &w,
        &[&address, "--no-nanny", "--name", "nat", "--listen-address", &listen, "--contact-address", &contact],
        "d.log",
    );
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(4, Some(LONG)).unwrap();
    let info = client.scheduler_info().unwrap();
    for wi in &info.workers {
        assert!(wi.address.starts_with("tcp://127.0.0.1:"), "{} advertises {}", wi.name, wi.address);
    }
    let nat = info.workers.iter().find(|wi| wi.name == "nat").unwrap();
    assert_eq!(nat.address, contact);
    // Every one of them is reachable by the others: a chain of tasks, each on the next worker,
    // each fetching its input from the one before at its advertised address.
    let on = |name: &str| dask::SubmitOptions {
        workers: vec![name.into()],
        allow_other_workers: false,
        ..Default::default()
    };
    let mut f = client.submit_with(inc, (0,), on("all")).unwrap();
    for name in ["lo", "uri", "nat", "all"] {
        f = client.submit_with(inc, (&f,), on(name)).unwrap();
    }
    assert_eq!(f.result_timeout(LONG).unwrap(), 5);
    let mut bad = worker(&dir, &w, &[&address, "--protocol", "udp"], "bad.log");
    assert_eq!(bad.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(bad.log().contains("tcp and tls are supported"), "{}", bad.log());
}
