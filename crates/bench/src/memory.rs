//! Scheduler memory per held task: a scheduler in its own process (so its RSS is its own),
//! two worker processes, and `n` futures held by this client.
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use dask::Client;

const ENV_ROLE: &str = "DASK_BENCH_ROLE";

/// Runs this process as a scheduler or a worker when the benchmark started it as one.
pub fn maybe_child() -> Option<ExitCode> {
    let role = std::env::var(ENV_ROLE).ok()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    Some(match role.as_str() {
        "scheduler" => dask_scheduler::cli::scheduler_main_from(
            std::iter::once("dask-scheduler".to_string()).chain(args).map(Into::into),
        ),
        _ => dask_worker::cli::worker_main_from(std::iter::once("dask-worker".to_string()).chain(args).map(Into::into)),
    })
}

fn rss_bytes(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb * 1024.0)
}

/// Returns (RSS growth per held task in bytes, RSS before in bytes).
pub fn scheduler_bytes_per_task(n: usize) -> (f64, f64) {
    let exe = std::env::current_exe().unwrap();
    let dir = std::env::temp_dir().join(format!("dask-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("scheduler.json");
    let _ = std::fs::remove_file(&file);
    let spawn = |role: &str, args: &[&str]| {
        Command::new(&exe)
            .env(ENV_ROLE, role)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let f = file.to_str().unwrap();
    let mut sched = spawn(
        "scheduler",
        &["--host", "127.0.0.1", "--port", "0", "--scheduler-file", f, "--log-level", "warn", "--no-dashboard"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !file.exists() {
        assert!(Instant::now() < deadline, "the scheduler did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut workers: Vec<_> =
        (0..2).map(|_| spawn("worker", &["--scheduler-file", f, "--nthreads", "1", "--log-level", "warn"])).collect();
    let client = Client::from_scheduler_file(&file).unwrap();
    client.wait_for_workers(2, Some(Duration::from_secs(30))).unwrap();
    let warm = client.map(dask::builtins::inc, 0..1000).unwrap();
    client.gather(&warm).unwrap();
    drop(warm);
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_bytes(sched.id());
    let futures = client.map(dask::builtins::inc, 0..n as i64).unwrap();
    dask::wait(&futures, None, dask::ReturnWhen::AllCompleted).unwrap();
    // Settled: past the scheduler's next 1 s tick, when it gives freed memory back.
    std::thread::sleep(Duration::from_millis(1300));
    let after = rss_bytes(sched.id());
    drop(futures);
    client.close();
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let _ = sched.kill();
    let _ = sched.wait();
    let _ = std::fs::remove_dir_all(&dir);
    ((after - before) / n as f64, before)
}
