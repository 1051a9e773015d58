//! Tier 3, faults and memory: real binaries (the test worker `custom-worker`, which has the
//! crashing and memory-hungry functions of `dask_system_tests`), started, starved and killed.
use std::path::Path;
use std::time::{Duration, Instant};

use dask::Client;
use dask_system_tests::{Proc, TempDir, checksum, expected_checksum, noise, start_scheduler};

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
