//! What an open dashboard costs: map+gather on one cluster with its HTTP side on, with and
//! without a page listening to `/status/events`. The listener reads every update and renders
//! nothing (Chromium would take one of this machine's two cores), so the figures are the
//! scheduler's cost of publishing (the reader's own few reads are in the same process, so the
//! CPU figure with a page errs high). Runs alternate which goes first.
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Instant;

use dask::builtins::inc;
use dask::{Client, LocalCluster};

/// Figures of one pair: (tasks/s, this process's CPU seconds) without and with a listener, and
/// what the listener got: (updates, bytes).
pub struct Pair {
    pub without: (f64, f64),
    pub with: (f64, f64),
    pub received: (u64, u64),
}

pub fn pair(n: usize, listener_first: bool) -> Pair {
    let cluster = LocalCluster::builder()
        .n_workers(2)
        .threads_per_worker(1)
        .processes(true)
        .dashboard_address(Some("127.0.0.1:0"))
        .build()
        .expect("start a local cluster");
    let client = Client::connect(&cluster.scheduler_address()).unwrap();
    let http = cluster.http_address().expect("the dashboard is on");
    let warm = client.map(inc, 0..200).unwrap();
    client.gather(&warm).unwrap();
    drop(warm);
    super::settle(&client);
    let mut without = (0.0, 0.0);
    let mut with = (0.0, 0.0);
    let mut received = (0, 0);
    for listening in if listener_first { [true, false] } else { [false, true] } {
        if listening {
            let l = Listener::open(&http);
            with = map_gather(&client, n);
            received = l.close();
        } else {
            without = map_gather(&client, n);
        }
        super::settle(&client);
    }
    client.close();
    cluster.close();
    Pair { without, with, received }
}

/// map+gather of `n` tasks: tasks/s, and the CPU seconds this process (scheduler and client)
/// spent on it.
fn map_gather(client: &Client, n: usize) -> (f64, f64) {
    let cpu = dask_protocol::sys::process_cpu();
    let t = Instant::now();
    let fs = client.map(inc, 0..n as i64).unwrap();
    let v: Vec<i64> = client.gather(&fs).unwrap();
    let wall = t.elapsed().as_secs_f64();
    assert_eq!(v[n - 1], n as i64);
    ((n as f64) / wall, (dask_protocol::sys::process_cpu() - cpu).as_secs_f64())
}

/// A page that reads the dashboard's updates and draws nothing.
struct Listener {
    socket: TcpStream,
    reader: std::thread::JoinHandle<(u64, u64)>,
}

impl Listener {
    fn open(http: &str) -> Listener {
        let host = http.trim_start_matches("http://");
        let mut socket = TcpStream::connect(host).expect("connect to the dashboard");
        write!(socket, "GET /status/events HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
        let mut lines = BufReader::new(socket.try_clone().unwrap());
        // Its first message, so that it listens before the work starts.
        let mut line = String::new();
        while lines.read_line(&mut line).is_ok_and(|n| n > 0) && !line.starts_with("data: ") {
            line.clear();
        }
        let reader = std::thread::spawn(move || {
            let (mut updates, mut bytes) = (0, 0);
            let mut line = String::new();
            while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.starts_with("data: ") {
                    updates += 1;
                    bytes += line.len() as u64;
                }
                line.clear();
            }
            (updates, bytes)
        });
        Listener { socket, reader }
    }

    fn close(self) -> (u64, u64) {
        let _ = self.socket.shutdown(Shutdown::Both);
        self.reader.join().unwrap_or_default()
    }
}
