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
    records: Mutex<VecDeque<pb::TaskRecord>>,
    /// Compute and transfer time of every run since the start, by task prefix (metrics).
    totals: Mutex<HashMap<String, PrefixTotals>>,
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
        r.extend(new);
        let over = r.len().saturating_sub(KEEP);
        r.drain(..over);
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
