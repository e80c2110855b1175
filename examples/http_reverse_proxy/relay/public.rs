//! The public HTTP listener: routing by Host, forwarding to edges, mapping failures.

use super::*;

pub(super) async fn serve_public(
    listener: TcpListener,
    state: Arc<RelayState>,
    mut stop: watch::Receiver<bool>,
    shutdown_timeout: Duration,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, remote) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let state = Arc::clone(&state);
                let service = hyper::service::service_fn(move |request| {
                    handle_request(Arc::clone(&state), request, remote)
                });
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        debug!(%error, "client connection ended with an error");
                    }
                });
            }
            () = until_stopped(&mut stop) => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => info!("all public connections finished"),
        () = tokio::time::sleep(shutdown_timeout) => warn!("shutdown timeout: dropping unfinished connections"),
    }
}

async fn handle_request(
    state: Arc<RelayState>,
    request: Request<Incoming>,
    remote: SocketAddr,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let host = request
        .headers()
        .get(HOST)
        .and_then(|host| host.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_owned();
    let span = info_span!(
        "request",
        method = %request.method(),
        %host,
        path = %request.uri().path(),
        edge = tracing::field::Empty,
        service = tracing::field::Empty,
    );
    let response = route(&state, request, remote, &host)
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

async fn route(
    state: &RelayState,
    mut request: Request<Incoming>,
    remote: SocketAddr,
    host: &str,
) -> Response<ProxyBody> {
    let (edge_name, service) = match resolve_host(host, &state.domain, &state.default_service) {
        Target::Index => return index_page(state),
        Target::Unknown => {
            return text_response(
                StatusCode::NOT_FOUND,
                format!("unknown host {host:?}: use <edge>.{}", state.domain),
            )
        }
        Target::Edge { edge, service } => (edge, service),
    };
    let span = tracing::Span::current();
    span.record("edge", edge_name.as_str());
    span.record("service", service.as_str());
    let Some(edge) = state.edge(&edge_name) else {
        return text_response(
            StatusCode::BAD_GATEWAY,
            format!("edge {edge_name:?} is not connected"),
        );
    };
    let upgrade = is_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
    add_forwarded_headers(request.headers_mut(), remote, host);
    let to_edge = state.metrics.bytes_counter("to_edge");
    let mut request = request.map(|body| boxed(CountingBody::new(body, to_edge)));
    if let Err(error) = retarget(&mut request, &service) {
        return text_response(
            StatusCode::BAD_REQUEST,
            format!("bad request target: {error}"),
        );
    }
    match forward(&edge.http, request, upgrade, state.request_timeout).await {
        Ok(response) => {
            let from_edge = state.metrics.bytes_counter("from_edge");
            response.map(|body| boxed(CountingBody::new(body, from_edge)))
        }
        Err(ForwardError::Timeout) => text_response(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "edge {edge_name:?} did not answer within {:?}",
                state.request_timeout
            ),
        ),
        Err(ForwardError::Upstream(error)) => upstream_failure(&edge_name, &service, &error),
    }
}

fn add_forwarded_headers(headers: &mut http::HeaderMap, remote: SocketAddr, host: &str) {
    let client_ip = remote.ip().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    if let Ok(value) = HeaderValue::from_str(host) {
        headers.insert("x-forwarded-host", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}

/// Maps a failure on the way to the edge to a status: 502 for an edge or service that is
/// not there, 503 when the edge refuses for load, 504 when it is too slow.
fn upstream_failure(
    edge: &str,
    service: &str,
    error: &hyper_util::client::legacy::Error,
) -> Response<ProxyBody> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(tunnel) = current.downcast_ref::<Error>() {
            return match tunnel {
                Error::StreamRejected {
                    code: RejectCode::UnsupportedService,
                    ..
                } => text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("edge {edge:?} has no service {service:?}"),
                ),
                Error::StreamRejected {
                    code: RejectCode::LimitExceeded | RejectCode::ServiceUnavailable,
                    reason,
                } => text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "edge {edge:?} is busy: {}",
                        reason.as_deref().unwrap_or("try again later")
                    ),
                ),
                Error::CapacityExceeded { .. } => text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("too many requests in flight to edge {edge:?}"),
                ),
                Error::Timeout(_) => text_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("edge {edge:?} did not open a stream in time"),
                ),
                Error::SessionClosed | Error::Disconnected => text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("edge {edge:?} went offline"),
                ),
                other => text_response(StatusCode::BAD_GATEWAY, format!("edge {edge:?}: {other}")),
            };
        }
        cause = current.source();
    }
    text_response(StatusCode::BAD_GATEWAY, format!("edge {edge:?}: {error}"))
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
