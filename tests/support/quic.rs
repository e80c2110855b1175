//! One QUIC connection on 127.0.0.1 with real TLS, shared by the tests and the benches
//! (which include this file by path).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};

/// Both ends of one QUIC connection, plus the endpoints that keep it alive.
pub struct QuicPair {
    /// The relay's end (QUIC server).
    pub relay: quinn::Connection,
    /// The edge's end (QUIC client).
    pub edge: quinn::Connection,
    pub relay_endpoint: quinn::Endpoint,
    pub edge_endpoint: quinn::Endpoint,
}

/// Dials a fresh QUIC connection on loopback with `alpn`.
pub async fn quic_pair_with_alpn(alpn: &[u8]) -> QuicPair {
    let identity = Identity::self_signed(&["localhost"]).expect("certificate");
    let trusted = identity.cert_chain.clone();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let relay_endpoint = server_endpoint(addr, identity, alpn).expect("server endpoint");
    let relay_addr = relay_endpoint.local_addr().unwrap();
    let edge_endpoint = client_endpoint(&trusted, alpn).expect("client endpoint");
    let connecting = edge_endpoint.connect(relay_addr, "localhost").unwrap();
    let accepting = async { relay_endpoint.accept().await.expect("incoming").await };
    let (edge, relay) = tokio::join!(connecting, accepting);
    let relay = relay.expect("relay side");
    QuicPair {
        relay,
        edge: edge.expect("edge side"),
        relay_endpoint,
        edge_endpoint,
    }
}

/// Dials a fresh QUIC connection on loopback.
pub async fn quic_pair() -> QuicPair {
    quic_pair_with_alpn(DEFAULT_ALPN).await
}

impl QuicPair {
    /// Same as [`quic_pair`].
    pub async fn new() -> Self {
        quic_pair().await
    }

    /// Closes both ends.
    pub fn close(&self) {
        self.relay.close(0u32.into(), b"done");
        self.edge.close(0u32.into(), b"done");
    }
}
