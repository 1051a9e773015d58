//! The workloads of `../shared/bench/peers/dask_sched_bench.py` that are about faults and
//! memory (`restart`, `kill`, `spill`), a raw disk probe beside `spill`, the cost of the memory
//! monitor, and a long chaos run (`chaos`, not part of `all`).
//!
//! Each uses a fresh `LocalCluster` of 2 worker processes with 1 thread each, every worker under
//! its nanny, as dask's script does.
use std::time::{Duration, Instant};

use dask::builtins::inc;
use dask::{Bytes, Client, LocalCluster, SubmitOptions};

/// `x + 1` after sleeping `ms` milliseconds (dask_sched_bench.py's `nap`).
#[dask::task]
pub fn nap(x: i64, ms: u64) -> i64 {
    std::thread::sleep(Duration::from_millis(ms));
    x + 1
}

/// `n` incompressible bytes, different for each `seed` (the script's `make_array`).
#[dask::task]
pub fn make_array(seed: u64, n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    Bytes::from(v)
}

/// The script's `total`: a sum over every 4096th byte.
#[dask::task]
pub fn total(a: Bytes) -> u64 {
    a.iter().step_by(4096).map(|b| *b as u64).sum()
}

fn impure() -> SubmitOptions {
    SubmitOptions { pure: false, ..Default::default() }
}

fn cluster(memory_limit: u64, dir: Option<&std::path::Path>) -> LocalCluster {
    let mut b = LocalCluster::builder().n_workers(2).threads_per_worker(1).processes(true).memory_limit(memory_limit);
    if let Some(d) = dir {
        b = b.local_directory(d);
    }
    b.build().expect("start a local cluster")
}

/// `Client.restart()` of 2 nanny-managed workers holding 1,000 results: until both workers are
/// back and the next task ran (seconds).
pub fn restart(quick: bool) -> f64 {
    let cluster = cluster(0, None);
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    client.wait_for_workers(2, None).unwrap();
    let n = if quick { 100 } else { 1000 };
    let fs = client.map_with(inc, (0..n).map(|i| (i,)), impure(), None).unwrap();
    let _: Vec<i64> = client.gather(&fs).unwrap();
    let t = Instant::now();
    client.restart().unwrap();
    let r = client.submit_with(inc, (1,), impure()).unwrap().result().unwrap();
    let wall = t.elapsed().as_secs_f64();
    assert_eq!(r, 2);
    client.close();
    cluster.close();
    wall
}

/// The script's `kill`: 2,000 tasks of 5 ms, once without a fault and once with one worker
/// process SIGKILLed after 1 s. Returns (no-kill makespan, makespan, all right, workers back).
pub fn kill(quick: bool) -> (f64, f64, bool, f64) {
    let cluster = cluster(0, None);
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    client.wait_for_workers(2, None).unwrap();
    let _: Vec<i64> = client.gather(&client.map_with(inc, (0..100).map(|i| (i,)), impure(), None).unwrap()).unwrap();
    let n = if quick { 400 } else { 2000 };
    let run = |client: &Client| client.map_with(nap, (0..n).map(|i| (i as i64, 5u64)), impure(), None).unwrap();
    let t = Instant::now();
    let _: Vec<i64> = client.gather(&run(&client)).unwrap();
    let base = t.elapsed().as_secs_f64();
    let mut pids: Vec<u32> = client.scheduler_info().unwrap().workers.iter().map(|w| w.pid).collect();
    pids.sort();
    let t = Instant::now();
    let fs = run(&client);
    std::thread::sleep(Duration::from_secs_f64(if quick { 0.3 } else { 1.0 }));
    let _ = std::process::Command::new("kill").args(["-KILL", &pids[0].to_string()]).status();
    let got: Vec<i64> = client.gather(&fs).unwrap();
    let wall = t.elapsed().as_secs_f64();
    let right = got == (1..=n as i64).collect::<Vec<_>>();
    client.wait_for_workers(2, Some(Duration::from_secs(60))).unwrap();
    let back = t.elapsed().as_secs_f64();
    client.close();
    cluster.close();
    (base, wall, right, back)
}

/// The script's `spill`: 2 workers with 400 MB each (`memory_limit`; 0 for the same workload
/// without a limit, nothing spilled); 60 tasks make 20 MB each (1.2 GB, 1.5× the cluster's
/// memory), then one task per array sums it, and the sums are gathered. Returns (wall seconds,
/// bytes on disk when the arrays were all made, results).
pub fn spill(quick: bool, memory_limit: u64) -> (f64, u64, usize) {
    flush_disk();
    let dir = scratch("spill");
    let cluster = cluster(memory_limit, Some(&dir));
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    client.wait_for_workers(2, None).unwrap();
    let (n, nbytes) = if quick { (12, 20_000_000) } else { (60, 20_000_000) };
    let t = Instant::now();
    let arrays = client.map_with(make_array, (0..n).map(|i| (i as u64, nbytes)), impure(), None).unwrap();
    let sums = client.map_with(total, arrays.iter().map(|a| (a,)), impure(), None).unwrap();
    dask::wait(&arrays, None, dask::ReturnWhen::AllCompleted).unwrap();
    let got: Vec<u64> = client.gather(&sums).unwrap();
    let wall = t.elapsed().as_secs_f64();
    // Workers report with their heartbeat (every second).
    std::thread::sleep(Duration::from_millis(1200));
    let spilled = client.scheduler_info().unwrap().workers.iter().map(|w| w.memory_spilled).sum();
    drop((arrays, sums));
    client.close();
    cluster.close();
    let _ = std::fs::remove_dir_all(&dir);
    (wall, spilled, got.len())
}

/// The disk beside `spill`: 20 MB files written (as a spill writes them: `std::fs::write`, no
/// sync) and read back, in all `total` bytes. Returns (write MB/s, read MB/s).
pub fn disk_probe(total_bytes: usize) -> (f64, f64) {
    flush_disk();
    let dir = scratch("disk-probe");
    std::fs::create_dir_all(&dir).unwrap();
    let piece = make_array::call(1, 20_000_000);
    let n = total_bytes.div_ceil(piece.len());
    let t = Instant::now();
    for i in 0..n {
        std::fs::write(dir.join(format!("{i:016x}")), &piece).unwrap();
    }
    let write = (n * piece.len()) as f64 / 1e6 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut check = 0u64;
    for i in 0..n {
        let v = std::fs::read(dir.join(format!("{i:016x}"))).unwrap();
        check += v[v.len() / 2] as u64;
    }
    let read = (n * piece.len()) as f64 / 1e6 / t.elapsed().as_secs_f64();
    std::hint::black_box(check);
    let _ = std::fs::remove_dir_all(&dir);
    (write, read)
}

/// map+gather of `n` no-op tasks on workers with a memory limit (the monitor samples every
/// 100 ms, and values are counted for spilling) or without (no monitor). Tasks per second.
pub fn monitored_throughput(n: usize, memory_limit: u64) -> f64 {
    let cluster = cluster(memory_limit, None);
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    client.wait_for_workers(2, None).unwrap();
    let _: Vec<i64> = client.gather(&client.map(inc, 0..200).unwrap()).unwrap();
    let t = Instant::now();
    let fs = client.map(inc, 0..n as i64).unwrap();
    let v: Vec<i64> = client.gather(&fs).unwrap();
    let rate = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(v[n - 1], n as i64);
    client.close();
    cluster.close();
    rate
}

/// A long chaos run: `n` tasks of 3 ms (in chunks summed, then a total) on 2 workers of 2
/// threads while a random worker process is SIGKILLed every 1–2 s for `window`. Returns
/// (makespan, kills, all right, seconds until both workers were back at the end).
pub fn chaos(n: usize, window: Duration) -> (f64, usize, bool, f64) {
    let cluster = LocalCluster::builder().n_workers(2).threads_per_worker(2).processes(true).build().unwrap();
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    client.wait_for_workers(2, None).unwrap();
    let t = Instant::now();
    let leaves = client.map_with(nap, (0..n).map(|i| (i as i64, 3u64)), impure(), None).unwrap();
    let chunks: Vec<_> =
        leaves.chunks(100).map(|c| client.submit_with(dask::builtins::sum_list, (c,), impure()).unwrap()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let client = client.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            let mut kills = 0;
            let until = Instant::now() + window;
            while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                std::thread::sleep(Duration::from_millis(1000 + x % 1000));
                let Ok(info) = client.scheduler_info() else { continue };
                if info.workers.is_empty() {
                    continue;
                }
                let victim = info.workers[(x >> 20) as usize % info.workers.len()].pid;
                let _ = std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status();
                kills += 1;
            }
            kills
        })
    };
    let sums: Vec<i64> = client.gather(&chunks).unwrap();
    let wall = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.join().unwrap();
    let expected: Vec<i64> =
        (0..n as i64).collect::<Vec<_>>().chunks(100).map(|c| c.iter().map(|i| i + 1).sum()).collect();
    let back = Instant::now();
    client.wait_for_workers(2, Some(Duration::from_secs(120))).unwrap();
    let back = back.elapsed().as_secs_f64();
    client.close();
    cluster.close();
    (wall, kills, sums == expected, back)
}

/// Writes out dirty pages first (`sync`), so that the disk probe and each spill run start alike:
/// without it a run found the previous one's gigabyte still being written back and was
/// throttled to the disk's speed (the probe went from 3.2 GB/s to 0.25 GB/s between runs).
fn flush_disk() {
    let _ = std::process::Command::new("sync").status();
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("dask-bench-{tag}-{}-{nanos}", std::process::id()))
}
