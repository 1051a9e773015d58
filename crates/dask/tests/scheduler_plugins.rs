//! Scheduler plugins (tier 2): started by a client or with the scheduler, told of graphs,
//! transitions, workers and clients from the core's feed, never slowing the scheduler down, and
//! closed when removed or when the scheduler closes.
use std::sync::Mutex;
use std::time::Duration;

use dask::builtins::inc;
use dask::{Client, LocalCluster, PluginOptions, SchedulerPlugin};

const LONG: Duration = Duration::from_secs(30);

static LOG: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn log(tag: &str, event: String) {
    LOG.lock().unwrap().push((tag.to_string(), event));
}

fn events(tag: &str) -> Vec<String> {
    LOG.lock().unwrap().iter().filter(|(t, _)| t == tag).map(|(_, e)| e.clone()).collect()
}

fn has(tag: &str, event: &str) -> bool {
    events(tag).iter().any(|e| e == event)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < LONG, "timed out waiting for {what}: {:?}", LOG.lock().unwrap().len());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Watcher {
    tag: String,
    /// Each transition takes this long (a slow plugin).
    slow_ms: u64,
    refuse: bool,
    panic_on_transition: bool,
}

impl SchedulerPlugin for Watcher {
    const NAME: &'static str = "watcher";

    fn start(&mut self, scheduler: &str) -> Result<(), String> {
        if self.refuse {
            return Err("not today".into());
        }
        if self.tag.is_empty() {
            self.tag = "preloaded".into();
        }
        log(&self.tag, format!("start {scheduler}"));
        Ok(())
    }
    fn update_graph(&mut self, client: &str, keys: &[std::sync::Arc<str>]) {
        log(&self.tag, format!("graph {client} {}", keys.len()));
    }
    fn transition(&mut self, key: &str, start: &str, finish: &str) {
        if self.panic_on_transition {
            panic!("a plugin bug");
        }
        std::thread::sleep(Duration::from_millis(self.slow_ms));
        log(&self.tag, format!("{key} {start}->{finish}"));
    }
    fn add_worker(&mut self, worker: &str) {
        log(&self.tag, format!("add-worker {worker}"));
    }
    fn remove_worker(&mut self, worker: &str, _reason: &str) {
        log(&self.tag, format!("remove-worker {worker}"));
    }
    fn add_client(&mut self, client: &str) {
        log(&self.tag, format!("add-client {client}"));
    }
    fn remove_client(&mut self, client: &str) {
        log(&self.tag, format!("remove-client {client}"));
    }
    fn close(&mut self) {
        log(&self.tag, "close".into());
    }
}

dask::register_scheduler_plugin!(Watcher);

fn watcher(tag: &str) -> Watcher {
    Watcher { tag: tag.into(), ..Default::default() }
}

fn cluster(n: usize) -> (LocalCluster, Client) {
    let cluster = LocalCluster::builder().n_workers(n).threads_per_worker(1).build().expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    (cluster, client)
}

#[test]
fn a_plugin_sees_graphs_transitions_workers_and_clients() {
    let (mut cluster, client) = cluster(1);
    client.register_scheduler_plugin(watcher("sees")).unwrap();
    assert!(has("sees", &format!("start {}", cluster.scheduler_address())), "{:?}", events("sees"));

    let f = client.submit(inc, (1,)).unwrap();
    assert_eq!(f.result().unwrap(), 2);
    let key = f.key().to_string();
    wait_until("the task's transitions", || has("sees", &format!("{key} processing->memory")));
    assert!(events("sees").iter().any(|e| e.starts_with("graph client-") && e.ends_with(" 1")), "{:?}", events("sees"));
    drop(f);
    wait_until("the task forgotten", || has("sees", &format!("{key} released->forgotten")));

    cluster.scale(2).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    wait_until("the new worker", || events("sees").iter().filter(|e| e.starts_with("add-worker")).count() == 1);
    let other = Client::connect(&cluster.scheduler_address()).unwrap();
    wait_until("the new client", || events("sees").iter().any(|e| e.starts_with("add-client")));
    other.close();
    wait_until("the client leaving", || events("sees").iter().any(|e| e.starts_with("remove-client")));
    cluster.scale(1).unwrap();
    wait_until("the worker leaving", || events("sees").iter().any(|e| e.starts_with("remove-worker")));

    client.unregister_scheduler_plugin("watcher").unwrap();
    assert!(has("sees", "close"), "removed plugins are closed");
    let err = client.unregister_scheduler_plugin("watcher").unwrap_err().to_string();
    assert!(err.contains("no scheduler plugin named"), "{err}");
}

#[test]
fn a_slow_or_panicking_plugin_never_holds_the_scheduler_up() {
    let (_cluster, client) = cluster(1);
    let slow = Watcher { tag: "slow".into(), slow_ms: 5, ..Default::default() };
    client.register_scheduler_plugin(slow).unwrap();
    let broken = Watcher { tag: "broken".into(), panic_on_transition: true, ..Default::default() };
    client
        .register_scheduler_plugin_with(broken, PluginOptions { name: Some("broken".into()), idempotent: false })
        .unwrap();
    // 100 tasks make 300 transitions or more: 1.5 s of the slow plugin's time, at least.
    let futures = client.map(inc, 0..100i64).unwrap();
    let results = client.gather(&futures).unwrap();
    assert_eq!(results, (1..=100).collect::<Vec<i64>>());
    let seen = events("slow").iter().filter(|e| e.ends_with("processing->memory")).count();
    assert!(seen < 100, "the results came before the slow plugin caught up ({seen} of 100 seen)");
    // It does catch up.
    wait_until("the slow plugin", || {
        events("slow").iter().filter(|e| e.ends_with("processing->memory")).count() == 100
    });
}

#[test]
fn preloaded_plugins_start_with_the_scheduler_and_close_with_it() {
    let cluster = LocalCluster::builder().n_workers(1).threads_per_worker(1).preload("watcher").build().unwrap();
    let address = cluster.scheduler_address();
    wait_until("the preloaded plugin's start", || has("preloaded", &format!("start {address}")));
    cluster.close();
    assert!(has("preloaded", "close"));

    let err = LocalCluster::builder().n_workers(1).preload("no-such-plugin").build().unwrap_err().to_string();
    assert!(err.contains("no scheduler plugin type named \"no-such-plugin\"") && err.contains("watcher"), "{err}");
}

#[test]
fn a_plugin_that_fails_to_start_is_refused_and_not_installed() {
    let (_cluster, client) = cluster(1);
    let refusing = Watcher { tag: "refuses".into(), refuse: true, ..Default::default() };
    let err = client.register_scheduler_plugin(refusing).unwrap_err().to_string();
    assert!(err.contains("start failed: not today"), "{err}");
    let err = client.unregister_scheduler_plugin("watcher").unwrap_err().to_string();
    assert!(err.contains("no scheduler plugin named"), "{err}");
    // Idempotent registration keeps the first.
    client.register_scheduler_plugin(watcher("first")).unwrap();
    client.register_scheduler_plugin_with(watcher("second"), PluginOptions { name: None, idempotent: true }).unwrap();
    assert!(events("second").is_empty());
    // A replacement that fails to start leaves the one there running (dask's order).
    let refusing = Watcher { tag: "refuses-too".into(), refuse: true, ..Default::default() };
    assert!(client.register_scheduler_plugin(refusing).is_err());
    let f = client.submit(inc, (7,)).unwrap();
    f.result().unwrap();
    let key = f.key().to_string();
    wait_until("the first plugin still told", || has("first", &format!("{key} processing->memory")));
    client.unregister_scheduler_plugin("watcher").unwrap();
    assert!(has("first", "close"));
}
