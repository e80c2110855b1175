//! The quinn transport.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Connection, RecvStream, SendStream};

/// A [`quinn::Connection`] as a session transport. Cheap to clone: clones share the
/// connection.
#[derive(Debug, Clone)]
pub struct QuinnConnection {
    inner: quinn::Connection,
}

impl QuinnConnection {
    /// Wraps a connection.
    #[must_use]
    pub const fn new(connection: quinn::Connection) -> Self {
        Self { inner: connection }
    }

    /// The quinn connection (for RTT, stats, addresses…).
    #[must_use]
    pub const fn inner(&self) -> &quinn::Connection {
        &self.inner
    }

    /// Unwraps the quinn connection.
    #[must_use]
    pub fn into_inner(self) -> quinn::Connection {
        self.inner
    }
}

impl From<quinn::Connection> for QuinnConnection {
    fn from(connection: quinn::Connection) -> Self {
        Self::new(connection)
    }
}

impl Connection for QuinnConnection {
    type SendStream = QuinnSendStream;
    type RecvStream = QuinnRecvStream;
    type OpenError = quinn::ConnectionError;
    type AcceptError = quinn::ConnectionError;

    async fn open_bi(&self) -> Result<(QuinnSendStream, QuinnRecvStream), quinn::ConnectionError> {
        let (send, recv) = self.inner.open_bi().await?;
        Ok((
            QuinnSendStream { inner: send },
            QuinnRecvStream { inner: recv },
        ))
    }

    async fn accept_bi(
        &self,
    ) -> Result<Option<(QuinnSendStream, QuinnRecvStream)>, quinn::ConnectionError> {
        match self.inner.accept_bi().await {
            Ok((send, recv)) => Ok(Some((
                QuinnSendStream { inner: send },
                QuinnRecvStream { inner: recv },
            ))),
            Err(
                quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::LocallyClosed,
            ) => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn close(&self, code: u32, reason: &[u8]) {
        self.inner.close(quinn::VarInt::from_u32(code), reason);
    }

    fn is_open(&self) -> bool {
        self.inner.close_reason().is_none()
    }
}

/// The sending half of a quinn stream.
#[derive(Debug)]
pub struct QuinnSendStream {
    inner: quinn::SendStream,
}

impl QuinnSendStream {
    /// Wraps a quinn stream.
    #[must_use]
    pub const fn new(stream: quinn::SendStream) -> Self {
        Self { inner: stream }
    }

    /// The quinn stream.
    #[must_use]
    pub const fn inner(&self) -> &quinn::SendStream {
        &self.inner
    }

    /// The quinn stream, mutably (for priority, `stopped()`…).
    pub fn inner_mut(&mut self) -> &mut quinn::SendStream {
        &mut self.inner
    }
}

impl AsyncWrite for QuinnSendStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.inner), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.inner), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.inner), cx)
    }
}

/// quinn sends higher priorities first; data streams keep the default 0.
const CONTROL_PRIORITY: i32 = 1;

impl SendStream for QuinnSendStream {
    type FinishError = quinn::ClosedStream;

    async fn finish(&mut self) -> Result<(), quinn::ClosedStream> {
        self.inner.finish()
    }

    async fn delivered(&mut self) {
        // `stopped` resolves once every byte of the finished stream was acknowledged (or the
        // peer stopped it); either way nothing more is waiting to be sent.
        let _ = self.inner.stopped().await;
    }

    fn prioritize(&mut self) {
        // Fails only on a stream that is already closed, which has nothing left to send.
        let _ = self.inner.set_priority(CONTROL_PRIORITY);
    }

    fn reset(&mut self, code: u32) {
        // Resetting an already finished or reset stream is harmless: nothing is left to drop.
        let _ = self.inner.reset(quinn::VarInt::from_u32(code));
    }
}

/// The receiving half of a quinn stream.
#[derive(Debug)]
pub struct QuinnRecvStream {
    inner: quinn::RecvStream,
}

impl QuinnRecvStream {
    /// Wraps a quinn stream.
    #[must_use]
    pub const fn new(stream: quinn::RecvStream) -> Self {
        Self { inner: stream }
    }

    /// The quinn stream.
    #[must_use]
    pub const fn inner(&self) -> &quinn::RecvStream {
        &self.inner
    }

    /// The quinn stream, mutably.
    pub fn inner_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.inner
    }
}

impl AsyncRead for QuinnRecvStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.inner), cx, buf)
    }
}

impl RecvStream for QuinnRecvStream {
    fn stop(&mut self, code: u32) {
        // Stopping a stream that already ended is harmless.
        let _ = self.inner.stop(quinn::VarInt::from_u32(code));
    }
}
