//! Plain HTTP beside the gRPC port (dask's "dashboard" port, `--dashboard-address`): health,
//! Prometheus metrics and JSON pages. Handlers read snapshots their component publishes; they
//! never wait on an event loop.
use std::fmt::Write;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Where `--dashboard-address` says to listen: `:8787` (the component's host, that port),
/// `8787`, `host:port`, or `[v6]:port`.
pub fn parse_dashboard_address(spec: &str, default_host: &str) -> Result<(String, u16), String> {
    let spec = spec.trim();
    let spec = spec.strip_prefix("http://").unwrap_or(spec);
    let bad = || {
        format!("--dashboard-address {spec:?}: expected :PORT, PORT or HOST:PORT (e.g. :8787; port 0 picks a free one)")
    };
    let (host, port) = match spec.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p),
        None => ("", spec),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = if host.is_empty() { default_host } else { host };
    Ok((host.to_string(), port))
}

/// Binds the dashboard's port; one that is taken falls back to a free port with a warning, as
/// dask does (a second cluster on a host must still start).
pub async fn bind(host: &str, port: u16, what: &str) -> std::io::Result<TcpListener> {
    match TcpListener::bind((host, port)).await {
        Ok(l) => Ok(l),
        Err(e) if port != 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
            let l = TcpListener::bind((host, 0)).await?;
            let got = l.local_addr().map(|a| a.port()).unwrap_or(0);
            tracing::warn!(
                "port {port} is already in use (another cluster on this host?); {what} serves HTTP on port {got} instead"
            );
            Ok(l)
        }
        Err(e) => Err(e),
    }
}

/// Serves `router` on `listener` until `shutdown`: HTTPS with `https`, else plain HTTP.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
    https: Option<crate::tls::Https>,
) {
    let r = match https {
        Some(https) => {
            axum::serve(HttpsListener { tcp: listener, https }, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
        None => axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await,
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "the HTTP server stopped");
    }
}

/// A TCP listener whose connections speak HTTPS. Each handshake happens on the connection's
/// own task, so a slow or foreign peer holds up no other; a refused one is logged (throttled).
struct HttpsListener {
    tcp: TcpListener,
    https: crate::tls::Https,
}

impl axum::serve::Listener for HttpsListener {
    type Io = crate::tls::Stream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own TCP accept, with its handling of accept errors.
        let (tcp, at) = axum::serve::Listener::accept(&mut self.tcp).await;
        (self.https.accept(tcp, "HTTPS"), at)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Prometheus' text exposition format (version 0.0.4), written family by family.
#[derive(Debug, Default)]
pub struct Metrics {
    out: String,
}

/// The content type of [`Metrics::finish`]'s text.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Metrics {
    /// Starts a family: its `# HELP` and `# TYPE` lines (`kind`: gauge or counter).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        if value.is_finite() && value == value.trunc() && value.abs() < 1e15 {
            let _ = writeln!(self.out, " {}", value as i64);
        } else {
            let _ = writeln!(self.out, " {value}");
        }
        self
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboard_addresses_read_as_dask_reads_them() {
        assert_eq!(parse_dashboard_address(":8787", "0.0.0.0").unwrap(), ("0.0.0.0".into(), 8787));
        assert_eq!(parse_dashboard_address("8788", "10.0.0.1").unwrap(), ("10.0.0.1".into(), 8788));
        assert_eq!(parse_dashboard_address("127.0.0.1:0", "x").unwrap(), ("127.0.0.1".into(), 0));
        assert_eq!(parse_dashboard_address("[::1]:9000", "x").unwrap(), ("::1".into(), 9000));
        assert!(parse_dashboard_address("nonsense", "x").unwrap_err().contains("expected :PORT"));
    }

    /// A plain HTTP/1.1 `GET` over `stream`: the status line and the body.
    async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut stream: S) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
        stream.flush().await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn https_serves_with_the_certificate_and_refuses_plain_http() {
        let dir = std::env::temp_dir().join(format!("dask-https-{}", std::process::id()));
        let sec = crate::tls::Security::temporary().unwrap();
        let files = sec.files(&dir).unwrap();
        let https = crate::tls::Https::from_files(&files.cert, Some(&files.key)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, router, shutdown.clone(), Some(https)));

        // A client that trusts the CA gets the page. It offers a certificate the server does
        // not ask for: browsers and Prometheus have none.
        let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
        let reply = get(sec.connect(tcp, "127.0.0.1").await.unwrap()).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("ok"), "{reply}");

        // Plain HTTP to the HTTPS port gets no HTTP answer; the server carries on.
        let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
        let plain = tokio::time::timeout(std::time::Duration::from_secs(30), get(tcp));
        let reply = plain.await.expect("the server closes a plain HTTP connection").unwrap_or_default();
        assert!(!reply.contains("HTTP/1.1 200"), "{reply}");
        let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
        assert!(get(sec.connect(tcp, "127.0.0.1").await.unwrap()).await.unwrap().ends_with("ok"));

        // A key without its certificate is named.
        let mut settings = crate::config::Config::default();
        settings.set("distributed.scheduler.dashboard.tls.key", crate::config::Value::Str("k.pem".into()));
        let err = crate::tls::Https::from_config(&settings).unwrap_err();
        assert!(err.contains("not .cert"), "{err}");
        let err = crate::tls::Https::from_files(&dir.join("missing.pem"), None).unwrap_err().to_string();
        assert!(err.contains("the dashboard's certificate") && err.contains("missing.pem"), "{err}");

        shutdown.cancel();
        server.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn metrics_are_written_in_prometheus_text_format() {
        let mut m = Metrics::default();
        m.single("dask_scheduler_clients", "gauge", "Number of clients connected", 2.0);
        m.family("dask_scheduler_tasks", "gauge", "Tasks by state")
            .sample("dask_scheduler_tasks", &[("state", "memory")], 5.0)
            .sample("dask_scheduler_tasks", &[("state", "a\"b")], 0.5);
        assert_eq!(
            m.finish(),
            "# HELP dask_scheduler_clients Number of clients connected\n# TYPE dask_scheduler_clients gauge\n\
             dask_scheduler_clients 2\n# HELP dask_scheduler_tasks Tasks by state\n# TYPE dask_scheduler_tasks gauge\n\
             dask_scheduler_tasks{state=\"memory\"} 5\ndask_scheduler_tasks{state=\"a\\\"b\"} 0.5\n"
        );
    }
}
