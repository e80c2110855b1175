//! The holding side: serve other relays' forwarded opens from this relay's own edges.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::VarInt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, info_span, warn, Instrument};

use super::splice::{splice, Ended, SPLICE_FAILED};
use super::wire::{check_hello, parse_forward, Refusal, MAX_HOPS, PEER_SERVICE};
use super::{ClusterSecret, CLOSE_PEER_REFUSED};
use crate::config::Config;
use crate::connector::OpenTarget;
use crate::error::Error;
use crate::lazy_serve::{LazyServe, Signal};
use crate::protocol::{Metadata, RejectCode, ServiceId};
use crate::relay::accept::{CLOSE_SHUTDOWN, DEFAULT_REGISTER_TIMEOUT};
use crate::relay::directory::RelayId;
use crate::relay::registry::Registry;
use crate::session::{ClientEvent, Role, SessionClient};
use crate::stream::TunnelStream;
use crate::transport::{QuinnConnection, StreamLimit};
use crate::transport::{RecvStream, SendStream};

/// How long a refused peer gets to read the refusal before its connection is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// How long forwarded streams get to finish once serving stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Counters of a [`PeerServer`], shared with its clones.
#[derive(Debug, Clone, Default)]
pub struct PeerStats {
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    admitted: AtomicU64,
    refused: AtomicU64,
    forwarded: AtomicU64,
    not_attached: AtomicU64,
    hop_limit: AtomicU64,
    malformed: AtomicU64,
    refused_by_edge: AtomicU64,
}

/// The counts at one moment; see [`PeerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerCounts {
    /// Peer relays admitted (right cluster secret).
    pub admitted: u64,
    /// Connections refused: wrong or no secret, or something else first.
    pub refused: u64,
    /// Opens forwarded to an edge.
    pub forwarded: u64,
    /// Opens refused because the edge is not attached here.
    pub not_attached: u64,
    /// Opens refused for claiming too many hops.
    pub hop_limit: u64,
    /// Opens refused for metadata that is not a forwarded open's.
    pub malformed: u64,
    /// Opens the edge refused (passed back to the peer).
    pub refused_by_edge: u64,
}

impl PeerStats {
    /// The counts now.
    #[must_use]
    pub fn snapshot(&self) -> PeerCounts {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PeerCounts {
            admitted: get(&c.admitted),
            refused: get(&c.refused),
            forwarded: get(&c.forwarded),
            not_attached: get(&c.not_attached),
            hop_limit: get(&c.hop_limit),
            malformed: get(&c.malformed),
            refused_by_edge: get(&c.refused_by_edge),
        }
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Serves peer relays: admits those with the cluster secret, and answers their forwarded
/// opens from the local [`Registry`] only; see the [module docs](super).
///
/// ```no_run
/// use backhaul::quic::Identity;
/// use backhaul::relay::peer::{self, ClusterSecret, PeerServer};
/// use backhaul::relay::Registry;
///
/// # async fn run(registry: Registry) -> Result<(), backhaul::Error> {
/// let identity = Identity::self_signed(&["relay-a.cluster.internal"])?;
/// let endpoint = peer::server_endpoint("10.0.0.1:4434".parse().unwrap(), identity)?;
/// let secret = ClusterSecret::new(std::env::var("CLUSTER_SECRET").unwrap_or_default())?;
/// tokio::spawn(PeerServer::new(registry, secret).serve(endpoint));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PeerServer {
    shared: Arc<Shared>,
}

#[derive(Clone)]
struct Shared {
    registry: Registry,
    secret: ClusterSecret,
    session_config: Config,
    hello_timeout: Duration,
    max_streams: u32,
    stats: PeerStats,
}

impl fmt::Debug for PeerServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerServer")
            .field("registry", &self.shared.registry)
            .field("hello_timeout", &self.shared.hello_timeout)
            .finish_non_exhaustive()
    }
}

impl PeerServer {
    /// Serves forwarded opens to `registry`'s edges, for relays presenting `secret`.
    #[must_use]
    pub fn new(registry: Registry, secret: ClusterSecret) -> Self {
        Self {
            shared: Arc::new(Shared {
                registry,
                secret,
                session_config: Config::new(),
                hello_timeout: DEFAULT_REGISTER_TIMEOUT,
                max_streams: crate::quic::DEFAULT_MAX_STREAMS,
                stats: PeerStats::default(),
            }),
        }
    }

    fn shared_mut(&mut self) -> &mut Shared {
        // A clone configured on its own gets its own settings (its counters stay shared).
        Arc::make_mut(&mut self.shared)
    }

    /// The peer sessions' configuration (default [`Config::new`]); its
    /// `max_concurrent_streams` caps the opens one peer relay forwards at once.
    #[must_use]
    pub fn with_session_config(mut self, config: Config) -> Self {
        self.shared_mut().session_config = config;
        self
    }

    /// How long a new connection has for its QUIC and session handshakes and its hello
    /// together (default 10 s, as edges' registration).
    #[must_use]
    pub fn with_hello_timeout(mut self, timeout: Duration) -> Self {
        self.shared_mut().hello_timeout = timeout;
        self
    }

    /// The counters (shared: read them while serving).
    #[must_use]
    pub fn stats(&self) -> PeerStats {
        self.shared.stats.clone()
    }

    /// Serves every connection of `endpoint` (best made with
    /// [`server_endpoint`](super::server_endpoint)) until it is closed or the graceful
    /// shutdown signal fires.
    pub fn serve(self, endpoint: quinn::Endpoint) -> ServePeers {
        ServePeers {
            inner: LazyServe::new(move |shutdown| self.run(endpoint, shutdown)),
        }
    }

    /// Serves one peer connection: for an endpoint shared with edges, whose accept loop
    /// hands over the connections that chose [`PEER_ALPN`](super::PEER_ALPN). The
    /// connection should have started with the unregistered limits of
    /// [`relay::server_config`](crate::relay::server_config); they are raised once the
    /// peer is admitted.
    pub fn serve_connection(&self, connection: quinn::Connection) -> ServePeerConnection {
        let (never_stop, stopped) = watch::channel(false);
        let shared = Arc::clone(&self.shared);
        let remote = connection.remote_address();
        let deadline = Instant::now() + shared.hello_timeout;
        let serving = async move {
            // The sender lives as long as the serving, so "stop" never fires by itself.
            let _never_stop = never_stop;
            serve_peer(connection, deadline, shared, stopped).await;
        };
        ServePeerConnection {
            inner: Box::pin(serving.instrument(info_span!("peer", %remote))),
        }
    }

    async fn run(self, endpoint: quinn::Endpoint, shutdown: Signal) {
        let mut shutdown = shutdown;
        let (stop, stopped) = watch::channel(false);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let shared = Arc::clone(&self.shared);
                    let remote = incoming.remote_address();
                    let deadline = Instant::now() + shared.hello_timeout;
                    let stopped = stopped.clone();
                    let task = async move {
                        match timeout_at(deadline, incoming).await {
                            Ok(Ok(connection)) => serve_peer(connection, deadline, shared, stopped).await,
                            Ok(Err(error)) => debug!(error = ?error.to_string(), "peer QUIC handshake failed"),
                            Err(_) => debug!("peer QUIC handshake timed out"),
                        }
                    };
                    connections.spawn(task.instrument(info_span!("peer", %remote)));
                }
                Some(joined) = connections.join_next(), if !connections.is_empty() => log_panic(joined),
                () = &mut shutdown => break,
            }
        }
        endpoint.set_server_config(None);
        let _ = stop.send(true);
        let drained = timeout(SHUTDOWN_GRACE + Duration::from_millis(500), async {
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
            warn!(%error, "a peer relay's task panicked");
        }
    }
}

/// Why a connection was not admitted.
enum Refused {
    /// The peer was told why; the session is kept until it had time to read it.
    Answered(SessionClient<QuinnConnection>),
    /// The session failed first.
    Gone,
}

/// One peer connection's life: hello, then forwarded opens until it ends.
async fn serve_peer(
    connection: quinn::Connection,
    deadline: Instant,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let counters = &shared.stats.counters;
    let admitted = tokio::select! {
        admitted = timeout_at(deadline, hello(&connection, &shared)) => admitted,
        () = stopping(&mut stopped) => Ok(Err(Refused::Gone)),
    };
    let (client, mut events, relay) = match admitted {
        Ok(Ok(admitted)) => admitted,
        refused => {
            count(&counters.refused);
            if let Ok(Err(Refused::Answered(_session))) = refused {
                let linger = (Instant::now() + REFUSAL_LINGER).min(deadline);
                let _ = timeout_at(linger, connection.closed()).await;
            }
            connection.close(VarInt::from_u32(CLOSE_PEER_REFUSED), b"not a peer");
            return;
        }
    };
    count(&counters.admitted);
    info!(%relay, "peer relay admitted");
    client.connection().set_stream_limit(StreamLimit::new(
        crate::quic::INITIAL_STREAMS,
        shared.max_streams,
    ));
    connection.set_receive_window(VarInt::MAX);

    let mut forwards = JoinSet::new();
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(ClientEvent::OpenRequest { request_id, service, metadata }) => {
                    let open = Open { client: client.clone(), request_id, service, metadata };
                    forwards.spawn(open.forward(Arc::clone(&shared)));
                }
                Some(_) => {}
                None => break,
            },
            Some(joined) = forwards.join_next(), if !forwards.is_empty() => log_panic(joined),
            () = stopping(&mut stopped) => {
                let _ = client.close(crate::CloseCode::Normal, Some("relay shutting down".into())).await;
                break;
            }
        }
    }
    // The session is over; its data streams are not: let them finish while the
    // connection lives (bounded once serving stops), then end them.
    let drain = async {
        while let Some(joined) = forwards.join_next().await {
            log_panic(joined);
        }
    };
    tokio::select! {
        () = drain => {}
        _ = connection.closed() => {}
        () = async { stopping(&mut stopped).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {}
    }
    forwards.abort_all();
    while forwards.join_next().await.is_some() {}
    connection.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"peer session ended");
    debug!(%relay, "peer relay's session ended");
}

/// Resolves once the stop signal is on.
async fn stopping(stopped: &mut watch::Receiver<bool>) {
    if stopped.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

type Admitted = (
    SessionClient<QuinnConnection>,
    mpsc::Receiver<ClientEvent>,
    RelayId,
);

/// The session handshake and the peer's hello.
async fn hello(connection: &quinn::Connection, shared: &Shared) -> Result<Admitted, Refused> {
    let (client, mut events) = SessionClient::start(
        connection.clone(),
        Role::Server,
        shared.session_config.clone(),
    )
    .await
    .map_err(|_| Refused::Gone)?;
    let (request_id, service, metadata) = loop {
        match events.recv().await {
            Some(ClientEvent::OpenRequest {
                request_id,
                service,
                metadata,
            }) => break (request_id, service, metadata),
            Some(_) => {}
            None => return Err(Refused::Gone),
        }
    };
    let relay = (service.as_str() == PEER_SERVICE)
        .then(|| check_hello(&metadata, &shared.secret))
        .flatten();
    let Some(relay) = relay else {
        warn!(
            service = ?crate::relay::shown(service.as_str()),
            "refusing a peer connection: no hello with the cluster secret"
        );
        let reason = format!("present the cluster secret first: open {PEER_SERVICE:?}");
        let _ = client
            .reject_open(request_id, RejectCode::Unauthorized, Some(reason))
            .await;
        return Err(Refused::Answered(client));
    };
    let Ok(mut stream) = client.accept_stream(request_id).await else {
        return Err(Refused::Gone);
    };
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
    Ok((client, events, relay))
}

/// One forwarded open.
struct Open {
    client: SessionClient<QuinnConnection>,
    request_id: u64,
    service: ServiceId,
    metadata: Metadata,
}

impl Open {
    async fn forward(self, shared: Arc<Shared>) {
        let counters = &shared.stats.counters;
        let forward = match parse_forward(self.metadata.clone()) {
            Ok(forward) => forward,
            Err(refusal) => {
                count(&counters.malformed);
                return self.refuse(&refusal, "").await;
            }
        };
        if !(1..=i64::from(MAX_HOPS)).contains(&forward.hops) {
            count(&counters.hop_limit);
            warn!(edge = ?crate::relay::shown(&forward.edge), hops = forward.hops, "refusing a forwarded open over the hop limit");
            return self
                .refuse(&Refusal::HopLimit(forward.hops), &forward.edge)
                .await;
        }
        // Only this relay's own edges: a forwarded open is never forwarded again.
        let Some(edge) = shared.registry.get(&forward.edge) else {
            count(&counters.not_attached);
            return self.refuse(&Refusal::NotAttached, &forward.edge).await;
        };
        let target = OpenTarget::new(self.service.clone()).with_metadata(forward.metadata);
        let edge_stream = match edge.connector().connect(target).await {
            Ok(stream) => stream,
            Err(error) => {
                let refusal = match error {
                    Error::StreamRejected { code, reason } => {
                        count(&counters.refused_by_edge);
                        Refusal::Edge(code, reason)
                    }
                    _ if !edge.client().is_ready() => {
                        count(&counters.not_attached);
                        Refusal::NotAttached
                    }
                    error => {
                        count(&counters.refused_by_edge);
                        Refusal::Edge(RejectCode::ServiceUnavailable, Some(error.to_string()))
                    }
                };
                return self.refuse(&refusal, &forward.edge).await;
            }
        };
        let peer_stream = match self.client.accept_stream(self.request_id).await {
            Ok(stream) => stream,
            Err(error) => {
                debug!(%error, "could not answer a forwarded open");
                abandon(edge_stream);
                return;
            }
        };
        count(&counters.forwarded);
        let (up, down) = join(peer_stream, edge_stream).await;
        if !matches!((up, down), (Ended::Finished(_), Ended::Finished(_))) {
            debug!(edge = %edge.name(), ?up, ?down, "a forwarded stream failed");
        }
    }

    async fn refuse(&self, refusal: &Refusal, edge: &str) {
        let (code, reason) = refusal.to_wire(edge);
        let _ = self
            .client
            .reject_open(self.request_id, code, Some(reason))
            .await;
    }
}

/// Splices a peer's stream and an edge's, holding both sessions' slots until done.
async fn join(
    peer: TunnelStream<QuinnConnection>,
    edge: TunnelStream<QuinnConnection>,
) -> (Ended, Ended) {
    let _holds = (peer.session_hold(), edge.session_hold());
    // Guarded halves: if this task is aborted (the relay shuts down) mid-splice, both
    // streams are reset, not finished, so neither side takes a cut transfer as whole.
    let (mut peer_send, mut peer_recv) = peer.into_guarded_parts();
    let (mut edge_send, mut edge_recv) = edge.into_guarded_parts();
    splice(
        (&mut peer_send, &mut peer_recv),
        (&mut edge_send, &mut edge_recv),
    )
    .await
}

/// Ends a stream nobody will use, as failed with [`SPLICE_FAILED`].
fn abandon(stream: TunnelStream<QuinnConnection>) {
    let (mut send, mut recv, _) = stream.into_parts();
    send.reset(SPLICE_FAILED);
    recv.stop(SPLICE_FAILED);
}

type Running = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serving peer relays, from [`PeerServer::serve`]; `.await` it or spawn it. Resolves
/// after a graceful shutdown or when the endpoint was closed. Dropping it aborts every
/// peer connection's task.
#[must_use = "futures do nothing unless polled"]
pub struct ServePeers {
    inner: LazyServe,
}

impl fmt::Debug for ServePeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServePeers")
            .field("started", &self.inner.is_started())
            .finish_non_exhaustive()
    }
}

impl ServePeers {
    /// Shuts down gracefully when `signal` resolves: new handshakes are refused, peer
    /// sessions are closed, forwarded streams get 2 s to finish, then the endpoint
    /// closes. Set it before the first poll.
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.set_shutdown(signal);
        self
    }
}

impl Future for ServePeers {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.poll(cx)
    }
}

/// Serving one peer connection, from [`PeerServer::serve_connection`].
#[must_use = "futures do nothing unless polled"]
pub struct ServePeerConnection {
    inner: Running,
}

impl fmt::Debug for ServePeerConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServePeerConnection")
    }
}

impl Future for ServePeerConnection {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(all(test, feature = "self-signed"))]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::quic::test_pair::{test_pair, TestPair};
    use crate::stream::{reset_code, TunnelInfo, ABANDONED_STREAM};
    use crate::transport::{Connection, QuinnRecvStream, QuinnSendStream};

    /// A stream from the pair's dialer (the far end, kept bare) to its acceptor (wrapped as
    /// the relay's `TunnelStream`).
    async fn far_and_near(
        pair: &TestPair,
    ) -> (
        (QuinnSendStream, QuinnRecvStream),
        TunnelStream<QuinnConnection>,
    ) {
        let (mut send, recv) = pair.dialer.open_bi().await.unwrap();
        send.write_all(b"hi").await.unwrap();
        let (near_send, mut near_recv) = pair.acceptor.accept_bi().await.unwrap().unwrap();
        let mut hi = [0u8; 2];
        near_recv.read_exact(&mut hi).await.unwrap();
        let info = TunnelInfo {
            service: ServiceId::new("test"),
            metadata: Metadata::Empty,
            logical_stream_id: 0,
        };
        ((send, recv), TunnelStream::new(near_send, near_recv, info))
    }

    /// Reads until the stream ends; the reset code if it failed, `None` on a clean end.
    async fn read_to_reset(recv: &mut QuinnRecvStream) -> Option<u32> {
        let mut sink = Vec::new();
        match recv.read_to_end(&mut sink).await {
            Ok(_) => None,
            Err(error) => Some(reset_code(&error).unwrap_or_else(|| panic!("{error}"))),
        }
    }

    #[tokio::test]
    async fn a_splice_aborted_mid_transfer_resets_both_streams_instead_of_finishing_them() {
        let (peer_pair, edge_pair) = tokio::join!(test_pair(), test_pair());
        let ((mut peer_send, mut peer_recv), peer) = far_and_near(&peer_pair).await;
        let ((mut edge_send, mut edge_recv), edge) = far_and_near(&edge_pair).await;
        let joined = tokio::spawn(join(peer, edge));

        // Bytes cross both ways, then the relay's task is aborted (a shutdown, a crash of
        // the task) with neither side finished.
        peer_send.write_all(b"request part").await.unwrap();
        edge_send.write_all(b"response part").await.unwrap();
        let mut crossed = [0u8; 12];
        edge_recv.read_exact(&mut crossed).await.unwrap();
        assert_eq!(&crossed, b"request part");
        let mut crossed = [0u8; 13];
        peer_recv.read_exact(&mut crossed).await.unwrap();
        assert_eq!(&crossed, b"response part");
        joined.abort();
        assert!(joined.await.unwrap_err().is_cancelled());

        assert_eq!(read_to_reset(&mut peer_recv).await, Some(ABANDONED_STREAM));
        assert_eq!(read_to_reset(&mut edge_recv).await, Some(ABANDONED_STREAM));
    }
}
