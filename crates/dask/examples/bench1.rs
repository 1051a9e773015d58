use dask::builtins::inc;
use dask::{Client, LocalCluster};
use std::time::Instant;
fn main() {
    dask::init();
    let procs = std::env::args().nth(1).as_deref() == Some("p");
    let n: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let cluster = LocalCluster::builder().n_workers(2).threads_per_worker(1).processes(procs).build().unwrap();
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    let w = client.map(inc, 0..200).unwrap();
    client.gather(&w).unwrap();
    drop(w);
    for _ in 0..3 {
        let t = Instant::now();
        let fs = client.map(inc, 0..n as i64).unwrap();
        let t_map = t.elapsed();
        let v: Vec<i64> = client.gather(&fs).unwrap();
        let el = t.elapsed();
        assert_eq!(v.len(), n);
        println!("n={n} map={t_map:?} total={el:?} rate={:.0}/s", n as f64 / el.as_secs_f64());
        drop(fs);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}
