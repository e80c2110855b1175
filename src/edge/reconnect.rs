//! The reconnecting edge: the loop around sessions that every edge needs.
//!
//! A session lives as long as one QUIC connection. An edge must outlive relay restarts,
//! network changes and NAT rebinding, so it dials again, but it must also know when
//! dialing again is pointless: a relay whose certificate it does not trust, or that
//! refused its credentials, will refuse it forever, and retrying would only hide from the
//! operator what needs fixing. [`Edge`] draws that line once for everyone (its docs list
//! which errors are fatal).
//!
//! Delays come from [`Backoff`] (exponential, with jitter so a fleet of edges does not
//! return in lockstep), reset once a session lasted [`EdgeBuilder::stable_after`]. Every
//! step is published on a `watch` channel ([`EdgeState`]) for health checks and logs.
//! Serving itself is [`Serve`](super::Serve), so a graceful shutdown closes the session,
//! drains, and lets the relay close the connection, whatever phase the edge is in.
//!
//! The future owns everything it starts: the endpoint (unless one was given), the
//! connection and the session's tasks. It spawns nothing of its own, so dropping it stops
//! the edge.

use std::convert::Infallible;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tower::util::BoxService;
use tower::{Service, ServiceExt};
use tracing::{debug, info, warn};

use super::lanes::{keep_lanes, LaneDialer};
use super::{Backoff, Router, DEFAULT_CLOSE_TIMEOUT, DEFAULT_DRAIN_TIMEOUT};
use crate::config::Config;
use crate::error::{Error, TimeoutKind};
use crate::protocol::RejectCode;
use crate::quic::{client_config, client_endpoint, DEFAULT_ALPN};
use crate::session::SessionClient;
use crate::session::{Role, Session};
use crate::transport::{Connection, QuinnConnection};

/// How long one QUIC handshake with a relay may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a session must last for the next reconnection to start from the first
/// backoff delay again, by default.
pub const DEFAULT_STABLE_AFTER: Duration = Duration::from_secs(30);

/// How long a stopping edge waits for its endpoint to send its last packets.
const ENDPOINT_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// TLS alerts raised by our own certificate check (rustls' verifier, run locally): bad,
/// unsupported, revoked, expired or unknown certificate, unknown CA, and a signature that
/// does not verify (a different certificate under the same name, e.g. a relay that made a
/// new self-signed one).
const CERTIFICATE_ALERTS: [u8; 7] = [42, 43, 44, 45, 46, 48, 51];

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Registration = BoxService<SessionClient<QuinnConnection>, (), RegisterError>;
type Signal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where an [`Edge`] is, as published by [`Edge::state`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum EdgeState {
    /// Dialing, negotiating or registering. `attempt` counts the attempts since the last
    /// session (1 for the first).
    Connecting {
        /// Attempts since the last session, this one included.
        attempt: u32,
    },
    /// Registered and serving.
    Connected {
        /// When the session became ready.
        since: Instant,
        /// The relay's address.
        relay: SocketAddr,
    },
    /// Waiting before the next attempt.
    Backoff {
        /// When the next attempt starts.
        until: Instant,
        /// Attempts since the last session, the failed one included.
        attempt: u32,
        /// Why the last attempt failed or the last session ended.
        last_error: Arc<Error>,
    },
    /// Ended: shut down, or stopped by a fatal error (the future's output says which).
    Stopped,
}

impl EdgeState {
    /// True in [`EdgeState::Connected`].
    #[must_use]
    pub const fn is_connected(&self) -> bool {
        matches!(self, Self::Connected { .. })
    }

    /// True in [`EdgeState::Stopped`].
    #[must_use]
    pub const fn is_stopped(&self) -> bool {
        matches!(self, Self::Stopped)
    }
}

/// Why a registration step failed: [`fatal`](Self::fatal) ends the edge with
/// [`Error::RegistrationRefused`], [`retryable`](Self::retryable) backs off and tries on
/// a new session (the edge reports [`Error::RegistrationFailed`]).
///
/// A session error converts by its meaning: a relay that rejects the registration open
/// with [`RejectCode::Unauthorized`] is fatal, anything else (`ServiceUnavailable` while
/// the edge's name is still held, a timeout, a lost connection) is retryable; so a step
/// that is one `open` can use `?`.
#[derive(Debug, thiserror::Error)]
#[error("{} registration error", if *.fatal { "fatal" } else { "retryable" })]
pub struct RegisterError {
    fatal: bool,
    #[source]
    source: BoxError,
}

impl RegisterError {
    /// Retrying cannot help (refused credentials): the edge stops.
    pub fn fatal(error: impl Into<BoxError>) -> Self {
        Self {
            fatal: true,
            source: error.into(),
        }
    }

    /// May pass on a new session: the edge backs off and reconnects.
    pub fn retryable(error: impl Into<BoxError>) -> Self {
        Self {
            fatal: false,
            source: error.into(),
        }
    }

    /// True for [`fatal`](Self::fatal) errors.
    #[must_use]
    pub const fn is_fatal(&self) -> bool {
        self.fatal
    }

    /// The error as the edge reports it.
    fn into_error(self) -> Error {
        if self.fatal {
            Error::RegistrationRefused(self.source)
        } else {
            Error::RegistrationFailed(self.source)
        }
    }
}

impl From<Error> for RegisterError {
    fn from(error: Error) -> Self {
        match error {
            Error::StreamRejected {
                code: RejectCode::Unauthorized,
                ..
            } => Self::fatal(error),
            error => Self::retryable(error),
        }
    }
}

impl From<Infallible> for RegisterError {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

/// How the edge's TLS is set up.
#[derive(Clone)]
enum Tls {
    Trusted(Vec<CertificateDer<'static>>),
    Client(quinn::ClientConfig),
}

/// Settings of an [`Edge`]; start with [`Edge::builder`].
pub struct EdgeBuilder {
    settings: Settings,
    tls: Option<Tls>,
}

/// What the builder collects and the running edge keeps as given.
struct Settings {
    relays: Vec<String>,
    server_name: Option<String>,
    config: Config,
    registration: Option<Registration>,
    backoff: Backoff,
    stable_after: Duration,
    connect_timeout: Duration,
    drain_timeout: Duration,
    close_timeout: Duration,
    endpoint: Option<quinn::Endpoint>,
    lanes: usize,
}

impl fmt::Debug for EdgeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeBuilder")
            .field("relays", &self.settings.relays)
            .field("server_name", &self.settings.server_name)
            .field("registration", &self.settings.registration.is_some())
            .field("backoff", &self.settings.backoff)
            .field("stable_after", &self.settings.stable_after)
            .field("connect_timeout", &self.settings.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl EdgeBuilder {
    /// A relay to dial, as `host:port` (resolved again on every attempt). Call it again for
    /// more relays: each attempt tries them in the order given, every address a name
    /// resolves to in turn, and takes the first that answers.
    #[must_use]
    pub fn relay(mut self, addr: impl ToString) -> Self {
        self.settings.relays.push(addr.to_string());
        self
    }

    /// Several relays at once; see [`relay`](Self::relay).
    #[must_use]
    pub fn relays<I>(mut self, addrs: I) -> Self
    where
        I: IntoIterator,
        I::Item: ToString,
    {
        self.settings
            .relays
            .extend(addrs.into_iter().map(|addr| addr.to_string()));
        self
    }

    /// Trusts exactly these certificates for the relay (a pinned self-signed certificate,
    /// or a private CA), with backhaul's transport settings and ALPN
    /// ([`quic::client_config`](crate::quic::client_config)).
    #[must_use]
    pub fn trust(mut self, certs: impl IntoIterator<Item = CertificateDer<'static>>) -> Self {
        self.tls = Some(Tls::Trusted(certs.into_iter().collect()));
        self
    }

    /// Dials with this quinn client config instead (web PKI roots, client certificates, other
    /// transport limits…). Replaces [`trust`](Self::trust).
    #[must_use]
    pub fn client_config(mut self, config: quinn::ClientConfig) -> Self {
        self.tls = Some(Tls::Client(config));
        self
    }

    /// The name the relay's certificate must be issued for. Default: the host of the
    /// relay address being dialed.
    #[must_use]
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.settings.server_name = Some(name.into());
        self
    }

    /// The session settings (keep-alive pings, limits, agent). Default: [`Config::new`].
    #[must_use]
    pub fn config(mut self, config: Config) -> Self {
        self.settings.config = config;
        self
    }

    /// A step run on every new session before serving, e.g. opening the relay's
    /// registration service with credentials. Its error says whether to give up or retry
    /// ([`RegisterError`]); `tower::service_fn` turns an async closure into one.
    #[must_use]
    pub fn register<S>(mut self, step: S) -> Self
    where
        S: Service<SessionClient<QuinnConnection>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<RegisterError>,
    {
        let step = step.map_response(|_| ()).map_err(Into::into);
        self.settings.registration = Some(BoxService::new(step));
        self
    }

    /// Delays between attempts. Default: [`Backoff::default`] (250 ms doubling to 30 s).
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.settings.backoff = backoff;
        self
    }

    /// How long a session must last for the next reconnection to start from the first
    /// delay again. Default: 30 s.
    #[must_use]
    pub const fn stable_after(mut self, duration: Duration) -> Self {
        self.settings.stable_after = duration;
        self
    }

    /// Bound on one QUIC handshake. Default: 10 s.
    #[must_use]
    pub const fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// How long in-flight streams may finish on shutdown ([`Serve::drain_timeout`]).
    /// Default: 30 s.
    ///
    /// [`Serve::drain_timeout`]: super::Serve::drain_timeout
    #[must_use]
    pub const fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.settings.drain_timeout = timeout;
        self
    }

    /// How long a shutdown waits for the relay to close the connection
    /// ([`Serve::close_timeout`]). Default: 2 s.
    ///
    /// [`Serve::close_timeout`]: super::Serve::with_close_timeout
    #[must_use]
    pub const fn close_timeout(mut self, timeout: Duration) -> Self {
        self.settings.close_timeout = timeout;
        self
    }

    /// How many QUIC connections each session runs over, its own included (default 1).
    ///
    /// One connection's packets are processed on one core at a time on each side, which
    /// caps a busy edge's throughput; with more, the edge joins further connections to
    /// its session once registered ([`quic::lane`](crate::quic::lane)), streams are
    /// spread over all of them, and a lane that closes is dialed again. A relay that
    /// does not take lanes, or allows fewer, leaves the session on what it took.
    #[must_use]
    pub fn lanes(mut self, connections: usize) -> Self {
        self.settings.lanes = connections.max(1);
        self
    }

    /// Dials from this endpoint (shared with other edges or clients) instead of one of its
    /// own; the edge then leaves it open when it stops.
    #[must_use]
    pub fn endpoint(mut self, endpoint: quinn::Endpoint) -> Self {
        self.settings.endpoint = Some(endpoint);
        self
    }

    /// The edge serving `router`; `.await` it (after
    /// [`with_graceful_shutdown`](Edge::with_graceful_shutdown) if it should stop).
    ///
    /// # Errors
    /// [`Error::MissingSetting`] without a relay or without TLS settings,
    /// [`Error::Config`] for an invalid `Config`, [`Error::Transport`] for a trusted
    /// certificate or server name that cannot be used.
    pub fn build(self, router: Router<QuinnConnection>) -> Result<Edge, Error> {
        if self.settings.relays.is_empty() {
            return Err(Error::MissingSetting(
                "a relay address (EdgeBuilder::relay)",
            ));
        }
        let tls = match self.tls {
            Some(Tls::Trusted(certs)) => client_config(&certs, DEFAULT_ALPN)?,
            Some(Tls::Client(config)) => config,
            None => {
                return Err(Error::MissingSetting(
                    "trusted certificates (EdgeBuilder::trust or ::client_config)",
                ))
            }
        };
        self.settings.config.validate()?;
        if let Some(name) = &self.settings.server_name {
            rustls::pki_types::ServerName::try_from(name.as_str()).map_err(Error::transport)?;
        }
        let (state, _) = watch::channel(EdgeState::Connecting { attempt: 1 });
        Ok(Edge {
            run: Run {
                settings: self.settings,
                tls,
                router,
            },
            state,
            shutdown: None,
        })
    }
}

/// An edge that stays connected: dials a relay, negotiates, registers, serves a
/// [`Router`], and reconnects with backoff until shut down or stopped by a fatal error:
///
/// - **fatal** (the future ends with the error): [`Error::UntrustedCertificate`],
///   [`Error::RegistrationRefused`], a server name that is no DNS name or IP address, a
///   closed endpoint;
/// - **transient** (backoff, then dial again): everything else: a relay down or
///   unreachable, [`Error::Timeout`]s, a lost connection, a session the relay closed, a
///   failed negotiation, a registration that failed for now
///   ([`Error::RegistrationFailed`]).
///
/// Awaiting it resolves to `Ok(())` after a graceful shutdown and to the fatal error
/// otherwise; it never ends on a transient failure. Dropping it stops the edge at once.
///
/// ```no_run
/// use backhaul::edge::{Edge, EdgeState, RegisterError, Router};
/// use backhaul::{Config, Metadata, QuinnConnection, SessionClient};
/// use std::time::Duration;
///
/// # async fn run(trusted: Vec<rustls::pki_types::CertificateDer<'static>>) -> Result<(), backhaul::Error> {
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
/// let router = Router::new().route("web", backhaul::http::serve(app));
/// let register = tower::service_fn(|client: SessionClient<QuinnConnection>| async move {
///     // An `Unauthorized` rejection ends the edge; other failures are retried.
///     client.open("_register", Metadata::Empty).await?;
///     Ok::<_, RegisterError>(())
/// });
/// let edge = Edge::builder()
///     .relay("relay.example.com:4433")
///     .trust(trusted)
///     .config(Config::new().with_ping_interval(Duration::from_secs(5)))
///     .register(register)
///     .build(router)?;
/// let mut state = edge.state();
/// tokio::spawn(async move {
///     while state.changed().await.is_ok() {
///         if let EdgeState::Backoff { last_error, .. } = &*state.borrow() {
///             eprintln!("relay unavailable: {last_error}");
///         }
///     }
/// });
/// edge.with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
///     .await
/// # }
/// ```
pub struct Edge {
    run: Run,
    state: watch::Sender<EdgeState>,
    shutdown: Option<Signal>,
}

impl fmt::Debug for Edge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Edge")
            .field("relays", &self.run.settings.relays)
            .field("router", &self.run.router)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Edge {
    /// Settings for an edge: at least a [`relay`](EdgeBuilder::relay) and TLS
    /// ([`trust`](EdgeBuilder::trust) or [`client_config`](EdgeBuilder::client_config)).
    #[must_use]
    pub fn builder() -> EdgeBuilder {
        EdgeBuilder {
            settings: Settings {
                relays: Vec::new(),
                server_name: None,
                config: Config::new(),
                registration: None,
                backoff: Backoff::default(),
                stable_after: DEFAULT_STABLE_AFTER,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                close_timeout: DEFAULT_CLOSE_TIMEOUT,
                endpoint: None,
                lanes: 1,
            },
            tls: None,
        }
    }

    /// The edge's state, updated at every step; take it before awaiting the edge. It is
    /// [`EdgeState::Stopped`] once the edge ended or was dropped.
    #[must_use]
    pub fn state(&self) -> watch::Receiver<EdgeState> {
        self.state.subscribe()
    }

    /// Stops the edge gracefully when `signal` resolves: an attempt or a backoff under way
    /// is abandoned, a session is closed and drained (see [`Serve`](super::Serve)).
    #[must_use]
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shutdown = Some(Box::pin(signal));
        self
    }
}

impl IntoFuture for Edge {
    type Output = Result<(), Error>;
    type IntoFuture = EdgeFuture;

    fn into_future(self) -> EdgeFuture {
        EdgeFuture {
            inner: Box::pin(drive(self)),
        }
    }
}

/// The running [`Edge`]: resolves to `Ok(())` after a graceful shutdown, or to the fatal
/// error that stopped it.
#[must_use = "an edge does nothing unless awaited"]
pub struct EdgeFuture {
    inner: Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>,
}

impl fmt::Debug for EdgeFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeFuture").finish_non_exhaustive()
    }
}

impl Future for EdgeFuture {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// Publishes [`EdgeState::Stopped`] however the edge ends, dropped included.
struct StateGuard(watch::Sender<EdgeState>);

impl StateGuard {
    /// Publishes `state`, unless it is the `Connecting` already shown (the initial one).
    fn set(&self, state: EdgeState) {
        self.0.send_if_modified(|current| {
            if let (
                EdgeState::Connecting { attempt: shown },
                EdgeState::Connecting { attempt: next },
            ) = (&*current, &state)
            {
                if shown == next {
                    return false;
                }
            }
            *current = state;
            true
        });
    }
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        self.0.send_replace(EdgeState::Stopped);
    }
}

/// Runs the edge, turning the shutdown signal into a flag every phase can watch.
async fn drive(edge: Edge) -> Result<(), Error> {
    let Edge {
        mut run,
        state,
        shutdown,
    } = edge;
    let state = StateGuard(state);
    let (stop, stopped) = watch::channel(false);
    let signal = async move {
        if let Some(signal) = shutdown {
            signal.await;
            debug!("edge shutting down");
            let _ = stop.send(true);
        }
        // Keeps `stop` alive: its end must not read as a shutdown.
        std::future::pending::<Infallible>().await
    };
    tokio::select! {
        result = run.run(&state, stopped) => result,
        never = signal => match never {},
    }
}

/// Resolves once shutdown began.
async fn stopping(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// How one attempt ended.
enum Attempt {
    /// Shutdown began.
    Stopped,
    /// Retrying cannot help.
    Fatal(Error),
    /// No session came of it.
    Failed(Error),
    /// A session served for `lasted`, then ended.
    Lost { lasted: Duration, error: Error },
}

/// Everything the loop needs, moved out of the builder.
struct Run {
    settings: Settings,
    tls: quinn::ClientConfig,
    router: Router<QuinnConnection>,
}

impl Run {
    async fn run(
        &mut self,
        state: &StateGuard,
        stopped: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let (endpoint, own_endpoint) = match self.settings.endpoint.clone() {
            Some(endpoint) => (endpoint, false),
            // Dials with `self.tls` (connect_with): the endpoint's own default is unused.
            None => (client_endpoint(&[], DEFAULT_ALPN)?, true),
        };
        let mut backoff = self.settings.backoff.clone();
        let mut attempt = 1;
        let result = loop {
            state.set(EdgeState::Connecting { attempt });
            let last_error = match self.attempt(&endpoint, state, &stopped).await {
                Attempt::Stopped => break Ok(()),
                Attempt::Fatal(error) => {
                    warn!(error = ?error.to_string(), "edge stopped: retrying cannot help");
                    break Err(error);
                }
                Attempt::Failed(error) => {
                    warn!(error = ?error.to_string(), attempt, "cannot reach the relay");
                    error
                }
                Attempt::Lost { lasted, error } => {
                    warn!(error = ?error.to_string(), ?lasted, "lost the relay");
                    if lasted >= self.settings.stable_after {
                        backoff.reset();
                    }
                    attempt = 1;
                    error
                }
            };
            let delay = backoff.next_delay();
            info!(?delay, "reconnecting");
            state.set(EdgeState::Backoff {
                until: Instant::now() + delay,
                attempt,
                last_error: Arc::new(last_error),
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopping(stopped.clone()) => break Ok(()),
            }
            attempt = attempt.saturating_add(1);
        };
        if own_endpoint {
            endpoint.close(0u32.into(), b"edge stopped");
            let _ = tokio::time::timeout(ENDPOINT_IDLE_TIMEOUT, endpoint.wait_idle()).await;
        }
        info!("edge stopped");
        result
    }

    /// One connection: dial, negotiate, register, serve.
    async fn attempt(
        &mut self,
        endpoint: &quinn::Endpoint,
        state: &StateGuard,
        stopped: &watch::Receiver<bool>,
    ) -> Attempt {
        let dialed = tokio::select! {
            dialed = self.dial_any(endpoint) => dialed,
            () = stopping(stopped.clone()) => return Attempt::Stopped,
        };
        let (connection, relay, server_name) = match dialed {
            Ok(dialed) => dialed,
            Err(attempt) => return attempt,
        };
        let set_up = tokio::select! {
            set_up = self.set_up(connection.clone()) => set_up,
            () = stopping(stopped.clone()) => Err(Attempt::Stopped),
        };
        let (client, events) = match set_up {
            Ok(session) => session,
            Err(attempt) => {
                let reason: &[u8] = match &attempt {
                    Attempt::Stopped => b"edge stopped",
                    Attempt::Fatal(_) => b"registration refused",
                    _ => b"setup failed",
                };
                connection.close(0u32.into(), reason);
                return attempt;
            }
        };
        let since = Instant::now();
        state.set(EdgeState::Connected { since, relay });
        info!(%relay, "connected to the relay");
        let transport = client.connection().clone();
        let serving = self
            .router
            .clone()
            .serve(client, events)
            .with_graceful_shutdown(stopping(stopped.clone()))
            .with_drain_timeout(self.settings.drain_timeout)
            .with_close_timeout(self.settings.close_timeout)
            .into_future();
        let lanes = LaneDialer {
            endpoint,
            tls: &self.tls,
            relay,
            server_name: &server_name,
            timeout: self.settings.connect_timeout,
        };
        let keeping = keep_lanes(lanes, transport.clone(), self.settings.lanes);
        let served = tokio::select! {
            served = serving => served,
            never = keeping => match never {},
        };
        // The lanes too.
        transport.close(0, b"session ended");
        if *stopped.borrow() {
            return Attempt::Stopped;
        }
        Attempt::Lost {
            lasted: since.elapsed(),
            error: served.err().unwrap_or(Error::SessionClosed),
        }
    }

    /// Tries every relay address in turn; the first to complete a handshake wins.
    async fn dial_any(
        &self,
        endpoint: &quinn::Endpoint,
    ) -> Result<(quinn::Connection, SocketAddr, String), Attempt> {
        let mut last_error = None;
        for relay in &self.settings.relays {
            let addrs = match tokio::net::lookup_host(relay.as_str()).await {
                Ok(addrs) => addrs.collect::<Vec<_>>(),
                Err(error) => {
                    debug!(%relay, %error, "cannot resolve the relay");
                    last_error = Some(Error::transport(error));
                    continue;
                }
            };
            let server_name = self
                .settings
                .server_name
                .clone()
                .unwrap_or_else(|| host_of(relay).to_owned());
            for addr in addrs {
                match self.dial(endpoint, addr, &server_name).await {
                    Ok(connection) => return Ok((connection, addr, server_name)),
                    Err(Attempt::Failed(error)) => {
                        debug!(%addr, error = ?error.to_string(), "relay did not answer");
                        last_error = Some(error);
                    }
                    Err(other) => return Err(other),
                }
            }
        }
        let error = last_error.unwrap_or_else(|| {
            Error::transport(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no relay address resolves to an address",
            ))
        });
        Err(Attempt::Failed(error))
    }

    async fn dial(
        &self,
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<quinn::Connection, Attempt> {
        let connecting = match endpoint.connect_with(self.tls.clone(), addr, server_name) {
            Ok(connecting) => connecting,
            // The address is of another family than the endpoint's socket, or the endpoint
            // has no connection ids left for now: another address or a later try may do.
            Err(
                error @ (quinn::ConnectError::InvalidRemoteAddress(_)
                | quinn::ConnectError::CidsExhausted),
            ) => return Err(Attempt::Failed(Error::transport(error))),
            // A bad server name, a stopped endpoint: nothing a retry changes.
            Err(error) => return Err(Attempt::Fatal(Error::transport(error))),
        };
        match tokio::time::timeout(self.settings.connect_timeout, connecting).await {
            Err(_) => Err(Attempt::Failed(Error::Timeout(TimeoutKind::Connect))),
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(quinn::ConnectionError::TransportError(transport)))
                if is_certificate_error(transport.code, &transport.reason) =>
            {
                Err(Attempt::Fatal(Error::UntrustedCertificate {
                    relay: addr,
                    server_name: server_name.to_owned(),
                    reason: transport.reason,
                }))
            }
            Ok(Err(error)) => Err(Attempt::Failed(Error::transport(error))),
        }
    }

    /// Negotiates the session and runs the registration step on it.
    async fn set_up(
        &mut self,
        connection: quinn::Connection,
    ) -> Result<
        (
            SessionClient<QuinnConnection>,
            tokio::sync::mpsc::Receiver<crate::ClientEvent>,
        ),
        Attempt,
    > {
        let session = Session::new(
            QuinnConnection::new(connection),
            Role::Client,
            self.settings.config.clone(),
        );
        let handle = session.start().await.map_err(Attempt::Failed)?;
        let (client, events) = SessionClient::with_events(handle);
        if let Some(step) = &mut self.settings.registration {
            let registered = match step.ready().await {
                Ok(step) => step.call(client.clone()).await,
                Err(error) => Err(error),
            };
            if let Err(error) = registered {
                let error = error.into_error();
                return Err(if error.is_retryable() {
                    Attempt::Failed(error)
                } else {
                    Attempt::Fatal(error)
                });
            }
        }
        Ok((client, events))
    }
}

/// Whether a handshake failed on our own check of the relay's certificate.
fn is_certificate_error(code: quinn::TransportErrorCode, reason: &str) -> bool {
    CERTIFICATE_ALERTS
        .iter()
        .any(|alert| code == quinn::TransportErrorCode::crypto(*alert))
        || reason.contains("invalid peer certificate")
}

/// The host of `host:port` (`[v6]:port` too), the default server name.
fn host_of(relay: &str) -> &str {
    let host = relay.rsplit_once(':').map_or(relay, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_relay_addresses() {
        assert_eq!(host_of("relay.example.com:4433"), "relay.example.com");
        assert_eq!(host_of("127.0.0.1:4433"), "127.0.0.1");
        assert_eq!(host_of("[::1]:4433"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn unauthorized_is_fatal_and_the_rest_retryable() {
        let unauthorized = Error::StreamRejected {
            code: RejectCode::Unauthorized,
            reason: Some("bad token".into()),
        };
        assert!(RegisterError::from(unauthorized).is_fatal());
        let busy = Error::StreamRejected {
            code: RejectCode::ServiceUnavailable,
            reason: None,
        };
        assert!(!RegisterError::from(busy).is_fatal());
        assert!(!RegisterError::from(Error::Disconnected).is_fatal());
        let refused = RegisterError::fatal("no").into_error();
        assert!(matches!(refused, Error::RegistrationRefused(_)));
        assert!(!refused.is_retryable());
        assert!(RegisterError::retryable("later")
            .into_error()
            .is_retryable());
    }

    #[test]
    fn certificate_alerts_are_recognised() {
        let unknown_ca = quinn::TransportErrorCode::crypto(48);
        assert!(is_certificate_error(unknown_ca, ""));
        assert!(is_certificate_error(
            quinn::TransportErrorCode::crypto(80),
            "invalid peer certificate: UnknownIssuer"
        ));
        assert!(!is_certificate_error(
            quinn::TransportErrorCode::crypto(120),
            "no application protocol"
        ));
    }

    #[tokio::test]
    async fn builder_names_what_is_missing() {
        let missing_relay = Edge::builder().trust([]).build(Router::new());
        assert!(matches!(missing_relay, Err(Error::MissingSetting(_))));
        let missing_tls = Edge::builder().relay("127.0.0.1:1").build(Router::new());
        assert!(matches!(missing_tls, Err(Error::MissingSetting(_))));
        let bad_name = Edge::builder()
            .relay("127.0.0.1:1")
            .trust([])
            .server_name("not a name!")
            .build(Router::new());
        assert!(matches!(bad_name, Err(Error::Transport(_))), "{bad_name:?}");
    }
}
