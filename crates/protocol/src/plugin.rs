//! Worker plugins (dask's `WorkerPlugin`): code a worker runs when it starts or when the plugin
//! is registered (`setup`), when it stops or the plugin is removed (`teardown`), and on each of
//! its task transitions (`transition`).
//!
//! A plugin type implements [`WorkerPlugin`] and `Serialize`/`Deserialize` (a client sends its
//! state to the scheduler, which keeps it and gives it to every worker, also those that join
//! later), and is registered with `dask::register_worker_plugin!(Type)` in every worker binary
//! that may run it, as tasks are.
use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;

/// The `kind` of a plugin made by `register_worker_callbacks`: a registered function run as
/// the setup.
pub const CALLBACK: &str = "dask.callback";
/// The `kind` of a plugin made by `upload_file`: a file written to the worker's directory and,
/// if it is a plugin library, loaded.
pub const UPLOAD_FILE: &str = "dask.upload-file";

/// Code a worker runs around its tasks.
///
/// `setup` runs on a thread of its own, before the worker takes tasks if the plugin was
/// registered before the worker joined; inside it, `dask::get_worker()` and
/// `dask::get_client()` work as in a task. `transition` runs on the worker's event loop, as in
/// dask: keep it short. A panic in any of them is caught and reported, never fatal to the worker.
pub trait WorkerPlugin: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The name the type is registered under (and the plugin's default name).
    const NAME: &'static str;
    /// When the plugin is installed on a worker; an `Err` fails `register_plugin` (the plugin
    /// is then not installed on that worker).
    fn setup(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// When the plugin is removed, replaced, or its worker closes.
    fn teardown(&self) -> Result<(), String> {
        Ok(())
    }
    /// A task on this worker changed state: `start` and `finish` are dask's worker states
    /// ("released", "waiting", "ready", "executing", "memory", "error", "fetch", "flight",
    /// "cancelled", "rescheduled").
    fn transition(&self, _key: &str, _start: &str, _finish: &str) {}
}

/// A plugin as a worker holds it.
pub trait PluginObject: Send + Sync {
    fn setup(&mut self) -> Result<(), String>;
    fn teardown(&self) -> Result<(), String>;
    fn transition(&self, key: &str, start: &str, finish: &str);
}

impl<P: WorkerPlugin> PluginObject for P {
    fn setup(&mut self) -> Result<(), String> {
        WorkerPlugin::setup(self)
    }
    fn teardown(&self) -> Result<(), String> {
        WorkerPlugin::teardown(self)
    }
    fn transition(&self, key: &str, start: &str, finish: &str) {
        WorkerPlugin::transition(self, key, start, finish)
    }
}

/// Makes a plugin from its msgpack-encoded state.
pub type MakePlugin = fn(&[u8]) -> Result<Box<dyn PluginObject>, String>;

/// How a registered plugin type is made from its state.
pub struct PluginRegistration {
    pub name: &'static str,
    pub create: MakePlugin,
}

inventory::collect!(PluginRegistration);

impl PluginRegistration {
    pub const fn of<P: WorkerPlugin>() -> PluginRegistration {
        PluginRegistration {
            name: P::NAME,
            create: |state| {
                let p: P = codec::decode(codec::MSGPACK, state)
                    .map_err(|e| format!("worker plugin {} cannot be made from that state: {e}", P::NAME))?;
                Ok(Box::new(p))
            },
        }
    }
}

/// The plugin types linked into this program, by name.
pub fn plugin_types() -> &'static HashMap<&'static str, &'static PluginRegistration> {
    static TYPES: OnceLock<HashMap<&'static str, &'static PluginRegistration>> = OnceLock::new();
    TYPES.get_or_init(|| inventory::iter::<PluginRegistration>.into_iter().map(|r| (r.name, r)).collect())
}

/// Registers a worker plugin type (see [`WorkerPlugin`]) so workers of this program can run it.
#[macro_export]
macro_rules! register_worker_plugin {
    ($t:ty) => {
        $crate::__private::inventory::submit! {
            $crate::plugin::PluginRegistration::of::<$t>()
        }
    };
}

/// The state of an [`UPLOAD_FILE`] plugin.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct UploadedFile {
    /// The file's name (no directories).
    pub filename: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Load it as a plugin library (dask's `load=True`); only shared libraries are loaded.
    pub load: bool,
}

/// Code the scheduler runs beside its event loop (dask's `SchedulerPlugin`), told what happens
/// there: new graphs, every task transition, workers and clients coming and going.
///
/// The scheduler never waits for a plugin: its core emits a feed of these events, which the
/// scheduler's shell passes (unbounded, in order) to a thread of its own that calls the plugins.
/// So a slow plugin lags behind, and the loop goes on. A panic is caught and logged.
///
/// A plugin type is built into the scheduler's program (a custom `dask-scheduler` binary, as a
/// custom worker binary carries its tasks; or the program running a `LocalCluster`) with
/// `dask::register_scheduler_plugin!(Type)`. It is started by `dask-scheduler --preload NAME`
/// (from `Default`) or by a client's `register_scheduler_plugin(plugin)` (from its state).
pub trait SchedulerPlugin: Serialize + DeserializeOwned + Default + Send + 'static {
    /// The name the type is registered under (and the plugin's default name).
    const NAME: &'static str;
    /// When it is added; `scheduler` is the scheduler's address. An `Err` refuses it.
    fn start(&mut self, _scheduler: &str) -> Result<(), String> {
        Ok(())
    }
    /// A client sent these new tasks (`client` is the scheduler's name for it, `client-N`).
    fn update_graph(&mut self, _client: &str, _keys: &[std::sync::Arc<str>]) {}
    /// A task changed state (the scheduler's states: "released", "waiting", "queued",
    /// "no-worker", "processing", "memory", "erred", and "forgotten" when it is gone).
    fn transition(&mut self, _key: &str, _start: &str, _finish: &str) {}
    fn add_worker(&mut self, _worker: &str) {}
    fn remove_worker(&mut self, _worker: &str, _reason: &str) {}
    fn add_client(&mut self, _client: &str) {}
    fn remove_client(&mut self, _client: &str) {}
    /// When it is removed or the scheduler closes.
    fn close(&mut self) {}
}

/// A scheduler plugin as the scheduler holds it.
pub trait SchedulerPluginObject: Send {
    fn start(&mut self, scheduler: &str) -> Result<(), String>;
    fn update_graph(&mut self, client: &str, keys: &[std::sync::Arc<str>]);
    fn transition(&mut self, key: &str, start: &str, finish: &str);
    fn add_worker(&mut self, worker: &str);
    fn remove_worker(&mut self, worker: &str, reason: &str);
    fn add_client(&mut self, client: &str);
    fn remove_client(&mut self, client: &str);
    fn close(&mut self);
}

impl<P: SchedulerPlugin> SchedulerPluginObject for P {
    fn start(&mut self, scheduler: &str) -> Result<(), String> {
        SchedulerPlugin::start(self, scheduler)
    }
    fn update_graph(&mut self, client: &str, keys: &[std::sync::Arc<str>]) {
        SchedulerPlugin::update_graph(self, client, keys)
    }
    fn transition(&mut self, key: &str, start: &str, finish: &str) {
        SchedulerPlugin::transition(self, key, start, finish)
    }
    fn add_worker(&mut self, worker: &str) {
        SchedulerPlugin::add_worker(self, worker)
    }
    fn remove_worker(&mut self, worker: &str, reason: &str) {
        SchedulerPlugin::remove_worker(self, worker, reason)
    }
    fn add_client(&mut self, client: &str) {
        SchedulerPlugin::add_client(self, client)
    }
    fn remove_client(&mut self, client: &str) {
        SchedulerPlugin::remove_client(self, client)
    }
    fn close(&mut self) {
        SchedulerPlugin::close(self)
    }
}

/// Makes a scheduler plugin from its msgpack-encoded state (`None`: its `Default`).
pub type MakeSchedulerPlugin = fn(Option<&[u8]>) -> Result<Box<dyn SchedulerPluginObject>, String>;

/// How a registered scheduler plugin type is made.
pub struct SchedulerPluginRegistration {
    pub name: &'static str,
    pub create: MakeSchedulerPlugin,
}

inventory::collect!(SchedulerPluginRegistration);

impl SchedulerPluginRegistration {
    pub const fn of<P: SchedulerPlugin>() -> SchedulerPluginRegistration {
        SchedulerPluginRegistration {
            name: P::NAME,
            create: |state| {
                let p: P = match state {
                    None => P::default(),
                    Some(s) => codec::decode(codec::MSGPACK, s)
                        .map_err(|e| format!("scheduler plugin {} cannot be made from that state: {e}", P::NAME))?,
                };
                Ok(Box::new(p))
            },
        }
    }
}

/// The scheduler plugin types linked into this program, by name.
pub fn scheduler_plugin_types() -> &'static HashMap<&'static str, &'static SchedulerPluginRegistration> {
    static TYPES: OnceLock<HashMap<&'static str, &'static SchedulerPluginRegistration>> = OnceLock::new();
    TYPES.get_or_init(|| inventory::iter::<SchedulerPluginRegistration>.into_iter().map(|r| (r.name, r)).collect())
}

/// Registers a scheduler plugin type (see [`SchedulerPlugin`]) in this program.
#[macro_export]
macro_rules! register_scheduler_plugin {
    ($t:ty) => {
        $crate::__private::inventory::submit! {
            $crate::plugin::SchedulerPluginRegistration::of::<$t>()
        }
    };
}

/// Code a nanny runs (dask's `NannyPlugin`): `setup` when it is registered or the nanny
/// connects, `teardown` when it is removed or the nanny closes; with `RESTART`, the nanny
/// restarts its worker once the plugin is set up (so the worker starts under it). Registered
/// with `dask::register_nanny_plugin!(Type)` in the nanny's program (`dask-nanny`, `dask-worker`
/// with its nanny, or the program running a `LocalCluster`).
pub trait NannyPlugin: Serialize + DeserializeOwned + Send + Sync + 'static {
    const NAME: &'static str;
    /// dask's `restart = True`: restart the worker after setup.
    const RESTART: bool = false;
    fn setup(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn teardown(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A nanny plugin as a nanny holds it.
pub trait NannyPluginObject: Send + Sync {
    fn setup(&mut self) -> Result<(), String>;
    fn teardown(&self) -> Result<(), String>;
    fn restart(&self) -> bool;
}

impl<P: NannyPlugin> NannyPluginObject for P {
    fn setup(&mut self) -> Result<(), String> {
        NannyPlugin::setup(self)
    }
    fn teardown(&self) -> Result<(), String> {
        NannyPlugin::teardown(self)
    }
    fn restart(&self) -> bool {
        P::RESTART
    }
}

/// Makes a nanny plugin from its msgpack-encoded state.
pub type MakeNannyPlugin = fn(&[u8]) -> Result<Box<dyn NannyPluginObject>, String>;

/// How a registered nanny plugin type is made from its msgpack-encoded state.
pub struct NannyPluginRegistration {
    pub name: &'static str,
    pub create: MakeNannyPlugin,
}

inventory::collect!(NannyPluginRegistration);

impl NannyPluginRegistration {
    pub const fn of<P: NannyPlugin>() -> NannyPluginRegistration {
        NannyPluginRegistration {
            name: P::NAME,
            create: |state| {
                let p: P = codec::decode(codec::MSGPACK, state)
                    .map_err(|e| format!("nanny plugin {} cannot be made from that state: {e}", P::NAME))?;
                Ok(Box::new(p))
            },
        }
    }
}

/// The nanny plugin types linked into this program, by name.
pub fn nanny_plugin_types() -> &'static HashMap<&'static str, &'static NannyPluginRegistration> {
    static TYPES: OnceLock<HashMap<&'static str, &'static NannyPluginRegistration>> = OnceLock::new();
    TYPES.get_or_init(|| inventory::iter::<NannyPluginRegistration>.into_iter().map(|r| (r.name, r)).collect())
}

/// Registers a nanny plugin type (see [`NannyPlugin`]) in this program.
#[macro_export]
macro_rules! register_nanny_plugin {
    ($t:ty) => {
        $crate::__private::inventory::submit! {
            $crate::plugin::NannyPluginRegistration::of::<$t>()
        }
    };
}
