//! The tasks that drive a session: control reader, control writer, data-stream acceptor
//! and keep-alive. Each task ends by itself once the session reaches a final state, and
//! all of them are aborted when the last [`SessionClient`](super::SessionClient) is dropped.
//!
//! The reader and the acceptor share one task. The datagram that answers an open usually
//! carries both the `OpenResponse` and the data stream with its `StreamBind`, so it wakes
//! both of them at once; in two tasks, the second wake-up sends the first task to the
//! other worker thread, which must be woken for it. In one task that hop is gone: the
//! open bench counts 4.0–4.5 thread sleeps per `Router`-served open instead of 5.0, and
//! 1.2 datagrams each way instead of 1.5.
//! What each event means is the machine's business: the tasks only move bytes and streams
//! between the connection and [`SessionCore`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{interval_at, sleep_until, timeout, Instant, MissedTickBehavior, Sleep};
use tracing::{debug, trace, warn};

use super::control::ControlReader;
use super::core::{SessionCore, Stream, KEEPALIVE_TIMEOUT_CODE, PROTOCOL_ERROR_CODE};
use super::events::ClientEvent;
use super::machine::Terminal;
use super::writer::{ControlWriter, Drive};
use super::State;
use crate::error::{Error, TimeoutKind};
use crate::protocol::{Features, StreamBind};
use crate::transport::{Connection, SendStream};

/// How long the acceptor, on seeing the connection end, waits for the control reader to
/// process what the peer sent last before declaring the session disconnected.
const LAST_MESSAGES_GRACE: Duration = Duration::from_millis(100);
/// How long a graceful close waits for the peer to acknowledge the control stream's end,
/// so a caller closing the connection right after does not discard the close message.
const FINISH_DELIVERY_TIMEOUT: Duration = Duration::from_secs(1);

/// Aborts the driver tasks when dropped.
pub(crate) struct DriverTasks(Vec<AbortHandle>);

impl Drop for DriverTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts the tasks of a negotiated session.
pub(crate) fn spawn<C: Connection>(
    core: &Arc<SessionCore<C>>,
    control_send: C::SendStream,
    control_reader: ControlReader<C::RecvStream>,
    events: mpsc::Sender<ClientEvent>,
) -> DriverTasks {
    let (reader_core, acceptor_core) = (Arc::clone(core), Arc::clone(core));
    let mut tasks = vec![
        // Both end once the session reaches a final state. They are made inside the task:
        // futures captured from outside would keep their place in it beside the running
        // ones (1.5 KiB more per idle session).
        tokio::spawn(async move {
            tokio::join!(
                read_control(reader_core, control_reader, events),
                accept_data_streams(acceptor_core)
            );
        })
        .abort_handle(),
        tokio::spawn(write_control(Arc::clone(core), control_send)).abort_handle(),
    ];
    let ping_pong = core
        .shared
        .negotiated
        .lock()
        .ok()
        .and_then(|params| {
            params
                .as_ref()
                .map(|p| p.features.contains(Features::PING_PONG))
        })
        .unwrap_or(false);
    match core.config().ping_interval {
        Some(every) if ping_pong => {
            tasks.push(tokio::spawn(keep_alive(Arc::clone(core), every)).abort_handle());
        }
        Some(_) => debug!("keep-alive off: the peer did not negotiate PING_PONG"),
        None => {}
    }
    DriverTasks(tasks)
}

/// Resolves once the session reached a final state. Each task keeps one receiver for its
/// whole life rather than subscribing again on every loop.
async fn session_ended(state: &mut watch::Receiver<State>) {
    let _ = state.wait_for(State::is_final).await;
}

async fn read_control<C: Connection>(
    core: Arc<SessionCore<C>>,
    mut reader: ControlReader<C::RecvStream>,
    events: mpsc::Sender<ClientEvent>,
) {
    let mut state = core.shared.state.subscribe();
    // Dropped once its receiver is: the channel's buffer is freed with the last of its
    // two ends, and a side that takes no events (a relay, once its edge registered)
    // should not keep it for the session's life.
    let mut events = Some(events);
    loop {
        let message = tokio::select! {
            // Messages already received come first: a StreamClose(0) that arrived with the
            // connection's close must still be seen as a graceful close.
            biased;
            message = reader.read_message() => message,
            () = session_ended(&mut state) => return,
            () = receiver_gone(events.as_ref()) => {
                events = None;
                continue;
            }
        };
        let outcome = match message {
            // Boxed: handling a message holds far more state than waiting for one, and
            // an idle session waits for its whole life in a task sized for the larger.
            Ok(Some(message)) => Box::pin(core.dispatch(message, events.as_ref())).await,
            Ok(None) => {
                debug!("peer finished the control stream");
                Err(Terminal::Closed)
            }
            Err(Error::Protocol(error)) => Err(Terminal::Protocol(error)),
            Err(_) => Err(Terminal::Disconnected),
        };
        if let Err(reason) = outcome {
            if matches!(reason, Terminal::Protocol(_) | Terminal::Violation(_)) {
                warn!(?reason, "peer broke the protocol; closing the connection");
                core.terminate(reason);
                core.shared
                    .connection
                    .close(PROTOCOL_ERROR_CODE, b"quic-reverse protocol error");
            } else {
                core.terminate(reason);
            }
            return;
        }
    }
}

/// Resolves once the events receiver was dropped or closed; never when there is no sender.
async fn receiver_gone(events: Option<&mpsc::Sender<ClientEvent>>) {
    match events {
        Some(events) => events.closed().await,
        None => std::future::pending().await,
    }
}

async fn write_control<C: Connection>(core: Arc<SessionCore<C>>, send: C::SendStream) {
    let writer = &core.writer;
    // However the writer task ends (also aborted), senders fail from then on.
    let _closed = CloseOnDrop(writer);
    writer.attach(send);
    let mut state = core.shared.state.subscribe();
    let drive = tokio::select! {
        drive = std::future::poll_fn(|cx| writer.poll_drive(cx)) => drive,
        () = session_ended(&mut state) => return,
    };
    match drive {
        Drive::Finish(send, done) => {
            if let Some(mut send) = send {
                if send.finish().await.is_ok() {
                    let _ = timeout(FINISH_DELIVERY_TIMEOUT, send.delivered()).await;
                }
            }
            let _ = done.send(());
        }
        Drive::Broken => core.terminate(Terminal::Disconnected),
    }
}

/// Closes the control writer when dropped.
struct CloseOnDrop<'a, S: AsyncWrite + Unpin>(&'a ControlWriter<S>);

impl<S: AsyncWrite + Unpin> Drop for CloseOnDrop<'_, S> {
    fn drop(&mut self) {
        self.0.close();
    }
}

async fn accept_data_streams<C: Connection>(core: Arc<SessionCore<C>>) {
    let bind_timeout = core.config().stream_bind_timeout;
    // Only streams answering our own opens are legitimate, so a few more header reads
    // than in-flight opens is plenty; past that a flood of streams is refused at once.
    let max_header_reads = core.config().max_inflight_opens.saturating_mul(2).max(16);
    let mut header_reads = JoinSet::new();
    // Set only while streams are held (for an open whose answer they overtook), for the
    // first of them to expire: an idle session has no timer to wake it.
    let mut sweep = SweepTimer::default();
    let mut state = core.shared.state.subscribe();
    loop {
        tokio::select! {
            accepted = core.shared.connection.accept_bi() => match accepted {
                Ok(Some(stream)) => {
                    // The header nearly always arrives with the packet that opened the
                    // stream: take it now and skip a task and two wake-ups per open.
                    let mut header = PartialHeader::default();
                    let (send, mut recv) = stream;
                    match header.poll_now(&mut recv) {
                        Poll::Ready(result) => sweep.hold_until(route(&core, result, (send, recv))),
                        Poll::Pending if header_reads.len() < max_header_reads => {
                            let core = Arc::clone(&core);
                            header_reads.spawn(async move {
                                let read = timeout(bind_timeout, header.read(&mut recv)).await;
                                let result = read.unwrap_or(Err(Error::Timeout(TimeoutKind::StreamBind)));
                                route(&core, result, (send, recv))
                            });
                        }
                        Poll::Pending => core.refuse_unbound_stream(
                            (send, recv),
                            &Error::CapacityExceeded { what: "unbound data streams", limit: max_header_reads },
                        ),
                    }
                }
                Ok(None) | Err(_) => {
                    // The control reader may still hold the peer's last messages (a graceful
                    // close arriving with the connection's end): let it say why first.
                    let _ = timeout(LAST_MESSAGES_GRACE, session_ended(&mut state)).await;
                    core.terminate(Terminal::Disconnected);
                    return;
                }
            },
            Some(joined) = header_reads.join_next(), if !header_reads.is_empty() => {
                if let Ok(expires) = joined {
                    sweep.hold_until(expires);
                }
            }
            () = sweep.expired() => {
                sweep.reset(core.expire_early_streams());
            }
            () = session_ended(&mut state) => return,
        }
    }
}

/// The acceptor's timer for held streams: off, or set for the first to expire.
#[derive(Default)]
struct SweepTimer {
    deadline: Option<Pin<Box<Sleep>>>,
}

impl SweepTimer {
    /// Makes sure the timer fires by `expires`, when a stream was held.
    fn hold_until(&mut self, expires: Option<std::time::Instant>) {
        let Some(expires) = expires.map(Instant::from_std) else {
            return;
        };
        match &mut self.deadline {
            Some(sleep) if sleep.deadline() <= expires => {}
            Some(sleep) => sleep.as_mut().reset(expires),
            None => self.deadline = Some(Box::pin(sleep_until(expires))),
        }
    }

    /// Sets the timer for `next` (the machine's next expiry), or turns it off.
    fn reset(&mut self, next: Option<std::time::Instant>) {
        match (next.map(Instant::from_std), &mut self.deadline) {
            (Some(next), Some(sleep)) => sleep.as_mut().reset(next),
            (Some(next), None) => self.deadline = Some(Box::pin(sleep_until(next))),
            (None, _) => self.deadline = None,
        }
    }

    /// Resolves when the timer fires; never while it is off.
    async fn expired(&mut self) {
        match &mut self.deadline {
            Some(sleep) => sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }
}

/// Hands a data stream to its open, or refuses it if its header was unusable. Returns
/// when the stream expires if it was held.
fn route<C: Connection>(
    core: &SessionCore<C>,
    header: Result<StreamBind, Error>,
    stream: Stream<C>,
) -> Option<std::time::Instant> {
    match header {
        Ok(bind) => core.on_bound_stream(bind.logical_stream_id, stream),
        Err(error) => {
            core.refuse_unbound_stream(stream, &error);
            None
        }
    }
}

/// A `StreamBind` header being read, possibly across several packets.
#[derive(Default)]
struct PartialHeader {
    bytes: [u8; StreamBind::ENCODED_SIZE],
    filled: usize,
}

impl PartialHeader {
    /// Reads what is already buffered without waiting.
    fn poll_now<R: AsyncRead + Unpin>(&mut self, recv: &mut R) -> Poll<Result<StreamBind, Error>> {
        self.poll_read(recv, &mut Context::from_waker(Waker::noop()))
    }

    async fn read<R: AsyncRead + Unpin>(&mut self, recv: &mut R) -> Result<StreamBind, Error> {
        std::future::poll_fn(|cx| self.poll_read(recv, cx)).await
    }

    fn poll_read<R: AsyncRead + Unpin>(
        &mut self,
        recv: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamBind, Error>> {
        while self.filled < self.bytes.len() {
            let mut buf = ReadBuf::new(&mut self.bytes[self.filled..]);
            match Pin::new(&mut *recv).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(Error::transport(error))),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Poll::Ready(Err(Error::transport(eof)));
                }
                Poll::Ready(Ok(())) => self.filled += buf.filled().len(),
            }
        }
        Poll::Ready(StreamBind::parse(&self.bytes).map_err(Error::from))
    }
}

async fn keep_alive<C: Connection>(core: Arc<SessionCore<C>>, every: Duration) {
    let mut ticker = interval_at(Instant::now() + every, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match core.ping().await {
            Ok(rtt) => trace!(?rtt, "keep-alive pong"),
            Err(Error::Timeout(TimeoutKind::Ping)) => {
                warn!("peer missed a keep-alive pong; closing the connection");
                core.terminate(Terminal::KeepaliveTimeout);
                core.shared
                    .connection
                    .close(KEEPALIVE_TIMEOUT_CODE, b"keep-alive timeout");
                return;
            }
            Err(_) => return,
        }
    }
}
