//! The client's errors. A task's failure carries what the worker said.
use std::fmt;
use std::time::Duration;

/// A task that failed: its message, the function, the key whose failure caused it (a dependent
/// of a failed task carries the cause's key), and the worker it ran on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFailure {
    pub message: String,
    /// "error", "panic", "unknown-function", "bad-arguments", "killed-worker", "invalid-graph", ...
    pub kind: String,
    pub function: String,
    pub key: String,
    pub worker: String,
    /// Where it panicked: the worker thread's backtrace (empty unless it panicked).
    pub traceback: String,
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.function.is_empty() { String::new() } else { format!(" in {}", self.function) };
        let where_ = if self.worker.is_empty() { String::new() } else { format!(" on {}", self.worker) };
        write!(f, "task {}{what} failed{where_} ({}): {}", self.key, self.kind, self.message)
    }
}

impl From<dask_protocol::pb::TaskError> for TaskFailure {
    fn from(e: dask_protocol::pb::TaskError) -> Self {
        TaskFailure {
            message: e.message,
            kind: e.kind,
            function: e.function,
            key: e.key,
            worker: e.worker,
            traceback: e.traceback,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Task(Box<TaskFailure>),
    #[error(
        "failed to connect to the scheduler at {address} within {timeout:?}: {why}; is dask-scheduler running there?"
    )]
    Connect { address: String, timeout: Duration, why: String },
    #[error(transparent)]
    BadAddress(#[from] dask_protocol::addr::AddressError),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("future {key} was cancelled: {reason}")]
    Cancelled { key: String, reason: String },
    #[error("the value of {key} was lost: {why}")]
    Lost { key: String, why: String },
    #[error("lost the connection to the scheduler: {0}")]
    SchedulerLost(String),
    #[error("the client is closed")]
    Closed,
    #[error(transparent)]
    Codec(#[from] dask_protocol::codec::CodecError),
    #[error("failed to fetch {key} from the workers {workers:?}: {why}")]
    Fetch { key: String, workers: Vec<String>, why: String },
    /// A lock, queue, variable, dataset or metadata request the scheduler refused.
    #[error("{0}")]
    Refused(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("failed to start a local cluster: {0}")]
    Cluster(String),
    #[error("the scheduler refused the request: {0}")]
    Rpc(#[from] tonic::Status),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
