//! `dask-bench`: the workloads of `../shared/bench/peers/dask_bench.py` (and a few more) on
//! dask-rs, so the figures sit beside dask.distributed's and Ray's measured on this machine.
//!
//! ```text
//! cargo run --release -p dask-bench -- all                 # everything, 3 runs each
//! cargo run --release -p dask-bench -- throughput latency  # some
//! cargo run --release -p dask-bench -- all --quick         # tiny sizes (CI smoke test)
//! ```
//! Each run starts a fresh `LocalCluster` of 2 worker processes with 1 thread each (the
//! scheduler in this process, as dask's `LocalCluster` does), runs one workload, and closes it.
//! The table gives median (min–max) over the runs; `--out FILE` writes every figure as JSON.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use dask::builtins::{add, inc, noop, sum_list};
use dask::{Bytes, Client, Graph, LocalCluster, Ref, ScatterOptions, SubmitOptions};
use dask_protocol::data::READ_PIECE;

mod core_bench;
mod dashboard;
mod faults;
mod memory;
mod sched;
mod sim;
mod tls;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[dask::task]
fn make_part(i: i64) -> Vec<i64> {
    (0..100).map(|j| i * 100 + j).collect()
}

#[dask::task]
fn getitem(xs: Vec<i64>, j: usize) -> i64 {
    xs[j]
}

#[dask::task]
fn make_bytes(n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    let mut x = 0x9e3779b97f4a7c15u64;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    Bytes::from(v)
}

#[dask::task]
fn consume(b: Bytes) -> u64 {
    b.len() as u64
}

#[derive(Parser, Debug)]
#[command(name = "dask-bench", about = "dask-rs benchmarks (see docs/benchmarks.md)")]
struct Args {
    /// Workloads: all, throughput, latency, tree, shuffle, data, memory, startup, big, zero,
    /// core, rsds, tcp, sim, skew, late_join, restart, kill, spill, monitor, dashboard, tls;
    /// and chaos (long; not part of all).
    #[arg(default_value = "all")]
    workloads: Vec<String>,
    /// Runs of each workload (each with a fresh cluster).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tiny sizes, one run: a smoke test.
    #[arg(long)]
    quick: bool,
    /// Write every figure to this JSON file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// Figures of one workload: name -> one value per run.
type Figures = BTreeMap<String, Vec<f64>>;

fn main() -> ExitCode {
    // This program is also each worker process of its clusters.
    dask::init();
    if let Some(code) = memory::maybe_child() {
        return code;
    }
    let args = Args::parse();
    // The scheduler's and the nannies' logs (they run in this process), for looking into a run.
    if let Ok(level) = std::env::var("DASK_BENCH_LOG") {
        let _ = dask_protocol::cli::init_logging(&level);
    }
    let all = args.workloads.iter().any(|w| w == "all");
    let want = |w: &str| all || args.workloads.iter().any(|x| x == w);
    let runs = if args.quick { 1 } else { args.runs.max(1) };
    let q = args.quick;
    let mut figures = Figures::new();
    let mut record = |name: String, v: f64| figures.entry(name).or_default().push(v);
    let started = Instant::now();

    if want("tcp") {
        for _ in 0..runs {
            let n = if q { 64 << 20 } else { 1 << 30 };
            record("tcp loopback bandwidth (MB/s)".into(), tcp_probe(n, Probe::Socket));
            record("tcp loopback into warm memory (MB/s)".into(), tcp_probe(n, Probe::Warm));
            record("tcp loopback into fresh memory (MB/s)".into(), tcp_probe(n, Probe::Fresh));
        }
    }
    if want("core") {
        for _ in 0..runs {
            let (n, w) = if q { (10_000, 10) } else { (1_000_000, 1000) };
            let per_task = core_bench::run(n, w);
            record(format!("scheduler core, {n} tasks on {w} simulated workers (us/task)"), per_task);
        }
    }
    if want("startup") {
        for _ in 0..runs {
            let t = Instant::now();
            let cluster = cluster(false);
            let client = Client::connect(&cluster.scheduler_address()).unwrap();
            client.wait_for_workers(2, None).unwrap();
            record("LocalCluster start, 2 worker processes ready (s)".into(), t.elapsed().as_secs_f64());
            let t = Instant::now();
            client.close();
            cluster.close();
            record("LocalCluster close (s)".into(), t.elapsed().as_secs_f64());
        }
    }
    if want("throughput") {
        let sizes: &[usize] = if q { &[1_000] } else { &[1_000, 10_000, 100_000, 1_000_000] };
        for _ in 0..runs {
            with_cluster(false, |client| {
                for &n in sizes {
                    let t = Instant::now();
                    let fs = client.map(inc, 0..n as i64).unwrap();
                    let submitted = t.elapsed();
                    let v: Vec<i64> = client.gather(&fs).unwrap();
                    let wall = t.elapsed().as_secs_f64();
                    assert_eq!(v[n - 1], n as i64);
                    record(format!("map+gather {n}: tasks/s"), n as f64 / wall);
                    record(format!("map+gather {n}: map call (s)"), submitted.as_secs_f64());
                    drop(fs);
                    settle(client);
                }
            });
        }
    }
    if want("latency") {
        let iters = if q { 100 } else { 1000 };
        for _ in 0..runs {
            with_cluster(false, |client| {
                let impure = SubmitOptions { pure: false, ..Default::default() };
                let mut lat = Vec::with_capacity(iters);
                for i in 0..iters {
                    let t = Instant::now();
                    let f = client.submit_with(inc, (i as i64,), impure.clone()).unwrap();
                    assert_eq!(f.result().unwrap(), i as i64 + 1);
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                }
                lat.sort_by(f64::total_cmp);
                record("submit->result round trip, median (us)".into(), lat[iters / 2]);
                record("submit->result round trip, p99 (us)".into(), lat[iters * 99 / 100]);
            });
        }
    }
    if want("tree") {
        let leaves = if q { 1024 } else { 16_384 };
        for _ in 0..runs {
            with_cluster(false, |client| {
                let (g, root, n) = tree_graph(leaves, "tree");
                let t = Instant::now();
                let v = client.get::<i64>(&g, &root).unwrap();
                let wall = t.elapsed().as_secs_f64();
                assert_eq!(v, (leaves * (leaves + 1) / 2) as i64);
                record(format!("tree reduction, {leaves} leaves ({n} tasks): tasks/s"), n as f64 / wall);
            });
        }
    }
    if want("shuffle") {
        let n = if q { 20 } else { 100 };
        for _ in 0..runs {
            with_cluster(false, |client| {
                let mut g = Graph::new();
                for i in 0..n {
                    g.add(format!("in-{i}"), make_part, (i as i64,)).unwrap();
                }
                for i in 0..n {
                    for j in 0..n {
                        g.add(format!("split-{i}-{j}"), getitem, (Ref::<Vec<i64>>::new(format!("in-{i}")), j)).unwrap();
                    }
                }
                let mut outs = Vec::new();
                for j in 0..n {
                    let parts: Vec<Ref<i64>> = (0..n).map(|i| Ref::new(format!("split-{i}-{j}"))).collect();
                    g.add(format!("out-{j}"), sum_list, (parts,)).unwrap();
                    outs.push(format!("out-{j}"));
                }
                let keys: Vec<&str> = outs.iter().map(String::as_str).collect();
                let t = Instant::now();
                let v = client.get_many::<i64>(&g, &keys).unwrap();
                let wall = t.elapsed().as_secs_f64();
                assert_eq!(v[0], (0..n as i64).map(|i| i * 100).sum::<i64>());
                record(format!("{n}x{n} task shuffle ({} tasks), wall (s)", g.len()), wall);
            });
        }
    }
    if want("data") {
        let sizes: &[usize] = if q { &[10_000_000] } else { &[100_000_000, 1_000_000_000] };
        for _ in 0..runs {
            with_cluster(false, |client| {
                let workers = client.scheduler_info().unwrap().workers;
                let (a, b) = (workers[0].address.clone(), workers[1].address.clone());
                for &n in sizes {
                    // As dask_bench.py: scatter(arr, workers=[a], hash=False), a buffer sent
                    // without a copy (numpy there, Bytes here), twice on one cluster (dask's
                    // script scatters via the scheduler and then direct). The second pass finds
                    // the first one's memory warm in the receive pools.
                    let value = make_bytes::call(n);
                    for pass in ["first", "again"] {
                        let (f, back, scatter, gather) = scatter_and_gather(client, &value, &a);
                        let mb = n as f64 / 1e6;
                        record(format!("scatter {} MB, {pass} (MB/s)", n / 1_000_000), mb / scatter);
                        record(format!("gather {} MB, {pass} (MB/s)", n / 1_000_000), mb / gather);
                        drop((f, back));
                        settle(client);
                    }
                }
                // worker -> worker: a value made on b, consumed on a; twice, as above.
                let n = if q { 10_000_000 } else { 500_000_000 };
                let on = |w: &str| SubmitOptions { workers: vec![w.to_string()], pure: false, ..Default::default() };
                for pass in ["first", "again"] {
                    let src = client.submit_with(make_bytes, (n,), on(&b)).unwrap();
                    dask::wait(std::slice::from_ref(&src), None, dask::ReturnWhen::AllCompleted).unwrap();
                    let t = Instant::now();
                    let dst = client.submit_with(consume, (&src,), on(&a)).unwrap();
                    assert_eq!(dst.result().unwrap(), n as u64);
                    let wall = t.elapsed().as_secs_f64();
                    record(format!("worker->worker {} MB, {pass} (MB/s)", n / 1_000_000), n as f64 / 1e6 / wall);
                    drop((src, dst));
                    settle(client);
                }
            });
        }
    }
    if want("big") {
        let leaves = if q { 1 << 12 } else { 1 << 19 };
        for _ in 0..runs {
            with_cluster(false, |client| {
                let (g, root, n) = tree_graph(leaves, "big");
                let t = Instant::now();
                let v = client.get::<i64>(&g, &root).unwrap();
                let wall = t.elapsed().as_secs_f64();
                assert_eq!(v, (leaves * (leaves + 1) / 2) as i64);
                record(format!("{n}-task tree graph end to end (s)"), wall);
            });
        }
    }
    if want("rsds") {
        let merges: &[usize] = if q { &[1_000] } else { &[10_000, 100_000] };
        for _ in 0..runs {
            with_cluster(false, |client| {
                for &n in merges {
                    let mut g = Graph::new();
                    let leaves: Vec<Ref<i64>> =
                        (0..n).map(|i| g.add(format!("m-{i}"), inc, (i as i64,)).unwrap()).collect();
                    g.add("merge", sum_list, (leaves,)).unwrap();
                    let t = Instant::now();
                    let v = client.get::<i64>(&g, "merge").unwrap();
                    assert_eq!(v, (1..=n as i64).sum::<i64>());
                    record(format!("rsds merge-{}K (s)", n / 1000), t.elapsed().as_secs_f64());
                    settle(client);
                }
                let depth = if q { 10 } else { 15 };
                let (g, root, _) = tree_graph(1 << depth, "t15");
                let t = Instant::now();
                client.get::<i64>(&g, &root).unwrap();
                record(format!("rsds tree-{depth} (s)"), t.elapsed().as_secs_f64());
            });
        }
    }
    if want("zero") {
        let n = if q { 10_000 } else { 1_000_000 };
        for _ in 0..runs {
            with_cluster(true, |client| {
                // noop() takes nothing, so pure keys would all be one: submit impure tasks.
                let impure = SubmitOptions { pure: false, ..Default::default() };
                let t = Instant::now();
                let fs = client.map_with(noop, (0..n).map(|_| ()), impure, None).unwrap();
                dask::wait(&fs, None, dask::ReturnWhen::AllCompleted).unwrap();
                let wall = t.elapsed().as_secs_f64();
                record(format!("zero-worker {n} tasks: tasks/s"), n as f64 / wall);
            });
        }
    }
    if want("sim") {
        // Deterministic: one run says it all.
        sim::run(q, 1, &mut record);
    }
    if want("skew") {
        for _ in 0..runs {
            sched::skew().record("skew", "400 heavy-tailed tasks on 4 workers", "lower bound", &mut record);
        }
    }
    if want("late_join") {
        for _ in 0..runs {
            sched::late_join().record("late_join", "800 x 10 ms, 2 -> 4 workers at 0.5 s", "ideal", &mut record);
        }
    }
    if args.workloads.iter().any(|w| w == "reduction") || (all && q) {
        // Long at full size (100 GB made): only when named, or tiny in the smoke test.
        let n = if q { 200 } else { 10_000 };
        for _ in 0..runs {
            let (wall, held, process) = sched::reduction(n);
            record(format!("reduction: tree (fan-in 8) of {n} x 10 MB on 2 workers, wall (s)"), wall);
            record(
                "reduction: most bytes the scheduler counted on one worker (values of 10 MB)".into(),
                held as f64 / 1e7,
            );
            record("reduction: most process memory a worker reported (MB)".into(), process as f64 / 1e6);
        }
    }
    if want("restart") {
        for _ in 0..runs {
            record(
                "restart: 2 nanny workers holding 1,000 results, until the next task ran (s)".into(),
                faults::restart(q),
            );
        }
    }
    if want("kill") {
        for _ in 0..runs {
            let (base, wall, right, back) = faults::kill(q);
            record("kill: no-kill makespan, 2,000 tasks of 5 ms (s)".into(), base);
            record("kill: makespan with a worker SIGKILLed after 1 s (s)".into(), wall);
            record("kill: ratio to the no-kill makespan".into(), wall / base);
            record("kill: every result right (1 = yes)".into(), if right { 1.0 } else { 0.0 });
            record("kill: both workers back after (s)".into(), back);
        }
    }
    if want("spill") {
        for _ in 0..runs {
            let (write, read) = faults::disk_probe(if q { 200_000_000 } else { 1_200_000_000 });
            record("disk probe: write 20 MB files (MB/s)".into(), write);
            record("disk probe: read them back (MB/s)".into(), read);
            let (wall, spilled, results) = faults::spill(q, 400_000_000);
            let (unlimited, _, _) = faults::spill(q, 0);
            record("spill: 1.2 GB of 20 MB values on 2 x 400 MB workers, wall (s)".into(), wall);
            record("spill: the same without a memory limit, wall (s)".into(), unlimited);
            record("spill: bytes on disk when the values were made (MB)".into(), spilled as f64 / 1e6);
            // What spilling cost: the time over the same run without a limit, for the bytes spilled.
            let extra = (wall - unlimited).max(1e-3);
            record("spill: spilled MB per second of extra wall".into(), spilled as f64 / 1e6 / extra);
            record("spill: that over the disk probe's write MB/s".into(), spilled as f64 / 1e6 / extra / write);
            record("spill: results".into(), results as f64);
        }
    }
    if want("monitor") {
        let n = if q { 10_000 } else { 100_000 };
        for _ in 0..runs {
            let off = faults::monitored_throughput(n, 0);
            let on = faults::monitored_throughput(n, 4_000_000_000);
            record(format!("memory monitor: map+gather {n}, no memory limit (tasks/s)"), off);
            record(format!("memory monitor: map+gather {n}, 4 GB limit (tasks/s)"), on);
            record("memory monitor: throughput with it over without".into(), on / off);
        }
    }
    if want("dashboard") {
        let n = if q { 10_000 } else { 1_000_000 };
        for run in 0..runs {
            let p = dashboard::pair(n, run % 2 == 1);
            let name = |what: &str| format!("dashboard: map+gather {n}, {what}");
            record(name("no page open (tasks/s)"), p.without.0);
            record(name("a page listening (tasks/s)"), p.with.0);
            record(name("throughput with a page over without"), p.with.0 / p.without.0);
            record(name("scheduler+client CPU, no page (s)"), p.without.1);
            record(name("scheduler+client CPU, a page listening (s)"), p.with.1);
            record(name("updates the page got"), p.received.0 as f64);
            record(name("bytes the page got (KB)"), p.received.1 as f64 / 1e3);
        }
    }
    if want("tls") {
        let (n, bytes) = if q { (10_000, 10_000_000) } else { (100_000, 1_000_000_000) };
        let mb = bytes / 1_000_000;
        for run in 0..runs {
            let order = if run % 2 == 0 { [false, true] } else { [true, false] };
            let mut by = [None, None];
            for tls in order {
                by[usize::from(tls)] = Some(tls::run(n, bytes, tls));
            }
            let [Some(plain), Some(secure)] = by else { unreachable!("both ran") };
            for (what, f) in [("tcp", &plain), ("tls", &secure)] {
                record(format!("tls: map+gather {n}, {what} (tasks/s)"), f.tasks_per_s);
                record(format!("tls: scatter {mb} MB, {what} (MB/s)"), f.scatter_mb_s);
                record(format!("tls: gather {mb} MB, {what} (MB/s)"), f.gather_mb_s);
                record(format!("tls: worker->worker {mb} MB, {what} (MB/s)"), f.worker_to_worker_mb_s);
            }
            record(format!("tls: map+gather {n}, tls over tcp"), secure.tasks_per_s / plain.tasks_per_s);
            record(format!("tls: gather {mb} MB, tls over tcp"), secure.gather_mb_s / plain.gather_mb_s);
        }
    }
    if args.workloads.iter().any(|w| w == "chaos") {
        let (n, window) = if q { (5_000, Duration::from_secs(5)) } else { (100_000, Duration::from_secs(60)) };
        for _ in 0..runs {
            let (wall, kills, right, back) = faults::chaos(n, window);
            record(format!("chaos: {n} tasks of 3 ms, SIGKILL every 1-2 s: makespan (s)"), wall);
            record("chaos: workers killed".into(), kills as f64);
            record("chaos: every result right (1 = yes)".into(), if right { 1.0 } else { 0.0 });
            record("chaos: both workers back after (s)".into(), back);
        }
    }
    if want("memory") {
        let sizes: &[usize] = if q { &[10_000] } else { &[100_000, 1_000_000] };
        for _ in 0..runs {
            for &n in sizes {
                let (per_task, base) = memory::scheduler_bytes_per_task(n);
                record(format!("scheduler RSS growth per held task, {n} futures (B)"), per_task);
                record(format!("scheduler RSS before, {n} futures run (MB)"), base / 1e6);
            }
        }
    }

    let total = started.elapsed();
    print_table(&figures);
    let ratios = data_ratios(&figures);
    if !ratios.is_empty() {
        println!("\n| data plane, median over median | × socket probe | × warm-memory probe |\n|---|---:|---:|");
        for (name, socket, warm) in &ratios {
            println!("| {name} | {socket:.2} | {warm:.2} |");
        }
    }
    println!("\n(total {:.1} s, {runs} run(s) each)", total.as_secs_f64());
    if let Some(path) = &args.out {
        let json = serde_json::json!({
            "machine": machine(),
            "runs": runs,
            "quick": q,
            "data_plane_ratios": ratios.iter().map(|(k, socket, warm)| (k.clone(), serde_json::json!({
                "to_socket_probe": socket, "to_warm_memory_probe": warm,
            }))).collect::<serde_json::Map<_, _>>(),
            "figures": figures.iter().map(|(k, v)| (k.clone(), serde_json::json!({
                "values": v, "median": median(v), "min": min(v), "max": max(v),
            }))).collect::<serde_json::Map<_, _>>(),
        });
        if let Err(e) = std::fs::write(path, serde_json::to_vec_pretty(&json).unwrap()) {
            eprintln!("dask-bench: failed to write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn cluster(simulate: bool) -> LocalCluster {
    LocalCluster::builder()
        .n_workers(2)
        .threads_per_worker(1)
        .processes(true)
        .simulate_tasks(simulate)
        .build()
        .expect("start a local cluster")
}

/// A fresh cluster, a 200-task warm-up (as the peers do), the workload, then close.
fn with_cluster(simulate: bool, f: impl FnOnce(&Client)) {
    let cluster = cluster(simulate);
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    if !simulate {
        let warm = client.map(inc, 0..200).unwrap();
        client.gather(&warm).unwrap();
    }
    settle(&client);
    f(&client);
    client.close();
    cluster.close();
}

/// `value` scattered to `worker` straight (dask_bench.py's `scatter(arr, workers=[a],
/// hash=False)`) and gathered back: its future, the value back, and the seconds each way.
pub(crate) fn scatter_and_gather(
    client: &Client,
    value: &Bytes,
    worker: &str,
) -> (dask::Future<Bytes>, Bytes, f64, f64) {
    let to = ScatterOptions { workers: vec![worker.to_string()], hash: false, ..Default::default() };
    let t = Instant::now();
    let f = client.scatter_with(vec![value.clone()], to).unwrap().pop().unwrap();
    let scatter = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back: Bytes = f.result().unwrap();
    let gather = t.elapsed().as_secs_f64();
    let n = value.len();
    assert!(back.len() == n && (n == 0 || back[n / 2] == value[n / 2]));
    (f, back, scatter, gather)
}

/// Waits until the scheduler holds no task (released futures are forgotten).
pub(crate) fn settle(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.scheduler_info().map(|i| i.tasks > 0).unwrap_or(false) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// dask_bench.py's tree: `nleaves` inc leaves, then pairwise adds up to one root.
fn tree_graph(nleaves: usize, name: &str) -> (Graph, String, usize) {
    let mut g = Graph::new();
    for i in 0..nleaves {
        g.add(format!("{name}-0-{i}"), inc, (i as i64,)).unwrap();
    }
    let (mut level, mut width) = (0, nleaves);
    while width > 1 {
        for i in 0..width / 2 {
            let a = Ref::<i64>::new(format!("{name}-{level}-{}", 2 * i));
            let b = Ref::<i64>::new(format!("{name}-{level}-{}", 2 * i + 1));
            g.add(format!("{name}-{}-{i}", level + 1), add, (a, b)).unwrap();
        }
        level += 1;
        width /= 2;
    }
    let n = g.len();
    (g, format!("{name}-{level}-0"), n)
}

/// Where the raw loopback TCP probe's bytes come from and go to. One thread writes `n` bytes,
/// another reads them.
#[derive(Clone, Copy, PartialEq)]
enum Probe {
    /// From one 1 MiB buffer into one of `READ_PIECE` bytes, over and over: the socket's own
    /// limit. Both buffers stay in the CPU cache, which no transfer of a value held in memory can.
    Socket,
    /// From an `n`-byte value into an `n`-byte buffer touched before the clock starts: memory
    /// the receiver already has, as one that reused freed buffers would.
    Warm,
    /// From an `n`-byte value into new memory (the allocator first gives back all it holds), as
    /// the first value of its size a process receives.
    Fresh,
}

fn tcp_probe(n: usize, mode: Probe) -> f64 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let warm = (mode == Probe::Warm).then(|| vec![1u8; n]);
    if mode == Probe::Fresh {
        dask_scheduler::server::release_free_memory();
    }
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        if mode == Probe::Socket {
            let mut buf = vec![0u8; READ_PIECE];
            let mut got = 0;
            while got < n {
                let k = s.read(&mut buf).unwrap();
                assert!(k > 0);
                got += k;
            }
            return;
        }
        let mut all = warm.unwrap_or_else(|| Vec::with_capacity(n));
        all.clear();
        // In reads of at most READ_PIECE, as data connections read (see its comment).
        while all.len() < n {
            let k = (&mut s).take((n - all.len()).min(READ_PIECE) as u64).read_to_end(&mut all).unwrap();
            assert!(k > 0);
        }
        std::hint::black_box(all);
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // The socket probe writes one 1 MiB buffer over and over; the others write a value of `n`
    // bytes in 4 MiB pieces, as a process sending one does.
    let (src, piece) = if mode == Probe::Socket { (vec![7u8; 1 << 20], 1 << 20) } else { (vec![7u8; n], 4 << 20) };
    let t = Instant::now();
    let mut sent = 0;
    while sent < n {
        let at = sent % src.len();
        let k = piece.min(n - sent).min(src.len() - at);
        s.write_all(&src[at..at + k]).unwrap();
        sent += k;
    }
    reader.join().unwrap();
    n as f64 / 1e6 / t.elapsed().as_secs_f64()
}

/// Each data-plane figure's median as a ratio to the medians of the socket and warm-memory TCP
/// probes of the same run (empty when the run had no probe or no data workload).
fn data_ratios(figures: &Figures) -> Vec<(String, f64, f64)> {
    let probe = |name: &str| figures.get(name).map(|v| median(v));
    let (Some(socket), Some(warm)) =
        (probe("tcp loopback bandwidth (MB/s)"), probe("tcp loopback into warm memory (MB/s)"))
    else {
        return Vec::new();
    };
    figures
        .iter()
        .filter(|(k, _)| !k.starts_with("tcp ") && k.ends_with("(MB/s)"))
        .map(|(k, v)| (k.clone(), median(v) / socket, median(v) / warm))
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}
fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}
fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn fmt(x: f64) -> String {
    if x >= 1000.0 {
        format!("{:.0}", x)
    } else if x >= 10.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.3}", x)
    }
}

fn print_table(figures: &Figures) {
    println!("\n| figure | median | min–max |\n|---|---:|---:|");
    for (name, v) in figures {
        println!("| {name} | {} | {}–{} |", fmt(median(v)), fmt(min(v)), fmt(max(v)));
    }
}

fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    serde_json::json!({ "cpus": cpus, "cpu": model, "memory_bytes": dask_worker::memory::system_memory() })
}
