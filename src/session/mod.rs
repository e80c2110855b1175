//! A quic-reverse session over one connection: handshake, then the control-stream driver.
//!
//! [`Session::start`] runs the Hello/HelloAck handshake and yields a [`SessionHandle`];
//! [`SessionClient`](crate::SessionClient) turns the handle into running tasks:
//!
//! - a **reader** of the control stream, which answers pings, resolves pending opens and
//!   pings, and turns open requests into [`ClientEvent`]s;
//! - a **writer** that owns the control stream's sending half and batches frames;
//! - an **acceptor** that takes every incoming data stream, reads its `StreamBind` header
//!   and hands it to the open waiting for that logical stream id (holding it briefly if it
//!   overtook its `OpenResponse`);
//! - a **keep-alive** task when `ping_interval` is set.
//!
//! All shared bookkeeping lives in one table set (`core::Tables`) behind one lock, so the moment the
//! session ends every waiter is failed in one place with one typed error.

pub(crate) mod control;
pub(crate) mod core;
pub(crate) mod driver;
mod events;
mod negotiation;
mod state;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::timeout;

use crate::config::Config;
use crate::error::{Error, TimeoutKind};
use crate::transport::{Connection, SendStream as _};
use control::ControlReader;

pub use core::SessionStats;
pub use events::{ClientEvent, ControlEvent};
pub use negotiation::NegotiatedParams;
pub use state::State;

/// Which end of the QUIC connection this session is on.
///
/// The QUIC client (usually the edge, which dials out) opens the control stream and speaks
/// first; after the handshake both roles may open and accept streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// This side dialed the QUIC connection.
    Client,
    /// This side accepted the QUIC connection.
    Server,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Server => "server",
        })
    }
}

/// State shared by a [`Session`], its handle and its client.
pub(crate) struct SessionShared<C: Connection> {
    pub(crate) connection: C,
    pub(crate) role: Role,
    pub(crate) config: Config,
    pub(crate) state: watch::Sender<State>,
    pub(crate) negotiated: Mutex<Option<NegotiatedParams>>,
}

impl<C: Connection> SessionShared<C> {
    pub(crate) fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Moves to `next` unless the session already reached a final state (which it never
    /// leaves), or `next` would step back from `Closing`.
    pub(crate) fn set_state(&self, next: State) {
        self.state.send_if_modified(|current| {
            let allowed = !current.is_final()
                && *current != next
                && !(*current == State::Closing && next == State::Ready);
            if allowed {
                *current = next;
            }
            allowed
        });
    }
}

/// A session over one connection, before and after its handshake.
///
/// ```no_run
/// # async fn run(connection: quinn::Connection) -> Result<(), backhaul::Error> {
/// use backhaul::{Config, QuinnConnection, Role, Session, SessionClient};
///
/// let session = Session::new(QuinnConnection::new(connection), Role::Server, Config::new());
/// let handle = session.start().await?;
/// println!("peer agent: {:?}", session.negotiated_params().and_then(|p| p.remote_agent));
/// let client = SessionClient::new(handle);
/// # drop(client); Ok(()) }
/// ```
pub struct Session<C: Connection> {
    shared: Arc<SessionShared<C>>,
}

impl<C: Connection> Clone for Session<C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C: Connection> fmt::Debug for Session<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.shared.role)
            .field("state", &self.shared.state())
            .finish_non_exhaustive()
    }
}

impl<C: Connection> Session<C> {
    /// A session over `connection` in `role`; nothing is sent until [`start`](Self::start).
    pub fn new(connection: C, role: Role, config: Config) -> Self {
        let (state, _) = watch::channel(State::Init);
        Self {
            shared: Arc::new(SessionShared {
                connection,
                role,
                config,
                state,
                negotiated: Mutex::new(None),
            }),
        }
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> State {
        self.shared.state()
    }

    /// This side's role.
    #[must_use]
    pub fn role(&self) -> Role {
        self.shared.role
    }

    /// What the handshake agreed on, once it completed.
    #[must_use]
    pub fn negotiated_params(&self) -> Option<NegotiatedParams> {
        lock(&self.shared.negotiated).clone()
    }

    /// True while the session takes opens.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.state().is_ready()
    }

    /// True once the connection was lost.
    #[must_use]
    pub fn is_disconnected(&self) -> bool {
        self.state().is_disconnected()
    }

    /// The connection.
    #[must_use]
    pub fn connection(&self) -> &C {
        &self.shared.connection
    }

    /// Opens (as [`Role::Client`]) or accepts (as [`Role::Server`]) the control stream and
    /// runs the handshake, bounded by `negotiation_timeout`.
    ///
    /// # Errors
    /// [`Error::Config`] for an unusable config, [`Error::VersionMismatch`] when the peers
    /// share no version, [`Error::Timeout`] with [`TimeoutKind::Negotiation`],
    /// [`Error::Protocol`]/[`Error::ProtocolViolation`] for a peer that does not speak the
    /// protocol, [`Error::AlreadyStarted`] on a second call, [`Error::Disconnected`]/
    /// [`Error::Transport`] when the connection fails.
    pub async fn start(&self) -> Result<SessionHandle<C>, Error> {
        self.shared.config.validate()?;
        let mut started = false;
        self.shared.state.send_if_modified(|state| {
            started = *state == State::Init;
            if started {
                *state = State::Negotiating;
            }
            started
        });
        if !started {
            return Err(Error::AlreadyStarted);
        }
        let result = timeout(self.shared.config.negotiation_timeout, self.handshake())
            .await
            .unwrap_or(Err(Error::Timeout(TimeoutKind::Negotiation)));
        match result {
            Ok(handle) => {
                self.shared.set_state(State::Ready);
                Ok(handle)
            }
            Err(error) => {
                self.shared.set_state(State::Closed);
                Err(error)
            }
        }
    }

    async fn handshake(&self) -> Result<SessionHandle<C>, Error> {
        let connection = &self.shared.connection;
        let (mut send, recv) = match self.shared.role {
            Role::Client => connection.open_bi().await.map_err(Error::transport)?,
            Role::Server => connection
                .accept_bi()
                .await
                .map_err(Error::transport)?
                .ok_or(Error::Disconnected)?,
        };
        send.prioritize();
        let mut reader = ControlReader::new(recv);
        let params = negotiation::negotiate(
            self.shared.role,
            &self.shared.config,
            &mut send,
            &mut reader,
        )
        .await?;
        *lock(&self.shared.negotiated) = Some(params);
        Ok(SessionHandle {
            shared: Arc::clone(&self.shared),
            control_send: send,
            control_reader: reader,
        })
    }
}

/// A negotiated session, ready to be driven by a [`SessionClient`](crate::SessionClient).
pub struct SessionHandle<C: Connection> {
    pub(crate) shared: Arc<SessionShared<C>>,
    pub(crate) control_send: C::SendStream,
    pub(crate) control_reader: ControlReader<C::RecvStream>,
}

impl<C: Connection> fmt::Debug for SessionHandle<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionHandle")
            .field("role", &self.shared.role)
            .field("state", &self.shared.state())
            .finish_non_exhaustive()
    }
}

impl<C: Connection> SessionHandle<C> {
    /// The current state.
    #[must_use]
    pub fn state(&self) -> State {
        self.shared.state()
    }

    /// What the handshake agreed on.
    #[must_use]
    pub fn negotiated_params(&self) -> Option<NegotiatedParams> {
        lock(&self.shared.negotiated).clone()
    }

    /// True while the session takes opens.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.state().is_ready()
    }

    /// True once the connection was lost.
    #[must_use]
    pub fn is_disconnected(&self) -> bool {
        self.state().is_disconnected()
    }

    /// The connection.
    #[must_use]
    pub fn connection(&self) -> &C {
        &self.shared.connection
    }
}

/// Locks a std mutex, ignoring poisoning: every critical section here leaves the data
/// consistent before anything that could panic.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
