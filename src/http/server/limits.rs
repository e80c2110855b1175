//! How long each stage of a public connection may last, and how much it may hold.
//!
//! Every limit has a production default (the values below), and every one is a plain
//! field, so a test or an admin listener sets short ones with struct update syntax:
//! `Limits { header_timeout: Duration::from_secs(1), ..Limits::DEFAULT }`.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

/// The limits a [`Server`](super::Server) holds its connections to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once (default 10 000). Past it the server stops accepting and
    /// new connections wait in the kernel's listen backlog until one closes; at least 1.
    pub max_connections: usize,
    /// From accept, or from the first byte of a request head, to the whole head (default
    /// 10 s). This is what stops slowloris, a head sent a byte at a time.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight and nothing sent (default 60 s).
    pub idle_timeout: Duration,
    /// A write that makes no progress: the client stopped reading (default 60 s). The
    /// connection is then reset, so its unsent data does not linger in the kernel.
    pub write_timeout: Duration,
    /// Largest HTTP/1 request head and HTTP/2 header list, in bytes (default 64 KiB);
    /// larger heads are answered 431 (or 414 for a long URI) by hyper. At least 8 KiB,
    /// hyper's minimum (smaller values are raised to it).
    pub max_head_bytes: usize,
    /// Most header fields in an HTTP/1 request head (default 100).
    pub max_headers: usize,
    /// Most concurrent streams on an HTTP/2 connection (default 100).
    pub http2_max_concurrent_streams: u32,
    /// How often an HTTP/2 connection is pinged (default 20 s); `None` sends no pings.
    pub http2_keep_alive_interval: Option<Duration>,
    /// How long an HTTP/2 ping may go unanswered before the connection is closed
    /// (default 20 s).
    pub http2_keep_alive_timeout: Duration,
    /// After the shutdown signal, how long in-flight requests may take to finish before
    /// their connections are dropped (default 10 s).
    pub shutdown_timeout: Duration,
    /// On shards ([`Server::with_shards`](super::Server::with_shards)): how much of a
    /// connection's first bytes is looked at for the name that places it (default 4 KiB:
    /// a request head's first fields, or a `ClientHello` with its extensions).
    pub placement_peek_bytes: usize,
    /// On shards: how long first bytes that stop short of a name are waited on for the
    /// rest (default 50 ms; a `ClientHello` over two segments, a head in pieces), within
    /// the header timeout.
    pub placement_patience: Duration,
}

/// hyper refuses an HTTP/1 buffer smaller than this.
const MIN_HEAD_BYTES: usize = 8 * 1024;

impl Limits {
    /// The production defaults, as a constant for struct update syntax in `const`s.
    pub const DEFAULT: Self = Self {
        max_connections: 10_000,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(60),
        max_head_bytes: 64 * 1024,
        max_headers: 100,
        http2_max_concurrent_streams: 100,
        http2_keep_alive_interval: Some(Duration::from_secs(20)),
        http2_keep_alive_timeout: Duration::from_secs(20),
        shutdown_timeout: Duration::from_secs(10),
        placement_peek_bytes: 4096,
        placement_patience: Duration::from_millis(50),
    };

    /// Connections that may be open at once, within what a semaphore can count.
    pub(super) fn connection_slots(&self) -> usize {
        self.max_connections
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS)
    }

    /// hyper's server settings for these limits: bounded heads and streams.
    pub(super) fn http_builder(&self) -> auto::Builder<TokioExecutor> {
        let head_bytes = self.max_head_bytes.max(MIN_HEAD_BYTES);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .max_buf_size(head_bytes)
            .max_headers(self.max_headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.http2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(head_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(self.http2_keep_alive_interval)
            .keep_alive_timeout(self.http2_keep_alive_timeout);
        builder
    }
}

impl Default for Limits {
    /// [`Limits::DEFAULT`].
    fn default() -> Self {
        Self::DEFAULT
    }
}
