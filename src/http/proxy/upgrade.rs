//! Splicing two upgraded connections (a WebSocket through the proxy) once the upstream has
//! answered `101 Switching Protocols`.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

/// Waits for both connections to finish upgrading, then copies bytes both ways until both
/// sides are done; returns the bytes sent (upstream, downstream).
///
/// No idle limit applies: a WebSocket may legitimately stay quiet for a long time.
///
/// When copying fails, both connections are dropped without being shut down: a tunnel
/// stream from the [`Connector`](crate::connector::Connector) and a connection of the
/// public [`Server`](crate::http::server::Server) are then reset, so a break on one side
/// reaches the other as a failure, not as the clean end of the exchange.
/// [`ReverseProxy`](super::ReverseProxy) spawns this on a `101`; the task ends when either
/// side closes or fails.
///
/// # Errors
/// If either upgrade fails (a connection closed before switching) or copying fails.
pub async fn splice(downstream: OnUpgrade, upstream: OnUpgrade) -> std::io::Result<(u64, u64)> {
    let (downstream, upstream) =
        tokio::try_join!(downstream, upstream).map_err(std::io::Error::other)?;
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
}

/// [`splice`] as a task of its own, logging how it ended.
pub(super) fn spawn_splice(downstream: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        match splice(downstream, upstream).await {
            Ok((to_upstream, to_downstream)) => {
                debug!(to_upstream, to_downstream, "upgraded connection ended");
            }
            Err(error) => debug!(%error, "upgraded connection ended with an error"),
        }
    });
}
