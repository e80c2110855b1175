//! The edge's route to a local HTTP service: [`to_local`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::Authority;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Body;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::Service;
use tracing::warn;

use super::failure::error_chain;
use super::forward::{ForwardError, ResponseFuture, ReverseProxy, Timeouts, Upstream};
use super::{retarget, text_response, BoxError, ProxyBody};
use crate::error::Error;
use crate::http::pool::Http1Pool;

/// A route to the HTTP service at `upstream`, for an edge's
/// [`Router`](crate::edge::Router) via [`serve`](crate::http::serve): `http://host:port`
/// speaks HTTP/1.1 to it (HTTP/2 if the service offers it by ALPN, which plain TCP has
/// not), `h2c://host:port` HTTP/2 with prior knowledge, as gRPC servers (tonic, grpc-go)
/// and other HTTP/2-only services want; trailers cross either way.
///
/// Each request from the tunnel is forwarded with a [`ReverseProxy`] over TCP: headers
/// pass through except hop-by-hop ones (the relay's forwarding headers and Host reach the
/// service as the relay set them; an HTTP/2 request's `:authority` becomes Host), bodies
/// stream both ways, WebSocket upgrades are spliced, and a stalled response body aborts
/// the response. Failures are answered here, naming the service: 502 when it cannot be
/// reached, 504 when it does not answer in time. An `h2c://` service is reached over one
/// pooled HTTP/2 connection, so WebSocket upgrades (HTTP/1.1) do not reach it.
///
/// ```
/// use backhaul::edge::Router;
/// use backhaul::http::proxy::{to_local, Timeouts};
/// use backhaul::QuinnConnection;
/// use std::time::Duration;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let web = to_local("http://127.0.0.1:3000".parse()?)?
///     .with_description("local service \"web\" at 127.0.0.1:3000")
///     .with_timeouts(Timeouts { response: Duration::from_secs(30), ..Timeouts::default() });
/// // A gRPC server, spoken to in HTTP/2 with prior knowledge.
/// let grpc = to_local("h2c://127.0.0.1:50051".parse()?)?;
/// let router: Router<QuinnConnection> = Router::new()
///     .route("web", backhaul::http::serve(web))
///     .route("grpc", backhaul::http::serve(grpc));
/// # drop(router); Ok(()) }
/// ```
///
/// # Errors
/// [`Error::InvalidUpstream`] if `upstream` is not `http://` or `h2c://` with a host and
/// nothing after the authority (no path but `/`, no query).
pub fn to_local(upstream: Uri) -> Result<LocalUpstream, Error> {
    let (authority, http2) = validate_upstream(&upstream, Scheme::HttpOrH2c)?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    // HTTP/1.1 through backhaul's lean pool; HTTP/2 through hyper-util's client, which
    // multiplexes one connection.
    let proxy = if http2 {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        ReverseProxy::with_client(client)
    } else {
        ReverseProxy::with_client(Http1Pool::new(connector))
    };
    Ok(LocalUpstream {
        description: Arc::from(format!("local service at {authority}")),
        authority,
        proxy,
        rewrite_host: false,
        http2,
    })
}

/// A route to a local HTTP service; made by [`to_local`].
#[derive(Clone)]
pub struct LocalUpstream {
    authority: Authority,
    proxy: ReverseProxy<HttpConnector>,
    description: Arc<str>,
    rewrite_host: bool,
    http2: bool,
}

impl std::fmt::Debug for LocalUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalUpstream")
            .field("authority", &self.authority)
            .field("description", &self.description)
            .field("rewrite_host", &self.rewrite_host)
            .field("http2", &self.http2)
            .finish_non_exhaustive()
    }
}

impl LocalUpstream {
    /// How failures and logs name the service (default `local service at HOST:PORT`);
    /// e.g. `edge "kiosk": local service "web" at 127.0.0.1:3000`.
    #[must_use]
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Arc::from(description.into());
        self
    }

    /// Sends the upstream's own authority as Host instead of the public one (for services
    /// that only answer to their own name). Off by default.
    #[must_use]
    pub fn with_host_rewrite(mut self, rewrite: bool) -> Self {
        self.rewrite_host = rewrite;
        self
    }

    /// Replaces the [`Timeouts`] (60 s each by default).
    #[must_use]
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.proxy = self.proxy.with_timeouts(timeouts);
        self
    }

    /// Sends with `client` (an [`Http1Pool`] or a hyper-util `Client`, with their pool and
    /// connector settings) instead of a default one; for an `h2c://` upstream, a
    /// hyper-util client built `http2_only`.
    #[must_use]
    pub fn with_client(mut self, client: impl Into<Upstream<HttpConnector>>) -> Self {
        let timeouts = self.proxy.timeouts();
        self.proxy = ReverseProxy::with_client(client).with_timeouts(timeouts);
        self
    }
}

/// Which schemes a local upstream may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scheme {
    /// `http://` only.
    Http,
    /// `http://` or `h2c://` (HTTP/2 with prior knowledge).
    HttpOrH2c,
}

/// The authority of a local upstream given as `http://host:port` (or `h2c://` where
/// allowed), nothing after it, and whether it speaks HTTP/2 with prior knowledge.
pub(super) fn validate_upstream(
    upstream: &Uri,
    schemes: Scheme,
) -> Result<(Authority, bool), Error> {
    let invalid = |reason| Error::InvalidUpstream {
        uri: upstream.clone(),
        reason,
    };
    let http2 = match (upstream.scheme_str(), schemes) {
        (Some("http"), _) => false,
        (Some("h2c"), Scheme::HttpOrH2c) => true,
        (_, Scheme::HttpOrH2c) => {
            return Err(invalid("only http:// and h2c:// upstreams are supported"))
        }
        (_, Scheme::Http) => return Err(invalid("only http:// upstreams are supported")),
    };
    let Some(authority) = upstream.authority().cloned() else {
        return Err(invalid("no host"));
    };
    if upstream
        .path_and_query()
        .is_some_and(|path| path.as_str() != "/")
    {
        return Err(invalid("a path or query cannot be forwarded to"));
    }
    Ok((authority, http2))
}

/// The answer when forwarding to the service `description` failed.
fn failure(description: &str, error: &ForwardError) -> Response<ProxyBody> {
    let (status, message) = match error {
        ForwardError::Timeout(limit) => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("{description} did not answer within {limit:?}"),
        ),
        error => (
            StatusCode::BAD_GATEWAY,
            format!("{description} is unreachable: {}", error_chain(error)),
        ),
    };
    // The message may hold text from the upstream: Debug escapes it in the log.
    warn!(status = status.as_u16(), error = ?message, "forwarding to the local service failed");
    text_response(status, message)
}

impl<B> Service<Request<B>> for LocalUpstream
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = LocalFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> LocalFuture {
        // HTTP/2 carries the authority in the URI, not in Host: keep it as Host.
        let public_host = request.headers().get(HOST).cloned().or_else(|| {
            let authority = request.uri().authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        if let Err(error) = retarget(&mut request, self.authority.as_str()) {
            let answer = text_response(
                StatusCode::BAD_REQUEST,
                format!("bad request target: {error}"),
            );
            return LocalFuture::answered(answer);
        }
        let host = if self.rewrite_host {
            HeaderValue::from_str(self.authority.as_str()).ok()
        } else {
            public_host
        };
        if let Some(host) = host {
            request.headers_mut().insert(HOST, host);
        }
        let description = Arc::clone(&self.description);
        let mut proxy = self.proxy.clone().on_body_idle(move |idle| {
            warn!(
                ?idle,
                "{description} stalled mid-body: aborting the response"
            );
        });
        LocalFuture {
            state: State::Forwarding {
                response: proxy.call(request),
                description: Arc::clone(&self.description),
            },
        }
    }
}

/// The response of a [`LocalUpstream`] call: the service's, or one describing why it
/// could not be had.
#[must_use = "futures do nothing unless polled"]
pub struct LocalFuture {
    state: State,
}

enum State {
    Forwarding {
        response: ResponseFuture,
        description: Arc<str>,
    },
    Answered(Option<Response<ProxyBody>>),
}

impl LocalFuture {
    fn answered(response: Response<ProxyBody>) -> Self {
        Self {
            state: State::Answered(Some(response)),
        }
    }
}

impl std::fmt::Debug for LocalFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalFuture").finish_non_exhaustive()
    }
}

impl Future for LocalFuture {
    type Output = Result<Response<ProxyBody>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Forwarding {
                response,
                description,
            } => match Pin::new(response).poll(cx) {
                Poll::Ready(Ok(response)) => Poll::Ready(Ok(response)),
                Poll::Ready(Err(error)) => Poll::Ready(Ok(failure(description, &error))),
                Poll::Pending => Poll::Pending,
            },
            State::Answered(response) => Poll::Ready(Ok(response
                .take()
                .expect("LocalFuture polled after completion"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_must_be_plain_http_authorities() {
        assert!(to_local("http://127.0.0.1:3000".parse().expect("a URI")).is_ok());
        assert!(to_local("http://127.0.0.1:3000/".parse().expect("a URI")).is_ok());
        let grpc = to_local("h2c://127.0.0.1:50051".parse().expect("a URI")).expect("h2c");
        assert!(grpc.http2);
        for bad in [
            "https://127.0.0.1:3000",
            "h2://127.0.0.1:3000",
            "h2c://127.0.0.1:50051/pkg.Service",
            "/just/a/path",
            "http://127.0.0.1:3000/app",
            "http://127.0.0.1:3000/?x=1",
        ] {
            match to_local(bad.parse().expect("a URI")) {
                Err(Error::InvalidUpstream { uri, .. }) => assert_eq!(uri, bad),
                other => panic!("{bad:?} must be refused, got {other:?}"),
            }
        }
    }
}
