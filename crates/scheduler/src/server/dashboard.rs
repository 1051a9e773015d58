//! The live dashboard (`/status`, dask's landing page): one HTML page with its script and
//! style embedded in the binary, fed by server-sent events (`/status/events`).
//!
//! Cost is bounded by design, whatever the cluster does and however many pages are open:
//! - one publisher, running only while a page listens, builds one update every [`INTERVAL`]
//!   and every page gets the same bytes (a page's first message, the recent past, is its own);
//! - an update asks the event loop for the snapshot the other HTTP routes share (one message,
//!   O(workers + prefixes) on the loop: the core keeps its counts by prefix as states change)
//!   and reads the task stream beside the loop;
//! - an update carries at most [`MAX_TASKS`] task-stream records, sampled evenly from those
//!   that ended since the last (a page says "1 in k shown");
//! - a page that falls behind skips updates (a bounded broadcast), it never makes one queue.
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use dask_protocol::pb;
use futures_util::Stream;
use parking_lot::Mutex;
use serde_json::{Value as JsonValue, json};
use tokio::sync::broadcast;

use super::http::{Http, LoopStats, Snapshot};
use crate::core::TASK_STATES;

/// How often a page is updated.
const INTERVAL: Duration = Duration::from_millis(500);
/// Task-stream records in one update, at most.
const MAX_TASKS: usize = 2_000;
/// Task-stream records a page gets when it opens (the recent past, before its first update).
const HISTORY: u64 = 5_000;
/// Updates a slow page may fall behind by before it skips some.
const BACKLOG: usize = 8;

const PAGE: &str = include_str!("../../assets/dashboard.html");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");

/// The updates pages listen to, and where the publisher is in the task stream.
pub(super) struct Feed {
    tx: broadcast::Sender<Arc<str>>,
    publisher: Mutex<Publisher>,
}

/// Whether the publisher runs, and the task-stream position its last update went up to: a
/// page that subscribes gets the records before it in its first message and the rest in the
/// updates, none twice and none missed. Both change together under the lock, and an update
/// is sent under it.
struct Publisher {
    running: bool,
    cursor: u64,
}

impl Default for Feed {
    fn default() -> Self {
        Feed { tx: broadcast::channel(BACKLOG).0, publisher: Mutex::new(Publisher { running: false, cursor: 0 }) }
    }
}

/// The dashboard's routes.
pub(super) fn routes() -> Router<Http> {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/status") }))
        .route("/status", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE) }))
        .route(
            "/status/dashboard.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT) }),
        )
        .route("/status/dashboard.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }))
        .route("/status/events", get(events))
}

/// A page's event stream: first the cluster now and the recent past (marked `hello`: a page
/// that reconnects starts over), then the publisher's updates; it ends when the scheduler
/// closes.
async fn events(axum::extract::State(h): axum::extract::State<Http>) -> Response {
    let snapshot = match h.snapshot().await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (rx, cursor) = subscribe(&h);
    let (records, _, _) = h.stream.since(cursor.saturating_sub(HISTORY), HISTORY as usize, cursor);
    let hello: Arc<str> = update(&snapshot, &records, records.len() as u64, None, true).into();
    let stream = futures_util::stream::unfold((Some(hello), rx), |(first, mut rx)| async move {
        if let Some(first) = first {
            return Some((first, (None, rx)));
        }
        loop {
            match rx.recv().await {
                Ok(u) => return Some((u, (None, rx))),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures_util::StreamExt as _;
    sse(stream.take_until(h.handle.shutdown.clone().cancelled_owned())).into_response()
}

fn sse(
    updates: impl Stream<Item = Arc<str>> + Send + 'static,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    use futures_util::StreamExt as _;
    Sse::new(updates.map(|u| Ok(Event::default().data(&*u)))).keep_alive(KeepAlive::default())
}

/// Listens to the updates, starting the publisher if none runs; returns the task-stream
/// position the next update starts from.
fn subscribe(h: &Http) -> (broadcast::Receiver<Arc<str>>, u64) {
    let mut p = h.feed.publisher.lock();
    let rx = h.feed.tx.subscribe();
    if !p.running {
        p.running = true;
        p.cursor = h.stream.added();
        tokio::spawn(publish(h.clone()));
    }
    (rx, p.cursor)
}

/// Builds and sends an update every [`INTERVAL`] while a page listens; stops when none does
/// or the scheduler closes.
async fn publish(h: Http) {
    let mut last: Option<Load> = None;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if h.feed.tx.receiver_count() == 0 || h.handle.shutdown.is_cancelled() {
            let mut p = h.feed.publisher.lock();
            // Checked again under the lock: a page may have just subscribed.
            if h.feed.tx.receiver_count() == 0 || h.handle.shutdown.is_cancelled() {
                p.running = false;
                return;
            }
        }
        let Ok(snapshot) = h.snapshot().await else {
            h.feed.publisher.lock().running = false;
            return;
        };
        let load = Load::now(&snapshot.loop_stats);
        let rates = last.as_ref().map(|l| load.rates_since(l));
        last = Some(load);
        let mut p = h.feed.publisher.lock();
        let (records, next, added) = h.stream.since(p.cursor, MAX_TASKS, u64::MAX);
        p.cursor = next;
        let _ = h.feed.tx.send(update(&snapshot, &records, added, rates, false).into());
    }
}

/// The scheduler's load at an instant: its event loop's counters and the process's CPU time.
struct Load {
    at: Instant,
    busy: Duration,
    wakeups: u64,
    cpu: Duration,
}

/// The scheduler's load between two instants, as fractions of one core and rates per second.
struct Rates {
    busy: f64,
    cpu: f64,
    wakeups: f64,
}

impl Load {
    fn now(stats: &LoopStats) -> Self {
        Load { at: Instant::now(), busy: stats.busy, wakeups: stats.wakeups, cpu: dask_protocol::sys::process_cpu() }
    }

    fn rates_since(&self, before: &Load) -> Rates {
        let dt = self.at.duration_since(before.at).as_secs_f64().max(1e-3);
        Rates {
            busy: self.busy.saturating_sub(before.busy).as_secs_f64() / dt,
            cpu: self.cpu.saturating_sub(before.cpu).as_secs_f64() / dt,
            wakeups: self.wakeups.saturating_sub(before.wakeups) as f64 / dt,
        }
    }
}

/// One update's JSON: the scheduler, its workers, tasks by prefix and state, and the task
/// stream's new records (`added` ended since the last update; `records` is a sample of them).
fn update(s: &Snapshot, records: &[pb::TaskRecord], added: u64, rates: Option<Rates>, hello: bool) -> String {
    let info = &s.info;
    let workers: Vec<JsonValue> = info
        .workers
        .iter()
        .map(|w| {
            json!({
                "name": w.name, "address": w.address, "dashboard": w.dashboard, "nthreads": w.nthreads,
                "processing": w.processing, "in_memory": w.in_memory, "status": w.status,
                "limit": w.memory_limit, "managed": w.memory_managed, "unmanaged": w.memory_unmanaged,
                "spilled": w.memory_spilled,
            })
        })
        .collect();
    let prefixes: Vec<JsonValue> = s
        .prefix_states
        .iter()
        .filter(|p| p.now.iter().any(|n| *n > 0))
        .map(|p| {
            let mut o = serde_json::Map::new();
            o.insert("name".into(), json!(&*p.name));
            for (state, n) in TASK_STATES.iter().zip(&p.now) {
                o.insert(state.replace('-', "_"), json!(n));
            }
            JsonValue::Object(o)
        })
        .collect();
    let busy = rates.as_ref().map(|r| r.busy);
    let scheduler = json!({
        "address": info.address, "version": info.version, "clients": s.clients,
        "workers": info.workers.len(), "threads": info.workers.iter().map(|w| w.nthreads).sum::<u32>(),
        "tasks": info.tasks, "busy": busy, "cpu": rates.as_ref().map(|r| r.cpu),
        "wakeups": rates.as_ref().map(|r| r.wakeups), "tick_max": s.loop_stats.tick_max.as_secs_f64(),
        "steals": info.steals_done,
    });
    let mut out = String::with_capacity(512 + records.len() * 64);
    let _ = write!(
        out,
        r#"{{"hello":{hello},"now":{},"scheduler":{},"workers":{},"prefixes":{},"stream":"#,
        dask_protocol::sys::epoch_secs(),
        scheduler,
        JsonValue::Array(workers),
        JsonValue::Array(prefixes),
    );
    stream_json(&mut out, records, added);
    out.push('}');
    out
}

/// The stream's records as compact rows over interned worker and prefix tables:
/// `tasks: [[worker, thread, start, stop, prefix, erred, key]]`,
/// `transfers: [[worker, thread, start, stop]]`.
fn stream_json(out: &mut String, records: &[pb::TaskRecord], added: u64) {
    let mut workers = Interned::default();
    let mut prefixes = Interned::default();
    let mut tasks = String::new();
    let mut transfers = String::new();
    // A worker's clock could report anything; JSON has no infinities.
    for r in records.iter().filter(|r| r.start_s.is_finite() && r.stop_s.is_finite()) {
        let w = workers.id(&r.worker);
        let p = prefixes.id(dask_protocol::tokenize::key_prefix(&r.key));
        let sep = if tasks.is_empty() { "" } else { "," };
        let _ = write!(
            tasks,
            "{sep}[{w},{},{:.4},{:.4},{p},{},{}]",
            r.thread,
            r.start_s,
            r.stop_s,
            u8::from(r.status != "OK"),
            JsonValue::from(r.key.as_str())
        );
        for t in r.transfers.iter().filter(|t| t.start_s.is_finite() && t.stop_s.is_finite()) {
            let sep = if transfers.is_empty() { "" } else { "," };
            let _ = write!(transfers, "{sep}[{w},{},{:.4},{:.4}]", r.thread, t.start_s, t.stop_s);
        }
    }
    let _ = write!(
        out,
        r#"{{"added":{added},"shown":{},"workers":{},"prefixes":{},"tasks":[{tasks}],"transfers":[{transfers}]}}"#,
        records.len(),
        json!(workers.names),
        json!(prefixes.names),
    );
}

/// Strings numbered in the order first seen.
#[derive(Default)]
struct Interned<'a> {
    names: Vec<&'a str>,
    ids: std::collections::HashMap<&'a str, usize>,
}

impl<'a> Interned<'a> {
    fn id(&mut self, v: &'a str) -> usize {
        *self.ids.entry(v).or_insert_with(|| {
            self.names.push(v);
            self.names.len() - 1
        })
    }
}
