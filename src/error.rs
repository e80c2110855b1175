//! The crate's one error type.
//!
//! Each variant is a failure a caller can act on differently: retry later (`Timeout`,
//! `CapacityExceeded`), give up on this request (`StreamRejected`), reconnect
//! (`Disconnected`, `SessionClosed`), or report a broken peer (`Protocol`,
//! `ProtocolViolation`). A proxy maps them to 502/503/504 without parsing strings.

use std::fmt;
use std::io;

use crate::config::ConfigError;
use crate::protocol::{ProtocolError, RejectCode};

/// Everything that can go wrong in a session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peers share no protocol version.
    #[error("no common protocol version: we support {local:?}, the peer offered {remote}")]
    VersionMismatch {
        /// Versions we support.
        local: Vec<u16>,
        /// Version the peer offered or selected.
        remote: u16,
    },
    /// Something took longer than its configured bound.
    #[error("timed out waiting for {0}")]
    Timeout(TimeoutKind),
    /// The peer refused an open.
    #[error("stream rejected: {code}{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    StreamRejected {
        /// The peer's code.
        code: RejectCode,
        /// The peer's explanation.
        reason: Option<String>,
    },
    /// The peer accepted an open, then abandoned its stream before the stream reached
    /// this side (the service serving it panicked or was stopped): it will never come.
    #[error("the peer abandoned the stream before binding it{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    StreamAbandoned {
        /// The peer's explanation.
        reason: Option<String>,
    },
    /// The session was closed (by either side) and takes no more work.
    #[error("session closed")]
    SessionClosed,
    /// The connection to the peer was lost, or the peer stopped answering keep-alives.
    #[error("disconnected from peer")]
    Disconnected,
    /// The peer sent bytes that are not the protocol.
    #[error("malformed data from peer: {0}")]
    Protocol(#[from] ProtocolError),
    /// The peer sent a well-formed message where the protocol does not allow it.
    #[error("protocol violation: {0}")]
    ProtocolViolation(&'static str),
    /// A local limit is reached; try again when work finishes.
    #[error("capacity exceeded: {what} (limit {limit})")]
    CapacityExceeded {
        /// The limit reached.
        what: &'static str,
        /// Its configured value.
        limit: usize,
    },
    /// `accept_open`/`reject_open` named a request this side is not waiting to answer.
    #[error("no open request {request_id} is waiting for an answer")]
    UnknownRequest {
        /// The request id given.
        request_id: u64,
    },
    /// A logical stream id that cannot be used (0, or one already in use).
    #[error("logical stream id {0} is reserved or already in use")]
    InvalidStreamId(u64),
    /// The connector found no service for this URI.
    #[error("no service for URI {0}")]
    #[cfg(feature = "http")]
    UnroutableUri(http::Uri),
    /// An upstream URI a proxy cannot forward to (see
    /// [`http::proxy::to_local`](crate::http::proxy::to_local)).
    #[error("invalid upstream {uri}: {reason}")]
    #[cfg(feature = "http")]
    InvalidUpstream {
        /// The URI given.
        uri: http::Uri,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry of a trusted-proxy list is neither an IP address nor a CIDR block (see
    /// [`http::forwarded::TrustedProxies`](crate::http::forwarded::TrustedProxies)).
    #[error("{0:?} is not an IP address or CIDR block")]
    #[cfg(feature = "http")]
    InvalidTrustedProxy(String),
    /// [`Session::start`](crate::session::Session::start) was called a second time.
    #[error("session already started")]
    AlreadyStarted,
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The QUIC transport failed.
    #[error("transport error: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The relay presented a certificate this edge does not trust (unknown issuer, a
    /// different self-signed certificate, expired, or not issued for `server_name`).
    /// Retrying cannot help: the trusted certificates or the server name must change.
    #[error(
        "the relay at {relay} presented a certificate not trusted for {server_name:?}: {reason}"
    )]
    UntrustedCertificate {
        /// The address dialed.
        relay: std::net::SocketAddr,
        /// The name the certificate was checked against.
        server_name: String,
        /// Why the TLS stack refused it, as rustls put it (e.g. `invalid peer certificate:
        /// UnknownIssuer`).
        reason: String,
    },
    /// The relay refused this edge's registration for good (e.g. rejected its credentials
    /// as `Unauthorized`). Retrying cannot help: the credentials must change.
    #[error("registration refused: {0}")]
    RegistrationRefused(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An edge's registration failed in a way that may pass on a new session (the relay
    /// was busy, the edge's name is still held by its previous session…).
    #[error("registration failed: {0}")]
    RegistrationFailed(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A builder was finished without a setting it cannot do without.
    #[error("missing setting: {0}")]
    MissingSetting(&'static str),
    /// A name that cannot name an edge: edge names are lowercase DNS labels (1 to 63 of
    /// `a-z`, `0-9` and `-`, not starting or ending with `-`), since they become subdomains.
    #[error("edge name {0:?} is not a lowercase DNS label")]
    InvalidEdgeName(String),
    /// An entry of a token list is not `NAME=TOKEN` with a non-empty token (the entry is
    /// not quoted: it may hold a secret).
    #[error("edge token entry {position} is not NAME=TOKEN with a non-empty token")]
    InvalidTokenEntry {
        /// The entry's position in the list, from 0.
        position: usize,
    },
    /// The credentials were refused: by a relay's authenticator, or (on an edge) by the
    /// relay. Retrying with the same credentials will not help.
    #[error("unauthorized{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Unauthorized {
        /// Why, as told to the edge.
        reason: Option<String>,
    },
    /// A relay's registry refused an edge because another edge holds its name and is
    /// alive (see [`TakeoverPolicy`](crate::relay::TakeoverPolicy)).
    #[error("edge name {name:?} is already connected")]
    EdgeNameTaken {
        /// The name.
        name: String,
    },

    /// A TLS certificate or key that cannot be used: unreadable file, bad PEM, empty
    /// chain, unsupported key, key not matching the certificate.
    #[error("certificate{}: {reason}", path.as_deref().map(|path| format!(" {path}")).unwrap_or_default())]
    Certificate {
        /// The file concerned, when it came from one.
        path: Option<String>,
        /// What is wrong with it.
        reason: String,
    },

    /// An edge's local backend (a TCP service behind a [`tcp`](crate::tcp) route) refused
    /// the connection or did not accept it in time.
    #[error("backend {backend} unavailable")]
    BackendUnavailable {
        /// The backend's address, as configured.
        backend: String,
        /// Why the connect failed.
        #[source]
        source: std::io::Error,
    },

    /// A listener could not be bound to its address (in use, not permitted…).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why, as the operating system put it.
        #[source]
        source: io::Error,
    },
    /// A private key file that group or others may read is refused: whoever reads it can
    /// impersonate its owner (`chmod 600` it).
    #[error("{} is readable by group or others (mode {mode:o}): run `chmod 600` on it", path.display())]
    KeyFileExposed {
        /// The key file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A saved identity's key exists without its certificate. Restore the certificate, or
    /// remove the key to make a new identity (peers that pinned the old one must then be
    /// given the new certificate).
    #[error("{} exists but {} does not", key.display(), cert.display())]
    CertificateMissing {
        /// The certificate file that is missing.
        cert: std::path::PathBuf,
        /// The key file that exists.
        key: std::path::PathBuf,
    },
    /// A file of an identity could not be read, written or inspected.
    #[error("{}: {source}", path.display())]
    IdentityFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another relay of the cluster could not be reached: the dial, the QUIC or session
    /// handshake failed or took longer than its bound, or the session to it was lost.
    /// The edge may be fine; the relays are cut off from each other.
    #[error("relay {relay} is unreachable: {source}")]
    PeerUnreachable {
        /// The peer relay's address.
        relay: std::net::SocketAddr,
        /// What failed.
        #[source]
        source: Box<Error>,
    },
    /// Another relay refused this relay as a peer (a wrong or missing cluster secret).
    /// Retrying cannot help until the secrets agree.
    #[error("relay {relay} refused this relay as a peer{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    PeerRefused {
        /// The peer relay's address.
        relay: std::net::SocketAddr,
        /// Its explanation.
        reason: Option<String>,
    },
    /// A peer relay does not have the edge attached (the directory that sent us there
    /// was stale, or the edge left meanwhile).
    #[error("edge {edge:?} is not attached to relay {relay}")]
    EdgeNotAttached {
        /// The edge's name.
        edge: String,
        /// The peer relay's address.
        relay: std::net::SocketAddr,
    },
    /// A forwarded open claimed more relay-to-relay hops than allowed (a loop, or a
    /// forged count).
    #[error("forwarded open refused: {hops} relay hops, at most {limit} allowed")]
    HopLimitExceeded {
        /// The hops claimed.
        hops: i64,
        /// The most allowed.
        limit: u8,
    },
    /// A shared directory of edges (Redis, see `relay::cluster`) could not be reached or
    /// did not answer in time; relays keep answering lookups from their cache meanwhile.
    #[error("the shared edge directory is unavailable: {0}")]
    DirectoryUnavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A setting of a shared directory that it cannot use: a relay id or key prefix that is
    /// not 1 to 128 of `A-Z a-z 0-9 . _ : -`, a Redis URL that does not parse.
    #[error("invalid {what}: {value}")]
    InvalidClusterSetting {
        /// Which setting.
        what: &'static str,
        /// The value, quoted (a URL is not shown: it may hold a password).
        value: String,
    },
}

impl Error {
    /// Wraps a transport failure.
    pub fn transport<E>(error: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Self::Transport(Box::new(error))
    }

    /// True for failures where the same request may succeed later on this or a new session
    /// (timeouts, full limits, lost connections, a peer's `LimitExceeded`/`ServiceUnavailable`,
    /// an edge name whose live holder may go away, a shared directory unreachable).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(_)
            | Self::CapacityExceeded { .. }
            | Self::Disconnected
            | Self::RegistrationFailed(_)
            | Self::EdgeNameTaken { .. }
            | Self::PeerUnreachable { .. }
            | Self::EdgeNotAttached { .. }
            | Self::DirectoryUnavailable(_) => true,
            Self::StreamRejected { code, .. } => {
                matches!(
                    code,
                    RejectCode::LimitExceeded | RejectCode::ServiceUnavailable
                )
            }
            _ => false,
        }
    }
}

impl From<Error> for io::Error {
    fn from(error: Error) -> Self {
        let kind = match &error {
            Error::Timeout(_) => io::ErrorKind::TimedOut,
            Error::StreamRejected { .. } => io::ErrorKind::ConnectionRefused,
            Error::SessionClosed | Error::Disconnected => io::ErrorKind::NotConnected,
            Error::Protocol(_) | Error::ProtocolViolation(_) => io::ErrorKind::InvalidData,
            Error::CapacityExceeded { .. } => io::ErrorKind::WouldBlock,
            Error::UntrustedCertificate { .. } | Error::RegistrationRefused(_) => {
                io::ErrorKind::PermissionDenied
            }
            Error::Unauthorized { .. } => io::ErrorKind::PermissionDenied,
            Error::EdgeNameTaken { .. } => io::ErrorKind::AddrInUse,
            Error::PeerUnreachable { .. } => io::ErrorKind::NotConnected,
            Error::PeerRefused { .. } => io::ErrorKind::PermissionDenied,
            Error::EdgeNotAttached { .. } => io::ErrorKind::NotFound,
            Error::HopLimitExceeded { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, error)
    }
}

/// What a [`Error::Timeout`] waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutKind {
    /// The Hello/HelloAck handshake.
    Negotiation,
    /// The peer's `OpenResponse`.
    OpenRequest,
    /// The data stream of an accepted open.
    StreamBind,
    /// A `Pong`.
    Ping,
    /// The QUIC handshake with a relay.
    Connect,
}

impl fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Negotiation => "negotiation",
            Self::OpenRequest => "open response",
            Self::StreamBind => "stream bind",
            Self::Ping => "pong",
            Self::Connect => "the QUIC handshake",
        })
    }
}
