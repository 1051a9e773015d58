//! The nanny's plugins (dask's `Nanny.plugins`): added and removed as the scheduler asks (on
//! connecting, the scheduler sends those registered), one operation at a time, in order, on a
//! thread of their own; torn down when the nanny closes. A panic is caught and reported.
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;

use dask_protocol::pb::{self, plugin_op::Op};
use dask_protocol::plugin::{NannyPluginObject, nanny_plugin_types};
use dask_protocol::task::{ExecErrorKind, panic_message, run_result};
use tokio::sync::mpsc::UnboundedSender;

use crate::nanny::Request_;

enum Job {
    Op {
        id: u64,
        op: Op,
    },
    /// Tear everything down and end.
    Close(mpsc::Sender<()>),
}

/// Where the link hands plugin commands.
pub(crate) struct NannyPlugins {
    tx: mpsc::Sender<Job>,
}

impl NannyPlugins {
    /// Starts the plugin thread: answers go to the scheduler, restarts to the nanny's loop.
    pub(crate) fn start(
        address: String,
        to_scheduler: UnboundedSender<pb::NannyEvent>,
        to_loop: UnboundedSender<Request_>,
    ) -> NannyPlugins {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("dask-nanny-plugins".into())
            .spawn(move || serve(rx, &address, &to_scheduler, &to_loop));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the nanny plugins' thread: plugin commands go unanswered");
        }
        NannyPlugins { tx }
    }

    pub(crate) fn submit(&self, cmd: pb::PluginCommand) {
        if let Some(op) = cmd.op.and_then(|o| o.op) {
            let _ = self.tx.send(Job::Op { id: cmd.id, op });
        }
    }

    /// Tears every plugin down, waiting (up to 10 s) for operations under way.
    pub(crate) fn close(&self) {
        let (done_tx, done_rx) = mpsc::channel();
        if self.tx.send(Job::Close(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        }
    }
}

fn serve(
    rx: mpsc::Receiver<Job>,
    address: &str,
    to_scheduler: &UnboundedSender<pb::NannyEvent>,
    to_loop: &UnboundedSender<Request_>,
) {
    let mut installed: Vec<(String, Box<dyn NannyPluginObject>)> = Vec::new();
    for job in rx {
        let (id, op) = match job {
            Job::Op { id, op } => (id, op),
            Job::Close(done) => {
                for (name, p) in installed.drain(..).rev() {
                    if let Err(e) = guarded(&name, "teardown", || p.teardown()) {
                        tracing::warn!(plugin = %name, error = %e.message(), "nanny plugin teardown failed");
                    }
                }
                let _ = done.send(());
                return;
            }
        };
        let r = match op {
            Op::Add(spec) => add(&mut installed, spec, to_loop),
            Op::Remove(name) => match installed.iter().position(|(n, _)| *n == name) {
                Some(i) => {
                    let (_, p) = installed.remove(i);
                    guarded(&name, "teardown", || p.teardown())
                }
                None => Ok(()),
            },
        };
        if id == 0 {
            if let Err(e) = &r {
                tracing::warn!(error = %e.message(), "nanny plugin operation failed");
            }
            continue;
        }
        let r = r.map(|()| dask_protocol::codec::Value {
            codec: dask_protocol::codec::MSGPACK,
            data: bytes::Bytes::from_static(&[0xc0]),
        });
        let done = pb::RunDone { id, result: Some(run_result(address, "", r)) };
        let _ = to_scheduler.send(pb::NannyEvent { kind: Some(pb::nanny_event::Kind::PluginDone(done)) });
    }
}

fn add(
    installed: &mut Vec<(String, Box<dyn NannyPluginObject>)>,
    spec: pb::PluginSpec,
    to_loop: &UnboundedSender<Request_>,
) -> Result<(), ExecErrorKind> {
    let name = spec.name;
    let at = installed.iter().position(|(n, _)| *n == name);
    if spec.idempotent && at.is_some() {
        return Ok(());
    }
    if let Some(i) = at {
        let (_, old) = installed.remove(i);
        guarded(&name, "teardown", || old.teardown())?;
    }
    let Some(reg) = nanny_plugin_types().get(spec.kind.as_str()) else {
        return Err(ExecErrorKind::Error(format!(
            "no nanny plugin type named {:?} is registered in this nanny: run a nanny built from the crate \
             that defines it, with dask::register_nanny_plugin!",
            spec.kind
        )));
    };
    let mut plugin = (reg.create)(&spec.state).map_err(ExecErrorKind::BadArguments)?;
    guarded(&name, "setup", || plugin.setup())?;
    tracing::info!(plugin = %name, "nanny plugin installed");
    if plugin.restart() {
        let _ = to_loop.send(Request_::Restart(format!("nanny plugin {name:?} restarts the worker")));
    }
    installed.push((name, plugin));
    Ok(())
}

fn guarded(name: &str, what: &str, f: impl FnOnce() -> Result<(), String>) -> Result<(), ExecErrorKind> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(m)) => Err(ExecErrorKind::Error(format!("nanny plugin {name:?}: {what} failed: {m}"))),
        Err(p) => Err(ExecErrorKind::Panic(format!("nanny plugin {name:?}: {what} panicked: {}", panic_message(&*p)))),
    }
}
