//! Running tonic servers with a shutdown that cannot hang.
use std::time::Duration;

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

/// Accepted connections with `TCP_NODELAY` set: tonic's `tcp_nodelay` applies only to sockets
/// it binds itself, and Nagle's algorithm with delayed ACKs adds ~40 ms to small messages.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
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
