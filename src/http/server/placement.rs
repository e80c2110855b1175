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
//! at most [`PEEK_BYTES`] are looked at, a name that is not complete in them (a head sent
//! in pieces, a slow client) leaves the connection on the next shard in turn, and the
//! request is later parsed and checked as on any connection. The wait for the first bytes
//! counts against the connection's header timeout, which starts at accept either way.

use std::sync::Arc;
use tokio::time::Instant;

use tokio::net::TcpStream;

use crate::shards::{Shard, ShardSet, Shards};

/// How much of a connection's first bytes is looked at for a name: a request head's
/// first fields, or a `ClientHello` with its extensions.
pub const PEEK_BYTES: usize = 2048;

/// Finds the shard for the host a public connection's first request names; see the
/// [module docs](self). Closures `Fn(&str) -> Option<Shard>` are placements.
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
        let host = if tls {
            server_name(peeked)
        } else {
            host_field(peeked).map(str::to_owned)
        };
        host.and_then(|host| self.placement.shard(&host))
            .and_then(|shard| self.set.index_of(shard))
            .unwrap_or_else(|| self.set.next())
    }

    /// Whether the calling thread runs shard `index` of this set.
    pub(super) fn is_current(&self, index: usize) -> bool {
        Shards::current().and_then(|shard| self.set.index_of(shard)) == Some(index)
    }
}

/// Waits (at most until `deadline`) for `tcp`'s first bytes and peeks at them.
pub(super) async fn peek_first(tcp: &TcpStream, deadline: Instant) -> Vec<u8> {
    let mut peeked = vec![0; PEEK_BYTES];
    let peek = tokio::time::timeout_at(deadline, tcp.peek(&mut peeked));
    match peek.await {
        Ok(Ok(length)) => peeked.truncate(length),
        Ok(Err(_)) | Err(_) => peeked.clear(),
    }
    peeked
}

/// The `Host` field of the request head that `bytes` begin, if its line is complete.
pub(crate) fn host_field(bytes: &[u8]) -> Option<&str> {
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
pub(crate) fn server_name(bytes: &[u8]) -> Option<String> {
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
pub(crate) fn server_name(_bytes: &[u8]) -> Option<String> {
    None
}

#[cfg(test)]
mod tests;
