//! dask-rs cluster managers: [`LocalCluster`] (a scheduler and workers on this machine).
//!
//! This crate sits above the client, the scheduler and the worker: the client builds no server,
//! and `Client::new()` finds the local cluster it starts through [`dask_client::ClusterStarter`],
//! registered here.
mod adaptive;
mod local;
mod pool;
mod spec;

pub use adaptive::{AdaptOptions, Adaptive, Recommendation, Recommender, ScalableCluster};
pub use local::{LocalCluster, LocalClusterBuilder, init};
pub use spec::{Launch, SpecCluster, WorkerSpec};

fn start_default() -> dask_client::Result<dask_client::StartedCluster> {
    let cluster = LocalCluster::builder().build()?;
    Ok((cluster.scheduler_address(), Box::new(cluster)))
}

inventory::submit! { dask_client::ClusterStarter(start_default) }
