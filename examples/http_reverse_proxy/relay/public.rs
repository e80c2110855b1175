//! The public HTTP listener: routing by Host, forwarding to edges, mapping failures.
//!
//! A request is checked before it goes anywhere: its authority strictly
//! (`backhaul::http::authority`), CONNECT refused (the relay is not a forward proxy). What
//! the edge receives: the request minus hop-by-hop headers (and any h2c upgrade), with
//! Host set to the public authority whatever the client's HTTP version (the relay's
//! client would otherwise derive it from the retargeted URI, i.e. the service name), and
//! the library's forwarding headers (`backhaul::http::forwarded`). It goes to the edge as
//! HTTP/1.1, or as HTTP/2 when it is an HTTP/2 request taking trailers (gRPC), so that
//! trailers and full-duplex streams survive (`backhaul::http::proxy::tunnel_version`).
//!
//! Forwarding and failure mapping are the library's (`backhaul::http::proxy`): failures
//! are answered in words an operator can act on (which edge, which service, what
//! happened) and logged with their full error chain; a timeout is followed by a short
//! ping, so an edge that does not answer it is "not responding" (502), not slow (504).

use backhaul::http::authority::{request_authority, Authority, Host};
use backhaul::http::forwarded::Proto;
use backhaul::http::pool::PoolConnector;
use backhaul::http::proxy::{
    boxed, is_upgrade, retarget, strip_hop_by_hop, tunnel_version, ReverseProxy, Timeouts, Upstream,
};
use http::Method;
use hyper_util::client::legacy::connect::Connect;
use tower::ServiceExt;

use super::cluster::peer_failure;
use super::express::RelayExpress;
use super::host::{resolve_host, EdgePlacement, Target};
use super::*;
use backhaul::{QuinnConnection, SessionClient};

/// Serves the public on `listener`: over TLS with `tls`; with `redirect_to`, every plain
/// HTTP request is answered with a redirect to HTTPS on that port instead.
pub(super) async fn serve_public(
    listener: TcpListener,
    state: Arc<RelayState>,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    redirect_to: Option<u16>,
    stop: watch::Receiver<bool>,
) {
    let observer = ListenerMetrics::new(
        &state.metrics,
        if tls.is_some() { "https" } else { "public" },
    );
    let state_for_express = Arc::clone(&state);
    let service = tower::service_fn(move |request: Request<Incoming>| {
        // The server puts the connection's addresses in every request.
        let info = request.extensions().get::<ConnectionInfo>().copied();
        let remote = info.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |info| info.peer_addr());
        let proto = match info {
            Some(info) if info.is_secure() => Proto::Https,
            _ => Proto::Http,
        };
        let state = Arc::clone(&state);
        // Boxed: the forwarding future is several KiB, and hyper moves the service's
        // future into its dispatcher; a pointer is cheaper to move than the state machine
        // (the copies showed in profiles as ~5 % of the relay's CPU).
        Box::pin(async move {
            if let Some(port) = redirect_to {
                return Ok(redirect_to_https(&request, port));
            }
            handle_request(state, request, remote, proto).await
        })
    });
    let mut server = Server::from_listener(listener)
        .with_limits(limits)
        .with_observer(observer);
    if let Some(tls) = tls {
        server = server.with_tls(tls);
    }
    // The express lane carries what it can; the redirecting listener answers everything.
    if state_for_express.express.is_some() && redirect_to.is_none() {
        server = server.with_express(RelayExpress {
            state: Arc::clone(&state_for_express),
        });
    }
    // On shards, each connection goes to the shard of the edge its host routes to.
    if let Some(shards) = &state_for_express.shards {
        let placement = EdgePlacement {
            registry: state_for_express.registry.clone(),
            domain: state_for_express.domain.clone(),
            default_service: state_for_express.default_service.clone(),
        };
        server = server.with_shards(shards.clone(), placement);
    }
    serve_http(server, service, stop).await;
}

/// A 308 to the same authority and path over HTTPS on `port`.
fn redirect_to_https(request: &Request<Incoming>, port: u16) -> Response<ProxyBody> {
    let authority = request_authority(request.version(), request.uri(), request.headers());
    let Ok(Some(authority)) = authority else {
        return text_response(StatusCode::BAD_REQUEST, "a request needs one valid Host");
    };
    let host = match authority.host() {
        Host::Name(name) => name.clone(),
        Host::Ip(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        Host::Ip(ip) => ip.to_string(),
    };
    let port = if port == 443 {
        String::new()
    } else {
        format!(":{port}")
    };
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let location = format!("https://{host}{port}{path}");
    let mut response = text_response(
        StatusCode::PERMANENT_REDIRECT,
        format!("moved to {location}"),
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(http::header::LOCATION, value);
    }
    response
}

async fn handle_request(
    state: Arc<RelayState>,
    request: Request<Incoming>,
    remote: SocketAddr,
    proto: Proto,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let span = info_span!(
        "request",
        method = %request.method(),
        host = tracing::field::Empty,
        path = ?request.uri().path(),
        edge = tracing::field::Empty,
        service = tracing::field::Empty,
    );
    let response = checked_route(&state, request, remote, proto)
        .instrument(span.clone())
        .await;
    record_request(&state, &span, response.status(), started.elapsed());
    Ok(response)
}

/// Counts an answered request and writes its access log line in `span`.
pub(super) fn record_request(
    state: &RelayState,
    span: &tracing::Span,
    status: StatusCode,
    elapsed: Duration,
) {
    state.metrics.record_request(status, elapsed);
    span.in_scope(|| info!(status = status.as_u16(), ?elapsed, "request"));
}

/// Refuses what must not be forwarded, then routes by the request's authority.
async fn checked_route(
    state: &RelayState,
    request: Request<Incoming>,
    remote: SocketAddr,
    proto: Proto,
) -> Response<ProxyBody> {
    if request.method() == Method::CONNECT {
        let mut response = text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served: the relay is a reverse proxy, not a forward one",
        );
        response.headers_mut().insert(
            http::header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        return response;
    }
    let authority = match request_authority(request.version(), request.uri(), request.headers()) {
        Ok(authority) => authority,
        Err(error) => {
            debug!(%error, "malformed request authority");
            return text_response(StatusCode::BAD_REQUEST, format!("bad request: {error}"));
        }
    };
    if let Some(authority) = &authority {
        // Validated: only LDH, dots, digits, brackets and colons, safe to log as is.
        tracing::Span::current().record("host", authority.as_str());
    }
    route(state, request, remote, authority, proto).await
}

async fn route(
    state: &RelayState,
    request: Request<Incoming>,
    remote: SocketAddr,
    authority: Option<Authority>,
    proto: Proto,
) -> Response<ProxyBody> {
    let target = resolve_host(authority.as_ref(), &state.domain, &state.default_service);
    let (edge_name, service, authority) = match (target, &authority) {
        (Target::Index, _) => return index_page(state),
        (Target::Edge { edge, service }, Some(_)) => (
            edge.to_owned(),
            service.to_owned(),
            authority.expect("matched as Some"),
        ),
        (_, authority) => {
            let host = authority.as_ref().map_or("", Authority::as_str);
            return text_response(
                StatusCode::NOT_FOUND,
                format!("unknown host {host:?}: use <edge>.{}", state.domain),
            );
        }
    };
    let span = tracing::Span::current();
    span.record("edge", edge_name.as_str());
    span.record("service", service.as_str());
    // HTTP/2 to the edge for what needs it (gRPC: trailers), HTTP/1.1 for the rest.
    let version = tunnel_version(&request);
    let edge = match state.edge(&edge_name, version).await {
        Ok(Some(edge)) => edge,
        Ok(None) => {
            return text_response(
                StatusCode::BAD_GATEWAY,
                format!("edge {edge_name:?} is not connected"),
            )
        }
        Err(failure) => {
            warn!(error = ?failure.detail, status = failure.status.as_u16(), "no way to the edge");
            return failure.into_response();
        }
    };
    let to_edge = state.metrics.bytes_to_edge().clone();
    let mut request = request.map(|body| CountingBody::new(body, to_edge));
    if let Err(error) = retarget(&mut request, &service) {
        return text_response(
            StatusCode::BAD_REQUEST,
            format!("bad request target: {error}"),
        );
    }
    // Stripped before the relay's own headers go on, so a client's `Connection` cannot
    // name them away; Host is the public authority whatever the client's HTTP version.
    let headers = request.headers_mut();
    strip_hop_by_hop(headers, is_upgrade(headers));
    let trusted = &state.trusted_proxies;
    trusted.set_forwarding_headers(headers, remote.ip(), &authority, proto);
    headers.insert(HOST, authority.to_header_value());
    let failure = match edge {
        EdgeRoute::Local(edge) => {
            match forward(state, edge.http.clone(), request, &edge_name, &service).await {
                Ok(response) => return response,
                Err(error) => explain_failure(state, &edge, &edge_name, &service, &error).await,
            }
        }
        EdgeRoute::Peer(route) => {
            // The far relay splices the stream to its edge untouched: the forwarding
            // headers set above reach the edge as they are.
            let forwarded = &state.metrics.requests_forwarded;
            forwarded.with_label_values(&[route.relay.as_str()]).inc();
            match forward(state, route.http.clone(), request, &edge_name, &service).await {
                Ok(response) => return response,
                Err(error) => match &state.cluster {
                    Some(cluster) => {
                        cluster.forget(route.address, &edge_name);
                        peer_failure(cluster, &route, &error, &edge_name, &service)
                    }
                    None => forward_failure(&error, &edge_name, &service),
                },
            }
        }
    };
    // The chain can hold text from the edge (a rejection reason): Debug escapes it.
    warn!(error = ?failure.detail, status = failure.status.as_u16(), "forwarding to the edge failed");
    failure.into_response()
}

/// Sends `request` with `client` (to a local edge or through a peer relay), with the
/// relay's timeouts, counting the response body's bytes.
async fn forward<C, B>(
    state: &RelayState,
    client: impl Into<Upstream<C>>,
    request: Request<B>,
    edge: &str,
    service: &str,
) -> Result<Response<ProxyBody>, ForwardError>
where
    C: Connect + PoolConnector,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let proxy = ReverseProxy::with_client(client)
        .with_timeouts(Timeouts {
            response: state.request_timeout,
            body_idle: state.upstream_idle_timeout,
        })
        .with_linger(state.linger)
        .on_body_idle(idle_hook(state, edge, service));
    let response = proxy.oneshot(request).await?;
    let from_edge = state.metrics.bytes_from_edge().clone();
    Ok(response.map(|body| boxed(CountingBody::new(body, from_edge))))
}

/// Logs and counts an edge response body cut for stalling.
fn idle_hook(state: &RelayState, edge: &str, service: &str) -> impl Fn(Duration) {
    let counter = state.metrics.upstream_idle_timeouts.clone();
    let span = tracing::Span::current();
    let (edge, service) = (edge.to_owned(), service.to_owned());
    move |idle| {
        counter.inc();
        span.in_scope(|| {
            warn!(
                %edge,
                %service,
                ?idle,
                "the edge stalled mid-body: aborting the client's response"
            )
        });
    }
}

/// What went wrong on the way to `edge` (the library's mapping), revised by
/// [`what_only_the_relay_knows`]; a failure that is no tunnel error broke the stream.
async fn explain_failure(
    state: &RelayState,
    edge: &EdgeEntry,
    name: &str,
    service: &str,
    error: &ForwardError,
) -> Failure {
    let failure = forward_failure(error, name, service);
    let broke = find_cause::<Error>(error).is_none();
    what_only_the_relay_knows(state, edge.client(), name, failure, broke).await
}

/// Revises a mapped failure with what only the relay knows, on both of its paths: a
/// timeout is checked with a ping (no pong: 502 "not responding"), and a stream that
/// `broke` on a closed QUIC connection is the edge going offline.
pub(super) async fn what_only_the_relay_knows(
    state: &RelayState,
    client: &SessionClient<QuinnConnection>,
    name: &str,
    failure: Failure,
    broke: bool,
) -> Failure {
    if failure.is_timeout() {
        return failure.probe(client, name, state.edge_probe_timeout).await;
    }
    match client.connection().inner().close_reason() {
        Some(reason) if broke => Failure::new(
            StatusCode::BAD_GATEWAY,
            format!("edge {name:?} went offline mid-request (its connection was lost)"),
            format!("{}; the edge's connection ended: {reason}", failure.detail),
        ),
        _ => failure,
    }
}

fn index_page(state: &RelayState) -> Response<ProxyBody> {
    // Edge names are private unless the operator opts in (--list-edges).
    if !state.list_edges {
        return text_response(StatusCode::OK, "backhaul relay".to_owned());
    }
    let edges = state.edge_names();
    let mut page = format!(
        "backhaul relay for *.{}\n\nconnected edges ({}):\n",
        state.domain,
        edges.len()
    );
    for edge in edges {
        page.push_str(&format!("  http://{edge}.{}/\n", state.domain));
    }
    text_response(StatusCode::OK, page.trim_end().to_owned())
}
