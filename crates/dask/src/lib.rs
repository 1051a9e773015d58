//! dask-rs: the dask.distributed model in Rust.
//!
//! ```no_run
//! use dask::Client;
//!
//! #[dask::task]
//! fn inc(x: i64) -> i64 { x + 1 }
//!
//! fn main() -> dask::Result<()> {
//!     let client = Client::new()?;                 // a LocalCluster on this machine
//!     let a = client.submit(inc, (1,))?;           // Future<i64>, returns at once
//!     let many = client.map(inc, 0..100)?;        // Vec<Future<i64>>
//!     assert_eq!(a.result()?, 2);
//!     let all: Vec<i64> = client.gather(&many)?;
//!     assert_eq!(all[99], 100);
//!     Ok(())
//! }
//! ```
//!
//! A worker binary that knows your own functions is `fn main() -> ExitCode { dask::worker_main() }`
//! in a crate that defines them.
/// Byte buffers that move without copies: a task that returns `Bytes`, a `Bytes` parameter fed
/// by another task, `scatter` of a `Bytes` and a `Future<Bytes>`'s result all share one buffer
/// in each process (values are stored raw, with codec `"bytes"`). `Vec<u8>` and
/// `serde_bytes::ByteBuf` are stored raw too, but are copied when read.
pub use bytes::Bytes;
pub use dask_client::*;
pub use dask_cluster::{
    AdaptOptions, Adaptive, Launch, LocalCluster, LocalClusterBuilder, Recommendation, Recommender, ScalableCluster,
    SpecCluster, WorkerSpec, init,
};
pub use dask_macros::task;
pub use dask_worker::worker_main;

/// Inside a task: the worker running it and its client, and giving back the thread slot while
/// waiting on subtasks (dask's `get_worker`, `get_client`, `worker_client`, `secede`, `rejoin`).
/// In a function run by `Client::run_on_scheduler`: a snapshot of the scheduler.
pub use dask_scheduler::server::get_scheduler;

/// dask's `raise Reschedule()`: in a task, ends it at once; the scheduler runs it again, placed
/// anew.
pub use dask_protocol::task::reschedule;

/// Worker, scheduler and nanny plugins (dask's `WorkerPlugin`, `SchedulerPlugin`, `NannyPlugin`), registered in the
/// program that runs them, and `plugin_library!()` for a library `Client::upload_file` sends.
pub use dask_protocol::plugin::{NannyPlugin, SchedulerPlugin, WorkerPlugin};
/// Registers an actor type (`impl dask::Actor`) so workers of this program can host it.
pub use dask_protocol::register_actor;
/// TLS credentials for a cluster (dask's `Security`): `Security::temporary()` or `Security::from_files`.
pub use dask_protocol::tls::Security;
pub use dask_protocol::{plugin_library, register_nanny_plugin, register_scheduler_plugin, register_worker_plugin};
pub use dask_worker::context::{TaskWorker, WorkerClient, get_client, get_worker, rejoin, secede, worker_client};

/// Built-in task functions of the stock `dask-worker` (`inc`, `add`, `sum`, `slowinc`, ...).
pub use dask_worker::builtins;

#[doc(hidden)]
pub use dask_protocol::__private;
