//! The admin listener: /healthz and Prometheus /metrics.

use super::*;

pub(super) async fn serve_admin(
    listener: TcpListener,
    state: Arc<RelayState>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let state = Arc::clone(&state);
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(admin(&state, request.uri().path())) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
            () = until_stopped(&mut stop) => break,
        }
    }
}

fn admin(state: &RelayState, path: &str) -> Response<ProxyBody> {
    match path {
        "/healthz" => text_response(
            StatusCode::OK,
            format!("ok\nedges {}", state.metrics.edges_connected.get()),
        ),
        "/metrics" => match state.metrics.render() {
            Ok(text) => {
                let mut response = text_response(StatusCode::OK, text);
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            Err(error) => text_response(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        },
        _ => text_response(StatusCode::NOT_FOUND, "try /healthz or /metrics"),
    }
}
