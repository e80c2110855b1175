//! A request body that is read on, for a while, after the upstream stopped reading it.
//!
//! A service that answers before the upload's end (a `413`) stops reading, and the
//! client forwarding the request then drops the rest of the body. The server the request
//! came in on would close the client's connection with its upload unread, and the kernel
//! answers a close with unread input by a reset, which many clients (hyper's among them)
//! report instead of the answer they were given. [`Lingering`] reads what is left, up to
//! [`LINGER_BYTES`] and for at most [`LINGER_TIME`], once the body is dropped unfinished,
//! so the client can finish sending and read its answer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::{BoxError, ProxyBody};

/// How long a body dropped unfinished is read on.
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much of a body dropped unfinished is read (and dropped): what a client at
/// 100 Mbit/s sends in about a second. No more than the client could send anyway.
pub(crate) const LINGER_BYTES: u64 = 16 * 1024 * 1024;

/// A request body read on after it is dropped unfinished; see the [module docs](self).
pub(super) struct Lingering {
    inner: Option<ProxyBody>,
}

impl Lingering {
    pub(super) fn new(inner: ProxyBody) -> Self {
        Self { inner: Some(inner) }
    }
}

impl Body for Lingering {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
        let Some(mut rest) = self.inner.take() else {
            return;
        };
        if rest.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let mut read = 0u64;
            let _ = tokio::time::timeout(LINGER_TIME, async {
                while read < LINGER_BYTES {
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
        let chunks = usize::try_from(2 * LINGER_BYTES / (64 * 1024)).expect("a count");
        let mut body = Lingering::new(counted(chunks, Arc::clone(&taken)));
        let _first = body.frame().await;
        drop(body);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // One frame before the drop, then up to the limit (a frame may cross it).
        let read = taken.load(Ordering::SeqCst);
        assert!(
            (LINGER_BYTES..=LINGER_BYTES + 2 * 64 * 1024).contains(&read),
            "{read}"
        );
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_leaves_nothing_behind() {
        let taken = Arc::new(AtomicU64::new(0));
        let mut body = Lingering::new(counted(2, Arc::clone(&taken)));
        while body.frame().await.is_some() {}
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(taken.load(Ordering::SeqCst), 2 * 64 * 1024);
    }
}
