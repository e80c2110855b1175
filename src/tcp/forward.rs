//! The relay's side of a TCP tunnel: a public listener whose connections reach one
//! service of one edge.

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

use super::splice::{splice, Side, SpliceError, Spliced};
use super::{
    abort_tcp, ConnectionAddresses, CONNECTION_BROKEN, STATUS_BACKEND_UNAVAILABLE, STATUS_CONNECTED,
};
use crate::connector::OpenTarget;
use crate::error::Error;
use crate::lazy_serve::{LazyServe, Signal};
use crate::protocol::ServiceId;
use crate::relay::{Directory, Location};
use crate::stream::TunnelStream;
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
    /// The edge is connected to another relay (forwarding TCP between relays is not done).
    EdgeElsewhere(crate::relay::RelayId),
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
            Self::EdgeElsewhere(relay) => write!(f, "the edge is connected to relay {relay}"),
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
/// started on.
pub struct TcpForward<D> {
    listener: TcpListener,
    directory: D,
    edge: Arc<str>,
    service: ServiceId,
    max_connections: usize,
    open_timeout: Duration,
    drain_timeout: Duration,
    observer: Arc<dyn TcpObserver>,
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
        }
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
    addresses: ConnectionAddresses,
}

impl<D: Directory<QuinnConnection>> Connection<D> {
    async fn forward(self, mut client: TcpStream) {
        let _ = client.set_nodelay(true);
        let mut stream = match self.open().await {
            Ok(stream) => stream,
            Err(failure) => {
                self.report(&failure);
                abort_tcp(client);
                return;
            }
        };
        self.observer.opened(&self.edge, &self.service);
        match splice(&mut client, &mut stream).await {
            Ok(carried) => self.observer.closed(&self.edge, &self.service, carried),
            Err(error) => {
                let failure = match error.side {
                    Side::First => {
                        stream.reset(CONNECTION_BROKEN);
                        TcpFailure::ClientBroken(error)
                    }
                    Side::Second => {
                        abort_tcp(client);
                        TcpFailure::TunnelBroken(error)
                    }
                };
                self.report(&failure);
            }
        }
    }

    async fn open(&self) -> Result<TunnelStream<QuinnConnection>, TcpFailure> {
        let handle = match self.directory.locate(&self.edge).await {
            Ok(Location::Local(handle)) => handle,
            Ok(Location::Elsewhere(relay)) => return Err(TcpFailure::EdgeElsewhere(relay)),
            Ok(_) => return Err(TcpFailure::EdgeNotConnected),
            Err(error) => return Err(TcpFailure::Directory(error)),
        };
        let target =
            OpenTarget::new(self.service.clone()).with_metadata(self.addresses.to_metadata());
        let open = async {
            let mut stream = handle
                .connector()
                .oneshot(target)
                .await
                .map_err(TcpFailure::Open)?;
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
            Ok(result) => result,
            Err(_) => Err(TcpFailure::OpenTimedOut),
        }
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
