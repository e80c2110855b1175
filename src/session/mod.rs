//! A quic-reverse session over one connection: handshake, then a state machine and the
//! driver that does its I/O.
//!
//! [`Session::start`] runs the Hello/HelloAck handshake and yields a [`SessionHandle`];
//! [`SessionClient`] turns the handle into a running session. As in quinn-proto and quinn,
//! the session is split in two:
//!
//! - **`machine`**, the protocol without I/O: pending opens by request id, logical stream
//!   ids and the data streams bound to them, streams that overtook their `OpenResponse`,
//!   retired ids, the peer's requests and their `max_concurrent_streams` slots, pings, and
//!   how the session ended. Events go in (a control message, a bound data stream, a call
//!   of the application, the time), actions come out (send this, complete that waiter,
//!   refuse this stream, tell the application). No tokio, no locks, no clock: its rules
//!   are unit- and property-tested by feeding events and reading actions.
//! - **the driver**, everything that touches tokio: `core` holds the machine behind one
//!   lock (a short critical section per event, never across an await) and performs its
//!   actions; `waiters` keeps the channels of the futures that wait, by the ids the machine
//!   names them with; `driver` runs the tasks: a **reader** of the control stream and an
//!   **acceptor** that reads each data stream's `StreamBind` header and hands the stream
//!   to the machine (one task for both, since one datagram often wakes both), a
//!   **writer** that drains `writer`'s queue (senders write their frames themselves when
//!   nothing waits ahead of them, so it rarely has work), and a **keep-alive** task when
//!   `ping_interval` is set; `client` is the handle over them.
//!
//! Keeping the rules in one place without I/O is what makes them hold: an open is
//! registered only while the session is live, and the moment it ends every waiter is
//! failed once, with one typed error, in one step.

mod client;
pub(crate) mod control;
pub(crate) mod core;
pub(crate) mod driver;
mod events;
mod machine;
mod negotiation;
mod state;
#[cfg(test)]
mod tests;
mod waiters;
mod writer;

use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::timeout;

use crate::config::Config;
use crate::error::{Error, TimeoutKind};
use crate::transport::{Connection, SendStream as _};
use control::ControlReader;

pub(crate) use client::AcceptedSlot;
pub use client::SessionClient;
pub use events::{ClientEvent, ControlEvent};
pub use machine::SessionStats;
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
        self.start_with(None).await
    }

    /// As [`start`](Self::start) as [`Role::Server`], on a control stream already accepted
    /// of which `read` was already read (a relay reads a first stream's first bytes to
    /// tell a session from a lane joining one).
    pub(crate) async fn start_accepted(
        &self,
        send: C::SendStream,
        recv: C::RecvStream,
        read: &[u8],
    ) -> Result<SessionHandle<C>, Error> {
        self.start_with(Some((send, ControlReader::with_read(recv, read))))
            .await
    }

    async fn start_with(
        &self,
        control: Option<(C::SendStream, ControlReader<C::RecvStream>)>,
    ) -> Result<SessionHandle<C>, Error> {
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
        let result = timeout(
            self.shared.config.negotiation_timeout,
            self.handshake(control),
        )
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

    async fn handshake(
        &self,
        control: Option<(C::SendStream, ControlReader<C::RecvStream>)>,
    ) -> Result<SessionHandle<C>, Error> {
        let connection = &self.shared.connection;
        let (mut send, mut reader) = match (control, self.shared.role) {
            (Some(control), _) => control,
            (None, Role::Client) => {
                let (send, recv) = connection.open_bi().await.map_err(Error::transport)?;
                (send, ControlReader::new(recv))
            }
            (None, Role::Server) => {
                let (send, recv) = connection
                    .accept_bi()
                    .await
                    .map_err(Error::transport)?
                    .ok_or(Error::Disconnected)?;
                (send, ControlReader::new(recv))
            }
        };
        send.prioritize();
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

/// A negotiated session, ready to be driven by a [`SessionClient`].
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
