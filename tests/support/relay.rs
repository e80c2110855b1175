//! A library relay (`backhaul::relay::Acceptor` + `Registry`) on 127.0.0.1 with a fresh
//! self-signed certificate, and edges that dial it from chosen loopback sources.
//! Included by path from the relay tests.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backhaul::quic::{client_config, Identity, DEFAULT_ALPN};
use backhaul::relay::{
    self, registration_metadata, AcceptStats, Acceptor, AdmissionConfig, Registry, Tokens,
    REGISTER_SERVICE,
};
use backhaul::{ClientEvent, Config, Error, QuinnConnection, Role, Session, SessionClient};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Admission that lets everything in (for tests about something else).
pub fn open_admission() -> AdmissionConfig {
    AdmissionConfig {
        max_unregistered: 100_000,
        max_unregistered_per_source: 100_000,
        handshake_rate: 1_000_000.0,
        handshake_burst: 1_000_000.0,
        ..AdmissionConfig::default()
    }
}

/// A running library relay.
pub struct TestRelay {
    pub addr: SocketAddr,
    pub trusted: Vec<CertificateDer<'static>>,
    pub registry: Registry,
    pub stats: AcceptStats,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestRelay {
    /// Starts a relay with the default authenticator and open admission; `configure`
    /// sets the acceptor up.
    pub fn start(
        tokens: &[&str],
        registry: Registry,
        configure: impl FnOnce(Acceptor) -> Acceptor,
    ) -> Self {
        let tokens = Tokens::parse(tokens).expect("tokens");
        Self::start_with_stats(registry, |endpoint, registry| {
            let acceptor =
                Acceptor::new(endpoint, registry, tokens).with_admission(open_admission());
            let acceptor = configure(acceptor);
            let stats = acceptor.stats();
            (acceptor.serve(), Some(stats))
        })
    }

    /// Starts a relay whose acceptor `build` makes (any authenticator).
    pub fn start_with(
        registry: Registry,
        build: impl FnOnce(quinn::Endpoint, Registry) -> relay::ServeEdges,
    ) -> Self {
        Self::start_with_stats(registry, |endpoint, registry| {
            let serve = build(endpoint, registry);
            (serve, None)
        })
    }

    fn start_with_stats(
        registry: Registry,
        build: impl FnOnce(quinn::Endpoint, Registry) -> (relay::ServeEdges, Option<AcceptStats>),
    ) -> Self {
        let identity = Identity::self_signed(&["localhost"]).expect("certificate");
        let trusted = identity.cert_chain.clone();
        let endpoint =
            relay::server_endpoint("127.0.0.1:0".parse().unwrap(), identity, DEFAULT_ALPN)
                .expect("relay endpoint");
        let addr = endpoint.local_addr().expect("address");
        let (serve, stats) = build(endpoint, registry.clone());
        let (stop, stopped) = oneshot::channel();
        let serve = serve.with_graceful_shutdown(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(serve);
        Self {
            addr,
            trusted,
            registry,
            stats: stats.unwrap_or_default(),
            stop: Some(stop),
            task,
        }
    }

    /// Shuts down gracefully and waits for the acceptor to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("the acceptor task");
    }

    /// A client endpoint bound to `ip` (a loopback address: a distinct source).
    pub fn endpoint_from(&self, ip: &str) -> quinn::Endpoint {
        endpoint_from(ip, &self.trusted)
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A quinn client endpoint bound to `ip`, trusting `trusted`.
pub fn endpoint_from(ip: &str, trusted: &[CertificateDer<'static>]) -> quinn::Endpoint {
    let bind: SocketAddr = format!("{ip}:0").parse().expect("an address");
    let mut endpoint = quinn::Endpoint::client(bind).expect("binding a client endpoint");
    endpoint.set_default_client_config(client_config(trusted, DEFAULT_ALPN).expect("config"));
    endpoint
}

/// An edge's session with the relay.
pub struct TestEdge {
    pub connection: quinn::Connection,
    pub client: SessionClient<QuinnConnection>,
    pub events: mpsc::Receiver<ClientEvent>,
}

/// Dials `relay` and completes the QUIC and session handshakes.
pub async fn connect(endpoint: &quinn::Endpoint, relay: SocketAddr) -> Result<TestEdge, String> {
    let connecting = endpoint
        .connect(relay, "localhost")
        .map_err(|e| e.to_string())?;
    let connection = connecting.await.map_err(|e| format!("QUIC: {e}"))?;
    let session = Session::new(
        QuinnConnection::new(connection.clone()),
        Role::Client,
        Config::new(),
    );
    let handle = session.start().await.map_err(|e| format!("session: {e}"))?;
    let (client, events) = SessionClient::with_events(handle);
    Ok(TestEdge {
        connection,
        client,
        events,
    })
}

/// Dials and registers as `edge` with `token`, as quic-reverse 0.1.2 style edges do:
/// an open of `_register` with `{edge, token}`.
pub async fn register(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    edge: &str,
    token: &str,
) -> Result<TestEdge, Registration> {
    let test_edge = connect(endpoint, relay)
        .await
        .map_err(Registration::NotConnected)?;
    let opened = test_edge
        .client
        .open(REGISTER_SERVICE, registration_metadata(edge, token))
        .await;
    match opened {
        Ok(_) => Ok(test_edge),
        Err(error) => Err(Registration::Refused(error, test_edge)),
    }
}

/// How a registration failed.
pub enum Registration {
    /// The QUIC or session handshake failed (refused by admission, say).
    NotConnected(String),
    /// The relay answered the `_register` open with this error.
    Refused(Error, TestEdge),
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotConnected(why) => write!(f, "NotConnected({why})"),
            Self::Refused(error, _) => write!(f, "Refused({error:?})"),
        }
    }
}

/// Waits until `check` holds, polling, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The session registered as `name`, other than `not` (a replaced one), once there is one.
pub async fn current(
    registry: &Registry,
    name: &str,
    not: Option<&relay::EdgeHandle>,
) -> relay::EdgeHandle {
    let mut found = None;
    eventually(Duration::from_secs(30), "the edge registered", || {
        found = registry
            .get(name)
            .filter(|edge| not.is_none_or(|old| old.epoch() != edge.epoch()));
        std::future::ready(found.is_some())
    })
    .await;
    found.expect("found")
}

/// The application close code a connection ended with, if it was closed that way.
pub async fn close_code(connection: &quinn::Connection) -> Option<u64> {
    match connection.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}

/// A UDP forwarder between an edge and the relay that can go silent, as a network that
/// drops without a goodbye: dial [`addr`](Self::addr) instead of the relay.
pub struct Blackhole {
    pub addr: SocketAddr,
    silent: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Blackhole {
    pub async fn start(relay: SocketAddr) -> Self {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("front");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("back");
        back.connect(relay).await.expect("connect");
        let addr = front.local_addr().expect("address");
        let silent = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let silent = Arc::clone(&silent);
            async move {
                let mut edge: Option<SocketAddr> = None;
                let mut from_edge = vec![0u8; 65_536];
                let mut from_relay = vec![0u8; 65_536];
                loop {
                    tokio::select! {
                        received = front.recv_from(&mut from_edge) => {
                            let Ok((len, peer)) = received else { return };
                            edge = Some(peer);
                            if !silent.load(Ordering::Relaxed) {
                                let _ = back.send(&from_edge[..len]).await;
                            }
                        }
                        received = back.recv(&mut from_relay) => {
                            let Ok(len) = received else { return };
                            if let (Some(edge), false) = (edge, silent.load(Ordering::Relaxed)) {
                                let _ = front.send_to(&from_relay[..len], edge).await;
                            }
                        }
                    }
                }
            }
        });
        Self { addr, silent, task }
    }

    /// Drops every datagram from now on, both ways.
    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::Relaxed);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
