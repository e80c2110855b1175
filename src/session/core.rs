//! The session's bookkeeping and operations, shared by the driver tasks and every
//! [`SessionClient`](crate::SessionClient) clone.
//!
//! One lock guards all tables. Each critical section is a few map operations and never
//! awaits, and keeping everything under one lock makes the invariants easy to hold: an
//! open is registered only if the session has not ended, and ending the session drains
//! every table at once, so no waiter can slip in afterwards and hang until its timeout.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tracing::{debug, warn};

use super::control::frame;
use super::{lock, ClientEvent, ControlEvent, SessionShared, State};
use crate::error::{Error, TimeoutKind};
use crate::protocol::{
    CloseCode, Metadata, OpenFlags, OpenRequest, OpenResponse, OpenStatus, Ping, Pong,
    ProtocolError, ProtocolMessage, RejectCode, ServiceId, StreamBind, StreamClose,
};
use crate::transport::{Connection, RecvStream, SendStream};

/// Both halves of a data stream.
pub(crate) type Stream<C> = (<C as Connection>::SendStream, <C as Connection>::RecvStream);

/// Application error code used when this side resets a data stream it refuses.
pub(crate) const REFUSED_STREAM_CODE: u32 = 0x5152_0001;
/// Application error code used when closing a connection whose peer broke the protocol.
pub(crate) const PROTOCOL_ERROR_CODE: u32 = 0x5152_0002;
/// Application error code used when closing a connection whose peer stopped answering pings.
pub(crate) const KEEPALIVE_TIMEOUT_CODE: u32 = 0x5152_0003;

/// How many recently bound or abandoned logical stream ids are remembered, so a second
/// stream claiming one is refused at once instead of being held.
const RETIRED_IDS_REMEMBERED: usize = 4096;

/// Why a session ended. The first reason recorded wins.
#[derive(Debug, Clone)]
pub(crate) enum Terminal {
    /// Closed gracefully by either side.
    Closed,
    /// The connection was lost.
    Disconnected,
    /// The peer sent malformed bytes on the control stream.
    Protocol(ProtocolError),
    /// The peer sent a well-formed message the protocol does not allow there.
    Violation(&'static str),
    /// The peer stopped answering keep-alive pings.
    KeepaliveTimeout,
}

impl Terminal {
    pub(crate) fn error(&self) -> Error {
        match self {
            Self::Closed => Error::SessionClosed,
            Self::Disconnected => Error::Disconnected,
            Self::Protocol(error) => Error::Protocol(error.clone()),
            Self::Violation(what) => Error::ProtocolViolation(what),
            Self::KeepaliveTimeout => Error::Timeout(TimeoutKind::Ping),
        }
    }

    fn state(&self) -> State {
        match self {
            Self::Disconnected | Self::KeepaliveTimeout => State::Disconnected,
            Self::Closed | Self::Protocol(_) | Self::Violation(_) => State::Closed,
        }
    }
}

/// The acceptor's answer to one of our opens, as the reader hands it over.
pub(crate) enum OpenAnswer<C: Connection> {
    /// Accepted, and the data stream had already arrived.
    Bound {
        logical_stream_id: u64,
        stream: Stream<C>,
    },
    /// Accepted; the data stream will come through `stream`.
    Accepted {
        logical_stream_id: u64,
        stream: oneshot::Receiver<Result<Stream<C>, Error>>,
    },
    /// Refused.
    Rejected {
        code: RejectCode,
        reason: Option<String>,
    },
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// What one of the peer's open requests asked for.
#[derive(Debug, Clone)]
pub(crate) struct RequestedStream {
    pub(crate) service: ServiceId,
    pub(crate) metadata: Metadata,
}

/// A data stream that arrived before the `OpenResponse` announcing its id was read.
struct EarlyStream<C: Connection> {
    stream: Stream<C>,
    arrived: Instant,
}

/// Ids that must not be bound again, forgetting the oldest past a bound.
#[derive(Default)]
struct RetiredIds {
    order: VecDeque<u64>,
    members: HashSet<u64>,
}

impl RetiredIds {
    fn insert(&mut self, id: u64) {
        if self.members.insert(id) {
            self.order.push_back(id);
            if self.order.len() > RETIRED_IDS_REMEMBERED {
                if let Some(oldest) = self.order.pop_front() {
                    self.members.remove(&oldest);
                }
            }
        }
    }

    fn contains(&self, id: u64) -> bool {
        self.members.contains(&id)
    }
}

/// Everything that changes while the session runs.
pub(crate) struct Tables<C: Connection> {
    terminal: Option<Terminal>,
    /// Our opens waiting for their `OpenResponse`, by request id.
    pending_opens: HashMap<u64, Reply<OpenAnswer<C>>>,
    /// Our accepted opens waiting for their data stream, by logical stream id.
    bind_waiters: HashMap<u64, Reply<Stream<C>>>,
    /// Data streams that overtook their `OpenResponse`, by logical stream id.
    early_streams: HashMap<u64, EarlyStream<C>>,
    retired_ids: RetiredIds,
    /// Our pings waiting for their pong, by sequence.
    pending_pings: HashMap<u64, Reply<()>>,
    /// The peer's open requests delivered to the application and not yet answered, with
    /// what they asked for (so an accept can say which service its stream reaches).
    unanswered_requests: HashMap<u64, RequestedStream>,
    /// Logical streams we accepted for the peer and that are not closed yet.
    active_streams: HashSet<u64>,
}

impl<C: Connection> Default for Tables<C> {
    fn default() -> Self {
        Self {
            terminal: None,
            pending_opens: HashMap::new(),
            bind_waiters: HashMap::new(),
            early_streams: HashMap::new(),
            retired_ids: RetiredIds::default(),
            pending_pings: HashMap::new(),
            unanswered_requests: HashMap::new(),
            active_streams: HashSet::new(),
        }
    }
}

/// A point-in-time view of a session's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionStats {
    /// Our opens waiting for an answer or a data stream.
    pub pending_opens: usize,
    /// The peer's requests not yet answered plus streams we accepted and not yet closed.
    pub active_streams: usize,
    /// Data streams held because they overtook their `OpenResponse`.
    pub early_streams: usize,
    /// Data streams refused: bad `StreamBind`, unknown or reused id, too slow, hold full.
    pub refused_streams: u64,
    /// The peer's open requests refused by the session itself (limit reached, no handler).
    pub refused_requests: u64,
}

/// What goes to the writer task.
pub(crate) enum WriterCommand {
    /// Bytes of one or more whole frames.
    Frame(Bytes),
    /// Finish the control stream after everything queued before, then acknowledge.
    Finish(oneshot::Sender<()>),
}

/// The session's shared state and its operations.
pub(crate) struct SessionCore<C: Connection> {
    pub(crate) shared: Arc<SessionShared<C>>,
    tables: Mutex<Tables<C>>,
    writer: mpsc::Sender<WriterCommand>,
    pub(crate) open_slots: Arc<Semaphore>,
    next_request_id: AtomicU64,
    next_logical_stream_id: AtomicU64,
    next_ping_sequence: AtomicU64,
    pub(crate) control_events: broadcast::Sender<ControlEvent>,
    refused_streams: AtomicU64,
    refused_requests: AtomicU64,
}

impl<C: Connection> SessionCore<C> {
    pub(crate) fn new(shared: Arc<SessionShared<C>>, writer: mpsc::Sender<WriterCommand>) -> Self {
        let open_slots = Arc::new(Semaphore::new(shared.config.max_inflight_opens));
        Self {
            shared,
            tables: Mutex::new(Tables::default()),
            writer,
            open_slots,
            next_request_id: AtomicU64::new(1),
            next_logical_stream_id: AtomicU64::new(1),
            next_ping_sequence: AtomicU64::new(1),
            control_events: broadcast::channel(256).0,
            refused_streams: AtomicU64::new(0),
            refused_requests: AtomicU64::new(0),
        }
    }

    pub(crate) fn config(&self) -> &crate::config::Config {
        &self.shared.config
    }

    /// The error every operation gets once the session ended.
    pub(crate) fn terminal_error(&self) -> Error {
        lock(&self.tables)
            .terminal
            .as_ref()
            .map_or(Error::SessionClosed, Terminal::error)
    }

    /// Whether the session has ended, and why.
    pub(crate) fn terminal(&self) -> Option<Terminal> {
        lock(&self.tables).terminal.clone()
    }

    pub(crate) fn ensure_ready(&self) -> Result<(), Error> {
        match self.shared.state() {
            State::Ready => Ok(()),
            State::Disconnected => Err(Error::Disconnected),
            _ => Err(self.terminal_error()),
        }
    }

    pub(crate) fn stats(&self) -> SessionStats {
        let tables = lock(&self.tables);
        SessionStats {
            pending_opens: tables.pending_opens.len() + tables.bind_waiters.len(),
            active_streams: tables.unanswered_requests.len() + tables.active_streams.len(),
            early_streams: tables.early_streams.len(),
            refused_streams: self.refused_streams.load(Ordering::Relaxed),
            refused_requests: self.refused_requests.load(Ordering::Relaxed),
        }
    }

    /// Queues a message for the writer task.
    pub(crate) async fn send(&self, message: &ProtocolMessage) -> Result<(), Error> {
        let bytes = frame(message)?;
        self.writer
            .send(WriterCommand::Frame(bytes))
            .await
            .map_err(|_| self.terminal_error())
    }

    /// Ends the session for `reason`: records it (first reason wins), moves to the final
    /// state and fails every waiter with the matching error.
    pub(crate) fn terminate(&self, reason: Terminal) {
        let mut tables = lock(&self.tables);
        if tables.terminal.is_some() {
            return;
        }
        debug!(?reason, "session ended");
        tables.terminal = Some(reason.clone());
        let pending_opens = std::mem::take(&mut tables.pending_opens);
        let bind_waiters = std::mem::take(&mut tables.bind_waiters);
        let pending_pings = std::mem::take(&mut tables.pending_pings);
        let early_streams = std::mem::take(&mut tables.early_streams);
        tables.unanswered_requests.clear();
        tables.active_streams.clear();
        drop(tables);
        self.shared.set_state(reason.state());
        for reply in pending_opens.into_values() {
            let _ = reply.send(Err(reason.error()));
        }
        for reply in bind_waiters.into_values() {
            let _ = reply.send(Err(reason.error()));
        }
        for reply in pending_pings.into_values() {
            let _ = reply.send(Err(reason.error()));
        }
        for early in early_streams.into_values() {
            refuse_stream::<C>(early.stream);
        }
    }

    /// A fresh logical stream id for an accepted open: ids start at 1 (0 means "session")
    /// and skip ids the application chose by hand and still uses.
    pub(crate) fn allocate_stream_id(&self) -> u64 {
        let tables = lock(&self.tables);
        loop {
            let id = self.next_logical_stream_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !tables.active_streams.contains(&id) {
                return id;
            }
        }
    }

    // ----- opener side -------------------------------------------------------------------

    /// Opens a stream to `service`, holding `slot` (one of `max_inflight_opens`) until the
    /// open completes either way. Returns the stream and its logical stream id.
    pub(crate) async fn open(
        &self,
        service: ServiceId,
        metadata: Metadata,
        flags: OpenFlags,
        slot: OwnedSemaphorePermit,
    ) -> Result<(Stream<C>, u64), Error> {
        let _slot = slot;
        self.ensure_ready()?;
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut tables = lock(&self.tables);
            if let Some(terminal) = &tables.terminal {
                return Err(terminal.error());
            }
            tables.pending_opens.insert(request_id, reply);
        }
        let mut cleanup = OpenCleanup {
            core: self,
            request_id,
            logical_stream_id: None,
            done: false,
        };
        debug!(request_id, service = ?service.as_str(), "open requested");
        let request = OpenRequest::new(request_id, service)
            .with_metadata(metadata)
            .with_flags(flags);
        self.send(&ProtocolMessage::OpenRequest(request)).await?;

        let answer = match timeout(self.config().open_timeout, answer).await {
            Err(_) => return Err(Error::Timeout(TimeoutKind::OpenRequest)),
            Ok(Err(_)) => return Err(self.terminal_error()),
            Ok(Ok(answer)) => answer?,
        };
        let stream = match answer {
            OpenAnswer::Rejected { code, reason } => {
                cleanup.done = true;
                debug!(request_id, %code, ?reason, "open rejected");
                return Err(Error::StreamRejected { code, reason });
            }
            OpenAnswer::Bound {
                logical_stream_id,
                stream,
            } => (stream, logical_stream_id),
            OpenAnswer::Accepted {
                logical_stream_id,
                stream,
            } => {
                cleanup.logical_stream_id = Some(logical_stream_id);
                match timeout(self.config().stream_bind_timeout, stream).await {
                    Err(_) => return Err(Error::Timeout(TimeoutKind::StreamBind)),
                    Ok(Err(_)) => return Err(self.terminal_error()),
                    Ok(Ok(stream)) => (stream?, logical_stream_id),
                }
            }
        };
        cleanup.done = true;
        Ok(stream)
    }

    /// Hands the peer's answer to the open waiting for it.
    pub(crate) fn on_open_response(&self, response: OpenResponse) {
        let mut tables = lock(&self.tables);
        let Some(reply) = tables.pending_opens.remove(&response.request_id) else {
            debug!(
                request_id = response.request_id,
                "answer to an abandoned open"
            );
            if let Some(id) = response.logical_stream_id {
                // Its data stream will come; refuse it at once instead of holding it.
                tables.retired_ids.insert(id);
                if let Some(early) = tables.early_streams.remove(&id) {
                    self.refused_streams.fetch_add(1, Ordering::Relaxed);
                    refuse_stream::<C>(early.stream);
                }
            }
            return;
        };
        let answer = match (response.status, response.logical_stream_id) {
            (OpenStatus::Rejected(code), _) => Ok(OpenAnswer::Rejected {
                code,
                reason: response.reason,
            }),
            (OpenStatus::Accepted, None | Some(0)) => Err(Error::ProtocolViolation(
                "accepted OpenResponse without a logical stream id",
            )),
            (OpenStatus::Accepted, Some(id))
                if tables.bind_waiters.contains_key(&id) || tables.retired_ids.contains(id) =>
            {
                Err(Error::ProtocolViolation(
                    "accepted OpenResponse reuses a logical stream id",
                ))
            }
            (OpenStatus::Accepted, Some(id)) => {
                if let Some(early) = tables.early_streams.remove(&id) {
                    tables.retired_ids.insert(id);
                    Ok(OpenAnswer::Bound {
                        logical_stream_id: id,
                        stream: early.stream,
                    })
                } else {
                    let (waiter, stream) = oneshot::channel();
                    tables.bind_waiters.insert(id, waiter);
                    Ok(OpenAnswer::Accepted {
                        logical_stream_id: id,
                        stream,
                    })
                }
            }
        };
        drop(tables);
        if let Err(Ok(OpenAnswer::Bound { stream, .. })) = reply.send(answer) {
            refuse_stream::<C>(stream);
        }
    }

    /// Routes a data stream whose `StreamBind` names `logical_stream_id`.
    pub(crate) fn on_bound_stream(&self, logical_stream_id: u64, stream: Stream<C>) {
        let mut tables = lock(&self.tables);
        if tables.terminal.is_some() {
            drop(tables);
            refuse_stream::<C>(stream);
            return;
        }
        if let Some(waiter) = tables.bind_waiters.remove(&logical_stream_id) {
            tables.retired_ids.insert(logical_stream_id);
            drop(tables);
            if let Err(Ok(stream)) = waiter.send(Ok(stream)) {
                // The open gave up (timed out or was dropped) just now.
                self.refused_streams.fetch_add(1, Ordering::Relaxed);
                refuse_stream::<C>(stream);
            }
            return;
        }
        let reason = if tables.retired_ids.contains(logical_stream_id) {
            "logical stream id already bound or abandoned"
        } else if tables.early_streams.contains_key(&logical_stream_id) {
            "two data streams claim one logical stream id"
        } else if tables.early_streams.len() >= self.config().max_inflight_opens {
            "too many data streams waiting for their OpenResponse"
        } else {
            tables.early_streams.insert(
                logical_stream_id,
                EarlyStream {
                    stream,
                    arrived: Instant::now(),
                },
            );
            return;
        };
        drop(tables);
        warn!(logical_stream_id, reason, "refusing data stream");
        self.refused_streams.fetch_add(1, Ordering::Relaxed);
        refuse_stream::<C>(stream);
    }

    /// Counts and resets a data stream whose header was unusable.
    pub(crate) fn refuse_unbound_stream(&self, stream: Stream<C>, why: &Error) {
        warn!(error = %why, "refusing data stream without a valid StreamBind");
        self.refused_streams.fetch_add(1, Ordering::Relaxed);
        refuse_stream::<C>(stream);
    }

    /// Resets early streams nobody claimed within the bind timeout.
    pub(crate) fn expire_early_streams(&self) {
        let bind_timeout = self.config().stream_bind_timeout;
        let expired: Vec<(u64, EarlyStream<C>)> = {
            let mut tables = lock(&self.tables);
            let ids: Vec<u64> = tables
                .early_streams
                .iter()
                .filter(|(_, early)| early.arrived.elapsed() >= bind_timeout)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| {
                    tables.retired_ids.insert(id);
                    tables.early_streams.remove(&id).map(|early| (id, early))
                })
                .collect()
        };
        for (id, early) in expired {
            warn!(
                logical_stream_id = id,
                "no open claimed this data stream in time"
            );
            self.refused_streams.fetch_add(1, Ordering::Relaxed);
            refuse_stream::<C>(early.stream);
        }
    }

    // ----- acceptor side -----------------------------------------------------------------

    /// Admits or refuses the peer's open request. Returns the rejection to send, if any.
    pub(crate) fn on_open_request(
        &self,
        request: OpenRequest,
        events: &mpsc::Sender<ClientEvent>,
    ) -> Option<OpenResponse> {
        let request_id = request.request_id;
        let limit = self.config().max_concurrent_streams;
        let mut tables = lock(&self.tables);
        let at_limit = tables.unanswered_requests.len() + tables.active_streams.len() >= limit;
        let refusal = if tables.terminal.is_some() {
            Some((
                RejectCode::ServiceUnavailable,
                "session is closing".to_owned(),
            ))
        } else if at_limit {
            Some((
                RejectCode::LimitExceeded,
                format!("too many concurrent streams (limit {limit})"),
            ))
        } else {
            match tables.unanswered_requests.entry(request_id) {
                Entry::Occupied(_) => {
                    Some((RejectCode::InternalError, "duplicate request id".to_owned()))
                }
                Entry::Vacant(slot) => {
                    slot.insert(RequestedStream {
                        service: request.service.clone(),
                        metadata: request.metadata.clone(),
                    });
                    let event = ClientEvent::OpenRequest {
                        request_id,
                        service: request.service,
                        metadata: request.metadata,
                    };
                    let refusal = match events.try_send(event) {
                        Ok(()) => None,
                        Err(mpsc::error::TrySendError::Full(_)) => Some((
                            RejectCode::LimitExceeded,
                            "open requests arrive faster than they are handled".to_owned(),
                        )),
                        Err(mpsc::error::TrySendError::Closed(_)) => Some((
                            RejectCode::ServiceUnavailable,
                            "this peer does not accept streams".to_owned(),
                        )),
                    };
                    if refusal.is_some() {
                        tables.unanswered_requests.remove(&request_id);
                    }
                    refusal
                }
            }
        };
        drop(tables);
        refusal.map(|(code, reason)| {
            self.refused_requests.fetch_add(1, Ordering::Relaxed);
            debug!(request_id, %code, %reason, "refusing open request");
            OpenResponse::rejected(request_id, code, Some(reason))
        })
    }

    /// Records the acceptance of `request_id` as `logical_stream_id` (which then holds a
    /// `max_concurrent_streams` slot until released) and returns what the request asked
    /// for; the `OpenResponse` still has to be sent with [`send_accept`](Self::send_accept).
    /// Synchronous, so a caller can take ownership of the slot before anything awaits.
    pub(crate) fn admit_accept(
        &self,
        request_id: u64,
        logical_stream_id: u64,
    ) -> Result<RequestedStream, Error> {
        let mut tables = lock(&self.tables);
        if let Some(terminal) = &tables.terminal {
            return Err(terminal.error());
        }
        if logical_stream_id == 0 || tables.active_streams.contains(&logical_stream_id) {
            return Err(Error::InvalidStreamId(logical_stream_id));
        }
        let Some(requested) = tables.unanswered_requests.remove(&request_id) else {
            return Err(Error::UnknownRequest { request_id });
        };
        tables.active_streams.insert(logical_stream_id);
        Ok(requested)
    }

    /// Sends the `OpenResponse` for an acceptance recorded by [`admit_accept`](Self::admit_accept).
    pub(crate) async fn send_accept(
        &self,
        request_id: u64,
        logical_stream_id: u64,
    ) -> Result<(), Error> {
        let response = OpenResponse::accepted(request_id, logical_stream_id);
        self.send(&ProtocolMessage::OpenResponse(response)).await
    }

    pub(crate) async fn accept_open(
        &self,
        request_id: u64,
        logical_stream_id: u64,
    ) -> Result<(), Error> {
        self.admit_accept(request_id, logical_stream_id)?;
        self.send_accept(request_id, logical_stream_id).await
    }

    pub(crate) async fn reject_open(
        &self,
        request_id: u64,
        code: RejectCode,
        reason: Option<String>,
    ) -> Result<(), Error> {
        if lock(&self.tables)
            .unanswered_requests
            .remove(&request_id)
            .is_none()
        {
            return Err(Error::UnknownRequest { request_id });
        }
        let response = OpenResponse::rejected(request_id, code, reason);
        self.send(&ProtocolMessage::OpenResponse(response)).await
    }

    /// Frees an accepted stream's slot without telling the peer.
    pub(crate) fn release_stream(&self, logical_stream_id: u64) {
        lock(&self.tables).active_streams.remove(&logical_stream_id);
    }

    pub(crate) async fn close_stream(
        &self,
        logical_stream_id: u64,
        code: CloseCode,
        reason: Option<String>,
    ) -> Result<(), Error> {
        self.release_stream(logical_stream_id);
        let close = StreamClose {
            logical_stream_id,
            code,
            reason,
        };
        self.send(&ProtocolMessage::StreamClose(close)).await
    }

    pub(crate) fn on_stream_close(&self, logical_stream_id: u64) {
        self.release_stream(logical_stream_id);
    }

    // ----- keep-alive and close ----------------------------------------------------------

    pub(crate) async fn ping(&self) -> Result<Duration, Error> {
        self.ensure_ready()?;
        let sequence = self.next_ping_sequence.fetch_add(1, Ordering::Relaxed);
        let (reply, pong) = oneshot::channel();
        {
            let mut tables = lock(&self.tables);
            if let Some(terminal) = &tables.terminal {
                return Err(terminal.error());
            }
            tables.pending_pings.insert(sequence, reply);
        }
        let _cleanup = PingCleanup {
            core: self,
            sequence,
        };
        let sent_at = Instant::now();
        self.send(&ProtocolMessage::Ping(Ping { sequence })).await?;
        match timeout(self.config().ping_timeout, pong).await {
            Err(_) => Err(Error::Timeout(TimeoutKind::Ping)),
            Ok(Err(_)) => Err(self.terminal_error()),
            Ok(Ok(result)) => result.map(|()| sent_at.elapsed()),
        }
    }

    pub(crate) fn on_pong(&self, pong: Pong) {
        let reply = lock(&self.tables).pending_pings.remove(&pong.sequence);
        if let Some(reply) = reply {
            let _ = reply.send(Ok(()));
        }
    }

    /// Sends `StreamClose(0)`, finishes the control stream and ends the session.
    pub(crate) async fn close(&self, code: CloseCode, reason: Option<String>) -> Result<(), Error> {
        if self.terminal().is_some() {
            return Ok(());
        }
        self.shared.set_state(State::Closing);
        let close = StreamClose {
            logical_stream_id: 0,
            code,
            reason,
        };
        let sent = self.send(&ProtocolMessage::StreamClose(close)).await;
        let (done, flushed) = oneshot::channel();
        if sent.is_ok() && self.writer.send(WriterCommand::Finish(done)).await.is_ok() {
            let _ = flushed.await;
        }
        self.terminate(Terminal::Closed);
        sent
    }

    /// Records what the peer's `StreamClose(0)` says.
    pub(crate) fn on_session_close(&self) {
        self.shared.set_state(State::Closing);
        self.terminate(Terminal::Closed);
    }
}

/// Removes an open's entries if the open ends early (error, timeout, or its future is
/// dropped), so nothing waits for an open nobody awaits.
struct OpenCleanup<'a, C: Connection> {
    core: &'a SessionCore<C>,
    request_id: u64,
    logical_stream_id: Option<u64>,
    done: bool,
}

impl<C: Connection> Drop for OpenCleanup<'_, C> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut tables = lock(&self.core.tables);
        tables.pending_opens.remove(&self.request_id);
        if let Some(id) = self.logical_stream_id {
            tables.bind_waiters.remove(&id);
            tables.retired_ids.insert(id);
        }
    }
}

struct PingCleanup<'a, C: Connection> {
    core: &'a SessionCore<C>,
    sequence: u64,
}

impl<C: Connection> Drop for PingCleanup<'_, C> {
    fn drop(&mut self) {
        lock(&self.core.tables).pending_pings.remove(&self.sequence);
    }
}

/// Resets both halves of a data stream this side will not use.
pub(crate) fn refuse_stream<C: Connection>((mut send, mut recv): Stream<C>) {
    send.reset(REFUSED_STREAM_CODE);
    recv.stop(REFUSED_STREAM_CODE);
}

/// Writes a `StreamBind` header and flushes it.
pub(crate) async fn write_stream_bind<S: AsyncWrite + Unpin>(
    send: &mut S,
    logical_stream_id: u64,
) -> Result<(), Error> {
    let header = StreamBind::new(logical_stream_id).encode();
    send.write_all(&header).await.map_err(Error::transport)?;
    send.flush().await.map_err(Error::transport)
}
