//! Starting workers: as processes, or (for a `LocalCluster` of threads) any other way.
use std::future::Future;
use std::pin::Pin;

use crate::supervisor::{ExitStatus, Signal};

/// A running worker, as the nanny sees it.
pub trait Child: Send {
    /// Its process id (for the memory monitor); `None` when it is not a process of its own.
    fn pid(&self) -> Option<u32>;
    /// Asks it to stop (`Term`) or ends it (`Kill`).
    fn signal(&mut self, signal: Signal);
    /// Resolves when it has ended (cancel-safe: it may be polled again after being dropped).
    fn wait(&mut self) -> Pin<Box<dyn Future<Output = ExitStatus> + Send + '_>>;
}

/// Starts workers. `nanny` is the nanny's address, which the worker passes to the scheduler
/// when it registers (for a process: in the environment variable [`crate::NANNY_ENV`]).
pub trait Launcher: Send {
    fn spawn(&mut self, nanny: &str) -> Result<Box<dyn Child>, String>;
}

/// Starts each worker as a process: `program args...`, with `env` and the nanny's address in
/// [`crate::NANNY_ENV`]. Its output goes where the nanny's goes.
#[derive(Clone, Debug)]
pub struct ProcessLauncher {
    pub program: std::path::PathBuf,
    pub args: Vec<std::ffi::OsString>,
    pub env: Vec<(String, String)>,
    /// Keep the worker's standard output (else it is discarded; its log goes to stderr anyway).
    pub stdout: bool,
}

impl Launcher for ProcessLauncher {
    fn spawn(&mut self, nanny: &str) -> Result<Box<dyn Child>, String> {
        let child = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(crate::NANNY_ENV, nanny)
            .env(crate::nanny::NANNY_PID_ENV, std::process::id().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(if self.stdout { std::process::Stdio::inherit() } else { std::process::Stdio::null() })
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.program.display()))?;
        Ok(Box::new(Process { child, status: None }))
    }
}

struct Process {
    child: tokio::process::Child,
    status: Option<ExitStatus>,
}

impl Child for Process {
    fn pid(&self) -> Option<u32> {
        if self.status.is_some() { None } else { self.child.id() }
    }

    fn signal(&mut self, signal: Signal) {
        match signal {
            Signal::Kill => {
                let _ = self.child.start_kill();
            }
            Signal::Term => {
                #[cfg(unix)]
                if let Some(pid) = self.child.id() {
                    let pid = nix::unistd::Pid::from_raw(pid as i32);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                }
                #[cfg(not(unix))]
                let _ = self.child.start_kill();
            }
        }
    }

    fn wait(&mut self) -> Pin<Box<dyn Future<Output = ExitStatus> + Send + '_>> {
        Box::pin(async move {
            if let Some(s) = self.status {
                return s;
            }
            let status = match self.child.wait().await {
                Ok(s) => exit_status(s),
                Err(_) => ExitStatus::Code(-1),
            };
            self.status = Some(status);
            status
        })
    }
}

fn exit_status(s: std::process::ExitStatus) -> ExitStatus {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = s.signal() {
            return ExitStatus::Signal(sig);
        }
    }
    ExitStatus::Code(s.code().unwrap_or(-1))
}
