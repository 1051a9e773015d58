//! The live dashboard (`/status`, tier 2): its event stream read over a plain socket, and the
//! page itself opened in headless Chromium and read as a person sees it, with a screenshot.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dask::builtins::{inc, slowinc};
use dask::{Client, Future, LocalCluster};
use serde_json::{Value, json};

fn cluster() -> (LocalCluster, Client, String) {
    let cluster = LocalCluster::builder()
        .n_workers(2)
        .threads_per_worker(2)
        .dashboard_address(Some("127.0.0.1:0"))
        .build()
        .expect("cluster");
    let client = Client::connect(&cluster.scheduler_address()).expect("connect");
    let base = cluster.http_address().expect("the scheduler serves HTTP");
    (cluster, client, base)
}

/// `(status, content type, body)` of a GET.
fn get(base: &str, path: &str) -> (u16, String, String) {
    let host = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_string))
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// The dashboard's updates, as a program that does not render reads them (HTTP/1.0: the body is
/// the bare event stream).
struct Events {
    lines: BufReader<TcpStream>,
}

impl Events {
    fn open(base: &str) -> Events {
        let host = base.trim_start_matches("http://");
        let mut s = TcpStream::connect(host).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(s, "GET /status/events HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
        let mut lines = BufReader::new(s);
        let mut line = String::new();
        lines.read_line(&mut line).unwrap();
        assert!(line.contains(" 200 "), "{line}");
        loop {
            line.clear();
            lines.read_line(&mut line).unwrap();
            if line.to_ascii_lowercase().starts_with("content-type:") {
                assert!(line.contains("text/event-stream"), "{line}");
            }
            if line == "\r\n" {
                break;
            }
        }
        Events { lines }
    }

    /// The next update.
    fn next(&mut self) -> Value {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(self.lines.read_line(&mut line).unwrap() > 0, "the event stream ended");
            if let Some(data) = line.strip_prefix("data: ") {
                return serde_json::from_str(data.trim_end()).expect("an update is JSON");
            }
        }
    }

    /// Updates until one satisfies `f`.
    fn until(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let u = self.next();
            if f(&u) {
                return u;
            }
            assert!(Instant::now() < deadline, "no update showed {what}; the last:\n{u:#}");
        }
    }
}

/// The counts of task prefix `name` in an update's progress.
fn prefix<'a>(u: &'a Value, name: &str) -> Option<&'a Value> {
    u["prefixes"].as_array()?.iter().find(|p| p["name"] == name)
}

#[test]
fn the_dashboard_streams_the_cluster_its_progress_and_its_task_stream() {
    let (_cluster, client, base) = cluster();
    // The page and its two assets, served from the binary; `/` leads to it, as in dask.
    let (status, ctype, page) = get(&base, "/status");
    assert_eq!((status, ctype.as_str()), (200, "text/html; charset=utf-8"));
    for asset in ["/status/dashboard.js", "/status/dashboard.css"] {
        assert!(page.contains(&format!("\"{asset}\"")), "the page loads {asset}");
        let (status, ctype, body) = get(&base, asset);
        assert!(status == 200 && !body.is_empty(), "{asset}: {status}");
        assert!(ctype.starts_with(if asset.ends_with(".js") { "text/javascript" } else { "text/css" }), "{ctype}");
    }
    assert!(!page.contains("http://") && !page.contains("https://"), "nothing is fetched from elsewhere");
    let (status, _, _) = get(&base, "/");
    assert_eq!(status, 307, "/ redirects to /status");

    let mut events = Events::open(&base);
    let hello = events.next();
    assert_eq!(hello["hello"], true, "the first message is the cluster now and the recent past");
    assert_eq!(hello["scheduler"]["workers"], 2);
    assert_eq!(hello["scheduler"]["threads"], 4);
    assert_eq!(hello["workers"].as_array().unwrap().len(), 2);
    for w in hello["workers"].as_array().unwrap() {
        assert_eq!(w["nthreads"], 2);
        let dashboard = w["dashboard"].as_str().unwrap();
        assert!(dashboard.starts_with("http://127.0.0.1:"), "each worker's HTTP side: {dashboard}");
        assert_eq!(get(dashboard.trim_end_matches('/'), "/health").0, 200);
    }

    // Work in progress shows as processing and waiting, then in memory, and in the stream.
    let slow: Vec<Future<i64>> = client.map_args(slowinc, (0..24i64).map(|i| (i, 250u64))).unwrap();
    let running = events
        .until("slowinc under way", |u| prefix(u, "slowinc").is_some_and(|p| p["processing"] != 0 || p["memory"] != 0));
    let p = prefix(&running, "slowinc").unwrap();
    let total: u64 = ["released", "waiting", "queued", "no_worker", "processing", "memory", "erred"]
        .iter()
        .map(|s| p[s].as_u64().unwrap())
        .sum();
    assert_eq!(total, 24, "{p}");
    assert!(p["processing"].as_u64().unwrap() <= 4, "at most one task per thread runs: {p}");
    // A page opened while the work runs gets the recent past first, then the rest.
    let mut late = Events::open(&base);
    client.gather(&slow).unwrap();

    // Every run reaches each page once, on a thread of one of the workers.
    let addresses: Vec<&str> =
        hello["workers"].as_array().unwrap().iter().map(|w| w["address"].as_str().unwrap()).collect();
    let streamed = |events: &mut Events, mut u: Value| {
        let mut seen = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = &u["stream"];
            assert_eq!(s["added"], s["shown"], "24 tasks are not sampled");
            for t in s["tasks"].as_array().unwrap() {
                let t = t.as_array().unwrap();
                if s["prefixes"][t[4].as_u64().unwrap() as usize] != "slowinc" {
                    continue;
                }
                assert!(addresses.contains(&s["workers"][t[0].as_u64().unwrap() as usize].as_str().unwrap()), "{t:?}");
                assert!(t[1].as_u64().unwrap() < 2, "a thread of two: {t:?}");
                let (start, stop) = (t[2].as_f64().unwrap(), t[3].as_f64().unwrap());
                assert!(stop - start >= 0.24, "slowinc(250 ms) ran for {:.3} s", stop - start);
                assert_eq!(t[5], 0, "not erred");
                assert!(seen.insert(t[6].as_str().unwrap().to_string()), "each run once: {t:?}");
            }
            if seen.len() == 24 && prefix(&u, "slowinc").is_some_and(|p| p["memory"] == 24) {
                return (seen, u);
            }
            assert!(Instant::now() < deadline, "not all of slowinc streamed ({}) or in memory:\n{u:#}", seen.len());
            u = events.next();
        }
    };
    let (seen, last) = streamed(&mut events, running);
    assert!(last["scheduler"]["busy"].is_number() && last["scheduler"]["cpu"].is_number(), "the scheduler's load");
    let first = late.next();
    assert_eq!(first["hello"], true);
    let (seen_late, _) = streamed(&mut late, first);
    assert_eq!(seen, seen_late);
    let keys: std::collections::HashSet<String> = slow.iter().map(|f| f.key().to_string()).collect();
    assert_eq!(seen, keys);

    // Released futures leave the progress.
    drop(slow);
    events.until("slowinc gone from the progress", |u| prefix(u, "slowinc").is_none());
    let _ = client.submit(inc, (1,)).unwrap().result().unwrap();
}

/// Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
/// messages are JSON ended by a NUL, commands on its fd 3, answers and events on its fd 4), so
/// no port is opened and nothing but Debian's `chromium` is needed.
struct Browser {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    profile: std::path::PathBuf,
}

impl Browser {
    /// Chromium, or why there is none (CI installs Debian's `chromium`).
    fn program() -> Option<std::path::PathBuf> {
        let named = std::env::var_os("CHROMIUM").map(std::path::PathBuf::from);
        named.into_iter().chain(["/usr/bin/chromium", "/usr/bin/chromium-browser"].map(Into::into)).find(|p| p.exists())
    }

    fn launch(program: &std::path::Path, width: u32, height: u32) -> Browser {
        use std::process::{Command, Stdio};
        let profile = std::env::temp_dir().join(format!("dask-rs-chromium-{}", std::process::id()));
        // The shell hands our pipes to Chromium as its fds 3 and 4 (no unsafe pre_exec here).
        let script = format!(
            "exec \"$0\" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
             --disable-background-networking --disable-component-update --disable-sync \
             --hide-scrollbars --user-data-dir={} --window-size={width},{height} \
             --remote-debugging-pipe about:blank 3<&0 4>&1 </dev/null >/dev/null",
            profile.display()
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(program)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let to = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            while out.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                buf.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    return;
                }
                buf.clear();
            }
        });
        let mut b = Browser { child, to, from, next_id: 0, session: None, profile };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" }));
        let attached = b.call("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true }));
        b.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        b
    }

    /// Runs a DevTools command (in the page's session once attached) and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.from.recv_timeout(left).unwrap_or_else(|_| panic!("chromium did not answer {method}"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true }));
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    /// Polls `expression` until it is true (an error, as before the page has loaded, is false).
    fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let guarded = format!("(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()");
        while self.eval(&guarded) != json!(true) {
            assert!(Instant::now() < deadline, "the page never showed {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self, path: &std::path::Path) {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "a real picture");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// What the page shows, read from the rendered document: the task stream's drawn tasks and
/// legend, the progress rows and the worker rows.
const READ_PAGE: &str = r#"(() => {
  const rows = (sel) => [...document.querySelectorAll(sel)].map((r) => ({ ...r.dataset, text: r.innerText }));
  return {
    connection: document.getElementById('connection').innerText,
    workers: document.getElementById('n-workers').innerText,
    drawn: Number(document.getElementById('stream').dataset.tasks),
    legend: rows('#stream-legend li[data-prefix]'),
    progress: rows('#progress tbody tr'),
    rows: rows('#workers tbody tr'),
  };
})()"#;

#[test]
fn the_dashboard_page_shows_the_running_work_in_chromium() {
    let Some(program) = Browser::program() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs Chromium for the dashboard test: apt-get install chromium (.ci/run does)"
        );
        eprintln!("SKIPPED: no chromium (apt-get install chromium, or set CHROMIUM=/path/to/it)");
        return;
    };
    let (cluster, client, base) = cluster();
    let mut browser = Browser::launch(&program, 1280, 900);
    browser.call("Page.enable", json!({}));
    browser.call("Page.navigate", json!({ "url": format!("{base}/status") }));
    browser.wait_for(
        "the live connection and both workers",
        r#"document.getElementById('connection').innerText === 'live'
        && document.querySelectorAll('#workers tbody tr').length === 2"#,
    );

    // 48 tasks of 250 ms on 4 threads: three seconds of work, seen while it runs.
    let slow: Vec<Future<i64>> = client.map_args(slowinc, (0..48i64).map(|i| (i, 250u64))).unwrap();
    let sums: Vec<Future<i64>> =
        slow.chunks(2).map(|p| client.submit(dask::builtins::add, (&p[0], &p[1])).unwrap()).collect();
    // And one input that must cross from one worker to the other.
    let on =
        |i: usize| dask::SubmitOptions { workers: vec![cluster.worker_addresses()[i].clone()], ..Default::default() };
    let here = client.submit_with(inc, (1,), on(0)).unwrap();
    let there = client.submit_with(inc, (&here,), on(1)).unwrap();
    browser.wait_for(
        "slowinc running and drawn",
        r#"(() => {
        const row = document.querySelector('#progress tbody tr[data-prefix="slowinc"]');
        const legend = document.querySelector('#stream-legend li[data-prefix="slowinc"]');
        return !!row && Number(row.dataset.processing) > 0 && Number(row.dataset.memory) > 0 && !!legend;
    })()"#,
    );
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-status.png");
    browser.screenshot(&shot);
    eprintln!("screenshot of the running dashboard: {}", shot.display());
    let page = browser.eval(READ_PAGE);
    assert_eq!(page["connection"], "live");
    assert_eq!(page["workers"], "2");
    assert!(page["drawn"].as_u64().unwrap() > 0, "{page:#}");
    let row = page["progress"].as_array().unwrap().iter().find(|r| r["prefix"] == "slowinc").unwrap();
    assert_eq!(row["total"], "48", "{row}");
    assert!(row["text"].as_str().unwrap().contains(" / 48"), "{row}");
    let processing: u64 = row["processing"].as_str().unwrap().parse().unwrap();
    assert!(processing <= 4, "at most one task per thread: {row}");
    assert_eq!(page["rows"].as_array().unwrap().len(), 2);
    for w in page["rows"].as_array().unwrap() {
        assert_eq!(w["status"], "running");
        assert!(w["text"].as_str().unwrap().contains("127.0.0.1:"), "{w}");
    }

    // When it is done: everything in memory, and every task drawn (none sampled away).
    client.gather(&sums).unwrap();
    assert_eq!(there.result().unwrap(), 3);
    browser.wait_for("all of slowinc and add in memory and drawn", r#"(() => {
        const done = (p, n) => document.querySelector(`#progress tbody tr[data-prefix="${p}"]`)?.dataset.memory === String(n);
        const drawn = (p) => Number(document.querySelector(`#stream-legend li[data-prefix="${p}"]`)?.dataset.count || 0);
        return done('slowinc', 48) && done('add', 24) && drawn('slowinc') === 48 && drawn('add') === 24;
    })()"#);
    // `there` fetched its input from the other worker: the stream draws that transfer.
    browser.wait_for(
        "a transfer drawn",
        "Number(document.querySelector('#stream-legend li[data-transfers]')?.dataset.transfers || 0) > 0",
    );
    let page = browser.eval(READ_PAGE);
    assert!(page["drawn"].as_u64().unwrap() >= 74, "{page:#}");
}
