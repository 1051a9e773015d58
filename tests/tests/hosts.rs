//! Tier 3 across hosts: the scheduler and two workers each in their own network namespace,
//! joined by a bridge, so every address is a real non-loopback one. The namespaces, links and
//! bridge are made by the test and removed after it; traffic goes only to them. Where they
//! cannot be made (not root, no `ip`), the test says so and skips.
use std::process::Command;
use std::time::{Duration, Instant};

use dask::builtins::inc;
use dask::{Client, Security, SubmitOptions};
use dask_system_tests::{Proc, TempDir, binary, wait_for_scheduler_file};

const LONG: Duration = Duration::from_secs(60);

/// Runs `ip ARGS`; whether it worked.
fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).output().is_ok_and(|o| o.status.success())
}

/// The addresses and routes of this host and of each namespace, for a failure to show.
fn routes(hosts: &Hosts) -> String {
    let show = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut out = format!("host:\n{}{}", show(&["-br", "addr"]), show(&["route"]));
    for (ns, _) in &hosts.hosts {
        out += &format!("{ns}:\n{}{}", show(&["-n", ns, "-br", "addr"]), show(&["-n", ns, "route"]));
    }
    out
}

/// Network namespaces on one bridge, removed when dropped.
struct Hosts {
    bridge: String,
    /// (namespace, root-side link)
    hosts: Vec<(String, String)>,
    subnet: String,
}

impl Hosts {
    /// A bridge at SUBNET.1 and one namespace per name at SUBNET.2, .3, ...; `None` (with the
    /// reason) where namespaces cannot be made here.
    fn new(names: &[&str]) -> Result<Hosts, String> {
        let id = std::process::id() % 100_000;
        let subnet = format!("10.231.{}", id % 250);
        let mut h = Hosts { bridge: format!("dbr{id}"), hosts: Vec::new(), subnet };
        let br = h.bridge.clone();
        let cidr = format!("{}.1/24", h.subnet);
        if !(ip(&["link", "add", &br, "type", "bridge"])
            && ip(&["addr", "add", &cidr, "dev", &br])
            && ip(&["link", "set", &br, "up"]))
        {
            return Err("cannot make a bridge (needs root and iproute2)".into());
        }
        for (i, name) in names.iter().enumerate() {
            let ns = format!("dask-{id}-{name}");
            let link = format!("dv{id}{i}");
            let peer = format!("dp{id}{i}");
            let addr = format!("{}.{}/24", h.subnet, i + 2);
            h.hosts.push((ns.clone(), link.clone()));
            let ok = ip(&["netns", "add", &ns])
                && ip(&["link", "add", &link, "type", "veth", "peer", "name", &peer])
                && ip(&["link", "set", &peer, "netns", &ns])
                && ip(&["-n", &ns, "link", "set", &peer, "name", "eth0"])
                && ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])
                && ip(&["-n", &ns, "link", "set", "eth0", "up"])
                && ip(&["-n", &ns, "link", "set", "lo", "up"])
                && ip(&["link", "set", &link, "master", &br])
                && ip(&["link", "set", &link, "up"]);
            if !ok {
                return Err(format!("cannot make network namespace {ns}"));
            }
        }
        Ok(h)
    }

    /// The address of host `i` (0: the first name).
    fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 2)
    }

    /// Starts `program ARGS` on host `i`.
    fn start(&self, i: usize, program: &std::path::Path, args: &[&str], log: std::path::PathBuf) -> Proc {
        let mut all = vec!["netns", "exec", self.hosts[i].0.as_str(), program.to_str().unwrap()];
        all.extend_from_slice(args);
        Proc::start(std::path::Path::new("ip"), &all, log)
    }

    /// Pulls host `i`'s cable: its link goes, its processes stay (they keep the namespace).
    fn unplug(&self, i: usize) {
        assert!(ip(&["link", "del", &self.hosts[i].1]), "delete the link of host {i}");
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (ns, link) in &self.hosts {
            let _ = ip(&["link", "del", link]);
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

#[test]
fn a_cluster_across_hosts_over_tls_survives_a_host_that_drops_off_the_network() {
    let hosts = match Hosts::new(&["sched", "w1", "w2"]) {
        Ok(h) => h,
        Err(why) => {
            eprintln!("SKIPPED: {why}: this test needs network namespaces (run as root with iproute2)");
            return;
        }
    };
    let dir = TempDir::new("hosts");
    let tls = Security::temporary().unwrap().files(&dir.path("tls")).unwrap();
    let creds = [
        "--tls-ca-file",
        tls.ca.to_str().unwrap(),
        "--tls-cert",
        tls.cert.to_str().unwrap(),
        "--tls-key",
        tls.key.to_str().unwrap(),
    ];
    let file = dir.path("scheduler.json");
    let (s, w) = (binary("dask-scheduler"), binary("dask-worker"));

    // The scheduler listens on all of its host's interfaces and advertises its address there.
    let mut args = vec!["--host", "0.0.0.0", "--port", "0", "--no-dashboard", "--worker-ttl", "5s"];
    args.extend(["--scheduler-file", file.to_str().unwrap()]);
    args.extend(creds);
    let _sched = hosts.start(0, &s, &args, dir.path("scheduler.log"));
    let address = wait_for_scheduler_file(&file, LONG);
    assert_eq!(address.rsplit_once(':').unwrap().0, format!("tls://{}", hosts.addr(0)), "advertised: {address}");

    // w1 names its interface; w2 listens everywhere and gives a contact address, as behind
    // address translation.
    let mut args = vec!["--scheduler-file", file.to_str().unwrap(), "--no-nanny", "--name", "w1"];
    args.extend(["--interface", "eth0", "--no-dashboard", "--nthreads", "1"]);
    args.extend(creds);
    let _w1 = hosts.start(1, &w, &args, dir.path("w1.log"));
    let port = 40_000 + (std::process::id() % 20_000) as u16;
    let (listen, contact) = (format!("tcp://0.0.0.0:{port}"), format!("tcp://{}:{port}", hosts.addr(2)));
    let mut args = vec!["--scheduler-file", file.to_str().unwrap(), "--no-nanny", "--name", "w2"];
    args.extend(["--listen-address", &listen, "--contact-address", &contact, "--no-dashboard", "--nthreads", "1"]);
    args.extend(creds);
    let _w2 = hosts.start(2, &w, &args, dir.path("w2.log"));

    // The client is on this host, reaching them over the bridge.
    let security = Security::from_files(&tls.ca, &tls.cert, Some(&tls.key)).unwrap();
    let client = Client::connect_with_security(&address, security).unwrap();
    // What each process said, for a failure to show.
    let logs = || {
        ["scheduler", "w1", "w2"]
            .iter()
            .map(|n| {
                format!("--- {n}.log:\n{}", std::fs::read_to_string(dir.path(&format!("{n}.log"))).unwrap_or_default())
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    if let Err(e) = client.wait_for_workers(2, Some(LONG)) {
        panic!("{e}; the routes here:\n{}\n{}", routes(&hosts), logs());
    }
    let info = client.scheduler_info().unwrap();
    let at = |name: &str| info.workers.iter().find(|x| x.name == name).unwrap().address.clone();
    assert_eq!(at("w1").rsplit_once(':').unwrap().0, format!("tls://{}", hosts.addr(1)));
    assert_eq!(at("w2"), format!("tls://{}:{port}", hosts.addr(2)), "w2 advertises its contact address");

    // Values cross between the hosts both ways.
    let on =
        |name: &str| SubmitOptions { workers: vec![name.into()], allow_other_workers: false, ..Default::default() };
    let a = client.submit_with(inc, (1,), on("w1")).unwrap();
    let b = client.submit_with(inc, (&a,), on("w2")).unwrap();
    let c = client.submit_with(inc, (&b,), on("w1")).unwrap();
    assert_eq!(c.result_timeout(LONG).unwrap(), 4);

    // w2's host drops off the network: its process lives on, unreachable. The scheduler notices
    // (no heartbeat within --worker-ttl) and the value only w2 held is computed again on w1.
    let loosely = SubmitOptions { workers: vec!["w2".into()], allow_other_workers: true, ..Default::default() };
    let held = client.submit_with(inc, (100,), loosely).unwrap();
    assert_eq!(held.result_timeout(LONG).unwrap(), 101);
    let holders = client.who_has(std::slice::from_ref(&held)).unwrap();
    assert_eq!(holders.get(held.key()).cloned().unwrap_or_default(), vec![at("w2")], "held is on w2 only");
    let t = Instant::now();
    hosts.unplug(2);
    while client.scheduler_info().unwrap().workers.len() > 1 {
        assert!(t.elapsed() < LONG, "the scheduler never noticed w2 was gone");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("w2 removed {:.1} s after its link went", t.elapsed().as_secs_f64());
    let again = client.submit(inc, (&held,)).unwrap();
    assert_eq!(again.result_timeout(LONG).unwrap(), 102, "held was recomputed on w1");
    let log = std::fs::read_to_string(dir.path("scheduler.log")).unwrap();
    assert!(log.contains("w2") || log.contains(&hosts.addr(2)), "the scheduler logged w2 leaving:\n{log}");
}
