//! Raw HTTP/1 over TCP, for requests a well-behaved client cannot send (two Host headers,
//! none, odd request targets) and backends that misbehave on purpose (stalling mid-body).
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What came back on a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    /// The status line's code (0 if nothing parseable came back).
    pub status: u16,
    /// The head: status line and header lines.
    pub head: String,
    pub body: Vec<u8>,
    /// How the connection ended.
    pub ended: Ended,
    pub elapsed: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The server closed it (EOF).
    Closed,
    /// A read failed (e.g. reset).
    Error,
    /// Still open when the read limit passed.
    StillOpen,
}

impl RawResponse {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }

    /// The Content-Length the head announced.
    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.parse().ok()
    }
}

/// Sends `request` (bytes as they go on the wire) and reads until the server closes the
/// connection or `limit` passes. Send `Connection: close` to get a prompt end.
pub async fn exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> RawResponse {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.expect("connecting");
    tcp.write_all(request).await.expect("sending the request");
    let mut received = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let ended = loop {
        let remaining = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, tcp.read(&mut buffer)).await {
            Err(_) => break Ended::StillOpen,
            Ok(Ok(0)) => break Ended::Closed,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Ok(Err(_)) => break Ended::Error,
        }
    };
    let split = received
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map_or(received.len(), |at| at + 4);
    let head = String::from_utf8_lossy(&received[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    RawResponse {
        status,
        head,
        body: received[split..].to_vec(),
        ended,
        elapsed: started.elapsed(),
    }
}

/// A GET with the given extra header lines (each without CRLF) and `Connection: close`.
pub fn get_request(target: &str, version: &str, headers: &[&str]) -> Vec<u8> {
    let mut request = format!("GET {target} {version}\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    request.into_bytes()
}

/// A TCP server whose every connection is handled by `handler`; stops on drop.
pub struct RawBackend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = backhaul::listener::bind("127.0.0.1:0".parse().unwrap())
            .expect("binding a raw backend");
        let addr = listener.local_addr().expect("raw backend address");
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                connections.spawn(handler(tcp));
            }
        });
        Self { addr, task }
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads a request head (through the blank line); `false` if the peer went away first.
pub async fn read_request_head(tcp: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    true
}
