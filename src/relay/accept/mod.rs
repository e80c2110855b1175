//! Accepting edges on a quinn endpoint: admission, handshakes, authentication, registry.
//!
//! A connection is *unregistered* from its first packet until its edge has authenticated,
//! and until then it is treated as hostile:
//! - it passes [`Admission`] before any TLS work, and holds one of its slots;
//! - its QUIC handshake, session handshake and authentication must all finish within the
//!   registration timeout;
//! - it may open only [`UNREGISTERED_STREAMS`] streams and have
//!   [`UNREGISTERED_RECEIVE_WINDOW`] bytes unread (when the endpoint comes from
//!   [`server_endpoint`]). The stream limit is about memory: quinn keeps a table entry
//!   for every stream the peer may open, whether it opens it or not.
//!
//! An authenticated edge gets the full limits (its stream limit starts at
//! [`INITIAL_STREAMS`](crate::quic::INITIAL_STREAMS) and grows with use up to
//! [`with_registered_max_streams`](Acceptor::with_registered_max_streams)), is attached to the [`Registry`], and stays
//! there until its session ends. A refused one is answered (so an honest edge can say why
//! it stops), given a round trip to close by itself, then closed with
//! [`CLOSE_UNREGISTERED`]; bad credentials also back its source off.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::VarInt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tower::{BoxError, Service};
use tracing::{info_span, warn, Instrument};

mod connection;
mod lane;

use connection::{handle_connection, turn_away, Shared};
use lane::LaneTable;

use super::admission::{Admission, AdmissionConfig, LogSummary};
use super::auth::{AuthRequest, Tokens};
use super::claims::{DynClaims, LocalClaims, NameClaims};
use super::name::EdgeName;
use super::registry::Registry;
use crate::config::Config;
use crate::error::Error;
use crate::lazy_serve::{LazyServe, Signal};
use crate::quic::lane::DEFAULT_MAX_LANES;
use crate::quic::{transport_config, Identity, DEFAULT_MAX_STREAMS};
use crate::shards::ShardSet;

/// Streams an unregistered peer may open: the control stream, with room to spare.
pub const UNREGISTERED_STREAMS: u32 = 4;

/// Bytes an unregistered peer may have unread across its streams: its Hello and its
/// registration need a few hundred.
pub const UNREGISTERED_RECEIVE_WINDOW: u32 = 64 * 1024;

/// QUIC close code for a connection that did not register (refused, timed out).
pub const CLOSE_UNREGISTERED: u32 = 0x10;

/// QUIC close code for connections closed because the relay shuts down.
pub const CLOSE_SHUTDOWN: u32 = 0;

/// How long a new connection has to finish its handshakes and authenticate, by default.
pub const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often repeated refusals are summarised in the log, by default.
pub const DEFAULT_LOG_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// How long edges get to hear "relay shutting down" before their connections close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long a refused edge gets to read the refusal and close the connection itself
/// before the relay closes it. An honest edge closes at once: this is a round trip.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// A quinn server config for a relay: the library's tunnel settings
/// ([`quic::server_config`](crate::quic::server_config)), except that connections start
/// with [`UNREGISTERED_STREAMS`] and [`UNREGISTERED_RECEIVE_WINDOW`]; the [`Acceptor`]
/// raises both once an edge has authenticated.
///
/// # Errors
/// [`Error::Transport`] if the certificate or key is unusable.
pub fn server_config(identity: Identity, alpn: &[u8]) -> Result<quinn::ServerConfig, Error> {
    let mut config = crate::quic::server_config(identity, alpn)?;
    let mut transport = transport_config(UNREGISTERED_STREAMS);
    transport.receive_window(VarInt::from_u32(UNREGISTERED_RECEIVE_WINDOW));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A relay's endpoint on `addr` with [`server_config`], on the library's relay socket
/// settings ([`quic::server_endpoint_with_config`](crate::quic::server_endpoint_with_config)).
///
/// # Errors
/// [`Error::Transport`] if the socket cannot be bound or the identity is unusable.
pub fn server_endpoint(
    addr: SocketAddr,
    identity: Identity,
    alpn: &[u8],
) -> Result<quinn::Endpoint, Error> {
    crate::quic::server_endpoint_with_config(addr, server_config(identity, alpn)?)
}

/// Counters of an [`Acceptor`], shared with its clones; read them with
/// [`snapshot`](Self::snapshot) (for metrics, tests, an admin page).
#[derive(Debug, Clone, Default)]
pub struct AcceptStats {
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    admitted: AtomicU64,
    refused_handshake_rate: AtomicU64,
    refused_unregistered_cap: AtomicU64,
    refused_source_backoff: AtomicU64,
    handshake_failed: AtomicU64,
    timed_out: AtomicU64,
    registered: AtomicU64,
    unauthorized: AtomicU64,
    auth_unavailable: AtomicU64,
    name_taken: AtomicU64,
    directory_unavailable: AtomicU64,
    lanes_joined: AtomicU64,
    lanes_refused: AtomicU64,
    unregistered: AtomicUsize,
}

/// The counts at one moment; see [`AcceptStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcceptCounts {
    /// Handshakes let in by admission.
    pub admitted: u64,
    /// Handshakes ignored over the handshake rate.
    pub refused_handshake_rate: u64,
    /// Handshakes refused because too many connections had not registered yet.
    pub refused_unregistered_cap: u64,
    /// Handshakes refused because their source is backing off after failures.
    pub refused_source_backoff: u64,
    /// Admitted connections whose QUIC or session handshake failed.
    pub handshake_failed: u64,
    /// Admitted connections that did not register within the registration timeout.
    pub timed_out: u64,
    /// Edges registered (counted when the relay accepts, before the edge hears it).
    pub registered: u64,
    /// Registrations refused: bad credentials, or no proper `_register` first.
    pub unauthorized: u64,
    /// Registrations answered "unavailable" because the authenticator failed.
    pub auth_unavailable: u64,
    /// Registrations refused because a live edge holds the name (here, or elsewhere in
    /// the cluster: see [`Acceptor::with_claims`]).
    pub name_taken: u64,
    /// Registrations answered "unavailable" because the shared directory could not decide
    /// the name's claim.
    pub directory_unavailable: u64,
    /// Lanes (further connections of registered edges' sessions) added to their sessions.
    pub lanes_joined: u64,
    /// Lanes refused: a key no live session has, or a session with its lanes already.
    pub lanes_refused: u64,
    /// Connections not registered yet, now.
    pub unregistered: usize,
}

impl AcceptStats {
    /// The counts now.
    #[must_use]
    pub fn snapshot(&self) -> AcceptCounts {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        AcceptCounts {
            admitted: get(&c.admitted),
            refused_handshake_rate: get(&c.refused_handshake_rate),
            refused_unregistered_cap: get(&c.refused_unregistered_cap),
            refused_source_backoff: get(&c.refused_source_backoff),
            handshake_failed: get(&c.handshake_failed),
            timed_out: get(&c.timed_out),
            registered: get(&c.registered),
            unauthorized: get(&c.unauthorized),
            auth_unavailable: get(&c.auth_unavailable),
            name_taken: get(&c.name_taken),
            directory_unavailable: get(&c.directory_unavailable),
            lanes_joined: get(&c.lanes_joined),
            lanes_refused: get(&c.lanes_refused),
            unregistered: c.unregistered.load(Ordering::Relaxed),
        }
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Accepts edges on a quinn endpoint into a [`Registry`]; see the [module docs](self).
///
/// `A` authenticates: a `tower::Service<AuthRequest, Response = EdgeName>`, [`Tokens`]
/// by default. Its [`Error::Unauthorized`] refuses the edge; any other error answers
/// "unavailable" (see [`auth`](super::auth)).
///
/// ```no_run
/// use backhaul::quic::{Identity, DEFAULT_ALPN};
/// use backhaul::relay::{self, Acceptor, Registry, Tokens};
///
/// # async fn run() -> Result<(), backhaul::Error> {
/// let identity = Identity::self_signed(&["relay.example.com"])?;
/// let endpoint = relay::server_endpoint("0.0.0.0:4433".parse().unwrap(), identity, DEFAULT_ALPN)?;
/// let registry = Registry::new();
/// let tokens = Tokens::parse(["alpha=s3cret"])?;
/// let serving = Acceptor::new(endpoint, registry.clone(), tokens)
///     .serve()
///     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; });
/// tokio::spawn(serving);
/// // …route to `registry`'s edges.
/// # Ok(()) }
/// ```
pub struct Acceptor<A = Tokens> {
    endpoint: quinn::Endpoint,
    authenticator: A,
    registry: Registry,
    admission: AdmissionConfig,
    session_config: Config,
    register_timeout: Duration,
    log_summary_interval: Duration,
    registered_max_streams: u32,
    max_lanes: usize,
    claims: Arc<dyn DynClaims>,
    stats: AcceptStats,
    shards: Option<ShardSet>,
}

impl<A> fmt::Debug for Acceptor<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("registry", &self.registry)
            .field("admission", &self.admission)
            .field("register_timeout", &self.register_timeout)
            .finish_non_exhaustive()
    }
}

impl<A> Acceptor<A>
where
    A: Service<AuthRequest, Response = EdgeName> + Clone + Send + 'static,
    A::Error: Into<BoxError>,
    A::Future: Send,
{
    /// Accepts on `endpoint` (best made with [`server_endpoint`]), authenticates with
    /// `authenticator`, attaches to `registry`.
    pub fn new(endpoint: quinn::Endpoint, registry: Registry, authenticator: A) -> Self {
        Self {
            endpoint,
            authenticator,
            registry,
            admission: AdmissionConfig::default(),
            session_config: Config::new(),
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
            log_summary_interval: DEFAULT_LOG_SUMMARY_INTERVAL,
            registered_max_streams: DEFAULT_MAX_STREAMS,
            max_lanes: DEFAULT_MAX_LANES,
            claims: Arc::new(LocalClaims),
            stats: AcceptStats::default(),
            shards: None,
        }
    }

    /// Accepts each edge's connection on the shard with the fewest edges, so that its
    /// QUIC connection's driver and its session's tasks run on that shard's thread (see
    /// [`shards`](crate::shards)); without it (the default), on the runtime serving this
    /// acceptor.
    #[must_use]
    pub fn with_shards(mut self, shards: ShardSet) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Claims each edge's name cluster-wide before telling the edge it is registered
    /// (default [`LocalClaims`]: no claim); a refused claim refuses the edge as a name
    /// taken on this relay would be. See [`claims`](super::claims).
    #[must_use]
    pub fn with_claims(mut self, claims: impl NameClaims) -> Self {
        self.claims = Arc::new(claims);
        self
    }

    /// The admission limits (default [`AdmissionConfig::default`]).
    #[must_use]
    pub fn with_admission(mut self, admission: AdmissionConfig) -> Self {
        self.admission = admission;
        self
    }

    /// The sessions' configuration (keep-alives, open limits, agent…); default
    /// [`Config::new`].
    #[must_use]
    pub fn with_session_config(mut self, config: Config) -> Self {
        self.session_config = config;
        self
    }

    /// How long a new connection has for its QUIC and session handshakes and its
    /// authentication together (default 10 s).
    #[must_use]
    pub fn with_register_timeout(mut self, timeout: Duration) -> Self {
        self.register_timeout = timeout;
        self
    }

    /// How often repeated refusals are summarised in the log (default 60 s): the first
    /// of a kind is logged in full, the rest counted.
    #[must_use]
    pub fn with_log_summary_interval(mut self, interval: Duration) -> Self {
        self.log_summary_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Streams an authenticated edge may open at once, at most (default
    /// [`DEFAULT_MAX_STREAMS`]); its limit starts lower and grows as its streams fill it
    /// (see [`StreamLimit`](crate::transport::StreamLimit)).
    #[must_use]
    pub fn with_registered_max_streams(mut self, max_streams: u32) -> Self {
        self.registered_max_streams = max_streams;
        self
    }

    /// The most QUIC connections an edge's session may run over, its own included
    /// (default [`DEFAULT_MAX_LANES`]; 1 turns lanes off). See
    /// [`quic::lane`](crate::quic::lane).
    #[must_use]
    pub fn with_max_lanes(mut self, max_lanes: usize) -> Self {
        self.max_lanes = max_lanes.max(1);
        self
    }

    /// The registry edges are attached to.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The counters (shared: read them while serving).
    #[must_use]
    pub fn stats(&self) -> AcceptStats {
        self.stats.clone()
    }

    /// Serves until the endpoint is closed or the graceful shutdown signal fires.
    pub fn serve(self) -> ServeEdges {
        ServeEdges {
            inner: LazyServe::new(move |shutdown| self.run(shutdown)),
        }
    }

    async fn run(self, mut shutdown: Signal) {
        let Self {
            endpoint,
            authenticator,
            registry,
            admission,
            session_config,
            register_timeout,
            log_summary_interval,
            registered_max_streams,
            max_lanes,
            claims,
            stats,
            shards,
        } = self;
        let shared = Arc::new(Shared {
            registry,
            admission: Mutex::new(Admission::new(admission, std::time::Instant::now())),
            log_summary: Mutex::new(LogSummary::default()),
            stats,
            session_config,
            register_timeout,
            registered_max_streams,
            claims,
            lanes: LaneTable::new(max_lanes),
        });
        let (stop, stopped) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut summaries = tokio::time::interval(log_summary_interval);
        summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => match shared.admit(&incoming) {
                        Ok(slot) => {
                            let remote = incoming.remote_address();
                            let span = info_span!("edge", %remote, edge = tracing::field::Empty);
                            let task = handle_connection(
                                Box::new(incoming),
                                slot,
                                Arc::clone(&shared),
                                authenticator.clone(),
                                stopped.clone(),
                            );
                            match &shards {
                                Some(shards) => {
                                    // Counted on its shard for as long as it is served.
                                    let place = shards.place_edge();
                                    let handle = place.handle().clone();
                                    let task = async move {
                                        task.await;
                                        drop(place);
                                    };
                                    connections.spawn_on(task.instrument(span), &handle);
                                }
                                None => {
                                    connections.spawn(task.instrument(span));
                                }
                            }
                        }
                        Err(refusal) => turn_away(incoming, refusal),
                    },
                    None => break,
                },
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    log_panic(joined);
                }
                _ = summaries.tick() => shared.log_summaries(log_summary_interval),
                () = &mut shutdown => break,
            }
        }
        // New handshakes are refused from here on; edges are told, then closed.
        endpoint.set_server_config(None);
        let _ = stop.send(true);
        let drained = timeout(SHUTDOWN_GRACE, async {
            while let Some(joined) = connections.join_next().await {
                log_panic(joined);
            }
        })
        .await;
        if drained.is_err() {
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
        endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"relay shutting down");
    }
}

fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            warn!(%error, "an edge connection's task panicked");
        }
    }
}

/// Accepting edges, from [`Acceptor::serve`]; `.await` it or spawn it. Resolves after a
/// graceful shutdown, or when the endpoint was closed. Dropping it stops accepting and
/// aborts every edge connection's task (their edges are detached).
#[must_use = "futures do nothing unless polled"]
pub struct ServeEdges {
    inner: LazyServe,
}

impl fmt::Debug for ServeEdges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeEdges")
            .field("started", &self.inner.is_started())
            .finish_non_exhaustive()
    }
}

impl ServeEdges {
    /// Shuts down gracefully when `signal` resolves: new handshakes are refused, each
    /// edge's session is closed with a reason, then the endpoint. Set it before the
    /// first poll.
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.set_shutdown(signal);
        self
    }
}

impl Future for ServeEdges {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.poll(cx)
    }
}
