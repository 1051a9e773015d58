//! `SpecCluster`: a cluster described by worker specs (dask's `SpecCluster`): named workers,
//! each in this process, a process of this program or another worker binary, or a command line
//! of the user's; groups of workers under one spec; and a template that `scale` copies.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use dask_client::{Error, Result};

use crate::AdaptOptions;
use crate::local::{LocalCluster, LocalClusterBuilder};

/// How a worker is started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Launch {
    /// In this process, on threads (it runs this program's tasks).
    #[default]
    Threads,
    /// This program started again as a worker (call `dask::init()` first thing in `main`).
    Process,
    /// A worker binary (built with `dask::worker_main()`, such as `dask-worker`), given
    /// `dask-worker`'s flags.
    Program(PathBuf),
    /// A command line, `{scheduler}` and `{name}` replaced (e.g. `["dask-worker",
    /// "{scheduler}", "--name", "{name}", "--no-nanny"]`); it runs under a nanny here.
    Command(Vec<String>),
}

/// One worker of a [`SpecCluster`] (dask's `{"cls": Worker, "options": {...}}`).
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub nthreads: usize,
    /// Bytes (0: no limit).
    pub memory_limit: u64,
    /// Abstract resources (`[("GPU", 1.0)]`).
    pub resources: Vec<(String, f64)>,
    pub launch: Launch,
    /// dask's `group`: this entry is several workers, named `<name><suffix>` for each suffix
    /// (`["-0", "-1"]`); empty: one worker, named `<name>`.
    pub group: Vec<String>,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        WorkerSpec { nthreads: 1, memory_limit: 0, resources: Vec::new(), launch: Launch::Threads, group: Vec::new() }
    }
}

impl WorkerSpec {
    fn builder(&self) -> Result<LocalClusterBuilder> {
        if self.nthreads == 0 {
            return Err(Error::InvalidArgument("a worker spec needs nthreads of at least 1".into()));
        }
        let mut b = LocalCluster::builder().threads_per_worker(self.nthreads).memory_limit(self.memory_limit);
        b.resources = self.resources.clone();
        match &self.launch {
            Launch::Threads => {}
            Launch::Process => b.processes = true,
            Launch::Program(p) => {
                b.processes = true;
                b.worker_program = Some(p.clone());
            }
            Launch::Command(argv) => {
                if argv.is_empty() {
                    return Err(Error::InvalidArgument("a worker command line needs a program".into()));
                }
                b.processes = true;
                b.command = Some(argv.clone());
            }
        }
        Ok(b)
    }

    /// The names this entry's workers take.
    fn names(&self, name: &str) -> Vec<String> {
        if self.group.is_empty() {
            vec![name.to_string()]
        } else {
            self.group.iter().map(|s| format!("{name}{s}")).collect()
        }
    }
}

/// A scheduler (in this process) and workers made from specs. `scale(n)` starts workers from
/// the template (named `spec-<n>`) or retires the newest; `adapt` works as on `LocalCluster`.
pub struct SpecCluster {
    inner: LocalCluster,
    template: Option<WorkerSpec>,
}

impl std::fmt::Debug for SpecCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpecCluster({}, workers={})", self.inner.scheduler_address(), self.inner.n_workers())
    }
}

/// How long a SpecCluster's workers may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl SpecCluster {
    /// Starts a scheduler and the named workers (each entry's group), waiting until they have
    /// joined. `template` is what `scale` starts more of; without one, `scale` can only shrink.
    pub fn new(workers: BTreeMap<String, WorkerSpec>, template: Option<WorkerSpec>) -> Result<SpecCluster> {
        let mut base = match &template {
            Some(t) => t.builder()?,
            None => WorkerSpec::default().builder()?,
        };
        base = base.n_workers(0);
        base.prefix = "spec";
        let mut entries = Vec::new();
        for (name, spec) in &workers {
            if name.is_empty() {
                return Err(Error::InvalidArgument("a worker spec needs a name".into()));
            }
            let b = spec.builder()?;
            for n in spec.names(name) {
                entries.push((n, b.clone()));
            }
        }
        let inner = base.build()?;
        let (rt, pool) = inner.parts()?;
        rt.block_on(async {
            for (name, b) in &entries {
                pool.add(b, name.clone()).await?;
            }
            match tokio::time::timeout(START_TIMEOUT, pool.wait_all()).await {
                Ok(r) => r,
                Err(_) => Err(Error::Cluster(format!("the workers did not all start within {START_TIMEOUT:?}"))),
            }
        })?;
        Ok(SpecCluster { inner, template })
    }

    pub fn scheduler_address(&self) -> String {
        self.inner.scheduler_address()
    }

    /// Names of the workers it runs.
    pub fn worker_names(&self) -> Vec<String> {
        self.inner.parts().map(|(_, p)| p.names()).unwrap_or_default()
    }

    pub fn n_workers(&self) -> usize {
        self.inner.n_workers()
    }

    fn template(&self) -> Result<&WorkerSpec> {
        self.template.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "this SpecCluster has no worker template to start more workers from: give one".into(),
            )
        })
    }

    /// The spec of the next worker `scale` would start, and its name (dask's
    /// `new_worker_spec`).
    pub fn new_worker_spec(&self) -> Result<(String, WorkerSpec)> {
        let t = self.template()?.clone();
        let names = self.worker_names();
        let next = (0..).map(|i| format!("spec-{i}")).find(|n| !names.contains(n)).expect("a free name");
        Ok((next, t))
    }

    /// Runs `n` workers: more from the template, or the newest retired gracefully.
    pub fn scale(&mut self, n: usize) -> Result<()> {
        if n > self.n_workers() {
            self.template()?;
        }
        self.inner.scale(n)
    }

    /// Scales to at least `cores` threads (dask's `scale(cores=...)`).
    pub fn scale_cores(&mut self, cores: usize) -> Result<()> {
        let per = self.template()?.nthreads.max(1);
        self.scale(cores.div_ceil(per))
    }

    /// Scales to at least `bytes` of memory limit (dask's `scale(memory=...)`).
    pub fn scale_memory(&mut self, bytes: u64) -> Result<()> {
        let per = self.template()?.memory_limit;
        if per == 0 {
            return Err(Error::InvalidArgument(
                "the worker template has no memory limit: scale by workers or cores instead".into(),
            ));
        }
        self.scale(bytes.div_ceil(per) as usize)
    }

    /// Adaptive scaling from the template (see `LocalCluster::adapt`).
    pub fn adapt(&mut self, options: AdaptOptions) -> Result<()> {
        self.template()?;
        self.inner.adapt(options)
    }

    pub fn stop_adapt(&mut self) {
        self.inner.stop_adapt();
    }

    /// Stops the workers and the scheduler.
    pub fn close(self) {
        self.inner.close();
    }
}
