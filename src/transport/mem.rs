//! An in-memory connection pair, for unit tests of protocol and session logic.
//!
//! Each stream is a pair of [`tokio::io::duplex`] pipes. Resets cannot be carried through a
//! pipe, so a reset here simply ends the stream; tests of reset and loss semantics belong
//! on the quinn transport.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Mutex, Notify};

use super::{Connection, RecvStream, SendStream};

const PIPE_CAPACITY: usize = 64 * 1024;

type StreamPair = (MemorySendStream, MemoryRecvStream);

/// Both ends of a new in-memory connection.
#[must_use]
pub fn memory_connection_pair() -> (MemoryConnection, MemoryConnection) {
    let closed = Arc::new(Closed::default());
    let (to_b, from_a) = mpsc::unbounded_channel();
    let (to_a, from_b) = mpsc::unbounded_channel();
    let a = MemoryConnection {
        outgoing: to_b,
        incoming: Arc::new(Mutex::new(from_b)),
        closed: closed.clone(),
    };
    let b = MemoryConnection {
        outgoing: to_a,
        incoming: Arc::new(Mutex::new(from_a)),
        closed,
    };
    (a, b)
}

#[derive(Default)]
struct Closed {
    flag: AtomicBool,
    notify: Notify,
}

/// One end of an in-memory connection. Clones share the end.
#[derive(Clone)]
pub struct MemoryConnection {
    outgoing: mpsc::UnboundedSender<StreamPair>,
    incoming: Arc<Mutex<mpsc::UnboundedReceiver<StreamPair>>>,
    closed: Arc<Closed>,
}

impl std::fmt::Debug for MemoryConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryConnection")
            .field("open", &self.is_open())
            .finish()
    }
}

/// The in-memory connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("in-memory connection closed")]
pub struct MemoryClosed;

impl Connection for MemoryConnection {
    type SendStream = MemorySendStream;
    type RecvStream = MemoryRecvStream;
    type OpenError = MemoryClosed;
    type AcceptError = MemoryClosed;

    async fn open_bi(&self) -> Result<StreamPair, MemoryClosed> {
        if !self.is_open() {
            return Err(MemoryClosed);
        }
        let (local, remote) = tokio::io::duplex(PIPE_CAPACITY);
        let (local_read, local_write) = tokio::io::split(local);
        let (remote_read, remote_write) = tokio::io::split(remote);
        self.outgoing
            .send((
                MemorySendStream(remote_write),
                MemoryRecvStream(remote_read),
            ))
            .map_err(|_| MemoryClosed)?;
        Ok((MemorySendStream(local_write), MemoryRecvStream(local_read)))
    }

    async fn accept_bi(&self) -> Result<Option<StreamPair>, MemoryClosed> {
        let mut incoming = self.incoming.lock().await;
        let closed = self.closed.notify.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        if !self.is_open() {
            return Ok(None);
        }
        tokio::select! {
            pair = incoming.recv() => Ok(pair),
            () = closed => Ok(None),
        }
    }

    fn close(&self, _code: u32, _reason: &[u8]) {
        self.closed.flag.store(true, Ordering::SeqCst);
        self.closed.notify.notify_waiters();
    }

    fn is_open(&self) -> bool {
        !self.closed.flag.load(Ordering::SeqCst)
    }
}

/// The sending half of an in-memory stream.
#[derive(Debug)]
pub struct MemorySendStream(WriteHalf<DuplexStream>);

impl AsyncWrite for MemorySendStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl SendStream for MemorySendStream {
    type FinishError = io::Error;

    async fn finish(&mut self) -> io::Result<()> {
        tokio::io::AsyncWriteExt::shutdown(&mut self.0).await
    }

    fn reset(&mut self, _code: u32) {
        // A pipe has no reset; the stream ends when this half is dropped.
    }
}

/// The receiving half of an in-memory stream.
#[derive(Debug)]
pub struct MemoryRecvStream(ReadHalf<DuplexStream>);

impl AsyncRead for MemoryRecvStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl RecvStream for MemoryRecvStream {
    fn stop(&mut self, _code: u32) {}
}
