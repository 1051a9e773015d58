//! Scheduler plugins (dask's `SchedulerPlugin`), on a thread of their own: the event loop turns
//! the core's feed ([`core::Feed`]) into messages for that thread and never waits for it; the
//! core emits the feed only while a plugin is installed.
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;

use dask_protocol::plugin::{SchedulerPluginObject, scheduler_plugin_types};
use dask_protocol::task::{ExecErrorKind, panic_message, run_result};

use super::*;
use crate::core::Feed;

/// What the plugin thread is asked to do.
enum Msg {
    /// Start `plugin` and install it as `name` (closing one of that name first); answer with
    /// `reply`.
    Add {
        name: String,
        plugin: Box<dyn SchedulerPluginObject>,
        scheduler: String,
        reply: Reply,
    },
    Remove {
        name: String,
        reply: Reply,
    },
    Feed(Vec<Feed>),
    /// Close every plugin (the scheduler is closing).
    Close(std::sync::mpsc::Sender<()>),
}

type Reply = Box<dyn FnOnce(Result<(), ExecErrorKind>) + Send>;

/// The event loop's side: where plugin messages go, and the names it has installed.
#[derive(Default)]
pub(super) struct SchedulerPlugins {
    tx: Option<mpsc::Sender<Msg>>,
    /// Installed or being started, in order.
    names: Vec<String>,
    /// The feed of this iteration, sent at flush.
    feed: Vec<Feed>,
}

impl SchedulerPlugins {
    pub(super) fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    fn send(&mut self, msg: Msg) {
        if self.tx.is_none() {
            let (tx, rx) = mpsc::channel::<Msg>();
            let spawned = std::thread::Builder::new().name("dask-scheduler-plugins".into()).spawn(move || serve(rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start the scheduler plugins' thread");
                return;
            }
            self.tx = Some(tx);
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(msg);
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
    let mut installed: Vec<(String, Box<dyn SchedulerPluginObject>)> = Vec::new();
    for msg in rx {
        match msg {
            Msg::Add { name, mut plugin, scheduler, reply } => {
                if let Some(i) = installed.iter().position(|(n, _)| *n == name) {
                    let (_, mut old) = installed.remove(i);
                    guarded(&name, "close", || old.close());
                }
                match catch_unwind(AssertUnwindSafe(|| plugin.start(&scheduler))) {
                    Ok(Ok(())) => {
                        tracing::info!(plugin = %name, "scheduler plugin started");
                        installed.push((name, plugin));
                        reply(Ok(()));
                    }
                    Ok(Err(m)) => {
                        reply(Err(ExecErrorKind::Error(format!("scheduler plugin {name:?}: start failed: {m}"))))
                    }
                    Err(p) => reply(Err(ExecErrorKind::Panic(format!(
                        "scheduler plugin {name:?}: start panicked: {}",
                        panic_message(&*p)
                    )))),
                }
            }
            Msg::Remove { name, reply } => {
                if let Some(i) = installed.iter().position(|(n, _)| *n == name) {
                    let (_, mut old) = installed.remove(i);
                    guarded(&name, "close", || old.close());
                }
                reply(Ok(()));
            }
            Msg::Feed(feed) => {
                for (name, p) in installed.iter_mut() {
                    guarded(name, "a hook", || {
                        for f in &feed {
                            tell(p.as_mut(), f);
                        }
                    });
                }
            }
            Msg::Close(done) => {
                for (name, mut p) in installed.drain(..).rev() {
                    guarded(&name, "close", || p.close());
                }
                let _ = done.send(());
                return;
            }
        }
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

fn guarded(name: &str, what: &str, f: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
        tracing::warn!(plugin = %name, error = %panic_message(&*p), "scheduler plugin panicked in {what}");
    }
}

impl EventLoop {
    /// Starts a registered plugin type (from its encoded state, or its `Default` when `None`)
    /// under `name`; `reply` gets the outcome.
    fn add_scheduler_plugin(&mut self, name: String, kind: &str, state: Option<&[u8]>, reply: Reply) {
        let Some(reg) = scheduler_plugin_types().get(kind) else {
            let mut known: Vec<&str> = scheduler_plugin_types().keys().copied().collect();
            known.sort_unstable();
            return reply(Err(ExecErrorKind::Error(format!(
                "no scheduler plugin type named {kind:?} is registered in this scheduler (it has {known:?}): \
                 run a scheduler built from the crate that defines it, with dask::register_scheduler_plugin!"
            ))));
        };
        let plugin = match (reg.create)(state) {
            Ok(p) => p,
            Err(e) => return reply(Err(ExecErrorKind::BadArguments(e))),
        };
        let scheduler = self.address.to_string();
        if !self.scheduler_plugins.names.contains(&name) {
            self.scheduler_plugins.names.push(name.clone());
        }
        self.core.set_feed(true);
        // A plugin whose start fails is taken off the loop's list again.
        let tx = self.self_tx.clone();
        let failed_name = name.clone();
        let reply: Reply = Box::new(move |r| {
            if r.is_err() {
                let _ = tx.send(LoopMsg::SchedulerPluginFailed(failed_name));
            }
            reply(r)
        });
        self.scheduler_plugins.send(Msg::Add { name, plugin, scheduler, reply });
    }

    pub(super) fn scheduler_plugin_failed(&mut self, name: String) {
        self.scheduler_plugins.names.retain(|n| *n != name);
        self.core.set_feed(!self.scheduler_plugins.is_empty());
    }

    /// `--preload` plugins, started as the scheduler starts.
    pub(super) fn preload(&mut self, names: &[String]) {
        for n in names {
            let name = n.clone();
            self.add_scheduler_plugin(
                n.clone(),
                n,
                None,
                Box::new(move |r| {
                    if let Err(e) = r {
                        tracing::error!(plugin = %name, error = %e.message(), "preloaded scheduler plugin failed");
                    }
                }),
            );
        }
    }

    /// A client's `register_scheduler_plugin` / `unregister_scheduler_plugin`.
    pub(super) fn on_scheduler_plugin(&mut self, client: ClientId, id: u64, op: pb::plugin_op::Op) {
        let tx = self.self_tx.clone();
        let reply: Reply = Box::new(move |r| {
            let r = r.map(|()| dask_protocol::codec::Value {
                codec: dask_protocol::codec::MSGPACK,
                data: bytes::Bytes::from_static(&[0xc0]),
            });
            let result = run_result("", "", r);
            let _ = tx.send(LoopMsg::SchedulerRunDone { client, id, result });
        });
        match op {
            pb::plugin_op::Op::Add(spec) => {
                if spec.idempotent && self.scheduler_plugins.names.contains(&spec.name) {
                    return reply(Ok(()));
                }
                let state = spec.state.clone();
                self.add_scheduler_plugin(spec.name, &spec.kind, Some(&state), reply);
            }
            pb::plugin_op::Op::Remove(name) => {
                if !self.scheduler_plugins.names.contains(&name) {
                    return reply(Err(ExecErrorKind::Error(format!(
                        "no scheduler plugin named {name:?} is registered (registered: {:?})",
                        self.scheduler_plugins.names
                    ))));
                }
                self.scheduler_plugins.names.retain(|n| *n != name);
                self.core.set_feed(!self.scheduler_plugins.is_empty());
                self.scheduler_plugins.send(Msg::Remove { name, reply });
            }
        }
    }
}
