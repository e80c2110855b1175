//! The edge's layer-4 route to a local HTTP service: [`pass_through`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::Service;

use super::local::Scheme;
use super::{text_response, validate_upstream};
use crate::edge::RouteError;
use crate::error::Error;
use crate::stream::TunnelStream;
use crate::tcp::{splice_aborting, DEFAULT_BACKEND_CONNECT_TIMEOUT};
use crate::transport::Connection;

/// A route that hands each tunnel stream to the HTTP service at `upstream`
/// (`http://host:port`) byte for byte: one TCP connection per stream, spliced both ways,
/// with no HTTP parsing on the edge.
///
/// The relay has already done what an HTTP proxy must (routing by Host, forwarding
/// headers, hop-by-hop headers, its own timeouts), so the edge's [`to_local`](super::to_local)
/// parses and re-writes every request only to send it on unchanged. Passing the bytes
/// through costs the edge a fraction of that CPU per request. What it gives up, and
/// [`to_local`](super::to_local) keeps:
/// - the edge's own response and body-idle timeouts (the relay's still apply);
/// - rewriting Host to the service's own name;
/// - draining per request on shutdown: the edge cannot tell an idle kept-alive
///   connection from one mid-request, so it waits for the stream to end instead;
/// - HTTP/2 with prior knowledge (`h2c://`): the service receives whatever the relay
///   speaks on the stream, HTTP/1.1 for most requests (see the [module docs](super) on
///   versions), so only `http://` services can be passed through.
///
/// A service that refuses the connection (or does not accept it within the connect
/// timeout) is answered with one `502 Bad Gateway` naming it, as `to_local` does.
///
/// ```
/// use backhaul::edge::Router;
/// use backhaul::http::proxy::pass_through;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let web = pass_through("http://127.0.0.1:3000".parse()?)?
///     .with_description("local service \"web\" at 127.0.0.1:3000");
/// let router: Router = Router::new().route("web", web);
/// # drop(router); Ok(()) }
/// ```
///
/// # Errors
/// [`Error::InvalidUpstream`] if `upstream` is not `http://` with a host and nothing after
/// the authority.
pub fn pass_through(upstream: Uri) -> Result<PassThrough, Error> {
    let (authority, _) = validate_upstream(&upstream, Scheme::Http)?;
    Ok(PassThrough {
        description: Arc::from(format!("local service at {authority}")),
        backend: Arc::from(authority.as_str()),
        connect_timeout: DEFAULT_BACKEND_CONNECT_TIMEOUT,
        answer_timeout: DEFAULT_ANSWER_TIMEOUT,
    })
}

/// A layer-4 route to a local HTTP service; made by [`pass_through`].
#[derive(Debug, Clone)]
pub struct PassThrough {
    backend: Arc<str>,
    description: Arc<str>,
    connect_timeout: Duration,
    answer_timeout: Duration,
}

impl PassThrough {
    /// How the 502 and logs name the service (default `local service at HOST:PORT`).
    #[must_use]
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Arc::from(description.into());
        self
    }

    /// How long to wait for the service to accept a connection
    /// ([`DEFAULT_BACKEND_CONNECT_TIMEOUT`] by default).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for the request when the service is unreachable and the stream
    /// can only be answered with the 502 ([`DEFAULT_ANSWER_TIMEOUT`] by default); a relay
    /// that sends nothing by then has the stream closed.
    #[must_use]
    pub fn with_answer_timeout(mut self, timeout: Duration) -> Self {
        self.answer_timeout = timeout;
        self
    }

    async fn forward<C: Connection>(self, mut stream: TunnelStream<C>) -> Result<(), RouteError> {
        let connect =
            tokio::time::timeout(self.connect_timeout, TcpStream::connect(&*self.backend));
        let source = match connect.await {
            Ok(Ok(backend)) => {
                let _ = backend.set_nodelay(true);
                splice_aborting(&mut stream, backend).await?;
                return Ok(());
            }
            Ok(Err(source)) => source,
            Err(_) => std::io::ErrorKind::TimedOut.into(),
        };
        let message = format!("{} is unreachable: {source}", self.description);
        tracing::warn!(error = ?message, "passing a stream through to the local service failed");
        answer_once(
            stream,
            StatusCode::BAD_GATEWAY,
            message,
            self.answer_timeout,
        )
        .await;
        Err(Error::BackendUnavailable {
            backend: self.backend.to_string(),
            source,
        }
        .into())
    }
}

/// Reads the request on `stream` and answers it with `status` and `message`, then closes.
async fn answer_once<C: Connection>(
    stream: TunnelStream<C>,
    status: StatusCode,
    message: String,
    timeout: Duration,
) {
    let service = hyper::service::service_fn(move |_request| {
        let response = text_response(status, message.clone());
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    // Bounded: a relay that never sends the request does not keep the stream forever.
    let _ = tokio::time::timeout(timeout, connection).await;
}

/// How long, by default, a [`PassThrough`] waits for a request it can only answer with
/// a 502: the relay sends its request right after opening the stream, so this only
/// bounds a stream that never carries one.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl<C: Connection> Service<TunnelStream<C>> for PassThrough {
    type Response = ();
    type Error = RouteError;
    type Future = PassThroughFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RouteError>> {
        // One backend connection per stream: nothing to wait for.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, stream: TunnelStream<C>) -> PassThroughFuture {
        PassThroughFuture {
            inner: Box::pin(self.clone().forward(stream)),
        }
    }
}

/// One tunnel stream passed through by a [`PassThrough`]; resolves when both directions
/// ended.
#[must_use = "futures do nothing unless polled"]
pub struct PassThroughFuture {
    // Boxed once per stream, which lives as long as a kept-alive connection.
    inner: Pin<Box<dyn Future<Output = Result<(), RouteError>> + Send>>,
}

impl std::fmt::Debug for PassThroughFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassThroughFuture").finish_non_exhaustive()
    }
}

impl Future for PassThroughFuture {
    type Output = Result<(), RouteError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
