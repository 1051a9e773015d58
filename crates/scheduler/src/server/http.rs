//! The scheduler's HTTP side (`--dashboard-address`, default `:8787`): the live dashboard
//! (`/status`, in `dashboard.rs`), `/health`, `/metrics` (Prometheus, dask's metric names where
//! dask has them), `/info/*.json`, and the `/api/v1` routes dask's Kubernetes operator calls.
//! Out of the core: handlers ask the event loop for a [`Snapshot`] (built at most every 250 ms
//! however many ask) or for an operation (retire), as gRPC calls do; nothing here holds the loop.
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dask_protocol::http::{METRICS_CONTENT_TYPE, Metrics};
use dask_protocol::pb;
use serde_json::{Value as JsonValue, json};

use super::task_stream::TaskStream;
use super::{EventLoop, LoopMsg, Query, SchedulerHandle};
use crate::core::{PrefixCounts, TASK_STATES};

/// What the HTTP side reads: the scheduler as the event loop last described it.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    pub(super) info: pb::SchedulerInfo,
    pub(super) clients: usize,
    /// Tasks by key prefix and state ([`TASK_STATES`] order), now and since the start.
    pub(super) prefix_states: Vec<PrefixCounts>,
    pub(super) desired_workers: usize,
    /// Since when nothing has been on its way to memory (seconds since the epoch).
    pub(super) idle_since: Option<f64>,
    pub(super) loop_stats: LoopStats,
}

/// The event loop's own load.
#[derive(Clone, Debug, Default)]
pub(super) struct LoopStats {
    /// Wake-ups handled, and the time spent handling them.
    pub(super) wakeups: u64,
    pub(super) busy: Duration,
    /// Periodic (1 s) ticks, and the longest gap between two over the last [`TICK_WINDOW`]
    /// ticks: over a second by as much as the loop was held up.
    pub(super) ticks: u64,
    pub(super) tick_max: Duration,
    /// The last gaps between ticks, newest last.
    gaps: std::collections::VecDeque<Duration>,
}

/// Ticks (one a second) whose gaps `tick_max` covers: a scrape every 15 or 30 s sees every
/// stall, however often the dashboard reads it.
const TICK_WINDOW: usize = 60;

impl LoopStats {
    pub(super) fn note_tick_gap(&mut self, gap: Duration) {
        if self.gaps.len() == TICK_WINDOW {
            self.gaps.pop_front();
        }
        self.gaps.push_back(gap);
        self.tick_max = self.gaps.iter().copied().max().unwrap_or_default();
    }
}

/// When the event loop last ticked (seconds since the epoch, as the bits of an f64): `/health`
/// says the scheduler is stuck when it has not ticked for [`STUCK_AFTER`].
pub(super) type LastTick = Arc<std::sync::atomic::AtomicU64>;

const STUCK_AFTER: Duration = Duration::from_secs(30);

/// How long `POST /api/v1/retire_workers` waits for the retirement to finish.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(300);

impl EventLoop {
    /// The snapshot for the HTTP side (which asks for one at a time, at most every 250 ms).
    pub(super) fn snapshot(&self) -> Arc<Snapshot> {
        let desired = self.core.adaptive_target_within(Duration::from_secs(5), 0, usize::MAX).target;
        Arc::new(Snapshot {
            info: self.info(),
            clients: self.clients.len(),
            prefix_states: self.core.prefix_states(),
            desired_workers: desired,
            // As of now, not of the last tick: work since then means not idle.
            idle_since: (self.core.is_idle() && self.activity == self.activity_seen)
                .then_some(self.idle_since)
                .flatten()
                .map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()),
            loop_stats: self.loop_stats.clone(),
        })
    }

    /// On each tick: when the scheduler went idle (dask's `check_idle`). Work that came and
    /// went between two ticks (`activity` moved) starts the idle time again.
    pub(super) fn note_idle(&mut self) {
        let moved = self.activity != self.activity_seen;
        self.activity_seen = self.activity;
        if self.core.is_idle() && !moved {
            self.idle_since.get_or_insert_with(SystemTime::now);
        } else {
            self.idle_since = None;
        }
    }
}

#[derive(Clone)]
pub(super) struct Http {
    pub(super) handle: SchedulerHandle,
    pub(super) stream: Arc<TaskStream>,
    last_tick: LastTick,
    /// The live dashboard's updates.
    pub(super) feed: Arc<super::dashboard::Feed>,
    /// The last snapshot: requests within 250 ms of it share it, and one request at a time asks
    /// the loop for a new one (a flood of clients is one message to the loop, not a flood).
    cache: Arc<tokio::sync::Mutex<Cached>>,
}

/// The last snapshot and when it came.
type Cached = Option<(Instant, Arc<Snapshot>)>;

/// The routes, over a running scheduler; `api`: dask's `/api/v1` routes too (opt-in, as in
/// dask: `distributed.scheduler.http.routes` lists `distributed.http.scheduler.api`).
pub(super) fn router(handle: SchedulerHandle, stream: Arc<TaskStream>, last_tick: LastTick, api: bool) -> Router {
    let mut r = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/info/workers.json", get(workers))
        .route("/info/tasks.json", get(tasks))
        .route("/info/versions.json", get(versions))
        .merge(super::dashboard::routes());
    if api {
        r = r
            .route("/api/v1", get(|| async { "API V1" }))
            .route("/api/v1/get_workers", get(get_workers))
            .route("/api/v1/adaptive_target", get(adaptive_target))
            .route("/api/v1/check_idle", get(check_idle))
            .route("/api/v1/retire_workers", post(retire_workers));
    }
    r.with_state(Http { handle, stream, last_tick, feed: Default::default(), cache: Default::default() })
}

/// `ok` while the event loop ticks; 503 once it has not for 30 s (a wedged scheduler fails its
/// liveness probe).
async fn health(State(h): State<Http>) -> Response {
    let last = f64::from_bits(h.last_tick.load(std::sync::atomic::Ordering::Relaxed));
    if last > 0.0 && dask_protocol::sys::epoch_secs() - last > STUCK_AFTER.as_secs_f64() {
        let why =
            format!("the scheduler's event loop has not ticked for {:.0} s", dask_protocol::sys::epoch_secs() - last);
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    }
    "ok".into_response()
}

impl Http {
    /// The scheduler as the event loop last described it: requests within 250 ms share one
    /// snapshot, and one request at a time asks the loop for a new one.
    pub(super) async fn snapshot(&self) -> Result<Arc<Snapshot>, Response> {
        let mut cache = self.cache.lock().await;
        if let Some((at, s)) = cache.as_ref()
            && at.elapsed() < Duration::from_millis(250)
        {
            return Ok(s.clone());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || (StatusCode::SERVICE_UNAVAILABLE, "the scheduler is closing").into_response();
        self.handle.tx.send(LoopMsg::Query(Query::Snapshot(tx))).map_err(|_| gone())?;
        let s = rx.await.map_err(|_| gone())?;
        *cache = Some((Instant::now(), s.clone()));
        Ok(s)
    }
}

async fn metrics(State(h): State<Http>) -> Response {
    let s = match h.snapshot().await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut m = Metrics::default();
    m.single("dask_scheduler_clients", "gauge", "Number of clients connected", s.clients as f64);
    m.single(
        "dask_scheduler_desired_workers",
        "gauge",
        "Number of workers scheduler needs for task graph",
        s.desired_workers as f64,
    );
    let workers = &s.info.workers;
    let paused = workers.iter().filter(|w| w.status != "running").count();
    let idle = workers.iter().filter(|w| w.status == "running" && w.processing == 0).count();
    let saturated = workers.iter().filter(|w| w.status == "running" && w.processing >= w.nthreads.max(1)).count();
    let partial = workers.len() - paused - idle - saturated;
    m.family("dask_scheduler_workers", "gauge", "Number of workers known by scheduler");
    for (state, n) in
        [("idle", idle), ("partially_saturated", partial), ("saturated", saturated), ("paused_or_retiring", paused)]
    {
        m.sample("dask_scheduler_workers", &[("state", state)], n as f64);
    }
    m.family("dask_scheduler_tasks", "gauge", "Number of tasks known by scheduler");
    for (i, state) in TASK_STATES.iter().enumerate() {
        let n: u64 = s.prefix_states.iter().map(|p| p.now[i]).sum();
        m.sample("dask_scheduler_tasks", &[("state", state)], n as f64);
    }
    m.family("dask_scheduler_prefix_tasks", "gauge", "Tasks of each task prefix in each state now (dask-rs)");
    for p in &s.prefix_states {
        for (i, state) in TASK_STATES.iter().enumerate() {
            if p.now[i] > 0 {
                m.sample(
                    "dask_scheduler_prefix_tasks",
                    &[("task_prefix_name", &p.name), ("state", state)],
                    p.now[i] as f64,
                );
            }
        }
    }
    m.family("dask_scheduler_prefix_state_totals", "counter", "Accumulated count of task prefix in each state");
    for p in &s.prefix_states {
        for (i, state) in TASK_STATES.iter().enumerate() {
            if p.entered[i] > 0 {
                m.sample(
                    "dask_scheduler_prefix_state_totals",
                    &[("task_prefix_name", &p.name), ("state", state)],
                    p.entered[i] as f64,
                );
            }
        }
    }
    let totals = h.stream.prefix_totals();
    m.family(
        "dask_scheduler_tasks_compute_seconds_total",
        "counter",
        "Total amount of compute time spent in each prefix",
    );
    for (prefix, t) in &totals {
        m.sample("dask_scheduler_tasks_compute_seconds_total", &[("task_prefix_name", prefix)], t.compute_s);
    }
    m.family(
        "dask_scheduler_tasks_transfer_seconds_total",
        "counter",
        "Total amount of transfer time spent in each prefix",
    );
    for (prefix, t) in &totals {
        m.sample("dask_scheduler_tasks_transfer_seconds_total", &[("task_prefix_name", prefix)], t.transfer_s);
    }
    m.family("dask_scheduler_worker_memory_bytes", "gauge", "Memory of the workers, in all, by kind (dask-rs)");
    for (kind, f) in [
        ("managed", (|w: &pb::WorkerInfo| w.memory_managed) as fn(&pb::WorkerInfo) -> u64),
        ("unmanaged", |w| w.memory_unmanaged),
        ("spilled", |w| w.memory_spilled),
    ] {
        m.sample("dask_scheduler_worker_memory_bytes", &[("type", kind)], workers.iter().map(f).sum::<u64>() as f64);
    }
    let st = &s.loop_stats;
    m.single(
        "dask_scheduler_tick_count_total",
        "counter",
        "Total number of ticks observed since the server started",
        st.ticks as f64,
    );
    m.single(
        "dask_scheduler_tick_duration_maximum_seconds",
        "gauge",
        "Longest gap between two ticks (due every second) lately: past 1 s by as much as the loop was held up",
        st.tick_max.as_secs_f64(),
    );
    m.single(
        "dask_scheduler_event_loop_wakeups_total",
        "counter",
        "Times the event loop woke to handle messages (dask-rs)",
        st.wakeups as f64,
    );
    m.single(
        "dask_scheduler_event_loop_busy_seconds_total",
        "counter",
        "Time the event loop spent handling messages (dask-rs)",
        st.busy.as_secs_f64(),
    );
    m.single(
        "dask_scheduler_steals_total",
        "counter",
        "Tasks moved by work stealing (dask-rs)",
        s.info.steals_done as f64,
    );
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], m.finish()).into_response()
}

fn worker_json(w: &pb::WorkerInfo) -> JsonValue {
    json!({
        "address": w.address,
        "name": w.name,
        "nthreads": w.nthreads,
        "memory_limit": w.memory_limit,
        "status": w.status,
        "processing": w.processing,
        "in_memory": w.in_memory,
        "memory": {
            "process": w.memory_process,
            "managed": w.memory_managed,
            "unmanaged": w.memory_unmanaged,
            "spilled": w.memory_spilled,
        },
        "nanny": w.nanny,
        "pid": w.pid,
        "local_directory": w.local_directory,
        "version": w.version,
    })
}

async fn workers(State(h): State<Http>) -> Response {
    match h.snapshot().await {
        Ok(s) => Json(json!({ "workers": s.info.workers.iter().map(worker_json).collect::<Vec<_>>() })).into_response(),
        Err(r) => r,
    }
}

async fn tasks(State(h): State<Http>) -> Response {
    let s = match h.snapshot().await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let by_state = |counts: &[u64; TASK_STATES.len()]| -> serde_json::Map<String, JsonValue> {
        TASK_STATES.iter().zip(counts).map(|(st, n)| (st.to_string(), json!(n))).collect()
    };
    let mut total = [0u64; TASK_STATES.len()];
    for p in &s.prefix_states {
        for (t, n) in total.iter_mut().zip(&p.now) {
            *t += n;
        }
    }
    let prefixes: serde_json::Map<String, JsonValue> = s
        .prefix_states
        .iter()
        .filter(|p| p.now.iter().any(|n| *n > 0))
        .map(|p| (p.name.to_string(), JsonValue::Object(by_state(&p.now))))
        .collect();
    Json(json!({ "tasks": s.info.tasks, "states": by_state(&total), "prefixes": prefixes })).into_response()
}

async fn versions(State(h): State<Http>) -> Response {
    match h.snapshot().await {
        Ok(s) => {
            let workers: serde_json::Map<String, JsonValue> =
                s.info.workers.iter().map(|w| (w.address.clone(), json!(w.version))).collect();
            Json(json!({ "scheduler": s.info.version, "workers": workers })).into_response()
        }
        Err(r) => r,
    }
}

async fn get_workers(State(h): State<Http>) -> Response {
    match h.snapshot().await {
        Ok(s) => Json(json!({
            "num_workers": s.info.workers.len(),
            "workers": s.info.workers.iter().map(|w| json!({"name": w.name, "address": w.address})).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(r) => r,
    }
}

async fn adaptive_target(State(h): State<Http>) -> Response {
    match h.snapshot().await {
        Ok(s) => Json(json!({ "workers": s.desired_workers })).into_response(),
        Err(r) => r,
    }
}

async fn check_idle(State(h): State<Http>) -> Response {
    match h.snapshot().await {
        Ok(s) => Json(json!({ "idle_since": s.idle_since })).into_response(),
        Err(r) => r,
    }
}

/// dask's `POST /api/v1/retire_workers` with `{"workers": [...]}` (names or addresses) or
/// `{"n": k}` (the scheduler picks k idle ones); answers with the workers retired, by address,
/// each with its `name` (the Kubernetes operator deletes pods by name).
async fn retire_workers(State(h): State<Http>, body: axum::body::Bytes) -> Response {
    let bad = |why: String| (StatusCode::BAD_REQUEST, Json(json!({ "Error": why }))).into_response();
    let params: JsonValue = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return bad(format!("the body is not JSON ({e}): send {{\"workers\": [...]}} or {{\"n\": N}}")),
    };
    let workers: Vec<String> = params
        .get("workers")
        .and_then(|w| w.as_array())
        .map(|a| a.iter().filter_map(|w| w.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let n = params.get("n").and_then(|n| n.as_u64()).unwrap_or(0) as usize;
    if workers.is_empty() && n == 0 {
        return bad("name the workers to retire ({\"workers\": [...]}) or how many ({\"n\": N})".into());
    }
    let names: std::collections::HashMap<String, String> = match h.snapshot().await {
        Ok(s) => s.info.workers.iter().map(|w| (w.address.clone(), w.name.clone())).collect(),
        Err(r) => return r,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if h.handle.tx.send(LoopMsg::Retire { workers, n, close: true, reply: tx }).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the scheduler is closing").into_response();
    }
    // Retirement waits for the values to move; a request does not wait forever.
    match tokio::time::timeout(RETIRE_TIMEOUT, rx).await {
        Ok(Ok(Ok(retired))) => {
            let out: serde_json::Map<String, JsonValue> = retired
                .into_iter()
                .map(|a| {
                    let name = names.get(&a).cloned().unwrap_or_else(|| a.clone());
                    (a.clone(), json!({ "address": a, "name": name }))
                })
                .collect();
            Json(JsonValue::Object(out)).into_response()
        }
        Ok(Ok(Err(status))) => bad(status.message().to_string()),
        Ok(Err(_)) => (StatusCode::SERVICE_UNAVAILABLE, "the scheduler is closing").into_response(),
        Err(_) => {
            (StatusCode::GATEWAY_TIMEOUT, format!("retiring took over {RETIRE_TIMEOUT:?}; it goes on")).into_response()
        }
    }
}
