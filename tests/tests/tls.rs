//! Tier 3: `dask-scheduler` and `dask-worker` with dask's TLS flags, and the errors someone
//! without the cluster's credentials gets.
use std::time::Duration;

use dask::builtins::inc;
use dask::{Client, Security};
use dask_system_tests::{Proc, TempDir, binary, start_scheduler};

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
