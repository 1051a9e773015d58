//! The `dask-scheduler` command line (dask's flags and defaults), as a library function so the
//! `dask scheduler` spelling can share it.
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::server::{self, SchedulerConfig};
use dask_protocol::config::{Config, parse_duration};

#[derive(Parser, Debug)]
#[command(name = "dask-scheduler", version, about = "Start a dask-rs scheduler")]
pub struct Args {
    /// Host (or tcp://HOST) to listen on (default: all interfaces, like dask; the address
    /// advertised is then the host's own, that others reach it by).
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Listen on this network interface's address (e.g. eth0, ib0) instead of --host.
    #[arg(long)]
    interface: Option<String>,
    /// The protocol: tcp, or tls (needs --tls-ca-file, --tls-cert, --tls-key; given those, the
    /// scheduler is at a tls:// address anyway). Default: the scheme of --host, else tcp.
    #[arg(long)]
    protocol: Option<String>,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = dask_protocol::DEFAULT_SCHEDULER_PORT)]
    port: u16,
    /// Write the scheduler's address to this JSON file, for workers and clients.
    #[arg(long)]
    scheduler_file: Option<std::path::PathBuf>,
    /// Where to serve HTTP: /health, /metrics (Prometheus), /info/*.json and /api/v1
    /// (:PORT, PORT or HOST:PORT; a port in use falls back to a free one).
    #[arg(long, default_value = ":8787")]
    dashboard_address: String,
    /// Serve HTTP (the default).
    #[arg(long, overrides_with = "no_dashboard")]
    dashboard: bool,
    /// Serve no HTTP.
    #[arg(long, overrides_with = "dashboard")]
    no_dashboard: bool,
    /// Silence after which a worker is removed, e.g. 300s or "5 minutes" (default: config
    /// distributed.scheduler.worker-ttl, 5 minutes).
    #[arg(long)]
    worker_ttl: Option<String>,
    /// A task that was running on more than this many workers that died is erred as
    /// killed-worker (default: config distributed.scheduler.allowed-failures, 3).
    #[arg(long)]
    allowed_failures: Option<u32>,
    /// Connections open at once, at most (default: config distributed.scheduler.max-connections,
    /// 10000, lowered to what the open-files limit allows).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Start this scheduler plugin with the scheduler (repeatable): the name of a plugin type
    /// built into this scheduler binary with dask::register_scheduler_plugin! (dask's
    /// --preload takes a Python module; here code ships in the binary).
    #[arg(long)]
    preload: Vec<String>,
    /// Close the scheduler once no task has been on its way for this long, e.g. 1h (dask's
    /// --idle-timeout).
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Write the process id to this file (removed at exit).
    #[arg(long)]
    pid_file: Option<String>,
    /// The cluster's CA certificate (PEM): the scheduler is then at a tls:// address and every
    /// connection is TLS with mutual authentication. Default: distributed.comm.tls.ca-file.
    #[arg(long)]
    tls_ca_file: Option<std::path::PathBuf>,
    /// The scheduler's certificate (PEM), signed by the CA; may hold the key too. Default:
    /// distributed.comm.tls.scheduler.cert.
    #[arg(long)]
    tls_cert: Option<std::path::PathBuf>,
    /// The scheduler's private key (PEM). Default: distributed.comm.tls.scheduler.key.
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
    /// Log level: error, warn, info, debug, trace, or a filter (default: $RUST_LOG if set,
    /// else info).
    #[arg(long)]
    log_level: Option<String>,
}

/// Runs `dask-scheduler` with the process's arguments.
pub fn scheduler_main() -> ExitCode {
    scheduler_main_from(std::env::args_os())
}

/// Runs `dask-scheduler` with these arguments (the first is the program name).
pub fn scheduler_main_from(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    dask_protocol::cli::exit_code("dask-scheduler", run(Args::parse_from(args)))
}

/// The scheduler's settings: flags over configuration (files, `DASK_*`) over defaults.
fn scheduler_config(args: &Args, settings: &Config) -> Result<SchedulerConfig, String> {
    let dashboard = if args.no_dashboard {
        None
    } else {
        Some(dask_protocol::http::parse_dashboard_address(&args.dashboard_address, &args.host)?)
    };
    let idle_timeout = match &args.idle_timeout {
        Some(t) => Some(parse_duration(t).map_err(|why| format!("--idle-timeout {t:?} {why}"))?),
        None => None,
    };
    let security = dask_protocol::tls::Security::from_flags_or_config(
        args.tls_ca_file.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        settings,
        dask_protocol::tls::Role::Scheduler,
    )?;
    let mut config = SchedulerConfig {
        scheduler_file: args.scheduler_file.clone(),
        preload: args.preload.clone(),
        dashboard,
        idle_timeout,
        security,
        ..Default::default()
    };
    config.apply_config(settings)?;
    if let Some(t) = &args.worker_ttl {
        let ttl = parse_duration(t).map_err(|why| format!("--worker-ttl {t:?} {why}"))?;
        if ttl.is_zero() {
            return Err("the worker TTL must be more than zero (e.g. --worker-ttl 300s)".into());
        }
        config.core.worker_ttl = ttl;
    }
    if let Some(n) = args.allowed_failures {
        config.core.allowed_failures = n;
    }
    let wanted = match args.max_connections {
        Some(n) => n,
        None => settings.uint("distributed.scheduler.max-connections").map_err(|e| e.to_string())?.unwrap_or(10_000)
            as usize,
    };
    if wanted == 0 {
        return Err("max-connections must be at least 1".into());
    }
    let fits = dask_protocol::serve::raise_fd_limit().unwrap_or(usize::MAX);
    if wanted > fits {
        tracing::warn!(
            wanted,
            fits,
            "max-connections is more than the open-files limit allows; using {fits} (raise `ulimit -n` / LimitNOFILE)"
        );
    }
    config.limits.max_connections = wanted.min(fits);
    if let Some(t) = settings.duration("distributed.scheduler.handshake-timeout").map_err(|e| e.to_string())? {
        config.limits.handshake_timeout = t.max(Duration::from_millis(100));
    }
    Ok(config)
}

fn run(mut args: Args) -> Result<(), String> {
    let tls_asked = dask_protocol::addr::asks_for_tls("--host", Some(&args.host), args.protocol.as_deref())?;
    args.host = match &args.interface {
        Some(i) => dask_protocol::addr::interface_ip(i).map_err(|e| format!("--interface {i}: {e}"))?.to_string(),
        None => dask_protocol::addr::host_of(&args.host).map_err(|e| format!("--host {e}"))?,
    };
    dask_protocol::cli::init_logging_from(args.log_level.as_deref())?;
    let settings = Config::load().map_err(|e| e.to_string())?;
    let config = scheduler_config(&args, &settings)?;
    if let (Some(asked), None) = (&tls_asked, &config.security) {
        return Err(format!(
            "{asked}: TLS needs credentials: pass --tls-ca-file, --tls-cert and --tls-key (or set \
             distributed.comm.tls.ca-file and distributed.comm.tls.scheduler.cert/.key)"
        ));
    }
    let _pid_file = args.pid_file.as_deref().map(dask_protocol::cli::PidFile::write).transpose()?;
    let rt = dask_protocol::cli::runtime()?;
    rt.block_on(async move {
        let bind = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&bind).await.map_err(|e| {
            format!("failed to listen on {bind}: {e}; is another scheduler running there? (try --port 0)")
        })?;
        let shutdown = CancellationToken::new();
        let (handle, fut) =
            server::run(listener, config, shutdown.clone()).await.map_err(|e| format!("failed to start: {e}"))?;
        // With --host 0.0.0.0, tell people the loopback address they can use.
        let shown = if args.host == "0.0.0.0" {
            format!("{}://127.0.0.1:{}", if handle.address.tls { "tls" } else { "tcp" }, handle.address.port)
        } else {
            handle.address.to_string()
        };
        tracing::info!(address = %shown, "scheduler at {shown}");
        eprintln!("dask-scheduler: listening at {shown}");
        dask_protocol::cli::cancel_on_signals(&shutdown);
        fut.await;
        Ok(())
    })
}
