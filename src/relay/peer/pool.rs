//! The dialing side: one admitted session per peer relay, dialed on demand and reused.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::{timeout, Instant};
use tracing::{debug, warn};

use super::connector::PeerConnector;
use super::wire::{hello, PEER_SERVICE};
use super::{ClusterSecret, DEFAULT_CONNECT_TIMEOUT, DEFAULT_OPEN_TIMEOUT};
use crate::config::Config;
use crate::edge::Backoff;
use crate::error::{Error, TimeoutKind};
use crate::protocol::RejectCode;
use crate::relay::directory::RelayId;
use crate::relay::name::EdgeName;
use crate::session::{Role, SessionClient};
use crate::transport::QuinnConnection;

/// The first window between dials to a peer that failed: 100 ms, doubling.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The largest window between dials to a peer that keeps failing.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Sessions to peer relays, by address; see the [module docs](super). Cheap to clone:
/// clones share the sessions.
///
/// A peer is dialed by the first request that needs it; requests meanwhile wait for that
/// one dial (bounded by [`with_connect_timeout`](Self::with_connect_timeout)). A lost
/// session is dialed again by the next request; a dial that failed is not retried until a
/// backoff delay has passed (100 ms doubling to 5 s), and requests in between fail at once
/// with the last failure, so a relay cut off from a peer answers 502s at once instead of
/// queueing them. One entry is kept per address ever dialed: a cluster's size.
///
/// ```no_run
/// use backhaul::relay::peer::{self, ClusterSecret, PeerPool};
/// use backhaul::relay::{EdgeName, RelayId};
///
/// # async fn run(trusted: Vec<rustls::pki_types::CertificateDer<'static>>) -> Result<(), backhaul::Error> {
/// let endpoint = peer::client_endpoint(&trusted)?;
/// let pool = PeerPool::new(endpoint, ClusterSecret::new("s3cret")?)
///     .with_relay_id(RelayId::new("relay-b"))
///     .with_server_name("relay-a.cluster.internal");
/// let mut connector = pool.connector("10.0.0.1:4434".parse().unwrap(), EdgeName::new("kiosk")?);
/// let stream = connector.connect("web").await?;
/// # drop(stream); Ok(()) }
/// ```
#[derive(Clone)]
pub struct PeerPool {
    settings: Arc<Settings>,
    peers: Arc<Mutex<HashMap<SocketAddr, Arc<Peer>>>>,
}

#[derive(Clone)]
struct Settings {
    endpoint: quinn::Endpoint,
    client_config: Option<quinn::ClientConfig>,
    server_name: Option<String>,
    relay_id: RelayId,
    secret: ClusterSecret,
    session_config: Config,
    connect_timeout: Duration,
    backoff: Backoff,
}

impl fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerPool")
            .field("relay_id", &self.settings.relay_id)
            .field("peers", &lock(&self.peers).len())
            .field("connect_timeout", &self.settings.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// One peer relay: its live session, if any, and its dialing state.
#[derive(Default)]
struct Peer {
    session: Mutex<Option<SessionClient<QuinnConnection>>>,
    dial: tokio::sync::Mutex<DialState>,
}

#[derive(Default)]
struct DialState {
    backoff: Option<Backoff>,
    retry_at: Option<Instant>,
    last_failure: Option<Failure>,
}

/// What the last dial ended with, to answer requests during the backoff.
#[derive(Debug, Clone)]
enum Failure {
    Refused(Option<String>),
    TimedOut,
    Failed(String),
}

impl Failure {
    fn of(error: &Error) -> Self {
        match error {
            Error::PeerRefused { reason, .. } => Self::Refused(reason.clone()),
            Error::PeerUnreachable { source, .. } if matches!(**source, Error::Timeout(_)) => {
                Self::TimedOut
            }
            Error::PeerUnreachable { source, .. } => Self::Failed(source.to_string()),
            other => Self::Failed(other.to_string()),
        }
    }

    fn error(&self, relay: SocketAddr) -> Error {
        let source = match self {
            Self::Refused(reason) => {
                return Error::PeerRefused {
                    relay,
                    reason: reason.clone(),
                }
            }
            Self::TimedOut => Error::Timeout(TimeoutKind::Connect),
            Self::Failed(why) => Error::transport(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("not dialed again yet; the last dial failed: {why}"),
            )),
        };
        Error::PeerUnreachable {
            relay,
            source: Box::new(source),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single read or write: a poisoned value is still whole.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PeerPool {
    /// Dials peers from `endpoint` (best made with [`client_endpoint`](super::client_endpoint),
    /// which offers [`PEER_ALPN`](super::PEER_ALPN)), presenting `secret`.
    #[must_use]
    pub fn new(endpoint: quinn::Endpoint, secret: ClusterSecret) -> Self {
        let session_config = Config {
            open_timeout: DEFAULT_OPEN_TIMEOUT,
            ..Config::new()
        };
        Self {
            settings: Arc::new(Settings {
                endpoint,
                client_config: None,
                server_name: None,
                relay_id: RelayId::new("unnamed"),
                secret,
                session_config,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
            }),
            peers: Arc::default(),
        }
    }

    fn settings_mut(&mut self) -> &mut Settings {
        Arc::make_mut(&mut self.settings)
    }

    /// This relay's id, told to peers for their logs (default `unnamed`).
    #[must_use]
    pub fn with_relay_id(mut self, relay_id: RelayId) -> Self {
        self.settings_mut().relay_id = relay_id;
        self
    }

    /// The name peers' certificates are checked against (default: the peer's IP
    /// address, for certificates issued to it).
    #[must_use]
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.settings_mut().server_name = Some(name.into());
        self
    }

    /// A client config for dialing, instead of the endpoint's default one.
    #[must_use]
    pub fn with_client_config(mut self, config: quinn::ClientConfig) -> Self {
        self.settings_mut().client_config = Some(config);
        self
    }

    /// The sessions' configuration (default [`Config::new`] with an `open_timeout` of
    /// [`DEFAULT_OPEN_TIMEOUT`]).
    #[must_use]
    pub fn with_session_config(mut self, config: Config) -> Self {
        self.settings_mut().session_config = config;
        self
    }

    /// How long a dial may take, QUIC and session handshakes and the hello together,
    /// before the peer counts as unreachable (default [`DEFAULT_CONNECT_TIMEOUT`]).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings_mut().connect_timeout = timeout;
        self
    }

    /// How long an open through a peer may wait for its answer (the peer relay opening
    /// the edge's stream included) before failing with [`Error::Timeout`] (default
    /// [`DEFAULT_OPEN_TIMEOUT`]). Sets the session config's `open_timeout`.
    #[must_use]
    pub fn with_open_timeout(mut self, timeout: Duration) -> Self {
        self.settings_mut().session_config.open_timeout = timeout;
        self
    }

    /// The delays between dials to a peer that failed (default 100 ms doubling to 5 s).
    #[must_use]
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.settings_mut().backoff = backoff;
        self
    }

    /// A connector to `edge`'s services through the peer relay at `relay`: a
    /// `tower::Service` of service names, [`OpenTarget`](crate::connector::OpenTarget)s
    /// and (with the `http` feature) URIs, like an edge's own
    /// [`Connector`](crate::connector::Connector).
    #[must_use]
    pub fn connector(&self, relay: SocketAddr, edge: EdgeName) -> PeerConnector {
        PeerConnector::new(self.clone(), relay, edge)
    }

    /// The live session with `relay`, if there is one now.
    #[must_use]
    pub fn live_session(&self, relay: SocketAddr) -> Option<SessionClient<QuinnConnection>> {
        let peer = lock(&self.peers).get(&relay).cloned()?;
        let session = lock(&peer.session);
        session.as_ref().filter(|client| client.is_ready()).cloned()
    }

    /// The session with `relay`: the live one, or a new one dialed now.
    ///
    /// # Errors
    /// [`Error::PeerUnreachable`] if the dial failed or timed out, or failed less than a
    /// backoff delay ago; [`Error::PeerRefused`] if the peer refused the cluster secret.
    pub async fn session(
        &self,
        relay: SocketAddr,
    ) -> Result<SessionClient<QuinnConnection>, Error> {
        let peer = Arc::clone(lock(&self.peers).entry(relay).or_default());
        if let Some(client) = self.live_session(relay) {
            return Ok(client);
        }
        // One dial at a time per peer: the others wait for its outcome.
        let mut dial = peer.dial.lock().await;
        if let Some(client) = self.live_session(relay) {
            return Ok(client);
        }
        if let (Some(retry_at), Some(failure)) = (dial.retry_at, &dial.last_failure) {
            if Instant::now() < retry_at {
                return Err(failure.error(relay));
            }
        }
        match self.dial(relay).await {
            Ok(client) => {
                *dial = DialState::default();
                *lock(&peer.session) = Some(client.clone());
                debug!(%relay, "peer session up");
                Ok(client)
            }
            Err(error) => {
                let backoff = dial
                    .backoff
                    .get_or_insert_with(|| self.settings.backoff.clone());
                let delay = backoff.next_delay();
                warn!(%relay, %error, ?delay, "peer relay not reached; requests fail until the next dial");
                dial.retry_at = Some(Instant::now() + delay);
                dial.last_failure = Some(Failure::of(&error));
                Err(error)
            }
        }
    }

    async fn dial(&self, relay: SocketAddr) -> Result<SessionClient<QuinnConnection>, Error> {
        let settings = &*self.settings;
        let attempt = async {
            let server_name = settings
                .server_name
                .clone()
                .unwrap_or_else(|| relay.ip().to_string());
            let connecting = match &settings.client_config {
                Some(config) => settings
                    .endpoint
                    .connect_with(config.clone(), relay, &server_name),
                None => settings.endpoint.connect(relay, &server_name),
            }
            .map_err(Error::transport)?;
            let connection = connecting.await.map_err(Error::transport)?;
            // Peers open nothing on us: without an events receiver, their opens are refused.
            let (client, _events) = SessionClient::start(
                connection.clone(),
                Role::Client,
                settings.session_config.clone(),
            )
            .await?;
            let hello = hello(&settings.relay_id, &settings.secret);
            match client.open(PEER_SERVICE, hello).await {
                Ok(_stream) => Ok(client),
                Err(Error::StreamRejected {
                    code: RejectCode::Unauthorized,
                    reason,
                }) => {
                    connection.close(quinn::VarInt::from_u32(0), b"refused");
                    Err(Error::PeerRefused { relay, reason })
                }
                Err(error) => Err(error),
            }
        };
        match timeout(settings.connect_timeout, attempt).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error @ Error::PeerRefused { .. })) => Err(error),
            Ok(Err(error)) => Err(Error::PeerUnreachable {
                relay,
                source: Box::new(error),
            }),
            Err(_) => Err(Error::PeerUnreachable {
                relay,
                source: Box::new(Error::Timeout(TimeoutKind::Connect)),
            }),
        }
    }
}
