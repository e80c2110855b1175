//! The relay side's building blocks: accept edges, authenticate them, know them by name.
//!
//! Every tunnel service needs the same things on its public relay, and they are easy to
//! get subtly wrong, so they live here rather than in each application:
//! - [`Acceptor`] takes QUIC connections from a quinn endpoint with admission control
//!   before any TLS work ([`Admission`]: caps on unregistered connections overall and per
//!   source, a handshake rate, a backoff for sources that failed to authenticate), small
//!   limits until the edge authenticated, and a deadline on the whole registration;
//! - authentication is a `tower::Service<`[`AuthRequest`]`>` answering an [`EdgeName`];
//!   [`Tokens`] (constant-time, per-name tokens) is the default. The edge registers with
//!   an ordinary open of `_register`, as quic-reverse 0.1.2 clients can;
//! - [`Registry`] holds the connected edges by name with epochs, so a stale session never
//!   removes a newer one; a [`TakeoverPolicy`] decides when a name is taken; each edge
//!   comes with a [`Connector`](crate::connector::Connector); changes are published as
//!   [`RegistryEvent`]s;
//! - callers look edges up through the [`Directory`] trait, so a directory shared by
//!   several relays replaces the in-process [`Registry`] without changing them;
//! - [`peer`] reaches edges attached to another relay of the cluster: a [`PeerPool`]
//!   of authenticated sessions to peer relays, and a [`PeerServer`] serving this relay's
//!   edges to them.
//! - [`NameClaims`] lets such a directory refuse a name another edge holds on another
//!   relay ([`Acceptor::with_claims`]); `cluster` (feature `redis`) is one, in Redis.
//!
//! What to route where (Host headers, paths, forwarding headers) stays the application's.
//!
//! # Example
//! A relay accepting one edge on 127.0.0.1, then opening a stream to it by name.
//! ```
//! use backhaul::quic::{client_endpoint, Identity, DEFAULT_ALPN};
//! use backhaul::relay::{self, registration_metadata, Acceptor, Directory, Location, Registry, Tokens, REGISTER_SERVICE};
//! use backhaul::{Config, QuinnConnection, Role, Session, SessionClient};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The relay.
//! let identity = Identity::self_signed(&["localhost"])?;
//! let trusted = identity.cert_chain.clone();
//! let endpoint = relay::server_endpoint("127.0.0.1:0".parse()?, identity, DEFAULT_ALPN)?;
//! let relay_addr = endpoint.local_addr()?;
//! let registry = Registry::new();
//! let mut events = registry.subscribe();
//! let acceptor = Acceptor::new(endpoint, registry.clone(), Tokens::parse(["alpha=s3cret"])?);
//! let serving = tokio::spawn(acceptor.serve());
//!
//! // An edge dials out and registers.
//! let dialer = client_endpoint(&trusted, DEFAULT_ALPN)?;
//! let connection = dialer.connect(relay_addr, "localhost")?.await?;
//! let session = Session::new(QuinnConnection::new(connection), Role::Client, Config::new());
//! let (edge, _edge_events) = SessionClient::with_events(session.start().await?);
//! edge.open(REGISTER_SERVICE, registration_metadata("alpha", "s3cret")).await?;
//!
//! // The relay knows it by name.
//! events.recv().await?;
//! assert!(matches!(registry.locate("alpha").await?, Location::Local(_)));
//! assert!(matches!(registry.locate("beta").await?, Location::Unknown));
//! serving.abort();
//! # Ok(()) }
//! ```

pub mod accept;
pub mod admission;
pub mod auth;
pub mod claims;
#[cfg(feature = "redis")]
pub mod cluster;
pub mod directory;
mod name;
pub mod peer;
pub mod registry;

pub use accept::{
    server_config, server_endpoint, AcceptCounts, AcceptStats, Acceptor, ServeEdges,
    CLOSE_SHUTDOWN, CLOSE_UNREGISTERED, DEFAULT_LOG_SUMMARY_INTERVAL, DEFAULT_REGISTER_TIMEOUT,
    UNREGISTERED_RECEIVE_WINDOW, UNREGISTERED_STREAMS,
};
pub use admission::{Admission, AdmissionConfig, Refusal, Source};
pub use auth::{registration_metadata, AuthRequest, Tokens, REGISTER_SERVICE};
pub use claims::{Claim, EdgeInstance, LocalClaims, NameClaims, INSTANCE_FIELD};
pub use directory::{Directory, Location, RelayId};
pub use name::{EdgeName, MAX_EDGE_NAME_LEN};
pub use peer::{ClusterSecret, PeerConnector, PeerPool, PeerServer};
pub use registry::{
    Attachment, DetachReason, EdgeHandle, Epoch, Registry, RegistryEvent, TakeoverPolicy,
    CLOSE_REPLACED, DEFAULT_TAKEOVER_PING_TIMEOUT,
};

/// Longest peer-given name or service quoted back in logs and refusals.
const SHOWN_NAME_LEN: usize = 64;

/// A peer-given name cut to a length fit for a log line (still to be logged with `?`).
pub(crate) fn shown(name: &str) -> String {
    match name.char_indices().nth(SHOWN_NAME_LEN) {
        Some((cut, _)) => format!("{}…", &name[..cut]),
        None => name.to_owned(),
    }
}
