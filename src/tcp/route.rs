//! The edge's side of a TCP tunnel: a route that connects each tunnel stream to a local
//! TCP service (`ssh` → `127.0.0.1:22`) and splices the two.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tower::Service;

use super::proxy_protocol::ProxyHeader;
use super::splice::{splice_until_stopped, Side};
use super::{
    abort_tcp, AbortUnlessDone, ConnectionAddresses, CONNECTION_BROKEN, STATUS_BACKEND_UNAVAILABLE,
    STATUS_CONNECTED,
};
use crate::edge::RouteError;
use crate::error::Error;
use crate::stream::TunnelStream;
use crate::transport::Connection;

/// How long the edge waits for the local service to accept a connection, by default.
pub const DEFAULT_BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An edge route forwarding each tunnel stream to the TCP service at `backend`
/// (`"127.0.0.1:22"`, `"db.local:5432"`; names are resolved per connection).
///
/// ```
/// use backhaul::edge::Router;
/// use backhaul::tcp;
///
/// let router: Router = Router::new()
///     .route("ssh", tcp::forward_to("127.0.0.1:22").with_proxy_protocol(true));
/// ```
pub fn forward_to(backend: impl Into<String>) -> TcpRoute {
    TcpRoute {
        backend: Arc::from(backend.into()),
        proxy_protocol: false,
        connect_timeout: DEFAULT_BACKEND_CONNECT_TIMEOUT,
    }
}

/// A route that splices tunnel streams to a local TCP service; made by [`forward_to`].
///
/// The route answers each stream with one status byte before any data (see the
/// [module docs](super)): a backend that refuses (or does not answer within the connect
/// timeout) is reported that way, so the relay closes the public connection at once and
/// says why. A connection that breaks on one side is aborted on the
/// other (a TCP reset, a stream reset with [`CONNECTION_BROKEN`]), never closed as if the
/// transfer had completed.
#[derive(Debug, Clone)]
pub struct TcpRoute {
    backend: Arc<str>,
    proxy_protocol: bool,
    connect_timeout: Duration,
}

impl TcpRoute {
    /// Sends a PROXY protocol v2 header to the backend first, with the public client's
    /// address as the relay reported it (off by default: the backend must expect it).
    #[must_use]
    pub fn with_proxy_protocol(mut self, enabled: bool) -> Self {
        self.proxy_protocol = enabled;
        self
    }

    /// How long to wait for the backend to accept
    /// ([`DEFAULT_BACKEND_CONNECT_TIMEOUT`] by default).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The backend's address, as given.
    #[must_use]
    pub fn backend(&self) -> &str {
        &self.backend
    }
}

impl<C: Connection> Service<TunnelStream<C>> for TcpRoute {
    type Response = ();
    type Error = RouteError;
    type Future = TcpRouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RouteError>> {
        // Every stream gets its own backend connection; there is nothing to wait for.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, stream: TunnelStream<C>) -> TcpRouteFuture {
        let route = self.clone();
        TcpRouteFuture {
            inner: Box::pin(route.forward(stream)),
        }
    }
}

impl TcpRoute {
    async fn forward<C: Connection>(self, mut stream: TunnelStream<C>) -> Result<(), RouteError> {
        let connect =
            tokio::time::timeout(self.connect_timeout, TcpStream::connect(&*self.backend));
        let failure = match connect.await {
            Ok(Ok(backend)) => Ok(backend),
            Ok(Err(source)) => Err(source),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        };
        let mut backend = match failure {
            Ok(backend) => backend,
            Err(source) => {
                // Said in-band and finished gracefully: a reset could overtake the stream's
                // header, and the relay would not know which open it belonged to.
                let _ = stream.write_all(&[STATUS_BACKEND_UNAVAILABLE]).await;
                let _ = stream.shutdown().await;
                return Err(Error::BackendUnavailable {
                    backend: self.backend.to_string(),
                    source,
                }
                .into());
            }
        };
        let _ = backend.set_nodelay(true);
        if let Err(error) = stream.write_all(&[STATUS_CONNECTED]).await {
            abort_tcp(backend);
            return Err(error.into());
        }
        if self.proxy_protocol {
            let header = match ConnectionAddresses::from_metadata(stream.metadata()) {
                Some(addresses) => ProxyHeader::Proxy {
                    source: addresses.client,
                    destination: addresses.public,
                },
                None => ProxyHeader::Local,
            };
            if let Err(error) = backend.write_all(&header.encode()).await {
                stream.reset(CONNECTION_BROKEN);
                abort_tcp(backend);
                return Err(error.into());
            }
        }
        splice_aborting(&mut stream, backend).await?;
        Ok(())
    }
}

/// Splices a tunnel stream with a backend connection; when one side breaks, the other is
/// aborted (TCP reset, stream reset with [`CONNECTION_BROKEN`]), never closed gracefully.
/// The backend is reset too if this future is dropped mid-splice (the `Router` stopped
/// the stream when its drain timed out), as the stream then is.
pub(crate) async fn splice_aborting<C: Connection>(
    stream: &mut TunnelStream<C>,
    backend: TcpStream,
) -> Result<super::Spliced, super::SpliceError> {
    let mut backend = AbortUnlessDone::new(backend);
    // Once the relay stops reading the stream, what the backend still sends goes nowhere:
    // the splice ends instead of holding the backend until it writes again or closes.
    let stopped = stream.stopped();
    let stop_never = std::future::pending();
    match splice_until_stopped(stream, &mut *backend, stopped, stop_never).await {
        Ok(carried) => {
            backend.release();
            Ok(carried)
        }
        Err(failure) => {
            // The backend is reset when dropped here, unless it is the side that broke.
            if failure.side == Side::Second {
                if failure.answer_delivered {
                    // It stopped reading, but its answer went out whole.
                    stream.stop(CONNECTION_BROKEN);
                } else {
                    stream.reset(CONNECTION_BROKEN);
                }
                drop(backend.release());
            }
            Err(failure)
        }
    }
}

/// One tunnel stream forwarded by a [`TcpRoute`]; resolves when both directions ended.
#[must_use = "futures do nothing unless polled"]
pub struct TcpRouteFuture {
    // Boxed once per connection (a connect, a header and a splice): small next to the
    // connection itself, and it keeps the type nameable without the stream's type.
    inner: Pin<Box<dyn Future<Output = Result<(), RouteError>> + Send>>,
}

impl std::fmt::Debug for TcpRouteFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRouteFuture").finish_non_exhaustive()
    }
}

impl Future for TcpRouteFuture {
    type Output = Result<(), RouteError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
