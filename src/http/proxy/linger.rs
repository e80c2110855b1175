//! A request body that is read on, for a while, after the upstream stopped reading it.
//!
//! A service that answers before the upload's end (a `413`) stops reading, and the
//! client forwarding the request then drops the rest of the body. The server the request
//! came in on would close the client's connection with its upload unread, and the kernel
//! answers a close with unread input by a reset, which many clients (hyper's among them)
//! report instead of the answer they were given. [`Lingering`] reads what is left, within
//! the bounds of a [`Linger`], once the body is dropped unfinished, so the client can
//! finish sending and read its answer. The relay's express lane reads on the same way.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::{BoxError, ProxyBody};

/// How much of an upload the proxy reads on (and drops) after the upstream answered before
/// its end, and for how long: a client still sending then reads its answer instead of a
/// reset. Both bounds hold; the first reached ends the reading and closes the connection.
///
/// The defaults, 2 s and 16 MiB (what a client at 100 Mbit/s sends in about a second),
/// bound what a hostile client makes the proxy read to what it could send in a new
/// request anyway. [`Linger::NONE`] closes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linger {
    /// How long the rest is read, at most (default 2 s).
    pub time: Duration,
    /// How many bytes of the rest are read, at most (default 16 MiB).
    pub bytes: u64,
}

impl Linger {
    /// Reads nothing on: the connection closes as soon as the answer is written.
    pub const NONE: Self = Self {
        time: Duration::ZERO,
        bytes: 0,
    };

    /// The defaults: 2 s, 16 MiB.
    pub const DEFAULT: Self = Self {
        time: Duration::from_secs(2),
        bytes: 16 * 1024 * 1024,
    };

    /// True if nothing is read on (either bound is zero).
    #[must_use]
    pub const fn reads_nothing(&self) -> bool {
        self.time.is_zero() || self.bytes == 0
    }
}

impl Default for Linger {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A request body read on after it is dropped unfinished; see the [module docs](self).
///
/// It is also cut (dropped, so read on within its bounds, and failed toward the upstream)
/// once the upstream's answer has ended: an HTTP/1 service that answered in full before
/// the upload's end does not want the rest, and would otherwise be sent it for as long as
/// it reads on itself (an edge lingering with bounds of its own).
pub(super) struct Lingering {
    inner: Option<ProxyBody>,
    bounds: Linger,
    answered: Arc<Answered>,
}

impl Lingering {
    pub(super) fn new(inner: ProxyBody, bounds: Linger, answered: Arc<Answered>) -> Self {
        Self {
            inner: Some(inner),
            bounds,
            answered,
        }
    }
}

/// Set once the upstream's answer to a [`Lingering`] request has ended.
#[derive(Debug, Default)]
pub(super) struct Answered {
    ended: AtomicBool,
    /// The request body's task, waiting for the client's next bytes.
    waiting: Mutex<Option<Waker>>,
}

impl Answered {
    fn end(&self) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            let waiting = self
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(waker) = waiting {
                waker.wake();
            }
        }
    }

    /// True once ended; otherwise `cx` is woken when it is.
    fn poll_ended(&self, cx: &Context<'_>) -> bool {
        if self.ended.load(Ordering::Acquire) {
            return true;
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        match waiting.as_ref() {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => *waiting = Some(cx.waker().clone()),
        }
        drop(waiting);
        self.ended.load(Ordering::Acquire)
    }
}

/// A response body that tells its request's [`Lingering`] body when it has ended.
pub(super) struct EndsUpload {
    inner: ProxyBody,
    answered: Option<Arc<Answered>>,
}

impl EndsUpload {
    pub(super) fn new(inner: ProxyBody, answered: Arc<Answered>) -> Self {
        Self {
            inner,
            answered: Some(answered),
        }
    }
}

impl Body for EndsUpload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            if let Some(answered) = self.answered.take() {
                answered.end();
            }
        }
        polled
    }

    // hyper's server asks this instead of polling a body whose length it knows to its end.
    fn is_end_stream(&self) -> bool {
        let ended = self.inner.is_end_stream();
        if ended {
            if let Some(answered) = &self.answered {
                answered.end();
            }
        }
        ended
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Body for Lingering {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.inner.is_none() {
            return Poll::Ready(None);
        }
        if self.answered.poll_ended(cx) {
            // Dropped here, the rest is read on within the bounds; the upstream's
            // connection, left mid-body, is closed by the failure.
            self.linger();
            return Poll::Ready(Some(Err(
                "the upstream answered before the body's end".into()
            )));
        }
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // Ended (or failed): nothing left to read on.
            self.inner = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        self.linger();
    }
}

impl Lingering {
    /// Reads what is left of the body on a task of its own, within the bounds.
    fn linger(&mut self) {
        let Some(mut rest) = self.inner.take() else {
            return;
        };
        if rest.is_end_stream() || self.bounds.reads_nothing() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let bounds = self.bounds;
        runtime.spawn(async move {
            let mut read = 0u64;
            let _ = tokio::time::timeout(bounds.time, async {
                while read < bounds.bytes {
                    match rest.frame().await {
                        Some(Ok(frame)) => {
                            read += frame.data_ref().map_or(0, |data| data.len() as u64);
                        }
                        _ => return,
                    }
                }
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::proxy::boxed;
    use http_body_util::StreamBody;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A body of `chunks` 64 KiB frames that counts what was taken from it.
    fn counted(chunks: usize, taken: Arc<AtomicU64>) -> ProxyBody {
        let frames = futures_util::stream::iter((0..chunks).map(move |_| {
            taken.fetch_add(64 * 1024, Ordering::SeqCst);
            Ok::<_, BoxError>(Frame::data(Bytes::from(vec![0u8; 64 * 1024])))
        }));
        boxed(StreamBody::new(frames))
    }

    #[tokio::test]
    async fn a_body_dropped_unfinished_is_read_on_up_to_the_limit() {
        let taken = Arc::new(AtomicU64::new(0));
        let bytes = Linger::DEFAULT.bytes;
        let chunks = usize::try_from(2 * bytes / (64 * 1024)).expect("a count");
        let mut body = Lingering::new(
            counted(chunks, Arc::clone(&taken)),
            Linger::DEFAULT,
            Arc::default(),
        );
        let _first = body.frame().await;
        drop(body);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // One frame before the drop, then up to the limit (a frame may cross it).
        let read = taken.load(Ordering::SeqCst);
        assert!((bytes..=bytes + 2 * 64 * 1024).contains(&read), "{read}");
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_leaves_nothing_behind() {
        let taken = Arc::new(AtomicU64::new(0));
        let mut body = Lingering::new(
            counted(2, Arc::clone(&taken)),
            Linger::DEFAULT,
            Arc::default(),
        );
        while body.frame().await.is_some() {}
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(taken.load(Ordering::SeqCst), 2 * 64 * 1024);
    }

    #[tokio::test]
    async fn smaller_bounds_read_less_and_none_reads_nothing() {
        let small = Linger {
            time: Duration::from_secs(2),
            bytes: 256 * 1024,
        };
        for (bounds, most) in [
            (small, 256 * 1024 + 2 * 64 * 1024),
            (Linger::NONE, 64 * 1024),
        ] {
            let taken = Arc::new(AtomicU64::new(0));
            let mut body = Lingering::new(counted(64, Arc::clone(&taken)), bounds, Arc::default());
            let _first = body.frame().await;
            drop(body);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let read = taken.load(Ordering::SeqCst);
            assert!(read <= most, "{bounds:?}: {read}");
        }
    }

    #[tokio::test]
    async fn the_end_of_the_answer_cuts_the_upload_and_reads_it_on() {
        let taken = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(Answered::default());
        let mut upload = Lingering::new(
            counted(64, Arc::clone(&taken)),
            Linger {
                time: Duration::from_secs(2),
                bytes: 256 * 1024,
            },
            Arc::clone(&answered),
        );
        let _first = upload.frame().await;
        let mut answer = EndsUpload::new(
            boxed(http_body_util::Full::new(Bytes::from("no"))),
            answered,
        );
        while answer.frame().await.is_some() {}
        // The upstream is failed (its connection is mid-body)…
        let cut = upload.frame().await;
        assert!(matches!(cut, Some(Err(_))), "{cut:?}");
        assert!(upload.frame().await.is_none());
        // …and the rest is read on, within the bounds.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let read = taken.load(Ordering::SeqCst);
        assert!(
            (256 * 1024..=256 * 1024 + 3 * 64 * 1024).contains(&read),
            "{read}"
        );
    }

    #[tokio::test]
    async fn a_waiting_upload_is_woken_when_the_answer_ends() {
        let answered = Arc::new(Answered::default());
        let pending = boxed(http_body_util::StreamBody::new(
            futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>(),
        ));
        let mut upload = Lingering::new(pending, Linger::DEFAULT, Arc::clone(&answered));
        let waiting = tokio::spawn(async move { upload.frame().await.map(|frame| frame.is_err()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        answered.end();
        let cut = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("the task");
        assert_eq!(cut, Some(true));
    }
}
