//! The driver's side of waiting: the oneshot senders of the futures that wait on the
//! machine, by the ids the machine names them with.
//!
//! The machine decides *when* a waiter completes and with what; this table only finds the
//! channel. Completions run under the session lock, in the same critical section as the
//! machine step that produced them, so an open answered `Accepted` has its stream channel
//! in place before any other task can route the data stream to it. State changes are made
//! there too, so a waiter failed by the session's end already sees the final state.

use std::collections::HashMap;

use tokio::sync::oneshot;

use super::core::Stream;
use super::machine::{Action, Actions, OpenAnswer, SessionMachine};
use super::{SessionShared, State};
use crate::error::Error;
use crate::protocol::RejectCode;
use crate::transport::Connection;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// The answer an open future receives: the machine's [`OpenAnswer`], with a channel for
/// the data stream still to come.
pub(crate) enum OpenReply<C: Connection> {
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

/// Senders of the futures waiting on the machine.
pub(crate) struct Waiters<C: Connection> {
    /// Opens waiting for their `OpenResponse`, by request id.
    pub(crate) opens: HashMap<u64, Reply<OpenReply<C>>>,
    /// Accepted opens waiting for their data stream, by request id.
    pub(crate) binds: HashMap<u64, Reply<Stream<C>>>,
    /// Pings waiting for their pong, by sequence.
    pub(crate) pings: HashMap<u64, Reply<()>>,
}

impl<C: Connection> Default for Waiters<C> {
    fn default() -> Self {
        Self {
            opens: HashMap::new(),
            binds: HashMap::new(),
            pings: HashMap::new(),
        }
    }
}

impl<C: Connection> Waiters<C> {
    /// Forgets open `request_id` (its future gave up).
    pub(crate) fn forget_open(&mut self, request_id: u64) {
        self.opens.remove(&request_id);
        self.binds.remove(&request_id);
    }

    /// Performs the waiter completions and state changes among `actions` and returns the
    /// others, in order. A stream its open can no longer take goes back to `machine` to be
    /// refused.
    pub(crate) fn complete(
        &mut self,
        machine: &mut SessionMachine<Stream<C>>,
        shared: &SessionShared<C>,
        actions: Actions<Stream<C>>,
    ) -> Actions<Stream<C>> {
        let mut rest = Actions::new();
        for action in actions {
            match action {
                Action::Closing => shared.set_state(State::Closing),
                Action::Ended(terminal) => shared.set_state(terminal.state()),
                Action::AnswerOpen { request_id, answer } => {
                    self.answer_open(machine, request_id, answer, &mut rest);
                }
                Action::BindOpen { request_id, stream } => {
                    let Some(reply) = self.binds.remove(&request_id) else {
                        continue;
                    };
                    if let Err(Ok(stream)) = reply.send(stream) {
                        machine.stream_undeliverable(stream, None, &mut rest);
                    }
                }
                Action::AnswerPing { sequence, result } => {
                    if let Some(reply) = self.pings.remove(&sequence) {
                        let _ = reply.send(result);
                    }
                }
                other => rest.push(other),
            }
        }
        rest
    }

    fn answer_open(
        &mut self,
        machine: &mut SessionMachine<Stream<C>>,
        request_id: u64,
        answer: Result<OpenAnswer<Stream<C>>, Error>,
        rest: &mut Actions<Stream<C>>,
    ) {
        let Some(reply) = self.opens.remove(&request_id) else {
            return;
        };
        let reply_answer = answer.map(|answer| match answer {
            OpenAnswer::Bound {
                logical_stream_id,
                stream,
            } => OpenReply::Bound {
                logical_stream_id,
                stream,
            },
            OpenAnswer::Accepted { logical_stream_id } => {
                let (waiter, stream) = oneshot::channel();
                self.binds.insert(request_id, waiter);
                OpenReply::Accepted {
                    logical_stream_id,
                    stream,
                }
            }
            OpenAnswer::Rejected { code, reason } => OpenReply::Rejected { code, reason },
        });
        if let Err(Ok(OpenReply::Bound {
            logical_stream_id,
            stream,
        })) = reply.send(reply_answer)
        {
            machine.stream_undeliverable(stream, Some(logical_stream_id), rest);
        }
    }
}
