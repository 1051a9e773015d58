//! The dask-rs worker.
//!
//! * [`state`]: the pure state machine (events in, instructions out).
//! * [`executor`]: the thread pool tasks run on.
//! * [`store`]: the values held here, in memory or spilled to disk.
//! * [`memory`]: the memory limit and the memory policy (pure).
//! * [`server`]: the shell: scheduler stream, data service, fetches from peers.
//! * [`builtins`]: task functions every stock `dask-worker` has.
//! * [`cli`]: the `dask-worker` command line, as a library function so a user's own worker
//!   binary (with their own `#[dask::task]` functions) is one line: `dask::worker_main()`.
//!
//! See `docs/worker.md`.
mod actors;
pub mod builtins;
pub mod cli;
pub mod context;
pub mod executor;
pub mod library;
pub mod memory;
mod plugins;
pub mod server;
pub mod state;
pub mod store;

pub use cli::worker_main;
pub use server::{Closed, WorkerConfig, WorkerError, WorkerHandle, start};
