//! Client conveniences: a terminal progress bar over futures (dask's `progress`) and a
//! self-contained HTML performance report of a block of code (dask's `performance_report`).
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime};

use dask_protocol::pb;
use dask_protocol::tokenize::key_prefix;

use crate::gather::{Gatherable, futures_of};
use crate::keys::FutureStatus;
use crate::{Client, PrefixProfile, Result, profile_of};

/// Done and total futures of one task prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixProgress {
    pub done: usize,
    pub erred: usize,
    pub total: usize,
}

/// dask's `progress(futures)`: waits until every future in `collection` is done, drawing one bar
/// per task prefix on standard error while it waits; nothing is drawn when standard error is not
/// a terminal (a log file, CI). Returns the final counts by prefix.
pub fn progress<G: Gatherable + ?Sized>(collection: &G) -> BTreeMap<String, PrefixProgress> {
    let futures = futures_of(collection);
    let tty = std::io::stderr().is_terminal();
    let mut drawn_lines = 0;
    let mut last_draw = Instant::now() - Duration::from_secs(1);
    loop {
        let mut by: BTreeMap<String, PrefixProgress> = BTreeMap::new();
        for f in &futures {
            let p = by.entry(key_prefix(f.key()).to_string()).or_default();
            p.total += 1;
            match f.status() {
                FutureStatus::Pending => {}
                FutureStatus::Finished => p.done += 1,
                _ => {
                    p.done += 1;
                    p.erred += 1;
                }
            }
        }
        let all_done = by.values().all(|p| p.done == p.total);
        if tty && (all_done || last_draw.elapsed() >= Duration::from_millis(100)) {
            drawn_lines = draw(&by, drawn_lines);
            last_draw = Instant::now();
        }
        if all_done {
            return by;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Draws the bars over the ones drawn before (`previous` lines); returns the lines drawn.
fn draw(by: &BTreeMap<String, PrefixProgress>, previous: usize) -> usize {
    const WIDTH: usize = 40;
    let mut out = String::new();
    if previous > 0 {
        let _ = write!(out, "\x1b[{previous}A");
    }
    let name_width = by.keys().map(|k| k.len()).max().unwrap_or(0).min(30);
    for (prefix, p) in by {
        let filled = (p.done * WIDTH).checked_div(p.total).unwrap_or(WIDTH);
        let failed = if p.erred > 0 { format!(" ({} erred)", p.erred) } else { String::new() };
        let _ = writeln!(
            out,
            "\x1b[2K{prefix:>name_width$} [{}{}] {}/{}{failed}",
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            p.done,
            p.total
        );
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(out.as_bytes());
    let _ = err.flush();
    by.len()
}

/// dask's `performance_report(filename)`: records the task stream from now until
/// [`finish`](Self::finish) (or drop), then writes `path`, a self-contained HTML page (no file
/// or script is fetched from elsewhere) with the task stream drawn per worker thread and a table
/// of time per task prefix.
#[derive(Debug)]
pub struct PerformanceReport {
    client: Client,
    path: std::path::PathBuf,
    began: SystemTime,
    written: bool,
}

impl Client {
    /// Starts a [`PerformanceReport`] written to `path` when finished.
    pub fn performance_report(&self, path: impl Into<std::path::PathBuf>) -> PerformanceReport {
        PerformanceReport { client: self.clone(), path: path.into(), began: SystemTime::now(), written: false }
    }
}

impl PerformanceReport {
    /// Writes the report now; returns its path.
    pub fn finish(mut self) -> Result<std::path::PathBuf> {
        self.write()?;
        Ok(self.path.clone())
    }

    fn write(&mut self) -> Result<()> {
        self.written = true;
        let records = self.client.get_task_stream(Some(self.began), None, None)?;
        let html = render(&records, &profile_of(&records), self.began);
        std::fs::write(&self.path, html)
            .map_err(|e| crate::Error::InvalidArgument(format!("cannot write {}: {e}", self.path.display())))
    }
}

impl Drop for PerformanceReport {
    fn drop(&mut self) {
        if !self.written
            && let Err(e) = self.write()
        {
            tracing::warn!(error = %e, "the performance report was not written");
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A colour per task prefix, the same on every page.
fn colour(prefix: &str) -> String {
    let h = prefix.bytes().fold(2166136261u32, |h, b| (h ^ u32::from(b)).wrapping_mul(16777619));
    format!("hsl({}, 65%, 55%)", h % 360)
}

/// The report's HTML.
pub fn render(records: &[pb::TaskRecord], profile: &[PrefixProfile], began: SystemTime) -> String {
    let t0 = records.iter().map(|r| r.start_s).fold(f64::INFINITY, f64::min);
    let t1 = records.iter().map(|r| r.stop_s).fold(0.0f64, f64::max);
    let span = if t1 > t0 { t1 - t0 } else { 1.0 };
    let mut rows: Vec<(String, u32)> = records.iter().map(|r| (r.worker.clone(), r.thread)).collect();
    rows.sort();
    rows.dedup();
    let (width, row_h) = (1000.0, 18.0);
    let mut svg = String::new();
    let height = rows.len() as f64 * row_h + 20.0;
    let _ =
        write!(svg, r#"<svg id="task-stream" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">"#);
    for r in records {
        let y = rows.iter().position(|x| *x == (r.worker.clone(), r.thread)).unwrap_or(0) as f64 * row_h;
        let prefix = key_prefix(&r.key);
        for t in &r.transfers {
            let x = (t.start_s - t0) / span * width;
            let w = ((t.stop_s - t.start_s) / span * width).max(0.5);
            let _ = write!(
                svg,
                r#"<rect class="transfer" x="{x:.2}" y="{y:.1}" width="{w:.2}" height="{:.1}" fill="red" opacity="0.5"><title>transfer {} from {}</title></rect>"#,
                row_h - 2.0,
                escape(&t.key),
                escape(&t.source)
            );
        }
        let x = (r.start_s - t0) / span * width;
        let w = ((r.stop_s - r.start_s) / span * width).max(0.5);
        let fill = if r.status == "OK" { colour(prefix) } else { "black".into() };
        let _ = write!(
            svg,
            r#"<rect class="task" data-prefix="{}" x="{x:.2}" y="{y:.1}" width="{w:.2}" height="{:.1}" fill="{fill}"><title>{} on {} thread {} ({:.3} s)</title></rect>"#,
            escape(prefix),
            row_h - 2.0,
            escape(&r.key),
            escape(&r.worker),
            r.thread,
            r.stop_s - r.start_s
        );
    }
    svg.push_str("</svg>");
    let mut table = String::from(
        "<table id=\"prefixes\"><tr><th>task prefix</th><th>tasks</th><th>erred</th><th>compute (s)</th>\
         <th>longest (s)</th><th>transfer (s)</th><th>transferred (bytes)</th></tr>",
    );
    for p in profile {
        let _ = write!(
            table,
            "<tr><td><span style=\"color:{}\">&#9632;</span> {}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td></tr>",
            colour(&p.prefix),
            escape(&p.prefix),
            p.count,
            p.errors,
            p.compute.as_secs_f64(),
            p.longest.as_secs_f64(),
            p.transfer.as_secs_f64(),
            p.transfer_bytes
        );
    }
    table.push_str("</table>");
    let since = began.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>dask-rs performance report</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;\
         padding:2px 8px;text-align:right}}td:first-child{{text-align:left}}svg{{border:1px solid #ccc}}</style></head>\
         <body><h1>dask-rs performance report</h1><p>{} tasks on {} worker threads over {:.3} s (from {:.3}, seconds \
         since the epoch). Each bar is a task, coloured by its prefix (black: erred); red: its inputs fetched from \
         other workers.</p><h2>Task stream</h2>{svg}<h2>Time per task prefix</h2>{table}</body></html>\n",
        records.len(),
        rows.len(),
        if records.is_empty() { 0.0 } else { span },
        since
    )
}
