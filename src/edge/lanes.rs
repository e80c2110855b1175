//! Keeping a session's lanes: further QUIC connections to the relay that carry its
//! streams (see [`quic::lane`](crate::quic::lane)).
//!
//! Once registered, an [`Edge`](super::Edge) asked for more than one connection dials the
//! same relay address again and joins each new connection to its session; a lane that
//! closes is dialed again (with [`Backoff`] while dialing fails). Lanes are a speed-up,
//! never a condition: a relay that does not take them, refuses them or has a lower limit
//! leaves the session on the connections it has, and nothing here ends the session.

use std::convert::Infallible;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tracing::{debug, info};

use super::Backoff;
use crate::quic::lane::{join, JoinAnswer, JoinError, LaneKey};
use crate::transport::QuinnConnection;

/// The first and the longest wait before dialing a lost or failed lane again.
const LANE_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(30));

/// Where and how lanes are dialed: the session's relay, as the session was.
pub(super) struct LaneDialer<'a> {
    pub(super) endpoint: &'a quinn::Endpoint,
    pub(super) tls: &'a quinn::ClientConfig,
    pub(super) relay: SocketAddr,
    pub(super) server_name: &'a str,
    /// Bound on one lane's QUIC handshake and join together.
    pub(super) timeout: Duration,
}

type Closing = Pin<Box<dyn std::future::Future<Output = quinn::Connection> + Send>>;

/// Keeps `session` on `wanted` connections, its own included, for as long as it is
/// polled (it never resolves: drop it when the session ends).
pub(super) async fn keep_lanes(
    dialer: LaneDialer<'_>,
    session: QuinnConnection,
    mut wanted: usize,
) -> Infallible {
    let stopped = std::future::pending::<Infallible>;
    let Some(key) = LaneKey::of(session.inner()) else {
        return stopped().await;
    };
    let mut backoff = Backoff::new(LANE_BACKOFF.0, LANE_BACKOFF.1);
    let mut lanes: Vec<Closing> = Vec::new();
    loop {
        while lanes.len() + 1 < wanted {
            match dial_lane(&dialer, &key).await {
                Ok(lane) => {
                    if session.add_lane(lane.clone(), wanted).is_err() {
                        lane.close(0u32.into(), b"not needed");
                        break;
                    }
                    debug!(connections = session.connections(), "lane joined");
                    backoff.reset();
                    lanes.push(Box::pin(async move {
                        lane.closed().await;
                        lane
                    }));
                }
                Err(LaneFailure::Final(why)) => {
                    info!(
                        connections = session.connections(),
                        why, "no more lanes for this session"
                    );
                    if lanes.is_empty() {
                        return stopped().await;
                    }
                    // Keep the lanes the relay took (and replace them if lost), but do
                    // not ask for more.
                    wanted = lanes.len() + 1;
                    break;
                }
                Err(LaneFailure::Transient(error)) => {
                    let delay = backoff.next_delay();
                    debug!(%error, ?delay, "lane not dialed; trying again");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        if lanes.is_empty() {
            return stopped().await;
        }
        let closed = poll_fn(|cx| {
            for (index, lane) in lanes.iter_mut().enumerate() {
                if let Poll::Ready(connection) = lane.as_mut().poll(cx) {
                    return Poll::Ready((index, connection));
                }
            }
            Poll::Pending
        })
        .await;
        let (index, connection) = closed;
        drop(lanes.swap_remove(index));
        session.forget_lane(&connection);
        debug!(reason = ?connection.close_reason(), "lane closed; dialing it again");
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Why a lane was not added.
enum LaneFailure {
    /// Asking again will not help: the relay takes no (more) lanes for this session.
    Final(&'static str),
    /// The dial or the handshake failed: try again later.
    Transient(String),
}

async fn dial_lane(
    dialer: &LaneDialer<'_>,
    key: &LaneKey,
) -> Result<quinn::Connection, LaneFailure> {
    let connecting = dialer
        .endpoint
        .connect_with(dialer.tls.clone(), dialer.relay, dialer.server_name)
        .map_err(|error| LaneFailure::Transient(error.to_string()))?;
    let joining = async {
        let lane = connecting
            .await
            .map_err(|error| LaneFailure::Transient(error.to_string()))?;
        match join(&lane, key).await {
            Ok(()) => Ok(lane),
            Err(error) => {
                lane.close(0u32.into(), b"lane not joined");
                Err(match error {
                    JoinError::Refused(JoinAnswer::Full) => {
                        LaneFailure::Final("the relay allows no more connections per session")
                    }
                    JoinError::Refused(_) => {
                        LaneFailure::Final("the relay does not know this session's lanes")
                    }
                    JoinError::NotSupported(_) => {
                        LaneFailure::Final("the relay does not take lanes")
                    }
                    JoinError::Transport(error) => LaneFailure::Transient(error.to_string()),
                })
            }
        }
    };
    tokio::time::timeout(dialer.timeout, joining)
        .await
        .unwrap_or_else(|_| Err(LaneFailure::Final("the relay did not answer a lane's join")))
}
