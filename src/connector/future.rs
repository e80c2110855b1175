//! The connector's response future.
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::Error;
use crate::stream::TunnelStream;
use crate::transport::{Connection, DefaultConnection};

// The open is an `async fn` of the session; hyper-util wants the connector's future
// `Unpin`, so it is boxed once per open behind this named type.
type Inner<C> = Pin<Box<dyn Future<Output = Result<TunnelStream<C>, Error>> + Send>>;

/// Resolves to an opened [`TunnelStream`]. `Unpin` and `Send`, as hyper-util's pooled
/// client requires of a connector's future.
#[must_use = "futures do nothing unless polled"]
pub struct ConnectFuture<C: Connection = DefaultConnection> {
    inner: Inner<C>,
}

impl<C: Connection> ConnectFuture<C> {
    pub(crate) fn new<F>(future: F) -> Self
    where
        F: Future<Output = Result<TunnelStream<C>, Error>> + Send + 'static,
    {
        Self {
            inner: Box::pin(future),
        }
    }

    #[cfg(feature = "http")]
    pub(crate) fn failed(error: Error) -> Self {
        Self::new(std::future::ready(Err(error)))
    }
}

impl<C: Connection> fmt::Debug for ConnectFuture<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectFuture")
    }
}

impl<C: Connection> Future for ConnectFuture<C> {
    type Output = Result<TunnelStream<C>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
