//! The Hello/HelloAck handshake.
//!
//! Order on the wire (the QUIC client opened the control stream):
//! client `Hello` → server `Hello` → client `HelloAck` → server `HelloAck`.
//! Each side checks the other's version against its own list and the selected version
//! against its own computation, so a mismatch is reported on both sides, not only one.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::control::{write_message, ControlReader};
use super::Role;
use crate::config::Config;
use crate::error::Error;
use crate::protocol::{Features, Hello, HelloAck, ProtocolMessage};

/// What the handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiatedParams {
    /// The protocol version in use.
    pub version: u16,
    /// The features both sides offered.
    pub features: Features,
    /// The peer's agent string.
    pub remote_agent: Option<String>,
}

pub(crate) async fn negotiate<S, R>(
    role: Role,
    config: &Config,
    send: &mut S,
    reader: &mut ControlReader<R>,
) -> Result<NegotiatedParams, Error>
where
    S: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let ours = our_hello(config);
    let theirs = match role {
        Role::Client => {
            write_message(send, &ProtocolMessage::Hello(ours.clone())).await?;
            read_hello(reader).await?
        }
        Role::Server => {
            let theirs = read_hello(reader).await?;
            // Answer even on a version mismatch, so the client can tell what went wrong.
            write_message(send, &ProtocolMessage::Hello(ours.clone())).await?;
            theirs
        }
    };
    if !config.supported_versions.contains(&theirs.protocol_version) {
        return Err(Error::VersionMismatch {
            local: config.supported_versions.clone(),
            remote: theirs.protocol_version,
        });
    }
    let selected = HelloAck {
        selected_version: theirs.protocol_version.min(ours.protocol_version),
        selected_features: config.features & theirs.features,
    };
    let their_ack = match role {
        Role::Client => {
            write_message(send, &ProtocolMessage::HelloAck(selected)).await?;
            read_ack(reader).await?
        }
        Role::Server => {
            let their_ack = read_ack(reader).await?;
            write_message(send, &ProtocolMessage::HelloAck(selected)).await?;
            their_ack
        }
    };
    if their_ack.selected_version != selected.selected_version {
        return Err(Error::VersionMismatch {
            local: vec![selected.selected_version],
            remote: their_ack.selected_version,
        });
    }
    debug!(
        %role,
        version = selected.selected_version,
        features = ?selected.selected_features,
        remote_agent = ?theirs.agent,
        "session negotiated"
    );
    Ok(NegotiatedParams {
        version: selected.selected_version,
        features: selected.selected_features,
        remote_agent: theirs.agent,
    })
}

fn our_hello(config: &Config) -> Hello {
    let mut hello = Hello::new(config.features);
    if let Some(highest) = config.supported_versions.iter().max() {
        hello.protocol_version = *highest;
    }
    hello.agent.clone_from(&config.agent);
    hello
}

async fn read_hello<R: AsyncRead + Unpin>(reader: &mut ControlReader<R>) -> Result<Hello, Error> {
    match reader.read_message().await? {
        Some(ProtocolMessage::Hello(hello)) => Ok(hello),
        Some(_) => Err(Error::ProtocolViolation(
            "expected Hello during negotiation",
        )),
        None => Err(Error::ProtocolViolation(
            "peer ended the control stream during negotiation",
        )),
    }
}

async fn read_ack<R: AsyncRead + Unpin>(reader: &mut ControlReader<R>) -> Result<HelloAck, Error> {
    match reader.read_message().await? {
        Some(ProtocolMessage::HelloAck(ack)) => Ok(ack),
        Some(_) => Err(Error::ProtocolViolation(
            "expected HelloAck during negotiation",
        )),
        None => Err(Error::ProtocolViolation(
            "peer ended the control stream during negotiation",
        )),
    }
}
