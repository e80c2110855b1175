//! The session's lifecycle states.
use std::fmt;

/// Where a session is in its life.
///
/// ```text
/// Init ──► Negotiating ──► Ready ──► Closing ──► Closed
///               │            │
///               └──► Closed  └──► Disconnected
/// ```
/// `Closed` and `Disconnected` are final: a session never comes back; a new connection
/// needs a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum State {
    /// Created, handshake not started.
    #[default]
    Init,
    /// Hello/HelloAck exchange under way.
    Negotiating,
    /// Opens and accepts work.
    Ready,
    /// A graceful close was sent or received; no new opens.
    Closing,
    /// Ended: closed gracefully, or ended by a protocol error or failed handshake.
    Closed,
    /// Ended: the connection was lost or the peer stopped answering keep-alives.
    Disconnected,
}

impl State {
    /// True in [`State::Ready`].
    #[must_use]
    pub const fn is_ready(&self) -> bool {
        matches!(self, Self::Ready)
    }

    /// True in [`State::Closed`].
    #[must_use]
    pub const fn is_closed(&self) -> bool {
        matches!(self, Self::Closed)
    }

    /// True in [`State::Disconnected`].
    #[must_use]
    pub const fn is_disconnected(&self) -> bool {
        matches!(self, Self::Disconnected)
    }

    /// True in the states a session never leaves.
    #[must_use]
    pub const fn is_final(&self) -> bool {
        matches!(self, Self::Closed | Self::Disconnected)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Init => "init",
            Self::Negotiating => "negotiating",
            Self::Ready => "ready",
            Self::Closing => "closing",
            Self::Closed => "closed",
            Self::Disconnected => "disconnected",
        })
    }
}
