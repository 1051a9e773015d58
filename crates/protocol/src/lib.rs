//! The dask-rs wire and the pieces every component shares.
//!
//! * [`pb`]: code generated from `proto/dask.proto` (the only definition of the wire).
//! * [`task`]: the [`Task`](task::Task) trait, the function registry filled by `#[task]`, and
//!   the argument tree that a worker turns into a function's typed arguments without copying
//!   dependency values.
//! * [`codec`]: how values are encoded (msgpack for Rust tasks, raw for byte buffers); values
//!   are opaque to the scheduler.
//! * [`data`]: data connections, on which values move between workers and clients.
//! * [`config`]: dask's configuration (YAML files, `DASK_*` variables, dask's key names).
//! * [`addr`]: `tcp://host:port` addresses, parsed with errors a user can act on.
//! * [`tokenize`]: the stable hash behind `pure` keys (`inc-<32 hex digits>`).

pub mod actor;
pub mod addr;
pub mod cli;
pub mod codec;
pub mod config;
pub mod data;
pub mod http;
pub mod library;
pub mod logs;
pub mod plugin;
pub mod serve;
pub mod sys;
pub mod task;
pub mod ticket;
pub mod tls;
pub mod tokenize;

/// Generated tonic/prost code (package `dask.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("dask.v1");
}

/// Largest gRPC message any component accepts, and the largest header on a data connection.
/// Values never travel in gRPC messages (see [`data`]); the cap only bounds control batches (a
/// graph of a million tasks is sent in several batches).
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// `e` and its sources, joined: tonic's top-level transport errors say little.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

/// The innermost cause of `e` (tonic's outer layers repeat each other).
pub fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The default scheduler port, as in dask.
pub const DEFAULT_SCHEDULER_PORT: u16 = 8786;

/// Re-exports used by code that `#[task]` generates. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::task::{Registration, Task};
    pub use inventory;
    pub use std::string::{String, ToString};
}
