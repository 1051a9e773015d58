//! The dask-rs client: the dask.distributed API in Rust.
//!
//! * [`Client`]: connect (or start a `LocalCluster`, from the `dask` crate), `submit`, `map`, `gather`, `scatter`,
//!   `get` of a [`Graph`], queries.
//! * [`Future`]: a remote result; `result()`, `.await`, `status()`, `cancel()`; dropping the
//!   last handle releases the key on the cluster.
//! * [`wait`], [`as_completed`]: waiting on many futures.
//!
//! See `docs/client.md`.
mod actor;
mod args;
mod client;
mod coord;
mod error;
mod future;
mod gather;
mod graph;
mod keys;
mod options;
mod plugins;
mod progress;
mod replay;
mod replies;
mod run;
mod wait;

pub use actor::ActorHandle;
pub use args::{IntoArg, IntoArgs, OneArg};
pub use client::{
    CONNECT_TIMEOUT, Client, ClusterStarter, PrefixProfile, RESTART_TIMEOUT, StartedCluster, TaskStreamRecorder,
    Versions, profile_of,
};
pub use coord::{Datasets, Event, Lock, LockGuard, Pub, Queue, Semaphore, Shared, Sub, Variable};
pub use dask_protocol::actor::Actor;
pub use error::{Error, Result, TaskFailure};
pub use future::{Future, FutureStatus};
pub use gather::{Errors, Gatherable, futures_of};
pub use graph::{Graph, KeyTree, Nested, Ref};
pub use options::{FIFO_TIMEOUT, ScatterOptions, SubmitOptions};
pub use plugins::PluginOptions;
pub use progress::{PerformanceReport, PrefixProgress, progress};
pub use replay::FailedTask;
pub use run::{OnError, RunOptions, RunningTask};
pub use wait::{AsCompleted, ReturnWhen, WaitResult, as_completed, wait};

/// Scheduler and worker descriptions returned by `scheduler_info`.
pub use dask_protocol::pb::{SchedulerInfo, StoryLine, TaskRecord, WorkerInfo};
