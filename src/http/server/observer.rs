//! What a [`Server`](super::Server) tells its owner about connections, for metrics and
//! logs of the application's own (the server itself logs with `tracing` either way).
//!
//! Each connection's events come in order: [`connection_opened`], then at most one of
//! [`connection_cut`], [`request_refused`] or [`connection_failed`], then
//! [`connection_closed`], always, so a gauge raised on open and lowered on close stays true.
//!
//! [`connection_opened`]: Observer::connection_opened
//! [`connection_cut`]: Observer::connection_cut
//! [`request_refused`]: Observer::request_refused
//! [`connection_failed`]: Observer::connection_failed
//! [`connection_closed`]: Observer::connection_closed

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

use super::Cut;

/// The addresses of a connection; also in every request's extensions, so a handler can
/// set forwarding headers (`request.extensions().get::<ConnectionInfo>()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionInfo {
    peer: SocketAddr,
    local: SocketAddr,
    secure: bool,
}

impl ConnectionInfo {
    pub(super) fn new(peer: SocketAddr, local: SocketAddr, secure: bool) -> Self {
        Self {
            peer,
            local,
            secure,
        }
    }

    /// True if the connection is TLS (the server was given [`with_tls`]), so a handler
    /// can tell `https` from `http` for its forwarding headers or redirects.
    ///
    /// [`with_tls`]: super::Server::with_tls
    #[must_use]
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// The client's address.
    #[must_use]
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The server's address the client connected to.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Hooks called as connections come and go; every method does nothing unless overridden.
///
/// Each connection's events come in order: `connection_opened`, then at most one of
/// `connection_cut`, `request_refused` or `connection_failed`, then `connection_closed`,
/// always (even when the server drops the connection at shutdown), so a gauge raised on
/// open and lowered on close stays true. Called on the connection's task: keep
/// them short (count, log), never block.
pub trait Observer: Send + Sync + 'static {
    /// A connection was accepted and will be served.
    fn connection_opened(&self, info: &ConnectionInfo) {
        let _ = info;
    }

    /// The last free slot was taken ([`Limits::max_connections`](super::Limits)): new
    /// connections wait in the kernel's backlog until one closes.
    fn at_capacity(&self, max_connections: usize) {
        let _ = max_connections;
    }

    /// Accepting failed for lack of resources (file descriptors, memory); the server waits
    /// `backoff` before trying again.
    fn accept_failed(&self, error: &io::Error, backoff: Duration) {
        let _ = (error, backoff);
    }

    /// The server cut the connection for overstaying a limit.
    fn connection_cut(&self, info: &ConnectionInfo, reason: Cut) {
        let _ = (info, reason);
    }

    /// hyper answered a request it could not accept by itself (400 for an unparsable
    /// head, 431 for one too large, 414 for a URI too long), then closed the connection;
    /// the service never saw the request.
    fn request_refused(&self, info: &ConnectionInfo, status: StatusCode) {
        let _ = (info, status);
    }

    /// The connection ended with another error (reset by the client, a service error…).
    fn connection_failed(&self, info: &ConnectionInfo, error: &(dyn std::error::Error + 'static)) {
        let _ = (info, error);
    }

    /// The connection is closed and its slot free.
    fn connection_closed(&self, info: &ConnectionInfo) {
        let _ = info;
    }
}

/// The observer that observes nothing.
impl Observer for () {}
