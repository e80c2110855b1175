//! Test-side QUIC peers of a relay: quinn endpoints bound to chosen loopback addresses
//! (so the relay sees distinct sources) that speak backhaul's session protocol, for
//! hostile and clumsy edges.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use backhaul::quic::{client_config, load_certs, DEFAULT_ALPN};
use backhaul::{
    Config, Error, Metadata, MetadataValue, QuinnConnection, RejectCode, Role, Session,
    SessionClient,
};

/// A quinn client endpoint bound to `ip` (a loopback address), trusting `cert`.
pub fn endpoint_from(ip: &str, cert: &Path) -> quinn::Endpoint {
    let trusted = load_certs(cert).expect("the relay's certificate");
    let bind: SocketAddr = format!("{ip}:0").parse().expect("an address");
    let mut endpoint = quinn::Endpoint::client(bind).expect("binding a client endpoint");
    endpoint.set_default_client_config(client_config(&trusted, DEFAULT_ALPN).expect("config"));
    endpoint
}

/// A connection that completes the QUIC and session handshakes and then says nothing.
pub async fn hello_only(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
) -> Option<(quinn::Connection, SessionClient<QuinnConnection>)> {
    let connection = endpoint.connect(relay, "localhost").ok()?.await.ok()?;
    let session = Session::new(
        QuinnConnection::new(connection.clone()),
        Role::Client,
        Config::new(),
    );
    let handle = tokio::time::timeout(Duration::from_secs(20), session.start())
        .await
        .ok()?
        .ok()?;
    Some((connection, SessionClient::new(handle)))
}

pub fn credentials(edge: &str, token: &str) -> Metadata {
    let mut fields = std::collections::HashMap::new();
    fields.insert("edge".to_owned(), MetadataValue::String(edge.to_owned()));
    fields.insert("token".to_owned(), MetadataValue::String(token.to_owned()));
    Metadata::Structured(fields)
}

/// How one registration attempt from a test client ended.
#[derive(Debug, PartialEq)]
pub enum Attempt {
    /// The relay refused the handshake (the source is backing off, or a cap).
    NotConnected,
    /// Registration refused with this reason.
    Unauthorized(Option<String>),
    /// Anything else.
    Other(String),
}

/// Connects and registers `edge` with `token`; returns how it went and the connection.
pub async fn try_register(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    edge: &str,
    token: &str,
) -> (Attempt, Option<quinn::Connection>) {
    let Some((connection, client)) = hello_only(endpoint, relay).await else {
        return (Attempt::NotConnected, None);
    };
    let opened = tokio::time::timeout(
        Duration::from_secs(20),
        client.open("_register", credentials(edge, token)),
    )
    .await;
    let attempt = match opened {
        Ok(Err(Error::StreamRejected {
            code: RejectCode::Unauthorized,
            reason,
        })) => Attempt::Unauthorized(reason),
        Ok(Err(error)) => Attempt::Other(error.to_string()),
        Ok(Ok(_)) => Attempt::Other("registered".to_owned()),
        Err(_) => Attempt::Other("no answer".to_owned()),
    };
    (attempt, Some(connection))
}
