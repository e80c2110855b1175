//! Reverse tunnels over QUIC that plug into tower and hyper.
//!
//! An edge device behind NAT dials out to a public relay over QUIC; over that one
//! connection the relay then opens streams to named services on the edge ("http", "ssh",
//! "metrics"…), and the edge never opens an inbound port. backhaul speaks the quic-reverse
//! v1 protocol byte for byte, so it interoperates with the `quic-reverse` crate.
//!
//! # Layout
//! - [`protocol`]: the wire format: messages, codec, framing, `StreamBind`. Bytes only.
//! - [`transport`]: the `Connection`/`SendStream`/`RecvStream` traits, quinn and in-memory.
//! - [`session`]: the handshake, the session's state machine (no I/O) and the driver that
//!   performs its actions; [`SessionClient`], the cloneable handle to open, accept, ping
//!   and close.
//! - [`stream`]: `TunnelStream`, a bound data stream for tokio and hyper alike.
//! - [`connector`]: the relay side as `tower::Service<ServiceId>` and `Service<Uri>`,
//!   for hyper and hyper-util's pooled client.
//! - [`edge`]: the edge side: a `Router` of tower services, served with graceful shutdown,
//!   and `Edge`, which stays connected to a relay (backoff, fatal vs transient errors).
//! - [`http`]: any tower HTTP service (an axum `Router`) as an edge route; `http::proxy`
//!   forwards HTTP (relay → edge, edge → local service) with forwarding headers and strict
//!   authorities; on a relay, a hardened public HTTP server and a pooled HTTP client per
//!   edge session.
//! - [`quic`]: QUIC endpoints with TLS and transport limits suited to tunnels.
//! - [`tcp`]: raw TCP through tunnels: the relay's public port, the edge's route to a
//!   local service, PROXY protocol v2, a splice that never reports a cut as complete.
//! - [`tls`]: TLS for public listeners: certificates chosen by SNI, reloaded from files.
//! - [`listener`]: public TCP listeners with a listen backlog sized for bursts.
//! - [`shards`]: a thread per core, each with a runtime, and each edge's work kept on one.
//! - [`relay`]: the relay's building blocks: accept and authenticate edges, a registry of
//!   them by name, lookup behind a `Directory` trait.
//! - [`Config`] and [`Error`]: settings with documented defaults; one error type.
//!
//! # Example
//! A relay and an edge in one process; the in-memory transport stands in for the QUIC
//! connection ([`SessionClient::start`] takes a `quinn::Connection`, see [`quic`]).
//! ```
//! use backhaul::edge::Router;
//! use backhaul::stream::TunnelStream;
//! use backhaul::transport::mem::{memory_connection_pair, MemoryConnection};
//! use backhaul::{Config, Metadata, Role, SessionClient};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (edge_side, relay_side) = memory_connection_pair();
//! let (edge, relay) = tokio::join!(
//!     SessionClient::start_on(edge_side, Role::Client, Config::new()),
//!     SessionClient::start_on(relay_side, Role::Server, Config::new()),
//! );
//!
//! // The edge serves "echo" with a tower service.
//! let (edge, events) = edge?;
//! let echo = tower::service_fn(|mut stream: TunnelStream<MemoryConnection>| async move {
//!     let (mut reader, mut writer) = tokio::io::split(&mut stream);
//!     tokio::io::copy(&mut reader, &mut writer).await?;
//!     writer.shutdown().await
//! });
//! let router = Router::new().route("echo", echo);
//! tokio::spawn(async move { router.serve(edge, events).await });
//!
//! // The relay opens a stream to it.
//! let (relay, _) = relay?;
//! let (mut send, mut recv) = relay.open("echo", Metadata::Empty).await?;
//! send.write_all(b"ping").await?;
//! send.shutdown().await?;
//! let mut reply = Vec::new();
//! recv.read_to_end(&mut reply).await?;
//! assert_eq!(reply, b"ping");
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod config;
pub mod connector;
pub mod edge;
mod error;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "quinn")]
mod lazy_serve;
#[cfg(any(feature = "http", feature = "tcp"))]
pub mod listener;
pub mod protocol;
#[cfg(feature = "quinn")]
pub mod quic;
pub mod relay;
pub mod session;
pub mod shards;
pub mod stream;
#[cfg(feature = "tcp")]
pub mod tcp;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;

pub use config::{Config, ConfigError};
pub use error::{Error, TimeoutKind};
pub use protocol::{
    CloseCode, Features, Metadata, MetadataValue, OpenFlags, RejectCode, ServiceId, StreamBind,
    PROTOCOL_VERSION,
};
pub use session::{
    ClientEvent, ControlEvent, NegotiatedParams, Role, Session, SessionClient, SessionHandle,
    SessionStats, State,
};
pub use transport::{Connection, RecvStream, SendStream};
#[cfg(feature = "quinn")]
pub use transport::{QuinnConnection, QuinnRecvStream, QuinnSendStream};

/// The README's examples, compiled as doc tests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
