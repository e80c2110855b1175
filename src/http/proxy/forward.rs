//! [`ReverseProxy`]: forwarding as a tower service over hyper-util's pooled client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, TRANSFER_ENCODING};
use http::{Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Body;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::client::legacy::{self, Client};
use tokio::time::Sleep;
use tower::Service;

use super::hop_by_hop::{is_upgrade, strip_hop_by_hop};
use super::idle::{IdleHook, IdleTimeoutBody};
use super::linger::{Answered, EndsUpload, Linger, Lingering};
use super::upgrade::spawn_splice;
use super::{boxed, BoxError, ProxyBody};
use crate::http::pool::{Http1Pool, PoolConnector, PoolError, PooledBody};

/// How long an upstream may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Until the response head arrives. Default 60 s.
    pub response: Duration,
    /// Between two frames of the response body, counted from when the downstream asks for
    /// the next one (see [`IdleTimeoutBody`]). Default 60 s.
    pub body_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            response: Duration::from_secs(60),
            body_idle: Duration::from_secs(60),
        }
    }
}

/// Why forwarding a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The upstream sent no response head within [`Timeouts::response`].
    #[error("no response head within {0:?}")]
    Timeout(Duration),
    /// The upstream, or the way to it, failed; the chain holds the cause (a crate
    /// [`Error`](crate::error::Error) for a tunnel that could not be opened, an `io::Error` for
    /// a refused TCP connection, a `hyper::Error`…).
    #[error(transparent)]
    Upstream(#[from] legacy::Error),
    /// The same, through an [`Http1Pool`].
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl ForwardError {
    /// True for [`ForwardError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }
}

/// What a [`ReverseProxy`] sends requests with: backhaul's lean HTTP/1.1 pool (the
/// default, and the relay's choice for tunnel streams), or a hyper-util [`Client`]
/// (for HTTP/2, or its other settings). Both convert with `into()`.
// The client is kept inline, as it was before the pool: boxing it would cost an
// allocation for every proxy built per request.
#[allow(clippy::large_enum_variant)]
pub enum Upstream<C> {
    /// An [`Http1Pool`]: HTTP/1.1, connections back in the pool as each response ends.
    Http1(Http1Pool<C, ProxyBody>),
    /// A hyper-util pooled client.
    Client(Client<C, ProxyBody>),
}

impl<C: Clone> Clone for Upstream<C> {
    fn clone(&self) -> Self {
        match self {
            Self::Http1(pool) => Self::Http1(pool.clone()),
            Self::Client(client) => Self::Client(client.clone()),
        }
    }
}

impl<C> std::fmt::Debug for Upstream<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http1(pool) => f.debug_tuple("Http1").field(pool).finish(),
            Self::Client(_) => f.write_str("Client"),
        }
    }
}

impl<C> From<Http1Pool<C, ProxyBody>> for Upstream<C> {
    fn from(pool: Http1Pool<C, ProxyBody>) -> Self {
        Self::Http1(pool)
    }
}

impl<C> From<Client<C, ProxyBody>> for Upstream<C> {
    fn from(client: Client<C, ProxyBody>) -> Self {
        Self::Client(client)
    }
}

/// A reverse proxy: a `tower::Service` that forwards each request to the URI it carries
/// with a pooled client ([`Upstream`]) and answers with the upstream's response.
///
/// On the way: hop-by-hop headers are dropped both ways (see [`strip_hop_by_hop`]; a
/// caller adding headers a client must not remove strips first), the request goes out as
/// HTTP/1.1 or HTTP/2 as the client's connection speaks, a `101` splices the downstream
/// and upstream connections (see [`splice`](super::splice)), and [`Timeouts`] bound the
/// response head and each body frame. The request's URI must be absolute (see
/// [`retarget`](super::retarget)); its Host header, if any, is sent as is.
///
/// `poll_ready` is always ready, as hyper-util's client is: requests wait for a pooled
/// or new connection inside the call, where the connector's own limits apply (backhaul's
/// [`Connector`](crate::connector::Connector) bounds the opens in flight).
///
/// ```no_run
/// use backhaul::connector::Connector;
/// use backhaul::http::proxy::{retarget, ReverseProxy, Timeouts};
/// use backhaul::{QuinnConnection, SessionClient};
/// use tower::ServiceExt;
///
/// # async fn relay(edge: SessionClient<QuinnConnection>,
/// #     mut request: http::Request<hyper::body::Incoming>)
/// #     -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// // On the relay: the edge's "web" service, reached through the tunnel.
/// let proxy = ReverseProxy::new(Connector::new(edge)).with_timeouts(Timeouts::default());
/// retarget(&mut request, "web")?;
/// let response = proxy.oneshot(request).await?;
/// println!("{}", response.status());
/// # Ok(()) }
/// ```
pub struct ReverseProxy<C> {
    upstream: Upstream<C>,
    timeouts: Timeouts,
    linger: Linger,
    on_idle: Option<IdleHook>,
}

impl<C: Clone> Clone for ReverseProxy<C> {
    fn clone(&self) -> Self {
        Self {
            upstream: self.upstream.clone(),
            timeouts: self.timeouts,
            linger: self.linger,
            on_idle: self.on_idle.clone(),
        }
    }
}

impl<C> std::fmt::Debug for ReverseProxy<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReverseProxy")
            .field("timeouts", &self.timeouts)
            .field("linger", &self.linger)
            .finish_non_exhaustive()
    }
}

impl<C> ReverseProxy<C> {
    /// A proxy sending HTTP/1.1 through an [`Http1Pool`] with the default settings over
    /// `connector`.
    pub fn new(connector: C) -> Self {
        Self::with_client(Http1Pool::new(connector))
    }

    /// A proxy sending with `client`: an [`Http1Pool`] or a hyper-util [`Client`] (its
    /// pool, HTTP/2 and buffer settings).
    pub fn with_client(client: impl Into<Upstream<C>>) -> Self {
        Self {
            upstream: client.into(),
            timeouts: Timeouts::default(),
            linger: Linger::DEFAULT,
            on_idle: None,
        }
    }

    /// Replaces the [`Timeouts`].
    #[must_use]
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Calls `hook` (to log, to count) when a response body is cut for stalling.
    #[must_use]
    pub fn on_body_idle(mut self, hook: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        self.on_idle = Some(Arc::new(hook));
        self
    }

    /// How much of an HTTP/1 upload is read on after an answer that came before its end
    /// (default [`Linger::DEFAULT`]; see [`Linger`]).
    #[must_use]
    pub fn with_linger(mut self, linger: Linger) -> Self {
        self.linger = linger;
        self
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// What requests are sent with.
    pub fn upstream(&self) -> &Upstream<C> {
        &self.upstream
    }
}

impl<C, B> Service<Request<B>> for ReverseProxy<C>
where
    C: Connect + PoolConnector + Clone + Send + Sync + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = ForwardError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ForwardError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> ResponseFuture {
        let downstream_upgrade =
            is_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
        strip_hop_by_hop(request.headers_mut(), downstream_upgrade.is_some());
        // An HTTP/1 body is read on for a while if the upstream stops reading it (an
        // early answer), or the client's connection would close under its upload. HTTP/2
        // resets just the stream, and a request without a body (most) needs no care.
        let linger = request.version() < Version::HTTP_2 && !self.linger.reads_nothing();
        // The client picks HTTP/1.1 or HTTP/2 per connection; an HTTP/2 version on an
        // HTTP/1.1 connection would be refused.
        *request.version_mut() = Version::HTTP_11;
        let mut answered = None;
        let request = request.map(|body| {
            if linger && !body.is_end_stream() {
                let upload = Arc::clone(answered.insert(Arc::default()));
                boxed(Lingering::new(boxed(body), self.linger, upload))
            } else {
                boxed(body)
            }
        });
        let response = match &self.upstream {
            Upstream::Http1(pool) => Sending::Http1(Box::pin(pool.send(request))),
            Upstream::Client(client) => Sending::Client(client.request(request)),
        };
        ResponseFuture {
            response,
            deadline: Box::pin(tokio::time::sleep(self.timeouts.response)),
            timeouts: self.timeouts,
            downstream_upgrade,
            on_idle: self.on_idle.clone(),
            answered,
        }
    }
}

/// The response of a [`ReverseProxy`] call.
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture {
    response: Sending,
    deadline: Pin<Box<Sleep>>,
    timeouts: Timeouts,
    downstream_upgrade: Option<OnUpgrade>,
    on_idle: Option<IdleHook>,
    /// Told when the response body ends, if the request's body may still be sending.
    answered: Option<Arc<Answered>>,
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

/// A response body from either kind of [`Upstream`].
type UpstreamBody = Either<hyper::body::Incoming, PooledBody<ProxyBody>>;

type PoolResponse = Result<Response<PooledBody<ProxyBody>>, PoolError>;

/// A request on its way, through one kind of [`Upstream`].
enum Sending {
    Http1(Pin<Box<dyn Future<Output = PoolResponse> + Send>>),
    Client(legacy::ResponseFuture),
}

impl Sending {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<UpstreamBody>, ForwardError>> {
        match self {
            Self::Http1(sending) => sending.as_mut().poll(cx).map(|sent| match sent {
                Ok(response) => Ok(response.map(Either::Right)),
                Err(error) => Err(error.into()),
            }),
            Self::Client(sending) => Pin::new(sending).poll(cx).map(|sent| match sent {
                Ok(response) => Ok(response.map(Either::Left)),
                Err(error) => Err(error.into()),
            }),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<ProxyBody>, ForwardError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut response = match this.response.poll(cx) {
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => {
                return match this.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Err(ForwardError::Timeout(this.timeouts.response)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        };
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            if let Some(downstream) = this.downstream_upgrade.take() {
                spawn_splice(downstream, hyper::upgrade::on(&mut response));
            }
        }
        let codings = body_codings(response.headers());
        strip_hop_by_hop(response.headers_mut(), switching);
        if let Some(codings) = codings {
            // hyper's server writes these and then `chunked`: the client can still decode.
            response.headers_mut().insert(TRANSFER_ENCODING, codings);
        }
        let (idle, on_idle) = (this.timeouts.body_idle, this.on_idle.take());
        let answered = this.answered.take();
        Poll::Ready(Ok(response.map(|body| {
            let body = boxed(IdleTimeoutBody::new(body, idle).on_idle(on_idle));
            match answered {
                Some(answered) if !switching => boxed(EndsUpload::new(body, answered)),
                _ => body,
            }
        })))
    }
}

/// The transfer codings of a response's body other than `chunked` (`gzip` in
/// `Transfer-Encoding: gzip` or `gzip, chunked`): hop-by-hop as a field, but hyper's
/// client undoes only the chunking, so the body the client gets is still coded.
fn body_codings(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(TRANSFER_ENCODING).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        // Several fields: not what servers send; left to strip.
        return None;
    }
    let codings: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("chunked"))
        .collect();
    if codings.is_empty() {
        return None;
    }
    HeaderValue::from_str(&codings.join(", ")).ok()
}
