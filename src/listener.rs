//! Public TCP listeners with a listen backlog sized for bursts.
//!
//! `tokio::net::TcpListener::bind` listens with a backlog of 128, as the standard library
//! does. A relay's public port meets bursts larger than that (a page opening dozens of
//! connections per visitor, a crowd arriving at once, a flood), and on Linux a full accept
//! queue makes the kernel answer with SYN cookies and drop handshakes it cannot finish:
//! clients that believed they were connected are then reset. `tests/tcp_tunnel.rs` saw it
//! with 500 connections at once (350–400 listen-queue overflows per run, and resets in
//! about one run in three). [`bind`] asks for [`DEFAULT_BACKLOG`] instead; the kernel
//! caps it at `net.core.somaxconn`.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// The listen backlog [`bind`] asks for: Linux's default `net.core.somaxconn` since 5.4,
/// and what a busy proxy is given.
pub const DEFAULT_BACKLOG: u32 = 4096;

/// Listens on `addr` with a backlog of [`DEFAULT_BACKLOG`] (and `SO_REUSEADDR`, as
/// `TcpListener::bind` sets it). Call it inside a tokio runtime.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let listener = backhaul::listener::bind("127.0.0.1:0".parse().unwrap())?;
/// assert!(listener.local_addr()?.port() > 0);
/// # Ok(()) }
/// ```
///
/// # Errors
/// If the socket cannot be made, bound or put to listen.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_with_backlog(addr, DEFAULT_BACKLOG)
}

/// As [`bind`], with the backlog given.
///
/// # Errors
/// If the socket cannot be made, bound or put to listen.
pub fn bind_with_backlog(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
