//! Several relays serving as one (`--redis`): the library's shared directory of edges
//! (`backhaul::relay::cluster::RedisDirectory`) and relay-to-relay streams
//! (`backhaul::relay::peer`), wired into the proxy.
//!
//! Each relay publishes its own edges in Redis and answers lookups from a local cache of
//! everyone's. A request for an edge attached here goes to it as on a lone relay; one for
//! an edge attached to another relay goes through that relay's peer endpoint (one QUIC
//! connection per peer, [`PeerPool`]), which splices the stream to its edge byte for byte.
//! The forwarding headers this relay set (the client's address) therefore reach the edge
//! as they were sent: the far relay never parses the request. Each (peer, edge) pair has
//! a pooled hyper client, as a local edge has, so keep-alive connections reuse streams;
//! a client that failed is dropped and made again on the next request.

use std::collections::HashMap;

use backhaul::http::express::Failure as ExpressFailure;
use backhaul::http::proxy::{express_failure, Failure};
use backhaul::quic::load_certs;
use backhaul::relay::cluster::{ClusterConfig, RedisDirectory};
use backhaul::relay::peer::{
    self, resolve_peer_address, ClusterSecret, PeerConnector, PeerPool, PeerServer,
};
use backhaul::relay::{EdgeName, RelayId};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;

use super::*;

/// Pooled clients to edges behind other relays kept at once (one per relay and edge).
const MAX_PEER_CLIENTS: usize = 4096;

/// The relay's cluster flags; all but `--redis` matter only with it.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Redis holding the cluster's shared directory of edges (redis://HOST:PORT/). Off by
    /// default: the relay then knows only its own edges.
    #[arg(
        long,
        env = "BACKHAUL_REDIS",
        hide_env_values = true,
        requires = "cluster_secret"
    )]
    pub redis: Option<String>,
    /// This relay's id in the cluster (default: its --peer-address, unique in the
    /// cluster by construction).
    #[arg(long, env = "BACKHAUL_RELAY_ID")]
    pub relay_id: Option<String>,
    /// UDP address other relays dial to reach this relay's edges (QUIC, ALPN
    /// backhaul-peer/1, the same certificate as the edge listener).
    #[arg(long, default_value = "0.0.0.0:4434", env = "BACKHAUL_PEER_LISTEN")]
    pub peer_listen: SocketAddr,
    /// The address other relays dial for this one, as published in the directory
    /// (default: --peer-listen; set it when that is a wildcard address).
    #[arg(long, env = "BACKHAUL_PEER_ADDRESS")]
    pub peer_address: Option<String>,
    /// The secret relays of the cluster present to each other (required with --redis).
    #[arg(long, env = "BACKHAUL_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Certificates (PEM or DER) of peer relays to trust besides this relay's own (repeat);
    /// relays sharing one certificate need none. Checked against --domain.
    #[arg(long = "peer-cert")]
    pub peer_certs: Vec<PathBuf>,
    /// How long the directory keeps a relay's edges after its last sign of life (a
    /// relay killed without a goodbye is forgotten within it).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub cluster_lease: Duration,
}

/// What a clustered relay needs (from [`ClusterArgs`]).
pub struct ClusterSettings {
    pub redis_url: String,
    pub relay_id: RelayId,
    pub peer_listen: SocketAddr,
    pub peer_address: String,
    pub secret: ClusterSecret,
    /// Peer certificates trusted besides the relay's own.
    pub peer_certs: Vec<CertificateDer<'static>>,
    pub lease: Duration,
}

impl ClusterArgs {
    /// The settings, or `None` without `--redis`.
    pub fn settings(&self) -> Result<Option<ClusterSettings>, BoxError> {
        let Some(redis_url) = self.redis.clone() else {
            return Ok(None);
        };
        let secret = self
            .cluster_secret
            .as_deref()
            .ok_or("--redis needs --cluster-secret")?;
        let peer_address = self
            .peer_address
            .clone()
            .unwrap_or_else(|| self.peer_listen.to_string());
        let relay_id = RelayId::new(self.relay_id.clone().unwrap_or(peer_address.clone()));
        let mut peer_certs = Vec::new();
        for path in &self.peer_certs {
            peer_certs.extend(load_certs(path)?);
        }
        Ok(Some(ClusterSettings {
            redis_url,
            relay_id,
            peer_listen: self.peer_listen,
            peer_address,
            secret: ClusterSecret::new(secret)?,
            peer_certs,
            lease: self.cluster_lease,
        }))
    }
}

/// A pooled HTTP client to one edge through one peer relay.
pub(super) type PeerClient = Client<PeerConnector, ProxyBody>;

/// Peer clients by peer address, edge, and whether they speak HTTP/2.
type PeerClientKey = (SocketAddr, String, bool);

/// This relay's part in the cluster.
pub(super) struct Cluster {
    pub(super) directory: RedisDirectory,
    pool: PeerPool,
    /// (peer address, edge, HTTP/2) → client; an entry is dropped when a request through
    /// it fails.
    clients: Mutex<HashMap<PeerClientKey, PeerClient>>,
}

/// Where a request for an edge in the cluster goes.
pub(super) struct PeerRoute {
    pub(super) relay: RelayId,
    pub(super) address: SocketAddr,
    pub(super) http: PeerClient,
}

/// A running cluster member: the directory and the peer server, with what stops them.
pub(super) struct StartedCluster {
    pub(super) cluster: Cluster,
    pub(super) peer_task: JoinHandle<()>,
    pub(super) peer_addr: SocketAddr,
}

impl Cluster {
    /// Joins the directory in Redis over `registry`, serves this relay's edges to peers on
    /// `settings.peer_listen` until `stop`, and prepares the pool that dials peers.
    /// Peer sessions are pinged every `keepalive` (as edges are), so a peer that vanished
    /// fails requests through it within about two of them instead of hanging them.
    pub(super) fn start(
        settings: ClusterSettings,
        registry: &Registry,
        identity: &Identity,
        server_name: &str,
        keepalive: Duration,
        open_timeout: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Result<StartedCluster, BoxError> {
        let config = ClusterConfig::new(
            settings.redis_url,
            settings.relay_id.clone(),
            settings.peer_address,
        )
        .with_lease(settings.lease);
        let directory = RedisDirectory::start(config, registry.clone())?;
        let listen = settings.peer_listen;
        let endpoint = peer::server_endpoint(listen, identity.clone())
            .map_err(|e| format!("binding the peer listener on {listen}: {e}"))?;
        let peer_addr = endpoint.local_addr()?;
        let serving = PeerServer::new(registry.clone(), settings.secret.clone())
            .serve(endpoint)
            .with_graceful_shutdown(async move { until_stopped(&mut stop).await });
        let peer_task = tokio::spawn(serving);
        let mut trusted = identity.cert_chain.clone();
        trusted.extend(settings.peer_certs);
        let idle_timeout = (keepalive * 3).min(peer::DEFAULT_IDLE_TIMEOUT);
        let session_config = Config::new()
            .with_agent(concat!("backhaul-relay/", env!("CARGO_PKG_VERSION")))
            .with_ping_interval(keepalive)
            .with_ping_timeout(keepalive);
        let pool = PeerPool::new(peer::client_endpoint(&trusted)?, settings.secret)
            .with_relay_id(settings.relay_id)
            .with_server_name(server_name)
            .with_client_config(peer::client_config(&trusted, idle_timeout)?)
            .with_session_config(session_config)
            .with_open_timeout(open_timeout);
        Ok(StartedCluster {
            cluster: Self {
                directory,
                pool,
                clients: Mutex::new(HashMap::new()),
            },
            peer_task,
            peer_addr,
        })
    }

    /// The route to `edge` through `relay` (with an HTTP/2 client if `http2`), or why
    /// there is none.
    pub(super) async fn route(
        &self,
        relay: RelayId,
        edge: &str,
        http2: bool,
    ) -> Result<PeerRoute, Failure> {
        let (address, connector) = self.connector(&relay, edge).await?;
        let mut clients = lock(&self.clients);
        // Bounded: edges come and go between relays; a full table starts over (the
        // clients' pooled streams close as their last users finish).
        let key = (address, edge.to_owned(), http2);
        if clients.len() >= MAX_PEER_CLIENTS && !clients.contains_key(&key) {
            clients.clear();
        }
        let http = clients
            .entry(key)
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    .http2_only(http2)
                    .build(connector)
            })
            .clone();
        drop(clients);
        Ok(PeerRoute {
            relay,
            address,
            http,
        })
    }

    /// The peer address of `relay` and a connector to `edge` through it, or why there is
    /// none.
    pub(super) async fn connector(
        &self,
        relay: &RelayId,
        edge: &str,
    ) -> Result<(SocketAddr, PeerConnector), Failure> {
        let unreachable = |detail: String| {
            Failure::new(
                StatusCode::BAD_GATEWAY,
                format!("relay {relay} is unreachable (cluster)"),
                detail,
            )
        };
        let Some(published) = self.directory.relay_address(relay) else {
            return Err(unreachable(format!(
                "the directory has no address for relay {relay}"
            )));
        };
        let address = match resolve_peer_address(&published).await {
            Ok(address) => address,
            Err(error) => {
                return Err(unreachable(format!(
                    "relay {relay}'s address {published:?}: {error}"
                )))
            }
        };
        let name = EdgeName::new(edge).map_err(|error| unreachable(error.to_string()))?;
        Ok((address, self.pool.connector(address, name)))
    }

    /// Forgets the clients to `edge` through `address` (after a failure through one).
    pub(super) fn forget(&self, address: SocketAddr, edge: &str) {
        let mut clients = lock(&self.clients);
        for http2 in [false, true] {
            clients.remove(&(address, edge.to_owned(), http2));
        }
    }

    /// The sessions to the other relays (for TCP ports, which open streams themselves).
    pub(super) fn pool(&self) -> &PeerPool {
        &self.pool
    }
}

/// What went wrong forwarding through a peer: the peer gone or refusing us is the
/// cluster's problem (502 naming the relay; a request cut by the loss of the peer's
/// session or QUIC connection counts as that too), an edge the peer does not hold means
/// the directory was stale; anything else is the edge's, as for a local edge.
pub(super) fn peer_failure(
    cluster: &Cluster,
    route: &PeerRoute,
    error: &ForwardError,
    edge: &str,
    service: &str,
) -> Failure {
    let way = PeerWay {
        relay: &route.relay,
        address: route.address,
    };
    classify(cluster, way, Some(error), error_chain(error), edge, || {
        forward_failure(error, edge, service)
    })
}

/// The same for a request on the express lane.
pub(super) fn lane_peer_failure(
    cluster: &Cluster,
    way: PeerWay<'_>,
    failure: &ExpressFailure,
    edge: &str,
    service: &str,
) -> Failure {
    let cause = match failure {
        ExpressFailure::Open(error) => Some(&**error as &(dyn std::error::Error + 'static)),
        _ => None,
    };
    classify(cluster, way, cause, failure.to_string(), edge, || {
        express_failure(failure, edge, service)
    })
}

/// The relay an edge is reached through.
#[derive(Clone, Copy)]
pub(super) struct PeerWay<'a> {
    pub(super) relay: &'a RelayId,
    pub(super) address: SocketAddr,
}

/// [`peer_failure`]'s reading of `cause` (its chain), `otherwise` for the edge's own
/// failures.
fn classify(
    cluster: &Cluster,
    way: PeerWay<'_>,
    cause: Option<&(dyn std::error::Error + 'static)>,
    detail: String,
    edge: &str,
    otherwise: impl FnOnce() -> Failure,
) -> Failure {
    let relay = way.relay;
    let unreachable = |detail: String| {
        Failure::new(
            StatusCode::BAD_GATEWAY,
            format!("relay {relay} is unreachable (cluster)"),
            detail,
        )
    };
    // The QUIC connection of a peer route is the one to the peer relay (an edge lost
    // behind it resets the stream instead): its loss, however the chain reports it, is the
    // peer's, even before the pool has noticed.
    if cause.is_some_and(|cause| find_cause::<quinn::ConnectionError>(cause).is_some()) {
        return unreachable(detail);
    }
    match cause.and_then(find_cause::<Error>) {
        Some(
            Error::PeerUnreachable { .. }
            | Error::PeerRefused { .. }
            | Error::SessionClosed
            | Error::Disconnected,
        ) => unreachable(detail),
        Some(Error::EdgeNotAttached { .. }) => Failure::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "edge {edge:?} is no longer attached to relay {relay} (the cluster directory \
                 was stale): try again"
            ),
            detail,
        ),
        None if cluster.pool.live_session(way.address).is_none() => unreachable(detail),
        _ => otherwise(),
    }
}
