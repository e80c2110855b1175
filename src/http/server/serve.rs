//! The accept loop and the named future a [`Server`](super::Server) runs as.
//!
//! The loop takes a connection slot before it accepts, so past
//! [`Limits::max_connections`](super::Limits) new connections wait in the kernel's
//! backlog rather than being accepted and dropped: a client that got in is served, and a
//! burst is absorbed instead of refused. On the shutdown signal it stops accepting,
//! closes idle connections, and gives the others [`Limits::shutdown_timeout`] to finish.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::Service;
use tracing::{error, info, warn};

use super::connection::{serve_connection, Open, Shared};
use super::placement::{peek_first, Placed};
use super::{BoxError, Server};
use crate::shards::serve_tcp_on;

type Signal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A [`Server`] with its service, ready to run: `.await` it (or spawn
/// [`into_future()`](IntoFuture::into_future)). Made by [`Server::serve`].
#[must_use = "a server does nothing until awaited"]
pub struct Serve<S> {
    server: Server,
    service: S,
    shutdown: Option<Signal>,
}

impl<S> std::fmt::Debug for Serve<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve")
            .field("server", &self.server)
            .field("graceful_shutdown", &self.shutdown.is_some())
            .finish_non_exhaustive()
    }
}

impl<S> Serve<S> {
    pub(super) fn new(server: Server, service: S) -> Self {
        Self {
            server,
            service,
            shutdown: None,
        }
    }

    /// Shuts down gracefully when `signal` completes: stops accepting, closes connections
    /// with no request in flight at once, and lets the others finish their responses for
    /// up to [`Limits::shutdown_timeout`](super::Limits). Without it, the server runs
    /// until dropped (which drops every connection).
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shutdown = Some(Box::pin(signal));
        self
    }
}

impl<S, B> IntoFuture for Serve<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = ();
    type IntoFuture = ServeFuture;

    fn into_future(self) -> ServeFuture {
        ServeFuture {
            inner: Box::pin(run(self.server, self.service, self.shutdown)),
        }
    }
}

/// A running [`Serve`]: resolves after the graceful shutdown finished.
#[must_use = "futures do nothing unless polled"]
pub struct ServeFuture {
    // The loop is an `async fn` generic over the service and body: boxing it once per
    // server keeps this type nameable.
    inner: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for ServeFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeFuture").finish_non_exhaustive()
    }
}

impl Future for ServeFuture {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.as_mut().poll(cx)
    }
}

async fn run<S, B>(server: Server, service: S, shutdown: Option<Signal>)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let Server {
        mut acceptor,
        limits,
        observer,
        express,
        placed,
        #[cfg(feature = "tls")]
        tls,
    } = server;
    let shared = Arc::new(Shared {
        builder: limits.http_builder(),
        limits,
        observer,
        stop: CancellationToken::new(),
        stopping: AtomicBool::new(false),
        express,
        #[cfg(feature = "tls")]
        tls,
    });
    let max_connections = limits.connection_slots();
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(async move {
        match shutdown {
            Some(signal) => signal.await,
            None => std::future::pending().await,
        }
    });
    let mut warned_full = false;
    'accepting: loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_closed) => break,
            },
            () = &mut shutdown => break,
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                log_panic(joined);
                continue;
            }
        };
        if slots.available_permits() == 0 {
            shared.observer.at_capacity(max_connections);
            if !warned_full {
                warn!(
                    limit = max_connections,
                    "connection limit reached; new connections wait"
                );
                warned_full = true;
            }
        } else if slots.available_permits() > max_connections / 10 {
            warned_full = false;
        }
        let (tcp, peer) = loop {
            tokio::select! {
                accepted = acceptor.accept(&shared.observer) => break accepted,
                () = &mut shutdown => break 'accepting,
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    log_panic(joined);
                }
            }
        };
        let accepted_at = Instant::now();
        let open = Open::new(&tcp, peer, &shared, slot);
        let service = service.clone();
        match &placed {
            None => {
                connections.spawn(serve_connection(tcp, open, accepted_at, service));
            }
            Some(placed) => {
                let placed = placed.clone();
                let shared = Arc::clone(&shared);
                connections.spawn(serve_placed(
                    tcp,
                    open,
                    accepted_at,
                    service,
                    shared,
                    placed,
                ));
            }
        }
    }
    // New connections are refused from here on.
    drop(acceptor);
    shared.stopping.store(true, Ordering::Release);
    shared.stop.cancel();
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while let Some(joined) = connections.join_next().await {
            log_panic(joined);
        }
    })
    .await;
    match drained {
        Ok(()) => info!("all connections finished"),
        Err(_) => {
            warn!(
                unfinished = connections.len(),
                "shutdown timeout: dropping unfinished connections"
            );
            connections.shutdown().await;
        }
    }
}

/// Serves `tcp` on the shard its first bytes point to (see [`placement`](super::placement)).
async fn serve_placed<S, B>(
    tcp: TcpStream,
    open: Open,
    accepted_at: Instant,
    service: S,
    shared: Arc<Shared>,
    placed: Placed,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let deadline = accepted_at + shared.limits.header_timeout;
    // A shutdown does not wait for first bytes: the connection is served where it is,
    // which closes it at once unless a request is already under way.
    let peeked = tokio::select! {
        peeked = peek_first(&tcp, shared.secure(), deadline, &shared.limits) => Some(peeked),
        () = shared.stop.cancelled() => None,
    };
    let elsewhere = peeked
        .map(|peeked| placed.choose(&peeked, shared.secure()))
        .filter(|&index| !placed.is_current(index));
    let Some(index) = elsewhere else {
        serve_connection(tcp, open, accepted_at, service).await;
        return;
    };
    serve_tcp_on(placed.set.handle(index), tcp, move |tcp| {
        serve_connection(tcp, open, accepted_at, service)
    })
    .await;
}

fn log_panic(joined: Result<(), JoinError>) {
    if let Err(join_error) = joined {
        if join_error.is_panic() {
            error!(error = %join_error, "a connection task panicked");
        }
    }
}
