//! Raw TCP through tunnels: a public port on the relay reaches a TCP service on an edge
//! (SSH, a database, anything that is not HTTP).
//!
//! Both ends are here because every TCP tunnel needs the same three things:
//! - on the relay, [`TcpForward`] accepts public connections on a listener, finds the edge
//!   through a [`Directory`](crate::relay::Directory), opens a stream to the service with
//!   the client's address in the open's metadata, and splices;
//! - on the edge, [`forward_to`] is a [`Router`](crate::edge::Router) route that connects
//!   each stream to the local service, optionally announcing the client with a PROXY
//!   protocol v2 header ([`ProxyHeader`]);
//! - in between, [`splice`] copies both ways with half-close kept, and a side that breaks
//!   is *aborted* on the other side (TCP reset, QUIC stream reset), because closing it
//!   gracefully would make a truncated transfer look complete.
//!
//! # On the stream
//! Before any data, the edge's route answers each stream with one status byte: `0` once
//! the backend accepted (the splice follows), `1` if it refused or did not answer (the
//! stream then ends). The relay waits for it before splicing, as a SOCKS proxy waits for
//! its server's reply, so "the backend is down" is told apart from "the backend closed"
//! and the client is cut at once. The client's own bytes wait in the kernel meanwhile.
//!
//! ```no_run
//! # async fn demo(registry: backhaul::relay::Registry) -> std::io::Result<()> {
//! use backhaul::tcp::TcpForward;
//!
//! // Relay: port 2222 reaches the "ssh" service of the edge "kiosk". `listener::bind`
//! // listens with a backlog for bursts (tokio's `TcpListener::bind` takes 128).
//! let listener = backhaul::listener::bind(([0, 0, 0, 0], 2222).into())?;
//! tokio::spawn(TcpForward::new(listener, registry, "kiosk", "ssh").serve());
//! # Ok(()) }
//! ```

mod forward;
mod proxy_protocol;
mod route;
mod splice;

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::protocol::{Metadata, MetadataValue};

pub use forward::{
    ServeTcp, TcpFailure, TcpForward, TcpObserver, DEFAULT_MAX_TCP_CONNECTIONS,
    DEFAULT_TCP_DRAIN_TIMEOUT, DEFAULT_TCP_OPEN_TIMEOUT,
};
pub use proxy_protocol::{ProxyHeader, ProxyHeaderError, SIGNATURE as PROXY_V2_SIGNATURE};
pub(crate) use route::splice_aborting;
pub use route::{forward_to, TcpRoute, TcpRouteFuture, DEFAULT_BACKEND_CONNECT_TIMEOUT};
pub use splice::{splice, splice_until_stopped, Side, SpliceError, Spliced};

/// Stream reset code: the connection broke on the far side; what was sent may be partial.
pub const CONNECTION_BROKEN: u32 = 0x5152_0011;

/// The edge's first byte on a TCP stream: the backend accepted.
pub(crate) const STATUS_CONNECTED: u8 = 0;
/// The edge's first byte on a TCP stream: the backend refused or did not answer.
pub(crate) const STATUS_BACKEND_UNAVAILABLE: u8 = 1;

/// Metadata key for the public client's address (`"203.0.113.9:51000"`).
pub const CLIENT_ADDRESS_KEY: &str = "client";
/// Metadata key for the public address the client connected to.
pub const PUBLIC_ADDRESS_KEY: &str = "public";

/// The addresses of a public TCP connection, as a relay sends them in the open's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionAddresses {
    /// The client's address.
    pub client: SocketAddr,
    /// The relay's public address the client reached.
    pub public: SocketAddr,
}

impl ConnectionAddresses {
    /// As open metadata.
    #[must_use]
    pub fn to_metadata(&self) -> Metadata {
        Metadata::Structured(
            [
                (
                    CLIENT_ADDRESS_KEY.to_owned(),
                    MetadataValue::String(self.client.to_string()),
                ),
                (
                    PUBLIC_ADDRESS_KEY.to_owned(),
                    MetadataValue::String(self.public.to_string()),
                ),
            ]
            .into_iter()
            .collect(),
        )
    }

    /// From open metadata, if it carries both addresses.
    #[must_use]
    pub fn from_metadata(metadata: &Metadata) -> Option<Self> {
        let Metadata::Structured(values) = metadata else {
            return None;
        };
        let address = |key: &str| match values.get(key) {
            Some(MetadataValue::String(text)) => text.parse().ok(),
            _ => None,
        };
        Some(Self {
            client: address(CLIENT_ADDRESS_KEY)?,
            public: address(PUBLIC_ADDRESS_KEY)?,
        })
    }
}

/// Closes a TCP connection with a reset (RST), not a FIN: the peer must not mistake an
/// aborted transfer for a complete one.
pub(crate) fn abort_tcp(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// A TCP connection that is reset, not closed, if dropped before [`release`]
/// (`AbortUnlessDone::release`): a task that owns it mid-transfer and is aborted (a drain
/// timeout, a serving loop dropped) must not end the transfer with a FIN.
pub(crate) struct AbortUnlessDone(Option<TcpStream>);

impl AbortUnlessDone {
    pub(crate) const fn new(stream: TcpStream) -> Self {
        Self(Some(stream))
    }

    /// The transfer ended as it should: the connection closes normally when dropped.
    pub(crate) fn release(mut self) -> TcpStream {
        self.0.take().expect("released once")
    }
}

impl std::ops::Deref for AbortUnlessDone {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        self.0.as_ref().expect("present until released")
    }
}

impl std::ops::DerefMut for AbortUnlessDone {
    fn deref_mut(&mut self) -> &mut TcpStream {
        self.0.as_mut().expect("present until released")
    }
}

impl Drop for AbortUnlessDone {
    fn drop(&mut self) {
        if let Some(stream) = self.0.take() {
            abort_tcp(stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_metadata() {
        let addresses = ConnectionAddresses {
            client: "[2001:db8::1]:4000".parse().unwrap(),
            public: "192.0.2.10:2222".parse().unwrap(),
        };
        assert_eq!(
            ConnectionAddresses::from_metadata(&addresses.to_metadata()),
            Some(addresses)
        );
        assert_eq!(ConnectionAddresses::from_metadata(&Metadata::Empty), None);
    }
}
