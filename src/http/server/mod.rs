//! A hardened HTTP/1 and HTTP/2 server for public listeners: any tower
//! `Service<Request<Incoming>>`, served with the limits a public port needs.
//!
//! hyper parses requests but leaves it to its caller how long a connection may sit at
//! each stage, how many may be open, and what to do when `accept` fails; a relay that
//! faces the internet must decide all of it, and every tunnel service would decide it the
//! same way. So [`Server`] holds each connection to account:
//!
//! - **a cap on connections** ([`Limits::max_connections`]): past it, new ones wait in
//!   the kernel's backlog until a slot frees;
//! - **accept errors back off** (10 ms doubling to 1 s) when out of file descriptors or
//!   memory, instead of spinning;
//! - **waiting for a request head** (a new connection, or bytes of a next request): cut
//!   after [`Limits::header_timeout`] from accept or the first byte, which stops
//!   slowloris;
//! - **idle between requests** (keep-alive): cut after [`Limits::idle_timeout`];
//! - **a request in flight**: no read deadline (the service bounds its own work), but a
//!   write that makes no progress for [`Limits::write_timeout`] cuts the connection, reset
//!   (`SO_LINGER` 0) so unsent data does not linger in the kernel;
//! - **upgraded** (WebSocket): only the write timeout applies;
//! - **bounded heads and streams**: HTTP/1 heads up to [`Limits::max_head_bytes`] (hyper
//!   answers 431/414 beyond), HTTP/2 with [`Limits::http2_max_concurrent_streams`] and
//!   keep-alive pings;
//! - **graceful shutdown**: idle connections close at once, in-flight requests finish.
//!
//! Stages are told apart by watching the socket and the requests in flight on it. Every
//! request carries a [`ConnectionInfo`] (peer and local address) in its extensions, and
//! an [`Observer`] hears about connections opened, cut, refused and closed, for metrics.
//!
//! # Example
//! ```
//! use std::convert::Infallible;
//! use std::future::IntoFuture;
//! use std::time::Duration;
//!
//! use backhaul::http::server::{ConnectionInfo, Limits, Server};
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use hyper::body::{Bytes, Incoming};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let hello = tower::service_fn(|request: Request<Incoming>| async move {
//!     let peer = request.extensions().get::<ConnectionInfo>().map(|info| info.peer_addr());
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("hello {peer:?}")))))
//! });
//! let server = Server::bind(([127, 0, 0, 1], 0))
//!     .await?
//!     .with_limits(Limits { header_timeout: Duration::from_secs(5), ..Limits::DEFAULT });
//! let addr = server.local_addr()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let serving = tokio::spawn(
//!     server
//!         .serve(hello)
//!         .with_graceful_shutdown(async move { let _ = stopped.await; })
//!         .into_future(),
//! );
//!
//! // A client, straight over TCP.
//! let tcp = tokio::net::TcpStream::connect(addr).await?;
//! let (mut sender, connection) =
//!     hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
//! tokio::spawn(connection);
//! let request = Request::get("/").header("host", "example").body(Full::<Bytes>::default())?;
//! let response = sender.send_request(request).await?;
//! assert!(response.status().is_success());
//!
//! let _ = stop.send(());
//! serving.await?;
//! # Ok(()) }
//! ```

mod accept;
mod activity;
mod connection;
mod limits;
mod observer;
mod placement;
mod serve;
mod watched_io;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use limits::Limits;
pub use observer::{ConnectionInfo, Observer};
pub use placement::Placement;
pub use serve::{Serve, ServeFuture};
pub use watched_io::Cut;

use crate::error::Error;
use crate::http::express::Express;
use crate::shards::ShardSet;
use accept::Acceptor;
use placement::Placed;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A TCP listener with [`Limits`] and an [`Observer`], to be given a service with
/// [`serve`](Self::serve); see the [module docs](self).
pub struct Server {
    acceptor: Acceptor,
    limits: Limits,
    observer: Arc<dyn Observer>,
    express: Option<Arc<dyn Express>>,
    placed: Option<Placed>,
    #[cfg(feature = "tls")]
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.acceptor.local_addr().ok())
            .field("limits", &self.limits)
            .field("express", &self.express.is_some())
            .field(
                "shards",
                &self.placed.as_ref().map(|placed| placed.set.len()),
            )
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `addr` (with a listen backlog of
    /// [`listener::DEFAULT_BACKLOG`](crate::listener::DEFAULT_BACKLOG)), with the default
    /// [`Limits`] and no observer.
    ///
    /// # Errors
    /// [`Error::Listen`] if the address cannot be bound.
    pub async fn bind(addr: impl Into<SocketAddr>) -> Result<Self, Error> {
        let addr = addr.into();
        let listener =
            crate::listener::bind(addr).map_err(|source| Error::Listen { addr, source })?;
        Ok(Self::from_listener(listener))
    }

    /// Serves on a listener bound already.
    #[must_use]
    pub fn from_listener(listener: TcpListener) -> Self {
        Self {
            acceptor: Acceptor::new(listener),
            limits: Limits::DEFAULT,
            observer: Arc::new(()),
            express: None,
            placed: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// The address listened on.
    ///
    /// # Errors
    /// The operating system's, if it cannot tell.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.acceptor.local_addr()
    }

    /// Replaces the [`Limits`].
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Reports connections to `observer` (one for the whole server; share state inside it,
    /// or pass an `Arc`).
    #[must_use]
    pub fn with_observer(mut self, observer: impl Observer) -> Self {
        self.observer = Arc::new(observer);
        self
    }

    /// Serves HTTPS: each connection's TLS handshake first (bounded by the header timeout,
    /// like a request head), then HTTP/2 or HTTP/1.1 as the client chose by ALPN. Build
    /// `config` with [`ReloadableCertificates::server_config`] and
    /// [`HTTP_ALPN`](crate::tls::HTTP_ALPN) to pick certificates by SNI and reload them
    /// without a restart. Requests carry a [`ConnectionInfo`] whose
    /// [`is_secure`](ConnectionInfo::is_secure) is true.
    ///
    /// [`ReloadableCertificates::server_config`]: crate::tls::ReloadableCertificates::server_config
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tokio_rustls::TlsAcceptor::from(config));
        self
    }

    /// Carries plain HTTP/1.1 requests on the [express lane](crate::http::express):
    /// `express` routes them to edges, each head parsed once, and whatever it does not
    /// carry goes to the service as without it. HTTP/2 connections (by ALPN or prior
    /// knowledge) always go to the service.
    #[must_use]
    pub fn with_express(mut self, express: impl Express) -> Self {
        self.express = Some(Arc::new(express));
        self
    }

    /// Serves each connection on one of `shards`: the one `placement` gives for the host
    /// its first request names (the `Host` of its first head, or the TLS server name),
    /// else the next in turn. On a relay, the shard of the edge the host routes to, so
    /// that the connection's requests are handled on the thread that drives the edge's
    /// QUIC connection; see [`shards`](crate::shards) and
    /// [`placement`](Placement). Without it (the default), every connection is served on
    /// the runtime that runs the server.
    #[must_use]
    pub fn with_shards(mut self, shards: ShardSet, placement: impl Placement) -> Self {
        self.placed = Some(Placed {
            set: shards,
            placement: Arc::new(placement),
        });
        self
    }

    /// Serves every connection with a clone of `service`, which must be ready or become
    /// ready for each request (it is driven with `oneshot`). The [`ConnectionInfo`] of the
    /// connection is in each request's extensions.
    pub fn serve<S>(self, service: S) -> Serve<S> {
        Serve::new(self, service)
    }
}

impl<T: Observer + ?Sized> Observer for Arc<T> {
    fn connection_opened(&self, info: &ConnectionInfo) {
        (**self).connection_opened(info);
    }
    fn at_capacity(&self, max_connections: usize) {
        (**self).at_capacity(max_connections);
    }
    fn accept_failed(&self, error: &std::io::Error, backoff: std::time::Duration) {
        (**self).accept_failed(error, backoff);
    }
    fn connection_cut(&self, info: &ConnectionInfo, reason: Cut) {
        (**self).connection_cut(info, reason);
    }
    fn request_refused(&self, info: &ConnectionInfo, status: http::StatusCode) {
        (**self).request_refused(info, status);
    }
    fn connection_failed(&self, info: &ConnectionInfo, error: &(dyn std::error::Error + 'static)) {
        (**self).connection_failed(info, error);
    }
    fn connection_closed(&self, info: &ConnectionInfo) {
        (**self).connection_closed(info);
    }
}
