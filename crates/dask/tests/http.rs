//! The scheduler's HTTP side (tier 2): `/health`, Prometheus `/metrics`, the `/info` JSON
//! pages and dask's `/api/v1` routes, read over a plain socket as a probe or a scraper would.
use std::io::{Read, Write};
use std::time::Duration;

use dask::builtins::{inc, slowinc};
use dask::{Client, LocalCluster};

/// `(status, body)` of one HTTP/1.1 request.
fn request(base: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let host = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).expect("connect to the HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn get(base: &str, path: &str) -> (u16, String) {
    request(base, "GET", path, "")
}

/// Checks a page is Prometheus text: every family typed before its samples, every sample
/// `name{labels} number`.
fn check_exposition(page: &str) {
    let mut typed = std::collections::HashSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap();
            assert!(matches!(it.next(), Some("gauge" | "counter")), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
        let name = series.split('{').next().unwrap();
        assert!(typed.contains(name), "sample before its # TYPE: {line}");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
        }
    }
}

/// The value of one sample in a Prometheus text page.
fn sample(page: &str, line_start: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {line_start} in:\n{page}"))
}

#[test]
fn health_metrics_info_and_api_answer_as_dask_does() {
    let cluster = LocalCluster::builder()
        .n_workers(2)
        .threads_per_worker(1)
        .dashboard_address(Some("127.0.0.1:0"))
        .http_api(true)
        .build()
        .unwrap();
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    let base = cluster.http_address().expect("the scheduler serves HTTP");
    assert_eq!(get(&base, "/health"), (200, "ok".to_string()));

    let held = client.map(inc, 0..10i64).unwrap();
    client.gather(&held).unwrap();
    let running = client.submit(slowinc, (1, 2000u64)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (status, page) = get(&base, "/metrics");
    assert_eq!(status, 200);
    check_exposition(&page);
    assert_eq!(sample(&page, "dask_scheduler_clients "), 1.0);
    assert_eq!(sample(&page, "dask_scheduler_tasks{state=\"memory\"}"), 10.0);
    assert_eq!(sample(&page, "dask_scheduler_tasks{state=\"processing\"}"), 1.0);
    assert_eq!(sample(&page, "dask_scheduler_prefix_tasks{task_prefix_name=\"inc\",state=\"memory\"}"), 10.0);
    // dask's cumulative count: each of the 10 inc tasks went processing, then memory, once.
    let entered = "dask_scheduler_prefix_state_totals{task_prefix_name=\"inc\",state=";
    assert_eq!(sample(&page, &format!("{entered}\"memory\"}}")), 10.0);
    assert_eq!(sample(&page, &format!("{entered}\"processing\"}}")), 10.0);
    assert!(page.contains("# TYPE dask_scheduler_prefix_state_totals counter"));
    assert!(sample(&page, "dask_scheduler_tasks_compute_seconds_total{task_prefix_name=\"inc\"}") >= 0.0);
    let workers: f64 = ["idle", "partially_saturated", "saturated", "paused_or_retiring"]
        .iter()
        .map(|s| sample(&page, &format!("dask_scheduler_workers{{state=\"{s}\"}}")))
        .sum();
    assert_eq!(workers, 2.0);
    assert!(page.contains("# TYPE dask_scheduler_tick_count_total counter"), "{page}");

    let (_, tasks) = get(&base, "/info/tasks.json");
    let tasks: serde_json::Value = serde_json::from_str(&tasks).unwrap();
    assert_eq!(tasks["prefixes"]["inc"]["memory"], 10);
    let (_, workers) = get(&base, "/info/workers.json");
    let workers: serde_json::Value = serde_json::from_str(&workers).unwrap();
    assert_eq!(workers["workers"].as_array().unwrap().len(), 2);
    let (_, versions) = get(&base, "/info/versions.json");
    assert!(versions.contains(env!("CARGO_PKG_VERSION")), "{versions}");

    // dask's operator API.
    assert_eq!(get(&base, "/api/v1").1, "API V1");
    let (_, w) = get(&base, "/api/v1/get_workers");
    let w: serde_json::Value = serde_json::from_str(&w).unwrap();
    assert_eq!(w["num_workers"], 2);
    // Busy: not idle. The shapes are those dask's Kubernetes operator reads.
    let (_, idle) = get(&base, "/api/v1/check_idle");
    let idle: serde_json::Value = serde_json::from_str(&idle).unwrap();
    assert!(idle["idle_since"].is_null(), "{idle}");
    let (_, target) = get(&base, "/api/v1/adaptive_target");
    let target: serde_json::Value = serde_json::from_str(&target).unwrap();
    assert!(target["workers"].as_u64().is_some_and(|n| n >= 1), "{target}");
    running.result().unwrap();
    // Idle: since when, once a tick has seen it.
    let start = std::time::Instant::now();
    loop {
        let (_, idle) = get(&base, "/api/v1/check_idle");
        let idle: serde_json::Value = serde_json::from_str(&idle).unwrap();
        if let Some(t) = idle["idle_since"].as_f64() {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
            assert!(t <= now && t > now - 60.0, "{idle}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never idle: {idle}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Retire one worker by address; its held values move to the other first.
    let victim = cluster.worker_addresses()[0].clone();
    let (status, body) = request(&base, "POST", "/api/v1/retire_workers", &format!("{{\"workers\": [\"{victim}\"]}}"));
    assert_eq!(status, 200, "{body}");
    let retired: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(retired[&victim]["address"], victim.as_str(), "{body}");
    assert!(retired[&victim]["name"].as_str().is_some_and(|n| !n.is_empty()), "{body}");
    assert_eq!(client.gather(&held).unwrap(), (1..=10).collect::<Vec<i64>>());
    // Bad requests say what is wrong.
    let (status, body) = request(&base, "POST", "/api/v1/retire_workers", "not json");
    assert_eq!(status, 400);
    assert!(body.contains("not JSON"), "{body}");
    assert_eq!(get(&base, "/no/such/page").0, 404);
}

#[test]
fn a_dashboard_port_in_use_falls_back_to_a_free_one_and_none_means_none() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cluster =
        LocalCluster::builder().n_workers(1).dashboard_address(Some(&format!("127.0.0.1:{port}"))).build().unwrap();
    let base = cluster.http_address().unwrap();
    assert!(!base.ends_with(&format!(":{port}")), "{base}");
    assert_eq!(get(&base, "/health").0, 200);
    // dask's /api/v1 routes are opt-in.
    assert_eq!(get(&base, "/api/v1/get_workers").0, 404);
    let off = LocalCluster::builder().n_workers(1).dashboard_address(None).build().unwrap();
    assert!(off.http_address().is_none());
}
