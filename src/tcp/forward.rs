//! The relay's side of a TCP tunnel: a public listener whose connections reach one
//! service of one edge, attached to this relay or, with [`TcpForward::with_peers`], to
//! another relay of the cluster.
//!
//! Through a peer the stream is the same: the relay the edge is attached to splices it to
//! the edge untouched (see [`relay::peer`](crate::relay::peer)), so the edge's status byte,
//! the client's addresses in the open's metadata, half-close and resets all cross it as
//! they would locally.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;
use tracing::{debug, warn};

use super::splice::{splice_until_stopped, Side, SpliceError, Spliced};
use super::{
    AbortUnlessDone, ConnectionAddresses, CONNECTION_BROKEN, STATUS_BACKEND_UNAVAILABLE,
    STATUS_CONNECTED,
};
use crate::connector::OpenTarget;
use crate::error::Error;
use crate::lazy_serve::{LazyServe, Signal};
use crate::protocol::ServiceId;
use crate::relay::peer::{resolve_peer_address, PeerAddresses, PeerPool};
use crate::relay::{Directory, EdgeHandle, EdgeName, Location, RelayId};
use crate::shards::{serve_tcp_on, Shard, ShardSet};
use crate::stream::TunnelStream;
use crate::transport::reset_on_drop::Abandoned;
use crate::transport::QuinnConnection;

/// Public connections a [`TcpForward`] holds at once, by default; more wait in the
/// kernel's accept queue until one ends.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 10_000;
/// How long opening the stream to the edge (and the edge's connect to its backend) may
/// take, by default.
pub const DEFAULT_TCP_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connections may go on after shutdown begins, by default.
pub const DEFAULT_TCP_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a public TCP connection was not (or no longer) forwarded.
#[derive(Debug)]
#[non_exhaustive]
pub enum TcpFailure {
    /// No edge by that name is connected here.
    EdgeNotConnected,
    /// The edge is connected to another relay, and this forwarder has no way to peers
    /// (see [`TcpForward::with_peers`]).
    EdgeElsewhere(RelayId),
    /// The edge is connected to another relay whose peer address is not known (it
    /// published none, or it is no longer alive), or does not resolve (`source`).
    PeerAddress {
        /// The relay the edge is attached to.
        relay: RelayId,
        /// Why the published address could not be used, if one was published.
        source: Option<std::io::Error>,
    },
    /// The directory could not answer.
    Directory(Error),
    /// The edge refused the open (unknown service, at capacity…), or the session failed.
    Open(Error),
    /// The open took longer than the open timeout.
    OpenTimedOut,
    /// The edge's backend refused the connection or did not answer.
    BackendUnavailable,
    /// The tunnel broke mid-connection (the edge went away, or its backend reset).
    TunnelBroken(SpliceError),
    /// The public client broke the connection (a reset, not a close).
    ClientBroken(SpliceError),
}

impl TcpFailure {
    /// A short, stable label for metrics.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::EdgeNotConnected => "edge_not_connected",
            Self::EdgeElsewhere(_) => "edge_elsewhere",
            Self::Directory(_) => "directory",
            Self::PeerAddress { .. }
            | Self::Open(Error::PeerUnreachable { .. } | Error::PeerRefused { .. }) => {
                "peer_unreachable"
            }
            Self::Open(_) => "open_refused",
            Self::OpenTimedOut => "open_timeout",
            Self::BackendUnavailable => "backend_unavailable",
            Self::TunnelBroken(_) => "tunnel_broken",
            Self::ClientBroken(_) => "client_broken",
        }
    }
}

impl std::fmt::Display for TcpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EdgeNotConnected => f.write_str("the edge is not connected"),
            Self::EdgeElsewhere(relay) => write!(
                f,
                "the edge is connected to relay {relay} (no forwarding to peers here)"
            ),
            Self::PeerAddress {
                relay,
                source: None,
            } => write!(
                f,
                "the edge is connected to relay {relay}, whose peer address is unknown"
            ),
            Self::PeerAddress {
                relay,
                source: Some(error),
            } => write!(
                f,
                "the edge is connected to relay {relay}, whose peer address does not resolve: {error}"
            ),
            Self::Directory(error) => write!(f, "the directory did not answer: {error}"),
            Self::Open(error) => write!(f, "the edge refused the stream: {error}"),
            Self::OpenTimedOut => f.write_str("the edge did not answer the open in time"),
            Self::BackendUnavailable => f.write_str("the edge's backend refused the connection"),
            Self::TunnelBroken(error) => write!(f, "the tunnel broke: {}", error.error),
            Self::ClientBroken(error) => {
                write!(f, "the client broke the connection: {}", error.error)
            }
        }
    }
}

/// What a [`TcpForward`] reports, for metrics; every method has a no-op default.
pub trait TcpObserver: Send + Sync + 'static {
    /// A public connection reached the edge's service.
    fn opened(&self, _edge: &str, _service: &ServiceId) {}
    /// A forwarded connection ended cleanly, with the bytes carried each way.
    fn closed(&self, _edge: &str, _service: &ServiceId, _carried: Spliced) {}
    /// A connection was refused or broke; it has been closed (reset where data was lost).
    fn failed(&self, _edge: &str, _service: &ServiceId, _failure: &TcpFailure) {}
}

struct Silent;

impl TcpObserver for Silent {}

/// Forwards the public connections of a listener to one service of one edge; see the
/// [module docs](super).
///
/// The edge is looked up per connection, so an edge that reconnects (or is replaced) is
/// reached by the next connection; connections already forwarded stay on the session they
/// started on. With [`with_peers`](Self::with_peers), an edge the directory places on
/// another relay is reached through that relay.
pub struct TcpForward<D> {
    listener: TcpListener,
    directory: D,
    edge: Arc<str>,
    service: ServiceId,
    max_connections: usize,
    open_timeout: Duration,
    drain_timeout: Duration,
    observer: Arc<dyn TcpObserver>,
    peers: Option<Arc<Peers>>,
    shards: Option<ShardSet>,
}

/// The way to edges attached to other relays.
struct Peers {
    pool: PeerPool,
    addresses: Box<dyn PeerAddresses>,
}

impl<D> std::fmt::Debug for TcpForward<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpForward")
            .field("listener", &self.listener.local_addr().ok())
            .field("edge", &self.edge)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl<D> TcpForward<D>
where
    D: Directory<QuinnConnection> + Send + Sync + 'static,
{
    /// Forwards `listener`'s connections to `service` on the edge called `edge`.
    pub fn new(
        listener: TcpListener,
        directory: D,
        edge: impl Into<String>,
        service: impl Into<ServiceId>,
    ) -> Self {
        Self {
            listener,
            directory,
            edge: Arc::from(edge.into()),
            service: service.into(),
            max_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            open_timeout: DEFAULT_TCP_OPEN_TIMEOUT,
            drain_timeout: DEFAULT_TCP_DRAIN_TIMEOUT,
            observer: Arc::new(Silent),
            peers: None,
            shards: None,
        }
    }

    /// Carries each connection on the shard of the edge it reaches (see
    /// [`shards`](crate::shards)), the thread that drives the edge's QUIC connection:
    /// once its stream is open, the client's socket moves there. Without it (the
    /// default), connections are carried on the runtime that serves the forwarder.
    #[must_use]
    pub fn with_shards(mut self, shards: ShardSet) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Reaches an edge that the directory places on another relay
    /// ([`Location::Elsewhere`]) through that relay: its peer address from `addresses`
    /// (with a `RedisDirectory`, the directory itself), a session to it from `pool`
    /// (shared with the relay's HTTP forwarding, so one QUIC connection per peer carries
    /// both). Without it, such connections fail with [`TcpFailure::EdgeElsewhere`].
    ///
    /// ```no_run
    /// use std::collections::HashMap;
    /// use backhaul::relay::peer::PeerPool;
    /// use backhaul::relay::{Directory, RelayId};
    /// use backhaul::tcp::TcpForward;
    ///
    /// // `directory` is shared by the cluster (a `RedisDirectory`, which also knows the
    /// // peer addresses); here the one peer's address is given.
    /// async fn forward<D>(directory: D, pool: PeerPool, relay_a: std::net::SocketAddr)
    ///     -> std::io::Result<()>
    /// where
    ///     D: Directory + Send + Sync + 'static,
    /// {
    ///     let peers = HashMap::from([(RelayId::new("relay-a"), relay_a)]);
    ///     let listener = backhaul::listener::bind(([0, 0, 0, 0], 2222).into())?;
    ///     let forward = TcpForward::new(listener, directory, "kiosk", "ssh").with_peers(pool, peers);
    ///     tokio::spawn(forward.serve());
    ///     Ok(())
    /// }
    /// ```
    #[must_use]
    pub fn with_peers(mut self, pool: PeerPool, addresses: impl PeerAddresses) -> Self {
        self.peers = Some(Arc::new(Peers {
            pool,
            addresses: Box::new(addresses),
        }));
        self
    }

    /// At most `max` connections at once ([`DEFAULT_MAX_TCP_CONNECTIONS`]).
    #[must_use]
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long the open to the edge may take ([`DEFAULT_TCP_OPEN_TIMEOUT`]).
    #[must_use]
    pub fn with_open_timeout(mut self, timeout: Duration) -> Self {
        self.open_timeout = timeout;
        self
    }

    /// How long connections may go on after a graceful shutdown begins before they are
    /// reset ([`DEFAULT_TCP_DRAIN_TIMEOUT`]).
    #[must_use]
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Reports opens, closes and failures to `observer` (metrics).
    #[must_use]
    pub fn with_observer(mut self, observer: impl TcpObserver) -> Self {
        self.observer = Arc::new(observer);
        self
    }

    /// The listener's address.
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts and forwards connections until the returned future is dropped, or until
    /// the signal given to [`ServeTcp::with_graceful_shutdown`] fires.
    pub fn serve(self) -> ServeTcp {
        ServeTcp {
            inner: LazyServe::new(move |signal| self.run(signal)),
        }
    }

    async fn run(self, signal: Signal) {
        let Self {
            listener,
            directory,
            edge,
            service,
            max_connections,
            open_timeout,
            drain_timeout,
            observer,
            peers,
            shards,
        } = self;
        let directory = Arc::new(directory);
        let slots = Arc::new(Semaphore::new(max_connections));
        let mut connections = JoinSet::new();
        let mut backoff = Duration::from_millis(10);
        tokio::pin!(signal);
        loop {
            // A free slot first: at the cap, connections wait in the accept queue.
            let slot = tokio::select! {
                () = &mut signal => break,
                slot = Arc::clone(&slots).acquire_owned() => slot.expect("never closed"),
            };
            let (client, client_address) = tokio::select! {
                () = &mut signal => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => {
                        backoff = Duration::from_millis(10);
                        accepted
                    }
                    Err(error) => {
                        // Out of descriptors, say: wait instead of spinning.
                        warn!(%error, "TCP accept failed; backing off {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            while connections.try_join_next().is_some() {}
            let public = listener.local_addr().unwrap_or(client_address);
            let connection = Connection {
                directory: Arc::clone(&directory),
                edge: Arc::clone(&edge),
                service: service.clone(),
                open_timeout,
                observer: Arc::clone(&observer),
                peers: peers.clone(),
                shards: shards.clone(),
                addresses: ConnectionAddresses {
                    client: client_address,
                    public,
                },
            };
            connections.spawn(async move {
                connection.forward(client).await;
                drop(slot);
            });
        }
        drop(listener);
        let drained = tokio::time::timeout(drain_timeout, async {
            while connections.join_next().await.is_some() {}
        });
        if drained.await.is_err() {
            debug!(
                remaining = connections.len(),
                "TCP drain timeout; resetting the rest"
            );
            connections.shutdown().await;
        }
    }
}

/// The running forwarder made by [`TcpForward::serve`]; resolves after shutdown.
#[must_use = "futures do nothing unless polled"]
pub struct ServeTcp {
    inner: LazyServe,
}

impl ServeTcp {
    /// Stops accepting when `signal` resolves; open connections then get the drain
    /// timeout to finish, and what is left is reset. Set it before the first poll.
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.set_shutdown(signal);
        self
    }
}

impl std::fmt::Debug for ServeTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeTcp").finish_non_exhaustive()
    }
}

impl Future for ServeTcp {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.poll(cx)
    }
}

/// One public connection on its way to the edge.
struct Connection<D> {
    directory: Arc<D>,
    edge: Arc<str>,
    service: ServiceId,
    open_timeout: Duration,
    observer: Arc<dyn TcpObserver>,
    peers: Option<Arc<Peers>>,
    shards: Option<ShardSet>,
    addresses: ConnectionAddresses,
}

impl<D: Directory<QuinnConnection> + Send + Sync + 'static> Connection<D> {
    async fn forward(self, client: TcpStream) {
        let _ = client.set_nodelay(true);
        // Both ends are reset, not closed, if this task is aborted mid-transfer (the
        // forwarder's drain timed out): neither side may take a cut transfer as whole.
        let client = AbortUnlessDone::new(client);
        let (stream, shard) = match self.open().await {
            Ok((stream, shard)) => (stream.abandoned(Abandoned::Always), shard),
            Err(failure) => {
                self.report(&failure);
                return;
            }
        };
        self.observer.opened(&self.edge, &self.service);
        let elsewhere = self.shards.as_ref().and_then(|shards| {
            let index = shards.index_of(shard?)?;
            (shards.current_index() != Some(index)).then(|| shards.handle(index).clone())
        });
        match elsewhere {
            Some(handle) => {
                // Reset, not closed, until the task there holds it again: a move cut
                // short (the drain's abort before that task first runs) must not end
                // the client's transfer with a FIN.
                let client = client.release();
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                serve_tcp_on(&handle, client, move |client| {
                    let _ = socket2::SockRef::from(&client).set_linger(None);
                    self.carry(AbortUnlessDone::new(client), stream)
                })
                .await;
            }
            None => self.carry(client, stream).await,
        }
    }

    /// Splices `client` and `stream` until both directions end.
    async fn carry(self, mut client: AbortUnlessDone, mut stream: TunnelStream<QuinnConnection>) {
        // Once the edge stops reading the stream (its backend closed), the client's bytes
        // go nowhere: that direction ends without waiting for the client's next write.
        let stopped = stream.stopped();
        match splice_until_stopped(&mut *client, &mut stream, std::future::pending(), stopped).await
        {
            Ok(carried) => {
                client.release();
                self.observer.closed(&self.edge, &self.service, carried);
            }
            Err(error) => {
                // The side that did not break is aborted: the stream here, the client
                // when `client` drops.
                let failure = match error.side {
                    Side::First => {
                        if error.answer_delivered {
                            // The client stopped reading, but what it sent went out whole.
                            stream.stop(CONNECTION_BROKEN);
                        } else {
                            stream.reset(CONNECTION_BROKEN);
                        }
                        TcpFailure::ClientBroken(error)
                    }
                    Side::Second => TcpFailure::TunnelBroken(error),
                };
                self.report(&failure);
            }
        }
    }

    /// Opens the stream; with the shard of the edge's session, if it is attached here.
    async fn open(&self) -> Result<(TunnelStream<QuinnConnection>, Option<Shard>), TcpFailure> {
        let location = match self.directory.locate(&self.edge).await {
            Ok(Location::Local(handle)) => Ok(handle),
            Ok(Location::Elsewhere(relay)) => Err(relay),
            Ok(_) => return Err(TcpFailure::EdgeNotConnected),
            Err(error) => return Err(TcpFailure::Directory(error)),
        };
        let target =
            OpenTarget::new(self.service.clone()).with_metadata(self.addresses.to_metadata());
        let shard = location.as_ref().ok().and_then(EdgeHandle::shard);
        let open = async {
            let opened = match location {
                Ok(handle) => handle.connector().oneshot(target).await,
                Err(relay) => self.open_through_peer(relay, target).await?,
            };
            let mut stream = opened.map_err(TcpFailure::Open)?;
            let mut status = [0u8; 1];
            match stream.read(&mut status).await {
                Ok(1) if status[0] == STATUS_CONNECTED => Ok(stream),
                Ok(1) if status[0] == STATUS_BACKEND_UNAVAILABLE => {
                    Err(TcpFailure::BackendUnavailable)
                }
                Ok(_) => Err(TcpFailure::Open(Error::ProtocolViolation(
                    "a TCP stream must start with a status byte",
                ))),
                Err(error) => Err(TcpFailure::Open(Error::transport(error))),
            }
        };
        match tokio::time::timeout(self.open_timeout, open).await {
            Ok(result) => result.map(|stream| (stream, shard)),
            Err(_) => Err(TcpFailure::OpenTimedOut),
        }
    }

    /// Opens `target` through the relay the edge is attached to; the outer error is
    /// about reaching that relay at all, the inner one the open's.
    async fn open_through_peer(
        &self,
        relay: RelayId,
        target: OpenTarget,
    ) -> Result<Result<TunnelStream<QuinnConnection>, Error>, TcpFailure> {
        let Some(peers) = &self.peers else {
            return Err(TcpFailure::EdgeElsewhere(relay));
        };
        let Some(published) = peers.addresses.peer_address(&relay) else {
            return Err(TcpFailure::PeerAddress {
                relay,
                source: None,
            });
        };
        let address = match resolve_peer_address(&published).await {
            Ok(address) => address,
            Err(error) => {
                return Err(TcpFailure::PeerAddress {
                    relay,
                    source: Some(error),
                })
            }
        };
        let edge = match EdgeName::new(&*self.edge) {
            Ok(edge) => edge,
            Err(error) => return Ok(Err(error)),
        };
        Ok(peers.pool.connector(address, edge).oneshot(target).await)
    }

    fn report(&self, failure: &TcpFailure) {
        // Client-side breaks are the client's business; everything else an operator may
        // need to act on.
        if matches!(failure, TcpFailure::ClientBroken(_)) {
            debug!(edge = %self.edge, service = %self.service, client = %self.addresses.client, "{failure}");
        } else {
            warn!(edge = %self.edge, service = %self.service, client = %self.addresses.client, "TCP forward failed: {failure}");
        }
        self.observer.failed(&self.edge, &self.service, failure);
    }
}
