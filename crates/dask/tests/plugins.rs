//! Worker plugins and worker callbacks (tier 2): setup on every worker and on those that join
//! later, transitions, teardown, replacement, idempotence, and setups that fail or panic.
use std::sync::Mutex;
use std::time::Duration;

use dask::builtins::inc;
use dask::{Client, Error, LocalCluster, PluginOptions, WorkerPlugin};

const LONG: Duration = Duration::from_secs(30);

/// What plugins did, as `(tag, event)`; tests share the process, so each uses its own tag.
static LOG: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn log(tag: &str, event: String) {
    LOG.lock().unwrap().push((tag.to_string(), event));
}

fn events(tag: &str) -> Vec<String> {
    LOG.lock().unwrap().iter().filter(|(t, _)| t == tag).map(|(_, e)| e.clone()).collect()
}

fn count(tag: &str, prefix: &str) -> usize {
    events(tag).iter().filter(|e| e.starts_with(prefix)).count()
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Recorder {
    tag: String,
    fail: Option<String>,
    panic: bool,
    /// Set by setup (state a plugin keeps on its worker).
    #[serde(skip)]
    worker: String,
}

impl WorkerPlugin for Recorder {
    const NAME: &'static str = "recorder";

    fn setup(&mut self) -> Result<(), String> {
        if self.panic {
            panic!("setup blew up");
        }
        if let Some(why) = &self.fail {
            return Err(why.clone());
        }
        self.worker = dask::get_worker().map_err(|e| e.to_string())?.address;
        log(&self.tag, format!("setup {}", self.worker));
        Ok(())
    }

    fn teardown(&self) -> Result<(), String> {
        log(&self.tag, format!("teardown {}", self.worker));
        Ok(())
    }

    fn transition(&self, key: &str, start: &str, finish: &str) {
        log(&self.tag, format!("{key} {start}->{finish}"));
    }
}

dask::register_worker_plugin!(Recorder);

fn recorder(tag: &str) -> Recorder {
    Recorder { tag: tag.into(), ..Default::default() }
}

fn cluster(n: usize) -> (LocalCluster, Client) {
    let cluster = LocalCluster::builder().n_workers(n).threads_per_worker(1).build().expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    (cluster, client)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < LONG, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_plugin_is_set_up_on_every_worker_sees_transitions_and_reaches_later_workers() {
    let (mut cluster, client) = cluster(2);
    client.register_plugin(recorder("every")).unwrap();
    let mut setups: Vec<String> = events("every").into_iter().filter(|e| e.starts_with("setup")).collect();
    setups.sort();
    let mut expected: Vec<String> = cluster.worker_addresses().iter().map(|a| format!("setup {a}")).collect();
    expected.sort();
    assert_eq!(setups, expected, "set up once on each worker, with get_worker() working in setup");

    let f = client.submit(inc, (41,)).unwrap();
    assert_eq!(f.result().unwrap(), 42);
    let key = f.key().to_string();
    wait_until("the task's transitions", || count("every", &format!("{key} executing->memory")) == 1);
    let seen: Vec<String> = events("every").into_iter().filter(|e| e.starts_with(&key)).collect();
    assert!(seen.contains(&format!("{key} released->ready")), "{seen:?}");
    assert!(seen.contains(&format!("{key} ready->executing")), "{seen:?}");
    drop(f);
    wait_until("the release", || count("every", &format!("{key} memory->released")) == 1);

    // A worker that joins later is set up before it takes work.
    cluster.scale(3).unwrap();
    client.wait_for_workers(3, Some(LONG)).unwrap();
    wait_until("the new worker's setup", || count("every", "setup") == 3);

    // Unregistered: torn down everywhere, and no longer told anything.
    client.unregister_worker_plugin("recorder").unwrap();
    assert_eq!(count("every", "teardown"), 3);
    let before = events("every").len();
    client.submit(inc, (1,)).unwrap().result().unwrap();
    assert_eq!(events("every").len(), before);
    let err = client.unregister_worker_plugin("recorder").unwrap_err();
    assert!(matches!(&err, Error::Refused(m) if m.contains("no worker plugin named \"recorder\"")), "{err}");
}

#[test]
fn same_name_replaces_unless_idempotent_and_workers_tear_down_when_they_close() {
    let (cluster, client) = cluster(1);
    let named = |idempotent| PluginOptions { name: Some("mine".into()), idempotent };
    client.register_plugin_with(recorder("first"), named(false)).unwrap();
    // Idempotent: the installed one stays, and nothing is set up.
    client.register_plugin_with(recorder("second"), named(true)).unwrap();
    assert_eq!(count("second", "setup"), 0);
    // Not idempotent: the old one is torn down before the new one is set up.
    client.register_plugin_with(recorder("third"), named(false)).unwrap();
    assert_eq!(count("first", "teardown"), 1);
    assert_eq!(count("third", "setup"), 1);
    // Two plugins of one type under two names live side by side.
    client
        .register_plugin_with(recorder("fourth"), PluginOptions { name: Some("other".into()), idempotent: false })
        .unwrap();
    drop(client);
    cluster.close();
    assert_eq!((count("third", "teardown"), count("fourth", "teardown")), (1, 1), "closing workers tear down");
}

#[test]
fn a_setup_that_fails_or_panics_fails_the_registration_and_not_the_worker() {
    let (_cluster, client) = cluster(2);
    let failing = Recorder { tag: "fails".into(), fail: Some("no license".into()), ..Default::default() };
    let err = client.register_plugin(failing).unwrap_err();
    assert!(err.to_string().contains("setup failed: no license"), "{err}");
    let panicking = Recorder { tag: "panics".into(), panic: true, ..Default::default() };
    let err = client.register_plugin_with(panicking, PluginOptions { name: Some("p".into()), idempotent: false });
    let err = err.unwrap_err();
    assert!(err.to_string().contains("setup panicked: setup blew up"), "{err}");
    // The workers are fine, and a failed plugin was never installed (it sees no transitions).
    assert_eq!(client.submit(inc, (1,)).unwrap().result().unwrap(), 2);
    assert!(events("fails").is_empty() && events("panics").is_empty());
    assert!(matches!(
        client.register_plugin_with(recorder("x"), PluginOptions { name: Some(String::new()), idempotent: false }),
        Err(Error::InvalidArgument(_))
    ));
}

/// A worker callback: notes where it ran.
#[dask::task]
fn note_worker(tag: String) -> Result<(), String> {
    let w = dask::get_worker().map_err(|e| e.to_string())?;
    log(&tag, format!("callback {}", w.address));
    Ok(())
}

#[dask::task]
fn refuse_setup(_tag: String) -> Result<(), String> {
    Err("this worker will not do".into())
}

#[test]
fn worker_callbacks_run_on_every_worker_now_and_later() {
    let (mut cluster, client) = cluster(1);
    let name = client.register_worker_callbacks(note_worker, ("cb".to_string(),)).unwrap();
    assert_eq!(count("cb", "callback"), 1);
    cluster.scale(2).unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    wait_until("the callback on the new worker", || count("cb", "callback") == 2);
    client.unregister_worker_plugin(&name).unwrap();
    let err = client.register_worker_callbacks(refuse_setup, ("x".to_string(),)).unwrap_err();
    assert!(err.to_string().contains("this worker will not do"), "{err}");
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct NannyRecorder {
    tag: String,
}

impl dask::NannyPlugin for NannyRecorder {
    const NAME: &'static str = "nanny-recorder";

    fn setup(&mut self) -> Result<(), String> {
        log(&self.tag, "setup".into());
        Ok(())
    }

    fn teardown(&self) -> Result<(), String> {
        log(&self.tag, "teardown".into());
        Ok(())
    }
}

dask::register_nanny_plugin!(NannyRecorder);

/// A nanny plugin that wants the worker restarted under it (dask's `restart = True`).
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Restarter {
    tag: String,
}

impl dask::NannyPlugin for Restarter {
    const NAME: &'static str = "restarter";
    const RESTART: bool = true;

    fn setup(&mut self) -> Result<(), String> {
        log(&self.tag, "setup".into());
        Ok(())
    }
}

dask::register_nanny_plugin!(Restarter);

#[test]
fn nanny_plugins_reach_every_nanny_now_and_later_and_can_restart_the_workers() {
    let (mut cluster, client) = cluster(2);
    client.register_nanny_plugin(NannyRecorder { tag: "nanny".into() }).unwrap();
    assert_eq!(count("nanny", "setup"), 2, "one per nanny");
    cluster.scale(3).unwrap();
    client.wait_for_workers(3, Some(LONG)).unwrap();
    wait_until("the new nanny's setup", || count("nanny", "setup") == 3);
    client.unregister_nanny_plugin("nanny-recorder").unwrap();
    assert_eq!(count("nanny", "teardown"), 3);
    let err = client.unregister_nanny_plugin("nanny-recorder").unwrap_err();
    assert!(err.to_string().contains("no nanny plugin named"), "{err}");

    // RESTART: each worker is restarted once its nanny has the plugin.
    let before: std::collections::HashSet<String> = cluster.worker_addresses().into_iter().collect();
    client.register_nanny_plugin(Restarter { tag: "restart".into() }).unwrap();
    assert_eq!(count("restart", "setup"), 3);
    wait_until("the workers restarted", || {
        let now = client.scheduler_info().map(|i| i.workers).unwrap_or_default();
        now.len() == 3 && now.iter().all(|w| !before.contains(&w.address))
    });
    assert_eq!(client.submit(inc, (1,)).unwrap().result().unwrap(), 2);
}
