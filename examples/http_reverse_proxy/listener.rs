//! Public HTTP connections held to account: a cap on how many are open, accept errors that
//! back off instead of spinning, and timeouts for each way a client can hold a connection
//! without using it.
//!
//! hyper parses requests; this module decides how long a connection may sit at each stage.
//! The stages are told apart by watching the socket ([`WatchedIo`]) and the requests in
//! flight on it ([`Activity`]):
//!
//! - **waiting for a request head** (the connection is new, or bytes of a next request
//!   have arrived): cut after the *header timeout*, counted from the first byte (or from
//!   accept). This is what stops slowloris, a head sent a byte at a time.
//! - **idle between requests** (keep-alive, nothing sent): cut after the *idle timeout*.
//! - **a request in flight**: no read deadline here (the proxy's upstream timeouts bound
//!   it), but writes that make no progress for the *write timeout* cut the connection: a
//!   client that stops reading a response is not allowed to hold it (and the tunnel data
//!   buffered for it) forever.
//! - **upgraded** (WebSocket): only the write timeout applies.
//!
//! On shutdown, connections with no request in flight are closed at once; the others get
//! hyper's graceful shutdown (finish the response, then close).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::{until_stopped, BoxError};
use backhaul::http::proxy::ProxyBody;

/// How long each stage of a connection may last, and how many connections may be open.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; past it, new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// From accept, or from the first byte of a request head, to the whole head.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight and nothing sent.
    pub idle_timeout: Duration,
    /// A write that makes no progress (the client stopped reading).
    pub write_timeout: Duration,
}

impl Default for Limits {
    /// What the relay's flags default to.
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
        }
    }
}

/// Why the relay cut a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    Header,
    Idle,
    Write,
}

impl Cut {
    /// The label counted in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Header => "header_timeout",
            Self::Idle => "idle_timeout",
            Self::Write => "write_timeout",
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Header => "no complete request head within the header timeout",
            Self::Idle => "idle longer than the idle timeout",
            Self::Write => "the client stopped reading for longer than the write timeout",
        })
    }
}

impl std::error::Error for Cut {}

/// What the requests on one connection are doing, shared by its socket and its service.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    /// When the connection last had no request in flight (or was accepted).
    idle_since: Instant,
    /// When the first byte of a next request head arrived, while idle.
    head_started: Option<Instant>,
    /// No request completed yet: the header timeout runs from accept.
    fresh: bool,
    /// HTTP/2 sends frames (pings, settings) without requests: bytes do not start a head.
    multiplexed: bool,
    /// Switched protocols: no request heads any more.
    upgraded: bool,
    /// The socket's reader, woken when the deadline it waits for changes.
    reader: Option<Waker>,
    /// Why the relay cut the connection, if it did.
    cut: Option<Cut>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                idle_since: Instant::now(),
                head_started: None,
                fresh: true,
                multiplexed: false,
                upgraded: false,
                reader: None,
                cut: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request arrived; it is in flight until the guard (kept with its response body)
    /// drops.
    pub fn request_started(self: &Arc<Self>, version: http::Version) -> InFlight {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_started = None;
        state.fresh = false;
        if version == http::Version::HTTP_2 {
            state.multiplexed = true;
        }
        InFlight(Arc::clone(self))
    }

    /// The connection switched protocols (WebSocket): request deadlines no longer apply.
    pub fn upgraded(&self) {
        self.lock().upgraded = true;
    }

    /// True if no request is in flight.
    pub fn is_idle(&self) -> bool {
        self.lock().in_flight == 0
    }

    /// Why the relay cut the connection, if it did. (hyper reports a cut while idle as
    /// a clean close, so the connection's result cannot tell.)
    pub fn cut(&self) -> Option<Cut> {
        self.lock().cut
    }

    fn record_cut(&self, reason: Cut) -> io::Error {
        self.lock().cut = Some(reason);
        io::Error::new(io::ErrorKind::TimedOut, reason)
    }

    fn bytes_read(&self) {
        let mut state = self.lock();
        if state.in_flight == 0 && !state.multiplexed && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
        }
    }

    /// The deadline a reader waiting for bytes is held to, and what passing it means.
    fn read_deadline(&self, limits: &Limits, waker: &Waker) -> Option<(Instant, Cut)> {
        let mut state = self.lock();
        if state.in_flight > 0 || state.upgraded {
            state.reader = Some(waker.clone());
            return None;
        }
        state.reader = None;
        let deadline = match state.head_started {
            Some(started) => (started + limits.header_timeout, Cut::Header),
            None if state.fresh => (state.idle_since + limits.header_timeout, Cut::Header),
            None => (state.idle_since + limits.idle_timeout, Cut::Idle),
        };
        Some(deadline)
    }
}

/// One request in flight on a connection.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let reader = {
            let mut state = self.0.lock();
            state.in_flight -= 1;
            if state.in_flight > 0 {
                return;
            }
            state.idle_since = Instant::now();
            state.reader.take()
        };
        // The reader parked without a deadline while the request ran; now it needs one.
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// A response body that keeps its request counted as in flight until it is sent.
pub struct InFlightBody {
    body: ProxyBody,
    _in_flight: InFlight,
}

impl InFlightBody {
    pub fn new(body: ProxyBody, in_flight: InFlight) -> Self {
        Self {
            body,
            _in_flight: in_flight,
        }
    }
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A socket that fails reads and writes with a [`Cut`] (and resets the connection) once it
/// overstays.
pub struct WatchedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
    limits: Limits,
    read_timer: Pin<Box<Sleep>>,
    read_timer_at: Option<Instant>,
    write_timer: Pin<Box<Sleep>>,
    write_stalled_since: Option<Instant>,
}

impl WatchedIo {
    pub fn new(inner: TcpStream, activity: Arc<Activity>, limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            inner,
            activity,
            limits,
            read_timer: Box::pin(tokio::time::sleep_until(now)),
            read_timer_at: None,
            write_timer: Box::pin(tokio::time::sleep_until(now)),
            write_stalled_since: None,
        }
    }

    /// Ends an overstaying connection with a reset rather than a graceful close: nothing
    /// queued for it is worth delivering (a client that stopped reading would otherwise
    /// keep megabytes of socket buffer in the kernel for minutes), as nginx's
    /// `reset_timedout_connection` does.
    fn cut(&self, reason: Cut) -> io::Error {
        let _ = socket2::SockRef::from(&self.inner).set_linger(Some(Duration::ZERO));
        self.activity.record_cut(reason)
    }

    /// Called when a read is pending: fails it once the stage's deadline passed.
    fn poll_read_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some((deadline, reason)) = self.activity.read_deadline(&self.limits, cx.waker()) else {
            self.read_timer_at = None;
            return Poll::Pending;
        };
        if self.read_timer_at != Some(deadline) {
            self.read_timer.as_mut().reset(deadline);
            self.read_timer_at = Some(deadline);
        }
        match self.read_timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(self.cut(reason)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Tracks write progress: fails the write once it made none for the write timeout.
    /// Only bytes accepted count as progress (a flush that completes at once does not).
    fn on_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
        progressed: impl FnOnce(&R) -> bool,
    ) -> Poll<io::Result<R>> {
        match &result {
            Poll::Ready(Ok(value)) if progressed(value) => {
                self.write_stalled_since = None;
                return result;
            }
            Poll::Ready(_) => return result,
            Poll::Pending => {}
        }
        if self.write_stalled_since.is_none() {
            let now = Instant::now();
            self.write_stalled_since = Some(now);
            self.write_timer
                .as_mut()
                .reset(now + self.limits.write_timeout);
        }
        match self.write_timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(self.cut(Cut::Write))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.bytes_read();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => this.poll_read_deadline(cx).map(Err),
        }
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.on_write(cx, result, |written| *written > 0)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.on_write(cx, result, |written| *written > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.on_write(cx, result, |()| false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Accepts connections; on resource exhaustion (out of file descriptors or memory) it
/// waits, doubling the wait up to a second, instead of retrying in a tight loop.
pub struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    backoff: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl Acceptor {
    pub fn new(listener: TcpListener, name: &'static str) -> Self {
        Self {
            listener,
            name,
            backoff: FIRST_BACKOFF,
        }
    }

    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = FIRST_BACKOFF;
                    return accepted;
                }
                Err(error) if is_exhaustion(&error) => {
                    if self.backoff == FIRST_BACKOFF {
                        warn!(listener = self.name, %error, "cannot accept connections; backing off");
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
                // The connection failed before we took it (reset, aborted): nothing to wait for.
                Err(error) => debug!(listener = self.name, %error, "accept failed"),
            }
        }
    }
}

/// Out of file descriptors, buffers or memory: retrying at once would fail the same way.
fn is_exhaustion(error: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(
        error.raw_os_error(),
        Some(EMFILE | ENFILE | ENOBUFS | ENOMEM)
    )
}

/// Serves HTTP/1 and HTTP/2 on `acceptor` with `limits` until `stop`, then closes idle
/// connections at once and gives the others up to `shutdown_timeout`.
///
/// `make_service` builds each connection's service from the client's address; every
/// request it serves is counted in flight until its response body is sent.
pub async fn serve<F, S, Fut>(
    mut acceptor: Acceptor,
    limits: Limits,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
    shutdown_timeout: Duration,
    make_service: F,
) where
    F: Fn(SocketAddr) -> S,
    S: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let builder = http_builder();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut warned_full = false;
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = until_stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        if slots.available_permits() == 0 && !warned_full {
            warn!(
                limit = limits.max_connections,
                listener = acceptor.name,
                "connection limit reached; new connections wait"
            );
            warned_full = true;
        } else if slots.available_permits() > limits.max_connections / 10 {
            warned_full = false;
        }
        let (tcp, remote) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            () = until_stopped(&mut stop) => break,
        };
        let _ = tcp.set_nodelay(true);
        let activity = Activity::new();
        let service = make_service(remote);
        let watched = Arc::clone(&activity);
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let in_flight = watched.request_started(request.version());
            let watched = Arc::clone(&watched);
            let response = service(request);
            async move {
                let response = response.await;
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    watched.upgraded();
                }
                Ok::<_, Infallible>(response.map(|body| InFlightBody::new(body, in_flight)))
            }
        });
        let io = TokioIo::new(WatchedIo::new(tcp, Arc::clone(&activity), limits));
        let connection = builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        let metrics = metrics.clone();
        let mut stop = stop.clone();
        let name = acceptor.name;
        connections.spawn(async move {
            let _slot = slot;
            let open = metrics.connections_open.with_label_values(&[name]);
            open.inc();
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                result = connection.as_mut() => Some(result),
                () = until_stopped(&mut stop) => None,
            };
            let result = match ended {
                Some(result) => result,
                // Shutting down: a connection with no request in flight closes now.
                None if activity.is_idle() => Ok(()),
                None => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            open.dec();
            if let Some(cut) = activity.cut() {
                metrics
                    .connections_cut
                    .with_label_values(&[cut.label()])
                    .inc();
                debug!(listener = name, %remote, reason = %cut, "connection cut");
            } else if let Err(error) = result {
                account_failure(&metrics, name, remote, error.as_ref());
            }
        });
    }
    drop(acceptor);
    let drained = tokio::time::timeout(shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => info!("all connections finished"),
        Err(_) => {
            warn!(
                unfinished = connections.len(),
                "shutdown timeout: dropping unfinished connections"
            );
            connections.abort_all();
        }
    }
}

/// hyper's server settings for the public side: bounded heads and streams.
fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Request heads (line + headers) over 64 KiB get 431, as nginx's 4 × 8 KiB nearly does.
    builder.http1().max_buf_size(64 * 1024).max_headers(100);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Counts and logs the requests hyper answered by itself (400 for an unparsable head, 431
/// for one too large, 414 for a URI too long), like any other answer.
fn account_failure(
    metrics: &Metrics,
    listener: &str,
    remote: SocketAddr,
    error: &(dyn std::error::Error + 'static),
) {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(hyper_error) = current.downcast_ref::<hyper::Error>() {
            if let Some(status) = automatic_status(hyper_error) {
                metrics.requests.with_label_values(&[status.as_str()]).inc();
                info!(listener, %remote, status = status.as_u16(), error = %hyper_error, "malformed request refused");
                return;
            }
        }
        cause = current.source();
    }
    debug!(listener, %remote, %error, "connection ended with an error");
}

/// The status hyper sent by itself for a request head it could not accept, if any.
fn automatic_status(error: &hyper::Error) -> Option<StatusCode> {
    if error.is_parse_too_large() {
        Some(if error.to_string().contains("URI") {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        })
    } else if error.is_parse() && !error.is_parse_version_h2() {
        Some(StatusCode::BAD_REQUEST)
    } else {
        None
    }
}
