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
