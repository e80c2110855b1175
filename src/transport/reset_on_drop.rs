//! A send half that ends as *failed* when its writer abandons it.
//!
//! quinn finishes a `SendStream` that is dropped unfinished, and TCP sends a FIN for a
//! socket closed mid-transfer: either way the peer reads a clean end. That is right for a
//! writer that is done and simply lets go of the stream, but not for one that went away
//! mid-transfer: a task aborted at shutdown, a route that panicked, streams stopped when
//! a drain timed out. A clean end would pass the truncated transfer off as complete, and a
//! body without a length (a raw TCP tunnel, a close-delimited HTTP/1 response) cannot
//! tell. This wrapper resets the stream in those cases instead, so the peer's read fails
//! with [`ABANDONED_STREAM`](crate::stream::ABANDONED_STREAM).
//!
//! Resetting on *every* unfinished drop would be simpler, and wrong in its own way: a
//! reset discards what is still unsent, so a route that writes a reply and returns
//! without `shutdown()` would lose the reply, and one that answers by dropping the stream
//! would lose the stream's `StreamBind` header too (the opener would wait out its bind
//! timeout).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;

use super::SendStream;
use crate::stream::ABANDONED_STREAM;

/// When a send half dropped unfinished counts as abandoned, beyond a drop during a panic
/// (which always does).
#[derive(Debug, Clone)]
pub(crate) enum Abandoned {
    /// Only when dropped while its thread panics.
    OnPanic,
    /// Whenever dropped unfinished: the owner only lets go of it by failing or being
    /// aborted (a splice).
    Always,
    /// Once `stop` was cancelled: whoever serves the stream stopped it (a drain timed out,
    /// the serving loop was dropped).
    Stopped(CancellationToken),
}

/// `S`, reset with [`ABANDONED_STREAM`] if dropped unfinished while [`Abandoned`] says so.
#[derive(Debug)]
pub(crate) struct ResetOnDrop<S: SendStream> {
    /// Always `Some` until [`ResetOnDrop::into_inner`] takes it.
    stream: Option<S>,
    /// The stream was finished or reset, or shutting it down failed: nothing to abandon.
    ended: bool,
    abandoned: Abandoned,
}

impl<S: SendStream> ResetOnDrop<S> {
    pub(crate) const fn new(stream: S, abandoned: Abandoned) -> Self {
        Self {
            stream: Some(stream),
            ended: false,
            abandoned,
        }
    }

    pub(crate) fn set_abandoned(&mut self, abandoned: Abandoned) {
        self.abandoned = abandoned;
    }

    /// The bare stream, which keeps its transport's own drop behaviour.
    pub(crate) fn into_inner(mut self) -> S {
        self.ended = true;
        self.stream.take().expect("the stream is only taken here")
    }

    fn stream(&mut self) -> &mut S {
        self.stream
            .as_mut()
            .expect("the stream is only taken by into_inner")
    }

    pub(crate) fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }

    fn is_abandoned(&self) -> bool {
        std::thread::panicking()
            || match &self.abandoned {
                Abandoned::OnPanic => false,
                Abandoned::Always => true,
                Abandoned::Stopped(stop) => stop.is_cancelled(),
            }
    }
}

impl<S: SendStream> Drop for ResetOnDrop<S> {
    fn drop(&mut self) {
        if self.ended || !self.is_abandoned() {
            return;
        }
        if let Some(stream) = self.stream.as_mut() {
            stream.reset(ABANDONED_STREAM);
        }
    }
}

impl<S: SendStream> AsyncWrite for ResetOnDrop<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().stream()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().stream()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        ResetOnDrop::is_write_vectored(self)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let shut = Pin::new(this.stream()).poll_shutdown(cx);
        // Finished, or it could not be (the peer stopped it, or it was reset): either way
        // a reset on drop would have nothing left to say.
        this.ended |= shut.is_ready();
        shut
    }
}

impl<S: SendStream> SendStream for ResetOnDrop<S> {
    type FinishError = S::FinishError;

    async fn finish(&mut self) -> Result<(), S::FinishError> {
        let finished = self.stream().finish().await;
        self.ended = true;
        finished
    }

    fn reset(&mut self, code: u32) {
        self.ended = true;
        self.stream().reset(code);
    }

    fn prioritize(&mut self) {
        self.stream().prioritize();
    }

    async fn delivered(&mut self) {
        self.stream().delivered().await;
    }

    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + use<S> {
        let stopped = self.stream.as_ref().map(SendStream::stopped);
        async move {
            match stopped {
                Some(stopped) => stopped.await,
                None => std::future::pending().await,
            }
        }
    }
}

#[cfg(all(test, feature = "quinn", feature = "self-signed"))]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::quic::test_pair::test_pair;
    use crate::stream::reset_code;
    use crate::transport::{Connection, QuinnSendStream};

    /// Writes `hello` through a guard set to `abandoned` on a stream of a real quinn
    /// connection, ends it with `end`, and returns what the peer reads: the bytes, or the
    /// read's error.
    async fn read_after(
        abandoned: Abandoned,
        end: impl FnOnce(ResetOnDrop<QuinnSendStream>),
    ) -> io::Result<Vec<u8>> {
        let pair = test_pair().await;
        let (a, b) = (&pair.dialer, &pair.acceptor);
        let (send, _recv) = a.open_bi().await.unwrap();
        let mut send = ResetOnDrop::new(send, abandoned);
        send.write_all(b"hello").await.unwrap();
        end(send);
        let (_send, mut recv) = b.accept_bi().await.unwrap().unwrap();
        let mut got = Vec::new();
        recv.read_to_end(&mut got).await.map(|_| got)
    }

    #[tokio::test]
    async fn a_shut_down_stream_ends_cleanly_even_when_always_abandoned_on_drop() {
        let got = read_after(Abandoned::Always, |mut send| {
            let shut = Pin::new(&mut send)
                .poll_shutdown(&mut Context::from_waker(std::task::Waker::noop()));
            assert!(
                matches!(shut, Poll::Ready(Ok(()))),
                "quinn shuts down at once"
            );
        })
        .await;
        assert_eq!(got.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn a_stream_dropped_unfinished_is_finished_unless_abandoned() {
        let got = read_after(Abandoned::OnPanic, drop).await;
        assert_eq!(got.unwrap(), b"hello");
        let running = CancellationToken::new();
        let got = read_after(Abandoned::Stopped(running.clone()), drop).await;
        assert_eq!(got.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn an_abandoned_stream_is_reset_with_the_abandoned_code() {
        let error = read_after(Abandoned::Always, drop).await.unwrap_err();
        assert_eq!(reset_code(&error), Some(ABANDONED_STREAM), "{error}");
        let stopped = CancellationToken::new();
        stopped.cancel();
        let error = read_after(Abandoned::Stopped(stopped), drop)
            .await
            .unwrap_err();
        assert_eq!(reset_code(&error), Some(ABANDONED_STREAM), "{error}");
    }

    #[tokio::test]
    async fn a_stream_dropped_during_a_panic_is_reset() {
        let error = read_after(Abandoned::OnPanic, |send| {
            let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _held = send;
                panic!("mid-transfer");
            }));
            assert!(unwound.is_err());
        })
        .await
        .unwrap_err();
        assert_eq!(reset_code(&error), Some(ABANDONED_STREAM), "{error}");
    }

    #[tokio::test]
    async fn an_explicit_reset_keeps_its_own_code() {
        let error = read_after(Abandoned::Always, |mut send| send.reset(7))
            .await
            .unwrap_err();
        assert_eq!(reset_code(&error), Some(7), "{error}");
    }

    #[tokio::test]
    async fn the_bare_stream_keeps_the_transport_s_own_drop() {
        // quinn finishes a stream dropped unfinished.
        let got = read_after(Abandoned::Always, |send| drop(send.into_inner())).await;
        assert_eq!(got.unwrap(), b"hello");
    }
}
