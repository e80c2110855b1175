//! A socket that fails reads and writes with a [`Cut`] once its connection overstays.
//!
//! Timeouts live on the socket rather than around hyper's connection future because only
//! the socket sees the stage a connection is in: a pending read with no request in flight
//! is a client that owes us a head (or is idle between requests), and a pending write is
//! a client that stopped reading. Failing the I/O lets hyper end the connection its usual
//! way, and the [`Activity`] remembers why.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::activity::Activity;
use super::Limits;

/// Why the server cut a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cut {
    /// No complete request head within [`Limits::header_timeout`] (slowloris, or a client
    /// that connected and sent nothing).
    Header,
    /// Idle between requests for longer than [`Limits::idle_timeout`].
    Idle,
    /// A write made no progress for [`Limits::write_timeout`]: the client stopped reading.
    Write,
}

impl Cut {
    /// A short name for metrics labels: `header_timeout`, `idle_timeout`, `write_timeout`.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Header => "header_timeout",
            Self::Idle => "idle_timeout",
            Self::Write => "write_timeout",
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Header => "no complete request head within the header timeout",
            Self::Idle => "idle longer than the idle timeout",
            Self::Write => "the client stopped reading for longer than the write timeout",
        })
    }
}

impl std::error::Error for Cut {}

/// A TCP stream held to its connection's deadlines; see the [module docs](self).
pub(super) struct WatchedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
    limits: Limits,
    read_timer: Pin<Box<Sleep>>,
    read_timer_at: Option<Instant>,
    write_timer: Pin<Box<Sleep>>,
    write_stalled_since: Option<Instant>,
    /// Set once the connection was shut down (hyper does so when a connection ends
    /// cleanly); one dropped without it is reset.
    shut_down: bool,
}

impl WatchedIo {
    pub(super) fn new(inner: TcpStream, activity: Arc<Activity>, limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            inner,
            activity,
            limits,
            read_timer: Box::pin(tokio::time::sleep_until(now)),
            read_timer_at: None,
            write_timer: Box::pin(tokio::time::sleep_until(now)),
            write_stalled_since: None,
            shut_down: false,
        }
    }

    /// Ends an overstaying connection with a reset rather than a graceful close: nothing
    /// queued for it is worth delivering (a client that stopped reading would otherwise
    /// keep megabytes of socket buffer in the kernel for minutes), as nginx's
    /// `reset_timedout_connection` does.
    fn cut(&self, reason: Cut) -> io::Error {
        let _ = socket2::SockRef::from(&self.inner).set_linger(Some(Duration::ZERO));
        self.activity.record_cut(reason);
        io::Error::new(io::ErrorKind::TimedOut, reason)
    }

    /// Called when a read is pending: fails it once the stage's deadline passed.
    fn poll_read_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some((deadline, reason)) = self.activity.read_deadline(&self.limits, cx.waker()) else {
            // No deadline while a request runs; the timer stays armed for the next one.
            return Poll::Pending;
        };
        // Between requests the deadline moves later every time, and moving a timer locks
        // the runtime's timer wheel: a timer armed for earlier stays, and when it fires
        // early it is moved to the real deadline then, at most once per timeout.
        if self.read_timer_at.is_none_or(|armed| armed > deadline) {
            self.read_timer.as_mut().reset(deadline);
            self.read_timer_at = Some(deadline);
        }
        loop {
            match self.read_timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if Instant::now() >= deadline => {
                    return Poll::Ready(self.cut(reason));
                }
                Poll::Ready(()) => {
                    self.read_timer.as_mut().reset(deadline);
                    self.read_timer_at = Some(deadline);
                }
            }
        }
    }

    /// Tracks write progress: fails the write once it made none for the write timeout.
    /// Only bytes accepted count as progress (a flush that completes at once does not).
    fn on_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
        progressed: impl FnOnce(&R) -> bool,
    ) -> Poll<io::Result<R>> {
        match &result {
            Poll::Ready(Ok(value)) if progressed(value) => {
                self.write_stalled_since = None;
                return result;
            }
            Poll::Ready(_) => return result,
            Poll::Pending => {}
        }
        if self.write_stalled_since.is_none() {
            let now = Instant::now();
            self.write_stalled_since = Some(now);
            self.write_timer
                .as_mut()
                .reset(now + self.limits.write_timeout);
        }
        match self.write_timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(self.cut(Cut::Write))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.bytes_read();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => this.poll_read_deadline(cx).map(Err),
        }
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.on_write(cx, result, |written| *written > 0)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.on_write(cx, result, |written| *written > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.on_write(cx, result, |()| false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shut_down = true;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl Drop for WatchedIo {
    /// A connection dropped before it was shut down was cut: a response or an upgraded
    /// connection failed half way, or the server stopped waiting for it. A reset tells
    /// the client so, where a FIN would let a response without a length (HTTP/1.0, a
    /// WebSocket) pass for complete.
    fn drop(&mut self) {
        if !self.shut_down {
            let _ = socket2::SockRef::from(&self.inner).set_linger(Some(Duration::ZERO));
        }
    }
}
