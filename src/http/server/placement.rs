//! Serving each public connection on the shard of the edge it asks for.
//!
//! A connection's first bytes name where it goes: the `Host` field of its first request
//! head, or over TLS the server name of its `ClientHello`. They are *peeked*, not read,
//! so the connection is then served as it would be anywhere, from its first byte. A
//! [`Placement`] maps the name to a shard (a relay: the shard of the edge that name
//! routes to, see [`EdgeHandle::shard`](crate::relay::EdgeHandle::shard)), and the
//! connection moves there: its socket leaves this runtime's reactor and joins the other's.
//!
//! Peeking is a hint, never a decision about the request. What it reads is not trusted:
//! at most [`Limits::placement_peek_bytes`] are looked at, and the request is later parsed
//! and checked as on any connection. First bytes that stop short of the name (a
//! `ClientHello` larger than one TCP segment, as post-quantum key shares make them, or a
//! head in pieces) are peeked again for up to [`Limits::placement_patience`]; a name still
//! not complete then leaves the connection on the next shard in turn. The wait for the first bytes counts against the
//! connection's header timeout, which starts at accept either way.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use tokio::net::TcpStream;

use super::Limits;
use crate::shards::{Shard, ShardSet};

/// Finds the shard for the host a public connection's first request names (see
/// [`Server::with_shards`](super::Server::with_shards)). Closures
/// `Fn(&str) -> Option<Shard>` are placements.
///
/// The name comes from the connection's first bytes, *peeked*, not read: the `Host` field
/// of its first head, or over TLS the server name of its `ClientHello`. It is a hint, never
/// trusted beyond choosing a thread: at most [`Limits::placement_peek_bytes`] are looked
/// at, bytes that stop short of a name are peeked again for up to
/// [`Limits::placement_patience`], and a connection that names nothing known takes the
/// shards in turn. The request is later parsed and checked
/// as on any connection.
pub trait Placement: Send + Sync + 'static {
    /// The shard for `host` (as sent: a `Host` value may carry a port, a server name
    /// does not), or `None` to leave it to the turn.
    fn shard(&self, host: &str) -> Option<Shard>;
}

impl<F> Placement for F
where
    F: Fn(&str) -> Option<Shard> + Send + Sync + 'static,
{
    fn shard(&self, host: &str) -> Option<Shard> {
        self(host)
    }
}

/// Shards and the placement that chooses among them, as a server holds them.
#[derive(Clone)]
pub(super) struct Placed {
    pub(super) set: ShardSet,
    pub(super) placement: Arc<dyn Placement>,
}

impl Placed {
    /// The shard for a connection whose first bytes are `peeked`.
    pub(super) fn choose(&self, peeked: &[u8], tls: bool) -> usize {
        let shard = if tls {
            server_name(peeked).and_then(|host| self.placement.shard(&host))
        } else {
            host_field(peeked).and_then(|host| self.placement.shard(host))
        };
        shard
            .and_then(|shard| self.set.index_of(shard))
            .unwrap_or_else(|| self.set.next())
    }

    /// Whether the calling thread runs shard `index` of this set.
    pub(super) fn is_current(&self, index: usize) -> bool {
        self.set.current_index() == Some(index)
    }
}

/// Waits (at most until `deadline`) for `tcp`'s first bytes and peeks at up to `limits`'
/// placement bytes; if they stop short of a name, peeks again for up to its patience.
pub(super) async fn peek_first(
    tcp: &TcpStream,
    tls: bool,
    deadline: Instant,
    limits: &Limits,
) -> Vec<u8> {
    let most = limits.placement_peek_bytes.max(1);
    let mut peeked = vec![0; most];
    let mut length = match tokio::time::timeout_at(deadline, tcp.peek(&mut peeked)).await {
        Ok(Ok(length)) => length,
        Ok(Err(_)) | Err(_) => 0,
    };
    let patience = (Instant::now() + limits.placement_patience).min(deadline);
    let mut pause = Duration::from_millis(1);
    while length > 0 && length < most && stops_short(&peeked[..length], tls) {
        // Readiness stays set after a peek: waiting on the socket would not wait.
        if Instant::now() + pause > patience {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(8));
        match tokio::time::timeout_at(patience, tcp.peek(&mut peeked)).await {
            Ok(Ok(more)) if more > 0 => length = more,
            _ => break,
        }
    }
    peeked.truncate(length);
    peeked
}

/// Whether `bytes` may be the start of a name's bytes that goes on: a TLS record shorter
/// than its header says, or a head with neither a `Host` line nor its end yet.
fn stops_short(bytes: &[u8], tls: bool) -> bool {
    if tls {
        // 22: a handshake record, which a `ClientHello` comes in; anything else names
        // nothing however long it is waited on.
        return match bytes {
            [22, _, _, high, low, rest @ ..] => {
                rest.len() < usize::from(u16::from_be_bytes([*high, *low]))
            }
            [22, ..] => true,
            _ => false,
        };
    }
    host_field(bytes).is_none()
        && !bytes
            .windows(2)
            .any(|pair| pair == b"\n\n" || pair == b"\n\r")
}

/// The `Host` field of the request head that `bytes` begin, if its line is complete.
fn host_field(bytes: &[u8]) -> Option<&str> {
    // Only lines that end within the look count: the last piece may be cut short.
    let end = bytes.iter().rposition(|&byte| byte == b'\n')?;
    let mut lines = bytes[..end].split(|&byte| byte == b'\n');
    // The request line.
    lines.next()?;
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            // The head ended without one.
            return None;
        }
        let Some(colon) = line.iter().position(|&byte| byte == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(b"host") {
            let value = std::str::from_utf8(&line[colon + 1..]).ok()?;
            let value = value.trim_matches([' ', '\t']);
            return (!value.is_empty()).then_some(value);
        }
    }
    None
}

/// The server name of the TLS `ClientHello` that `bytes` begin, if it is all there.
#[cfg(feature = "tls")]
fn server_name(bytes: &[u8]) -> Option<String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    // `read_tls` takes one record at a time; a hello may span several.
    while !reader.is_empty() {
        match acceptor.read_tls(&mut reader) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return accepted.client_hello().server_name().map(str::to_owned),
            Ok(None) => {}
            Err(_) => return None,
        }
    }
    None
}

#[cfg(not(feature = "tls"))]
fn server_name(_bytes: &[u8]) -> Option<String> {
    None
}

#[cfg(test)]
mod tests;
