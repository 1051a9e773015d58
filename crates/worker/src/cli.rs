//! The `dask-worker` command line (dask's flags and defaults).
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dask_protocol::addr::Address;
use tokio_util::sync::CancellationToken;

use crate::memory::{parse_memory_limit, system_memory};
use crate::server::{self, WorkerConfig};

#[derive(Parser, Debug)]
#[command(name = "dask-worker", version, about = "Start a dask-rs worker and connect it to a scheduler")]
pub struct Args {
    /// Scheduler address, e.g. tcp://127.0.0.1:8786 (else --scheduler-file, else $DASK_SCHEDULER_ADDRESS).
    pub scheduler: Option<String>,
    /// Read the scheduler's address from this JSON file (written by dask-scheduler --scheduler-file).
    #[arg(long)]
    pub scheduler_file: Option<String>,
    /// Threads per worker process (default: all cores divided among --nworkers).
    #[arg(long)]
    pub nthreads: Option<usize>,
    /// Number of workers to start.
    #[arg(long, default_value_t = 1)]
    pub nworkers: usize,
    /// A unique name for this worker (with --nworkers > 1, suffixed -0, -1, ...).
    #[arg(long)]
    pub name: Option<String>,
    /// Bytes of memory per worker: 4GB, 4GiB, 0.5 (of system memory), 0 (no limit) or auto.
    #[arg(long, default_value = "auto")]
    pub memory_limit: String,
    /// Abstract resources, e.g. "GPU=2 MEM=10e9".
    #[arg(long)]
    pub resources: Option<String>,
    /// Run under a nanny (the nanny is not implemented yet: the worker runs without one).
    #[arg(long, overrides_with = "no_nanny")]
    pub nanny: bool,
    /// Run without a nanny.
    #[arg(long)]
    pub no_nanny: bool,
    /// Directory for the worker's files.
    #[arg(long)]
    pub local_directory: Option<String>,
    /// Seconds to wait for the scheduler before giving up (default: keep trying).
    #[arg(long)]
    pub death_timeout: Option<f64>,
    /// Host to bind the worker's data service to and advertise.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port of the worker's data service (default: any free port).
    #[arg(long, default_value_t = 0)]
    pub worker_port: u16,
    /// Ignored: the dashboard is not implemented yet.
    #[arg(long)]
    pub no_dashboard: bool,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// Parses `GPU=2 MEM=10e9`.
pub fn parse_resources(s: &str) -> Result<Vec<(String, f64)>, String> {
    s.split([' ', ','])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').ok_or_else(|| format!("resource {p:?} is not NAME=AMOUNT"))?;
            let v: f64 = v.parse().map_err(|_| format!("resource {k}: {v:?} is not a number"))?;
            Ok((k.to_string(), v))
        })
        .collect()
}

/// Finds the scheduler: the argument, then `--scheduler-file`, then `$DASK_SCHEDULER_ADDRESS`.
pub fn scheduler_address(arg: Option<&str>, file: Option<&str>) -> Result<Address, String> {
    if let Some(a) = arg {
        return Address::parse(a, Some(dask_protocol::DEFAULT_SCHEDULER_PORT)).map_err(|e| e.to_string());
    }
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|e| format!("failed to read scheduler file {f}: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("failed to parse scheduler file {f}: {e}"))?;
        let a = v["address"].as_str().ok_or_else(|| format!("scheduler file {f} has no \"address\""))?;
        return Address::parse(a, None).map_err(|e| e.to_string());
    }
    if let Ok(a) = std::env::var("DASK_SCHEDULER_ADDRESS") {
        return Address::parse(&a, Some(dask_protocol::DEFAULT_SCHEDULER_PORT)).map_err(|e| e.to_string());
    }
    Err("no scheduler given: pass its address (dask-worker tcp://HOST:8786), --scheduler-file, or set DASK_SCHEDULER_ADDRESS".into())
}

/// Runs the `dask-worker` command line. A user's own worker binary is:
/// `fn main() -> std::process::ExitCode { dask::worker_main() }`.
pub fn worker_main() -> ExitCode {
    worker_main_from(std::env::args_os())
}

/// Runs `dask-worker` with these arguments (the first is the program name).
pub fn worker_main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    dask_protocol::cli::exit_code("dask-worker", run_cli(Args::parse_from(args)))
}

fn run_cli(args: Args) -> Result<(), String> {
    dask_protocol::cli::init_logging(&args.log_level)?;
    let scheduler = scheduler_address(args.scheduler.as_deref(), args.scheduler_file.as_deref())?;
    let nworkers = args.nworkers.max(1);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let nthreads = match args.nthreads {
        Some(0) => return Err("--nthreads must be at least 1".into()),
        Some(n) => n,
        None => (cores / nworkers).max(1),
    };
    let memory_limit =
        parse_memory_limit(&args.memory_limit, system_memory(), nworkers as u64).map_err(|e| e.to_string())?;
    let settings = dask_protocol::config::Config::load().map_err(|e| e.to_string())?;
    if let Some(r) = &args.resources {
        let parsed = parse_resources(r)?;
        tracing::warn!(?parsed, "--resources is accepted but not used for scheduling yet");
    }
    if args.nanny && !args.no_nanny {
        tracing::warn!("the nanny is not implemented yet; running the worker without one");
    }
    let death_timeout = match args.death_timeout {
        Some(s) if !(s.is_finite() && s >= 0.0) => {
            return Err(format!("--death-timeout {s} is not a number of seconds"));
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    let rt = dask_protocol::cli::runtime()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        dask_protocol::cli::cancel_on_signals(&shutdown);
        let mut runs = Vec::new();
        for i in 0..nworkers {
            let mut config = WorkerConfig::new(scheduler.clone());
            config.apply_config(&settings)?;
            config.nthreads = nthreads;
            config.name = match (&args.name, nworkers) {
                (Some(n), 1) => Some(n.clone()),
                (Some(n), _) => Some(format!("{n}-{i}")),
                (None, _) => None,
            };
            config.memory_limit = memory_limit;
            config.host = args.host.clone();
            config.port = if args.worker_port != 0 { args.worker_port + i as u16 } else { 0 };
            if let Some(d) = &args.local_directory {
                config.local_directory = d.clone();
            }
            config.death_timeout = death_timeout;
            let (handle, run) = match server::start(config, shutdown.child_token()).await {
                Ok(started) => started,
                Err(server::WorkerError::Stopped) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            eprintln!("dask-worker: {} ({}) connected to {scheduler}", handle.address, handle.name);
            runs.push(tokio::spawn(run));
        }
        let mut result = Ok(());
        for r in runs {
            match r.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e.to_string()),
                Err(e) => result = Err(format!("worker task failed: {e}")),
            }
        }
        result
    })
}
