//! What the command lines (`dask-scheduler`, `dask-worker`) share.
use tokio_util::sync::CancellationToken;

/// Sends logs to stderr through `tracing`, filtered by `--log-level` when given (a level or a
/// filter such as `info,dask_scheduler=debug`), else by `$RUST_LOG` when set, else `info`.
pub fn init_logging(level: &str) -> Result<(), String> {
    init_logging_from(Some(level))
}

/// [`init_logging`] with `--log-level` possibly not given.
pub fn init_logging_from(level: Option<&str>) -> Result<(), String> {
    let filter = match (level, std::env::var("RUST_LOG")) {
        (Some(level), _) => tracing_subscriber::EnvFilter::try_new(level)
            .map_err(|e| format!("bad --log-level {level:?}: {e} (use error, warn, info, debug or trace)"))?,
        (None, Ok(spec)) if !spec.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&spec)
            .map_err(|e| format!("bad RUST_LOG {spec:?}: {e} (use error, warn, info, debug or trace)"))?,
        _ => tracing_subscriber::EnvFilter::new("info"),
    };
    // Colours only on a terminal: a log file (systemd, a nanny's child) gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    // The recent lines are kept too, for Client.get_scheduler_logs / get_worker_logs.
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(crate::logs::layer()).try_init();
    Ok(())
}

/// The runtime a command line runs on: two IO threads (tasks run on their own threads).
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("failed to start the async runtime: {e}"))
}

/// The exit status of a command line whose work returned `result`; errors go to stderr as
/// `program: error: ...`.
pub fn exit_code(program: &str, result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Cancels `shutdown` on Ctrl-C (SIGINT) or SIGTERM. Call from inside a tokio runtime.
pub fn cancel_on_signals(shutdown: &CancellationToken) {
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("interrupted: closing");
        signal.cancel();
    });
    #[cfg(unix)]
    {
        let signal = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                s.recv().await;
                tracing::info!("terminated: closing");
                signal.cancel();
            }
        });
    }
}

/// A file holding this process's id (`--pid-file`), removed when dropped.
#[derive(Debug)]
pub struct PidFile(std::path::PathBuf);

impl PidFile {
    pub fn write(path: &str) -> Result<PidFile, String> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("--pid-file {path}: cannot write it: {e}"))?;
        Ok(PidFile(path.into()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
