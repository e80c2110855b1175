//! The relay: QUIC listener for edges, HTTP listener for the public, admin listener.
//!
//! Accepting edges (admission control, handshakes, token checks, one live edge per name)
//! is the library's: `backhaul::relay`'s `Acceptor`, `Tokens` and `Registry`. What is
//! left here is HTTP policy. Routing is by Host: `<edge>.<domain>` reaches that edge's
//! default service (`web`), `<service>.<edge>.<domain>` a named one; edges are found
//! through the `Directory` trait. Each edge session has its own pooled clients (the
//! library's `EdgeClients`: an `Http1Pool` for HTTP/1.1, a hyper-util client for HTTP/2),
//! so requests to an edge reuse kept-alive tunnel streams, as many and for as long as
//! `--pool-max-idle` and `--pool-idle-timeout` allow. The public and admin listeners are
//! the library's hardened `http::server`, reporting to the metrics through its
//! `Observer`; a relay without `--cert/--key` keeps a self-signed identity with
//! `Identity::load_or_generate`.

mod admin;
mod cluster;
mod edges;
mod express;
mod host;
mod public;

use admin::serve_admin;
use cluster::{Cluster, PeerRoute, StartedCluster};
pub use cluster::{ClusterArgs, ClusterSettings};
use edges::{follow_edges, EdgeEntry, MeteredClients};
use public::serve_public;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use backhaul::http::forwarded::TrustedProxies;
use backhaul::http::server::{ConnectionInfo, Limits, Server};
use backhaul::quic::{key_path_beside, Identity, DEFAULT_ALPN};
use backhaul::relay::EdgeName;
use backhaul::relay::{
    AcceptStats, Acceptor as EdgeAcceptor, Directory, Location, Registry, TakeoverPolicy,
    DEFAULT_LOG_SUMMARY_INTERVAL, DEFAULT_REGISTER_TIMEOUT, DEFAULT_TAKEOVER_PING_TIMEOUT,
};
pub use backhaul::relay::{AdmissionConfig, Tokens};
use backhaul::shards::ShardSet;
use backhaul::tcp::TcpForward;
use backhaul::tls::{CertificateFiles, ReloadableCertificates, HTTP_ALPN};
use backhaul::{Config, Error};
use clap::Args;
use http::header::{HeaderValue, HOST};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::metrics::{CountingBody, ListenerMetrics, Metrics};
use crate::{parse_bytes, parse_duration, shutdown_signal, until_stopped, BoxError};
use backhaul::http::proxy::{
    error_chain, find_cause, forward_failure, text_response, Failure, ForwardError, Linger,
    ProxyBody,
};

#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// UDP address edges dial (QUIC).
    #[arg(long, default_value = "0.0.0.0:4433", env = "BACKHAUL_QUIC_LISTEN")]
    pub quic_listen: SocketAddr,
    /// TCP address of the public HTTP listener.
    #[arg(long, default_value = "0.0.0.0:8080", env = "BACKHAUL_HTTP_LISTEN")]
    pub http_listen: SocketAddr,
    /// Also serve HTTPS here (HTTP/2 and HTTP/1.1 by ALPN), with --tls-cert/--tls-key.
    #[arg(long, requires = "tls_cert", env = "BACKHAUL_HTTPS_LISTEN")]
    pub https_listen: Option<SocketAddr>,
    /// A PEM certificate chain for HTTPS (repeat for more; each with its --tls-key, in
    /// order). The certificate for each connection is chosen by the name the client asks
    /// for (SNI), wildcards included; SIGHUP re-reads the files.
    #[arg(long, requires = "https_listen")]
    pub tls_cert: Vec<PathBuf>,
    /// The PEM private key of the --tls-cert at the same position.
    #[arg(long)]
    pub tls_key: Vec<PathBuf>,
    /// Answer plain HTTP requests with a redirect to HTTPS (308).
    #[arg(long, requires = "https_listen")]
    pub redirect_http: bool,
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
    /// Without --cert: the relay's self-signed certificate, for edges to trust. Made on
    /// the first start and reused after (with its key, --key-out), so edges that pinned
    /// it keep trusting a restarted relay.
    #[arg(long, default_value = "backhaul-relay-cert.pem")]
    pub cert_out: PathBuf,
    /// Without --key: the self-signed certificate's private key, created with mode 0600
    /// (a key file readable by group or others is refused). Default: next to --cert-out,
    /// `cert` replaced by `key` in the name (backhaul-relay-key.pem).
    #[arg(long)]
    pub key_out: Option<PathBuf>,
    /// Edge credentials as NAME=TOKEN (repeat, or comma-separate).
    #[arg(
        long = "edge-token",
        env = "BACKHAUL_EDGE_TOKENS",
        hide_env_values = true,
        value_delimiter = ',',
        required = true
    )]
    pub edge_tokens: Vec<String>,
    /// List the connected edges on the bare domain's index page (off: the page only says
    /// this is a backhaul relay, so edge names are not disclosed to the public).
    #[arg(long)]
    pub list_edges: bool,
    /// Send every request through the full path (hyper's server and client). By default
    /// plain HTTP/1.1 requests for edges attached here take the express lane: each head
    /// parsed once, bodies passed through, a quarter less relay CPU per request; anything
    /// else takes the full path anyway.
    #[arg(long)]
    pub no_express: bool,
    /// Run on tokio's multi-thread runtime, where any thread runs any task. By default a
    /// relay on several threads runs a runtime per thread (shards) and serves each edge,
    /// and the public connections to it, on one of them: no hand-offs between threads and
    /// no contention on the edge's QUIC connection within a request.
    #[arg(long)]
    pub shared_runtime: bool,
    /// How long a new QUIC connection has to complete its handshakes and register before
    /// it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub register_timeout: Duration,
    /// Connections that have not registered yet, at most; past it new QUIC handshakes
    /// are refused before any TLS work.
    #[arg(long, default_value_t = 256)]
    pub max_unregistered: usize,
    /// Connections that have not registered yet from one source (IPv4 address or IPv6
    /// /64), at most; keeps one source from taking every slot of --max-unregistered.
    #[arg(long, default_value_t = 32)]
    pub max_unregistered_per_source: usize,
    /// New QUIC handshakes per second, sustained (token bucket); handshakes above it are
    /// ignored (the peer's retransmission tries again).
    #[arg(long, default_value_t = 100.0)]
    pub handshake_rate: f64,
    /// Handshakes allowed in a burst above --handshake-rate.
    #[arg(long, default_value_t = 200.0)]
    pub handshake_burst: f64,
    /// After a failed registration, new handshakes from the same source are refused for
    /// this long, doubling with each further failure.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub auth_backoff: Duration,
    /// Longest refusal after failed registrations (a source quiet for twice as long is
    /// forgiven).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub max_auth_backoff: Duration,
    /// Sources with failed registrations remembered at once (bounds the table's memory).
    #[arg(long, default_value_t = 10_000)]
    pub max_penalized_sources: usize,
    /// Repeated refusals (bad credentials, handshakes refused) are logged once, then
    /// summarised with a count once per this interval.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub log_summary_interval: Duration,
    /// An edge registering under a name already connected: the holder is pinged and, if
    /// it answers within this bound, the newcomer is refused ("already connected");
    /// otherwise the silent holder is replaced.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub takeover_ping_timeout: Duration,
    /// QUIC connections one edge's session may run over (an edge asks with --lanes);
    /// 1 turns lanes off.
    #[arg(long, default_value_t = backhaul::quic::lane::DEFAULT_MAX_LANES)]
    pub max_lanes: usize,
    /// Keep-alive ping interval; an edge missing a pong for as long again is dropped.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub keepalive: Duration,
    /// How long opening a tunnel stream to an edge may take.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub open_timeout: Duration,
    /// How long an edge may take to answer a request (response head).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long a kept-alive tunnel stream to an edge may sit unused before it is
    /// closed (the edge's stream slot and memory are given back).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,
    /// Kept-alive tunnel streams per edge and service, at most; a stream finishing its
    /// response beyond that is closed instead of kept.
    #[arg(long, default_value_t = backhaul::http::pool::DEFAULT_MAX_IDLE_PER_AUTHORITY)]
    pub pool_max_idle: usize,
    /// How long in-flight requests may finish after Ctrl-C.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Public connections open at once (lowered to fit the file-descriptor limit); more
    /// wait in the kernel's backlog.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Listen backlog of the public HTTP, HTTPS and TCP ports: connections the kernel
    /// holds for the relay to accept during a burst (capped by `net.core.somaxconn`).
    #[arg(long, default_value_t = backhaul::listener::DEFAULT_BACKLOG)]
    pub listen_backlog: u32,
    /// How long a public client may take to send a request head, from connecting or from
    /// its first byte (stops slowloris).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// On shards (the default runtime): how long a public connection's first bytes that
    /// stop short of its host (a TLS hello over two segments, a head in pieces) are waited
    /// on before it is placed in turn, within the header timeout.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub placement_patience: Duration,
    /// On shards: how many of a public connection's first bytes are looked at for its host.
    #[arg(long, default_value_t = 4096)]
    pub placement_peek_bytes: usize,
    /// How long a keep-alive connection may sit idle between requests.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// How long a response write may make no progress before the connection is cut (a
    /// client that stopped reading).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub write_timeout: Duration,
    /// How long an edge's response body may stall between two chunks before the client's
    /// connection is aborted (WebSockets and streams that keep sending are not cut).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,
    /// After an edge answered before the end of a client's upload (a 413, say), how long
    /// the relay reads the rest of the upload on, so the client reads the answer instead
    /// of a reset; 0 closes at once.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub linger_time: Duration,
    /// How many bytes of such an upload the relay reads on, at most (suffixes KiB, MiB,
    /// GiB); 0 closes at once.
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    pub linger_bytes: u64,
    /// After a request to an edge times out, how long to wait for the edge to answer a
    /// ping: no answer means 502 "not responding", an answer 504 (the edge is just slow).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub edge_probe_timeout: Duration,
    /// Load balancers in front of the relay whose forwarding headers (Forwarded,
    /// X-Forwarded-*, X-Real-IP) are believed and extended, as IPs or CIDR blocks
    /// (comma-separated). From anyone else those headers are replaced by the relay's own.
    #[arg(long, value_delimiter = ',', env = "BACKHAUL_TRUSTED_PROXIES")]
    pub trusted_proxies: Vec<String>,
    /// A public TCP port that reaches one service of one edge, as [ADDR:]PORT=EDGE/SERVICE
    /// (e.g. 2222=kiosk/ssh; the edge exposes ssh=tcp://HOST:PORT); repeat for more.
    #[arg(long = "tcp", value_name = "PORT=EDGE/SERVICE", value_parser = parse_tcp_forward)]
    pub tcp: Vec<TcpForwardSpec>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
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
    pub listen_backlog: u32,
    pub public_limits: Limits,
    pub upstream_idle_timeout: Duration,
    /// What is read of an upload after an early answer (`--linger-time`, `--linger-bytes`).
    pub linger: Linger,
    pub edge_probe_timeout: Duration,
    pub trusted_proxies: TrustedProxies,
    pub edge_limits: EdgeLimits,
    /// The kept-alive tunnel streams to edges.
    pub pool: PoolLimits,
    pub list_edges: bool,
    /// The express lane (see [`RelayArgs::no_express`]).
    pub express: bool,
    /// With `--redis`: serve as one with the other relays of the cluster.
    pub cluster: Option<ClusterSettings>,
    /// Public TCP ports and the edge services they reach.
    pub tcp: Vec<TcpForwardSpec>,
    /// With `--https-listen`.
    pub https: Option<HttpsSettings>,
}

/// The HTTPS listener and its certificates.
#[derive(Debug, Clone)]
pub struct HttpsSettings {
    pub listen: SocketAddr,
    pub certificates: Vec<CertificateFiles>,
    /// Plain HTTP requests are redirected to HTTPS.
    pub redirect_http: bool,
}

/// A public TCP port and the edge service it reaches (`--tcp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpForwardSpec {
    pub listen: SocketAddr,
    pub edge: String,
    pub service: String,
}

/// Parses `[ADDR:]PORT=EDGE/SERVICE`.
fn parse_tcp_forward(text: &str) -> Result<TcpForwardSpec, String> {
    let usage = || format!("--tcp {text:?} is not [ADDR:]PORT=EDGE/SERVICE");
    let (listen, target) = text.split_once('=').ok_or_else(usage)?;
    let (edge, service) = target.split_once('/').ok_or_else(usage)?;
    let listen = match listen.parse::<u16>() {
        Ok(port) => SocketAddr::from(([0, 0, 0, 0], port)),
        Err(_) => listen.parse().map_err(|_| usage())?,
    };
    if !EdgeName::is_valid(edge) || !EdgeName::is_valid(service) {
        return Err(format!(
            "--tcp {text:?}: edge and service names are lowercase DNS labels"
        ));
    }
    Ok(TcpForwardSpec {
        listen,
        edge: edge.to_owned(),
        service: service.to_owned(),
    })
}

/// How many kept-alive tunnel streams the relay holds to each edge, and for how long
/// (`--pool-idle-timeout`, `--pool-max-idle`).
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            idle_timeout: backhaul::http::DEFAULT_POOL_IDLE_TIMEOUT,
            max_idle: backhaul::http::pool::DEFAULT_MAX_IDLE_PER_AUTHORITY,
        }
    }
}

/// How the relay treats edges before and while they register (the library acceptor's
/// and registry's settings).
#[derive(Debug, Clone)]
pub struct EdgeLimits {
    pub admission: AdmissionConfig,
    pub register_timeout: Duration,
    pub log_summary_interval: Duration,
    pub takeover_ping_timeout: Duration,
    pub max_lanes: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            admission: AdmissionConfig::default(),
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
            log_summary_interval: DEFAULT_LOG_SUMMARY_INTERVAL,
            takeover_ping_timeout: DEFAULT_TAKEOVER_PING_TIMEOUT,
            max_lanes: backhaul::quic::lane::DEFAULT_MAX_LANES,
        }
    }
}

pub async fn run(args: RelayArgs) -> Result<(), BoxError> {
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Identity::from_files(cert, key)?,
        _ => {
            let key_out = args
                .key_out
                .clone()
                .unwrap_or_else(|| key_path_beside(&args.cert_out));
            Identity::load_or_generate(
                &args.cert_out,
                &key_out,
                &[&args.domain, "localhost", "127.0.0.1"],
            )?
        }
    };
    let edge_limits = EdgeLimits {
        admission: AdmissionConfig {
            max_unregistered: args.max_unregistered,
            max_unregistered_per_source: args.max_unregistered_per_source,
            handshake_rate: args.handshake_rate,
            handshake_burst: args.handshake_burst,
            auth_backoff: args.auth_backoff,
            max_auth_backoff: args.max_auth_backoff,
            max_penalized_sources: args.max_penalized_sources,
        },
        register_timeout: args.register_timeout,
        log_summary_interval: args.log_summary_interval,
        takeover_ping_timeout: args.takeover_ping_timeout,
        max_lanes: args.max_lanes,
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
        listen_backlog: args.listen_backlog,
        public_limits: Limits {
            max_connections: fit_to_fd_limit(args.max_connections),
            header_timeout: args.header_timeout,
            idle_timeout: args.idle_timeout,
            write_timeout: args.write_timeout,
            placement_patience: args.placement_patience,
            placement_peek_bytes: args.placement_peek_bytes,
            ..Limits::DEFAULT
        },
        upstream_idle_timeout: args.upstream_idle_timeout,
        linger: Linger {
            time: args.linger_time,
            bytes: args.linger_bytes,
        },
        pool: PoolLimits {
            idle_timeout: args.pool_idle_timeout,
            max_idle: args.pool_max_idle,
        },
        edge_probe_timeout: args.edge_probe_timeout,
        trusted_proxies: TrustedProxies::parse(&args.trusted_proxies)?,
        edge_limits,
        list_edges: args.list_edges,
        express: !args.no_express,
        cluster: args.cluster.settings()?,
        tcp: args.tcp,
        https: match args.https_listen {
            None => None,
            Some(listen) => {
                if args.tls_cert.len() != args.tls_key.len() {
                    return Err("give one --tls-key for each --tls-cert, in the same order".into());
                }
                let certificates = args
                    .tls_cert
                    .iter()
                    .zip(&args.tls_key)
                    .map(|(chain, key)| CertificateFiles::new(chain, key))
                    .collect();
                Some(HttpsSettings {
                    listen,
                    certificates,
                    redirect_http: args.redirect_http,
                })
            }
        },
    };
    let relay = start(config).await?;
    shutdown_signal().await;
    info!("shutting down");
    relay.shutdown().await;
    Ok(())
}

/// The relay's limits on `--tcp` connections.
#[derive(Clone, Copy)]
struct TcpLimits {
    open_timeout: Duration,
    max_connections: usize,
    drain_timeout: Duration,
}

/// A `--tcp` forwarder with the relay's metrics and limits.
fn tcp_settings<D>(forward: TcpForward<D>, state: &RelayState, limits: TcpLimits) -> TcpForward<D>
where
    D: backhaul::relay::Directory + Send + Sync + 'static,
{
    let forward = match &state.shards {
        Some(shards) => forward.with_shards(shards.clone()),
        None => forward,
    };
    forward
        .with_observer(state.metrics.tcp_observer())
        .with_open_timeout(limits.open_timeout)
        .with_max_connections(limits.max_connections)
        .with_drain_timeout(limits.drain_timeout)
}

/// A running relay.
pub struct RunningRelay {
    pub quic_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// With `--https-listen`.
    pub https_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Edge sessions outlive the public listener's drain, so in-flight requests finish.
    stop_edges: watch::Sender<bool>,
    edges_task: JoinHandle<()>,
    /// Follows the registry (per-edge clients, memory trims).
    follow_task: JoinHandle<()>,
    /// Serves this relay's edges to peer relays, in a cluster.
    peer_task: Option<JoinHandle<()>>,
    state: Arc<RelayState>,
}

impl RunningRelay {
    /// Stops accepting, lets in-flight requests finish (up to the shutdown timeout), then
    /// stops the acceptor, which tells every edge "relay shutting down" and closes it.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let _ = self.stop_edges.send(true);
        let _ = (&mut self.edges_task).await;
        if let Some(peer_task) = &mut self.peer_task {
            let _ = peer_task.await;
        }
        if let Some(cluster) = &self.state.cluster {
            // Tells the other relays at once rather than letting the leases run out.
            cluster.directory.shutdown().await;
        }
        self.follow_task.abort();
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        self.edges_task.abort();
        self.follow_task.abort();
        if let Some(peer_task) = &self.peer_task {
            peer_task.abort();
        }
    }
}

pub async fn start(config: RelayConfig) -> Result<RunningRelay, BoxError> {
    let quic_listen = config.quic_listen;
    let endpoint =
        backhaul::relay::server_endpoint(quic_listen, config.identity.clone(), DEFAULT_ALPN)
            .map_err(|e| format!("binding the QUIC listener on {quic_listen}: {e}"))?;
    let http = backhaul::listener::bind_with_backlog(config.http_listen, config.listen_backlog)
        .map_err(|e| format!("binding the HTTP listener on {}: {e}", config.http_listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| format!("binding the admin listener on {}: {e}", config.admin_listen))?;
    let quic_addr = endpoint.local_addr()?;
    let http_addr = http.local_addr()?;
    let https = match &config.https {
        Some(settings) => {
            let certificates = ReloadableCertificates::load(settings.certificates.clone())
                .map_err(|e| format!("loading the HTTPS certificates: {e}"))?;
            let listener =
                backhaul::listener::bind_with_backlog(settings.listen, config.listen_backlog)
                    .map_err(|e| {
                        format!("binding the HTTPS listener on {}: {e}", settings.listen)
                    })?;
            Some((listener, certificates))
        }
        None => None,
    };
    let admin_addr = admin.local_addr()?;
    let session_config = Config::new()
        .with_agent(concat!("backhaul-relay/", env!("CARGO_PKG_VERSION")))
        .with_ping_interval(config.keepalive)
        .with_ping_timeout(config.keepalive)
        .with_open_timeout(config.open_timeout)
        .with_max_inflight_opens(1024);
    let limits = config.edge_limits;
    let registry = Registry::with_policy(TakeoverPolicy::KeepLiveHolder {
        ping_timeout: limits.takeover_ping_timeout,
    });
    let registry_events = registry.subscribe();
    let (stop_edges, edges_stopped) = watch::channel(false);
    let started_cluster = match config.cluster {
        Some(settings) => Some(Cluster::start(
            settings,
            &registry,
            &config.identity,
            &config.domain,
            config.keepalive,
            config.open_timeout,
            edges_stopped.clone(),
        )?),
        None => None,
    };
    let mut acceptor = EdgeAcceptor::new(endpoint, registry.clone(), config.tokens);
    if let Some(started) = &started_cluster {
        acceptor = acceptor.with_claims(started.cluster.directory.clone());
    }
    // On shards (the relay's default runtime, see `main`), each edge is served on one.
    let shards = ShardSet::current();
    if let Some(shards) = &shards {
        acceptor = acceptor.with_shards(shards.clone());
    }
    let acceptor = acceptor
        .with_admission(limits.admission)
        .with_session_config(session_config)
        .with_register_timeout(limits.register_timeout)
        .with_log_summary_interval(limits.log_summary_interval)
        .with_max_lanes(limits.max_lanes);
    let metrics = Metrics::new()?;
    let clients = edges::clients(registry.clone(), &metrics, config.pool, false);
    let http2_clients = edges::clients(registry.clone(), &metrics, config.pool, true);
    let (cluster, peer_task, peer_addr) = match started_cluster {
        Some(StartedCluster {
            cluster,
            peer_task,
            peer_addr,
        }) => (Some(cluster), Some(peer_task), Some(peer_addr)),
        None => (None, None, None),
    };
    let state = Arc::new(RelayState {
        domain: config.domain,
        default_service: config.default_service,
        metrics,
        registry,
        accept_stats: acceptor.stats(),
        clients,
        http2_clients,
        metrics_sync: Mutex::new(()),
        request_timeout: config.request_timeout,
        upstream_idle_timeout: config.upstream_idle_timeout,
        linger: config.linger,
        edge_probe_timeout: config.edge_probe_timeout,
        trusted_proxies: config.trusted_proxies,
        list_edges: config.list_edges,
        express: config.express.then(|| {
            backhaul::http::express::StreamPool::new(config.pool.idle_timeout, config.pool.max_idle)
        }),
        cluster,
        shards,
    });
    let (stop, stopped) = watch::channel(false);
    let mut edges_stopped = edges_stopped;
    let serving = acceptor
        .serve()
        .with_graceful_shutdown(async move { until_stopped(&mut edges_stopped).await });
    let edges_task = tokio::spawn(serving);
    let follow_task = tokio::spawn(follow_edges(Arc::clone(&state), registry_events));
    let mut tasks = JoinSet::new();
    let public_limits = Limits {
        shutdown_timeout: config.shutdown_timeout,
        ..config.public_limits
    };
    let redirect_to = match (&https, &config.https) {
        (Some((listener, _)), Some(settings)) if settings.redirect_http => {
            Some(listener.local_addr()?.port())
        }
        _ => None,
    };
    tasks.spawn(serve_public(
        http,
        Arc::clone(&state),
        public_limits,
        None,
        redirect_to,
        stopped.clone(),
    ));
    let mut https_addr = None;
    if let Some((listener, certificates)) = https {
        https_addr = Some(listener.local_addr()?);
        let tls = certificates.server_config(&HTTP_ALPN);
        tasks.spawn(serve_public(
            listener,
            Arc::clone(&state),
            public_limits,
            Some(tls),
            None,
            stopped.clone(),
        ));
        tasks.spawn(reload_on_sighup(certificates, stopped.clone()));
    }
    let mut tcp_addrs = Vec::new();
    let tcp_limits = TcpLimits {
        open_timeout: config.open_timeout,
        max_connections: config.public_limits.max_connections,
        drain_timeout: config.shutdown_timeout,
    };
    for spec in config.tcp {
        let listener = backhaul::listener::bind_with_backlog(spec.listen, config.listen_backlog)
            .map_err(|e| format!("binding the TCP port {}: {e}", spec.listen))?;
        tcp_addrs.push(listener.local_addr()?);
        let mut stop = stopped.clone();
        let until_stop = async move { until_stopped(&mut stop).await };
        let (edge, service) = (spec.edge, spec.service);
        // In a cluster, an edge attached to another relay is reached through that relay,
        // over the same peer sessions as HTTP requests.
        let forward = match &state.cluster {
            Some(cluster) => {
                let directory = cluster.directory.clone();
                let forward = TcpForward::new(listener, directory.clone(), edge, service)
                    .with_peers(cluster.pool().clone(), directory);
                tcp_settings(forward, &state, tcp_limits).serve()
            }
            None => {
                let forward = TcpForward::new(listener, state.registry.clone(), edge, service);
                tcp_settings(forward, &state, tcp_limits).serve()
            }
        };
        tasks.spawn(forward.with_graceful_shutdown(until_stop));
    }
    tasks.spawn(serve_admin(admin, Arc::clone(&state), stopped));
    info!(%quic_addr, %http_addr, ?https_addr, %admin_addr, ?peer_addr, ?tcp_addrs, domain = %state.domain, "relay listening");
    Ok(RunningRelay {
        quic_addr,
        http_addr,
        https_addr,
        admin_addr,
        stop,
        tasks,
        stop_edges,
        edges_task,
        follow_task,
        peer_task,
        state,
    })
}

/// Re-reads the HTTPS certificates on each SIGHUP until `stop`; a failed reload keeps the
/// certificates in use and says why. Connections already open keep theirs.
async fn reload_on_sighup(
    certificates: Arc<ReloadableCertificates>,
    mut stop: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            warn!("cannot watch SIGHUP: certificates will not be reloaded");
            return;
        };
        loop {
            tokio::select! {
                () = until_stopped(&mut stop) => return,
                received = hangups.recv() => {
                    if received.is_none() {
                        return;
                    }
                    match certificates.reload() {
                        Ok(count) => info!(count, "SIGHUP: HTTPS certificates reloaded"),
                        Err(error) => warn!(%error, "SIGHUP: reloading the HTTPS certificates failed; keeping the current ones"),
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = certificates;
        until_stopped(&mut stop).await;
    }
}

/// Serves `service` with `server` until `stop`.
async fn serve_http<S>(server: Server, service: S, mut stop: watch::Receiver<bool>)
where
    S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    server
        .serve(service)
        .with_graceful_shutdown(async move { until_stopped(&mut stop).await })
        .await;
}

struct RelayState {
    domain: String,
    default_service: String,
    metrics: Metrics,
    /// The connected edges (the library's registry, filled by the acceptor).
    registry: Registry,
    accept_stats: AcceptStats,
    clients: MeteredClients,
    /// For requests forwarded as HTTP/2 (see `backhaul::http::proxy::tunnel_version`).
    http2_clients: MeteredClients,
    /// Serialises scrapes' metric updates (see `edges::sync_edge_metrics`).
    metrics_sync: Mutex<()>,
    request_timeout: Duration,
    upstream_idle_timeout: Duration,
    linger: Linger,
    edge_probe_timeout: Duration,
    trusted_proxies: TrustedProxies,
    list_edges: bool,
    /// Unless `--no-express`: plain HTTP/1.1 requests take the express lane, and its idle
    /// tunnel streams wait here (bounded by the pool flags, like the full path's).
    express: Option<backhaul::http::express::StreamPool>,
    /// With `--redis`: the shared directory and the way to peer relays.
    cluster: Option<Cluster>,
    /// When the relay runs on shards (see `backhaul::shards`): edges, public connections
    /// and TCP connections are placed on them.
    shards: Option<ShardSet>,
}

/// Where a request for an edge goes.
enum EdgeRoute {
    /// The edge is attached here.
    Local(EdgeEntry),
    /// The edge is attached to another relay of the cluster.
    Peer(PeerRoute),
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RelayState {
    /// Where the edge called `name` is, with the HTTP client to reach it with `version`
    /// (HTTP/1.1 or HTTP/2): `Ok(None)` if it is connected nowhere, `Err` with the answer
    /// if it cannot be reached.
    async fn edge(&self, name: &str, version: http::Version) -> Result<Option<EdgeRoute>, Failure> {
        let http2 = version == http::Version::HTTP_2;
        let located = match &self.cluster {
            Some(cluster) => cluster.directory.locate(name).await,
            None => self.registry.locate(name).await,
        };
        let location = located.map_err(|error| {
            warn!(error = ?error_chain(&error), "looking the edge up failed");
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("edge {name:?} cannot be looked up now: try again later"),
                error_chain(&error),
            )
        })?;
        match (location, &self.cluster) {
            (Location::Local(handle), _) => Ok(Some(EdgeRoute::Local(EdgeEntry {
                http: if http2 {
                    self.http2_clients.client(&handle).into()
                } else {
                    self.clients.pool(&handle).into()
                },
                handle,
            }))),
            (Location::Elsewhere(relay), Some(cluster)) => cluster
                .route(relay, name, http2)
                .await
                .map(EdgeRoute::Peer)
                .map(Some),
            _ => Ok(None),
        }
    }

    fn edge_names(&self) -> Vec<String> {
        self.registry
            .names()
            .into_iter()
            .map(|name| name.into_string())
            .collect()
    }
}

/// File descriptors kept for everything but public connections: the QUIC socket, the
/// admin listener and its connections, logs, and the edges' local needs.
const RESERVED_FDS: u64 = 128;

/// Raises the open-file limit as far as allowed and lowers `wanted` public connections to
/// what it leaves room for, so that running out of descriptors never stops the relay.
fn fit_to_fd_limit(wanted: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            warn!(%error, "cannot read the open-file limit; keeping --max-connections as given");
            return wanted;
        }
    };
    let room = usize::try_from(limit.saturating_sub(RESERVED_FDS))
        .unwrap_or(usize::MAX)
        .max(1);
    if room < wanted {
        warn!(
            fd_limit = limit,
            max_connections = room,
            "the open-file limit allows fewer public connections than --max-connections"
        );
    }
    wanted.min(room)
}
