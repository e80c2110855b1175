//! Relay and edge in one process over QUIC on loopback.
//!
//! The edge dials the relay (as a device behind NAT would) and exposes an "echo" service;
//! the relay then opens streams *to the edge* over that one connection.
//!
//! ```text
//! cargo run --example echo
//! ```

use std::time::Instant;

use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};
use backhaul::{
    ClientEvent, CloseCode, Config, Connection, Metadata, QuinnConnection, RejectCode, Role,
    SendStream, Session, SessionClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The relay: a public QUIC listener with a self-signed certificate the edge pins.
    let identity = Identity::self_signed(&["localhost"])?;
    let trusted = identity.cert_chain.clone();
    let relay_endpoint = server_endpoint("127.0.0.1:0".parse()?, identity, DEFAULT_ALPN)?;
    let relay_addr = relay_endpoint.local_addr()?;
    println!("relay: listening on {relay_addr}");

    // The edge dials out; it never listens.
    let edge = tokio::spawn(run_edge(relay_addr, trusted));

    let incoming = relay_endpoint.accept().await.ok_or("endpoint closed")?;
    let connection = incoming.await?;
    println!("relay: edge connected from {}", connection.remote_address());
    let session = Session::new(
        QuinnConnection::new(connection),
        Role::Server,
        Config::new().with_agent("echo-relay"),
    );
    let relay = SessionClient::new(session.start().await?);
    let agent = session.negotiated_params().and_then(|p| p.remote_agent);
    println!("relay: session ready (edge agent: {agent:?})");

    for message in [
        "hello through the tunnel",
        "a second stream, same connection",
    ] {
        let started = Instant::now();
        let (mut send, mut recv) = relay.open("echo", Metadata::Empty).await?;
        send.write_all(message.as_bytes()).await?;
        send.finish().await?;
        let mut reply = String::new();
        recv.read_to_string(&mut reply).await?;
        println!("relay: echo replied {reply:?} in {:?}", started.elapsed());
    }

    match relay.open("ssh", Metadata::Empty).await {
        Err(error) => println!("relay: opening \"ssh\" failed as expected: {error}"),
        Ok(_) => println!("relay: unexpectedly opened \"ssh\""),
    }
    println!("relay: ping rtt {:?}", relay.ping().await?);

    relay
        .close(CloseCode::Normal, Some("demo done".into()))
        .await?;
    println!("relay: session closed");
    edge.await??;
    relay_endpoint.wait_idle().await;
    Ok(())
}

async fn run_edge(
    relay_addr: std::net::SocketAddr,
    trusted: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Result<(), BoxError> {
    let endpoint = client_endpoint(&trusted, DEFAULT_ALPN)?;
    let connection = QuinnConnection::new(endpoint.connect(relay_addr, "localhost")?.await?);
    let session = Session::new(
        connection,
        Role::Client,
        Config::new().with_agent("echo-edge"),
    );
    let (client, mut events) = SessionClient::with_events(session.start().await?);
    println!("edge: connected and negotiated; exposing \"echo\"");

    while let Some(event) = events.recv().await {
        match event {
            ClientEvent::OpenRequest {
                request_id,
                service,
                ..
            } if service.as_str() == "echo" => {
                let stream_id = client.allocate_stream_id();
                client.accept_open(request_id, stream_id).await?;
                let (mut send, mut recv) = client.connection().open_bi().await?;
                client.bind_stream(&mut send, stream_id).await?;
                let client = client.clone();
                tokio::spawn(async move {
                    let copied = tokio::io::copy(&mut recv, &mut send).await;
                    let _ = send.finish().await;
                    let _ = client
                        .close_stream(stream_id, CloseCode::Normal, None)
                        .await;
                    println!(
                        "edge: stream {stream_id} echoed {} bytes",
                        copied.unwrap_or(0)
                    );
                });
            }
            ClientEvent::OpenRequest {
                request_id,
                service,
                ..
            } => {
                println!("edge: rejecting unknown service \"{service}\"");
                let reason = Some(format!("no service named {service}"));
                client
                    .reject_open(request_id, RejectCode::UnsupportedService, reason)
                    .await?;
            }
            ClientEvent::PingReceived { sequence } => println!("edge: ping {sequence}"),
            ClientEvent::StreamClosed { .. } => {}
            ClientEvent::Closing { code, reason } => {
                println!("edge: relay closed the session ({code}, {reason:?})");
                break;
            }
        }
    }
    endpoint.close(0u32.into(), b"bye");
    Ok(())
}
