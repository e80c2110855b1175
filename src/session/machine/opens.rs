//! The opener's side: our opens, their answers, and the data streams that bind them.
//!
//! An open waits twice: for its `OpenResponse` (by request id), then, if accepted, for the
//! data stream whose `StreamBind` carries the announced logical stream id. The two may
//! arrive in either order on different QUIC streams, so a data stream that overtakes its
//! announcement is held (bounded in number and time) until the announcement claims it.

use std::time::Instant;

use tracing::debug;

use super::{Action, Actions, OpenAnswer, Refusal, SessionMachine};
use crate::error::Error;
use crate::protocol::{
    Metadata, OpenFlags, OpenRequest, OpenResponse, OpenStatus, ProtocolMessage, ServiceId,
};
use crate::session::events::ControlEvent;

/// Where one of our opens is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpenPhase {
    /// Sent; no `OpenResponse` yet.
    AwaitingResponse,
    /// Accepted as `logical_stream_id`; its data stream has not arrived.
    AwaitingStream { logical_stream_id: u64 },
}

/// A data stream that arrived before the `OpenResponse` announcing its id was read.
pub(super) struct EarlyStream<S> {
    pub(super) stream: S,
    pub(super) arrived: Instant,
}

impl<S> SessionMachine<S> {
    /// Registers a new open of `service` and pushes its `OpenRequest`. The driver waits
    /// for [`Action::AnswerOpen`] with the returned request id, and for
    /// [`Action::BindOpen`] after an [`OpenAnswer::Accepted`].
    ///
    /// # Errors
    /// The session's end error once it ended, [`Error::SessionClosed`] while closing.
    pub(crate) fn open(
        &mut self,
        service: ServiceId,
        metadata: Metadata,
        flags: OpenFlags,
        out: &mut Actions<S>,
    ) -> Result<u64, Error> {
        self.ensure_open()?;
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.opens.insert(request_id, OpenPhase::AwaitingResponse);
        debug!(request_id, service = ?service.as_str(), "open requested");
        let request = OpenRequest::new(request_id, service)
            .with_metadata(metadata)
            .with_flags(flags);
        out.push(Action::Send(ProtocolMessage::OpenRequest(request)));
        Ok(request_id)
    }

    /// Forgets open `request_id`, which gave up (timed out, failed to send, or its caller
    /// went away): no action for it follows, and a data stream for the id it was
    /// announced (if any) will be refused.
    pub(crate) fn abandon_open(&mut self, request_id: u64) {
        if let Some(OpenPhase::AwaitingStream { logical_stream_id }) =
            self.opens.remove(&request_id)
        {
            self.bind_waiters.remove(&logical_stream_id);
            self.retired_ids.insert(logical_stream_id);
        }
    }

    /// Hands the peer's answer to the open waiting for it.
    pub(super) fn on_open_response(&mut self, response: OpenResponse, out: &mut Actions<S>) {
        out.push(Action::Observe(ControlEvent::OpenResponseReceived {
            request_id: response.request_id,
            accepted: matches!(response.status, OpenStatus::Accepted),
        }));
        let request_id = response.request_id;
        if self.opens.get(&request_id) != Some(&OpenPhase::AwaitingResponse) {
            debug!(request_id, "answer to an abandoned open");
            if let Some(id) = response.logical_stream_id {
                // Its data stream will come; refuse it at once instead of holding it.
                self.retired_ids.insert(id);
                if let Some(early) = self.early_streams.remove(&id) {
                    self.refuse(early.stream, Some(id), Refusal::Abandoned, out);
                }
            }
            return;
        }
        let answer = match (response.status, response.logical_stream_id) {
            (OpenStatus::Rejected(code), _) => Ok(OpenAnswer::Rejected {
                code,
                reason: response.reason,
            }),
            (OpenStatus::Accepted, None | Some(0)) => Err(Error::ProtocolViolation(
                "accepted OpenResponse without a logical stream id",
            )),
            (OpenStatus::Accepted, Some(id))
                if self.bind_waiters.contains_key(&id) || self.retired_ids.contains(id) =>
            {
                Err(Error::ProtocolViolation(
                    "accepted OpenResponse reuses a logical stream id",
                ))
            }
            (OpenStatus::Accepted, Some(id)) => {
                if let Some(early) = self.early_streams.remove(&id) {
                    self.retired_ids.insert(id);
                    Ok(OpenAnswer::Bound {
                        logical_stream_id: id,
                        stream: early.stream,
                    })
                } else {
                    self.bind_waiters.insert(id, request_id);
                    self.opens.insert(
                        request_id,
                        OpenPhase::AwaitingStream {
                            logical_stream_id: id,
                        },
                    );
                    out.push(Action::AnswerOpen {
                        request_id,
                        answer: Ok(OpenAnswer::Accepted {
                            logical_stream_id: id,
                        }),
                    });
                    return;
                }
            }
        };
        self.opens.remove(&request_id);
        out.push(Action::AnswerOpen { request_id, answer });
    }

    /// The peer reset stream `logical_stream_id` (`StreamClose` with
    /// [`CloseCode::Reset`](crate::protocol::CloseCode::Reset)): if our open still waits
    /// for that stream, it fails now instead of at its bind timeout. A reset stream may
    /// never bind (QUIC drops its unsent bytes, the `StreamBind` among them); should it
    /// bind after all, its id is retired and it is refused.
    pub(super) fn fail_unbound_open(
        &mut self,
        logical_stream_id: u64,
        reason: Option<String>,
        out: &mut Actions<S>,
    ) {
        let Some(request_id) = self.bind_waiters.remove(&logical_stream_id) else {
            return;
        };
        self.opens.remove(&request_id);
        self.retired_ids.insert(logical_stream_id);
        debug!(
            request_id,
            logical_stream_id, "stream abandoned before it bound"
        );
        out.push(Action::BindOpen {
            request_id,
            stream: Err(Error::StreamAbandoned { reason }),
        });
    }

    /// Routes a data stream whose `StreamBind` names `logical_stream_id`: to the open
    /// waiting for it, into the hold if it came before its `OpenResponse`, or refused.
    /// Returns when the stream expires if it was held, so the driver can set a timer
    /// only then.
    pub(crate) fn handle_stream(
        &mut self,
        logical_stream_id: u64,
        stream: S,
        now: Instant,
        out: &mut Actions<S>,
    ) -> Option<Instant> {
        if self.terminal.is_some() {
            out.push(Action::Refuse {
                stream,
                logical_stream_id: Some(logical_stream_id),
                why: Refusal::SessionEnded,
            });
            return None;
        }
        if let Some(request_id) = self.bind_waiters.remove(&logical_stream_id) {
            self.opens.remove(&request_id);
            self.retired_ids.insert(logical_stream_id);
            out.push(Action::BindOpen {
                request_id,
                stream: Ok(stream),
            });
            return None;
        }
        let why = if self.retired_ids.contains(logical_stream_id) {
            Refusal::Retired
        } else if self.early_streams.contains_key(&logical_stream_id) {
            Refusal::Duplicate
        } else if self.early_streams.len() >= self.limits.max_early_streams {
            Refusal::HoldFull
        } else {
            self.early_streams.insert(
                logical_stream_id,
                EarlyStream {
                    stream,
                    arrived: now,
                },
            );
            return Some(now + self.limits.bind_timeout);
        };
        self.refuse(stream, Some(logical_stream_id), why, out);
        None
    }

    /// Refuses a data stream whose `StreamBind` header was unusable.
    pub(crate) fn refuse_unbound_stream(&mut self, stream: S, out: &mut Actions<S>) {
        self.refuse(stream, None, Refusal::BadHeader, out);
    }

    /// Refuses a stream handed over with [`Action::BindOpen`] or [`OpenAnswer::Bound`]
    /// that its open could no longer take (it gave up in the same instant).
    pub(crate) fn stream_undeliverable(
        &mut self,
        stream: S,
        logical_stream_id: Option<u64>,
        out: &mut Actions<S>,
    ) {
        self.refuse(stream, logical_stream_id, Refusal::Undeliverable, out);
    }

    /// Refuses held streams no open claimed within the bind timeout.
    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut Actions<S>) {
        let bind_timeout = self.limits.bind_timeout;
        let expired: Vec<u64> = self
            .early_streams
            .iter()
            .filter(|(_, early)| now.saturating_duration_since(early.arrived) >= bind_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.retired_ids.insert(id);
            if let Some(early) = self.early_streams.remove(&id) {
                self.refuse(early.stream, Some(id), Refusal::Expired, out);
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work: the moment the oldest
    /// held stream expires.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.early_streams
            .values()
            .map(|early| early.arrived + self.limits.bind_timeout)
            .min()
    }

    /// Pushes a counted refusal.
    fn refuse(
        &mut self,
        stream: S,
        logical_stream_id: Option<u64>,
        why: Refusal,
        out: &mut Actions<S>,
    ) {
        self.refused_streams += 1;
        out.push(Action::Refuse {
            stream,
            logical_stream_id,
            why,
        });
    }
}
