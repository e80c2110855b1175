//! A connection whose peer may answer before the request's end and stop reading.
//!
//! A service refusing an upload (`413` from a body limit, `401` before the body) often
//! answers at once and closes with the rest unread. The client's next write then fails
//! (`EPIPE`, a reset, a QUIC stream stopped), and hyper's HTTP/1 client reports that
//! failure instead of the answer already on its way. [`AnswerFirst`] takes such a
//! refusal as the end of the request: the writes that follow are dropped, reads go on, so
//! hyper reads the answer the service gave. If none comes, the read side fails as it
//! would have. A connection that was refused is never pooled again.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::status::ConnStatus;

/// `io` with writes refused by the peer dropped instead of failed; see the
/// [module docs](self).
pub(super) struct AnswerFirst<T> {
    io: T,
    status: ConnStatus,
}

impl<T> AnswerFirst<T> {
    pub(super) fn new(io: T) -> (Self, ConnStatus) {
        let status = ConnStatus::default();
        (
            Self {
                io,
                status: status.clone(),
            },
            status,
        )
    }
}

/// A write failure that says the peer stopped reading (it closed, reset, or stopped the
/// stream): its answer may still be readable.
fn is_refusal(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for AnswerFirst<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for AnswerFirst<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.status.refused() {
            return Poll::Ready(Ok(buf.len()));
        }
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Ready(Err(error)) if is_refusal(&error) => {
                self.status.set_refused();
                Poll::Ready(Ok(buf.len()))
            }
            polled => polled,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.status.refused() {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Err(error)) if is_refusal(&error) => {
                self.status.set_refused();
                Poll::Ready(Ok(()))
            }
            polled => polled,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.status.refused() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total = bufs.iter().map(|buf| buf.len()).sum();
        if self.status.refused() {
            return Poll::Ready(Ok(total));
        }
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Err(error)) if is_refusal(&error) => {
                self.status.set_refused();
                Poll::Ready(Ok(total))
            }
            polled => polled,
        }
    }
}
