//! [`Http1Pool`]: a lean pooled HTTP/1.1 client for tunnel streams, which a relay sends
//! every forwarded request through.
//!
//! hyper-util's pooled client does more per request than a relay needs: it builds a
//! connect future for every request (started only when no idle connection is at hand),
//! and after each HTTP/1 response it spawns a task that waits for the connection to be
//! ready again before putting it back in the pool. Through a tunnel that was about 14 %
//! of the requests per second at 64 concurrent requests (`benches/http.rs`).
//!
//! This pool keeps the idle request halves of HTTP/1.1 connections by authority, most
//! recently used first. A request takes one (or opens a connection through the connector
//! when none is idle), and its response body ([`PooledBody`]) puts the connection back
//! the moment it is read to the end, in the task reading it. A body dropped before its
//! end closes its connection, and so does a response that ends before its request's body
//! did (an early `413`: hyper would never make that connection ready again). A request
//! that a reused connection turned down unsent (the peer closed it meanwhile) is sent
//! again on another connection; one that may have been sent is not. Idle connections
//! are closed after [`Http1PoolBuilder::idle_timeout`], by a task the pool starts with
//! its first response and stops when dropped.
//!
//! It speaks HTTP/1.1 only, with upgrades (WebSocket) supported; for HTTP/2 (gRPC
//! through a relay) use hyper-util's client, which multiplexes one connection.

mod answer_first;
mod body;
mod expiry;
mod idle;
mod status;

pub use body::PooledBody;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Body;
use hyper::client::conn::http1;
use tokio::task::JoinHandle;
use tower::{Service, ServiceExt};

use self::answer_first::AnswerFirst;
use self::body::GiveBack;
pub(crate) use self::expiry::{cutoff, expired_count, reap, Expiring, Kept};
use self::idle::{Conn, IdleSet};
use self::status::UploadBody;
use crate::http::clients::{DEFAULT_POOL_IDLE_TIMEOUT, DEFAULT_READ_AHEAD};

/// How many idle connections an authority keeps by default.
pub const DEFAULT_MAX_IDLE_PER_AUTHORITY: usize = 512;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What an [`Http1Pool`] opens connections with: implemented for every
/// `tower::Service<Uri>` (a connector, such as backhaul's
/// [`Connector`](crate::connector::Connector) or hyper-util's `HttpConnector`) whose
/// connections hyper can drive.
pub trait PoolConnector: Clone + Send + Sync + 'static {
    /// A connection.
    type Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static;

    /// Opens a connection to `uri`'s authority (waiting for the connector's capacity).
    fn open(&self, uri: Uri) -> Pin<Box<dyn Future<Output = Result<Self::Io, BoxError>> + Send>>;
}

impl<S> PoolConnector for S
where
    S: Service<Uri> + Clone + Send + Sync + 'static,
    S::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Io = S::Response;

    fn open(&self, uri: Uri) -> Pin<Box<dyn Future<Output = Result<Self::Io, BoxError>> + Send>> {
        let mut connector = self.clone();
        Box::pin(async move {
            let ready = connector.ready().await.map_err(Into::into)?;
            ready.call(uri).await.map_err(Into::into)
        })
    }
}

/// Why an [`Http1Pool`] could not send a request or get its response head.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The request's URI names no authority (the pool sends `http://authority/path`).
    #[error("the request URI {0:?} has no authority")]
    NoAuthority(Uri),
    /// The connector could not open a connection (for backhaul's `Connector`, a crate
    /// [`Error`](crate::Error) in the chain: refused, timed out, session gone).
    #[error("could not connect")]
    Connect(#[source] BoxError),
    /// The HTTP/1 handshake on a new connection failed.
    #[error("HTTP/1 handshake failed")]
    Handshake(#[source] hyper::Error),
    /// The request could not be sent, or the connection failed before the response head.
    #[error("the request failed")]
    Send(#[source] hyper::Error),
}

/// A pooled HTTP/1.1 client over a connector (`tower::Service<Uri>`, such as backhaul's
/// [`Connector`](crate::connector::Connector)). Cheap to clone: clones share the pool.
///
/// Requests carry an absolute URI (`http://web/status`); its authority keys the pool and
/// is the connector's target, and becomes the `Host` header when the request has none.
/// The request goes out in origin form (`/status`), a CONNECT in authority form.
///
/// `poll_ready` is always ready: a request waits for a connection inside the call, where
/// the connector's own limits apply (backhaul's `Connector` bounds the opens in flight).
///
/// ```no_run
/// use backhaul::connector::Connector;
/// use backhaul::http::pool::Http1Pool;
/// use backhaul::{QuinnConnection, SessionClient};
/// use http_body_util::{BodyExt, Empty};
/// use hyper::body::Bytes;
///
/// # async fn relay(edge: SessionClient<QuinnConnection>)
/// #     -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let pool: Http1Pool<_, Empty<Bytes>> = Http1Pool::new(Connector::new(edge));
/// let request = http::Request::get("http://web/status").body(Empty::new())?;
/// let response = pool.send(request).await?;
/// // Read to the end, the body puts its tunnel stream back for the next request.
/// let body = response.into_body().collect().await?.to_bytes();
/// println!("{} bytes", body.len());
/// # Ok(()) }
/// ```
pub struct Http1Pool<C, B> {
    shared: Arc<Shared<C, B>>,
}

struct Shared<C, B> {
    connector: C,
    builder: http1::Builder,
    idle: Arc<IdleSet<B>>,
    /// Closes idle connections past their timeout; started with the first response.
    reaper: OnceLock<JoinHandle<()>>,
}

impl<C, B> Drop for Shared<C, B> {
    fn drop(&mut self) {
        if let Some(reaper) = self.reaper.get() {
            reaper.abort();
        }
    }
}

impl<C, B> Clone for Http1Pool<C, B> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C, B> fmt::Debug for Http1Pool<C, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http1Pool")
            .field("idle", &self.shared.idle.len())
            .finish_non_exhaustive()
    }
}

/// Settings for an [`Http1Pool`]; made by [`Http1Pool::builder`].
#[derive(Debug, Clone)]
pub struct Http1PoolBuilder {
    idle_timeout: Duration,
    max_idle_per_authority: usize,
    read_ahead: usize,
}

impl Default for Http1PoolBuilder {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            max_idle_per_authority: DEFAULT_MAX_IDLE_PER_AUTHORITY,
            read_ahead: DEFAULT_READ_AHEAD,
        }
    }
}

impl Http1PoolBuilder {
    /// How long a connection may stay idle in the pool before it is closed
    /// (default [`DEFAULT_POOL_IDLE_TIMEOUT`]).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How many idle connections each authority keeps; a connection finishing its
    /// response beyond that is closed (default [`DEFAULT_MAX_IDLE_PER_AUTHORITY`]).
    #[must_use]
    pub fn max_idle_per_authority(mut self, max: usize) -> Self {
        self.max_idle_per_authority = max;
        self
    }

    /// How far hyper reads a response ahead of its reader (default
    /// [`DEFAULT_READ_AHEAD`]; at least 8 KiB).
    #[must_use]
    pub fn read_ahead(mut self, bytes: usize) -> Self {
        self.read_ahead = bytes.max(8 * 1024);
        self
    }

    /// The pool, over `connector`.
    pub fn build<C, B>(self, connector: C) -> Http1Pool<C, B> {
        let mut builder = http1::Builder::new();
        builder.max_buf_size(self.read_ahead);
        Http1Pool {
            shared: Arc::new(Shared {
                connector,
                builder,
                idle: Arc::new(IdleSet::new(self.idle_timeout, self.max_idle_per_authority)),
                reaper: OnceLock::new(),
            }),
        }
    }
}

impl Http1Pool<(), ()> {
    /// Settings other than the defaults.
    #[must_use]
    pub fn builder() -> Http1PoolBuilder {
        Http1PoolBuilder::default()
    }
}

impl<C, B> Http1Pool<C, B> {
    /// A pool over `connector` with the default settings.
    pub fn new(connector: C) -> Self {
        Http1PoolBuilder::default().build(connector)
    }

    /// How many idle connections the pool keeps now.
    #[must_use]
    pub fn idle(&self) -> usize {
        self.shared.idle.len()
    }
}

impl<C, B> Http1Pool<C, B>
where
    C: PoolConnector,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Sends `request` on an idle connection to its URI's authority, or on a new one,
    /// and resolves to the response once its head has arrived.
    ///
    /// # Errors
    /// [`PoolError`]: no authority in the URI, no connection, or the exchange failed
    /// before the response head.
    pub fn send(
        &self,
        request: Request<B>,
    ) -> impl Future<Output = Result<Response<PooledBody<B>>, PoolError>> + Send + 'static {
        send(Arc::clone(&self.shared), request)
    }
}

async fn send<C, B>(
    shared: Arc<Shared<C, B>>,
    mut request: Request<B>,
) -> Result<Response<PooledBody<B>>, PoolError>
where
    C: PoolConnector,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let authority = to_origin_form(&mut request)?;
    loop {
        let (mut conn, reused) = match shared.idle.take(&authority) {
            Some(conn) => (conn, true),
            None => (shared.connect(&authority).await?, false),
        };
        if reused && conn.sender.ready().await.is_err() {
            // Closed while idle: the request is still ours.
            continue;
        }
        let sent = request.map(|body| UploadBody::new(body, &conn.status));
        match conn.sender.try_send_request(sent).await {
            Ok(response) => return Ok(shared.pooled(response, conn, authority)),
            Err(mut failed) => match failed.take_message() {
                // Turned down unsent by a connection that was reused: the peer closed
                // it meanwhile, so another connection may take the request.
                Some(unsent) if reused => request = unsent.map(UploadBody::into_inner),
                _ => return Err(PoolError::Send(failed.into_error())),
            },
        }
    }
}

/// Checks `request`'s URI, sets `Host` from it if absent, and turns it into origin
/// form (authority form for CONNECT); returns the authority.
fn to_origin_form<B>(request: &mut Request<B>) -> Result<Authority, PoolError> {
    let Some(authority) = request.uri().authority().cloned() else {
        return Err(PoolError::NoAuthority(request.uri().clone()));
    };
    if !request.headers().contains_key(HOST) {
        // The host and port, never the URI's user information.
        let host = match authority.port_u16() {
            Some(port) => HeaderValue::from_str(&format!("{}:{port}", authority.host())),
            None => HeaderValue::from_str(authority.host()),
        };
        if let Ok(host) = host {
            request.headers_mut().insert(HOST, host);
        }
    }
    *request.uri_mut() = if request.method() == Method::CONNECT {
        // CONNECT names its target in authority form.
        Uri::from(authority.clone())
    } else {
        let path = request.uri().path_and_query().cloned();
        Uri::from(path.unwrap_or_else(|| PathAndQuery::from_static("/")))
    };
    Ok(authority)
}

impl<C, B> Shared<C, B>
where
    C: PoolConnector,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Opens a connection to `authority` and starts its HTTP/1 driver task.
    async fn connect(&self, authority: &Authority) -> Result<Conn<B>, PoolError> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|error| PoolError::Connect(error.into()))?;
        let io = self.connector.open(uri).await.map_err(PoolError::Connect)?;
        let (io, status) = AnswerFirst::new(io);
        let (sender, connection) = self
            .builder
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "pooled HTTP/1 connection ended");
            }
        });
        Ok(Conn { sender, status })
    }

    /// The response with a body that gives `conn` back when it ends (at once for a
    /// body already ended; never for a connection switching protocols, which is no
    /// longer HTTP).
    fn pooled(
        self: &Arc<Self>,
        response: Response<hyper::body::Incoming>,
        conn: Conn<B>,
        authority: Authority,
    ) -> Response<PooledBody<B>> {
        let give_back = (response.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| {
            self.reaper
                .get_or_init(|| tokio::spawn(reap(Arc::downgrade(&self.idle))));
            GiveBack {
                conn,
                idle: Arc::downgrade(&self.idle),
                authority,
            }
        });
        let ended = response.body().is_end_stream();
        response.map(|body| {
            if ended {
                if let Some(give_back) = give_back {
                    give_back.give();
                }
                PooledBody::new(body, None)
            } else {
                PooledBody::new(body, give_back)
            }
        })
    }
}

impl<B: Send + 'static> Expiring for IdleSet<B> {
    fn idle_timeout(&self) -> Duration {
        self.timeout()
    }

    fn expire(&self) {
        IdleSet::expire(self);
    }
}

impl<C, B> Service<Request<B>> for Http1Pool<C, B>
where
    C: PoolConnector,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<PooledBody<B>>;
    type Error = PoolError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, PoolError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), PoolError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        Box::pin(self.send(request))
    }
}

#[cfg(test)]
mod tests;
