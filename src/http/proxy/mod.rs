//! Forwarding HTTP requests to an upstream and streaming the responses back: the part
//! every HTTP tunnel service needs, on the relay (public client → edge) and on the edge
//! (tunnel → local service) alike.
//!
//! - [`ReverseProxy`] is a `tower::Service<Request<B>>` over a pooled client ([`Upstream`]:
//!   backhaul's [`Http1Pool`](crate::http::pool::Http1Pool) or hyper-util's client) and any
//!   connector (`HttpConnector`, backhaul's [`Connector`](crate::connector::Connector)):
//!   it strips hop-by-hop headers, sends the request, splices the two connections when the
//!   upstream switches protocols, and bounds how long the response head and each body
//!   frame may take.
//! - [`to_local`] is the edge's route to a local HTTP service (HTTP/1.1, or HTTP/2 with
//!   prior knowledge for `h2c://` upstreams such as gRPC servers), answering failures
//!   itself (502/504 naming the service); [`pass_through`] is the lighter layer-4
//!   alternative, which splices each tunnel stream to the service without parsing HTTP on
//!   the edge.
//! - The pieces, for proxies of your own: [`strip_hop_by_hop`], [`is_upgrade`],
//!   [`takes_trailers`], [`retarget`], [`tunnel_version`], [`splice`],
//!   [`IdleTimeoutBody`], and the failure mapping ([`forward_failure`],
//!   [`tunnel_failure`], [`find_cause`], [`error_chain`]).
//!
//! # HTTP versions through a tunnel
//! A relay forwards most requests to the edge as HTTP/1.1, whatever the public client
//! spoke: each request in flight then has a tunnel stream (a QUIC stream) of its own, so
//! a slow download never holds up another request and each gets the stream's full flow
//! control window. HTTP/2 towards the edge would multiplex every request to a service onto
//! one pooled tunnel stream. What HTTP/1.1 cannot carry faithfully is what gRPC needs:
//! trailers on every response and full-duplex streams. So [`tunnel_version`] picks
//! HTTP/2 for an HTTP/2 request that takes trailers (`TE: trailers`, which every gRPC
//! client sends), and the relay sends it with an HTTP/2 client; the edge's
//! [`serve`](crate::http::serve) speaks both. Trailers, and `TE: trailers`, pass every hop.
//!
//! Bodies stream through without buffering. A stalled upstream body *fails* (rather than
//! ends), so the server aborts the downstream connection and no client takes a truncated
//! body for a complete one.
//!
//! Forwarding fails with this module's [`ForwardError`], not the crate's `Error`: the
//! cause is usually hyper-util's error, whose `source()` chain may itself hold a crate
//! `Error` (a refused or timed-out tunnel open); [`find_cause`] digs it out for mapping to
//! a status, and [`error_chain`] prints the whole chain for logs.
//!
//! ```
//! use backhaul::edge::Router;
//! use backhaul::http::proxy::to_local;
//! use backhaul::QuinnConnection;
//!
//! # fn main() -> Result<(), backhaul::Error> {
//! // The edge exposes the web app on 127.0.0.1:3000 as its "web" service.
//! let web = to_local("http://127.0.0.1:3000".parse().unwrap())?;
//! let router: Router<QuinnConnection> = Router::new().route("web", backhaul::http::serve(web));
//! # drop(router); Ok(()) }
//! ```

mod failure;
mod forward;
pub(crate) mod hop_by_hop;
mod idle;
#[cfg(feature = "tcp")]
pub(crate) mod linger;
mod local;
mod pass_through;
mod upgrade;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

pub use failure::{
    error_chain, express_failure, find_cause, forward_failure, tunnel_failure, Failure,
};
pub use forward::{ForwardError, ResponseFuture, ReverseProxy, Timeouts, Upstream};
pub use hop_by_hop::{is_upgrade, strip_hop_by_hop, takes_trailers};
pub use idle::{BodyIdleTimeout, IdleHook, IdleTimeoutBody};
pub use linger::Linger;
#[cfg(feature = "tcp")]
use local::validate_upstream;
pub use local::{to_local, LocalFuture, LocalUpstream};
#[cfg(feature = "tcp")]
pub use pass_through::{pass_through, PassThrough, PassThroughFuture, DEFAULT_ANSWER_TIMEOUT};
pub use upgrade::splice;

/// Errors of bodies in flight, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type both directions are converted to.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Converts any body into a [`ProxyBody`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A short `text/plain` response (a newline is appended).
pub fn text_response(status: StatusCode, message: impl Into<String>) -> Response<ProxyBody> {
    let mut response = Response::new(boxed(Full::new(Bytes::from(message.into() + "\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Points `request` at `authority` over plain `http`, keeping path and query, as
/// HTTP/1.1 (the client picks the wire version per connection).
///
/// # Errors
/// If `authority` is not a valid URI authority.
pub fn retarget<B>(request: &mut Request<B>, authority: &str) -> Result<(), http::Error> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    let uri = http::Uri::try_from(format!("http://{authority}{path}"))?;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_11;
    Ok(())
}

/// The HTTP version a relay should forward `request` to an edge with: HTTP/2 for an
/// HTTP/2 request that takes trailers ([`takes_trailers`]: gRPC), HTTP/1.1 for everything
/// else (see the [module docs](self#http-versions-through-a-tunnel) for why). The caller
/// sends HTTP/2 requests with a client that speaks HTTP/2 with prior knowledge
/// (hyper-util's `http2_only`).
///
/// ```
/// use backhaul::http::proxy::tunnel_version;
/// use http::{Request, Version};
///
/// let grpc = Request::post("https://grpc.kiosk.example/pkg.Service/Method")
///     .version(Version::HTTP_2)
///     .header("te", "trailers")
///     .header("content-type", "application/grpc")
///     .body(())?;
/// assert_eq!(tunnel_version(&grpc), Version::HTTP_2);
/// let page = Request::get("https://kiosk.example/").version(Version::HTTP_2).body(())?;
/// assert_eq!(tunnel_version(&page), Version::HTTP_11);
/// # Ok::<(), http::Error>(())
/// ```
pub fn tunnel_version<B>(request: &Request<B>) -> http::Version {
    if request.version() == http::Version::HTTP_2 && takes_trailers(request.headers()) {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retarget_keeps_path_and_query() {
        let mut request = Request::get("http://public.example/a/b?c=d")
            .version(http::Version::HTTP_2)
            .body(())
            .expect("a request");
        retarget(&mut request, "web").expect("valid");
        assert_eq!(request.uri(), "http://web/a/b?c=d");
        assert_eq!(request.version(), http::Version::HTTP_11);
        assert!(retarget(&mut request, "bad authority").is_err());
    }
}
