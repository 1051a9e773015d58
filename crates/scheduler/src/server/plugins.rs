//! Scheduler plugins (dask's `SchedulerPlugin`), on a thread of their own: the event loop turns
//! the core's feed ([`core::Feed`]) into messages for that thread and never waits for it; the
//! core emits the feed only while a plugin is installed.
//!
//! The feed is unbounded: a plugin slower than the scheduler lags, and what it has not read yet
//! is held in memory until it has.
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;

use dask_protocol::plugin::{SchedulerPluginObject, scheduler_plugin_types};
use dask_protocol::task::{ExecErrorKind, panic_message, run_result};

use super::*;
use crate::core::Feed;

/// What the plugin thread is asked to do.
enum Msg {
    /// Start `plugin`; once started, it replaces the plugin of that name (closed then), and
    /// `reply` is told. A plugin whose start fails replaces nothing.
    Add {
        name: String,
        plugin: Box<dyn SchedulerPluginObject>,
        scheduler: String,
        reply: Reply,
    },
    /// Install a plugin already started (`--preload`).
    Installed {
        name: String,
        plugin: Box<dyn SchedulerPluginObject>,
    },
    Remove {
        name: String,
        reply: Reply,
    },
    Feed(Vec<Feed>),
    /// Close every plugin (the scheduler is closing).
    Close(mpsc::Sender<()>),
}

/// The answer to an add or remove. Answered exactly once: one dropped unanswered (a message
/// that never reached the thread, a thread that died) answers that the plugin thread is gone,
/// so no client waits forever.
pub(super) struct Reply(Option<Answer>);

type Answer = Box<dyn FnOnce(Result<(), ExecErrorKind>) + Send>;

/// Plugins by name.
pub(super) type Named = Vec<(String, Box<dyn SchedulerPluginObject>)>;

impl Reply {
    fn new(f: impl FnOnce(Result<(), ExecErrorKind>) + Send + 'static) -> Reply {
        Reply(Some(Box::new(f)))
    }

    fn send(mut self, r: Result<(), ExecErrorKind>) {
        if let Some(f) = self.0.take() {
            f(r)
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(ExecErrorKind::Error("the scheduler's plugin thread is gone".into())))
        }
    }
}

/// The event loop's side: where plugin messages go, and the names it has installed.
#[derive(Default)]
pub(super) struct SchedulerPlugins {
    tx: Option<mpsc::Sender<Msg>>,
    /// Installed or being started, in order, each with the number of its latest add: a failure
    /// of an older add of the same name must not remove a newer one.
    names: Vec<(String, u64)>,
    next_add: u64,
    /// The feed of this iteration, sent at flush.
    feed: Vec<Feed>,
}

impl SchedulerPlugins {
    pub(super) fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    fn has(&self, name: &str) -> bool {
        self.names.iter().any(|(n, _)| n == name)
    }

    /// Sends to the plugin thread, starting it (again, if it died) as needed.
    fn send(&mut self, msg: Msg) {
        let msg = match &self.tx {
            Some(tx) => match tx.send(msg) {
                Ok(()) => return,
                Err(mpsc::SendError(msg)) => {
                    tracing::error!("the scheduler plugins' thread died; starting another (its plugins are gone)");
                    msg
                }
            },
            None => msg,
        };
        let (tx, rx) = mpsc::channel::<Msg>();
        match std::thread::Builder::new().name("dask-scheduler-plugins".into()).spawn(move || serve(rx)) {
            Ok(_) => {
                let _ = tx.send(msg);
                self.tx = Some(tx);
            }
            // `msg` is dropped: its reply answers that the thread is gone.
            Err(e) => tracing::error!(error = %e, "could not start the scheduler plugins' thread"),
        }
    }

    pub(super) fn push_feed(&mut self, f: Feed) {
        self.feed.push(f);
    }

    pub(super) fn flush_feed(&mut self) {
        if !self.feed.is_empty() {
            let feed = std::mem::take(&mut self.feed);
            self.send(Msg::Feed(feed));
        }
    }

    /// Closes every plugin and waits (bounded) for their `close`.
    pub(super) fn close(&mut self) {
        self.flush_feed();
        if let Some(tx) = self.tx.take() {
            let (done_tx, done_rx) = mpsc::channel();
            if tx.send(Msg::Close(done_tx)).is_ok() {
                let _ = done_rx.recv_timeout(Duration::from_secs(5));
            }
        }
    }
}

/// The plugin thread: plugins by name, in order.
fn serve(rx: mpsc::Receiver<Msg>) {
    let mut installed: Named = Vec::new();
    let install = |installed: &mut Vec<(String, Box<dyn SchedulerPluginObject>)>, name: String, plugin| match installed
        .iter()
        .position(|(n, _)| *n == name)
    {
        Some(i) => {
            let old = std::mem::replace(&mut installed[i].1, plugin);
            retire(&name, old);
        }
        None => installed.push((name, plugin)),
    };
    for msg in rx {
        match msg {
            Msg::Add { name, mut plugin, scheduler, reply } => {
                match catch_unwind(AssertUnwindSafe(|| plugin.start(&scheduler))) {
                    Ok(Ok(())) => {
                        tracing::info!(plugin = %name, "scheduler plugin started");
                        install(&mut installed, name, plugin);
                        reply.send(Ok(()));
                    }
                    Ok(Err(m)) => {
                        retire(&name, plugin);
                        reply.send(Err(ExecErrorKind::Error(format!("scheduler plugin {name:?}: start failed: {m}"))))
                    }
                    Err(p) => reply.send(Err(ExecErrorKind::Panic(format!(
                        "scheduler plugin {name:?}: start panicked: {}",
                        panic_message(&*p)
                    )))),
                }
            }
            Msg::Installed { name, plugin } => install(&mut installed, name, plugin),
            Msg::Remove { name, reply } => {
                if let Some(i) = installed.iter().position(|(n, _)| *n == name) {
                    let (_, old) = installed.remove(i);
                    retire(&name, old);
                }
                reply.send(Ok(()));
            }
            Msg::Feed(feed) => {
                for (name, p) in installed.iter_mut() {
                    for f in &feed {
                        // Each call on its own: one panic loses one event, not the batch.
                        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| tell(p.as_mut(), f))) {
                            tracing::warn!(plugin = %name, error = %panic_message(&*panic), "scheduler plugin panicked");
                        }
                    }
                }
            }
            Msg::Close(done) => {
                for (name, p) in installed.drain(..).rev() {
                    retire(&name, p);
                }
                let _ = done.send(());
                return;
            }
        }
    }
}

/// Closes a plugin and drops it, a panic in either caught.
fn retire(name: &str, mut p: Box<dyn SchedulerPluginObject>) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(move || {
        p.close();
        drop(p);
    })) {
        tracing::warn!(plugin = %name, error = %panic_message(&*panic), "scheduler plugin panicked closing");
    }
}

fn client_name(c: ClientId) -> String {
    format!("client-{}", c.0)
}

fn tell(p: &mut dyn SchedulerPluginObject, f: &Feed) {
    match f {
        Feed::UpdateGraph { client, keys } => p.update_graph(&client_name(*client), keys),
        Feed::Transition { key, from, to } => p.transition(key, from, to),
        Feed::AddWorker { worker } => p.add_worker(worker),
        Feed::RemoveWorker { worker, reason } => p.remove_worker(worker, reason),
        Feed::AddClient { client } => p.add_client(&client_name(*client)),
        Feed::RemoveClient { client } => p.remove_client(&client_name(*client)),
    }
}

/// Makes a registered plugin type from its encoded state (`None`: its `Default`).
fn make(kind: &str, state: Option<&[u8]>) -> Result<Box<dyn SchedulerPluginObject>, ExecErrorKind> {
    let Some(reg) = scheduler_plugin_types().get(kind) else {
        let mut known: Vec<&str> = scheduler_plugin_types().keys().copied().collect();
        known.sort_unstable();
        return Err(ExecErrorKind::Error(format!(
            "no scheduler plugin type named {kind:?} is registered in this scheduler (it has {known:?}): \
             run a scheduler built from the crate that defines it, with dask::register_scheduler_plugin!"
        )));
    };
    (reg.create)(state).map_err(ExecErrorKind::BadArguments)
}

/// Makes and starts the `--preload` plugins, here and now: one that cannot be made or whose
/// start fails stops the scheduler from starting (as dask's preload does).
pub(super) fn preload(names: &[String], scheduler: &str) -> Result<Named, String> {
    let mut started = Vec::new();
    for name in names {
        let mut p = make(name, None).map_err(|e| format!("--preload {name}: {}", e.message()))?;
        match catch_unwind(AssertUnwindSafe(|| p.start(scheduler))) {
            Ok(Ok(())) => started.push((name.clone(), p)),
            Ok(Err(m)) => return Err(format!("--preload {name}: the plugin's start failed: {m}")),
            Err(panic) => {
                return Err(format!("--preload {name}: the plugin's start panicked: {}", panic_message(&*panic)));
            }
        }
    }
    Ok(started)
}

impl EventLoop {
    /// Installs plugins started already (`--preload`).
    pub(super) fn install_preloaded(&mut self, plugins: Named) {
        for (name, plugin) in plugins {
            let add = self.scheduler_plugins.next_add;
            self.scheduler_plugins.next_add += 1;
            self.scheduler_plugins.names.retain(|(n, _)| *n != name);
            self.scheduler_plugins.names.push((name.clone(), add));
            self.core.set_feed(true);
            self.scheduler_plugins.send(Msg::Installed { name, plugin });
        }
    }

    /// A plugin's start failed: off the loop's list, unless it was to replace one of its name
    /// (which runs on) or a newer add of its name came since.
    pub(super) fn scheduler_plugin_failed(&mut self, name: String, add: u64, replacing: bool) {
        if replacing {
            return;
        }
        self.scheduler_plugins.names.retain(|(n, a)| !(*n == name && *a == add));
        self.core.set_feed(!self.scheduler_plugins.is_empty());
    }

    /// A client's `register_scheduler_plugin` / `unregister_scheduler_plugin`.
    pub(super) fn on_scheduler_plugin(&mut self, client: ClientId, id: u64, op: pb::plugin_op::Op) {
        let tx = self.self_tx.clone();
        let reply = Reply::new(move |r| {
            let r = r.map(|()| dask_protocol::codec::Value {
                codec: dask_protocol::codec::MSGPACK,
                data: bytes::Bytes::from_static(&[0xc0]),
            });
            let result = run_result("", "", r);
            let _ = tx.send(LoopMsg::SchedulerRunDone { client, id, result });
        });
        match op {
            pb::plugin_op::Op::Add(spec) => {
                if spec.idempotent && self.scheduler_plugins.has(&spec.name) {
                    return reply.send(Ok(()));
                }
                let plugin = match make(&spec.kind, Some(&spec.state)) {
                    Ok(p) => p,
                    Err(e) => return reply.send(Err(e)),
                };
                let name = spec.name;
                let replacing = self.scheduler_plugins.has(&name);
                let add = self.scheduler_plugins.next_add;
                self.scheduler_plugins.next_add += 1;
                if let Some(entry) = self.scheduler_plugins.names.iter_mut().find(|(n, _)| *n == name) {
                    entry.1 = add;
                } else {
                    self.scheduler_plugins.names.push((name.clone(), add));
                }
                self.core.set_feed(true);
                // One whose start fails is taken off the loop's list again.
                let (tx, failed) = (self.self_tx.clone(), name.clone());
                let reply = Reply::new(move |r| {
                    if r.is_err() {
                        let _ = tx.send(LoopMsg::SchedulerPluginFailed(failed, add, replacing));
                    }
                    reply.send(r)
                });
                let scheduler = self.address.to_string();
                self.scheduler_plugins.send(Msg::Add { name, plugin, scheduler, reply });
            }
            pb::plugin_op::Op::Remove(name) => {
                if !self.scheduler_plugins.has(&name) {
                    let known: Vec<&str> = self.scheduler_plugins.names.iter().map(|(n, _)| n.as_str()).collect();
                    return reply.send(Err(ExecErrorKind::Error(format!(
                        "no scheduler plugin named {name:?} is registered (registered: {known:?})"
                    ))));
                }
                self.scheduler_plugins.names.retain(|(n, _)| *n != name);
                self.core.set_feed(!self.scheduler_plugins.is_empty());
                self.scheduler_plugins.send(Msg::Remove { name, reply });
            }
        }
    }
}
