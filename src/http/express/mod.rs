//! The express lane: plain HTTP/1.1 requests forwarded to an edge with each head parsed
//! once, bodies passed through by their framing.
//!
//! The [`Server`](crate::http::server::Server) answers with hyper, and a reverse proxy
//! built on it forwards with hyper's client: a request is parsed from the client,
//! written to the edge, its response parsed from the edge and written to the client,
//! four passes through an HTTP codec plus a hop between two tasks for every request.
//! For the common case, a keep-alive client sending plain requests to one host, most of
//! that work changes nothing, and a relay spends half its CPU on it. The lane does only
//! what a proxy must:
//!
//! - it reads each request head once (`httparse`, the parser hyper itself uses), lets
//!   your [`Express`] route choose the edge and add its forwarding headers, and writes
//!   the head again canonically, without hop-by-hop fields; the standard forwarding
//!   headers it can add itself ([`Upstream::with_forwarding_headers`]), from lines kept
//!   for the connection instead of five fields built and written out per request;
//! - it copies a `Content-Length` body through by count, and reads the answer while it
//!   does, so a service that answers before the body's end (a `413` from a body limit)
//!   or as it reads (a body echoed back) is served as over a direct connection; an answer
//!   that ends before the upload closes the client's connection once it is written if
//!   the service closes its side (the answer then says `Connection: close`), and
//!   otherwise the lane reads the rest of the upload, within its [`Linger`] bounds, and
//!   the connection goes on;
//! - it reads the response head once for its status and framing (length, chunked,
//!   until close) and copies the body through while checking that framing strictly
//!   (`chunked`), so that it knows where the response ends and the stream to the edge
//!   can carry the next request;
//! - it reuses the stream for the next request to the same edge and service, from a
//!   [`StreamPool`] shared by all client connections (or kept by the client connection).
//!
//! **Anything unusual is hyper's.** A head the lane does not read as a plain HTTP/1.1
//! request, or a request your route declines: the lane hands the connection, the head it
//! read included, to hyper and the server's service, which answers that request and
//! every later one on the connection as it would without the lane. So malformed
//! requests get hyper's 400/431, and `Expect`, chunked request bodies, upgrades,
//! HTTP/1.0 and HTTP/2 take the full path. The lane declines at a request boundary only,
//! with nothing in flight, so the handover loses no byte. [`Express::handed_over`] hears
//! of each handover and its [`Handover`] reason, to count how much traffic the lane
//! misses, and why.
//!
//! **Failures before a response head are answered, then the connection closes**: a
//! stream that cannot be opened, fails or ends early, or brings a malformed head is a
//! `502 Bad Gateway`, no head within [`Timeouts::response`] (counted from the last
//! request byte the edge took) a `504 Gateway Timeout`,
//! worded by [`Upstream::answer_failures_with`] if set. A response body that stalls for
//! [`Timeouts::body_idle`] or breaks off cuts the client's connection (a reset, so the
//! client cannot take a truncated body for a whole one).
//!
//! The server's limits apply as on the full path: the header timeout, the idle timeout,
//! the write timeout, the head size, graceful shutdown between requests.
//!
//! # Example
//! A relay whose public server sends `<edge>.example.com` to that edge's `web` service
//! on the lane, and everything else to its own service:
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//!
//! use backhaul::http::express::{Express, RouteFuture, StreamPool, Upstream};
//! use backhaul::http::server::{ConnectionInfo, Server};
//! use backhaul::relay::Registry;
//! use http::request::Parts;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use hyper::body::{Bytes, Incoming};
//!
//! struct ByHost {
//!     registry: Registry,
//!     pool: StreamPool,
//! }
//!
//! impl Express for ByHost {
//!     fn route<'a>(&'a self, head: &'a mut Parts, _info: &'a ConnectionInfo) -> RouteFuture<'a> {
//!         let host = head.headers.get(http::header::HOST).and_then(|host| host.to_str().ok());
//!         let edge = host.and_then(|host| host.strip_suffix(".example.com"));
//!         let upstream = edge.and_then(|edge| self.registry.get(edge)).map(|handle| {
//!             // The epoch tells a reconnected edge's session from the one before.
//!             let key = format!("{}/{}/web", handle.name(), handle.epoch().get());
//!             Upstream::new(key, handle.connector(), "web").with_pool(self.pool.clone())
//!         });
//!         RouteFuture::ready(upstream)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::new(); // filled by the relay's acceptor
//! let pool = StreamPool::new(Duration::from_secs(60), 32);
//! let elsewhere = tower::service_fn(|_request: Request<Incoming>| async {
//!     let mut response = Response::new(Full::new(Bytes::from("no such edge\n")));
//!     *response.status_mut() = StatusCode::NOT_FOUND;
//!     Ok::<_, Infallible>(response)
//! });
//! let server = Server::bind(([127, 0, 0, 1], 0))
//!     .await?
//!     .with_express(ByHost { registry, pool });
//! let serving = tokio::spawn(std::future::IntoFuture::into_future(server.serve(elsewhere)));
//! # serving.abort();
//! # Ok(()) }
//! ```

mod chunked;
mod connection;
mod head;
mod opener;
mod pool;
mod prefixed;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::request::Parts;
use http::{HeaderValue, StatusCode};

use crate::connector::OpenTarget;
use crate::error::Error;
use crate::http::authority::Authority;
use crate::http::forwarded::Proto;
use crate::http::proxy::{Linger, Timeouts};
use crate::http::server::ConnectionInfo;

pub(crate) use connection::{serve, Handoff, LaneContext};
pub use opener::Opener;
pub use pool::StreamPool;
pub(crate) use prefixed::Prefixed;

/// What an [`Express::route`] returns: the upstream decided at once
/// ([`RouteFuture::ready`], which allocates nothing, as most routes can), or a future
/// that decides it ([`RouteFuture::new`]: a directory lookup, say).
#[must_use = "futures do nothing unless polled"]
pub struct RouteFuture<'a> {
    inner: Route<'a>,
}

// Made once per request and awaited at once: boxing the upstream would bring back the
// allocation `ready` avoids.
#[allow(clippy::large_enum_variant)]
enum Route<'a> {
    /// Taken by the first poll.
    Ready(Option<Option<Upstream>>),
    Deciding(Pin<Box<dyn Future<Output = Option<Upstream>> + Send + 'a>>),
}

impl<'a> RouteFuture<'a> {
    /// An upstream decided already (`None` leaves the request to the server's service).
    pub fn ready(upstream: Option<Upstream>) -> Self {
        Self {
            inner: Route::Ready(Some(upstream)),
        }
    }

    /// An upstream `deciding` will choose (boxed once).
    pub fn new(deciding: impl Future<Output = Option<Upstream>> + Send + 'a) -> Self {
        Self {
            inner: Route::Deciding(Box::pin(deciding)),
        }
    }
}

impl Future for RouteFuture<'_> {
    type Output = Option<Upstream>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Upstream>> {
        match &mut self.get_mut().inner {
            Route::Ready(upstream) => Poll::Ready(upstream.take().flatten()),
            Route::Deciding(deciding) => deciding.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for RouteFuture<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let decided = matches!(self.inner, Route::Ready(_));
        f.debug_struct("RouteFuture")
            .field("decided", &decided)
            .finish()
    }
}

/// Where the express lane sends a request; see the [module docs](self).
///
/// `route` sees the request as the edge will receive it: HTTP/1.1 in origin form, with
/// one `Host`, hop-by-hop fields already removed. It adds what the proxy adds (forwarding
/// headers, or [`Upstream::with_forwarding_headers`] to have the lane add them; a
/// rewritten `Host`) and returns the edge to send it to, or `None` to leave
/// the request (and the rest of its connection) to the server's service: for hosts it
/// does not serve, edges on other relays, anything it answers itself.
pub trait Express: Send + Sync + 'static {
    /// Chooses the upstream for `head`, received on the connection `info`.
    fn route<'a>(&'a self, head: &'a mut Parts, info: &'a ConnectionInfo) -> RouteFuture<'a>;

    /// Hears that the lane left the connection `info` to the server's service from
    /// this request on, and why (to count, say; `route` returning `None` is
    /// [`Handover::Route`]). Nothing by default.
    fn handed_over(&self, reason: Handover, info: &ConnectionInfo) {
        let _ = (reason, info);
    }
}

/// Why the lane left a connection to hyper and the server's service; see
/// [`Express::handed_over`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Handover {
    /// HTTP/2, by ALPN or with prior knowledge.
    Http2,
    /// Not HTTP/1.1 (HTTP/1.0, say).
    Version,
    /// A head that does not parse, or was cut short.
    Malformed,
    /// A head longer than the server's limit (hyper answers 431).
    HeadTooLarge,
    /// CONNECT, or a target not in origin form (absolute form, `*`).
    TargetForm,
    /// No `Host`, or more than one.
    Host,
    /// A body the lane would have to decode (`Transfer-Encoding`), or two
    /// `Content-Length`s.
    Framing,
    /// `Expect` (`100-continue`).
    Expect,
    /// A protocol upgrade (WebSocket, `h2c`).
    Upgrade,
    /// The route returned `None`.
    Route,
}

impl Handover {
    /// A short name, for a metric's label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Http2 => "http2",
            Self::Version => "version",
            Self::Malformed => "malformed",
            Self::HeadTooLarge => "head_too_large",
            Self::TargetForm => "target_form",
            Self::Host => "host",
            Self::Framing => "framing",
            Self::Expect => "expect",
            Self::Upgrade => "upgrade",
            Self::Route => "route",
        }
    }
}

impl fmt::Display for Handover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// An edge and service to forward a request to, made by an [`Express`] route.
///
/// Requests on one client connection whose upstreams have the same key go over one
/// stream to the edge, one after the other; a request with another key opens a new one.
/// Two upstreams with the same key must therefore reach the same service of the same
/// edge (a key of edge name and service does).
pub struct Upstream {
    key: String,
    opener: Opener,
    target: OpenTarget,
    timeouts: Timeouts,
    linger: Linger,
    pool: Option<StreamPool>,
    finished: Option<Finished>,
    answer_failure: Option<AnswerFailure>,
    hooks: Option<Arc<dyn Hooks>>,
    /// The public authority and scheme of [`Upstream::with_forwarding_headers`].
    forwarding: Option<(HeaderValue, Proto)>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("key", &self.key)
            .field("target", &self.target)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Forwards to `target` through `opener` (a [`Connector`](crate::connector::Connector)
    /// over the edge's session, or a peer relay's
    /// [`PeerConnector`](crate::relay::peer::PeerConnector)); `key` names the edge and
    /// service (and the way to them).
    pub fn new(
        key: impl Into<String>,
        opener: impl Into<Opener>,
        target: impl Into<OpenTarget>,
    ) -> Self {
        Self {
            key: key.into(),
            opener: opener.into(),
            target: target.into(),
            timeouts: Timeouts::default(),
            linger: Linger::DEFAULT,
            pool: None,
            finished: None,
            answer_failure: None,
            hooks: None,
            forwarding: None,
        }
    }

    /// The response head and response body timeouts (default [`Timeouts::default`]).
    #[must_use]
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// How much of an upload the lane reads on after an answer that came before its end
    /// (default [`Linger::DEFAULT`]): before it closes the client's connection, or, if
    /// the answer kept the connection open, to reach the upload's end and serve the
    /// connection's next request.
    #[must_use]
    pub fn with_linger(mut self, linger: Linger) -> Self {
        self.linger = linger;
        self
    }

    /// Keeps the stream in `pool` between requests, for any client connection's next
    /// request with the same key. Without a pool the stream stays with the client
    /// connection that used it, for as long as that connection lives: fine for a few
    /// known clients; facing the public, a pool bounds the idle streams (and the
    /// connections behind them on the edge).
    #[must_use]
    pub fn with_pool(mut self, pool: StreamPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Words the answer to a failure that came before any response head (the stream
    /// could not be opened, failed, timed out, answered with a malformed head): `answer`
    /// gives the status and the plain-text message, and may take its time (to ping the
    /// edge, say). Without it: [`Failure::status`] and the failure's own words.
    #[must_use]
    pub fn answer_failures_with(
        mut self,
        answer: impl FnOnce(&Failure) -> FailureAnswer + Send + 'static,
    ) -> Self {
        self.answer_failure = Some(Box::new(answer));
        self
    }

    /// Calls `finished` once the exchange is over (answered, failed or cut), for logs
    /// and metrics. Not called if the lane hands the request to hyper.
    #[must_use]
    pub fn on_finished(mut self, finished: impl FnOnce(&Outcome) + Send + 'static) -> Self {
        self.finished = Some(Box::new(finished));
        self
    }

    /// Has the lane set the [forwarding headers](crate::http::forwarded) for a client whose
    /// own it does not believe (one that is not among your
    /// [`TrustedProxies`](crate::http::forwarded::TrustedProxies)): it drops every
    /// `Forwarded`, `X-Forwarded-*` and `X-Real-IP` the client sent and adds the proxy's,
    /// for `authority` reached over `proto`, as
    /// [`TrustedProxies::set_forwarding_headers`](crate::http::forwarded::TrustedProxies::set_forwarding_headers)
    /// does for such a peer.
    ///
    /// The same request head as the route setting them, for less work: the lane keeps the
    /// five field lines for the connection (its client's address does not change, and its
    /// authority rarely does) and appends them as they are, where the route would build and
    /// hash five fields per request, and the lane write them out again. For a trusted
    /// peer, whose chains are extended, set them in `route` instead.
    #[must_use]
    pub fn with_forwarding_headers(mut self, authority: &Authority, proto: Proto) -> Self {
        self.forwarding = Some((authority.to_header_value(), proto));
        self
    }

    /// Both hooks in one object: [`Hooks::answer`] words failures (unless
    /// [`answer_failures_with`](Self::answer_failures_with) is set too) and
    /// [`Hooks::finished`] hears the outcome (after [`on_finished`](Self::on_finished),
    /// if set). One `Arc` per request, or none for hooks shared by many, where the two
    /// closures cost a box each.
    #[must_use]
    pub fn with_hooks(mut self, hooks: Arc<dyn Hooks>) -> Self {
        self.hooks = Some(hooks);
        self
    }
}

/// What the lane tells whoever routed a request: set with [`Upstream::with_hooks`].
///
/// ```
/// use std::sync::Arc;
/// use backhaul::http::express::{Failure, FailureAnswer, Hooks, Outcome};
/// use http::StatusCode;
///
/// /// One request's hooks: its edge's name, for the words and the log.
/// struct Request {
///     edge: String,
/// }
///
/// impl Hooks for Request {
///     fn answer(self: Arc<Self>, failure: &Failure) -> FailureAnswer {
///         let message = format!("edge {} did not answer: {failure}", self.edge);
///         Box::pin(async move { (StatusCode::BAD_GATEWAY, message) })
///     }
///
///     fn finished(&self, outcome: &Outcome) {
///         println!("{}: {:?} in {:?}", self.edge, outcome.status, outcome.elapsed);
///     }
/// }
/// ```
pub trait Hooks: Send + Sync + 'static {
    /// Words the answer to a failure that came before any response head; see
    /// [`Upstream::answer_failures_with`]. By default: [`Failure::status`] and the
    /// failure's own words.
    fn answer(self: Arc<Self>, failure: &Failure) -> FailureAnswer {
        let answer = (failure.status(), failure.to_string());
        Box::pin(std::future::ready(answer))
    }

    /// Told once the exchange is over (answered, failed or cut); see
    /// [`Upstream::on_finished`]. Does nothing by default.
    fn finished(&self, outcome: &Outcome) {
        let _ = outcome;
    }
}

/// The hook told how an exchange went.
type Finished = Box<dyn FnOnce(&Outcome) + Send>;

/// What a failure is answered with: a status and a plain-text message.
pub type FailureAnswer = Pin<Box<dyn Future<Output = (StatusCode, String)> + Send>>;

/// The hook that words failures for the client.
type AnswerFailure = Box<dyn FnOnce(&Failure) -> FailureAnswer + Send>;

/// How one request on the express lane went.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The status the client received: the edge's, or the lane's own 502/504. `None` if
    /// the connection was cut before a response head was sent.
    pub status: Option<StatusCode>,
    /// From the request head read to the response's last byte written.
    pub elapsed: Duration,
    /// Request body bytes sent to the edge.
    pub request_body_bytes: u64,
    /// Response body bytes sent to the client.
    pub response_body_bytes: u64,
    /// Streams to the edge this request opened: 1 for a new stream, 0 on a kept one, one
    /// more when a kept stream failed before answering and the request was sent again on
    /// a new one. (An open that fails hands the request to hyper, which opens and reports
    /// on its own.)
    pub streams_opened: u32,
    /// What went wrong, if the exchange did not complete.
    pub failure: Option<Failure>,
}

/// Why an express exchange did not complete.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// No stream to the edge could be opened (the session's error: the edge refused,
    /// is busy, went away, did not answer the open in time).
    #[error("no stream to the edge: {0}")]
    Open(Arc<Error>),
    /// The stream to the edge failed (open, write or read).
    #[error("the stream to the edge failed: {0}")]
    Upstream(String),
    /// The edge's response head was not HTTP the lane can pass on.
    #[error("the edge's response is malformed: {0}")]
    BadResponse(String),
    /// No response head within [`Timeouts::response`].
    #[error("no response head within {0:?}")]
    ResponseTimeout(Duration),
    /// The response body stalled for [`Timeouts::body_idle`].
    #[error("the response body stalled for {0:?}")]
    BodyIdle(Duration),
    /// The client went away or could not be written to.
    #[error("the client's connection failed: {0}")]
    Client(String),
}

impl PartialEq for Failure {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            // Session errors are not comparable: their messages are.
            (Self::Open(a), Self::Open(b)) => a.to_string() == b.to_string(),
            (Self::Upstream(a), Self::Upstream(b))
            | (Self::BadResponse(a), Self::BadResponse(b))
            | (Self::Client(a), Self::Client(b)) => a == b,
            (Self::ResponseTimeout(a), Self::ResponseTimeout(b))
            | (Self::BodyIdle(a), Self::BodyIdle(b)) => a == b,
            _ => false,
        }
    }
}

impl Failure {
    /// The status the lane answers this failure with when no response head went out
    /// yet (and no [`Upstream::answer_failures_with`] says otherwise): 504 for a
    /// response timeout, 502 for the rest.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}
