//! What the session needs from a multiplexed transport, and two implementations.
//!
//! The session only opens and accepts bidirectional streams and closes the connection, so
//! it is written against these traits rather than quinn itself. The traits have the same
//! shape as quic-reverse 0.1.2's, so transports written for that crate plug in unchanged.
//!
//! - [`QuinnConnection`]: the production transport, a cloneable `quinn::Connection`
//!   whose limit on the peer's streams grows with use ([`StreamLimit`]).
//! - [`mem::MemoryConnection`]: an in-process pair for unit tests of protocol logic.

use std::future::Future;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

#[cfg(feature = "quinn")]
mod lanes;
pub mod mem;
#[cfg(feature = "quinn")]
mod quinn;
pub(crate) mod reset_on_drop;
#[cfg(feature = "quinn")]
mod stream_limit;

#[cfg(feature = "quinn")]
pub use self::quinn::{QuinnConnection, QuinnRecvStream, QuinnSendStream};
#[cfg(feature = "quinn")]
pub use lanes::{LanesFull, CLOSE_LANE_SESSION_ENDED};
#[cfg(feature = "quinn")]
pub use stream_limit::{IncomingStreams, StreamLimit};

/// The transport the crate's types use when none is named: [`QuinnConnection`], so
/// `SessionClient`, `Router`, `Connector` and `TunnelStream` need no type parameter in the
/// common case. (Without the `quinn` feature it is [`mem::MemoryConnection`].)
#[cfg(feature = "quinn")]
pub type DefaultConnection = QuinnConnection;
/// The transport the crate's types use when none is named; with the `quinn` feature (on
/// by default) it is `QuinnConnection`.
#[cfg(not(feature = "quinn"))]
pub type DefaultConnection = mem::MemoryConnection;

/// The connections a transport of several has lost (see [`Connection::lanes_lost`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneLosses {
    /// How many have been lost so far.
    pub count: u64,
    /// When the last one was.
    pub last: Option<Instant>,
}

/// A connection that carries many independent bidirectional streams.
pub trait Connection: Send + Sync + 'static {
    /// The sending half of a stream.
    type SendStream: SendStream;
    /// The receiving half of a stream.
    type RecvStream: RecvStream;
    /// Why opening a stream failed.
    type OpenError: std::error::Error + Send + Sync + 'static;
    /// Why accepting a stream failed.
    type AcceptError: std::error::Error + Send + Sync + 'static;

    /// Opens a new bidirectional stream.
    fn open_bi(
        &self,
    ) -> impl Future<Output = Result<(Self::SendStream, Self::RecvStream), Self::OpenError>> + Send;

    /// Waits for the peer's next bidirectional stream; `Ok(None)` once the connection was
    /// closed gracefully.
    #[allow(clippy::type_complexity)]
    fn accept_bi(
        &self,
    ) -> impl Future<Output = Result<Option<(Self::SendStream, Self::RecvStream)>, Self::AcceptError>>
           + Send;

    /// Closes the whole connection with an application code and reason.
    fn close(&self, code: u32, reason: &[u8]);

    /// True until the connection is closed, by either side or by a failure.
    fn is_open(&self) -> bool;

    /// For transports that spread streams over several connections: `Some` with what they
    /// have lost so far, once there is more than one; `None` otherwise (the default).
    ///
    /// A stream the peer opened over a connection that was being lost may never arrive,
    /// though the peer saw its open succeed: the peer may learn of the loss seconds after
    /// this side. The session opens again what it was still waiting for.
    fn lanes_lost(&self) -> Option<LaneLosses> {
        None
    }

    /// Resolves once more than `seen` of the connections counted by
    /// [`lanes_lost`](Self::lanes_lost) have been lost; never by default.
    fn lane_lost_since(&self, seen: u64) -> impl Future<Output = ()> + Send {
        let _ = seen;
        std::future::pending()
    }
}

/// The sending half of a stream.
pub trait SendStream: AsyncWrite + Send + Unpin + 'static {
    /// Why finishing failed.
    type FinishError: std::error::Error + Send + Sync + 'static;

    /// Ends the stream gracefully: the peer reads EOF after the data written.
    fn finish(&mut self) -> impl Future<Output = Result<(), Self::FinishError>> + Send;

    /// Abandons the stream: unsent data is dropped and the peer sees `code`.
    fn reset(&mut self, code: u32);

    /// Sends this stream's data ahead of other streams' when the connection has more to
    /// send than it can. The session calls it on the control stream, so keep-alives and
    /// open answers never queue behind bulk data. The default does nothing.
    fn prioritize(&mut self) {}

    /// Resolves once the peer has everything sent on this finished stream, or at once for
    /// transports that cannot tell (the default). Lets a graceful close be delivered
    /// before the caller closes the connection, which would discard unsent data.
    fn delivered(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Resolves once the peer stopped reading this stream (or the connection was lost):
    /// nothing written from then on reaches anyone. It does not borrow the stream, so it
    /// can be awaited beside the writes. Never resolves by default, nor for a stream the
    /// peer read to its end.
    fn stopped(&self) -> impl Future<Output = ()> + Send + use<Self> {
        std::future::pending()
    }
}

/// The receiving half of a stream.
pub trait RecvStream: AsyncRead + Send + Unpin + 'static {
    /// Tells the peer to stop sending, with `code`.
    fn stop(&mut self, code: u32);
}
