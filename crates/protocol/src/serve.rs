//! Running tonic servers with a shutdown that cannot hang.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Runs a tonic server until `shutdown`; then gives open streams (clients that are still
/// connected) a moment to finish before dropping their connections.
pub async fn serve_until(
    server: impl std::future::Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
    shutdown: &CancellationToken,
    what: &'static str,
) {
    let mut task = tokio::spawn(server);
    tokio::select! {
        r = &mut task => {
            if let Ok(Err(e)) = r {
                tracing::error!(error = %e, "{what} server stopped");
            }
            shutdown.cancel();
            return;
        }
        _ = shutdown.cancelled() => {}
    }
    tracing::debug!("{what}: shutting down");
    if tokio::time::timeout(Duration::from_millis(500), &mut task).await.is_err() {
        task.abort();
    }
}

/// What a server accepts: how many connections at once, and how long a new connection may take
/// to send its first bytes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once, at most; beyond it new ones are closed at once (and logged).
    pub max_connections: usize,
    /// A connection that has not sent its HTTP/2 preface by then is closed.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 10_000, handshake_timeout: Duration::from_secs(10) }
    }
}

/// File descriptors kept for everything but accepted connections (files, peers, the runtime).
const RESERVED_FDS: u64 = 256;

/// Raises this process's soft limit on open files to its hard limit, and returns how many
/// connections fit under it (after [`RESERVED_FDS`]). `None` where there is no such limit.
pub fn raise_fd_limit() -> Option<usize> {
    #[cfg(unix)]
    {
        let limit = rlimit::increase_nofile_limit(u64::MAX).ok()?;
        Some(limit.saturating_sub(RESERVED_FDS).max(16) as usize)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Logs at most one line per interval, counting what it held back.
struct Throttle {
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Throttle { last: None, held: 0 }
    }

    /// `Some(n)` when a line is due: `n` similar events were not logged since the last one.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < Self::EVERY) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// Accepted connections, with `TCP_NODELAY` set (tonic's `tcp_nodelay` applies only to sockets
/// it binds itself, and Nagle's algorithm with delayed ACKs adds ~40 ms to small messages).
///
/// Accept errors (out of file descriptors, mostly) are logged and followed by a pause that
/// doubles up to a second: retrying at once spun a core while 20,000 idle sockets held every
/// descriptor. Connections past `limits.max_connections` are closed at once, and so is one that
/// sends nothing for `limits.handshake_timeout`.
///
/// With `security`, each connection is TLS with mutual authentication: a peer without a
/// certificate signed by the cluster's CA is refused in the handshake (and logged).
pub fn incoming(
    listener: tokio::net::TcpListener,
    limits: Limits,
    what: &'static str,
    security: Option<crate::tls::Security>,
) -> impl tokio_stream::Stream<Item = std::io::Result<Conn>> + Send + 'static {
    let live = Arc::new(AtomicUsize::new(0));
    let state = (listener, live, Throttle::new(), Throttle::new());
    futures_util::stream::unfold(state, move |(listener, live, mut errors, mut refused)| {
        let security = security.clone();
        async move {
            let mut pause = Duration::from_millis(10);
            loop {
                match listener.accept().await {
                    Ok((conn, peer)) => {
                        pause = Duration::from_millis(10);
                        if live.load(Ordering::Relaxed) >= limits.max_connections {
                            if let Some(held) = refused.due() {
                                tracing::warn!(
                                    %peer,
                                    open = limits.max_connections,
                                    refused_since_last_line = held,
                                    "{what}: too many connections; closing new ones (raise \
                                     distributed.scheduler.max-connections or --max-connections)"
                                );
                            }
                            drop(conn);
                            continue;
                        }
                        if let Err(e) = conn.set_nodelay(true) {
                            tracing::debug!(%peer, error = %e, "{what}: a connection failed at once");
                            continue;
                        }
                        live.fetch_add(1, Ordering::Relaxed);
                        let info = tonic::transport::server::TcpConnectInfo {
                            local_addr: conn.local_addr().ok(),
                            remote_addr: Some(peer),
                        };
                        let inner = match &security {
                            Some(s) => s.accept(conn, what),
                            None => crate::tls::Stream::Plain(conn),
                        };
                        let conn = Conn {
                            inner,
                            info,
                            _open: Open(live.clone()),
                            handshake: Some(Box::pin(tokio::time::sleep(limits.handshake_timeout))),
                            seen: 0,
                        };
                        return Some((Ok(conn), (listener, live, errors, refused)));
                    }
                    Err(e) => {
                        if let Some(held) = errors.due() {
                            tracing::error!(
                                error = %e,
                                open = live.load(Ordering::Relaxed),
                                failures_since_last_line = held,
                                "{what}: accepting a connection failed; pausing {pause:?} (out of file \
                                 descriptors? raise `ulimit -n` or lower max-connections)"
                            );
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
            }
        }
    })
}

/// Counts an open connection until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted connection: counted while open, and closed if it sends no HTTP/2 preface in
/// time.
pub struct Conn {
    inner: crate::tls::Stream,
    info: tonic::transport::server::TcpConnectInfo,
    _open: Open,
    /// Until the preface has arrived.
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
    seen: usize,
}

/// Bytes of HTTP/2's client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE: usize = 24;

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.handshake.is_some() {
            self.seen += buf.filled().len() - before;
            if self.seen >= PREFACE {
                self.handshake = None;
            } else if let Some(deadline) = &mut self.handshake
                && deadline.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the peer sent no HTTP/2 preface in time",
                )));
            }
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

/// HTTP/2 flow-control windows. The defaults (64 KiB) cap a stream at one window per round
/// trip; values of hundreds of MB need far more in flight.
const STREAM_WINDOW: u32 = 32 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// Larger HTTP/2 frames: fewer headers and wake-ups per MiB of data.
const FRAME_SIZE: u32 = 1 << 20;

/// A tonic server with this project's transport settings.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some(FRAME_SIZE))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// A channel to `address`'s gRPC service: TLS with these credentials for a `tls://` address
/// (an error without them), plain TCP for `tcp://`.
pub async fn connect(
    endpoint: &tonic::transport::Endpoint,
    address: &crate::addr::Address,
    security: Option<&crate::tls::Security>,
) -> Result<tonic::transport::Channel, ConnectError> {
    if !address.tls {
        if security.is_some() {
            tracing::debug!(%address, "a tcp:// address: connecting without TLS although credentials were given");
        }
        return match endpoint.connect().await {
            Ok(c) => Ok(c),
            // A server that answers in TLS will not start answering in HTTP/2.
            Err(e) => match tls_behind_tcp(address).await {
                Some(tls) => {
                    tracing::debug!(error = %crate::error_chain(&e), "the server speaks TLS");
                    Err(tls)
                }
                None => Err(e.into()),
            },
        };
    }
    let security = security.ok_or_else(|| ConnectError::NoCredentials(address.to_string()))?.clone();
    let (host, port) = (address.host.clone(), address.port);
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let (security, host) = (security.clone(), host.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = security.connect(tcp, &host).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    endpoint.connect_with_connector(connector).await.map_err(|e| {
        let text = crate::error_chain(&e);
        if crate::tls::is_refusal(&text) {
            ConnectError::Refused(crate::tls::explain(&text, &address.to_string(), crate::tls::Side::Client))
        } else {
            e.into()
        }
    })
}

/// [`ConnectError::SpeaksTls`] when `address` is a `tcp://` one whose server answers in TLS:
/// asked once something failed there, to say why (and that retrying will not help).
pub async fn tls_behind_tcp(address: &crate::addr::Address) -> Option<ConnectError> {
    (!address.tls && speaks_tls(&address.host, address.port).await)
        .then(|| ConnectError::SpeaksTls(address.to_string()))
}

/// Whether the server at `host:port` answers the HTTP/2 preface with a TLS alert (a TLS
/// server given a `tcp://` address).
async fn speaks_tls(host: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.ok()?;
        let mut first = [0u8; 1];
        s.read_exact(&mut first).await.ok()?;
        // A TLS record of type alert (21) or handshake (22); HTTP/2 starts with a frame length.
        Some(matches!(first[0], 0x15 | 0x16))
    };
    tokio::time::timeout(Duration::from_secs(1), probe).await.ok().flatten().unwrap_or(false)
}

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "{0} is a tls:// address and no TLS credentials were given: pass --tls-ca-file, --tls-cert and --tls-key (or a Security), or set distributed.comm.tls.*"
    )]
    NoCredentials(String),
    #[error("the server at {0} speaks TLS: use its tls:// address, with the cluster's credentials")]
    SpeaksTls(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

impl ConnectError {
    /// Whether trying again cannot help: credentials missing or refused, or the wrong scheme.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ConnectError::Transport(_))
    }
}

/// A client endpoint with this project's transport settings: no Nagle delay, large windows,
/// keep-alives that notice a peer that stopped answering, and a connect timeout.
pub fn endpoint(
    address: &crate::addr::Address,
    connect_timeout: Duration,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(tonic::transport::Endpoint::from_shared(address.endpoint())?
        .tcp_nodelay(true)
        .connect_timeout(connect_timeout)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}
