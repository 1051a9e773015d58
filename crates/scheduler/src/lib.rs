//! The dask-rs scheduler.
//!
//! * [`core`]: the pure state machine (no IO, no clock): events in, commands out.
//! * [`server`]: the tonic shell: worker and client streams, queries, the event loop that
//!   owns the core.
//!
//! See `docs/scheduler.md`.
pub mod cli;
pub mod coord;
pub mod core;
pub mod server;
