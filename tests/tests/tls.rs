//! Tier 3: `dask-scheduler` and `dask-worker` with dask's TLS flags, and the errors someone
//! without the cluster's credentials gets.
use std::time::Duration;

use dask::builtins::inc;
use dask::{Client, Security};
use dask_system_tests::{Proc, TempDir, binary, https_get, start_scheduler, start_with_env, wait_for_scheduler_file};

const LONG: Duration = Duration::from_secs(60);

fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn binaries_with_tls_flags_form_a_cluster_that_refuses_strangers() {
    let dir = TempDir::new("tls");
    let ours = Security::temporary().unwrap().files(&dir.path("ours")).unwrap();
    let theirs = Security::temporary().unwrap().files(&dir.path("theirs")).unwrap();
    let flags = |ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path| {
        vec![
            "--tls-ca-file".to_string(),
            ca.display().to_string(),
            "--tls-cert".to_string(),
            cert.display().to_string(),
            "--tls-key".to_string(),
            key.display().to_string(),
        ]
    };
    let ours_flags = flags(&ours.ca, &ours.cert, &ours.key);

    // dask's --protocol tls without credentials: told what to pass.
    let bare_args = ["--protocol", "tls", "--port", "0", "--no-dashboard"];
    let mut bare = Proc::start(&binary("dask-scheduler"), &bare_args, dir.path("bare-scheduler.log"));
    assert_eq!(bare.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(bare.log().contains("TLS needs credentials: pass --tls-ca-file"), "{}", bare.log());

    // The same for a worker asked for tls:// in --host.
    let bare_args = ["tcp://127.0.0.1:1", "--host", "tls://127.0.0.1", "--no-nanny"];
    let mut bare = Proc::start(&binary("dask-worker"), &bare_args, dir.path("bare-worker.log"));
    assert_eq!(bare.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(bare.log().contains("--host tls://127.0.0.1: TLS needs credentials"), "{}", bare.log());

    let mut with_protocol = as_str(&ours_flags);
    with_protocol.extend(["--protocol", "tls"]);
    let (_sched, address) = start_scheduler(&dir, &with_protocol);
    assert!(address.starts_with("tls://127.0.0.1:"), "the scheduler file says tls://: {address}");

    // Two workers with the cluster's credentials, one under a nanny.
    let w = binary("dask-worker");
    let mut args = vec![address.as_str(), "--name", "a", "--no-nanny"];
    args.extend(as_str(&ours_flags));
    let _a = Proc::start(&w, &args, dir.path("a.log"));
    let mut args = vec![address.as_str(), "--name", "b"];
    args.extend(as_str(&ours_flags));
    let _b = Proc::start(&w, &args, dir.path("b.log"));
    let client =
        Client::connect_with_security(&address, Security::from_files(&ours.ca, &ours.cert, Some(&ours.key)).unwrap())
            .unwrap();
    client.wait_for_workers(2, Some(LONG)).unwrap();
    let info = client.scheduler_info().unwrap();
    assert!(info.workers.iter().all(|w| w.address.starts_with("tls://")), "{:?}", info.workers);
    let on = |name: &str| dask::SubmitOptions { workers: vec![name.into()], ..Default::default() };
    let x = client.submit_with(inc, (1,), on("a")).unwrap();
    let y = client.submit_with(inc, (&x,), on("b")).unwrap();
    assert_eq!(y.result_timeout(LONG).unwrap(), 3);

    // A worker without credentials for a tls:// scheduler: told at once what to pass.
    let mut bare = Proc::start(&w, &[&address, "--no-nanny"], dir.path("bare.log"));
    assert_eq!(bare.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(bare.log().contains("--tls-ca-file"), "{}", bare.log());

    // A worker given the tcp:// form of the TLS scheduler's address: told to use tls://.
    let plain = address.replacen("tls://", "tcp://", 1);
    let mut wrong = Proc::start(&w, &[&plain, "--no-nanny"], dir.path("wrong.log"));
    assert_eq!(wrong.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(wrong.log().contains("speaks TLS: use its tls:// address"), "{}", wrong.log());

    // A worker with another CA's certificate: refused, and its log says why.
    let theirs_flags = flags(&theirs.ca, &theirs.cert, &theirs.key);
    let mut args = vec![address.as_str(), "--no-nanny", "--death-timeout", "3s"];
    args.extend(as_str(&theirs_flags));
    let mut stranger = Proc::start(&w, &args, dir.path("stranger.log"));
    assert_eq!(stranger.wait_exit(LONG).and_then(|s| s.code()), Some(1), "{}", stranger.log());
    assert!(stranger.log().contains("not signed by this cluster's CA"), "{}", stranger.log());
    // The scheduler logged the refusal, and carries on.
    assert!(std::fs::read_to_string(dir.path("scheduler.log")).unwrap().contains("refused a connection"));
    assert_eq!(client.scheduler_info().unwrap().workers.len(), 2);

    // A half-given set of flags is an error naming what is missing.
    let mut half = Proc::start(&w, &[&address, "--tls-cert", &ours_flags[3]], dir.path("half.log"));
    assert_eq!(half.wait_exit(LONG).and_then(|s| s.code()), Some(1));
    assert!(half.log().contains("needs the cluster's CA"), "{}", half.log());
}

#[test]
fn the_dashboard_serves_https_given_dasks_dashboard_tls_keys() {
    let dir = TempDir::new("https");
    let ours = Security::temporary().unwrap();
    let files = ours.files(&dir.path("ours")).unwrap();
    let file = dir.path("scheduler.json");
    let (cert, key) = (files.cert.display().to_string(), files.key.display().to_string());
    let env = [
        ("DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__CERT", cert.as_str()),
        ("DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__KEY", key.as_str()),
    ];
    let args = ["--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0", "--scheduler-file"];
    let mut args = args.to_vec();
    args.push(file.to_str().unwrap());
    let sched = start_with_env(&binary("dask-scheduler"), &args, &env, dir.path("scheduler.log"));
    let address = wait_for_scheduler_file(&file, LONG);
    // The cluster itself is plain TCP: only the HTTP side is encrypted.
    assert!(address.starts_with("tcp://"), "{address}");
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let port = info["services"]["dashboard"].as_u64().expect("the dashboard's port in the scheduler file");
    let http = format!("127.0.0.1:{port}");

    assert_eq!(https_get(&http, "/health", &ours), (200, "ok".to_string()));
    let (status, page) = https_get(&http, "/status", &ours);
    assert_eq!(status, 200);
    assert!(page.contains("<html"), "{page}");
    assert!(sched.log().contains(&format!("https://127.0.0.1:{port}/status")), "{}", sched.log());

    // A worker reads the same keys for its own HTTP port, as dask's do, and the scheduler links
    // to it with https://.
    let args = [address.as_str(), "--no-nanny", "--dashboard-address", "127.0.0.1:0"];
    let _worker = start_with_env(&binary("dask-worker"), &args, &env, dir.path("worker.log"));
    let client = Client::connect(&address).unwrap();
    client.wait_for_workers(1, Some(LONG)).unwrap();
    let link = client.scheduler_info().unwrap().workers[0].dashboard.clone();
    let worker_http = link.strip_prefix("https://").expect("an https:// link to the worker").trim_end_matches('/');
    // Its /health says ok once the worker has heard back from the scheduler.
    let t = std::time::Instant::now();
    let mut health = https_get(worker_http, "/health", &ours);
    while health.0 != 200 && t.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(100));
        health = https_get(worker_http, "/health", &ours);
    }
    assert_eq!(health, (200, "ok".to_string()));

    // Plain HTTP gets no page, and the scheduler goes on serving HTTPS.
    use std::io::{Read, Write};
    let mut plain = std::net::TcpStream::connect(&http).unwrap();
    plain.set_read_timeout(Some(LONG)).unwrap();
    write!(plain, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = plain.read_to_end(&mut reply);
    assert!(!String::from_utf8_lossy(&reply).contains("200 OK"));
    assert_eq!(https_get(&http, "/health", &ours).0, 200);
}
