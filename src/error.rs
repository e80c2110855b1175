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
    /// [`Session::start`](crate::Session::start) was called a second time.
    #[error("session already started")]
    AlreadyStarted,
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The QUIC transport failed.
    #[error("transport error: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
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
    /// (timeouts, full limits, lost connections, a peer's `LimitExceeded`/`ServiceUnavailable`).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::CapacityExceeded { .. } | Self::Disconnected => true,
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
}

impl fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Negotiation => "negotiation",
            Self::OpenRequest => "open response",
            Self::StreamBind => "stream bind",
            Self::Ping => "pong",
        })
    }
}
