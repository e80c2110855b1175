//! HTTP on both ends of a tunnel, and on a relay's public port.
//!
//! - [`serve`]: a tower HTTP service as an edge route (below);
//! - [`pool`]: [`Http1Pool`](pool::Http1Pool), a lean pooled HTTP/1.1 client for tunnel
//!   streams (what a relay forwards requests through);
//! - [`EdgeClients`]: on a relay, the pooled clients of each edge session (an
//!   `Http1Pool`, or a hyper-util client for HTTP/2);
//! - [`server`]: a hardened HTTP/1 and HTTP/2 server for public listeners (limits on
//!   connections and on each stage of them, an observer for metrics, graceful shutdown).
//!
//! Serving tower HTTP services (an axum `Router`, say) on tunnel streams:
//! [`serve`] turns a `Service<Request<Incoming>>` into an edge route: each tunnel stream
//! becomes one HTTP connection, served by hyper-util's auto server (HTTP/1.1 with
//! keep-alive, or HTTP/2 when the relay speaks it), with upgrades such as WebSocket
//! enabled. When the edge begins a graceful shutdown, each connection is told to finish
//! its in-flight requests and stop keep-alive.
//!
//! For HTTP tunnel services: [`proxy`] forwards requests to an upstream (the relay to an
//! edge, the edge to a local service), [`forwarded`] sets the forwarding headers with the
//! proxy as trust boundary, and [`authority`] parses the authority a request is for.

pub mod authority;
pub mod express;
pub mod forwarded;
pub mod pool;
pub mod proxy;

mod clients;
pub mod server;

pub use clients::{EdgeClients, EdgeClientsBuilder, DEFAULT_POOL_IDLE_TIMEOUT, DEFAULT_READ_AHEAD};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::Service;

use crate::edge::RouteError;
use crate::stream::{wait_draining, TunnelStream};
use crate::transport::Connection;

/// An edge route serving HTTP with `service`.
pub fn serve<S>(service: S) -> HttpRoute<S> {
    HttpRoute {
        service,
        builder: Arc::new(auto::Builder::new(TokioExecutor::new())),
    }
}

/// A route that speaks HTTP on each stream; made by [`serve`].
pub struct HttpRoute<S> {
    service: S,
    builder: Arc<auto::Builder<TokioExecutor>>,
}

impl<S: Clone> Clone for HttpRoute<S> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            builder: Arc::clone(&self.builder),
        }
    }
}

impl<S> std::fmt::Debug for HttpRoute<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRoute").finish_non_exhaustive()
    }
}

impl<S> HttpRoute<S> {
    /// Replaces the server settings (timeouts, HTTP/2 windows, header limits…).
    #[must_use]
    pub fn with_builder(mut self, builder: auto::Builder<TokioExecutor>) -> Self {
        self.builder = Arc::new(builder);
        self
    }
}

impl<C, S, B> Service<TunnelStream<C>> for HttpRoute<S>
where
    C: Connection,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<RouteError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<RouteError>,
{
    type Response = ();
    type Error = RouteError;
    type Future = HttpConnectionFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RouteError>> {
        // Readiness is per request, inside the connection; a new connection is always fine.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, stream: TunnelStream<C>) -> Self::Future {
        let service = TowerToHyperService::new(self.service.clone());
        let builder = Arc::clone(&self.builder);
        HttpConnectionFuture::new(async move {
            let draining = stream.draining_signal();
            let connection = builder.serve_connection_with_upgrades(stream, service);
            tokio::pin!(connection);
            let result = match draining {
                Some(draining) => {
                    tokio::select! {
                        result = connection.as_mut() => result,
                        () = wait_draining(draining) => {
                            connection.as_mut().graceful_shutdown();
                            connection.await
                        }
                    }
                }
                None => connection.await,
            };
            result.map_err(|error| -> RouteError { error })
        })
    }
}

/// One HTTP connection served on a tunnel stream by an [`HttpRoute`]; resolves when the
/// connection ends (the relay hung up, or a graceful shutdown finished it).
#[must_use = "futures do nothing unless polled"]
pub struct HttpConnectionFuture {
    // hyper-util's connection future is generic over the service and body, and the
    // shutdown watch is an `async fn`: boxing once per connection keeps this type nameable.
    inner: Pin<Box<dyn Future<Output = Result<(), RouteError>> + Send>>,
}

impl HttpConnectionFuture {
    fn new<F>(future: F) -> Self
    where
        F: Future<Output = Result<(), RouteError>> + Send + 'static,
    {
        Self {
            inner: Box::pin(future),
        }
    }
}

impl std::fmt::Debug for HttpConnectionFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConnectionFuture")
            .finish_non_exhaustive()
    }
}

impl Future for HttpConnectionFuture {
    type Output = Result<(), RouteError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
