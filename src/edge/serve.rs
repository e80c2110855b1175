//! The serving loop of an edge session.
use std::fmt;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tower::Service;
use tracing::{debug, error, warn, Instrument};

use super::router::{Route, Router};
use super::streams::{panic_message, StreamSpawner, StreamTasks};
use crate::error::Error;
use crate::protocol::{CloseCode, Metadata, RejectCode, ServiceId};
use crate::session::core::OpenHandler;
use crate::session::ClientEvent;
use crate::session::SessionClient;
use crate::transport::reset_on_drop::Abandoned;
use crate::transport::{Connection, DefaultConnection};

/// How long in-flight streams get to finish after a graceful shutdown begins, by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a graceful shutdown waits, once drained, for the peer to close the connection
/// before closing it itself, by default.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

type Signal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serving of a [`Router`] on one edge session; `.await` it.
///
/// Resolves to `Ok(())` after a graceful shutdown or a graceful close of the session, and
/// to the session's end error (e.g. [`Error::Disconnected`]) when the session was lost, so
/// a reconnect loop can tell the two apart.
///
/// A graceful shutdown ([`with_graceful_shutdown`](Self::with_graceful_shutdown)) goes in
/// the order the peer needs:
/// 1. the session is closed (`StreamClose(0)` with [`CloseCode::Normal`]), so the relay
///    stops routing new requests here at once instead of sending them to be refused;
/// 2. in-flight streams finish, for up to [`with_drain_timeout`](Self::with_drain_timeout) (HTTP
///    routes stop keep-alive); their data streams are unaffected by the session's close;
/// 3. the peer gets up to [`with_close_timeout`](Self::with_close_timeout) to close the connection,
///    which it does once it has read everything (closing it first would discard the last
///    responses if still unacknowledged); then the connection is closed here.
#[must_use = "serving does nothing unless awaited"]
pub struct Serve<C: Connection = DefaultConnection> {
    router: Router<C>,
    client: SessionClient<C>,
    events: mpsc::Receiver<ClientEvent>,
    shutdown: Option<Signal>,
    drain_timeout: Duration,
    close_timeout: Duration,
}

impl<C: Connection> fmt::Debug for Serve<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("router", &self.router)
            .field("drain_timeout", &self.drain_timeout)
            .field("close_timeout", &self.close_timeout)
            .finish_non_exhaustive()
    }
}

impl<C: Connection> Serve<C> {
    pub(crate) fn new(
        router: Router<C>,
        client: SessionClient<C>,
        events: mpsc::Receiver<ClientEvent>,
    ) -> Self {
        Self {
            router,
            client,
            events,
            shutdown: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
        }
    }

    /// Begins a graceful shutdown when `signal` resolves: closes the session, drains,
    /// then closes the connection (see [`Serve`]).
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// How long in-flight streams may run once shutdown began (default 30 s); streams
    /// still running then are aborted.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How long a graceful shutdown waits, after draining, for the peer to close the
    /// connection before closing it itself (default 2 s).
    pub fn with_close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// The former name of [`with_drain_timeout`](Self::with_drain_timeout), kept so
    /// existing callers compile.
    #[doc(hidden)]
    pub fn drain_timeout(self, timeout: Duration) -> Self {
        self.with_drain_timeout(timeout)
    }

    async fn run(self) -> Result<(), Error> {
        let Self {
            router,
            client,
            mut events,
            shutdown,
            drain_timeout,
            close_timeout,
        } = self;
        let (draining, drain_signal) = watch::channel(false);
        let streams = StreamTasks::new();
        let dispatcher = Arc::new(Dispatcher {
            router,
            client: client.clone(),
            streams: streams.spawner(),
            drain_signal,
        });
        let handler = HandlerSet::set(&client, &dispatcher);
        let mut shutdown = shutdown.unwrap_or_else(|| Box::pin(std::future::pending()));
        let mut events_open = true;
        let mut shutting_down = false;
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    debug!("graceful shutdown: closing the session, then draining");
                    shutting_down = true;
                    // Requests from now on come through the events, to be refused.
                    handler.remove();
                    // The peer stops routing here, and fails the opens it sent before it
                    // saw the close itself (they can no longer be answered).
                    let reason = Some("edge shutting down".to_owned());
                    if let Err(error) = client.close(CloseCode::Normal, reason).await {
                        debug!(%error, "could not send the session close");
                    }
                    break;
                }
                event = events.recv() => match event {
                    // Requests that came before the handler was set.
                    Some(ClientEvent::OpenRequest { request_id, service, .. }) => {
                        dispatcher.dispatch(request_id, service).await;
                    }
                    Some(other) => debug!(event = ?other, "session event"),
                    None => {
                        events_open = false;
                        break;
                    }
                },
            }
        }
        handler.remove();
        let _ = draining.send(true);
        let deadline = tokio::time::sleep(drain_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => {
                    if streams.len() > 0 {
                        warn!(streams = streams.len(), "drain timeout: aborting streams");
                    }
                    streams.stop();
                    break;
                }
                () = streams.drained() => break,
                event = events.recv(), if events_open => match event {
                    Some(ClientEvent::OpenRequest { request_id, .. }) => {
                        let reason = Some("edge is shutting down".to_owned());
                        let _ = client
                            .reject_open(request_id, RejectCode::ServiceUnavailable, reason)
                            .await;
                    }
                    Some(_) => {}
                    None => events_open = false,
                },
            }
        }
        streams.drained().await;
        drop(handler);
        drop(dispatcher);
        if shutting_down {
            let connection = client.connection();
            if tokio::time::timeout(close_timeout, peer_closed(connection))
                .await
                .is_err()
            {
                debug!(?close_timeout, "the peer kept the connection open");
            }
            connection.close(0, b"edge shut down");
            return Ok(());
        }
        if client.state().is_final() {
            match client.closed().await {
                Error::SessionClosed => Ok(()),
                error => Err(error),
            }
        } else {
            Ok(())
        }
    }
}

/// Answers open requests from the routes: set as the session's [`OpenHandler`] while
/// the serving loop runs, so that an open's stream task starts from the session's control
/// reader, and also called by the loop for requests that came through the events channel.
struct Dispatcher<C: Connection> {
    router: Router<C>,
    client: SessionClient<C>,
    streams: StreamSpawner,
    drain_signal: watch::Receiver<bool>,
}

impl<C: Connection> Dispatcher<C> {
    /// Starts serving request `request_id` on a task of its own, or says why not. A route
    /// whose `poll_ready` panics refuses the request: this runs in the session's control
    /// reader, which must not go down with it.
    fn start(
        &self,
        request_id: u64,
        service: &ServiceId,
    ) -> Result<(), (RejectCode, Option<String>)> {
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.try_start(request_id, service)
        }));
        started.unwrap_or_else(|payload| {
            error!(
                service = service.as_str(),
                panic = %panic_message(payload.as_ref()),
                "route panicked when asked for readiness"
            );
            let reason = Some(format!("service {service} failed"));
            Err((RejectCode::ServiceUnavailable, reason))
        })
    }

    fn try_start(
        &self,
        request_id: u64,
        service: &ServiceId,
    ) -> Result<(), (RejectCode, Option<String>)> {
        let Some(mut route) = self.router.find(service) else {
            let reason = Some(format!("no service named {service}"));
            return Err((RejectCode::UnsupportedService, reason));
        };
        match poll_ready_now(&mut route) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(error)) => {
                let reason = Some(format!("service {service} failed: {error}"));
                return Err((RejectCode::ServiceUnavailable, reason));
            }
            Poll::Pending => {
                let reason = Some(format!("service {service} is at capacity"));
                return Err((RejectCode::LimitExceeded, reason));
            }
        }
        let span = tracing::debug_span!("stream", service = ?service.as_str(), request_id);
        let client = self.client.clone();
        let draining = self.drain_signal.clone();
        self.streams.spawn(service.clone(), move |stop| {
            serve_stream(client, route, request_id, draining, stop).instrument(span)
        });
        Ok(())
    }

    /// [`start`](Self::start), answering a refusal.
    async fn dispatch(&self, request_id: u64, service: ServiceId) {
        if let Err((code, reason)) = self.start(request_id, &service) {
            let _ = self.client.reject_open(request_id, code, reason).await;
        }
    }
}

impl<C: Connection> OpenHandler for Dispatcher<C> {
    fn open_requested(
        &self,
        request_id: u64,
        service: ServiceId,
        _metadata: Metadata,
    ) -> Result<(), (RejectCode, Option<String>)> {
        self.start(request_id, &service)
    }
}

/// Keeps a [`Dispatcher`] set as its session's open handler, until dropped (or
/// [`remove`](Self::remove)d): the handler holds a `SessionClient`, so it must not outlive
/// the serving loop.
struct HandlerSet<'a, C: Connection>(&'a SessionClient<C>);

impl<'a, C: Connection> HandlerSet<'a, C> {
    fn set(client: &'a SessionClient<C>, dispatcher: &Arc<Dispatcher<C>>) -> Self {
        let handler: Arc<dyn OpenHandler> = dispatcher.clone();
        client.set_open_handler(Some(handler));
        Self(client)
    }

    fn remove(&self) {
        self.0.set_open_handler(None);
    }
}

impl<C: Connection> Drop for HandlerSet<'_, C> {
    fn drop(&mut self) {
        self.remove();
    }
}

impl<C: Connection> IntoFuture for Serve<C> {
    type Output = Result<(), Error>;
    type IntoFuture = ServeFuture<C>;

    fn into_future(self) -> Self::IntoFuture {
        ServeFuture {
            inner: Box::pin(self.run()),
            _connection: PhantomData,
        }
    }
}

/// The future of a [`Serve`] being awaited (what `.await` and `into_future` run).
/// Resolves as [`Serve`] describes; dropping it stops serving and aborts every stream.
#[must_use = "futures do nothing unless polled"]
pub struct ServeFuture<C: Connection = DefaultConnection> {
    // The serving loop is an `async fn` with a `select!` over several futures; boxing it
    // once per session costs nothing that matters and keeps this type nameable.
    inner: Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>,
    _connection: PhantomData<fn() -> C>,
}

impl<C: Connection> fmt::Debug for ServeFuture<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeFuture").finish_non_exhaustive()
    }
}

impl<C: Connection> Future for ServeFuture<C> {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// Resolves once the peer closed the connection (or it was lost). The session no longer
/// accepts streams once closed, so any stream the peer still opens is refused here.
async fn peer_closed<C: Connection>(connection: &C) {
    use crate::transport::{RecvStream as _, SendStream as _};
    while let Ok(Some((mut send, mut recv))) = connection.accept_bi().await {
        send.reset(0);
        recv.stop(0);
    }
}

/// Asks a route whether it can take a stream now, without waiting.
fn poll_ready_now<C: Connection>(route: &mut Route<C>) -> Poll<Result<(), super::RouteError>> {
    route.poll_ready(&mut Context::from_waker(Waker::noop()))
}

async fn serve_stream<C: Connection>(
    client: SessionClient<C>,
    mut route: Route<C>,
    request_id: u64,
    draining: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    // The slot is held by the stream and `_slot` below, also if this task is aborted.
    let stream = match client.accept_stream(request_id).await {
        Ok(stream) => stream
            .with_draining(draining)
            .abandoned(Abandoned::Stopped(stop)),
        Err(error) => {
            warn!(%error, "could not accept the stream");
            return;
        }
    };
    let id = stream.logical_stream_id();
    // The slot stays taken until the route returns, even if it dropped the stream early.
    let _slot = stream.session_hold();
    let mut abandoned = TellAbandoned {
        client: &client,
        logical_stream_id: Some(id),
    };
    let (code, reason) = match route.call(stream).await {
        Ok(()) => (CloseCode::Normal, None),
        Err(error) => {
            debug!(%error, "route failed");
            (CloseCode::Error, Some(error.to_string()))
        }
    };
    abandoned.logical_stream_id = None;
    let _ = client.close_stream(id, code, reason).await;
}

/// Tells the peer, if dropped before its route returned (the route panicked, or the
/// serving loop stopped it), that the stream was abandoned: `StreamClose` with
/// [`CloseCode::Reset`]. The stream itself is reset then, and a reset can discard its
/// `StreamBind` with the rest, so an opener still waiting for the stream would otherwise
/// wait out its bind timeout; with this it fails at once.
struct TellAbandoned<'a, C: Connection> {
    client: &'a SessionClient<C>,
    logical_stream_id: Option<u64>,
}

impl<C: Connection> Drop for TellAbandoned<'_, C> {
    fn drop(&mut self) {
        if let Some(id) = self.logical_stream_id {
            let reason = "the edge's service for this stream panicked or was stopped";
            self.client
                .close_stream_now(id, CloseCode::Reset, Some(reason.to_owned()));
        }
    }
}
