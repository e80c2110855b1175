//! What a session tells the application.
use crate::protocol::{CloseCode, Metadata, ServiceId};

/// Events delivered by [`SessionClient::with_events`](crate::session::SessionClient::with_events).
#[derive(Debug, Clone)]
pub enum ClientEvent {
    /// The peer wants a stream to one of our services: answer with `accept_open` (then open
    /// and bind the data stream) or `reject_open`.
    OpenRequest {
        /// Pass to `accept_open`/`reject_open`.
        request_id: u64,
        /// The service wanted.
        service: ServiceId,
        /// The opener's metadata.
        metadata: Metadata,
    },
    /// The peer closed a logical stream.
    StreamClosed {
        /// The stream.
        logical_stream_id: u64,
        /// Why.
        code: CloseCode,
    },
    /// The peer pinged us (the pong was already sent).
    PingReceived {
        /// The ping's sequence.
        sequence: u64,
    },
    /// The peer is closing the session.
    Closing {
        /// Why.
        code: CloseCode,
        /// The peer's explanation.
        reason: Option<String>,
    },
}

/// Every message seen on the control stream after the handshake, for observers such as
/// metrics and audit logs ([`SessionClient::control_events`](crate::session::SessionClient::control_events)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ControlEvent {
    /// The peer asked to open a stream.
    OpenRequest {
        /// The request id.
        request_id: u64,
        /// The service.
        service: ServiceId,
        /// The metadata.
        metadata: Metadata,
    },
    /// The peer answered one of our opens.
    OpenResponseReceived {
        /// The request answered.
        request_id: u64,
        /// Accepted or not.
        accepted: bool,
    },
    /// The peer closed the session.
    CloseReceived {
        /// Why.
        code: CloseCode,
        /// The peer's explanation.
        reason: Option<String>,
    },
    /// The peer pinged us.
    Ping {
        /// The sequence.
        sequence: u64,
    },
    /// The peer answered a ping.
    Pong {
        /// The sequence.
        sequence: u64,
    },
    /// The peer closed a logical stream.
    StreamClose {
        /// The stream.
        logical_stream_id: u64,
        /// Why.
        code: CloseCode,
    },
}
