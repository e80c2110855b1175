//! The public HTTP listener: routing by Host, forwarding to edges, mapping failures.
//!
//! A request is checked before it goes anywhere: its authority strictly (see `host`),
//! CONNECT refused (the relay is not a forward proxy). What the edge receives: the
//! request minus hop-by-hop headers (and any h2c upgrade), with Host set to the public
//! authority whatever the client's HTTP version (the relay's client would otherwise
//! derive it from the retargeted URI, i.e. the service name), and the forwarding headers
//! of `forwarded`, set after hop-by-hop stripping.
//!
//! Failures are answered in words an operator can act on (which edge, which service,
//! what happened), and logged with their full error chain. A timeout towards an edge is
//! followed by a short ping: an edge that does not answer it is reported as not
//! responding (502) rather than slow (504).

use http::Method;

use super::forwarded::set_forwarding_headers;
use super::host::{request_authority, resolve_host, Authority, Target};
use super::*;

pub(super) async fn serve_public(
    listener: TcpListener,
    state: Arc<RelayState>,
    limits: Limits,
    stop: watch::Receiver<bool>,
) {
    let observer = ListenerMetrics::new(&state.metrics, "public");
    let service = tower::service_fn(move |request: Request<Incoming>| {
        // The server puts the connection's addresses in every request.
        let remote = request.extensions().get::<ConnectionInfo>().map_or(
            SocketAddr::from(([0, 0, 0, 0], 0)),
            ConnectionInfo::peer_addr,
        );
        handle_request(Arc::clone(&state), request, remote)
    });
    serve_http(listener, limits, observer, service, stop).await;
}

async fn handle_request(
    state: Arc<RelayState>,
    request: Request<Incoming>,
    remote: SocketAddr,
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
    let response = checked_route(&state, request, remote)
        .instrument(span.clone())
        .await;
    let status = response.status();
    let elapsed = started.elapsed();
    state
        .metrics
        .requests
        .with_label_values(&[status.as_str()])
        .inc();
    let class = format!("{}xx", status.as_u16() / 100);
    state
        .metrics
        .request_duration
        .with_label_values(&[class.as_str()])
        .observe(elapsed.as_secs_f64());
    span.in_scope(|| info!(status = status.as_u16(), ?elapsed, "request"));
    Ok(response)
}

/// Refuses what must not be forwarded, then routes by the request's authority.
async fn checked_route(
    state: &RelayState,
    request: Request<Incoming>,
    remote: SocketAddr,
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
    route(state, request, remote, authority).await
}

async fn route(
    state: &RelayState,
    mut request: Request<Incoming>,
    remote: SocketAddr,
    authority: Option<Authority>,
) -> Response<ProxyBody> {
    let target = resolve_host(authority.as_ref(), &state.domain, &state.default_service);
    let (edge_name, service, authority) = match (target, authority) {
        (Target::Index, _) => return index_page(state),
        (Target::Edge { edge, service }, Some(authority)) => (edge, service, authority),
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
    let edge = match state.edge(&edge_name).await {
        Ok(Some(edge)) => edge,
        Ok(None) => {
            return text_response(
                StatusCode::BAD_GATEWAY,
                format!("edge {edge_name:?} is not connected"),
            )
        }
        Err(error) => {
            warn!(error = ?error_chain(&error), "looking the edge up failed");
            return text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("edge {edge_name:?} cannot be looked up now: try again later"),
            );
        }
    };
    let upgrade = is_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
    let to_edge = state.metrics.bytes_counter("to_edge");
    let mut request = request.map(|body| boxed(CountingBody::new(body, to_edge)));
    if let Err(error) = retarget(&mut request, &service) {
        return text_response(
            StatusCode::BAD_REQUEST,
            format!("bad request target: {error}"),
        );
    }
    let peer_is_trusted = state.trusted_proxies.contains(remote.ip());
    let set_headers = |headers: &mut http::HeaderMap| {
        set_forwarding_headers(headers, remote.ip(), authority.as_str(), peer_is_trusted);
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            headers.insert(HOST, host);
        }
    };
    let timeouts = UpstreamTimeouts {
        response: state.request_timeout,
        body_idle: state.upstream_idle_timeout,
    };
    let on_idle = idle_hook(state, &edge_name, &service);
    match forward(&edge.http, request, upgrade, set_headers, timeouts, on_idle).await {
        Ok(response) => {
            let from_edge = state.metrics.bytes_counter("from_edge");
            response.map(|body| boxed(CountingBody::new(body, from_edge)))
        }
        Err(error) => {
            let failure = explain_failure(state, &edge, &edge_name, &service, error).await;
            // The chain can hold text from the edge (a rejection reason): Debug escapes it.
            warn!(error = ?failure.detail, status = failure.status.as_u16(), "forwarding to the edge failed");
            text_response(failure.status, failure.message)
        }
    }
}

/// Logs and counts an edge response body cut for stalling.
fn idle_hook(state: &RelayState, edge: &str, service: &str) -> IdleHook {
    let counter = state.metrics.upstream_idle_timeouts.clone();
    let span = tracing::Span::current();
    let (edge, service) = (edge.to_owned(), service.to_owned());
    Arc::new(move |idle| {
        counter.inc();
        span.in_scope(|| {
            warn!(
                %edge,
                %service,
                ?idle,
                "the edge stalled mid-body: aborting the client's response"
            )
        });
    })
}

/// A failed forward, as the client and the log see it.
struct Failure {
    status: StatusCode,
    /// For the client: which edge or service, and what happened, in plain words.
    message: String,
    /// For the log: the full error chain.
    detail: String,
}

/// What went wrong on the way to `edge`. A timeout is checked with a ping: an edge that
/// does not answer it is not responding at all (502), one that does is slow (504).
async fn explain_failure(
    state: &RelayState,
    edge: &EdgeEntry,
    name: &str,
    service: &str,
    error: ForwardError,
) -> Failure {
    let error = match error {
        ForwardError::Timeout => {
            let slow = format!(
                "edge {name:?} did not answer within {:?}",
                state.request_timeout
            );
            let detail = format!("no response head within {:?}", state.request_timeout);
            return timed_out(state, edge, name, slow, detail).await;
        }
        ForwardError::Upstream(error) => error,
    };
    let detail = error_chain(&error);
    if let Some(tunnel) = find_cause::<Error>(&error) {
        if let Error::Timeout(_) = tunnel {
            let slow = format!(
                "edge {name:?} did not open a stream within {:?}",
                state.open_timeout
            );
            return timed_out(state, edge, name, slow, detail).await;
        }
        let (status, message) = tunnel_failure(tunnel, name, service);
        return Failure {
            status,
            message,
            detail,
        };
    }
    if let Some(reason) = edge.client().connection().inner().close_reason() {
        return Failure {
            status: StatusCode::BAD_GATEWAY,
            message: format!("edge {name:?} went offline mid-request (its connection was lost)"),
            detail: format!("{detail}; the edge's connection ended: {reason}"),
        };
    }
    let (status, message) = match find_cause::<hyper::Error>(&error) {
        Some(http) if http.is_user() => (
            StatusCode::BAD_REQUEST,
            format!("the request could not be sent to edge {name:?}: {http}"),
        ),
        Some(http) if http.is_incomplete_message() || http.is_canceled() || http.is_closed() => (
            StatusCode::BAD_GATEWAY,
            format!(
                "edge {name:?} closed the connection before answering (it may have gone offline mid-request)"
            ),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            format!("edge {name:?} failed: {detail}"),
        ),
    };
    Failure {
        status,
        message,
        detail,
    }
}

/// After a timeout: 502 if the edge does not even answer a ping, else 504 with `slow`.
async fn timed_out(
    state: &RelayState,
    edge: &EdgeEntry,
    name: &str,
    slow: String,
    detail: String,
) -> Failure {
    let probe = state.edge_probe_timeout;
    match tokio::time::timeout(probe, edge.client().ping()).await {
        Ok(Ok(rtt)) => Failure {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: slow,
            detail: format!("{detail} (the edge answers pings: {rtt:?})"),
        },
        Ok(Err(error)) => Failure {
            status: StatusCode::BAD_GATEWAY,
            message: format!("edge {name:?} is not responding (it went offline)"),
            detail: format!("{detail}; then the ping failed: {}", error_chain(&error)),
        },
        Err(_) => Failure {
            status: StatusCode::BAD_GATEWAY,
            message: format!(
                "edge {name:?} is not responding (no answer to a ping within {probe:?})"
            ),
            detail: format!("{detail}; then no pong within {probe:?}"),
        },
    }
}

/// Maps a tunnel error (other than a timeout): 502 for an edge or service that is not
/// there, 503 when the edge refuses for load.
fn tunnel_failure(error: &Error, edge: &str, service: &str) -> (StatusCode, String) {
    match error {
        Error::StreamRejected {
            code: RejectCode::UnsupportedService,
            ..
        } => (
            StatusCode::BAD_GATEWAY,
            format!("edge {edge:?} has no service {service:?}"),
        ),
        Error::StreamRejected {
            code: RejectCode::LimitExceeded | RejectCode::ServiceUnavailable,
            reason,
        } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "edge {edge:?} is busy: {}",
                reason.as_deref().map_or_else(
                    || "try again later".to_owned(),
                    |reason| format!("{reason:?}")
                )
            ),
        ),
        Error::StreamRejected { code, reason } => (
            StatusCode::BAD_GATEWAY,
            format!(
                "edge {edge:?} refused the stream to {service:?}: {code}{}",
                reason
                    .as_deref()
                    .map(|reason| format!(" ({reason:?})"))
                    .unwrap_or_default()
            ),
        ),
        Error::CapacityExceeded { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many requests in flight to edge {edge:?}"),
        ),
        Error::SessionClosed | Error::Disconnected => (
            StatusCode::BAD_GATEWAY,
            format!("edge {edge:?} went offline"),
        ),
        other => (
            StatusCode::BAD_GATEWAY,
            format!("the tunnel to edge {edge:?} failed: {other}"),
        ),
    }
}

/// The first error of type `E` in `error`'s source chain.
fn find_cause<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        // An io::Error's `source` skips the error it wraps: look into that one too.
        cause = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_failures_say_what_happened() {
        let rejected = |code, reason: Option<&str>| Error::StreamRejected {
            code,
            reason: reason.map(str::to_owned),
        };
        let cases = [
            (
                rejected(RejectCode::UnsupportedService, None),
                StatusCode::BAD_GATEWAY,
                "edge \"alpha\" has no service \"web\"",
            ),
            (
                rejected(RejectCode::LimitExceeded, Some("full\n")),
                StatusCode::SERVICE_UNAVAILABLE,
                "edge \"alpha\" is busy: \"full\\n\"",
            ),
            (
                rejected(RejectCode::Unauthorized, None),
                StatusCode::BAD_GATEWAY,
                "edge \"alpha\" refused the stream to \"web\"",
            ),
            (
                Error::Disconnected,
                StatusCode::BAD_GATEWAY,
                "edge \"alpha\" went offline",
            ),
        ];
        for (error, status, message) in cases {
            let (got_status, got_message) = tunnel_failure(&error, "alpha", "web");
            assert_eq!(got_status, status, "{error}");
            assert!(got_message.starts_with(message), "{got_message:?}");
        }
    }

    #[test]
    fn causes_are_found_down_the_chain() {
        let inner = std::io::Error::other(Error::SessionClosed);
        let found = find_cause::<Error>(&inner);
        assert!(matches!(found, Some(Error::SessionClosed)), "{found:?}");
        assert!(find_cause::<hyper::Error>(&inner).is_none());
    }
}
