//! The nanny: supervises one worker process, as dask's `Nanny` does. It starts the worker,
//! restarts it when it dies (at once if it had lived 10 s, else after a backoff that grows from
//! 1 s to 30 s; it gives up after 5 exits in a row before the worker registered), kills it when
//! its memory passes `terminate`, tells the scheduler why each worker ended, and takes restart
//! and close requests from the scheduler (its stream) and on its own port (`--nanny-port`).
//!
//! * [`supervisor`]: the decisions, pure (events in, commands out), tested without processes.
//! * [`launcher`]: how a worker is started: a process ([`ProcessLauncher`]), or anything else
//!   that implements [`Launcher`] (a `LocalCluster` of threads starts workers in-process).
//! * [`nanny`]: the shell: the scheduler stream, the nanny's gRPC service, the memory monitor,
//!   the loop that feeds the supervisor.
//!
//! `dask-worker` runs one nanny per `--nworkers` by default (`--no-nanny` runs workers in its own
//! process); `dask-nanny` is the same program with one nanny. See `docs/nanny.md`.
pub mod launcher;
pub mod nanny;
mod plugins;
pub mod supervisor;

pub use launcher::{Child, Launcher, ProcessLauncher};
pub use nanny::{NANNY_ENV, NannyConfig, NannyError, NannyHandle, start, stop_with_parent};
pub use supervisor::{EXIT_FATAL, EXIT_RESTART, ExitStatus, Policy, Signal};
