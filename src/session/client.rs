//! [`SessionClient`]: the cloneable handle applications use, over the session's driver.
//!
//! The API is quic-reverse 0.1.2's, method for method, so code written for that crate
//! compiles against this one. What differs is underneath: data streams are matched to
//! their opens by logical stream id (the reference crate hands each open whichever stream
//! arrives next), limits and keep-alives are enforced, and a lost connection fails every
//! waiter at once.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit};
use tracing::debug;

use super::core::{write_stream_bind, SessionCore, Stream};
use super::events::{ClientEvent, ControlEvent};
use super::machine::SessionStats;
use super::{driver, lock, NegotiatedParams, Role, Session, SessionHandle, State};
use crate::config::Config;
use crate::error::Error;
use crate::protocol::{CloseCode, Metadata, OpenFlags, RejectCode, ServiceId};
use crate::stream::{TunnelInfo, TunnelStream};
use crate::transport::{Connection, DefaultConnection};

/// Events beyond the open-request allowance (pings, stream closes) queued before dropped.
const EXTRA_EVENT_CAPACITY: usize = 64;

/// A cloneable handle to a running session.
///
/// On the relay (opener):
/// ```no_run
/// # async fn relay(connection: quinn::Connection) -> Result<(), Box<dyn std::error::Error>> {
/// use backhaul::{Config, Metadata, Role, SessionClient};
/// use tokio::io::AsyncWriteExt;
///
/// let (client, _events) = SessionClient::start(connection, Role::Server, Config::new()).await?;
/// let (mut send, recv) = client.open("echo", Metadata::Empty).await?;
/// send.write_all(b"hello").await?;
/// # drop(recv); Ok(()) }
/// ```
/// On the edge (acceptor):
/// ```no_run
/// # async fn edge(connection: quinn::Connection) -> Result<(), backhaul::Error> {
/// use backhaul::{ClientEvent, Config, RejectCode, Role, SessionClient};
///
/// let (client, mut events) = SessionClient::start(connection, Role::Client, Config::new()).await?;
/// while let Some(event) = events.recv().await {
///     if let ClientEvent::OpenRequest { request_id, service, .. } = event {
///         if service.as_str() != "echo" {
///             client.reject_open(request_id, RejectCode::UnsupportedService, None).await?;
///             continue;
///         }
///         // Accepted on the task that serves it (see `accept_stream`); the stream's
///         // slot is freed when it is dropped.
///         let client = client.clone();
///         tokio::spawn(async move {
///             if let Ok(stream) = client.accept_stream(request_id).await {
///                 # drop(stream);
///             }
///         });
///     }
/// }
/// # Ok(()) }
/// ```
/// The quic-reverse way, step by step, is still there: `allocate_stream_id`,
/// `accept_open`, `connection().open_bi()`, `bind_stream`.
pub struct SessionClient<C: Connection = DefaultConnection> {
    core: Arc<SessionCore<C>>,
    tasks: Arc<driver::DriverTasks>,
}

impl<C: Connection> Clone for SessionClient<C> {
    fn clone(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
            tasks: Arc::clone(&self.tasks),
        }
    }
}

impl<C: Connection> fmt::Debug for SessionClient<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionClient")
            .field("role", &self.core.shared.role)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "quinn")]
impl SessionClient<crate::transport::QuinnConnection> {
    /// Runs the handshake over an established quinn connection and starts the session:
    /// one call from `quinn::Connection` to a running client and the events a serving
    /// side answers ([`start_on`](Self::start_on) for other transports).
    ///
    /// [`Role::Client`] on the side that dialed (usually the edge), [`Role::Server`] on the
    /// side that accepted. A side that only opens streams may drop the receiver: open
    /// requests from the peer are then rejected with `ServiceUnavailable`.
    ///
    /// ```no_run
    /// # async fn edge(connection: quinn::Connection) -> Result<(), backhaul::Error> {
    /// use backhaul::{Config, Role, SessionClient};
    ///
    /// let (client, events) = SessionClient::start(connection, Role::Client, Config::new()).await?;
    /// # drop((client, events)); Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Session::start`](crate::session::Session::start).
    pub async fn start(
        connection: quinn::Connection,
        role: Role,
        config: Config,
    ) -> Result<(Self, mpsc::Receiver<ClientEvent>), Error> {
        Self::start_on(
            crate::transport::QuinnConnection::new(connection),
            role,
            config,
        )
        .await
    }
}

impl<C: Connection> SessionClient<C> {
    /// Runs the handshake over `connection` (any transport) and starts the session; see
    /// [`start`](SessionClient::start) for quinn connections.
    ///
    /// # Errors
    /// As [`Session::start`](crate::session::Session::start).
    pub async fn start_on(
        connection: C,
        role: Role,
        config: Config,
    ) -> Result<(Self, mpsc::Receiver<ClientEvent>), Error> {
        let handle = Session::new(connection, role, config).start().await?;
        Ok(Self::with_events(handle))
    }

    /// What the handshake agreed on (versions, features, the peer's agent string).
    #[must_use]
    pub fn negotiated_params(&self) -> Option<NegotiatedParams> {
        lock(&self.core.shared.negotiated).clone()
    }

    /// Starts the session's tasks for a side that only opens streams. Open requests from
    /// the peer are rejected with `ServiceUnavailable`.
    ///
    /// Must be called within a tokio runtime.
    pub fn new(handle: SessionHandle<C>) -> Self {
        Self::with_events(handle).0
    }

    /// Starts the session's tasks and returns the events a serving side answers.
    ///
    /// Open requests are queued for the receiver up to `max_concurrent_streams`; pings and
    /// stream closes are dropped, not queued without bound, if the receiver falls behind.
    /// Once the receiver is dropped, the channel is let go and open requests are rejected
    /// with `ServiceUnavailable`, as with [`new`](Self::new).
    /// Must be called within a tokio runtime.
    pub fn with_events(handle: SessionHandle<C>) -> (Self, mpsc::Receiver<ClientEvent>) {
        let SessionHandle {
            shared,
            control_send,
            control_reader,
        } = handle;
        let capacity = shared
            .config
            .max_concurrent_streams
            .saturating_add(EXTRA_EVENT_CAPACITY)
            .min(1 << 16);
        let (events, receiver) = mpsc::channel(capacity);
        let core = Arc::new(SessionCore::new(shared));
        let tasks = driver::spawn(&core, control_send, control_reader, events);
        let client = Self {
            core,
            tasks: Arc::new(tasks),
        };
        (client, receiver)
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> State {
        self.core.shared.state()
    }

    /// True while the session takes opens.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.state().is_ready()
    }

    /// The connection.
    #[must_use]
    pub fn connection(&self) -> &C {
        &self.core.shared.connection
    }

    /// Opens a stream to `service` on the peer: sends an `OpenRequest` and waits for the
    /// data stream bound to the logical stream id the peer announces.
    ///
    /// # Errors
    /// [`Error::CapacityExceeded`] at once when `max_inflight_opens` opens are pending;
    /// [`Error::StreamRejected`] with the peer's code and reason;
    /// [`Error::Timeout`] ([`OpenRequest`](crate::error::TimeoutKind::OpenRequest) or
    /// [`StreamBind`](crate::error::TimeoutKind::StreamBind)); [`Error::SessionClosed`] or
    /// [`Error::Disconnected`] when the session ended, also while waiting.
    pub async fn open(
        &self,
        service: impl Into<ServiceId>,
        metadata: Metadata,
    ) -> Result<(C::SendStream, C::RecvStream), Error> {
        self.open_with_flags(service, metadata, OpenFlags::empty())
            .await
    }

    /// [`open`](Self::open) with request flags.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn open_with_flags(
        &self,
        service: impl Into<ServiceId>,
        metadata: Metadata,
        flags: OpenFlags,
    ) -> Result<(C::SendStream, C::RecvStream), Error> {
        let slot = self.try_reserve_open()?;
        let (stream, _) = self
            .core
            .open(service.into(), metadata, flags, slot)
            .await?;
        Ok(stream)
    }

    /// Takes one of the `max_inflight_opens` slots, failing if none is free.
    fn try_reserve_open(&self) -> Result<OwnedSemaphorePermit, Error> {
        Arc::clone(&self.core.open_slots)
            .try_acquire_owned()
            .map_err(|_| Error::CapacityExceeded {
                what: "in-flight opens",
                limit: self.core.config().max_inflight_opens,
            })
    }

    /// Opens with a slot already reserved (the tower connector reserves in `poll_ready`);
    /// also returns the logical stream id.
    pub(crate) async fn open_reserved(
        &self,
        service: ServiceId,
        metadata: Metadata,
        slot: OwnedSemaphorePermit,
    ) -> Result<(Stream<C>, u64), Error> {
        self.core
            .open(service, metadata, OpenFlags::empty(), slot)
            .await
    }

    /// Once the events receiver is dropped (or closed), answers the peer's open requests
    /// with `code` and `reason`, as the application would, rather than with the session's
    /// own `ServiceUnavailable`. For a side that refuses every request the same way: it
    /// can drop its receiver, and with it the channel's buffer.
    pub(crate) fn answer_unserved_opens(&self, code: RejectCode, reason: Option<String>) {
        self.core.answer_unserved_opens(code, reason);
    }

    /// `Ok` while the session takes opens, else the error an open would get.
    pub(crate) fn ensure_ready(&self) -> Result<(), Error> {
        self.core.ensure_ready()
    }

    /// The configured `max_inflight_opens`.
    pub(crate) fn max_inflight_opens(&self) -> usize {
        self.core.config().max_inflight_opens
    }

    /// The semaphore of in-flight open slots.
    pub(crate) fn open_slots(&self) -> Arc<tokio::sync::Semaphore> {
        Arc::clone(&self.core.open_slots)
    }

    /// Accepts the peer's open request `request_id`, announcing `logical_stream_id`; then
    /// open a stream on the connection and [`bind_stream`](Self::bind_stream) it.
    ///
    /// The request holds a `max_concurrent_streams` slot until the stream is bound (see
    /// [`bind_stream`](Self::bind_stream)).
    ///
    /// # Errors
    /// [`Error::UnknownRequest`] if no such request waits for an answer,
    /// [`Error::InvalidStreamId`] for id 0 or an id in use, or the session's end error.
    pub async fn accept_open(&self, request_id: u64, logical_stream_id: u64) -> Result<(), Error> {
        self.core.accept_open(request_id, logical_stream_id).await
    }

    /// Accepts the peer's open request `request_id` in one call: allocates a logical
    /// stream id, answers the request, opens the data stream and binds it.
    ///
    /// The request's `max_concurrent_streams` slot stays taken until the returned stream
    /// is dropped (or split with [`TunnelStream::into_parts`]), so the limit counts the
    /// streams actually being served; the stream also keeps the session running while it
    /// lives. If the call fails, or its future is dropped half-way, the slot is freed and
    /// the peer is told the stream ended (`StreamClose` with [`CloseCode::Error`]) when
    /// it had been accepted. The [`Router`](crate::edge::Router) serves every stream this
    /// way.
    ///
    /// Call it on the task that serves the stream, as below and as the `Router` does: the
    /// answer, the bind and whatever the service writes at once then leave together. Called
    /// in the event loop, with the service on a task of its own, the answer usually leaves
    /// before the service has written, and a first byte costs a second datagram each way
    /// (`cargo bench --bench session -- open_latency` counts them).
    ///
    /// ```no_run
    /// # async fn edge(client: backhaul::SessionClient, mut events: tokio::sync::mpsc::Receiver<backhaul::ClientEvent>) -> Result<(), backhaul::Error> {
    /// use backhaul::ClientEvent;
    /// use tokio::io::AsyncWriteExt;
    ///
    /// while let Some(event) = events.recv().await {
    ///     if let ClientEvent::OpenRequest { request_id, .. } = event {
    ///         let client = client.clone();
    ///         tokio::spawn(async move {
    ///             if let Ok(mut stream) = client.accept_stream(request_id).await {
    ///                 let _ = stream.write_all(b"hello").await;
    ///             }
    ///         });
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::UnknownRequest`] if no such request waits for an answer,
    /// [`Error::Transport`] if the data stream could not be opened or bound, or the
    /// session's end error.
    pub async fn accept_stream(&self, request_id: u64) -> Result<TunnelStream<C>, Error> {
        let logical_stream_id = self.allocate_stream_id();
        let (requested, response) = self.core.admit_accept(request_id, logical_stream_id)?;
        // From here the slot is ours: the guard frees it on every path, also when this
        // future is dropped, and the stream carries it once bound.
        let mut slot = AcceptedSlot::new(self.clone(), logical_stream_id);
        self.core.perform(response, None).await?;
        let bound = async {
            let (mut send, recv) = self
                .connection()
                .open_bi()
                .await
                .map_err(Error::transport)?;
            write_stream_bind(&mut send, logical_stream_id).await?;
            Ok::<_, Error>((send, recv))
        }
        .await;
        let (send, recv) = match bound {
            Ok(stream) => stream,
            Err(error) => {
                debug!(%error, logical_stream_id, "could not open the accepted data stream");
                let reason = Some("could not open the data stream".to_owned());
                let _ = self
                    .close_stream(logical_stream_id, CloseCode::Error, reason)
                    .await;
                slot.disarm();
                return Err(error);
            }
        };
        let info = TunnelInfo {
            service: requested.service,
            metadata: requested.metadata,
            logical_stream_id,
        };
        Ok(TunnelStream::new(send, recv, info).holding_slot(slot))
    }

    /// Rejects the peer's open request `request_id`.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`] if no such request waits for an answer, or the session's
    /// end error.
    pub async fn reject_open(
        &self,
        request_id: u64,
        code: RejectCode,
        reason: Option<String>,
    ) -> Result<(), Error> {
        self.core.reject_open(request_id, code, reason).await
    }

    /// Writes the `StreamBind` header for `logical_stream_id` on a stream this side opened
    /// for an accepted request. Write nothing else on the stream before it.
    ///
    /// The session cannot see when a stream served by hand ends, so the stream's
    /// `max_concurrent_streams` slot is freed here, once it is bound; streams served by
    /// the [`Router`](crate::edge::Router) keep theirs until their service returns.
    ///
    /// # Errors
    /// [`Error::Transport`] if the write fails.
    pub async fn bind_stream<S: AsyncWriteExt + Unpin>(
        &self,
        send: &mut S,
        logical_stream_id: u64,
    ) -> Result<(), Error> {
        let bound = write_stream_bind(send, logical_stream_id).await;
        self.core.release_stream(logical_stream_id);
        bound
    }

    /// A logical stream id not yet handed out by this session (1, 2, 3…).
    #[must_use]
    pub fn allocate_stream_id(&self) -> u64 {
        self.core.allocate_stream_id()
    }

    /// Pings the peer and returns the round-trip time.
    ///
    /// # Errors
    /// [`Error::Timeout`] with [`Ping`](crate::error::TimeoutKind::Ping) after `ping_timeout`, or
    /// the session's end error.
    pub async fn ping(&self) -> Result<Duration, Error> {
        self.core.ping().await
    }

    /// Closes the session gracefully: sends `StreamClose(0)`, finishes the control stream,
    /// and fails pending opens with [`Error::SessionClosed`]. The connection stays open for
    /// the caller to close. Closing a session that already ended does nothing.
    ///
    /// # Errors
    /// The session's end error if the close could not be sent.
    pub async fn close(&self, code: CloseCode, reason: Option<String>) -> Result<(), Error> {
        self.core.close(code, reason).await
    }

    /// Tells the peer a logical stream is closed, and frees its slot on this side.
    ///
    /// # Errors
    /// The session's end error if the message could not be sent.
    pub async fn close_stream(
        &self,
        logical_stream_id: u64,
        code: CloseCode,
        reason: Option<String>,
    ) -> Result<(), Error> {
        self.core
            .close_stream(logical_stream_id, code, reason)
            .await
    }

    /// Sets (or removes) what takes open requests in the control reader's task, ahead of
    /// the events channel.
    pub(crate) fn set_open_handler(
        &self,
        handler: Option<Arc<dyn crate::session::core::OpenHandler>>,
    ) {
        self.core.set_open_handler(handler);
    }

    /// As [`close_stream`](Self::close_stream), for a drop: queued without waiting.
    pub(crate) fn close_stream_now(
        &self,
        logical_stream_id: u64,
        code: CloseCode,
        reason: Option<String>,
    ) {
        self.core.close_stream_now(logical_stream_id, code, reason);
    }

    /// Counters of this session.
    #[must_use]
    pub fn stats(&self) -> SessionStats {
        self.core.stats()
    }

    /// Every control message seen from now on, for observers (metrics, audit logs). A slow
    /// observer misses events rather than slowing the session.
    #[must_use]
    pub fn control_events(&self) -> broadcast::Receiver<ControlEvent> {
        self.core.observe_control_events()
    }

    /// Waits until the session has ended, and says why: [`Error::SessionClosed`] after a
    /// graceful close, [`Error::Disconnected`] when the connection was lost,
    /// [`Error::Timeout`] with [`Ping`](crate::error::TimeoutKind::Ping) when the peer stopped
    /// answering keep-alives, [`Error::Protocol`] or [`Error::ProtocolViolation`] when the
    /// peer broke the protocol.
    pub async fn closed(&self) -> Error {
        let mut state = self.core.shared.state.subscribe();
        let _ = state.wait_for(State::is_final).await;
        self.core.terminal_error()
    }
}

/// An accepted stream's `max_concurrent_streams` slot, freed on drop; it also keeps the
/// session running, as every [`TunnelStream`] does.
pub(crate) struct AcceptedSlot<C: Connection> {
    client: SessionClient<C>,
    logical_stream_id: Option<u64>,
}

impl<C: Connection> AcceptedSlot<C> {
    fn new(client: SessionClient<C>, logical_stream_id: u64) -> Self {
        Self {
            client,
            logical_stream_id: Some(logical_stream_id),
        }
    }

    /// A guard that only keeps the session running (streams the relay opened).
    pub(crate) fn session_only(client: SessionClient<C>) -> Self {
        Self {
            client,
            logical_stream_id: None,
        }
    }

    /// Forgets the slot (it was already freed).
    fn disarm(&mut self) {
        self.logical_stream_id = None;
    }
}

impl<C: Connection> Drop for AcceptedSlot<C> {
    fn drop(&mut self) {
        if let Some(id) = self.logical_stream_id {
            self.client.core.release_stream(id);
        }
    }
}
