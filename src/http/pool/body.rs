//! A response body that hands its connection back to the pool the moment it ends, in the
//! task reading it: no task waits for that on the side.

use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};

use super::idle::{Conn, IdleSet};
use bytes::Bytes;
use http::uri::Authority;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The body of a response from an [`Http1Pool`](super::Http1Pool): hyper's [`Incoming`],
/// which returns its connection to the pool once read to the end. A body dropped before
/// its end closes the connection (whatever was left unread cannot be skipped safely).
pub struct PooledBody<B> {
    inner: Incoming,
    give_back: Option<GiveBack<B>>,
}

/// Where a connection goes back to, and for which authority.
pub(super) struct GiveBack<B> {
    pub(super) conn: Conn<B>,
    pub(super) idle: Weak<IdleSet<B>>,
    pub(super) authority: Authority,
}

impl<B> GiveBack<B> {
    pub(super) fn give(self) {
        if let Some(idle) = self.idle.upgrade() {
            idle.put(self.authority, self.conn);
        }
    }
}

impl<B> PooledBody<B> {
    pub(super) fn new(inner: Incoming, give_back: Option<GiveBack<B>>) -> Self {
        Self { inner, give_back }
    }

    fn give_back(&mut self) {
        if let Some(give_back) = self.give_back.take() {
            give_back.give();
        }
    }
}

impl<B> std::fmt::Debug for PooledBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("inner", &self.inner)
            .field("returns_connection", &self.give_back.is_some())
            .finish()
    }
}

impl<B> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            // The last frame of a body of known length: a server writing it out may not
            // poll again once `is_end_stream` says so.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.give_back(),
            // A broken response: its connection is not reused.
            Poll::Ready(Some(Err(_))) => this.give_back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
