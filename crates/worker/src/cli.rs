//! The `dask-worker` command line (dask's flags and defaults).
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dask_protocol::addr::Address;
use tokio_util::sync::CancellationToken;

use crate::memory::{memory_limit_for, system_memory};
use crate::server::{self, WorkerConfig};

#[derive(Parser, Debug)]
#[command(name = "dask-worker", version, about = "Start a dask-rs worker and connect it to a scheduler")]
pub struct Args {
    /// Scheduler address, e.g. tcp://127.0.0.1:8786 (else --scheduler-file, else $DASK_SCHEDULER_ADDRESS).
    pub scheduler: Option<String>,
    /// Read the scheduler's address from this JSON file (written by dask-scheduler --scheduler-file).
    #[arg(long)]
    pub scheduler_file: Option<String>,
    /// Threads per worker process (default, or 0: the cores divided among --nworkers).
    #[arg(long)]
    pub nthreads: Option<usize>,
    /// Number of workers to start: N, -1 (one per core) or auto (dask's split of the cores
    /// into workers and threads).
    #[arg(long, default_value = "1", allow_hyphen_values = true)]
    pub nworkers: String,
    /// A unique name for this worker (with --nworkers > 1, suffixed -0, -1, ...).
    #[arg(long)]
    pub name: Option<String>,
    /// Bytes of memory per worker: 4GB, 4GiB, 0.5 (of system memory), 0 (no limit) or auto.
    #[arg(long, default_value = "auto")]
    pub memory_limit: String,
    /// Abstract resources, e.g. "GPU=2 MEM=10e9".
    #[arg(long)]
    pub resources: Option<String>,
    /// Run each worker under a nanny, which restarts it when it dies (the default).
    #[arg(long, overrides_with = "no_nanny")]
    pub nanny: bool,
    /// Run the workers in this process, without a nanny.
    #[arg(long, overrides_with = "nanny")]
    pub no_nanny: bool,
    /// Port of the nanny's service (default: any free port; with --nworkers, one port each from here).
    #[arg(long, default_value_t = 0)]
    pub nanny_port: u16,
    /// Retire the worker gracefully after this long, e.g. 1h (default: config
    /// distributed.worker.lifetime.duration, never).
    #[arg(long)]
    pub lifetime: Option<String>,
    /// Spread lifetimes by up to this much either way, e.g. 5m, so workers do not all retire at once.
    #[arg(long)]
    pub lifetime_stagger: Option<String>,
    /// After its lifetime, the nanny starts a fresh worker in its place.
    #[arg(long)]
    pub lifetime_restart: bool,
    /// Directory for the worker's files.
    #[arg(long)]
    pub local_directory: Option<String>,
    /// How long to wait for the scheduler before giving up, e.g. 60, 10s, "1 minute" (default:
    /// keep trying).
    #[arg(long)]
    pub death_timeout: Option<String>,
    /// Host (or tcp://HOST) to listen on and advertise; 0.0.0.0 listens everywhere and
    /// advertises the address that routes to the scheduler (default: that address).
    #[arg(long)]
    pub host: Option<String>,
    /// Listen on this network interface's address (e.g. eth0, ib0) instead of --host.
    #[arg(long)]
    pub interface: Option<String>,
    /// Where to listen, tcp://HOST:PORT (with --contact-address, behind address translation).
    #[arg(long)]
    pub listen_address: Option<String>,
    /// The address to advertise to the scheduler and peers, tcp://HOST:PORT, when it is not
    /// the one listened on.
    #[arg(long)]
    pub contact_address: Option<String>,
    /// The protocol: tcp, or tls (needs --tls-ca-file, --tls-cert, --tls-key; given those, the
    /// worker is at a tls:// address anyway).
    #[arg(long)]
    pub protocol: Option<String>,
    /// The cluster's CA certificate (PEM): TLS with mutual authentication on every connection.
    /// Default: distributed.comm.tls.ca-file.
    #[arg(long)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// This worker's certificate (PEM), signed by the CA; may hold the key too. Default:
    /// distributed.comm.tls.worker.cert.
    #[arg(long)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// This worker's private key (PEM). Default: distributed.comm.tls.worker.key.
    #[arg(long)]
    pub tls_key: Option<std::path::PathBuf>,
    /// Port of the worker's data service: PORT, or a range FROM:TO whose first free port is
    /// taken (default 0: any free port; with --nworkers, PORT counts up, a range is shared).
    #[arg(long, default_value = "0")]
    pub worker_port: String,
    /// Load this plugin library (a cdylib built with dask::plugin_library!()) before
    /// connecting, so its task functions run here (repeatable; dask's --preload).
    #[arg(long)]
    pub preload: Vec<String>,
    /// Write the process id to this file (removed at exit).
    #[arg(long)]
    pub pid_file: Option<String>,
    /// Where each worker serves /health and /metrics (:PORT, PORT or HOST:PORT; :0 picks a
    /// free port; a port in use falls back to a free one).
    #[arg(long, default_value = ":0")]
    pub dashboard_address: String,
    /// Serve /health and /metrics (the default).
    #[arg(long, overrides_with = "no_dashboard")]
    pub dashboard: bool,
    /// Serve no HTTP.
    #[arg(long, overrides_with = "dashboard")]
    pub no_dashboard: bool,
    /// Log level: error, warn, info, debug, trace, or a filter (default: $RUST_LOG if set,
    /// else info).
    #[arg(long)]
    pub log_level: Option<String>,
}

/// Parses `GPU=2 MEM=10e9`.
pub fn parse_resources(s: &str) -> Result<Vec<(String, f64)>, String> {
    s.split([' ', ','])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').ok_or_else(|| format!("resource {p:?} is not NAME=AMOUNT"))?;
            let v: f64 = v.parse().map_err(|_| format!("resource {k}: {v:?} is not a number"))?;
            if k.is_empty() || !(v.is_finite() && v >= 0.0) {
                return Err(format!("resource {p:?}: give a name and an amount of zero or more, e.g. GPU=2"));
            }
            Ok((k.to_string(), v))
        })
        .collect()
}

/// Finds the scheduler: the argument, then `--scheduler-file`, then `$DASK_SCHEDULER_ADDRESS`.
/// A scheduler file that is not there yet is waited for (up to `wait`, if given), as dask's
/// workers do: batch job scripts start workers before their scheduler.
pub fn scheduler_address(arg: Option<&str>, file: Option<&str>, wait: Option<Duration>) -> Result<Address, String> {
    if let Some(a) = arg {
        return Address::parse(a, Some(dask_protocol::DEFAULT_SCHEDULER_PORT)).map_err(|e| e.to_string());
    }
    if let Some(f) = file {
        let started = std::time::Instant::now();
        let mut said = false;
        while !std::path::Path::new(f).exists() {
            if wait.is_some_and(|w| started.elapsed() >= w) {
                return Err(format!("the scheduler file {f} did not appear within the death timeout ({wait:?})"));
            }
            if !said {
                tracing::info!(file = %f, "waiting for the scheduler file to appear");
                said = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
    worker_main_as(args, &[], false)
}

/// Runs `dask-nanny`: `dask-worker` with one nanny per worker, always.
pub fn nanny_main() -> ExitCode {
    worker_main_as(std::env::args_os(), &[], true)
}

/// Runs the worker command line. `sub` is what must follow the program's path to run it again
/// as a worker (`["worker"]` for `dask worker`); `nanny_only` is `dask-nanny`'s spelling.
pub fn worker_main_as(args: impl IntoIterator<Item = std::ffi::OsString>, sub: &[&str], nanny_only: bool) -> ExitCode {
    let args = Args::parse_from(args);
    let program = if nanny_only { "dask-nanny" } else { "dask-worker" };
    match run_cli(args, sub, nanny_only) {
        Ok(code) => code,
        Err(e) => dask_protocol::cli::exit_code(program, Err(e)),
    }
}

/// Exit code of a worker that asks its nanny for a fresh worker.
const RESTART: u8 = dask_nanny::EXIT_RESTART as u8;

fn run_cli(mut args: Args, sub: &[&str], nanny_only: bool) -> Result<ExitCode, String> {
    dask_protocol::cli::init_logging_from(args.log_level.as_deref())?;
    let death_timeout = match &args.death_timeout {
        Some(d) => {
            Some(dask_protocol::config::parse_duration(d).map_err(|why| format!("--death-timeout {d:?} {why}"))?)
        }
        None => None,
    };
    let tls_asked = match &args.listen_address {
        Some(l) => dask_protocol::addr::asks_for_tls("--listen-address", Some(l), args.protocol.as_deref()),
        None => dask_protocol::addr::asks_for_tls("--host", args.host.as_deref(), args.protocol.as_deref()),
    }?;
    let scheduler = scheduler_address(args.scheduler.as_deref(), args.scheduler_file.as_deref(), death_timeout)?;
    // Where to listen and what to advertise, settled once: the nanny's children get it as is.
    let place = placement(&args, &scheduler)?;
    args.host = Some(place.host);
    if let Some(p) = place.port {
        args.worker_port = p.to_string();
    }
    let contact = place.contact;
    let settings = dask_protocol::config::Config::load().map_err(|e| e.to_string())?;
    let security = dask_protocol::tls::Security::from_flags_or_config(
        args.tls_ca_file.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        &settings,
        dask_protocol::tls::Role::Worker,
    )?;
    if security.is_none() && (scheduler.tls || tls_asked.is_some()) {
        return Err(format!(
            "{}: TLS needs credentials: pass --tls-ca-file, --tls-cert and --tls-key (or set distributed.comm.tls.*)",
            tls_asked.unwrap_or_else(|| scheduler.to_string())
        ));
    }
    // A worker started by a nanny knows it from the environment.
    let my_nanny = std::env::var(dask_nanny::NANNY_ENV).ok().filter(|a| !a.is_empty());
    if nanny_only && args.no_nanny && my_nanny.is_none() {
        return Err("dask-nanny always runs its worker under a nanny; use dask-worker --no-nanny for none".into());
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (nworkers, auto_threads) = workers_and_threads(&args.nworkers, cores)?;
    let nthreads = match args.nthreads {
        Some(0) | None => auto_threads,
        Some(n) => n,
    };
    let (memory_limit, capped) =
        memory_limit_for(&args.memory_limit, system_memory(), nthreads, cores).map_err(|e| e.to_string())?;
    if let Some(why) = capped {
        tracing::warn!("{why}");
    }
    let resources = match &args.resources {
        Some(r) => parse_resources(r).map_err(|why| format!("--resources {r:?}: {why}"))?,
        None => Vec::new(),
    };
    let lifetime = Lifetime::from_args(&args, &settings)?;
    let ports = port_range(&args.worker_port)?;
    // Plugin libraries load in the worker process (not in its nanny).
    if args.no_nanny || my_nanny.is_some() {
        for lib in &args.preload {
            let path = std::path::Path::new(lib);
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            crate::library::load(path, &crate::library::crate_name(name))
                .map_err(|why| format!("--preload {lib}: {why}"))?;
        }
    }
    let _pid_file = args.pid_file.as_deref().map(dask_protocol::cli::PidFile::write).transpose()?;
    let rt = dask_protocol::cli::runtime()?;
    if my_nanny.is_none() && !args.no_nanny {
        return rt.block_on(run_nannies(
            &args,
            scheduler,
            nworkers,
            nthreads,
            memory_limit,
            death_timeout,
            &settings,
            security,
            sub,
        ));
    }
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        dask_protocol::cli::cancel_on_signals(&shutdown);
        if my_nanny.is_some() {
            dask_nanny::stop_with_parent(shutdown.clone());
        }
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
            config.host = args.host.clone().unwrap_or_default();
            config.contact = contact.clone();
            config.security = security.clone();
            (config.port, config.port_to) = match ports {
                (0, None) => (0, None),
                (p, None) => (p + i as u16, None),
                range => range,
            };
            config.dashboard = if args.no_dashboard {
                None
            } else {
                Some(dask_protocol::http::parse_dashboard_address(
                    &args.dashboard_address,
                    args.host.as_deref().unwrap_or_default(),
                )?)
            };
            if let Some(d) = &args.local_directory {
                config.local_directory = d.clone();
            }
            config.death_timeout = death_timeout;
            config.nanny = my_nanny.clone();
            config.lifetime = lifetime.pick(i);
            config.lifetime_restart = lifetime.restart;
            config.resources = resources.clone();
            let (handle, run) = match server::start(config, shutdown.child_token()).await {
                Ok(started) => started,
                Err(server::WorkerError::Stopped) => return Ok(ExitCode::SUCCESS),
                // Refused (a name already taken): starting it again will not help.
                Err(e @ server::WorkerError::Refused(_)) if my_nanny.is_some() => {
                    eprintln!("dask-worker: error: {e}");
                    return Ok(ExitCode::from(dask_nanny::EXIT_FATAL as u8));
                }
                Err(e) => return Err(e.to_string()),
            };
            eprintln!("dask-worker: {} ({}) connected to {scheduler}", handle.address, handle.name);
            runs.push(tokio::spawn(run));
        }
        let mut code = ExitCode::SUCCESS;
        let mut error = None;
        for r in runs {
            match r.await {
                Ok(Ok(closed)) if closed.restart => code = ExitCode::from(RESTART),
                // A signal sent to the worker itself (not through its nanny: that one stops the
                // nanny first, which then ignores the code): a fresh worker takes its place, as
                // dask's nanny restarts a worker unless it was itself told to close.
                Ok(Ok(closed)) if closed.by_owner && my_nanny.is_some() => code = ExitCode::from(RESTART),
                Ok(Ok(_)) => {}
                // Under a nanny, a worker that lost its scheduler asks for a fresh one (which
                // waits for the scheduler to come back).
                Ok(Err(server::WorkerError::SchedulerLost(why))) if my_nanny.is_some() => {
                    tracing::warn!("{why}; exiting for the nanny to start a fresh worker");
                    code = ExitCode::from(RESTART);
                }
                Ok(Err(e)) => error = Some(e.to_string()),
                Err(e) => error = Some(format!("worker task failed: {e}")),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(code),
        }
    })
}

/// Where a worker listens and what it advertises.
struct Placement {
    host: String,
    /// From `--listen-address`: the port, over `--worker-port`.
    port: Option<u16>,
    contact: Option<Address>,
}

/// dask's `--host` (also `tcp://HOST`), `--interface`, `--listen-address`, `--contact-address`
/// and `--protocol`. Without any, the worker listens on (and advertises) the address that
/// routes to the scheduler.
fn placement(args: &Args, scheduler: &Address) -> Result<Placement, String> {
    let contact = match &args.contact_address {
        Some(c) => Some(Address::parse(c, None).map_err(|e| format!("--contact-address: {e}"))?),
        None => None,
    };
    if let Some(l) = &args.listen_address {
        if args.host.is_some() || args.interface.is_some() {
            return Err("give --listen-address, or --host/--interface, not both".into());
        }
        let a = Address::parse(l, None).map_err(|e| format!("--listen-address: {e}"))?;
        return Ok(Placement { host: a.host, port: Some(a.port), contact });
    }
    let host = match (&args.interface, &args.host) {
        (Some(_), Some(_)) => return Err("give --host or --interface, not both".into()),
        (Some(i), None) => {
            dask_protocol::addr::interface_ip(i).map_err(|e| format!("--interface {i}: {e}"))?.to_string()
        }
        (None, Some(h)) => dask_protocol::addr::host_of(h).map_err(|e| format!("--host {e}"))?,
        (None, None) => dask_protocol::addr::route_ip_to(&scheduler.host, scheduler.port)
            .map_or_else(|| "127.0.0.1".to_string(), |ip| ip.to_string()),
    };
    Ok(Placement { host, port: None, contact })
}

/// `--worker-port`: `PORT` or `FROM:TO`.
fn port_range(spec: &str) -> Result<(u16, Option<u16>), String> {
    let bad = || format!("--worker-port {spec:?}: give a port (18810) or a range (18810:18820)");
    match spec.split_once(':') {
        Some((a, b)) => {
            let (a, b): (u16, u16) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
            if a == 0 || b < a {
                return Err(bad());
            }
            Ok((a, Some(b)))
        }
        None => Ok((spec.trim().parse().map_err(|_| bad())?, None)),
    }
}

/// `--nworkers` as dask reads it: `N` (at least 1), `-1` (one per core) or `auto` (its
/// `nprocesses_nthreads`: up to 4 cores, one worker each; above, the smallest factor of the
/// cores at least their square root). Returns the workers and the default threads of each.
pub fn workers_and_threads(spec: &str, cores: usize) -> Result<(usize, usize), String> {
    let cores = cores.max(1);
    let n = match spec.trim() {
        "auto" => {
            if cores <= 4 {
                cores
            } else {
                let root = (cores as f64).sqrt();
                (1..=cores).find(|f| cores.is_multiple_of(*f) && *f as f64 >= root).unwrap_or(cores)
            }
        }
        s if s.starts_with('-') => match s.parse::<i64>() {
            // dask: -1 is one per core, -2 one fewer, ...
            Ok(n) if cores as i64 + 1 + n >= 1 => (cores as i64 + 1 + n) as usize,
            _ => return Err(format!("--nworkers {s}: leaves no worker on {cores} cores")),
        },
        s => match s.parse::<usize>() {
            Ok(0) => return Err("--nworkers 0 starts no worker: give 1 or more, -1 (one per core) or auto".into()),
            Ok(n) => n,
            Err(_) => return Err(format!("--nworkers {s:?} is not a number of workers (give N, -1 or auto)")),
        },
    };
    Ok((n, (cores / n).max(1)))
}

/// `--lifetime`, `--lifetime-stagger`, `--lifetime-restart` (or `distributed.worker.lifetime.*`).
struct Lifetime {
    duration: Option<Duration>,
    stagger: Duration,
    restart: bool,
}

impl Lifetime {
    fn from_args(args: &Args, settings: &dask_protocol::config::Config) -> Result<Lifetime, String> {
        let parse = |flag: &str, v: &Option<String>, key: &str| -> Result<Option<Duration>, String> {
            match v {
                Some(s) => {
                    dask_protocol::config::parse_duration(s).map(Some).map_err(|why| format!("{flag} {s:?} {why}"))
                }
                None => settings.duration(key).map_err(|e| e.to_string()),
            }
        };
        let duration = parse("--lifetime", &args.lifetime, "distributed.worker.lifetime.duration")?;
        let stagger = parse("--lifetime-stagger", &args.lifetime_stagger, "distributed.worker.lifetime.stagger")?
            .unwrap_or_default();
        let restart = args.lifetime_restart
            || settings.boolean("distributed.worker.lifetime.restart").map_err(|e| e.to_string())?.unwrap_or(false);
        Ok(Lifetime { duration, stagger, restart })
    }

    /// This worker's lifetime: the duration moved by up to the stagger either way (so that
    /// workers started together do not all retire together), as dask does.
    fn pick(&self, i: usize) -> Option<Duration> {
        let d = self.duration?;
        if self.stagger.is_zero() {
            return Some(d);
        }
        let seed = std::process::id() as u64
            ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        let frac = (seed % 10_001) as f64 / 10_000.0 * 2.0 - 1.0;
        Some(Duration::from_secs_f64((d.as_secs_f64() + frac * self.stagger.as_secs_f64()).max(0.0)))
    }
}

/// The default: one nanny per worker, each starting this program again as its worker (with the
/// same flags and `--no-nanny`), so a worker built from a user's crate runs under a nanny too.
#[allow(clippy::too_many_arguments)]
async fn run_nannies(
    args: &Args,
    scheduler: Address,
    nworkers: usize,
    nthreads: usize,
    memory_limit: u64,
    death_timeout: Option<Duration>,
    settings: &dask_protocol::config::Config,
    security: Option<dask_protocol::tls::Security>,
    sub: &[&str],
) -> Result<ExitCode, String> {
    let program = std::env::current_exe().map_err(|e| format!("failed to find this program to start workers: {e}"))?;
    let ports = port_range(&args.worker_port)?;
    let shutdown = CancellationToken::new();
    dask_protocol::cli::cancel_on_signals(&shutdown);
    let mut runs = Vec::new();
    for i in 0..nworkers {
        let name = match (&args.name, nworkers) {
            (Some(n), 1) => Some(n.clone()),
            (Some(n), _) => Some(format!("{n}-{i}")),
            (None, _) => None,
        };
        let mut child: Vec<std::ffi::OsString> = sub.iter().map(Into::into).collect();
        child.push(scheduler.to_string().into());
        let flags: Vec<String> = vec![
            "--no-nanny".into(),
            "--nthreads".into(),
            nthreads.to_string(),
            "--memory-limit".into(),
            memory_limit.to_string(),
            "--host".into(),
            args.host.clone().unwrap_or_default(),
        ];
        child.extend(flags.into_iter().map(Into::into));
        let mut opt = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                child.push(flag.into());
                child.push(v.into());
            }
        };
        opt("--name", name.clone());
        opt("--dashboard-address", (!args.no_dashboard).then(|| args.dashboard_address.clone()));
        opt(
            "--worker-port",
            match ports {
                (0, None) => None,
                (p, None) => Some((p + i as u16).to_string()),
                (a, Some(b)) => Some(format!("{a}:{b}")),
            },
        );
        for lib in &args.preload {
            opt("--preload", Some(lib.clone()));
        }
        opt("--contact-address", args.contact_address.clone());
        opt("--log-level", args.log_level.clone());
        opt("--local-directory", args.local_directory.clone());
        opt("--death-timeout", args.death_timeout.clone());
        opt("--resources", args.resources.clone());
        opt("--lifetime", args.lifetime.clone());
        opt("--lifetime-stagger", args.lifetime_stagger.clone());
        if args.lifetime_restart {
            child.push("--lifetime-restart".into());
        }
        if args.no_dashboard {
            child.push("--no-dashboard".into());
        }
        for (flag, path) in
            [("--tls-ca-file", &args.tls_ca_file), ("--tls-cert", &args.tls_cert), ("--tls-key", &args.tls_key)]
        {
            if let Some(p) = path {
                child.push(flag.into());
                child.push(p.into());
            }
        }
        let launcher =
            dask_nanny::ProcessLauncher { program: program.clone(), args: child, env: Vec::new(), stdout: true };
        let mut config =
            dask_nanny::NannyConfig::new(scheduler.clone(), name.clone().unwrap_or_else(|| format!("nanny-{i}")));
        config.apply_config(settings)?;
        config.host = args.host.clone().unwrap_or_default();
        config.port = if args.nanny_port != 0 { args.nanny_port + i as u16 } else { 0 };
        config.memory_limit = memory_limit;
        config.death_timeout = death_timeout;
        config.security = security.clone();
        let (handle, run) =
            dask_nanny::start(config, Box::new(launcher), shutdown.child_token()).await.map_err(|e| e.to_string())?;
        eprintln!("dask-worker: nanny at {} starting a worker for {scheduler}", handle.address);
        runs.push(tokio::spawn(run));
    }
    let mut error = None;
    for r in runs {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error = Some(e.to_string()),
            Err(e) => error = Some(format!("nanny task failed: {e}")),
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nworkers_reads_as_dask_reads_it() {
        assert_eq!(workers_and_threads("1", 8), Ok((1, 8)));
        assert_eq!(workers_and_threads("2", 8), Ok((2, 4)));
        assert_eq!(workers_and_threads("-1", 8), Ok((8, 1)));
        assert_eq!(workers_and_threads("-2", 8), Ok((7, 1)));
        assert!(workers_and_threads("-9", 8).is_err());
        // dask's nprocesses_nthreads: up to 4 cores one each; 8 -> 4 x 2, 12 -> 4 x 3, 16 -> 4 x 4.
        assert_eq!(workers_and_threads("auto", 2), Ok((2, 1)));
        assert_eq!(workers_and_threads("auto", 8), Ok((4, 2)));
        assert_eq!(workers_and_threads("auto", 12), Ok((4, 3)));
        assert_eq!(workers_and_threads("auto", 16), Ok((4, 4)));
        assert!(workers_and_threads("0", 8).unwrap_err().contains("starts no worker"));
        assert!(workers_and_threads("many", 8).unwrap_err().contains("is not a number of workers"));
    }

    #[test]
    fn nthreads_zero_and_death_timeout_spellings_parse() {
        let args = Args::parse_from(["dask-worker", "tcp://h:1", "--nthreads", "0", "--death-timeout", "1 minute"]);
        assert_eq!(args.nthreads, Some(0));
        assert_eq!(
            dask_protocol::config::parse_duration(args.death_timeout.as_deref().unwrap()),
            Ok(Duration::from_secs(60))
        );
        let args = Args::parse_from(["dask-worker", "--nworkers", "-1"]);
        assert_eq!(args.nworkers, "-1");
    }
}
