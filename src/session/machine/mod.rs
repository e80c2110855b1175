//! The session as a pure state machine: every table, limit and protocol rule, without I/O.
//!
//! quinn-proto keeps QUIC's logic apart from quinn's sockets and tasks; this does the same
//! for a quic-reverse session. [`SessionMachine`] takes events (a decoded control message,
//! a data stream whose `StreamBind` named an id, a call of the application, the time) and
//! pushes [`Action`]s (send this message, complete waiter N, refuse this stream, tell the
//! application, the session ended). It owns no channel, lock, timer or task, and reads no
//! clock: the driver passes `now` in. Waiters are named by plain ids (an open by its
//! request id, a ping by its sequence), and data streams are an opaque `S` the machine
//! only holds and hands back, so its rules are unit-tested by feeding events and reading
//! actions, without a runtime.
//!
//! The invariants it keeps:
//! - an open or ping is registered only while the session is live and not closing;
//! - ending the session pushes [`Action::Ended`] once, then fails every waiter exactly
//!   once and refuses every held stream, leaving every table empty;
//! - a data stream is handed to the open that announced its id, held (bounded in number
//!   and time) if it overtook that announcement, and refused if its id was bound or
//!   abandoned before;
//! - the peer's requests plus the streams accepted for it never exceed
//!   `max_concurrent_streams`, and each slot is freed once.

mod accepts;
mod actions;
mod opens;
mod pings;
#[cfg(test)]
mod proptests;
mod retired;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tracing::{debug, trace};

use crate::config::Config;
use crate::error::{Error, TimeoutKind};
use crate::protocol::{CloseCode, ProtocolError, ProtocolMessage, StreamClose};
use crate::session::events::{ClientEvent, ControlEvent};
use crate::session::State;

pub(crate) use accepts::{RequestedStream, Undeliverable};
pub(crate) use actions::{Action, Actions, Batch, OpenAnswer, Refusal};
use opens::{EarlyStream, OpenPhase};
use retired::RetiredIds;

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
    /// The error every operation gets once the session ended for this reason.
    pub(crate) fn error(&self) -> Error {
        match self {
            Self::Closed => Error::SessionClosed,
            Self::Disconnected => Error::Disconnected,
            Self::Protocol(error) => Error::Protocol(error.clone()),
            Self::Violation(what) => Error::ProtocolViolation(what),
            Self::KeepaliveTimeout => Error::Timeout(TimeoutKind::Ping),
        }
    }

    /// The final state this reason leads to.
    pub(crate) const fn state(&self) -> State {
        match self {
            Self::Disconnected | Self::KeepaliveTimeout => State::Disconnected,
            Self::Closed | Self::Protocol(_) | Self::Violation(_) => State::Closed,
        }
    }
}

/// The limits of [`Config`] the machine enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Data streams held for an `OpenResponse` at once (`max_inflight_opens`).
    pub(crate) max_early_streams: usize,
    /// How long such a stream is held (`stream_bind_timeout`).
    pub(crate) bind_timeout: Duration,
    /// The peer's requests plus the streams accepted for it (`max_concurrent_streams`).
    pub(crate) max_concurrent_streams: usize,
}

impl Limits {
    /// The limits `config` sets.
    pub(crate) const fn from_config(config: &Config) -> Self {
        Self {
            max_early_streams: config.max_inflight_opens,
            bind_timeout: config.stream_bind_timeout,
            max_concurrent_streams: config.max_concurrent_streams,
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

/// A session's bookkeeping. `S` is the driver's data stream.
pub(crate) struct SessionMachine<S> {
    limits: Limits,
    terminal: Option<Terminal>,
    closing: bool,
    next_request_id: u64,
    next_logical_stream_id: u64,
    next_ping_sequence: u64,
    /// Our opens, by request id: waiting for their `OpenResponse`, then for their stream.
    opens: HashMap<u64, OpenPhase>,
    /// Our accepted opens waiting for their data stream: logical stream id to request id.
    bind_waiters: HashMap<u64, u64>,
    /// Data streams that overtook their `OpenResponse`, by logical stream id.
    early_streams: HashMap<u64, EarlyStream<S>>,
    retired_ids: RetiredIds,
    /// Our pings waiting for their pong, by sequence.
    pending_pings: HashSet<u64>,
    /// The peer's open requests delivered to the application and not yet answered, with
    /// what they asked for (so an accept can say which service its stream reaches).
    unanswered_requests: HashMap<u64, RequestedStream>,
    /// Logical streams we accepted for the peer and that are not released yet.
    active_streams: HashSet<u64>,
    refused_streams: u64,
    refused_requests: u64,
}

impl<S> SessionMachine<S> {
    /// A live session enforcing `limits`.
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            terminal: None,
            closing: false,
            next_request_id: 1,
            next_logical_stream_id: 1,
            next_ping_sequence: 1,
            opens: HashMap::new(),
            bind_waiters: HashMap::new(),
            early_streams: HashMap::new(),
            retired_ids: RetiredIds::default(),
            pending_pings: HashSet::new(),
            unanswered_requests: HashMap::new(),
            active_streams: HashSet::new(),
            refused_streams: 0,
            refused_requests: 0,
        }
    }

    /// Why the session ended, if it did.
    #[cfg(test)]
    pub(crate) const fn terminal(&self) -> Option<&Terminal> {
        self.terminal.as_ref()
    }

    /// The error every operation gets once the session ended (or is closing).
    pub(crate) fn terminal_error(&self) -> Error {
        self.terminal
            .as_ref()
            .map_or(Error::SessionClosed, Terminal::error)
    }

    /// `Ok` while new opens and pings may start.
    fn ensure_open(&self) -> Result<(), Error> {
        match &self.terminal {
            Some(terminal) => Err(terminal.error()),
            None if self.closing => Err(Error::SessionClosed),
            None => Ok(()),
        }
    }

    /// The session's counters.
    pub(crate) fn stats(&self) -> SessionStats {
        SessionStats {
            pending_opens: self.opens.len(),
            active_streams: self.streams_in_use(),
            early_streams: self.early_streams.len(),
            refused_streams: self.refused_streams,
            refused_requests: self.refused_requests,
        }
    }

    /// Open exchanges under way either way: our opens not yet answered or bound, and the
    /// peer's requests we have not answered.
    pub(crate) fn exchanges_under_way(&self) -> usize {
        self.opens.len() + self.unanswered_requests.len()
    }

    /// The `max_concurrent_streams` slots taken.
    fn streams_in_use(&self) -> usize {
        self.unanswered_requests.len() + self.active_streams.len()
    }

    /// Handles one message the peer sent on the control stream after the handshake.
    ///
    /// # Errors
    /// When the message breaks the protocol, the session is terminated for it and the
    /// reason returned, so the driver can close the connection.
    pub(crate) fn handle_message(
        &mut self,
        message: ProtocolMessage,
        out: &mut Actions<S>,
    ) -> Result<(), Terminal> {
        trace!(kind = message.kind(), "control message");
        match message {
            ProtocolMessage::Hello(_) | ProtocolMessage::HelloAck(_) => {
                let violation = Terminal::Violation("handshake message after negotiation");
                self.terminate(violation.clone(), out);
                return Err(violation);
            }
            ProtocolMessage::OpenRequest(request) => self.on_open_request(request, out),
            ProtocolMessage::OpenResponse(response) => self.on_open_response(response, out),
            ProtocolMessage::StreamClose(close) if close.logical_stream_id == 0 => {
                debug!(code = %close.code, reason = ?close.reason, "peer closed the session");
                out.push(Action::Observe(ControlEvent::CloseReceived {
                    code: close.code,
                    reason: close.reason.clone(),
                }));
                self.begin_closing(out);
                self.terminate(Terminal::Closed, out);
                out.push(Action::Deliver(ClientEvent::Closing {
                    code: close.code,
                    reason: close.reason,
                }));
            }
            ProtocolMessage::StreamClose(close) => {
                out.push(Action::Observe(ControlEvent::StreamClose {
                    logical_stream_id: close.logical_stream_id,
                    code: close.code,
                }));
                if close.code == CloseCode::Reset {
                    self.fail_unbound_open(close.logical_stream_id, close.reason.clone(), out);
                }
                self.release_stream(close.logical_stream_id);
                out.push(Action::Deliver(ClientEvent::StreamClosed {
                    logical_stream_id: close.logical_stream_id,
                    code: close.code,
                }));
            }
            ProtocolMessage::Ping(ping) => self.on_ping(ping, out),
            ProtocolMessage::Pong(pong) => self.on_pong(pong, out),
        }
        Ok(())
    }

    /// Starts a graceful close: no new opens, and `StreamClose(0)` to send. The driver
    /// then finishes the control stream and calls [`terminate`](Self::terminate) with
    /// [`Terminal::Closed`]. Returns false, pushing nothing, if the session already ended.
    pub(crate) fn close(
        &mut self,
        code: CloseCode,
        reason: Option<String>,
        out: &mut Actions<S>,
    ) -> bool {
        if self.terminal.is_some() {
            return false;
        }
        self.begin_closing(out);
        out.push(Action::Send(ProtocolMessage::StreamClose(StreamClose {
            logical_stream_id: 0,
            code,
            reason,
        })));
        true
    }

    fn begin_closing(&mut self, out: &mut Actions<S>) {
        if !self.closing && self.terminal.is_none() {
            self.closing = true;
            out.push(Action::Closing);
        }
    }

    /// Ends the session for `reason` (the first reason wins; later calls push nothing):
    /// [`Action::Ended`], then every waiter failed with the matching error and every held
    /// stream refused. Every table is empty afterwards.
    pub(crate) fn terminate(&mut self, reason: Terminal, out: &mut Actions<S>) {
        if self.terminal.is_some() {
            return;
        }
        debug!(?reason, "session ended");
        self.terminal = Some(reason.clone());
        out.push(Action::Ended(reason.clone()));
        for (request_id, phase) in self.opens.drain() {
            out.push(match phase {
                OpenPhase::AwaitingResponse => Action::AnswerOpen {
                    request_id,
                    answer: Err(reason.error()),
                },
                OpenPhase::AwaitingStream { .. } => Action::BindOpen {
                    request_id,
                    stream: Err(reason.error()),
                },
            });
        }
        self.bind_waiters.clear();
        for sequence in self.pending_pings.drain() {
            out.push(Action::AnswerPing {
                sequence,
                result: Err(reason.error()),
            });
        }
        for (id, early) in self.early_streams.drain() {
            out.push(Action::Refuse {
                stream: early.stream,
                logical_stream_id: Some(id),
                why: Refusal::SessionEnded,
            });
        }
        self.unanswered_requests.clear();
        self.active_streams.clear();
    }
}
