//! The task stream (dask's `TaskStreamPlugin`): the last runs of tasks, when and on which
//! worker thread, as the workers reported them. Kept beside the event loop (the worker streams
//! add to it, one lock per batch; queries read it), so it costs the loop nothing.
use std::collections::{HashMap, VecDeque};

use dask_protocol::pb;
use parking_lot::Mutex;

/// Records kept (dask keeps 100,000 too).
const KEEP: usize = 100_000;

#[derive(Default)]
pub(super) struct TaskStream {
    records: Mutex<Records>,
    /// Compute and transfer time of every run since the start, by task prefix (metrics).
    totals: Mutex<HashMap<String, PrefixTotals>>,
}

/// The records kept, and how many were ever added (the dashboard's cursor).
#[derive(Default)]
struct Records {
    kept: VecDeque<pb::TaskRecord>,
    added: u64,
}

/// Time spent on one task prefix since the scheduler started.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PrefixTotals {
    pub(super) compute_s: f64,
    pub(super) transfer_s: f64,
}

impl TaskStream {
    /// The runs a worker's batch reports.
    pub(super) fn record(&self, worker: &str, events: &[pb::WorkerEvent]) {
        use pb::worker_event::Kind;
        let mut new = Vec::new();
        for e in events {
            let (key, start_s, duration_us, thread, status, transfers) = match &e.kind {
                Some(Kind::Finished(f)) if f.start_s > 0.0 => {
                    (&f.key, f.start_s, f.duration_us, f.thread, "OK", &f.transfers)
                }
                Some(Kind::Failed(f)) if f.start_s > 0.0 => {
                    (&f.key, f.start_s, f.duration_us, f.thread, "error", &f.transfers)
                }
                _ => continue,
            };
            new.push(pb::TaskRecord {
                key: key.clone(),
                worker: worker.to_string(),
                thread,
                start_s,
                stop_s: start_s + duration_us as f64 / 1e6,
                status: status.into(),
                transfers: transfers.clone(),
            });
        }
        if new.is_empty() {
            return;
        }
        {
            let mut totals = self.totals.lock();
            for t in &new {
                let prefix = dask_protocol::tokenize::key_prefix(&t.key);
                let entry = match totals.get_mut(prefix) {
                    Some(e) => e,
                    None => totals.entry(prefix.to_string()).or_default(),
                };
                entry.compute_s += (t.stop_s - t.start_s).max(0.0);
                entry.transfer_s += t.transfers.iter().map(|x| (x.stop_s - x.start_s).max(0.0)).sum::<f64>();
            }
        }
        let mut r = self.records.lock();
        r.added += new.len() as u64;
        r.kept.extend(new);
        let over = r.kept.len().saturating_sub(KEEP);
        r.kept.drain(..over);
    }

    /// How many records were ever added.
    pub(super) fn added(&self) -> u64 {
        self.records.lock().added
    }

    /// The records added from position `cursor` up to `until` (positions count the records
    /// ever added), at most `max` of them spread evenly over those (every k-th: a busy
    /// cluster's stream is sampled, not cut off); the position to ask from next; and how many
    /// were added in that span.
    pub(super) fn since(&self, cursor: u64, max: usize, until: u64) -> (Vec<pb::TaskRecord>, u64, u64) {
        let r = self.records.lock();
        let end = until.min(r.added);
        let first_kept = r.added - r.kept.len() as u64;
        let from = cursor.max(first_kept).min(end);
        let span = (from - first_kept) as usize..(end - first_kept) as usize;
        let step = span.len().div_ceil(max.max(1)).max(1);
        let out = r.kept.range(span).step_by(step).cloned().collect();
        (out, end, end.saturating_sub(cursor))
    }

    /// Compute and transfer seconds by task prefix, sorted by prefix.
    pub(super) fn prefix_totals(&self) -> Vec<(String, PrefixTotals)> {
        let mut v: Vec<(String, PrefixTotals)> = self.totals.lock().iter().map(|(k, t)| (k.clone(), *t)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Records that ended within `start..stop` (0: no bound), the last `count` of them (0: all).
    pub(super) fn query(&self, q: &pb::TaskStreamRequest) -> Vec<pb::TaskRecord> {
        let r = self.records.lock();
        let mut out: Vec<pb::TaskRecord> = r
            .kept
            .iter()
            .filter(|t| (q.start_s <= 0.0 || t.stop_s >= q.start_s) && (q.stop_s <= 0.0 || t.stop_s <= q.stop_s))
            .cloned()
            .collect();
        if q.count > 0 && out.len() > q.count as usize {
            out.drain(..out.len() - q.count as usize);
        }
        out
    }
}
