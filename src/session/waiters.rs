//! The driver's side of waiting: the oneshot senders of the futures that wait on the
//! machine, by the ids the machine names them with.
//!
//! The machine decides *when* a waiter completes and with what; this table only finds the
//! channel. Senders are taken out (and an accepted open's stream channel put in) under the
//! session lock, in the same critical section as the machine step that asked, so the data
//! stream cannot be routed before its channel is in place; they are fired after the lock
//! is released, since waking a task can wake a thread. State changes are made under the
//! lock too, so a waiter failed by the session's end already sees the final state.

use std::collections::HashMap;

use tokio::sync::oneshot;

use super::core::Stream;
use super::machine::{Action, Actions, Batch, OpenAnswer};
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

/// A waiter's sender with what to send it, taken out under the lock.
pub(crate) enum Completion<C: Connection> {
    Open(Reply<OpenReply<C>>, Result<OpenReply<C>, Error>),
    Bind(Reply<Stream<C>>, Result<Stream<C>, Error>),
    Ping(Reply<()>, Result<(), Error>),
}

impl<C: Connection> Completion<C> {
    /// Wakes the waiter. Returns the data stream (and its id, when known) if the waiter
    /// gave up in the meantime and the stream must be refused.
    pub(crate) fn fire(self) -> Option<(Stream<C>, Option<u64>)> {
        match self {
            Self::Open(reply, answer) => match reply.send(answer) {
                Err(Ok(OpenReply::Bound {
                    logical_stream_id,
                    stream,
                })) => Some((stream, Some(logical_stream_id))),
                _ => None,
            },
            Self::Bind(reply, stream) => match reply.send(stream) {
                Err(Ok(stream)) => Some((stream, None)),
                _ => None,
            },
            Self::Ping(reply, result) => {
                let _ = reply.send(result);
                None
            }
        }
    }
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

    /// Makes the state changes among `actions` and takes out the senders of the waiters
    /// they complete; returns those completions, to fire once the lock is released, and
    /// the other actions, in order.
    pub(crate) fn complete(
        &mut self,
        shared: &SessionShared<C>,
        actions: Actions<Stream<C>>,
    ) -> (Batch<Completion<C>>, Actions<Stream<C>>) {
        let mut completions = Batch::new();
        let mut rest = Actions::new();
        for action in actions {
            match action {
                Action::Closing => shared.set_state(State::Closing),
                Action::Ended(terminal) => shared.set_state(terminal.state()),
                Action::AnswerOpen { request_id, answer } => {
                    if let Some(reply) = self.opens.remove(&request_id) {
                        let answer = self.open_reply(request_id, answer);
                        completions.push(Completion::Open(reply, answer));
                    }
                }
                Action::BindOpen { request_id, stream } => {
                    if let Some(reply) = self.binds.remove(&request_id) {
                        completions.push(Completion::Bind(reply, stream));
                    }
                }
                Action::AnswerPing { sequence, result } => {
                    if let Some(reply) = self.pings.remove(&sequence) {
                        completions.push(Completion::Ping(reply, result));
                    }
                }
                other => rest.push(other),
            }
        }
        (completions, rest)
    }

    /// What an open future receives for `answer`, with a channel in place for a stream
    /// still to come.
    fn open_reply(
        &mut self,
        request_id: u64,
        answer: Result<OpenAnswer<Stream<C>>, Error>,
    ) -> Result<OpenReply<C>, Error> {
        answer.map(|answer| match answer {
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
        })
    }
}
