//! An idle limit on upstream response bodies.
//!
//! A response head can arrive promptly and its body then stall forever (a wedged backend,
//! an edge that went quiet). Without a limit the downstream connection is held open as
//! long; with one, the body *fails*, which makes hyper abort the downstream connection
//! (HTTP/1.1 closes it mid-body, HTTP/2 resets the stream) so that no client takes a
//! truncated body for a complete one. The clock runs only while the downstream is waiting
//! for a frame: a slow reader does not count against the upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::BoxError;

/// Called once when an upstream body goes idle too long, with the limit (to log, count).
pub type IdleHook = Arc<dyn Fn(Duration) + Send + Sync>;

/// The error an [`IdleTimeoutBody`] fails with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the upstream sent nothing for {idle:?} mid-body")]
pub struct BodyIdleTimeout {
    /// The limit that passed.
    pub idle: Duration,
}

/// A body that fails with [`BodyIdleTimeout`] if its inner body yields no frame within
/// `idle` of being asked for one.
///
/// Failing (rather than ending) matters: hyper then aborts the downstream connection
/// (HTTP/1.1 closes it mid-body, HTTP/2 resets the stream), so no client takes a
/// truncated body for a complete one. The clock runs only while the downstream waits for
/// a frame: a slow reader does not count against the upstream.
///
/// ```
/// use std::time::Duration;
/// use backhaul::http::proxy::{BodyIdleTimeout, IdleTimeoutBody};
/// use http_body_util::{BodyExt, StreamBody};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // A body that never sends anything.
/// let stalled = StreamBody::new(futures_util::stream::pending::<
///     Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
/// >());
/// let mut body = IdleTimeoutBody::new(stalled, Duration::from_millis(10));
/// let error = body.frame().await.expect("an error, not the end").unwrap_err();
/// assert!(error.downcast_ref::<BodyIdleTimeout>().is_some());
/// # }
/// ```
pub struct IdleTimeoutBody<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// Whether the timer is armed for the frame being waited for.
    waiting: bool,
    timed_out: bool,
    on_idle: Option<IdleHook>,
}

impl<B> IdleTimeoutBody<B> {
    /// Wraps `inner` with an idle limit.
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
            timed_out: false,
            on_idle: None,
        }
    }

    /// Calls `hook` when the limit passes.
    #[must_use]
    pub fn on_idle(mut self, hook: Option<IdleHook>) -> Self {
        self.on_idle = hook;
        self
    }
}

impl<B> std::fmt::Debug for IdleTimeoutBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleTimeoutBody")
            .field("idle", &self.idle)
            .field("timed_out", &self.timed_out)
            .finish_non_exhaustive()
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(None);
        }
        if !this.waiting {
            let deadline = tokio::time::Instant::now() + this.idle;
            this.timer.as_mut().reset(deadline);
            this.waiting = true;
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            this.timed_out = true;
            if let Some(hook) = &this.on_idle {
                hook(this.idle);
            }
            return Poll::Ready(Some(Err(Box::new(BodyIdleTimeout { idle: this.idle }))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    use super::*;

    /// A body fed by the test, frame by frame.
    struct FedBody(mpsc::Receiver<Bytes>);

    impl Body for FedBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|data| Ok(Frame::data(data))))
        }
    }

    fn idle_body(
        idle: Duration,
    ) -> (
        mpsc::Sender<Bytes>,
        IdleTimeoutBody<FedBody>,
        Arc<AtomicUsize>,
    ) {
        let (feed, frames) = mpsc::channel(16);
        let fired = Arc::new(AtomicUsize::new(0));
        let hook: IdleHook = {
            let fired = Arc::clone(&fired);
            Arc::new(move |_| {
                fired.fetch_add(1, Ordering::SeqCst);
            })
        };
        let body = IdleTimeoutBody::new(FedBody(frames), idle).on_idle(Some(hook));
        (feed, body, fired)
    }

    #[tokio::test]
    async fn a_stalled_body_fails_after_the_idle_limit() {
        let idle = Duration::from_millis(200);
        let (feed, mut body, fired) = idle_body(idle);
        feed.send(Bytes::from_static(b"half")).await.expect("fed");
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "half");
        let started = std::time::Instant::now();
        let error = body
            .frame()
            .await
            .expect("an error, not the end")
            .expect_err("an idle error");
        assert_eq!(
            error.downcast_ref::<BodyIdleTimeout>(),
            Some(&BodyIdleTimeout { idle })
        );
        assert!(started.elapsed() >= idle);
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
        drop(feed);
    }

    #[tokio::test]
    async fn a_body_that_keeps_sending_or_a_slow_reader_is_not_cut() {
        let idle = Duration::from_secs(1);
        let (feed, mut body, fired) = idle_body(idle);
        tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = feed.send(Bytes::from_static(b"tick")).await;
            }
        });
        let mut ticks = 0;
        while let Some(frame) = body.frame().await {
            frame.expect("no idle error");
            ticks += 1;
            // The reader is slower than the idle limit: not the upstream's fault.
            if ticks == 2 {
                tokio::time::sleep(idle * 3).await;
            }
        }
        assert_eq!(ticks, 6);
        assert_eq!(fired.load(Ordering::SeqCst), 0);
    }
}
