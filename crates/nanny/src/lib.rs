//! The nanny: supervises worker processes (restart on death, memory limits). A skeleton for
//! now; the issue that follows the end-to-end cluster (memory limits and restarts) fills it.
//! There is no `dask-nanny` binary yet, so nothing pretends to supervise.
