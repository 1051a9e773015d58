//! Helpers for tests that run the real binaries: find (or build) them, start them with their
//! output in a log file, wait until they are ready, and kill whatever is left on drop.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A task function of "the user's own crate", known to `custom-worker` and to the tests.
#[dask::task]
pub fn triple(x: i64) -> i64 {
    x * 3
}

/// `n` bytes that do not compress, the same for the same `seed` (xorshift).
#[dask::task]
pub fn noise(seed: u64, n: u64) -> dask::Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n as usize);
    while (out.len() as u64) < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n as usize);
    dask::Bytes::from(out)
}

/// A checksum of a buffer: the sum of every 4096th byte (as dask's spill benchmark reads its
/// arrays), plus the length.
#[dask::task]
pub fn checksum(b: dask::Bytes) -> u64 {
    b.iter().step_by(4096).map(|x| *x as u64).sum::<u64>() + b.len() as u64
}

/// [`checksum`] of [`noise`], computed here (to check results against).
pub fn expected_checksum(seed: u64, n: u64) -> u64 {
    checksum::call(noise::call(seed, n))
}

/// Allocates `mb` MB, touches every page, holds it for `ms` milliseconds, returns the size.
#[dask::task]
pub fn hog(mb: u64, ms: u64) -> u64 {
    let v = vec![1u8; (mb << 20) as usize];
    std::thread::sleep(std::time::Duration::from_millis(ms));
    std::hint::black_box(&v);
    v.len() as u64
}

/// Exits the worker process at once, as a crash would.
#[dask::task]
pub fn die(code: i32) -> i64 {
    std::process::exit(code)
}

/// Panics while holding `mb` MB (a task error; the memory is freed and the worker lives on).
#[dask::task]
pub fn panic_holding(mb: u64) -> i64 {
    let v = vec![1u8; (mb << 20) as usize];
    std::hint::black_box(&v);
    panic!("gave up holding {mb} MB")
}

/// Appends one line to `path` each time it runs (to count executions across processes), sleeps
/// `ms`, and returns `x`.
#[dask::task]
pub fn counted(path: String, x: i64, ms: u64) -> i64 {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("open the count file");
    f.write_all(format!("{x}\n").as_bytes()).expect("count a run");
    std::thread::sleep(std::time::Duration::from_millis(ms));
    x
}

/// Lines in a file written by [`counted`].
pub fn runs_counted(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// The directory holding the workspace's binaries (next to the test executable).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Path of a workspace binary. The first call builds the server binaries (a no-op when they
/// are up to date), so a test never runs a stale binary.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "dask-scheduler", "-p", "dask-worker", "--bins"]);
        // The plugin library the upload_file tests send (a cdylib: `--lib`).
        cmd.args(["-p", "dask-test-plugin", "--lib"]);
        cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if bin_dir().ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build of the server binaries failed");
    });
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// The plugin library of `tests/plugin-lib`, built (with the binaries) on first use.
pub fn plugin_library() -> PathBuf {
    let _ = binary("dask-worker");
    let name = format!("{}dask_test_plugin{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// `(status, body)` of `GET path` on `host:port` (HTTP/1.1, one connection).
pub fn http_get(host: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host).expect("connect to the HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// `(status, body)` of `GET path` over HTTPS on `host:port`, trusting the CA of `security`.
pub fn https_get(host: &str, path: &str, security: &dask::Security) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let out = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(host).await.expect("connect to the HTTPS port");
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let mut s = security.connect(tcp, name).await.expect("TLS handshake with the HTTPS port");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await.unwrap().unwrap();
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("dask-rs-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (SIGKILL) on drop; its stderr goes to a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(program: &Path, args: &[&str], log: PathBuf) -> Proc {
        start_with_env(program, args, &[], log)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as systemd would.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for a file to exist and hold JSON with an address.
pub fn wait_for_scheduler_file(path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(a) = v["address"].as_str()
        {
            return a.to_string();
        }
        assert!(Instant::now() < deadline, "no scheduler file at {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `dask-scheduler --port 0 --scheduler-file DIR/scheduler.json`; returns it and its address.
pub fn start_scheduler(dir: &TempDir, extra: &[&str]) -> (Proc, String) {
    let file = dir.path("scheduler.json");
    let mut args = vec!["--host", "127.0.0.1", "--port", "0", "--scheduler-file", file.to_str().unwrap()];
    if !extra.iter().any(|a| a.contains("dashboard")) {
        // Its HTTP side on a port the system picks (the default is dask's :8787).
        args.extend(["--dashboard-address", ":0"]);
    }
    args.extend_from_slice(extra);
    let p = Proc::start(&binary("dask-scheduler"), &args, dir.path("scheduler.log"));
    let address = wait_for_scheduler_file(&file, Duration::from_secs(30));
    (p, address)
}

/// Sends a signal (`KILL`, `STOP`, `CONT`, `TERM`) to a process.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Whether a process is alive (not yet reaped counts as alive).
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// Starts a process with extra environment variables; its output goes to a log file.
pub fn start_with_env(program: &Path, args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Proc {
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
    Proc { child, log }
}
