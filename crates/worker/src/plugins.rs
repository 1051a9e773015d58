//! The worker's plugins (dask's `Worker.plugins`): installed from the scheduler's list when the
//! worker registers (before it takes tasks), added and removed later by `register_plugin` /
//! `unregister_worker_plugin`, torn down when the worker closes.
//!
//! Setups and teardowns run one at a time, in the order they were asked for, on a thread of
//! the worker's own (`dask-plugins`), never on its event loop: a slow setup delays other plugin
//! operations, not tasks. Transitions run on the event loop, as in dask. A panic anywhere is
//! caught: a plugin never takes its worker down.
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use dask_protocol::pb::{self, plugin_op::Op};
use dask_protocol::plugin::{CALLBACK, PluginObject, UPLOAD_FILE, UploadedFile, plugin_types};
use dask_protocol::task::{ExecErrorKind, execute, panic_message, run_result};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use tokio::sync::mpsc::UnboundedSender;

use crate::context::{TaskScope, WorkerContext, with_scope};

type Installed = Vec<(String, Arc<dyn PluginObject>)>;

/// The plugins of one worker.
pub(crate) struct Plugins {
    installed: RwLock<Installed>,
    /// Any installed: the state machine reports transitions only then.
    active: AtomicBool,
    /// Where uploaded files go (removed when the worker closes).
    files: PathBuf,
    /// The plugin thread, started on the first operation after registration.
    jobs: Mutex<Option<(mpsc::Sender<Job>, std::thread::JoinHandle<()>)>>,
}

/// A plugin operation for the plugin thread, answered as the run `id` (0: nobody waits).
struct Job {
    id: u64,
    op: Op,
    context: Arc<WorkerContext>,
    out: UnboundedSender<pb::WorkerToScheduler>,
}

impl Plugins {
    pub(crate) fn new(files: PathBuf) -> Arc<Plugins> {
        Arc::new(Plugins {
            installed: RwLock::new(Vec::new()),
            active: AtomicBool::new(false),
            files,
            jobs: Mutex::new(None),
        })
    }

    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Installs the plugins the scheduler gave at registration, here and now (the caller is on
    /// a blocking thread); a failed one is logged and left out, as dask does.
    pub(crate) fn install_all(&self, context: &Arc<WorkerContext>, specs: Vec<pb::PluginSpec>) {
        for spec in specs {
            let name = spec.name.clone();
            if let Err(e) = self.install(context, spec) {
                tracing::warn!(plugin = %name, error = %e.message(), "worker plugin setup failed");
            }
        }
    }

    /// Queues an add or remove for the plugin thread, which answers the scheduler's run `id`.
    pub(crate) fn submit(
        self: &Arc<Self>,
        id: u64,
        op: Op,
        context: Arc<WorkerContext>,
        out: UnboundedSender<pb::WorkerToScheduler>,
    ) {
        let mut jobs = self.jobs.lock();
        let job = Job { id, op, context, out };
        let job = match jobs.as_ref() {
            Some((tx, _)) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("dask-plugins".into()).spawn(move || {
            for job in rx {
                me.run_job(job);
            }
        });
        match spawned {
            Ok(thread) => {
                let _ = tx.send(job);
                *jobs = Some((tx, thread));
            }
            Err(e) => {
                let why = ExecErrorKind::Error(format!("could not start the plugin thread: {e}"));
                answer(&job, Err(why));
            }
        }
    }

    fn run_job(&self, job: Job) {
        let r = match job.op.clone() {
            Op::Add(spec) => self.install(&job.context, spec),
            Op::Remove(name) => self.remove(&job.context, &name),
        };
        answer(&job, r);
    }

    /// Sets up the plugin `spec` describes and installs it, replacing (after tearing it down)
    /// one of the same name unless `idempotent`.
    fn install(&self, context: &Arc<WorkerContext>, spec: pb::PluginSpec) -> Result<(), ExecErrorKind> {
        let name = spec.name.clone();
        if spec.idempotent && self.installed.read().iter().any(|(n, _)| *n == name) {
            return Ok(());
        }
        // dask tears the old one down before setting the new one up.
        self.remove(context, &name)?;
        let mut plugin = self.make(&spec)?;
        guarded(context, &name, "setup", || plugin.setup())?;
        tracing::info!(plugin = %name, "worker plugin installed");
        self.installed.write().push((name, Arc::from(plugin)));
        self.active.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Tears down and forgets the plugin `name`, if installed here.
    fn remove(&self, context: &Arc<WorkerContext>, name: &str) -> Result<(), ExecErrorKind> {
        let old = {
            let mut installed = self.installed.write();
            let old = installed.iter().position(|(n, _)| n == name).map(|i| installed.remove(i));
            self.active.store(!installed.is_empty(), Ordering::Relaxed);
            old
        };
        match old {
            Some((_, p)) => guarded(context, name, "teardown", || p.teardown()),
            None => Ok(()),
        }
    }

    /// Tears every plugin down (the worker is closing), newest first, after the operations
    /// under way (a setup still running is waited for, up to 10 s, so that it is torn down too).
    pub(crate) fn teardown_all(&self, context: &Arc<WorkerContext>) {
        if let Some((tx, thread)) = self.jobs.lock().take() {
            drop(tx);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!("a worker plugin operation is still running after 10 s; closing without it");
            }
        }
        let all = std::mem::take(&mut *self.installed.write());
        self.active.store(false, Ordering::Relaxed);
        for (name, p) in all.into_iter().rev() {
            if let Err(e) = guarded(context, &name, "teardown", || p.teardown()) {
                tracing::warn!(plugin = %name, error = %e.message(), "worker plugin teardown failed");
            }
        }
        let _ = std::fs::remove_dir_all(&self.files);
    }

    /// A task's transition, to every plugin.
    pub(crate) fn transition(&self, key: &str, start: &str, finish: &str) {
        for (name, p) in self.installed.read().iter() {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| p.transition(key, start, finish))) {
                tracing::warn!(plugin = %name, %key, error = %panic_message(&*panic), "worker plugin transition panicked");
            }
        }
    }

    fn make(&self, spec: &pb::PluginSpec) -> Result<Box<dyn PluginObject>, ExecErrorKind> {
        match spec.kind.as_str() {
            CALLBACK => {
                let task = pb::TaskSpec::decode(&spec.state[..])
                    .map_err(|e| ExecErrorKind::BadArguments(format!("a malformed worker callback: {e}")))?;
                Ok(Box::new(Callback { task }))
            }
            UPLOAD_FILE => {
                let file: UploadedFile = dask_protocol::codec::decode(dask_protocol::codec::MSGPACK, &spec.state)
                    .map_err(|e| ExecErrorKind::BadArguments(format!("a malformed uploaded file: {e}")))?;
                Ok(Box::new(Upload { file, dir: self.files.clone() }))
            }
            kind => match plugin_types().get(kind) {
                Some(reg) => (reg.create)(&spec.state).map_err(ExecErrorKind::BadArguments),
                None => Err(ExecErrorKind::Error(format!(
                    "no worker plugin type named {kind:?} is registered in this worker: build the worker \
                     from the crate that defines it, with dask::register_worker_plugin!({kind})"
                ))),
            },
        }
    }
}

fn answer(job: &Job, r: Result<(), ExecErrorKind>) {
    if job.id == 0 {
        if let Err(e) = r {
            tracing::warn!(error = %e.message(), "worker plugin operation failed");
        }
        return;
    }
    let r = r.map(|()| dask_protocol::codec::Value {
        codec: dask_protocol::codec::MSGPACK,
        data: bytes::Bytes::from_static(&[0xc0]),
    });
    let done = pb::RunDone { id: job.id, result: Some(run_result(&job.context.address, "", r)) };
    let _ = job.out.send(pb::WorkerToScheduler {
        events: vec![pb::WorkerEvent { kind: Some(pb::worker_event::Kind::RunDone(done)) }],
    });
}

/// Runs a plugin's `setup` or `teardown` as a task of key `plugin-<name>` (so `get_worker`
/// works in it), catching a panic.
fn guarded(
    context: &Arc<WorkerContext>,
    name: &str,
    what: &str,
    f: impl FnOnce() -> Result<(), String>,
) -> Result<(), ExecErrorKind> {
    let scope = TaskScope { worker: context.clone(), key: format!("plugin-{name}"), slots: Arc::new(|_| false) };
    match with_scope(scope, || catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(m)) => Err(ExecErrorKind::Error(format!("worker plugin {name:?}: {what} failed: {m}"))),
        Err(p) => Err(ExecErrorKind::Panic(format!("worker plugin {name:?}: {what} panicked: {}", panic_message(&*p)))),
    }
}

/// `register_worker_callbacks`: a registered function run as the setup.
struct Callback {
    task: pb::TaskSpec,
}

impl PluginObject for Callback {
    fn setup(&mut self) -> Result<(), String> {
        execute(&self.task, &|_| None).map(drop).map_err(|e| e.message())
    }
    fn teardown(&self) -> Result<(), String> {
        Ok(())
    }
    fn transition(&self, _: &str, _: &str, _: &str) {}
}

/// `upload_file`: the file goes into the worker's directory; a plugin library is loaded.
struct Upload {
    file: UploadedFile,
    dir: PathBuf,
}

/// Whether `name` is a shared library this platform loads.
fn is_library(name: &str) -> bool {
    [".so", ".dylib", ".dll"].iter().any(|ext| name.ends_with(ext))
}

impl PluginObject for Upload {
    fn setup(&mut self) -> Result<(), String> {
        let name = &self.file.filename;
        if name.is_empty() || name.contains(['/', '\\', ':']) || name == "." || name == ".." {
            return Err(format!("{name:?} is not a file name: upload_file sends one file, named without directories"));
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let path = self.dir.join(name);
        write_file(&path, &self.file.data)?;
        if !(self.file.load && is_library(name)) {
            return Ok(());
        }
        // A new build of the same library must load as a new library: the loader keeps one per
        // file, forever.
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.file.data.hash(&mut h);
        let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
        let unique = self.dir.join(format!("{stem}-{:016x}.{ext}", h.finish()));
        write_file(&unique, &self.file.data)?;
        crate::library::load(&unique, &crate::library::crate_name(name)).map(drop)
    }
    fn teardown(&self) -> Result<(), String> {
        Ok(())
    }
    fn transition(&self, _: &str, _: &str, _: &str) {}
}

fn write_file(path: &std::path::Path, data: &[u8]) -> Result<(), String> {
    if std::fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    // Not in place: a loaded library must not change under its mappings.
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
