//! The I/O half of a session: its [`SessionMachine`] behind one lock, shared by the driver
//! tasks and every [`SessionClient`](crate::session::SessionClient) clone, and the
//! performing of the machine's actions.
//!
//! Every operation is one short critical section (a machine step, the state changes it
//! asks for, and taking out the senders of the waiters it completes, see
//! [`waiters`](super::waiters)), then everything else outside the lock: waiters woken,
//! frames sent on the control stream, data streams reset, events delivered. Nothing awaits while the lock is held. Timeouts stay here, on the futures
//! that wait; a future that gives up tells the machine so (`abandon_open`, `abandon_ping`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::error::Elapsed;
use tokio::time::{timeout, timeout_at};
use tracing::{debug, warn};

use super::control::frame;
use super::events::{ClientEvent, ControlEvent};
use super::machine::{
    Action, Actions, Limits, RequestedStream, SessionMachine, SessionStats, Terminal, Undeliverable,
};
use super::waiters::{OpenReply, Waiters};
use super::writer::ControlWriter;
use super::{lock, SessionShared, State};
use crate::config::Config;
use crate::error::{Error, TimeoutKind};
use crate::protocol::{
    CloseCode, Metadata, OpenFlags, ProtocolMessage, RejectCode, ServiceId, StreamBind,
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

/// How long an open waits for its data stream after a lane of the session was lost, before
/// it is opened again: the stream may have gone with the lane (see [`SessionCore::open`]).
pub(crate) const LANE_LOSS_GRACE: Duration = Duration::from_secs(1);

/// How long after this side saw a lane lost the peer may still send streams over it: when
/// a path dies, the two sides' idle timers end within about a keep-alive interval (5 s)
/// of each other; twice that.
pub(crate) const RECENT_LANE_LOSS: Duration = Duration::from_secs(10);

/// How many times an open is tried when lanes are lost while it waits.
pub(crate) const OPEN_ATTEMPTS: u32 = 3;

/// Commands queued for the control stream writer before senders wait.
const WRITER_QUEUE: usize = 1024;

/// Control events kept for observers that fall behind, before the oldest are dropped.
const CONTROL_EVENTS_BUFFER: usize = 256;

/// What the session lock guards: the machine and the senders of those waiting on it.
pub(crate) struct Locked<C: Connection> {
    pub(crate) machine: SessionMachine<Stream<C>>,
    pub(crate) waiters: Waiters<C>,
}

/// The session's shared state and its operations.
pub(crate) struct SessionCore<C: Connection> {
    pub(crate) shared: Arc<SessionShared<C>>,
    locked: Mutex<Locked<C>>,
    /// The control stream's sending half.
    pub(crate) writer: ControlWriter<C::SendStream>,
    /// At most one open exchange was under way after the last step: a frame sent now is
    /// written in the sender's task. With more, frames go through the writer's queue so
    /// that a burst leaves in a few packets rather than one per frame.
    quiet: AtomicBool,
    pub(crate) open_slots: Arc<Semaphore>,
    /// Made by the first observer: most sessions have none, and a channel costs its
    /// buffer up front.
    control_events: OnceLock<broadcast::Sender<ControlEvent>>,
    /// How open requests are answered once nobody receives events, when the side that
    /// dropped its receiver said (see [`answer_unserved_opens`](Self::answer_unserved_opens)).
    unserved_answer: OnceLock<(RejectCode, Option<String>)>,
    /// Takes the peer's open requests in the control reader's task, ahead of the events
    /// channel, while set (see [`OpenHandler`]).
    open_handler: Mutex<Option<Arc<dyn OpenHandler>>>,
}

/// Takes the peer's open requests as the control reader reads them, in its task: the
/// edge's [`Router`](crate::edge::Router) sets one while it serves a session, so that an
/// open starts its stream's task straight from the reader, instead of passing through the
/// events channel and the serving loop's task first (a thread hand-off on the open's
/// critical path).
pub(crate) trait OpenHandler: Send + Sync {
    /// Takes request `request_id` (it must not block), or refuses it: the session then
    /// answers with the code and reason.
    fn open_requested(
        &self,
        request_id: u64,
        service: ServiceId,
        metadata: Metadata,
    ) -> Result<(), (RejectCode, Option<String>)>;
}

impl<C: Connection> SessionCore<C> {
    pub(crate) fn new(shared: Arc<SessionShared<C>>) -> Self {
        let open_slots = Arc::new(Semaphore::new(shared.config.max_inflight_opens));
        let machine = SessionMachine::new(Limits::from_config(&shared.config));
        Self {
            shared,
            locked: Mutex::new(Locked {
                machine,
                waiters: Waiters::default(),
            }),
            writer: ControlWriter::new(WRITER_QUEUE),
            quiet: AtomicBool::new(true),
            open_slots,
            control_events: OnceLock::new(),
            unserved_answer: OnceLock::new(),
            open_handler: Mutex::new(None),
        }
    }

    /// Sets (or with `None`, removes) the [`OpenHandler`] that takes open requests ahead
    /// of the events channel.
    pub(crate) fn set_open_handler(&self, handler: Option<Arc<dyn OpenHandler>>) {
        *lock(&self.open_handler) = handler;
    }

    /// Answers the peer's open requests with `code` and `reason` once the events receiver
    /// is gone, instead of the session's own `ServiceUnavailable`: a side that refuses
    /// every request the same way need not keep an events channel for it. The first
    /// answer set stays.
    pub(crate) fn answer_unserved_opens(&self, code: RejectCode, reason: Option<String>) {
        let _ = self.unserved_answer.set((code, reason));
    }

    /// A new observer of control events, from the next event on.
    pub(crate) fn observe_control_events(&self) -> broadcast::Receiver<ControlEvent> {
        self.control_events
            .get_or_init(|| broadcast::channel(CONTROL_EVENTS_BUFFER).0)
            .subscribe()
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Runs `input` on the machine under the lock, makes the state changes it asks for
    /// there, wakes the waiters it completes once the lock is released, and returns its
    /// result with the actions left to perform.
    pub(crate) fn step<R>(
        &self,
        input: impl FnOnce(&mut Locked<C>, &mut Actions<Stream<C>>) -> R,
    ) -> (R, Actions<Stream<C>>) {
        let mut actions = Actions::new();
        let mut locked = lock(&self.locked);
        let result = input(&mut locked, &mut actions);
        let quiet = locked.machine.exchanges_under_way() <= 1;
        self.quiet.store(quiet, Ordering::Relaxed);
        if actions.is_empty() {
            return (result, actions);
        }
        let (completions, mut rest) = locked.waiters.complete(&self.shared, actions);
        drop(locked);
        for completion in completions {
            if let Some((stream, logical_stream_id)) = completion.fire() {
                // Its open gave up in the same instant: rare, so locking again is fine.
                lock(&self.locked).machine.stream_undeliverable(
                    stream,
                    logical_stream_id,
                    &mut rest,
                );
            }
        }
        (result, rest)
    }

    /// Performs actions left by [`step`](Self::step): sends go to the control stream in
    /// order, and the first send that fails is returned (the others still run). Events go
    /// to `events`; only the control reader's steps make events, and it passes `None`
    /// once their receiver is gone.
    pub(crate) async fn perform(
        &self,
        actions: Actions<Stream<C>>,
        events: Option<&mpsc::Sender<ClientEvent>>,
    ) -> Result<(), Error> {
        let mut sent = Ok(());
        for action in actions {
            let message = match action {
                Action::Send(message) => message,
                Action::Deliver(event) => {
                    if let Some(rejection) = self.deliver(event, events) {
                        let _ = self.send(&rejection).await;
                    }
                    continue;
                }
                other => {
                    self.perform_now(other);
                    continue;
                }
            };
            let result = self.send(&message).await;
            if sent.is_ok() {
                sent = result;
            }
        }
        sent
    }

    /// Performs actions that need no await (everything but sends and events).
    fn perform_now(&self, action: Action<Stream<C>>) {
        match action {
            Action::Refuse {
                stream,
                logical_stream_id,
                why,
            } => {
                if why.warrants_warning() {
                    warn!(
                        logical_stream_id,
                        reason = why.as_str(),
                        "refusing data stream"
                    );
                } else {
                    debug!(
                        logical_stream_id,
                        reason = why.as_str(),
                        "refusing data stream"
                    );
                }
                refuse_stream::<C>(stream);
            }
            Action::Observe(event) => {
                if let Some(observers) = self.control_events.get() {
                    if observers.receiver_count() > 0 {
                        let _ = observers.send(event);
                    }
                }
            }
            Action::Send(message) => {
                // Sends come from application calls and peer messages, which go through
                // `perform`; should one reach here, queue it without waiting.
                if let Ok(bytes) = frame(&message) {
                    let _ = self
                        .writer
                        .try_send(bytes, self.quiet.load(Ordering::Relaxed));
                }
            }
            // Performed under the lock by `step`; events only exist for the reader.
            Action::AnswerOpen { .. }
            | Action::BindOpen { .. }
            | Action::AnswerPing { .. }
            | Action::Closing
            | Action::Ended(_)
            | Action::Deliver(_) => {}
        }
    }

    /// Performs the actions of a step that sends nothing.
    fn perform_all_now(&self, actions: Actions<Stream<C>>) {
        for action in actions {
            self.perform_now(action);
        }
    }

    /// Hands `event` to the application through `events`; `None` when its receiver is
    /// gone (only the control reader delivers events). Returns the rejection to send when
    /// it was an open request nobody could take.
    fn deliver(
        &self,
        event: ClientEvent,
        events: Option<&mpsc::Sender<ClientEvent>>,
    ) -> Option<ProtocolMessage> {
        let handler = lock(&self.open_handler).clone();
        let event = match (event, handler) {
            (
                ClientEvent::OpenRequest {
                    request_id,
                    service,
                    metadata,
                },
                Some(handler),
            ) => {
                let refused = handler.open_requested(request_id, service, metadata);
                return refused.err().and_then(|(code, reason)| {
                    let ((), actions) = self.step(|locked, out| {
                        // Unanswered until now, so this cannot fail.
                        let _ = locked.machine.reject_open(request_id, code, reason, out);
                    });
                    first_message(actions)
                });
            }
            (event, _) => event,
        };
        let sent = match events {
            Some(events) => events.try_send(event),
            None => Err(mpsc::error::TrySendError::Closed(event)),
        };
        let (event, why) = match sent {
            Ok(()) => return None,
            Err(mpsc::error::TrySendError::Full(event)) => (event, Undeliverable::Full),
            Err(mpsc::error::TrySendError::Closed(event)) => (event, Undeliverable::NoReceiver),
        };
        let ClientEvent::OpenRequest { request_id, .. } = event else {
            // Pings and stream closes are dropped, not queued without bound.
            return None;
        };
        let ((), actions) = self.step(|locked, out| {
            match (why, self.unserved_answer.get()) {
                (Undeliverable::NoReceiver, Some((code, reason))) => {
                    // Answered as the application would have: the request is unanswered,
                    // so this cannot fail.
                    let _ = locked
                        .machine
                        .reject_open(request_id, *code, reason.clone(), out);
                }
                _ => locked.machine.request_undeliverable(request_id, why, out),
            }
        });
        first_message(actions)
    }

    /// The error every operation gets once the session ended.
    pub(crate) fn terminal_error(&self) -> Error {
        lock(&self.locked).machine.terminal_error()
    }

    pub(crate) fn ensure_ready(&self) -> Result<(), Error> {
        match self.shared.state() {
            State::Ready => Ok(()),
            State::Disconnected => Err(Error::Disconnected),
            _ => Err(self.terminal_error()),
        }
    }

    pub(crate) fn stats(&self) -> SessionStats {
        lock(&self.locked).machine.stats()
    }

    /// Sends a message on the control stream (see [`ControlWriter::send`]).
    pub(crate) async fn send(&self, message: &ProtocolMessage) -> Result<(), Error> {
        let bytes = frame(message)?;
        self.writer
            .send(bytes, self.quiet.load(Ordering::Relaxed))
            .await
            .map_err(|_| self.terminal_error())
    }

    /// Ends the session for `reason` (the first reason wins): moves to the final state,
    /// fails every waiter with the matching error and resets every held stream.
    pub(crate) fn terminate(&self, reason: Terminal) {
        let ((), actions) = self.step(|locked, out| locked.machine.terminate(reason, out));
        self.perform_all_now(actions);
    }

    /// A fresh logical stream id for an accepted open.
    pub(crate) fn allocate_stream_id(&self) -> u64 {
        lock(&self.locked).machine.allocate_stream_id()
    }

    // ----- opener side -------------------------------------------------------------------

    /// Opens a stream to `service`, holding `slot` (one of `max_inflight_opens`) until the
    /// open completes either way. Returns the stream and its logical stream id.
    ///
    /// Over a transport of several connections (lanes), an open whose data stream has not
    /// come within [`LANE_LOSS_GRACE`] of a lane's loss is opened again, at most
    /// [`OPEN_ATTEMPTS`] times in all: the peer may have sent its `StreamBind` over the
    /// lost lane before it learnt of the loss. Nothing was written on such a stream yet,
    /// so opening again repeats nothing; the peer's service sees its first stream fail.
    pub(crate) async fn open(
        &self,
        service: ServiceId,
        metadata: Metadata,
        flags: OpenFlags,
        slot: OwnedSemaphorePermit,
    ) -> Result<(Stream<C>, u64), Error> {
        let _slot = slot;
        let mut attempt = 1;
        loop {
            let watch = match self.shared.connection.lanes_lost() {
                // A loss shortly before counts as one to come: the peer may still be
                // sending streams over the lost lane.
                Some(lost) if attempt < OPEN_ATTEMPTS => Some(match lost.last {
                    Some(last) if last.elapsed() < RECENT_LANE_LOSS => lost.count.saturating_sub(1),
                    _ => lost.count,
                }),
                _ => None,
            };
            // Unwatched, an open gives up only with an error: `None` cannot come.
            let no_stream = || Error::Timeout(TimeoutKind::StreamBind);
            let Some(lost) = watch else {
                let opened = self.open_once(service, metadata, flags, None).await?;
                return opened.ok_or_else(no_stream);
            };
            match self
                .open_once(service.clone(), metadata.clone(), flags, Some(lost))
                .await
            {
                Ok(None) => {
                    debug!(attempt, %service, "open again: its stream may have gone with a lost lane");
                    attempt += 1;
                }
                done => return done?.ok_or_else(no_stream),
            }
        }
    }

    /// One open exchange. With `lanes_lost` (the transport's count when it began), it
    /// gives up with `Ok(None)` when its data stream has not come [`LANE_LOSS_GRACE`]
    /// after a further lane is lost; without, it never does.
    async fn open_once(
        &self,
        service: ServiceId,
        metadata: Metadata,
        flags: OpenFlags,
        lanes_lost: Option<u64>,
    ) -> Result<Option<(Stream<C>, u64)>, Error> {
        self.ensure_ready()?;
        let (reply, answer) = oneshot::channel();
        let (request_id, actions) = self.step(|locked, out| {
            let request_id = locked.machine.open(service, metadata, flags, out)?;
            locked.waiters.opens.insert(request_id, reply);
            Ok::<_, Error>(request_id)
        });
        let request_id = request_id?;
        let mut cleanup = OpenCleanup {
            core: self,
            request_id,
            done: false,
        };
        self.perform(actions, None).await?;

        let answer = match timeout(self.config().open_timeout, answer).await {
            Err(_) => return Err(Error::Timeout(TimeoutKind::OpenRequest)),
            Ok(Err(_)) => return Err(self.terminal_error()),
            Ok(Ok(answer)) => answer?,
        };
        let stream = match answer {
            OpenReply::Rejected { code, reason } => {
                cleanup.done = true;
                debug!(request_id, %code, ?reason, "open rejected");
                return Err(Error::StreamRejected { code, reason });
            }
            OpenReply::Bound {
                logical_stream_id,
                stream,
            } => (stream, logical_stream_id),
            OpenReply::Accepted {
                logical_stream_id,
                stream,
            } => match self.bound(stream, lanes_lost).await? {
                Some(stream) => (stream, logical_stream_id),
                None => return Ok(None),
            },
        };
        cleanup.done = true;
        Ok(Some(stream))
    }

    /// Waits for the data stream of an accepted open; `None` if a lane was lost and the
    /// stream did not come within the grace (see [`open_once`](Self::open_once)).
    async fn bound(
        &self,
        stream: oneshot::Receiver<Result<Stream<C>, Error>>,
        lanes_lost: Option<u64>,
    ) -> Result<Option<Stream<C>>, Error> {
        let deadline = tokio::time::Instant::now() + self.config().stream_bind_timeout;
        let mut stream = std::pin::pin!(stream);
        if let Some(seen) = lanes_lost {
            tokio::select! {
                biased;
                arrived = timeout_at(deadline, &mut stream) => return self.arrival(arrived).map(Some),
                () = self.shared.connection.lane_lost_since(seen) => {}
            }
            let grace = deadline.min(tokio::time::Instant::now() + LANE_LOSS_GRACE);
            return match timeout_at(grace, &mut stream).await {
                Err(_) if grace < deadline => Ok(None),
                arrived => self.arrival(arrived).map(Some),
            };
        }
        self.arrival(timeout_at(deadline, stream).await).map(Some)
    }

    /// What a wait for a data stream came to.
    fn arrival(
        &self,
        arrived: Result<Result<Result<Stream<C>, Error>, oneshot::error::RecvError>, Elapsed>,
    ) -> Result<Stream<C>, Error> {
        match arrived {
            Err(_) => Err(Error::Timeout(TimeoutKind::StreamBind)),
            Ok(Err(_)) => Err(self.terminal_error()),
            Ok(Ok(stream)) => stream,
        }
    }

    /// Routes a data stream whose `StreamBind` names `logical_stream_id`; returns when it
    /// expires if it was held for an open still to be answered.
    pub(crate) fn on_bound_stream(
        &self,
        logical_stream_id: u64,
        stream: Stream<C>,
    ) -> Option<Instant> {
        let now = Instant::now();
        let (expires, actions) = self.step(|locked, out| {
            locked
                .machine
                .handle_stream(logical_stream_id, stream, now, out)
        });
        self.perform_all_now(actions);
        expires
    }

    /// Counts and resets a data stream whose header was unusable.
    pub(crate) fn refuse_unbound_stream(&self, stream: Stream<C>, why: &Error) {
        warn!(error = %why, "refusing data stream without a valid StreamBind");
        let ((), actions) =
            self.step(|locked, out| locked.machine.refuse_unbound_stream(stream, out));
        self.perform_all_now(actions);
    }

    /// Resets held streams nobody claimed within the bind timeout; returns when the next
    /// held stream expires.
    pub(crate) fn expire_early_streams(&self) -> Option<Instant> {
        let now = Instant::now();
        let (next, actions) = self.step(|locked, out| {
            locked.machine.handle_timeout(now, out);
            locked.machine.next_timeout()
        });
        self.perform_all_now(actions);
        next
    }

    // ----- control stream ----------------------------------------------------------------

    /// Handles one message the peer sent, delivering events to `events` (`None` once its
    /// receiver is gone).
    ///
    /// # Errors
    /// The reason the session ended when the message broke the protocol.
    pub(crate) async fn dispatch(
        &self,
        message: ProtocolMessage,
        events: Option<&mpsc::Sender<ClientEvent>>,
    ) -> Result<(), Terminal> {
        let (handled, actions) =
            self.step(|locked, out| locked.machine.handle_message(message, out));
        let _ = self.perform(actions, events).await;
        handled
    }

    // ----- acceptor side -----------------------------------------------------------------

    /// Records the acceptance of `request_id` as `logical_stream_id` (which then holds a
    /// `max_concurrent_streams` slot until released) and returns what the request asked
    /// for, with the `OpenResponse` still to [`perform`](Self::perform). Synchronous, so a
    /// caller can take ownership of the slot before anything awaits.
    pub(crate) fn admit_accept(
        &self,
        request_id: u64,
        logical_stream_id: u64,
    ) -> Result<(RequestedStream, Actions<Stream<C>>), Error> {
        let (requested, actions) = self.step(|locked, out| {
            locked
                .machine
                .accept_open(request_id, logical_stream_id, out)
        });
        Ok((requested?, actions))
    }

    pub(crate) async fn accept_open(
        &self,
        request_id: u64,
        logical_stream_id: u64,
    ) -> Result<(), Error> {
        let (_, response) = self.admit_accept(request_id, logical_stream_id)?;
        self.perform(response, None).await
    }

    pub(crate) async fn reject_open(
        &self,
        request_id: u64,
        code: RejectCode,
        reason: Option<String>,
    ) -> Result<(), Error> {
        let (rejected, actions) =
            self.step(|locked, out| locked.machine.reject_open(request_id, code, reason, out));
        rejected?;
        self.perform(actions, None).await
    }

    /// Frees an accepted stream's slot without telling the peer.
    pub(crate) fn release_stream(&self, logical_stream_id: u64) {
        lock(&self.locked).machine.release_stream(logical_stream_id);
    }

    pub(crate) async fn close_stream(
        &self,
        logical_stream_id: u64,
        code: CloseCode,
        reason: Option<String>,
    ) -> Result<(), Error> {
        let ((), actions) = self.step(|locked, out| {
            locked
                .machine
                .close_stream(logical_stream_id, code, reason, out);
        });
        self.perform(actions, None).await
    }

    /// As [`close_stream`](Self::close_stream), from a place that cannot wait (a drop):
    /// the `StreamClose` is queued for the control stream without waiting for room, and
    /// dropped if there is none.
    pub(crate) fn close_stream_now(
        &self,
        logical_stream_id: u64,
        code: CloseCode,
        reason: Option<String>,
    ) {
        let ((), actions) = self.step(|locked, out| {
            locked
                .machine
                .close_stream(logical_stream_id, code, reason, out);
        });
        self.perform_all_now(actions);
    }

    // ----- keep-alive and close ----------------------------------------------------------

    pub(crate) async fn ping(&self) -> Result<Duration, Error> {
        self.ensure_ready()?;
        let (reply, pong) = oneshot::channel();
        let (sequence, actions) = self.step(|locked, out| {
            let sequence = locked.machine.ping(out)?;
            locked.waiters.pings.insert(sequence, reply);
            Ok::<_, Error>(sequence)
        });
        let sequence = sequence?;
        let _cleanup = PingCleanup {
            core: self,
            sequence,
        };
        let sent_at = Instant::now();
        self.perform(actions, None).await?;
        match timeout(self.config().ping_timeout, pong).await {
            Err(_) => Err(Error::Timeout(TimeoutKind::Ping)),
            Ok(Err(_)) => Err(self.terminal_error()),
            Ok(Ok(result)) => result.map(|()| sent_at.elapsed()),
        }
    }

    /// Sends `StreamClose(0)`, finishes the control stream and ends the session.
    pub(crate) async fn close(&self, code: CloseCode, reason: Option<String>) -> Result<(), Error> {
        let (closing, actions) = self.step(|locked, out| locked.machine.close(code, reason, out));
        if !closing {
            return Ok(());
        }
        let sent = self.perform(actions, None).await;
        let (done, flushed) = oneshot::channel();
        if sent.is_ok() && self.writer.finish(done).await.is_ok() {
            let _ = flushed.await;
        }
        self.terminate(Terminal::Closed);
        sent
    }
}

/// Abandons an open that ends early (error, timeout, or its future is dropped), so nothing
/// waits for an open nobody awaits.
struct OpenCleanup<'a, C: Connection> {
    core: &'a SessionCore<C>,
    request_id: u64,
    done: bool,
}

impl<C: Connection> Drop for OpenCleanup<'_, C> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut locked = lock(&self.core.locked);
        locked.machine.abandon_open(self.request_id);
        locked.waiters.forget_open(self.request_id);
    }
}

struct PingCleanup<'a, C: Connection> {
    core: &'a SessionCore<C>,
    sequence: u64,
}

impl<C: Connection> Drop for PingCleanup<'_, C> {
    fn drop(&mut self) {
        let mut locked = lock(&self.core.locked);
        locked.machine.abandon_ping(self.sequence);
        locked.waiters.pings.remove(&self.sequence);
    }
}

/// Resets both halves of a data stream this side will not use.
/// The message a step asked to send, if any (a rejection, say).
fn first_message<S>(actions: Actions<S>) -> Option<ProtocolMessage> {
    actions.into_iter().find_map(|action| match action {
        Action::Send(message) => Some(message),
        _ => None,
    })
}

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
