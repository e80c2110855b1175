//! The edge: dial the relay, register, serve local HTTP services, and stay connected.
//!
//! The edge never listens. It reconnects with exponential backoff and jitter when the
//! relay restarts, the network drops, or the relay refuses it for a while (another edge
//! holds its name, or its source is backing off), and stops for good only on Ctrl-C,
//! when the relay refuses its credentials (exit code 2), or when the relay presents a
//! certificate the edge does not trust (exit code 3): those need an operator, and
//! retrying would only hide them.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use backhaul::edge::Router;
use backhaul::quic::{client_endpoint, load_certs, DEFAULT_ALPN};
use backhaul::{
    CloseCode, Config, Error, QuinnConnection, RejectCode, Role, Session, SessionClient,
};
use clap::Args;
use http::header::{HeaderValue, HOST};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::auth::{registration, valid_edge_name, Unauthorized, REGISTER_SERVICE};
use crate::forward::{
    boxed, error_chain, forward, is_upgrade, retarget, text_response, ForwardError, IdleHook,
    ProxyBody, UpstreamTimeouts,
};
use crate::{parse_duration, shutdown_signal, BoxError, Escaped};

/// The relay presented a certificate this edge does not trust.
#[derive(Debug, thiserror::Error)]
#[error(
    "the relay at {relay} presented a certificate that {trusted} does not trust ({reason}); \
     if the relay's certificate changed, copy its current certificate (the relay's \
     --cert-out file, backhaul-relay-cert.pem by default, or its --cert) to {trusted}; \
     if the name differs, check --server-name"
)]
pub struct UntrustedRelay {
    pub relay: String,
    pub trusted: String,
    pub reason: String,
}

/// The relay already has a live edge under this name.
#[derive(Debug, thiserror::Error)]
#[error("the relay refused the registration: {0}")]
struct NameTaken(String);

#[derive(Debug, Clone, Args)]
pub struct EdgeArgs {
    /// The relay's QUIC address (host:port).
    #[arg(long, default_value = "127.0.0.1:4433", env = "BACKHAUL_RELAY")]
    pub relay: String,
    /// Certificate (PEM or DER) to trust for the relay.
    #[arg(
        long,
        default_value = "backhaul-relay-cert.pem",
        env = "BACKHAUL_RELAY_CERT"
    )]
    pub relay_cert: PathBuf,
    /// Name the relay's certificate is issued for.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// This edge's name: it is reached at `<name>.<domain>`.
    #[arg(long, env = "BACKHAUL_EDGE_NAME")]
    pub name: String,
    /// This edge's token, as configured on the relay.
    #[arg(long, env = "BACKHAUL_EDGE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// A local service to expose, as NAME=http://HOST:PORT (repeat for more).
    #[arg(long = "expose", required = true)]
    pub expose: Vec<String>,
    /// Send requests to local services with the local address as Host.
    #[arg(long)]
    pub rewrite_host: bool,
    /// Keep-alive ping interval; a relay missing a pong for as long again is given up.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub keepalive: Duration,
    /// How long a local service may take to answer (response head).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long in-flight requests may finish after Ctrl-C.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// How long a local service's response body may stall between two chunks before the
    /// response is aborted (WebSockets and streams that keep sending are not cut).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,
    /// Streams the relay may have open to this edge at once; past it requests get 503.
    #[arg(long, default_value_t = 1000)]
    pub max_streams: usize,
    /// Longest wait between reconnection attempts.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,
}

/// Everything an edge needs to run.
#[derive(Clone)]
pub struct EdgeConfig {
    pub relay: String,
    pub trusted: Vec<CertificateDer<'static>>,
    /// Where `trusted` came from, for the message when the relay's certificate is not it.
    pub trusted_from: String,
    pub server_name: String,
    pub name: String,
    pub token: String,
    /// (service name, local authority host:port)
    pub services: Vec<(String, String)>,
    pub rewrite_host: bool,
    pub keepalive: Duration,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub max_streams: usize,
    pub max_backoff: Duration,
}

pub async fn run(args: EdgeArgs) -> Result<(), BoxError> {
    let trusted = load_certs(&args.relay_cert)?;
    let services = args
        .expose
        .iter()
        .map(|spec| parse_expose(spec))
        .collect::<Result<Vec<_>, _>>()?;
    if !valid_edge_name(&args.name) {
        return Err(format!("edge name {:?} must be a lowercase DNS label", args.name).into());
    }
    let config = EdgeConfig {
        relay: args.relay,
        trusted,
        trusted_from: args.relay_cert.display().to_string(),
        server_name: args.server_name,
        name: args.name,
        token: args.token,
        services,
        rewrite_host: args.rewrite_host,
        keepalive: args.keepalive,
        request_timeout: args.request_timeout,
        shutdown_timeout: args.shutdown_timeout,
        upstream_idle_timeout: args.upstream_idle_timeout,
        max_streams: args.max_streams,
        max_backoff: args.max_backoff,
    };
    run_edge(config, shutdown_signal()).await
}

/// Parses `NAME=http://HOST:PORT` into (NAME, HOST:PORT).
fn parse_expose(spec: &str) -> Result<(String, String), String> {
    let (name, url) = spec
        .split_once('=')
        .ok_or_else(|| format!("--expose {spec:?} is not NAME=http://HOST:PORT"))?;
    let uri: http::Uri = url.parse().map_err(|e| format!("--expose {spec:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "--expose {spec:?}: only http:// services can be exposed"
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("--expose {spec:?}: no host"))?;
    // Service names become host labels (<service>.<edge>.<domain>).
    if !valid_edge_name(name) {
        return Err(format!(
            "--expose {spec:?}: the service name must be a lowercase DNS label"
        ));
    }
    Ok((name.to_owned(), authority.to_string()))
}

/// Runs until `shutdown` resolves (Ok) or the relay refuses the credentials (Err).
pub async fn run_edge(
    config: EdgeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let router = build_router(&config);
    let endpoint = client_endpoint(&config.trusted, DEFAULT_ALPN)?;
    let mut backoff = Backoff::new(Duration::from_millis(250), config.max_backoff);
    loop {
        let outcome = connect_and_serve(&endpoint, &config, router.clone(), stopped.clone()).await;
        match outcome {
            Ok(Ended::Shutdown) => break,
            Ok(Ended::Lost { lasted, reason }) => {
                if lasted > Duration::from_secs(30) {
                    backoff.reset();
                }
                warn!(reason = %Escaped(&reason), "lost the relay");
            }
            Err(error)
                if error.downcast_ref::<Unauthorized>().is_some()
                    || error.downcast_ref::<UntrustedRelay>().is_some() =>
            {
                endpoint.close(0u32.into(), b"giving up");
                return Err(error);
            }
            Err(error) if error.downcast_ref::<NameTaken>().is_some() => warn!(
                error = %Escaped(&error),
                "ANOTHER EDGE IS CONNECTED UNDER THIS NAME: is this edge running twice? \
                 retrying, so this edge takes over once the other is gone"
            ),
            Err(error) => warn!(error = %Escaped(&error), "cannot reach the relay"),
        }
        let delay = backoff.next_delay();
        info!(?delay, "reconnecting");
        let mut stopped = stopped.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = crate::until_stopped(&mut stopped) => break,
        }
    }
    tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle())
        .await
        .ok();
    info!("edge stopped");
    Ok(())
}

enum Ended {
    Shutdown,
    Lost { lasted: Duration, reason: Error },
}

async fn connect_and_serve(
    endpoint: &quinn::Endpoint,
    config: &EdgeConfig,
    router: Router<QuinnConnection>,
    stopped: watch::Receiver<bool>,
) -> Result<Ended, BoxError> {
    let addr = tokio::net::lookup_host(&config.relay)
        .await?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", config.relay))?;
    let connection = endpoint
        .connect(addr, &config.server_name)?
        .await
        .map_err(|error| connect_error(error, &addr.to_string(), config))?;
    let session_config = Config::new()
        .with_agent(concat!("backhaul-edge/", env!("CARGO_PKG_VERSION")))
        .with_ping_interval(config.keepalive)
        .with_ping_timeout(config.keepalive)
        .with_max_concurrent_streams(config.max_streams);
    let session = Session::new(
        QuinnConnection::new(connection.clone()),
        Role::Client,
        session_config,
    );
    let handle = session.start().await?;
    let (client, events) = SessionClient::with_events(handle);
    let credentials = registration(&config.name, &config.token);
    match client.open(REGISTER_SERVICE, credentials).await {
        Ok(_) => {}
        Err(Error::StreamRejected {
            code: RejectCode::Unauthorized,
            reason,
        }) => {
            connection.close(0u32.into(), b"unauthorized");
            let reason = reason.unwrap_or_else(|| "credentials refused".to_owned());
            return Err(Box::new(Unauthorized(reason)));
        }
        Err(Error::StreamRejected {
            code: RejectCode::ServiceUnavailable,
            reason,
        }) => {
            connection.close(0u32.into(), b"name taken");
            let reason = reason.unwrap_or_else(|| "registration refused for now".to_owned());
            return Err(Box::new(NameTaken(reason)));
        }
        Err(error) => return Err(error.into()),
    }
    let services: Vec<&str> = config
        .services
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    info!(edge = %config.name, relay = %addr, ?services, "registered with the relay");
    let connected = Instant::now();

    // On shutdown: tell the relay first (it stops routing here), then drain.
    let mut shutting_down = stopped.clone();
    let closer = tokio::spawn({
        let client = client.clone();
        async move {
            if shutting_down.wait_for(|stop| *stop).await.is_ok() {
                let _ = client
                    .close(CloseCode::Normal, Some("edge shutting down".into()))
                    .await;
            }
        }
    });
    let mut drain_signal = stopped.clone();
    let served = router
        .serve(client.clone(), events)
        .with_graceful_shutdown(async move {
            let _ = drain_signal.wait_for(|stop| *stop).await;
        })
        .drain_timeout(config.shutdown_timeout)
        .await;
    if *stopped.borrow() {
        // The close was sent when shutdown began; let it finish before the connection goes.
        let _ = closer.await;
        // The last responses may still be in flight (sent, not yet acknowledged), and
        // closing the connection discards them: let the relay, which closes it once it
        // has read everything, go first (bounded).
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
        connection.close(0u32.into(), b"edge shutting down");
        return Ok(Ended::Shutdown);
    }
    closer.abort();
    let reason = match served {
        Ok(()) => Error::SessionClosed,
        Err(error) => error,
    };
    connection.close(0u32.into(), b"session ended");
    Ok(Ended::Lost {
        lasted: connected.elapsed(),
        reason,
    })
}

/// A certificate the edge does not trust becomes [`UntrustedRelay`]; anything else (relay
/// down, timeouts, refused) stays an error to retry.
fn connect_error(error: quinn::ConnectionError, relay: &str, config: &EdgeConfig) -> BoxError {
    match &error {
        quinn::ConnectionError::TransportError(transport)
            if is_certificate_error(transport.code, &transport.reason) =>
        {
            Box::new(UntrustedRelay {
                relay: relay.to_owned(),
                trusted: config.trusted_from.clone(),
                reason: transport.reason.clone(),
            })
        }
        _ => Box::new(error),
    }
}

/// TLS alerts our own certificate check raises (rustls' verifier, run locally): bad,
/// unsupported, revoked, expired or unknown certificate, unknown CA, and a signature that
/// does not verify (a different certificate under the same name, e.g. a relay that made
/// a new self-signed one).
fn is_certificate_error(code: quinn::TransportErrorCode, reason: &str) -> bool {
    const CERTIFICATE_ALERTS: [u8; 7] = [42, 43, 44, 45, 46, 48, 51];
    CERTIFICATE_ALERTS
        .iter()
        .any(|alert| code == quinn::TransportErrorCode::crypto(*alert))
        || reason.contains("invalid peer certificate")
}

fn build_router(config: &EdgeConfig) -> Router<QuinnConnection> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, ProxyBody> =
        Client::builder(TokioExecutor::new()).build(connector);
    config
        .services
        .iter()
        .fold(Router::new(), |router, (name, authority)| {
            let local = LocalService {
                edge: Arc::from(config.name.as_str()),
                service: Arc::from(name.as_str()),
                authority: authority.clone(),
                client: client.clone(),
                rewrite_host: config.rewrite_host,
                timeouts: UpstreamTimeouts {
                    response: config.request_timeout,
                    body_idle: config.upstream_idle_timeout,
                },
            };
            router.route(name.as_str(), backhaul::http::serve(local))
        })
}

/// Forwards requests from the tunnel to a local HTTP service.
///
/// Headers pass through unchanged except hop-by-hop ones: the relay's forwarding headers
/// (X-Forwarded-*, X-Real-IP, Forwarded) and Host reach the service as the relay set them
/// (Host is replaced only with --rewrite-host). Failures are answered by the edge itself
/// (the relay passes them through), naming the edge and the service.
#[derive(Clone)]
struct LocalService {
    edge: Arc<str>,
    service: Arc<str>,
    authority: String,
    client: Client<HttpConnector, ProxyBody>,
    rewrite_host: bool,
    timeouts: UpstreamTimeouts,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> + Send>>;

impl tower::Service<Request<Incoming>> for LocalService {
    type Response = Response<ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> ResponseFuture {
        let local = self.clone();
        Box::pin(async move { Ok(local.forward(request).await) })
    }
}

impl LocalService {
    async fn forward(self, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let upgrade = is_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
        // An HTTP/2 request carries its authority in the URI, not in Host: keep it as Host.
        let public_host = request.headers().get(HOST).cloned().or_else(|| {
            request
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let mut request = request.map(boxed);
        if let Err(error) = retarget(&mut request, &self.authority) {
            return text_response(
                StatusCode::BAD_REQUEST,
                format!("bad request target: {error}"),
            );
        }
        let host = if self.rewrite_host {
            HeaderValue::from_str(&self.authority).ok()
        } else {
            public_host
        };
        let set_headers = |headers: &mut http::HeaderMap| {
            if let Some(host) = host {
                headers.insert(HOST, host);
            }
        };
        let on_idle = self.idle_hook();
        match forward(
            &self.client,
            request,
            upgrade,
            set_headers,
            self.timeouts,
            on_idle,
        )
        .await
        {
            Ok(response) => response,
            Err(error) => self.failure(error),
        }
    }

    fn describe(&self) -> String {
        format!(
            "edge {:?}: local service {:?} at {}",
            self.edge, self.service, self.authority
        )
    }

    fn failure(&self, error: ForwardError) -> Response<ProxyBody> {
        let (status, message) = match error {
            ForwardError::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "{} did not answer within {:?}",
                    self.describe(),
                    self.timeouts.response
                ),
            ),
            ForwardError::Upstream(error) => (
                StatusCode::BAD_GATEWAY,
                format!(
                    "{} is unreachable: {}",
                    self.describe(),
                    error_chain(&error)
                ),
            ),
        };
        warn!(status = status.as_u16(), error = ?message, "forwarding to the local service failed");
        text_response(status, message)
    }

    fn idle_hook(&self) -> IdleHook {
        let what = self.describe();
        Arc::new(move |idle| {
            warn!(?idle, "{what} stalled mid-body: aborting the response");
        })
    }
}

/// Exponential backoff with jitter: each delay is drawn from the upper half of a window
/// that doubles up to `max`, so a fleet of edges does not reconnect in lockstep.
struct Backoff {
    base: Duration,
    max: Duration,
    window: Duration,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            window: base,
        }
    }

    fn reset(&mut self) {
        self.window = self.base;
    }

    fn next_delay(&mut self) -> Duration {
        let window = self.window.min(self.max);
        self.window = (self.window * 2).min(self.max);
        window / 2 + window.mul_f64(random_fraction() / 2.0)
    }
}

/// A number in [0, 1) from the standard library's randomly keyed hasher.
fn random_fraction() -> f64 {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] < Duration::from_millis(100));
        assert!(delays[7] >= Duration::from_millis(500) && delays[7] < Duration::from_secs(1));
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(100));
    }

    #[test]
    fn expose_specs_parse() {
        assert_eq!(
            parse_expose("web=http://127.0.0.1:3000").unwrap(),
            ("web".to_owned(), "127.0.0.1:3000".to_owned())
        );
        assert!(parse_expose("web").is_err());
        assert!(parse_expose("web=https://x").is_err());
        assert!(parse_expose("we\nb=http://127.0.0.1:1").is_err());
        assert!(parse_expose("Web=http://127.0.0.1:1").is_err());
    }
}
