//! The tasks that drive a session: control reader, control writer, data-stream acceptor
//! and keep-alive. Each task ends by itself once the session reaches a final state, and
//! all of them are aborted when the last [`SessionClient`](crate::SessionClient) is dropped.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{interval_at, timeout, Instant, MissedTickBehavior};
use tracing::{debug, trace, warn};

use super::control::ControlReader;
use super::core::{
    SessionCore, Stream, Terminal, WriterCommand, KEEPALIVE_TIMEOUT_CODE, PROTOCOL_ERROR_CODE,
};
use super::{ClientEvent, ControlEvent, SessionShared};
use crate::protocol::{Features, Pong, ProtocolMessage, StreamBind};
use crate::transport::{Connection, SendStream};
use crate::{Error, TimeoutKind};

/// Frames queued together are written with one call, up to this many bytes.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

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
    writer_commands: mpsc::Receiver<WriterCommand>,
    events: mpsc::Sender<ClientEvent>,
) -> DriverTasks {
    let mut tasks = vec![
        tokio::spawn(read_control(Arc::clone(core), control_reader, events)).abort_handle(),
        tokio::spawn(write_control(
            Arc::downgrade(core),
            Arc::clone(&core.shared),
            control_send,
            writer_commands,
        ))
        .abort_handle(),
        tokio::spawn(accept_data_streams(Arc::clone(core))).abort_handle(),
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

/// Resolves once the session reached a final state.
async fn session_ended<C: Connection>(shared: &SessionShared<C>) {
    let mut state = shared.state.subscribe();
    let _ = state.wait_for(|state| state.is_final()).await;
}

async fn read_control<C: Connection>(
    core: Arc<SessionCore<C>>,
    mut reader: ControlReader<C::RecvStream>,
    events: mpsc::Sender<ClientEvent>,
) {
    loop {
        let message = tokio::select! {
            message = reader.read_message() => message,
            () = session_ended(&core.shared) => return,
        };
        let outcome = match message {
            Ok(Some(message)) => dispatch(&core, message, &events).await,
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

async fn dispatch<C: Connection>(
    core: &SessionCore<C>,
    message: ProtocolMessage,
    events: &mpsc::Sender<ClientEvent>,
) -> Result<(), Terminal> {
    trace!(kind = message.kind(), "control message");
    let observe = |event: ControlEvent| {
        if core.control_events.receiver_count() > 0 {
            let _ = core.control_events.send(event);
        }
    };
    match message {
        ProtocolMessage::Hello(_) | ProtocolMessage::HelloAck(_) => {
            return Err(Terminal::Violation("handshake message after negotiation"));
        }
        ProtocolMessage::OpenRequest(request) => {
            observe(ControlEvent::OpenRequest {
                request_id: request.request_id,
                service: request.service.clone(),
                metadata: request.metadata.clone(),
            });
            if let Some(rejection) = core.on_open_request(request, events) {
                let _ = core.send(&ProtocolMessage::OpenResponse(rejection)).await;
            }
        }
        ProtocolMessage::OpenResponse(response) => {
            observe(ControlEvent::OpenResponseReceived {
                request_id: response.request_id,
                accepted: matches!(response.status, crate::protocol::OpenStatus::Accepted),
            });
            core.on_open_response(response);
        }
        ProtocolMessage::StreamClose(close) if close.logical_stream_id == 0 => {
            debug!(code = %close.code, reason = ?close.reason, "peer closed the session");
            observe(ControlEvent::CloseReceived {
                code: close.code,
                reason: close.reason.clone(),
            });
            core.on_session_close();
            let _ = events.try_send(ClientEvent::Closing {
                code: close.code,
                reason: close.reason,
            });
        }
        ProtocolMessage::StreamClose(close) => {
            observe(ControlEvent::StreamClose {
                logical_stream_id: close.logical_stream_id,
                code: close.code,
            });
            core.on_stream_close(close.logical_stream_id);
            let _ = events.try_send(ClientEvent::StreamClosed {
                logical_stream_id: close.logical_stream_id,
                code: close.code,
            });
        }
        ProtocolMessage::Ping(ping) => {
            observe(ControlEvent::Ping {
                sequence: ping.sequence,
            });
            let pong = Pong {
                sequence: ping.sequence,
            };
            let _ = core.send(&ProtocolMessage::Pong(pong)).await;
            let _ = events.try_send(ClientEvent::PingReceived {
                sequence: ping.sequence,
            });
        }
        ProtocolMessage::Pong(pong) => {
            observe(ControlEvent::Pong {
                sequence: pong.sequence,
            });
            core.on_pong(pong);
        }
    }
    Ok(())
}

async fn write_control<C: Connection>(
    core: Weak<SessionCore<C>>,
    shared: Arc<SessionShared<C>>,
    mut send: C::SendStream,
    mut commands: mpsc::Receiver<WriterCommand>,
) {
    let mut batch = BytesMut::with_capacity(WRITE_BATCH_BYTES);
    loop {
        let first = tokio::select! {
            command = commands.recv() => command,
            () = session_ended(&shared) => None,
        };
        let Some(mut command) = first else { return };
        loop {
            match command {
                WriterCommand::Frame(bytes) => batch.extend_from_slice(&bytes),
                WriterCommand::Finish(done) => {
                    let written = send.write_all(&batch).await;
                    if written.is_ok() {
                        let _ = send.finish().await;
                    }
                    let _ = done.send(());
                    return;
                }
            }
            if batch.len() >= WRITE_BATCH_BYTES {
                break;
            }
            match commands.try_recv() {
                Ok(next) => command = next,
                Err(_) => break,
            }
        }
        if send.write_all(&batch).await.is_err() {
            if let Some(core) = core.upgrade() {
                core.terminate(Terminal::Disconnected);
            }
            return;
        }
        batch.clear();
    }
}

async fn accept_data_streams<C: Connection>(core: Arc<SessionCore<C>>) {
    let bind_timeout = core.config().stream_bind_timeout;
    // Only streams answering our own opens are legitimate, so a few more header reads
    // than in-flight opens is plenty; past that a flood of streams is refused at once.
    let max_header_reads = core.config().max_inflight_opens.saturating_mul(2).max(16);
    let mut header_reads = JoinSet::new();
    let sweep_every = (bind_timeout / 4).max(Duration::from_millis(50));
    let mut sweep = interval_at(Instant::now() + sweep_every, sweep_every);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            accepted = core.shared.connection.accept_bi() => match accepted {
                Ok(Some(stream)) if header_reads.len() < max_header_reads => {
                    header_reads.spawn(read_stream_bind::<C>(stream, bind_timeout));
                }
                Ok(Some(stream)) => core.refuse_unbound_stream(
                    stream,
                    &Error::CapacityExceeded { what: "unbound data streams", limit: max_header_reads },
                ),
                Ok(None) | Err(_) => {
                    core.terminate(Terminal::Disconnected);
                    return;
                }
            },
            Some(joined) = header_reads.join_next(), if !header_reads.is_empty() => match joined {
                Ok(Ok((logical_stream_id, stream))) => core.on_bound_stream(logical_stream_id, stream),
                Ok(Err((stream, error))) => core.refuse_unbound_stream(stream, &error),
                Err(_) => {}
            },
            _ = sweep.tick() => core.expire_early_streams(),
            () = session_ended(&core.shared) => return,
        }
    }
}

type HeaderRead<C> = Result<(u64, Stream<C>), (Stream<C>, Error)>;

async fn read_stream_bind<C: Connection>(
    (send, mut recv): Stream<C>,
    limit: Duration,
) -> HeaderRead<C> {
    let mut header = [0u8; StreamBind::ENCODED_SIZE];
    let error = match timeout(limit, recv.read_exact(&mut header)).await {
        Err(_) => Error::Timeout(TimeoutKind::StreamBind),
        Ok(Err(error)) => Error::transport(error),
        Ok(Ok(_)) => match StreamBind::parse(&header) {
            Ok(bind) => return Ok((bind.logical_stream_id, (send, recv))),
            Err(error) => error.into(),
        },
    };
    Err(((send, recv), error))
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
