//! Streams to edges attached to *another* relay of the cluster.
//!
//! With several relays behind one domain, a request can reach relay B while the edge it
//! names is attached to relay A (a shared [`Directory`](super::Directory) answers
//! [`Location::Elsewhere`](super::Location::Elsewhere)). B then opens the stream through
//! A, and hands it to hyper exactly as it would a local edge's stream.
//!
//! # Design, and why
//! - **Relays speak backhaul to each other.** B keeps one QUIC connection and backhaul
//!   session per peer relay ([`PeerPool`]), dialed on first use, reused by every request
//!   (QUIC multiplexes them; a second TCP-like connection per request would cost a
//!   handshake each), and dialed again after a loss, with backoff after failed dials.
//!   B opens the edge's *service* on that session with the edge's name and a hop count in
//!   the metadata (see [`wire`]). Reusing the session layer means limits, keep-alives,
//!   typed rejections and the `TunnelStream` type come for free: a forwarded stream is a
//!   `TunnelStream` like a local one, so HTTP/1.1 keep-alive, HTTP/2, WebSocket upgrades
//!   and large bodies need nothing new. The relay's HTTP layer sets forwarding headers
//!   before sending, so the client's address travels inside the stream.
//! - **The holder only serves its own edges.** A ([`PeerServer`]) looks the edge up in
//!   its local [`Registry`](super::Registry), never in the shared directory, and never
//!   forwards again: loops are impossible by construction. The hop count is checked
//!   anyway ([`MAX_HOPS`]), so a forged or buggy peer is refused, not followed.
//! - **A splices, keeping ends and failures.** A opens the edge's stream first (so an edge
//!   that refuses is reported to B as the edge's own refusal), then accepts B's open and
//!   copies both ways. A clean end is passed on as a clean end; a failure on one leg
//!   resets the other (see [`splice`]): B never mistakes a truncated body for a whole one.
//! - **Authentication by cluster secret.** The dialing relay's first open presents the
//!   secret ([`ClusterSecret`], compared in constant time, as edge tokens are); a relay
//!   that gets anything else first answers `Unauthorized` and closes the connection, so
//!   an unauthenticated peer gets nothing routed. Until then the connection has the small
//!   limits of an unregistered edge. Mutual TLS would need a client certificate per relay
//!   and a CA to manage; one secret from the cluster's configuration is what operators
//!   already distribute for edge tokens.
//! - **A separate endpoint, on its own ALPN.** Peers are served on an endpoint of their
//!   own ([`server_endpoint`], offering [`PEER_ALPN`]), so the peer port can stay on the
//!   cluster's private network while the edge port is public, and the edge acceptor's
//!   admission limits (tuned for fleets of edges) do not apply to the few peers.
//!   [`PeerServer::serve_connection`] serves a single connection, for a relay that
//!   accepts both protocols on one port and dispatches on the negotiated ALPN.
//! - **Failures are typed and bounded.** A peer that cannot be dialed within
//!   [`PeerPool::with_connect_timeout`], or whose session is lost, is
//!   [`Error::PeerUnreachable`]; a refused secret is
//!   [`Error::PeerRefused`]; an edge A does not hold is
//!   [`Error::EdgeNotAttached`]; the edge's own refusal
//!   stays [`Error::StreamRejected`]. Peer connections use
//!   a short QUIC idle timeout ([`DEFAULT_IDLE_TIMEOUT`]), so a peer that vanished
//!   without a word fails its streams within it rather than hanging them.
//!
//! # Example
//! ```no_run
//! use backhaul::relay::peer::{self, ClusterSecret, PeerPool, PeerServer};
//! use backhaul::relay::{Directory, EdgeName, Location, Registry};
//! use backhaul::quic::Identity;
//!
//! # async fn run(registry: Registry, identity: Identity, peer_addr: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let secret = ClusterSecret::new("one secret for the cluster")?;
//! // Serve this relay's edges to its peers…
//! let trusted = identity.cert_chain.clone();
//! let endpoint = peer::server_endpoint("0.0.0.0:4434".parse()?, identity)?;
//! tokio::spawn(PeerServer::new(registry.clone(), secret.clone()).serve(endpoint));
//! // …and reach theirs.
//! let pool = PeerPool::new(peer::client_endpoint(&trusted)?, secret);
//! if let Location::Unknown = registry.locate("kiosk").await? {
//!     // A shared directory would say `Elsewhere(relay)` and give `peer_addr`.
//!     let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
//!         .build::<_, http_body_util::Empty<bytes::Bytes>>(pool.connector(peer_addr, EdgeName::new("kiosk")?));
//!     let response = http.get("http://web/status".parse()?).await?;
//!     println!("{}", response.status());
//! }
//! # Ok(()) }
//! ```

mod connector;
mod pool;
mod secret;
mod server;
pub mod splice;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

pub use connector::PeerConnector;
pub use pool::PeerPool;
pub use secret::ClusterSecret;
pub use server::{PeerCounts, PeerServer, PeerStats, ServePeerConnection, ServePeers};
pub use splice::SPLICE_FAILED;
pub use wire::{MAX_HOPS, PEER_SERVICE};

use crate::error::Error;
use crate::quic::{transport_config, Identity, INITIAL_STREAMS};
use crate::relay::RelayId;

/// The ALPN protocol of relay-to-relay connections.
pub const PEER_ALPN: &[u8] = b"backhaul-peer/1";

/// QUIC close code for a connection refused as a peer (no hello, wrong secret).
pub const CLOSE_PEER_REFUSED: u32 = 0x12;

/// How long a dial to a peer may take by default: QUIC and session handshakes and the
/// hello together.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an open through a peer may wait for its answer by default.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The QUIC idle timeout of peer connections made with [`client_config`]: a peer silent
/// this long is gone, and every stream through it fails. Keep-alives go every second.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server config for peer connections: the relay's
/// ([`relay::server_config`](super::server_config): small limits until admitted) offering
/// [`PEER_ALPN`].
///
/// # Errors
/// [`Error::Transport`] if the certificate or key is unusable.
pub fn server_config(identity: Identity) -> Result<quinn::ServerConfig, Error> {
    super::server_config(identity, PEER_ALPN)
}

/// An endpoint on `addr` serving peers with [`server_config`].
///
/// # Errors
/// [`Error::Transport`] if the socket cannot be bound or the identity is unusable.
pub fn server_endpoint(addr: SocketAddr, identity: Identity) -> Result<quinn::Endpoint, Error> {
    crate::quic::server_endpoint_with_config(addr, server_config(identity)?)
}

/// A client config for dialing peers that trust `trusted` certificates: [`PEER_ALPN`],
/// keep-alives every second and an idle timeout of `idle_timeout`.
///
/// # Errors
/// [`Error::Transport`] if a certificate is unusable or the timeout too large.
pub fn client_config(
    trusted: &[CertificateDer<'static>],
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, Error> {
    let mut config = crate::quic::client_config(trusted, PEER_ALPN)?;
    let mut transport = transport_config(INITIAL_STREAMS);
    transport.keep_alive_interval(Some(Duration::from_secs(1).min(idle_timeout / 2)));
    transport.max_idle_timeout(Some(idle_timeout.try_into().map_err(Error::transport)?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// An endpoint for dialing peers, with [`client_config`] and [`DEFAULT_IDLE_TIMEOUT`].
///
/// # Errors
/// [`Error::Transport`] if the socket cannot be bound or a certificate is unusable.
pub fn client_endpoint(trusted: &[CertificateDer<'static>]) -> Result<quinn::Endpoint, Error> {
    let mut endpoint = crate::quic::client_endpoint(trusted, PEER_ALPN)?;
    endpoint.set_default_client_config(client_config(trusted, DEFAULT_IDLE_TIMEOUT)?);
    Ok(endpoint)
}

/// Where the relays of a cluster take peer connections: what a forwarder needs, besides a
/// [`PeerPool`], to follow a [`Location::Elsewhere`](super::Location::Elsewhere) answer
/// (e.g. [`TcpForward::with_peers`](crate::tcp::TcpForward::with_peers)).
///
/// The shared directory knows (`RedisDirectory`, feature `redis`, publishes each relay's
/// address); a fixed cluster can use a `HashMap<RelayId, SocketAddr>`.
pub trait PeerAddresses: Send + Sync + 'static {
    /// The peer address `relay` published (`IP:PORT` or `HOST:PORT`), if it is known and
    /// alive.
    fn peer_address(&self, relay: &RelayId) -> Option<String>;
}

impl PeerAddresses for HashMap<RelayId, SocketAddr> {
    fn peer_address(&self, relay: &RelayId) -> Option<String> {
        self.get(relay).map(ToString::to_string)
    }
}

impl<T: PeerAddresses + ?Sized> PeerAddresses for Arc<T> {
    fn peer_address(&self, relay: &RelayId) -> Option<String> {
        (**self).peer_address(relay)
    }
}

/// A published peer address as a socket address: `IP:PORT` as is, `HOST:PORT` resolved
/// now (the first address the resolver gives).
///
/// # Errors
/// The resolver's error, or [`std::io::ErrorKind::NotFound`] if the name resolves to no
/// address.
pub async fn resolve_peer_address(address: &str) -> std::io::Result<SocketAddr> {
    if let Ok(address) = address.parse() {
        return Ok(address);
    }
    tokio::net::lookup_host(address)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "resolves to no address"))
}
