//! The lane handshake: how a further QUIC connection joins a session.
//!
//! A session's data streams can run over several connections to the same peer (its
//! *lanes*, see [`QuinnConnection::add_lane`](crate::transport::QuinnConnection::add_lane)), because one connection keeps about one core
//! busy. The edge dials the relay again and, on the new connection's first stream, asks to
//! join the session it already has; the relay adds the connection to that session.
//!
//! What proves the request comes from the session's edge is a [`LaneKey`] that both ends of
//! the session's connection derive from its TLS secrets (the TLS exporter, RFC 8446 §7.5,
//! label [`LANE_KEY_LABEL`]). It is never sent over the session, and nobody without those
//! secrets can compute it: not the relay's other edges, not anyone watching. Knowing an
//! edge's name or token is not enough.
//!
//! On the wire, the joining side sends [`LANE_MAGIC`] and the 32-byte key, then finishes
//! its half of the stream; the relay answers one byte, a [`JoinAnswer`], and finishes
//! too. The magic can never begin a session: a session's first bytes are a control frame's
//! length, big-endian and at most 65 536, so its first byte is 0. A relay that does not
//! know lanes (an older backhaul, the `quic-reverse` crate) fails the connection or
//! never answers, and the edge goes on with its one connection.

use std::fmt;

use crate::error::Error;

/// The first bytes of a lane's first stream.
pub const LANE_MAGIC: [u8; 4] = *b"BHL\x01";

/// The TLS exporter label the [`LaneKey`] is derived with.
pub const LANE_KEY_LABEL: &[u8] = b"backhaul lane v1";

/// The most connections a session may run over by default, its own included: enough for
/// an edge to use four cores of a relay, while one authenticated edge can hold at most four
/// connections' worth of the relay's memory.
pub const DEFAULT_MAX_LANES: usize = 4;

/// QUIC close code of a lane the relay did not take.
pub const CLOSE_LANE_REFUSED: u32 = 0x12;

/// The secret a lane presents to join a session: derived by both ends of the session's
/// connection from its TLS secrets, so it is never sent over it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LaneKey([u8; 32]);

impl LaneKey {
    /// The key of the session running on `connection` (either end gets the same key), or
    /// `None` if its TLS session cannot export keys (a handshake not finished).
    #[must_use]
    pub fn of(connection: &quinn::Connection) -> Option<Self> {
        let mut key = [0; 32];
        connection
            .export_keying_material(&mut key, LANE_KEY_LABEL, b"")
            .ok()?;
        Some(Self(key))
    }
}

impl fmt::Debug for LaneKey {
    // A secret: never in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LaneKey(..)")
    }
}

/// The relay's answer to a join request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JoinAnswer {
    /// The connection now carries the session's streams.
    Joined,
    /// No session of this relay has that key (it ended, or the lane reached another
    /// relay behind the same address).
    UnknownSession,
    /// The session has as many connections as the relay allows.
    Full,
}

impl JoinAnswer {
    const fn byte(self) -> u8 {
        match self {
            Self::Joined => 0,
            Self::UnknownSession => 1,
            Self::Full => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Joined),
            1 => Some(Self::UnknownSession),
            2 => Some(Self::Full),
            _ => None,
        }
    }
}

/// Why a lane did not join.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The relay answered, and did not take the lane.
    #[error("the relay refused the lane: {0:?}")]
    Refused(JoinAnswer),
    /// The relay does not take lanes: it closed the stream or the connection without an
    /// answer, or answered something else.
    #[error("the relay does not take lanes: {0}")]
    NotSupported(String),
    /// The connection failed.
    #[error("lane handshake failed: {0}")]
    Transport(#[source] Error),
}

/// Asks the relay at the other end of `lane` to add it to the session whose key is
/// `key`. The caller bounds it with a timeout: a relay that does not know lanes may never
/// answer.
///
/// # Errors
/// [`JoinError::Refused`] if the relay answered no, [`JoinError::NotSupported`] if it
/// does not take lanes, [`JoinError::Transport`] if the connection failed.
pub async fn join(lane: &quinn::Connection, key: &LaneKey) -> Result<(), JoinError> {
    let transport = |error: std::io::Error| JoinError::Transport(Error::transport(error));
    let (mut send, mut recv) = lane
        .open_bi()
        .await
        .map_err(|error| JoinError::Transport(Error::transport(error)))?;
    let mut request = [0; LANE_MAGIC.len() + 32];
    request[..LANE_MAGIC.len()].copy_from_slice(&LANE_MAGIC);
    request[LANE_MAGIC.len()..].copy_from_slice(&key.0);
    send.write_all(&request)
        .await
        .map_err(|error| transport(error.into()))?;
    let _ = send.finish();
    let mut answer = [0; 1];
    match recv.read_exact(&mut answer).await {
        Ok(_) => match JoinAnswer::from_byte(answer[0]) {
            Some(JoinAnswer::Joined) => Ok(()),
            Some(refused) => Err(JoinError::Refused(refused)),
            None => Err(JoinError::NotSupported(format!(
                "unknown answer {:#04x}",
                answer[0]
            ))),
        },
        Err(error) => Err(JoinError::NotSupported(error.to_string())),
    }
}

/// Reads a join request's key, once [`LANE_MAGIC`] was read from `recv`.
pub(crate) async fn read_key(recv: &mut quinn::RecvStream) -> Result<LaneKey, Error> {
    let mut key = [0; 32];
    recv.read_exact(&mut key)
        .await
        .map_err(|_| Error::ProtocolViolation("incomplete lane join request"))?;
    Ok(LaneKey(key))
}

/// Sends `answer` to a join request and finishes the stream.
pub(crate) async fn answer(send: &mut quinn::SendStream, answer: JoinAnswer) {
    // A joiner that went away needs no answer.
    if send.write_all(&[answer.byte()]).await.is_ok() {
        let _ = send.finish();
    }
}

#[cfg(all(test, feature = "self-signed"))]
mod tests {
    use super::*;
    use crate::quic::test_pair::test_pair;

    #[test]
    fn answers_round_trip_and_unknown_bytes_are_refused() {
        for answer in [
            JoinAnswer::Joined,
            JoinAnswer::UnknownSession,
            JoinAnswer::Full,
        ] {
            assert_eq!(JoinAnswer::from_byte(answer.byte()), Some(answer));
        }
        assert_eq!(JoinAnswer::from_byte(7), None);
    }

    #[test]
    fn the_magic_cannot_start_a_control_frame() {
        let length = u32::from_be_bytes(LANE_MAGIC);
        assert!(length as usize > crate::protocol::MAX_FRAME_SIZE);
    }

    #[tokio::test]
    async fn both_ends_derive_the_same_key_and_other_connections_another() {
        let pair = test_pair().await;
        let other = test_pair().await;
        let key = LaneKey::of(pair.dialer.inner()).unwrap();
        assert_eq!(Some(key.clone()), LaneKey::of(pair.acceptor.inner()));
        assert_ne!(Some(key.clone()), LaneKey::of(other.dialer.inner()));
        assert_eq!(format!("{key:?}"), "LaneKey(..)");
    }
}
