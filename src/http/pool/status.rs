//! What the parts of one pooled connection tell each other: whether its peer stopped
//! taking what was sent, and whether hyper still holds the body of the request on it.
//!
//! The second matters when an answer comes before the request's end (a `413` to an
//! upload the service will not read). hyper's HTTP/1 client never makes such a
//! connection ready again, even once the upload ends (hyperium/hyper#4176): kept in the
//! idle set, it would hold a pool slot and its stream (a tunnel stream, through backhaul)
//! until the idle timeout. So a response that ends while its request's body is still
//! hyper's does not give its connection back; the connection closes instead.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};

/// Shared by a connection's I/O, the body of the request it carries, its idle entry and
/// the response body that gives it back: one allocation per connection.
#[derive(Debug, Clone, Default)]
pub(super) struct ConnStatus(Arc<Flags>);

#[derive(Debug, Default)]
struct Flags {
    refused: AtomicBool,
    uploading: AtomicBool,
}

impl ConnStatus {
    /// The peer stopped taking what was sent (see [`AnswerFirst`](super::answer_first)).
    pub(super) fn refused(&self) -> bool {
        self.0.refused.load(Ordering::Acquire)
    }

    pub(super) fn set_refused(&self) {
        self.0.refused.store(true, Ordering::Release);
    }

    /// hyper still holds the body of the request sent last: it has not taken its end.
    pub(super) fn uploading(&self) -> bool {
        self.0.uploading.load(Ordering::Acquire)
    }

    fn set_uploading(&self, uploading: bool) {
        self.0.uploading.store(uploading, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// A request body that tells its connection when hyper no longer holds it: its end
    /// was taken, or hyper dropped it (written to its length, failed, or the connection
    /// gone).
    pub(super) struct UploadBody<B> {
        #[pin]
        inner: B,
        // None for a body ended from the start (a GET's): nothing to report, and no
        // atomic work per request on a line the connection's task shares.
        held: Option<Held>,
    }
}

/// Marks the connection's upload over when dropped with the body.
struct Held(ConnStatus);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.set_uploading(false);
    }
}

impl<B: Body> UploadBody<B> {
    /// `inner`, about to be sent on the connection of `status` (a connection is only
    /// reused once its last upload ended, so `status` says "not uploading" here).
    pub(super) fn new(inner: B, status: &ConnStatus) -> Self {
        let held = (!inner.is_end_stream()).then(|| {
            status.set_uploading(true);
            Held(status.clone())
        });
        Self { inner, held }
    }

    /// The body again, for a request turned down unsent.
    pub(super) fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for UploadBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let (Poll::Ready(None), Some(held)) = (&polled, this.held.as_ref()) {
            held.0.set_uploading(false);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let ended = self.inner.is_end_stream();
        if let (true, Some(held)) = (ended, &self.held) {
            held.0.set_uploading(false);
        }
        ended
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
