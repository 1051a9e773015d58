//! The `dask-scheduler` command line (dask's flags and defaults), as a library function so the
//! `dask scheduler` spelling can share it.
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::server::{self, SchedulerConfig};

#[derive(Parser, Debug)]
#[command(name = "dask-scheduler", version, about = "Start a dask-rs scheduler")]
pub struct Args {
    /// Host to listen on (default: all interfaces, like dask).
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = dask_protocol::DEFAULT_SCHEDULER_PORT)]
    port: u16,
    /// Write the scheduler's address to this JSON file, for workers and clients.
    #[arg(long)]
    scheduler_file: Option<std::path::PathBuf>,
    /// Accepted for compatibility; the dashboard is not implemented yet.
    #[arg(long, default_value = ":8787")]
    dashboard_address: String,
    /// Accepted for compatibility; the dashboard is not implemented yet.
    #[arg(long)]
    no_dashboard: bool,
    /// Seconds of silence after which a worker is removed (dask: distributed.scheduler.worker-ttl).
    #[arg(long, default_value_t = 300.0)]
    worker_ttl: f64,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// Runs `dask-scheduler` with the process's arguments.
pub fn scheduler_main() -> ExitCode {
    scheduler_main_from(std::env::args_os())
}

/// Runs `dask-scheduler` with these arguments (the first is the program name).
pub fn scheduler_main_from(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    dask_protocol::cli::exit_code("dask-scheduler", run(Args::parse_from(args)))
}

fn run(args: Args) -> Result<(), String> {
    dask_protocol::cli::init_logging(&args.log_level)?;
    if !(args.worker_ttl.is_finite() && args.worker_ttl > 0.0) {
        return Err(format!("--worker-ttl {} must be a positive number of seconds", args.worker_ttl));
    }
    let mut config = SchedulerConfig { scheduler_file: args.scheduler_file.clone(), ..Default::default() };
    config.core.worker_ttl = Duration::from_secs_f64(args.worker_ttl);
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
            format!("tcp://127.0.0.1:{}", handle.address.port)
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
