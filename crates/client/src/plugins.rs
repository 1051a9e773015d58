//! Worker plugins, worker callbacks and `upload_file` (dask's `register_plugin`,
//! `unregister_worker_plugin`, `register_worker_callbacks`, `upload_file`): the scheduler keeps
//! each one by name and gives it to every worker, now and when one joins later.
use std::path::Path;

use dask_protocol::pb::{self, plugin_op::Op};
use dask_protocol::plugin::{CALLBACK, NannyPlugin, SchedulerPlugin, UPLOAD_FILE, UploadedFile, WorkerPlugin};
use dask_protocol::task::Task;

use crate::args::IntoArgs;
use crate::run::decode;
use crate::{Client, Error, Result};

/// Options of [`Client::register_plugin_with`].
#[derive(Clone, Debug, Default)]
pub struct PluginOptions {
    /// The name it is registered under; default: the plugin type's `NAME`. A plugin registered
    /// under a name in use replaces the one there (torn down first), unless `idempotent`.
    pub name: Option<String>,
    /// Leave an installed plugin of the same name as it is (dask's `idempotent=True`).
    pub idempotent: bool,
}

/// A plugin of registered type `kind`, as the scheduler keeps it: its state, under its name
/// (default: the type's).
fn spec<P: serde::Serialize>(plugin: &P, kind: &str, opts: PluginOptions) -> Result<pb::PluginSpec> {
    let state = dask_protocol::codec::to_msgpack(plugin)
        .map_err(|e| Error::InvalidArgument(format!("the plugin cannot be encoded: {e}")))?;
    let name = opts.name.unwrap_or_else(|| kind.to_string());
    if name.is_empty() {
        return Err(Error::InvalidArgument("a plugin needs a name".into()));
    }
    Ok(pb::PluginSpec { name, kind: kind.to_string(), state: state.into(), idempotent: opts.idempotent })
}

/// Where a plugin goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Workers,
    Scheduler,
    Nannies,
}

impl Client {
    /// Sends a plugin operation to every worker through the scheduler; fails with the first
    /// worker's error (as dask raises it).
    fn plugin_op(&self, op: Op) -> Result<()> {
        self.plugin_op_at(op, Target::Workers)
    }

    fn plugin_op_at(&self, op: Op, target: Target) -> Result<()> {
        let req = pb::RunRequest {
            wait: true,
            on_scheduler: target == Target::Scheduler,
            nanny: target == Target::Nannies,
            plugin: Some(pb::PluginOp { op: Some(op) }),
            ..Default::default()
        };
        for r in self.inner.block_on(self.run_request(req))? {
            if !r.ok {
                return decode::<()>(r);
            }
        }
        Ok(())
    }

    /// Installs `plugin` on every worker, and on every worker that joins later (dask's
    /// `register_plugin`): its `setup` runs on each now, or before a new worker takes tasks.
    /// Fails with the first worker's setup error; the plugin stays registered for the others.
    pub fn register_plugin<P: WorkerPlugin>(&self, plugin: P) -> Result<()> {
        self.register_plugin_with(plugin, PluginOptions::default())
    }

    /// [`register_plugin`](Self::register_plugin) under another name, or idempotently.
    pub fn register_plugin_with<P: WorkerPlugin>(&self, plugin: P, opts: PluginOptions) -> Result<()> {
        self.plugin_op(Op::Add(spec(&plugin, P::NAME, opts)?))
    }

    /// Starts `plugin` in the scheduler (dask's `register_plugin` of a `SchedulerPlugin`): the
    /// scheduler's program must have its type (`dask::register_scheduler_plugin!`: a custom
    /// scheduler binary, or this program for its own `LocalCluster`). Fails if it does not, or
    /// if the plugin's `start` fails.
    pub fn register_scheduler_plugin<P: SchedulerPlugin>(&self, plugin: P) -> Result<()> {
        self.register_scheduler_plugin_with(plugin, PluginOptions::default())
    }

    /// [`register_scheduler_plugin`](Self::register_scheduler_plugin) under another name, or
    /// idempotently.
    pub fn register_scheduler_plugin_with<P: SchedulerPlugin>(&self, plugin: P, opts: PluginOptions) -> Result<()> {
        self.plugin_op_at(Op::Add(spec(&plugin, P::NAME, opts)?), Target::Scheduler)
    }

    /// Closes and removes the scheduler plugin `name`; an unknown name is an error.
    pub fn unregister_scheduler_plugin(&self, name: &str) -> Result<()> {
        self.plugin_op_at(Op::Remove(name.to_string()), Target::Scheduler)
    }

    /// Installs `plugin` on every nanny, and on every nanny that connects later (dask's
    /// `register_plugin` of a `NannyPlugin`); with `RESTART`, each nanny restarts its worker
    /// once the plugin is set up. The nannies' program must have its type
    /// (`dask::register_nanny_plugin!`). Fails with the first nanny's error.
    pub fn register_nanny_plugin<P: NannyPlugin>(&self, plugin: P) -> Result<()> {
        self.register_nanny_plugin_with(plugin, PluginOptions::default())
    }

    /// [`register_nanny_plugin`](Self::register_nanny_plugin) under another name, or
    /// idempotently.
    pub fn register_nanny_plugin_with<P: NannyPlugin>(&self, plugin: P, opts: PluginOptions) -> Result<()> {
        self.plugin_op_at(Op::Add(spec(&plugin, P::NAME, opts)?), Target::Nannies)
    }

    /// Tears the nanny plugin `name` down on every nanny and forgets it; an unknown name is an
    /// error.
    pub fn unregister_nanny_plugin(&self, name: &str) -> Result<()> {
        self.plugin_op_at(Op::Remove(name.to_string()), Target::Nannies)
    }

    /// Tears the plugin `name` down on every worker and forgets it (dask's
    /// `unregister_worker_plugin`); an unknown name is an error.
    pub fn unregister_worker_plugin(&self, name: &str) -> Result<()> {
        self.plugin_op(Op::Remove(name.to_string()))
    }

    /// Runs `f(args...)` on every worker now and on every worker that joins later (dask's
    /// `register_worker_callbacks(setup=...)`); returns the name it is registered under, for
    /// [`unregister_worker_plugin`](Self::unregister_worker_plugin).
    pub fn register_worker_callbacks<T: Task, A: IntoArgs<T::Args>>(&self, _f: T, args: A) -> Result<String> {
        let spec = crate::run::spec_of::<T, A>(args)?;
        let name = format!("worker-setup-{}", self.inner.unique_key(T::NAME));
        self.plugin_op(Op::Add(pb::PluginSpec {
            name: name.clone(),
            kind: CALLBACK.to_string(),
            state: spec,
            idempotent: false,
        }))?;
        Ok(name)
    }

    /// Sends the file at `path` to every worker (and to those that join later), into its
    /// directory; a plugin library (`.so`, `.dylib`, `.dll`: a cdylib built with
    /// `dask::plugin_library!()`) is loaded, so its task functions can be submitted from now on
    /// (dask's `upload_file`). Fails if a worker cannot write or load it, or the library was
    /// built against an incompatible dask.
    pub fn upload_file(&self, path: impl AsRef<Path>) -> Result<()> {
        self.upload_file_with(path, true)
    }

    /// [`upload_file`](Self::upload_file); `load: false` only stores the file.
    pub fn upload_file_with(&self, path: impl AsRef<Path>, load: bool) -> Result<()> {
        let path = path.as_ref();
        let filename = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::InvalidArgument(format!("{} does not name a file", path.display())))?
            .to_string();
        let data =
            std::fs::read(path).map_err(|e| Error::InvalidArgument(format!("cannot read {}: {e}", path.display())))?;
        let state = dask_protocol::codec::to_msgpack(&UploadedFile { filename: filename.clone(), data, load })
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if state.len() >= dask_protocol::MAX_MESSAGE - 4096 {
            return Err(Error::InvalidArgument(format!(
                "{} is {} bytes; upload_file sends at most {} (build the library in release mode, or strip it)",
                path.display(),
                state.len(),
                dask_protocol::MAX_MESSAGE - 4096
            )));
        }
        // One plugin per file name, as dask: a new upload of the same file replaces the old.
        self.plugin_op(Op::Add(pb::PluginSpec {
            name: format!("upload-file-{filename}"),
            kind: UPLOAD_FILE.to_string(),
            state: state.into(),
            idempotent: false,
        }))
    }
}
