//! The admin listener: /healthz and Prometheus /metrics.

use super::*;

/// The admin listener's connections: few, short-lived, never a reason to run out of file
/// descriptors the public side needs.
const ADMIN_LIMITS: Limits = Limits {
    max_connections: 32,
    header_timeout: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(30),
    write_timeout: Duration::from_secs(10),
    shutdown_timeout: Duration::from_secs(1),
    ..Limits::DEFAULT
};

pub(super) async fn serve_admin(
    listener: TcpListener,
    state: Arc<RelayState>,
    stop: watch::Receiver<bool>,
) {
    let observer = ListenerMetrics::new(&state.metrics, "admin");
    let service = tower::service_fn(move |request: Request<Incoming>| {
        std::future::ready(Ok::<_, Infallible>(admin(&state, request.uri().path())))
    });
    let server = Server::from_listener(listener)
        .with_limits(ADMIN_LIMITS)
        .with_observer(observer);
    serve_http(server, service, stop).await;
}

fn admin(state: &RelayState, path: &str) -> Response<ProxyBody> {
    match path {
        "/healthz" => text_response(
            StatusCode::OK,
            format!("ok\nedges {}", state.registry.len()),
        ),
        "/metrics" => metrics(state),
        _ => text_response(StatusCode::NOT_FOUND, "try /healthz or /metrics"),
    }
}

fn metrics(state: &RelayState) -> Response<ProxyBody> {
    super::edges::sync_edge_metrics(state);
    match state.metrics.render() {
        Ok(text) => {
            let mut response = text_response(StatusCode::OK, text);
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Err(error) => text_response(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}
