//! The acceptor's side: the peer's open requests, our answers, and the
//! `max_concurrent_streams` slots they hold.
//!
//! A request takes a slot when it arrives (so a flood of requests cannot grow memory), keeps
//! it when accepted, and gives it back when rejected, released, or closed by either side.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use tracing::debug;

use super::{Action, Actions, SessionMachine};
use crate::error::Error;
use crate::protocol::{
    CloseCode, Metadata, OpenRequest, OpenResponse, ProtocolMessage, RejectCode, ServiceId,
    StreamClose,
};
use crate::session::events::{ClientEvent, ControlEvent};

/// What one of the peer's open requests asked for.
#[derive(Debug, Clone)]
pub(crate) struct RequestedStream {
    pub(crate) service: ServiceId,
    pub(crate) metadata: Metadata,
}

/// Why an [`ClientEvent::OpenRequest`] could not reach the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Undeliverable {
    /// Its queue is full: requests arrive faster than they are handled.
    Full,
    /// Nobody receives events: this side does not accept streams.
    NoReceiver,
}

impl<S> SessionMachine<S> {
    /// Admits the peer's request (delivering it to the application) or rejects it.
    pub(super) fn on_open_request(&mut self, request: OpenRequest, out: &mut Actions<S>) {
        out.push(Action::Observe(ControlEvent::OpenRequest {
            request_id: request.request_id,
            service: request.service.clone(),
            metadata: request.metadata.clone(),
        }));
        let request_id = request.request_id;
        let limit = self.limits.max_concurrent_streams;
        if self.terminal.is_some() {
            let reason = "session is closing".to_owned();
            return self.refuse_request(request_id, RejectCode::ServiceUnavailable, reason, out);
        }
        if self.streams_in_use() >= limit {
            let reason = format!("too many concurrent streams (limit {limit})");
            return self.refuse_request(request_id, RejectCode::LimitExceeded, reason, out);
        }
        match self.unanswered_requests.entry(request_id) {
            Entry::Occupied(_) => {
                let reason = "duplicate request id".to_owned();
                self.refuse_request(request_id, RejectCode::InternalError, reason, out);
            }
            Entry::Vacant(slot) => {
                slot.insert(RequestedStream {
                    service: request.service.clone(),
                    metadata: request.metadata.clone(),
                });
                out.push(Action::Deliver(ClientEvent::OpenRequest {
                    request_id,
                    service: request.service,
                    metadata: request.metadata,
                }));
            }
        }
    }

    /// The application could not be told of request `request_id`: frees its slot and
    /// rejects it.
    pub(crate) fn request_undeliverable(
        &mut self,
        request_id: u64,
        why: Undeliverable,
        out: &mut Actions<S>,
    ) {
        if self.take_request(request_id).is_none() {
            return;
        }
        let (code, reason) = match why {
            Undeliverable::Full => (
                RejectCode::LimitExceeded,
                "open requests arrive faster than they are handled",
            ),
            Undeliverable::NoReceiver => (
                RejectCode::ServiceUnavailable,
                "this peer does not accept streams",
            ),
        };
        self.refuse_request(request_id, code, reason.to_owned(), out);
    }

    fn refuse_request(
        &mut self,
        request_id: u64,
        code: RejectCode,
        reason: String,
        out: &mut Actions<S>,
    ) {
        self.refused_requests += 1;
        debug!(request_id, %code, %reason, "refusing open request");
        let response = OpenResponse::rejected(request_id, code, Some(reason));
        out.push(Action::Send(ProtocolMessage::OpenResponse(response)));
    }

    /// Accepts request `request_id` as `logical_stream_id`, which then holds its
    /// `max_concurrent_streams` slot until released, and pushes the `OpenResponse`.
    /// Returns what the request asked for.
    ///
    /// # Errors
    /// The session's end error, [`Error::InvalidStreamId`] for 0 or an id in use,
    /// [`Error::UnknownRequest`] if no such request waits for an answer.
    pub(crate) fn accept_open(
        &mut self,
        request_id: u64,
        logical_stream_id: u64,
        out: &mut Actions<S>,
    ) -> Result<RequestedStream, Error> {
        if let Some(terminal) = &self.terminal {
            return Err(terminal.error());
        }
        if logical_stream_id == 0 || self.active_streams.contains(&logical_stream_id) {
            return Err(Error::InvalidStreamId(logical_stream_id));
        }
        let Some(requested) = self.take_request(request_id) else {
            return Err(Error::UnknownRequest { request_id });
        };
        self.active_streams.insert(logical_stream_id);
        let response = OpenResponse::accepted(request_id, logical_stream_id);
        out.push(Action::Send(ProtocolMessage::OpenResponse(response)));
        Ok(requested)
    }

    /// Rejects request `request_id`, freeing its slot, and pushes the `OpenResponse`.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`] if no such request waits for an answer (none does once
    /// the session ended).
    pub(crate) fn reject_open(
        &mut self,
        request_id: u64,
        code: RejectCode,
        reason: Option<String>,
        out: &mut Actions<S>,
    ) -> Result<(), Error> {
        if self.take_request(request_id).is_none() {
            return Err(Error::UnknownRequest { request_id });
        }
        let response = OpenResponse::rejected(request_id, code, reason);
        out.push(Action::Send(ProtocolMessage::OpenResponse(response)));
        Ok(())
    }

    /// Frees an accepted stream's slot without telling the peer; freeing a free slot does
    /// nothing.
    pub(crate) fn release_stream(&mut self, logical_stream_id: u64) {
        self.active_streams.remove(&logical_stream_id);
        if self.active_streams.is_empty() {
            // An idle session keeps no table (a relay's only request is its edge's
            // registration).
            self.active_streams = HashSet::new();
        }
    }

    /// Takes the peer's unanswered request `request_id` out, letting the table go once
    /// empty (as [`release_stream`](Self::release_stream)).
    fn take_request(&mut self, request_id: u64) -> Option<RequestedStream> {
        let requested = self.unanswered_requests.remove(&request_id);
        if self.unanswered_requests.is_empty() {
            self.unanswered_requests = HashMap::new();
        }
        requested
    }

    /// Frees an accepted stream's slot and pushes the `StreamClose` telling the peer.
    pub(crate) fn close_stream(
        &mut self,
        logical_stream_id: u64,
        code: CloseCode,
        reason: Option<String>,
        out: &mut Actions<S>,
    ) {
        self.release_stream(logical_stream_id);
        let close = StreamClose {
            logical_stream_id,
            code,
            reason,
        };
        out.push(Action::Send(ProtocolMessage::StreamClose(close)));
    }

    /// A fresh logical stream id for an accepted open: ids start at 1 (0 means "session")
    /// and skip ids the application chose by hand and still uses.
    pub(crate) fn allocate_stream_id(&mut self) -> u64 {
        loop {
            let id = self.next_logical_stream_id;
            self.next_logical_stream_id = self.next_logical_stream_id.wrapping_add(1);
            if id != 0 && !self.active_streams.contains(&id) {
                return id;
            }
        }
    }
}
