//! The relay: QUIC listener for edges, HTTP listener for the public, admin listener.
//!
//! Routing is by Host: `<edge>.<domain>` reaches that edge's default service (`web`),
//! `<service>.<edge>.<domain>` a named one. Each registered edge has its own pooled
//! hyper-util client over a backhaul `Connector`, so keep-alive connections to an edge
//! reuse tunnel streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use backhaul::connector::Connector;
use backhaul::quic::{server_endpoint, Identity, DEFAULT_ALPN};
use backhaul::stream::TunnelStream;
use backhaul::{
    ClientEvent, CloseCode, Config, Error, QuinnConnection, RejectCode, Role, Session,
    SessionClient,
};
use clap::Args;
use http::header::{HeaderValue, HOST};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::IntCounterVec;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::Service;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::auth::{parse_registration, valid_edge_name, Tokens, REGISTER_SERVICE};
use crate::forward::{
    boxed, forward, is_upgrade, retarget, text_response, ForwardError, ProxyBody,
};
use crate::metrics::{CountingBody, Metrics};
use crate::{parse_duration, shutdown_signal, until_stopped, BoxError};

/// How long a connected edge has to register before it is dropped.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC close code for an edge that failed to register.
const CLOSE_UNREGISTERED: u32 = 0x10;
/// QUIC close code for an edge replaced by a newer connection under the same name.
const CLOSE_REPLACED: u32 = 0x11;

#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// UDP address edges dial (QUIC).
    #[arg(long, default_value = "0.0.0.0:4433", env = "BACKHAUL_QUIC_LISTEN")]
    pub quic_listen: SocketAddr,
    /// TCP address of the public HTTP listener.
    #[arg(long, default_value = "0.0.0.0:8080", env = "BACKHAUL_HTTP_LISTEN")]
    pub http_listen: SocketAddr,
    /// TCP address of the admin listener (/healthz, /metrics).
    #[arg(long, default_value = "127.0.0.1:9090", env = "BACKHAUL_ADMIN_LISTEN")]
    pub admin_listen: SocketAddr,
    /// Public domain: `<edge>.<domain>` reaches an edge.
    #[arg(long, default_value = "localhost", env = "BACKHAUL_DOMAIN")]
    pub domain: String,
    /// Service reached by `<edge>.<domain>` (without a service label).
    #[arg(long, default_value = "web")]
    pub default_service: String,
    /// TLS certificate chain for the QUIC listener (PEM); self-signed if absent.
    #[arg(long, requires = "key", env = "BACKHAUL_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, requires = "cert", env = "BACKHAUL_KEY")]
    pub key: Option<PathBuf>,
    /// Where to write the self-signed certificate for edges to trust.
    #[arg(long, default_value = "backhaul-relay-cert.pem")]
    pub cert_out: PathBuf,
    /// Edge credentials as NAME=TOKEN (repeat, or comma-separate).
    #[arg(
        long = "edge-token",
        env = "BACKHAUL_EDGE_TOKENS",
        value_delimiter = ',',
        required = true
    )]
    pub edge_tokens: Vec<String>,
    /// Keep-alive ping interval; an edge missing a pong for as long again is dropped.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub keepalive: Duration,
    /// How long opening a tunnel stream to an edge may take.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub open_timeout: Duration,
    /// How long an edge may take to answer a request (response head).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long in-flight requests may finish after Ctrl-C.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

/// Everything a relay needs to start.
pub struct RelayConfig {
    pub quic_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub domain: String,
    pub default_service: String,
    pub identity: Identity,
    pub tokens: Tokens,
    pub keepalive: Duration,
    pub open_timeout: Duration,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
}

pub async fn run(args: RelayArgs) -> Result<(), BoxError> {
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Identity::from_files(cert, key)?,
        _ => {
            let identity = Identity::self_signed(&[&args.domain, "localhost", "127.0.0.1"])?;
            let pem = pem::encode(&pem::Pem::new(
                "CERTIFICATE",
                identity.cert_chain[0].to_vec(),
            ));
            std::fs::write(&args.cert_out, pem)
                .map_err(|e| format!("writing {}: {e}", args.cert_out.display()))?;
            info!(path = %args.cert_out.display(), "self-signed certificate written; give it to edges with --relay-cert");
            identity
        }
    };
    let config = RelayConfig {
        quic_listen: args.quic_listen,
        http_listen: args.http_listen,
        admin_listen: args.admin_listen,
        domain: args.domain.to_ascii_lowercase(),
        default_service: args.default_service,
        identity,
        tokens: Tokens::parse(&args.edge_tokens)?,
        keepalive: args.keepalive,
        open_timeout: args.open_timeout,
        request_timeout: args.request_timeout,
        shutdown_timeout: args.shutdown_timeout,
    };
    let relay = start(config).await?;
    shutdown_signal().await;
    info!("shutting down");
    relay.shutdown().await;
    Ok(())
}

/// A running relay.
pub struct RunningRelay {
    pub quic_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Edge sessions outlive the public listener's drain, so in-flight requests finish.
    stop_edges: watch::Sender<bool>,
    edges_task: tokio::task::JoinHandle<()>,
    state: Arc<RelayState>,
}

impl RunningRelay {
    /// Stops accepting, lets in-flight requests finish (up to the shutdown timeout), and
    /// closes every edge session.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let _ = self.stop_edges.send(true);
        let _ = (&mut self.edges_task).await;
        let edges: Vec<EdgeEntry> = lock(&self.state.edges).drain().map(|(_, e)| e).collect();
        for edge in edges {
            let _ = edge
                .client
                .close(CloseCode::Normal, Some("relay shutting down".into()))
                .await;
            edge.client
                .connection()
                .inner()
                .close(0u32.into(), b"relay shutting down");
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        self.edges_task.abort();
    }
}

pub async fn start(config: RelayConfig) -> Result<RunningRelay, BoxError> {
    let endpoint = server_endpoint(config.quic_listen, config.identity, DEFAULT_ALPN)?;
    let http = TcpListener::bind(config.http_listen)
        .await
        .map_err(|e| format!("binding the HTTP listener on {}: {e}", config.http_listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| format!("binding the admin listener on {}: {e}", config.admin_listen))?;
    let session_config = Config::new()
        .with_agent(concat!("backhaul-relay/", env!("CARGO_PKG_VERSION")))
        .with_ping_interval(config.keepalive)
        .with_ping_timeout(config.keepalive)
        .with_open_timeout(config.open_timeout)
        .with_max_inflight_opens(1024);
    let state = Arc::new(RelayState {
        domain: config.domain,
        default_service: config.default_service,
        tokens: config.tokens,
        metrics: Metrics::new()?,
        edges: Mutex::new(HashMap::new()),
        next_edge_id: AtomicU64::new(1),
        session_config,
        request_timeout: config.request_timeout,
    });
    let quic_addr = endpoint.local_addr()?;
    let http_addr = http.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let (stop_edges, edges_stopped) = watch::channel(false);
    let edges_task = tokio::spawn(accept_edges(endpoint, Arc::clone(&state), edges_stopped));
    let mut tasks = JoinSet::new();
    tasks.spawn(serve_public(
        http,
        Arc::clone(&state),
        stopped.clone(),
        config.shutdown_timeout,
    ));
    tasks.spawn(serve_admin(admin, Arc::clone(&state), stopped));
    info!(%quic_addr, %http_addr, %admin_addr, domain = %state.domain, "relay listening");
    Ok(RunningRelay {
        quic_addr,
        http_addr,
        admin_addr,
        stop,
        tasks,
        stop_edges,
        edges_task,
        state,
    })
}

struct RelayState {
    domain: String,
    default_service: String,
    tokens: Tokens,
    metrics: Metrics,
    edges: Mutex<HashMap<String, EdgeEntry>>,
    next_edge_id: AtomicU64,
    session_config: Config,
    request_timeout: Duration,
}

#[derive(Clone)]
struct EdgeEntry {
    id: u64,
    client: SessionClient<QuinnConnection>,
    http: Client<MeteredConnector, ProxyBody>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RelayState {
    /// Makes `client` the edge called `name`, replacing (and closing) an older session of
    /// the same name: only an edge holding the name's token gets here.
    fn attach(&self, name: &str, client: SessionClient<QuinnConnection>) -> u64 {
        let id = self.next_edge_id.fetch_add(1, Ordering::Relaxed);
        let connector = MeteredConnector {
            inner: Connector::new(client.clone()),
            opens: self.metrics.opens.clone(),
        };
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let entry = EdgeEntry { id, client, http };
        let replaced = lock(&self.edges).insert(name.to_owned(), entry);
        match replaced {
            Some(old) => {
                info!(edge = name, "a new connection replaces the edge's old one");
                old.client
                    .connection()
                    .inner()
                    .close(CLOSE_REPLACED.into(), b"replaced by a newer connection");
            }
            None => self.metrics.edges_connected.inc(),
        }
        id
    }

    fn detach(&self, name: &str, id: u64) {
        let mut edges = lock(&self.edges);
        if edges.get(name).is_some_and(|entry| entry.id == id) {
            edges.remove(name);
            self.metrics.edges_connected.dec();
        }
    }

    fn edge(&self, name: &str) -> Option<EdgeEntry> {
        lock(&self.edges).get(name).cloned()
    }

    fn edge_names(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.edges).keys().cloned().collect();
        names.sort();
        names
    }
}

async fn accept_edges(
    endpoint: quinn::Endpoint,
    state: Arc<RelayState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut edges = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    let remote = incoming.remote_address();
                    let span = info_span!("edge", %remote, edge = tracing::field::Empty);
                    edges.spawn(handle_edge(incoming, Arc::clone(&state)).instrument(span));
                }
                None => break,
            },
            Some(_) = edges.join_next(), if !edges.is_empty() => {}
            () = until_stopped(&mut stop) => break,
        }
    }
    endpoint.close(0u32.into(), b"relay shutting down");
    edges.abort_all();
}

async fn handle_edge(incoming: quinn::Incoming, state: Arc<RelayState>) {
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            debug!(%error, "QUIC handshake failed");
            return;
        }
    };
    let session = Session::new(
        QuinnConnection::new(connection.clone()),
        Role::Server,
        state.session_config.clone(),
    );
    let handle = match session.start().await {
        Ok(handle) => handle,
        Err(error) => {
            warn!(%error, "session handshake failed");
            connection.close(CLOSE_UNREGISTERED.into(), b"session handshake failed");
            return;
        }
    };
    let (client, mut events) = SessionClient::with_events(handle);
    let registered =
        tokio::time::timeout(REGISTER_TIMEOUT, register(&state, &client, &mut events)).await;
    let Ok(Some(name)) = registered else {
        debug!("no valid registration; dropping the connection");
        connection.close(CLOSE_UNREGISTERED.into(), b"registration failed");
        return;
    };
    tracing::Span::current().record("edge", name.as_str());
    let id = state.attach(&name, client.clone());
    info!(edge = %name, "edge registered");
    // The relay serves nothing else to edges.
    while let Some(event) = events.recv().await {
        if let ClientEvent::OpenRequest { request_id, .. } = event {
            let reason = Some("the relay offers no services to edges".to_owned());
            let _ = client
                .reject_open(request_id, RejectCode::UnsupportedService, reason)
                .await;
        }
    }
    let reason = client.closed().await;
    state.detach(&name, id);
    info!(edge = %name, %reason, "edge disconnected");
}

/// Waits for a valid registration; answers invalid ones with `Unauthorized`.
async fn register(
    state: &RelayState,
    client: &SessionClient<QuinnConnection>,
    events: &mut tokio::sync::mpsc::Receiver<ClientEvent>,
) -> Option<String> {
    while let Some(event) = events.recv().await {
        let ClientEvent::OpenRequest {
            request_id,
            service,
            metadata,
        } = event
        else {
            continue;
        };
        let credentials = (service.as_str() == REGISTER_SERVICE)
            .then(|| parse_registration(&metadata))
            .flatten();
        let accepted = credentials
            .as_ref()
            .filter(|(edge, token)| valid_edge_name(edge) && state.tokens.check(edge, token));
        let Some((edge, _)) = accepted else {
            state
                .metrics
                .registrations
                .with_label_values(&["unauthorized"])
                .inc();
            let claimed = credentials.map(|(edge, _)| edge).unwrap_or_default();
            warn!(edge = %claimed, "registration refused");
            let reason = Some(format!("invalid credentials for edge {claimed:?}"));
            let _ = client
                .reject_open(request_id, RejectCode::Unauthorized, reason)
                .await;
            continue;
        };
        let stream_id = client.allocate_stream_id();
        client.accept_open(request_id, stream_id).await.ok()?;
        let (mut send, _recv) = client.connection().inner().open_bi().await.ok()?;
        client.bind_stream(&mut send, stream_id).await.ok()?;
        let _ = send.finish();
        let _ = client
            .close_stream(stream_id, CloseCode::Normal, None)
            .await;
        state.metrics.registrations.with_label_values(&["ok"]).inc();
        return Some(edge.clone());
    }
    None
}

/// A connector that counts opens by outcome.
#[derive(Clone)]
struct MeteredConnector {
    inner: Connector<QuinnConnection>,
    opens: IntCounterVec,
}

type OpenFuture =
    Pin<Box<dyn Future<Output = Result<TunnelStream<QuinnConnection>, Error>> + Send>>;

impl Service<Uri> for MeteredConnector {
    type Response = TunnelStream<QuinnConnection>;
    type Error = Error;
    type Future = OpenFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Service::<Uri>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, uri: Uri) -> OpenFuture {
        let opening = self.inner.call(uri);
        let opens = self.opens.clone();
        Box::pin(async move {
            let result = opening.await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(Error::StreamRejected { .. }) => "rejected",
                Err(Error::Timeout(_)) => "timeout",
                Err(Error::SessionClosed | Error::Disconnected) => "disconnected",
                Err(_) => "error",
            };
            opens.with_label_values(&[outcome]).inc();
            result
        })
    }
}

/// Where a Host header points.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// The bare domain: the relay's own index page.
    Index,
    /// A service on an edge.
    Edge { edge: String, service: String },
    /// Not under our domain.
    Unknown,
}

fn resolve_host(host: &str, domain: &str, default_service: &str) -> Target {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
        _ => host,
    };
    if host == domain {
        return Target::Index;
    }
    let Some(labels) = host
        .strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix('.'))
    else {
        return Target::Unknown;
    };
    match labels.split('.').collect::<Vec<_>>().as_slice() {
        [edge] => Target::Edge {
            edge: (*edge).to_owned(),
            service: default_service.to_owned(),
        },
        [service, edge] => Target::Edge {
            edge: (*edge).to_owned(),
            service: (*service).to_owned(),
        },
        _ => Target::Unknown,
    }
}

async fn serve_public(
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

async fn serve_admin(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_resolve_to_edges_and_services() {
        let resolve = |host| resolve_host(host, "localhost", "web");
        assert_eq!(resolve("localhost:8080"), Target::Index);
        assert_eq!(
            resolve("demo.localhost:8080"),
            Target::Edge {
                edge: "demo".into(),
                service: "web".into()
            }
        );
        assert_eq!(
            resolve("API.Demo.localhost"),
            Target::Edge {
                edge: "demo".into(),
                service: "api".into()
            }
        );
        assert_eq!(resolve("example.com"), Target::Unknown);
        assert_eq!(resolve("a.b.c.localhost"), Target::Unknown);
        assert_eq!(resolve("xlocalhost"), Target::Unknown);
    }
}
