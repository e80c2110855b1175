//! One accepted connection, served by hyper until it ends, is cut, or the server shuts down.
//!
//! On shutdown a connection with no request in flight is closed at once (a keep-alive
//! client would otherwise hold the drain for its whole idle timeout); the others get
//! hyper's graceful shutdown: the response in progress is finished, then the connection
//! closes.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::time::Instant;

use http::{Request, Response, StatusCode};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};
use tracing::{debug, info};

use super::activity::{Activity, InFlightBody};
use super::watched_io::WatchedIo;
use super::{BoxError, ConnectionInfo, Limits, Observer};
use crate::http::express::{self, Express, Handoff, Handover, LaneContext, Prefixed};

/// What every connection of one server shares.
pub(super) struct Shared {
    pub(super) builder: auto::Builder<TokioExecutor>,
    pub(super) limits: Limits,
    pub(super) observer: Arc<dyn Observer>,
    /// Cancelled when the server shuts down.
    pub(super) stop: CancellationToken,
    /// Set just before `stop` is cancelled: read on every request, where asking the
    /// token would take its lock.
    pub(super) stopping: AtomicBool,
    /// Plain HTTP/1.1 requests go this way first, when set.
    pub(super) express: Option<Arc<dyn Express>>,
    /// TLS first, when the server serves HTTPS.
    #[cfg(feature = "tls")]
    pub(super) tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Shared {
    pub(super) fn secure(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        return false;
    }
}

/// A connection counted open: tells the observer it closed (even if its task is
/// aborted), then frees its slot.
pub(super) struct Open {
    shared: Arc<Shared>,
    info: ConnectionInfo,
    _slot: OwnedSemaphorePermit,
}

impl Open {
    /// Counts `tcp`, just accepted from `peer`, as open (the observer hears of it now).
    pub(super) fn new(
        tcp: &TcpStream,
        peer: SocketAddr,
        shared: &Arc<Shared>,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        let local = tcp
            .local_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let info = ConnectionInfo::new(peer, local, shared.secure());
        shared.observer.connection_opened(&info);
        Self {
            shared: Arc::clone(shared),
            info,
            _slot: slot,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.shared.observer.connection_closed(&self.info);
    }
}

/// Serves `tcp`, counted `open` since `accepted_at`, with `service` under its server's
/// limits; see the [module docs](self).
pub(super) async fn serve_connection<S, B>(
    tcp: TcpStream,
    open: Open,
    accepted_at: Instant,
    service: S,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let _ = tcp.set_nodelay(true);
    let shared = Arc::clone(&open.shared);
    let info = open.info;
    let activity = Activity::new(accepted_at);
    let watched = Arc::clone(&activity);
    let hyper_service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(info);
        let in_flight = watched.request_started(request.version());
        let watched = Arc::clone(&watched);
        let response = service.clone().oneshot(request);
        async move {
            let response = response.await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                watched.upgraded();
            }
            Ok::<_, S::Error>(response.map(|body| InFlightBody::new(body, in_flight)))
        }
    });
    let watched_io = WatchedIo::new(tcp, Arc::clone(&activity), shared.limits);
    #[cfg(feature = "tls")]
    if let Some(tls) = &shared.tls {
        // The handshake's bytes are the first of a request head to the watcher, so a
        // client that stalls it is cut at the header timeout like a slow head.
        match tls.accept(watched_io).await {
            Ok(stream) => {
                let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                serve_io(stream, http2, hyper_service, &shared, &activity, &info).await;
            }
            Err(error) => report_end(&shared, &activity, &info, Err(Box::new(error))),
        }
        drop(open);
        return;
    }
    serve_io(watched_io, false, hyper_service, &shared, &activity, &info).await;
    drop(open);
}

/// Serves `io` (plain or TLS): the express lane first, then hyper for what it leaves.
async fn serve_io<I, H, B>(
    io: I,
    http2: bool,
    hyper_service: H,
    shared: &Shared,
    activity: &Arc<Activity>,
    info: &ConnectionInfo,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: hyper::service::Service<Request<Incoming>, Response = Response<InFlightBody<B>>>
        + Send
        + 'static,
    H::Future: Send + 'static,
    H::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    match express_first(io, shared, activity, *info, http2).await {
        Handoff::Done => report_end(shared, activity, info, Ok(())),
        Handoff::Hyper(io) => drive(TokioIo::new(io), hyper_service, shared, activity, info).await,
    }
}

/// Serves `io` on the express lane if the server has one (and the connection is not
/// HTTP/2 by ALPN); what the lane leaves goes to hyper.
async fn express_first<I>(
    io: I,
    shared: &Shared,
    activity: &Arc<Activity>,
    info: ConnectionInfo,
    http2: bool,
) -> Handoff<I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let express = match &shared.express {
        Some(express) if http2 => {
            express.handed_over(Handover::Http2, &info);
            return Handoff::Hyper(Prefixed::new(bytes::Bytes::new(), io));
        }
        Some(express) => express.as_ref(),
        None => return Handoff::Hyper(Prefixed::new(bytes::Bytes::new(), io)),
    };
    let request_started = || activity.request_started(http::Version::HTTP_11);
    express::serve(
        io,
        LaneContext {
            express,
            info,
            max_head_bytes: shared.limits.max_head_bytes,
            stop: &shared.stop,
            stopping: &shared.stopping,
            request_started: &request_started,
        },
    )
    .await
}

/// Serves HTTP on `io` until the connection ends, is cut, or the server shuts down.
async fn drive<I, H, B>(
    io: I,
    hyper_service: H,
    shared: &Shared,
    activity: &Arc<Activity>,
    info: &ConnectionInfo,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: hyper::service::Service<Request<Incoming>, Response = Response<InFlightBody<B>>>
        + Send
        + 'static,
    H::Future: Send + 'static,
    H::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let connection = shared
        .builder
        .serve_connection_with_upgrades(io, hyper_service);
    let mut connection = std::pin::pin!(connection);
    let ended = tokio::select! {
        result = connection.as_mut() => Some(result),
        () = shared.stop.cancelled() => None,
    };
    let result = match ended {
        Some(result) => result,
        None if activity.is_idle() => Ok(()),
        None => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    report_end(shared, activity, info, result);
}

/// Tells the observer how a connection ended: cut (and why), refused by hyper, failed.
fn report_end(
    shared: &Shared,
    activity: &Activity,
    info: &ConnectionInfo,
    result: Result<(), BoxError>,
) {
    if let Some(cut) = activity.cut() {
        debug!(peer = %info.peer_addr(), reason = %cut, "connection cut");
        shared.observer.connection_cut(info, cut);
    } else if let Err(error) = result {
        account_failure(shared.observer.as_ref(), info, error.as_ref());
    }
}

/// Reports the requests hyper answered by itself (400 for an unparsable head, 431 for one
/// too large, 414 for a URI too long) apart from other failures.
fn account_failure(
    observer: &dyn Observer,
    info: &ConnectionInfo,
    error: &(dyn std::error::Error + 'static),
) {
    let peer = info.peer_addr();
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(hyper_error) = current.downcast_ref::<hyper::Error>() {
            if let Some(status) = automatic_status(hyper_error) {
                info!(%peer, status = status.as_u16(), error = %hyper_error, "malformed request refused");
                observer.request_refused(info, status);
                return;
            }
        }
        cause = current.source();
    }
    debug!(%peer, %error, "connection ended with an error");
    observer.connection_failed(info, error);
}

/// The status hyper sent by itself for a request head it could not accept, if any.
fn automatic_status(error: &hyper::Error) -> Option<StatusCode> {
    if error.is_parse_too_large() {
        // hyper tells a long URI from large headers only in its message.
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
