//! The worker's HTTP side (`--dashboard-address`, dask's worker dashboard port): `/health` and
//! `/metrics` (Prometheus, dask's `dask_worker_*` names). It reads what the worker's loop
//! publishes with each heartbeat; it never waits on the loop.
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use dask_protocol::http::{METRICS_CONTENT_TYPE, Metrics};
use dask_protocol::pb;
use parking_lot::Mutex;

/// What the loop last published.
#[derive(Debug, Default)]
pub(crate) struct Published {
    /// When the loop last published (with its heartbeat); `None` until it registered.
    pub(crate) at: Option<std::time::Instant>,
    pub(crate) heartbeat: pb::Heartbeat,
    pub(crate) nthreads: usize,
    pub(crate) memory_limit: u64,
}

pub(crate) type Shared = Arc<Mutex<Published>>;

pub(crate) fn router(shared: Shared) -> Router {
    Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(shared)
}

/// `ok` once the worker is registered and while its loop heartbeats; 503 before, or when its
/// loop has not for 30 s (readiness and liveness probes).
async fn health(State(shared): State<Shared>) -> axum::response::Response {
    use axum::http::StatusCode;
    let at = shared.lock().at;
    match at {
        None => (StatusCode::SERVICE_UNAVAILABLE, "not registered with the scheduler yet").into_response(),
        Some(at) if at.elapsed() > std::time::Duration::from_secs(30) => {
            let why = format!("the worker's loop has not heartbeated for {:.0} s", at.elapsed().as_secs_f64());
            (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
        }
        Some(_) => "ok".into_response(),
    }
}

async fn metrics(State(shared): State<Shared>) -> impl IntoResponse {
    let (hb, nthreads, limit) = {
        let p = shared.lock();
        (p.heartbeat, p.nthreads, p.memory_limit)
    };
    let mut m = Metrics::default();
    m.family("dask_worker_tasks", "gauge", "Number of tasks at worker");
    m.sample("dask_worker_tasks", &[("state", "executing")], hb.executing as f64);
    m.sample("dask_worker_tasks", &[("state", "memory")], hb.in_memory as f64);
    m.single("dask_worker_threads", "gauge", "Number of worker threads", nthreads as f64);
    m.family("dask_worker_memory_bytes", "gauge", "Memory breakdown");
    m.sample("dask_worker_memory_bytes", &[("type", "managed")], hb.managed as f64);
    m.sample("dask_worker_memory_bytes", &[("type", "unmanaged")], hb.memory.saturating_sub(hb.managed) as f64);
    m.sample("dask_worker_memory_bytes", &[("type", "spilled")], hb.spilled as f64);
    m.single("dask_worker_memory_limit_bytes", "gauge", "The worker's memory limit (0: none) (dask-rs)", limit as f64);
    m.single("dask_worker_spilled_keys", "gauge", "Values on disk now (dask-rs)", hb.spilled_count as f64);
    m.family("dask_worker_spill_bytes_total", "counter", "Total size of spilled/unspilled data");
    m.sample("dask_worker_spill_bytes_total", &[("activity", "disk_write")], hb.spilled_total as f64);
    m.single(
        "dask_worker_paused",
        "gauge",
        "1 while the worker is paused over its memory limit (dask-rs)",
        f64::from(u8::from(hb.paused)),
    );
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], m.finish())
}
