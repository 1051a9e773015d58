//! The story log: every transition of every task, kept in a bounded ring (dask's
//! `Scheduler.story`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Command, Cx, Feed, Key, SchedulerCore, TaskId};

/// One line of a task's story.
#[derive(Clone, Debug)]
pub struct Transition {
    pub key: Key,
    pub from: &'static str,
    pub to: &'static str,
    pub cause: &'static str,
    pub at: Instant,
}

/// A log entry as kept: 24 bytes (names interned, time as nanoseconds since the core began).
/// The key is kept as its 64-bit hash: holding the key itself kept the keys of forgotten tasks
/// alive for as long as their entries, and dropping the oldest entry's key was a cache miss on
/// every transition (3 % of a scheduler's time in map+gather).
#[derive(Clone)]
pub(super) struct LogEntry {
    key: u64,
    from: u8,
    to: u8,
    cause: u8,
    at_ns: u64,
}

/// How the log names a key (a collision would only add another key's lines to a story).
pub(super) fn log_key(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

impl SchedulerCore {
    /// The transitions of `key` still in the log, oldest first.
    pub fn story(&self, key: &str) -> Vec<Transition> {
        let hash = log_key(key);
        let key: Key = Arc::from(key);
        self.log
            .iter()
            .filter(|t| t.key == hash)
            .map(|t| Transition {
                key: key.clone(),
                from: self.log_names[t.from as usize],
                to: self.log_names[t.to as usize],
                cause: self.log_names[t.cause as usize],
                at: self.started + Duration::from_nanos(t.at_ns),
            })
            .collect()
    }
}

impl SchedulerCore {
    pub(super) fn log_transition(&mut self, t: TaskId, from: &'static str, to: &'static str, cx: &mut Cx<'_>) {
        if self.feed {
            let key = self.task(t).key.clone();
            cx.out.push(Command::Feed(Feed::Transition { key, from, to }));
        }
        if self.config.log_len == 0 {
            return;
        }
        self.push_log(log_key(&self.task(t).key), from, to, cx);
    }

    /// Tells scheduler plugins everything from now on ([`Command::Feed`]), or stops.
    pub fn set_feed(&mut self, on: bool) {
        self.feed = on;
    }

    /// Callers check that the log is on first, so that no key is hashed for nothing.
    pub(super) fn push_log(&mut self, key: u64, from: &'static str, to: &'static str, cx: &Cx<'_>) {
        let (from, to, cause) = (self.intern(from), self.intern(to), self.intern(cx.cause));
        let at_ns = cx.now.saturating_duration_since(self.started).as_nanos() as u64;
        self.log.push_back(LogEntry { key, from, to, cause, at_ns });
        self.trim_log();
    }

    /// A byte for one of the few names the log uses.
    pub(super) fn intern(&mut self, name: &'static str) -> u8 {
        // By address first: names are literals, and comparing text for each would cost more
        // than the rest of logging a transition.
        let found = self.log_names.iter().position(|n| std::ptr::eq(*n, name));
        match found.or_else(|| self.log_names.iter().position(|n| *n == name)) {
            Some(i) => i as u8,
            None => {
                self.log_names.push(name);
                (self.log_names.len() - 1) as u8
            }
        }
    }

    pub(super) fn trim_log(&mut self) {
        while self.log.len() > self.config.log_len {
            self.log.pop_front();
        }
    }
}
