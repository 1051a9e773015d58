//! Recent log lines kept in memory (dask's `get_scheduler_logs` / `get_worker_logs`): the
//! binaries add [`layer`] to their logging; a program running an in-process cluster may add it
//! to its own subscriber. `Client::get_scheduler_logs` and `get_worker_logs` read them through
//! the registered function [`recent_logs`], run on the scheduler and on the workers.
use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// Lines kept per process.
const KEEP: usize = 10_000;

struct Line {
    level: tracing::Level,
    target: String,
    text: String,
}

static RECENT: Mutex<VecDeque<Line>> = Mutex::new(VecDeque::new());

/// A layer that keeps the last 10,000 log lines of this process.
pub fn layer<S: tracing::Subscriber>() -> impl tracing_subscriber::Layer<S> {
    Keep
}

struct Keep;

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Keep {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut text = Text(String::new());
        event.record(&mut text);
        let meta = event.metadata();
        let line = Line { level: *meta.level(), target: meta.target().to_string(), text: text.0 };
        if let Ok(mut r) = RECENT.lock() {
            if r.len() == KEEP {
                r.pop_front();
            }
            r.push_back(line);
        }
    }
}

/// The last `n` lines (level, text) of this process whose module path starts with `target`
/// (`"dask_scheduler"`, `"dask_worker"`; empty: all), oldest first.
#[dask_macros::task(crate = crate)]
pub fn recent_logs(n: u64, target: String) -> Vec<(String, String)> {
    let r = RECENT.lock().map(|r| {
        let mut lines: Vec<(String, String)> = r
            .iter()
            .rev()
            .filter(|l| l.target.starts_with(&target))
            .take(n as usize)
            .map(|l| (l.level.to_string(), l.text.clone()))
            .collect();
        lines.reverse();
        lines
    });
    r.unwrap_or_default()
}
