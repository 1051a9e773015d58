//! `SpecCluster` (tier 2): named workers and groups from specs, a template to scale from,
//! scaling by workers, cores and memory, and its error paths.
use std::collections::BTreeMap;

use dask::builtins::inc;
use dask::{Client, Error, Launch, SpecCluster, SubmitOptions, WorkerSpec};

#[test]
fn named_workers_groups_and_a_template() {
    let mut workers = BTreeMap::new();
    workers.insert(
        "big".to_string(),
        WorkerSpec { nthreads: 2, resources: vec![("GPU".into(), 1.0)], ..Default::default() },
    );
    workers.insert("small".to_string(), WorkerSpec { group: vec!["-a".into(), "-b".into()], ..Default::default() });
    let template = WorkerSpec { nthreads: 1, memory_limit: 1 << 30, ..Default::default() };
    let mut cluster = SpecCluster::new(workers, Some(template)).unwrap();
    let mut names = cluster.worker_names();
    names.sort();
    assert_eq!(names, vec!["big", "small-a", "small-b"]);
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    let info = client.scheduler_info().unwrap();
    let big = info.workers.iter().find(|w| w.name == "big").unwrap();
    assert_eq!(big.nthreads, 2);
    // The GPU task can only go to "big".
    let on_gpu = SubmitOptions { resources: [("GPU".to_string(), 1.0)].into(), ..Default::default() };
    let f = client.submit_with(inc, (1,), on_gpu).unwrap();
    assert_eq!(f.result().unwrap(), 2);
    assert_eq!(client.who_has(std::slice::from_ref(&f)).unwrap()[f.key()], vec![big.address.clone()]);

    let (next, spec) = cluster.new_worker_spec().unwrap();
    assert_eq!(next, "spec-0");
    assert_eq!(spec.memory_limit, 1 << 30);
    cluster.scale(5).unwrap();
    assert_eq!(cluster.n_workers(), 5);
    assert!(cluster.worker_names().contains(&"spec-1".to_string()));
    // 6 cores of one-thread workers; then 2 GiB of 1 GiB workers.
    cluster.scale_cores(6).unwrap();
    assert_eq!(cluster.n_workers(), 6);
    cluster.scale_memory(2 << 30).unwrap();
    assert_eq!(cluster.n_workers(), 2);
    assert_eq!(client.scheduler_info().unwrap().workers.len(), 2);
    cluster.close();
}

#[test]
fn without_a_template_it_can_only_shrink_and_bad_specs_are_refused() {
    let mut workers = BTreeMap::new();
    workers.insert("only".to_string(), WorkerSpec::default());
    let mut cluster = SpecCluster::new(workers, None).unwrap();
    assert!(matches!(cluster.scale(3), Err(Error::InvalidArgument(m)) if m.contains("template")));
    assert!(cluster.new_worker_spec().is_err());
    cluster.scale(0).unwrap();
    assert_eq!(cluster.n_workers(), 0);

    let mut bad = BTreeMap::new();
    bad.insert("x".to_string(), WorkerSpec { nthreads: 0, ..Default::default() });
    assert!(matches!(SpecCluster::new(bad, None), Err(Error::InvalidArgument(_))));
    let mut bad = BTreeMap::new();
    bad.insert("x".to_string(), WorkerSpec { launch: Launch::Command(vec![]), ..Default::default() });
    assert!(matches!(SpecCluster::new(bad, None), Err(Error::InvalidArgument(_))));
    let no_memory = WorkerSpec::default();
    let mut c = SpecCluster::new(BTreeMap::new(), Some(no_memory)).unwrap();
    assert!(matches!(c.scale_memory(1 << 30), Err(Error::InvalidArgument(m)) if m.contains("memory limit")));
}
