//! The control messages of quic-reverse v1, as plain Rust values.
//!
//! These types carry no I/O and no encoding logic: [`codec`](super::codec) turns them into
//! the exact bytes the published `quic-reverse` 0.1.2 crate produces, and back.

use std::collections::HashMap;
use std::fmt;

/// The only protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The name of a service exposed by the accepting peer ("http", "ssh", "metrics"…).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(pub String);

impl ServiceId {
    /// Creates a service id from any string.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The service name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ServiceId {
    fn from(name: &str) -> Self {
        Self(name.to_owned())
    }
}

impl From<String> for ServiceId {
    fn from(name: String) -> Self {
        Self(name)
    }
}

impl From<&String> for ServiceId {
    fn from(name: &String) -> Self {
        Self(name.clone())
    }
}

impl From<&ServiceId> for ServiceId {
    fn from(id: &ServiceId) -> Self {
        id.clone()
    }
}

/// Data an opener attaches to an `OpenRequest` (a request id, a tenant, a client address…).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Metadata {
    /// No metadata.
    #[default]
    Empty,
    /// Opaque bytes, meaningful to the application only.
    Bytes(Vec<u8>),
    /// Named values. Entry order on the wire is unspecified.
    Structured(HashMap<String, MetadataValue>),
}

/// One value of [`Metadata::Structured`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataValue {
    /// A UTF-8 string.
    String(String),
    /// A signed 64-bit integer.
    Integer(i64),
    /// A boolean.
    Boolean(bool),
    /// Opaque bytes.
    Bytes(Vec<u8>),
}

bitflags::bitflags! {
    /// Optional protocol features, negotiated as the intersection of both peers' sets.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Features: u32 {
        /// `Metadata::Structured` may be sent.
        const STRUCTURED_METADATA = 0x01;
        /// `Ping`/`Pong` keep-alives may be sent.
        const PING_PONG = 0x02;
        /// Open requests may carry a priority.
        const STREAM_PRIORITY = 0x04;
    }
}

bitflags::bitflags! {
    /// Per-request flags of an `OpenRequest`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct OpenFlags: u8 {
        /// Only the acceptor sends data on the stream.
        const UNIDIRECTIONAL = 0x01;
        /// The stream should be scheduled ahead of others.
        const HIGH_PRIORITY = 0x02;
    }
}

/// Why an acceptor refused an `OpenRequest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// The service exists but cannot serve right now.
    ServiceUnavailable,
    /// No such service on this peer.
    UnsupportedService,
    /// A concurrency or rate limit was reached.
    LimitExceeded,
    /// The opener is not allowed to use this service.
    Unauthorized,
    /// The acceptor failed internally.
    InternalError,
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ServiceUnavailable => "service unavailable",
            Self::UnsupportedService => "unsupported service",
            Self::LimitExceeded => "limit exceeded",
            Self::Unauthorized => "unauthorized",
            Self::InternalError => "internal error",
        })
    }
}

/// Why a logical stream (or, with id 0, the whole session) was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// Finished as intended.
    Normal,
    /// Ended by an error.
    Error,
    /// Ended because something took too long.
    Timeout,
    /// Aborted.
    Reset,
}

impl CloseCode {
    /// The code as a small integer (its variant index on the wire).
    #[must_use]
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Normal => 0,
            Self::Error => 1,
            Self::Timeout => 2,
            Self::Reset => 3,
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Normal => "normal",
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
        })
    }
}

/// First message of each side: what it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The sender's protocol version.
    pub protocol_version: u16,
    /// Features the sender supports.
    pub features: Features,
    /// Free-form name of the sender's software, for diagnostics.
    pub agent: Option<String>,
}

impl Hello {
    /// A `Hello` for [`PROTOCOL_VERSION`] with the given features and no agent.
    #[must_use]
    pub const fn new(features: Features) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            features,
            agent: None,
        }
    }

    /// Sets the agent string.
    #[must_use]
    pub fn with_agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }
}

/// Second message of each side: what it selected from both `Hello`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAck {
    /// The version both sides will use.
    pub selected_version: u16,
    /// The features both sides will use.
    pub selected_features: Features,
}

/// Asks the peer to open a data stream to one of its services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// Chosen by the opener; echoed in the `OpenResponse`.
    pub request_id: u64,
    /// The service wanted.
    pub service: ServiceId,
    /// Data for the acceptor.
    pub metadata: Metadata,
    /// Per-request flags.
    pub flags: OpenFlags,
}

impl OpenRequest {
    /// A request with empty metadata and no flags.
    #[must_use]
    pub fn new(request_id: u64, service: impl Into<ServiceId>) -> Self {
        Self {
            request_id,
            service: service.into(),
            metadata: Metadata::Empty,
            flags: OpenFlags::empty(),
        }
    }

    /// Sets the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets the flags.
    #[must_use]
    pub const fn with_flags(mut self, flags: OpenFlags) -> Self {
        self.flags = flags;
        self
    }
}

/// Whether an `OpenRequest` was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenStatus {
    /// Accepted: a data stream bound to `logical_stream_id` follows.
    Accepted,
    /// Refused, with the reason's code.
    Rejected(RejectCode),
}

/// The acceptor's answer to an `OpenRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenResponse {
    /// The request answered.
    pub request_id: u64,
    /// Accepted or rejected.
    pub status: OpenStatus,
    /// Human-readable reason, usually for rejections.
    pub reason: Option<String>,
    /// The id the data stream's `StreamBind` will carry (accepted responses only).
    pub logical_stream_id: Option<u64>,
}

impl OpenResponse {
    /// An acceptance announcing the logical stream id.
    #[must_use]
    pub const fn accepted(request_id: u64, logical_stream_id: u64) -> Self {
        Self {
            request_id,
            status: OpenStatus::Accepted,
            reason: None,
            logical_stream_id: Some(logical_stream_id),
        }
    }

    /// A rejection.
    #[must_use]
    pub const fn rejected(request_id: u64, code: RejectCode, reason: Option<String>) -> Self {
        Self {
            request_id,
            status: OpenStatus::Rejected(code),
            reason,
            logical_stream_id: None,
        }
    }
}

/// Closes one logical stream, or the whole session when `logical_stream_id` is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamClose {
    /// The stream closed; 0 means the session.
    pub logical_stream_id: u64,
    /// Why.
    pub code: CloseCode,
    /// Human-readable detail.
    pub reason: Option<String>,
}

/// Keep-alive probe; answered by a [`Pong`] with the same sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    /// Chosen by the sender.
    pub sequence: u64,
}

/// Answer to a [`Ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    /// The sequence of the ping answered.
    pub sequence: u64,
}

/// Any message of the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolMessage {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`OpenRequest`].
    OpenRequest(OpenRequest),
    /// See [`OpenResponse`].
    OpenResponse(OpenResponse),
    /// See [`StreamClose`].
    StreamClose(StreamClose),
    /// See [`Ping`].
    Ping(Ping),
    /// See [`Pong`].
    Pong(Pong),
}

impl ProtocolMessage {
    /// The message's name, for logs.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Hello(_) => "Hello",
            Self::HelloAck(_) => "HelloAck",
            Self::OpenRequest(_) => "OpenRequest",
            Self::OpenResponse(_) => "OpenResponse",
            Self::StreamClose(_) => "StreamClose",
            Self::Ping(_) => "Ping",
            Self::Pong(_) => "Pong",
        }
    }
}
