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
