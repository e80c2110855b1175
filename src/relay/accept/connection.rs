//! One edge connection, from its first packet to its end: admission slot, QUIC and
//! session handshakes, the `_register` exchange, the registry, and the refusals; or, when
//! its first stream asks to join a registered edge's session, a lane (see [`super::lane`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use quinn::VarInt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, timeout_at, Instant};
use tower::{BoxError, Service, ServiceExt};
use tracing::{debug, info, warn};

use super::lane::{self, LaneEntry, LaneTable};
use super::{
    AcceptStats, CLOSE_SHUTDOWN, CLOSE_UNREGISTERED, REFUSAL_LINGER, SHUTDOWN_GRACE,
    UNREGISTERED_STREAMS,
};
use crate::config::Config;
use crate::error::Error;
use crate::protocol::{CloseCode, Metadata, RejectCode, ServiceId};
use crate::quic::lane::LANE_MAGIC;
use crate::quic::INITIAL_STREAMS;
use crate::relay::admission::{Admission, LogSummary, Refusal, Source};
use crate::relay::auth::{metadata_text, AuthRequest, EDGE_FIELD, REGISTER_SERVICE};
use crate::relay::claims::{Claim, DynClaims, EdgeInstance};
use crate::relay::name::EdgeName;
use crate::relay::registry::{Attachment, Registry};
use crate::relay::shown;
use crate::session::{ClientEvent, Role, Session, SessionClient};
use crate::shards::Shard;
use crate::transport::{Connection, QuinnConnection, StreamLimit};

/// What every connection task shares.
pub(super) struct Shared {
    pub(super) registry: Registry,
    pub(super) admission: Mutex<Admission>,
    pub(super) log_summary: Mutex<LogSummary>,
    pub(super) stats: AcceptStats,
    pub(super) session_config: Config,
    pub(super) register_timeout: Duration,
    pub(super) registered_max_streams: u32,
    pub(super) claims: Arc<dyn DynClaims>,
    pub(super) lanes: LaneTable,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Both tables stay consistent if a holder panics (no panicking code runs mid-update).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Lets a new connection start its handshake (holding a slot), or refuses it before
    /// any TLS work.
    pub(super) fn admit(
        self: &Arc<Self>,
        incoming: &quinn::Incoming,
    ) -> Result<UnregisteredSlot, Refusal> {
        let source = Source::of(incoming.remote_address().ip());
        let decision = {
            let mut admission = lock(&self.admission);
            let decision = admission.admit(source, std::time::Instant::now());
            self.set_unregistered(&admission);
            decision
        };
        let counters = &self.stats.counters;
        let refusal = match decision {
            Ok(()) => {
                AcceptStats::count(&counters.admitted);
                return Ok(UnregisteredSlot {
                    shared: Arc::clone(self),
                    source,
                });
            }
            Err(refusal) => refusal,
        };
        AcceptStats::count(match refusal {
            Refusal::HandshakeRate => &counters.refused_handshake_rate,
            Refusal::UnregisteredCap => &counters.refused_unregistered_cap,
            Refusal::SourceBackoff => &counters.refused_source_backoff,
        });
        if lock(&self.log_summary).note(refusal.label(), source) {
            warn!(%source, reason = %refusal, "refusing QUIC handshakes; more refusals are summarised");
        }
        Err(refusal)
    }

    fn set_unregistered(&self, admission: &Admission) {
        self.stats
            .counters
            .unregistered
            .store(admission.unregistered(), Ordering::Relaxed);
    }

    pub(super) fn log_summaries(&self, interval: Duration) {
        for (kind, count, sources) in lock(&self.log_summary).flush() {
            let sources: Vec<String> = sources.iter().map(ToString::to_string).collect();
            warn!(kind, count, ?interval, ?sources, "refused again (summary)");
        }
    }

    /// Counts a refused registration and backs its source off.
    pub(super) fn penalize(&self, source: Source, claimed: &str) {
        AcceptStats::count(&self.stats.counters.unauthorized);
        let backoff = lock(&self.admission).failed(source, std::time::Instant::now());
        if lock(&self.log_summary).note("unauthorized", source) {
            warn!(
                %source,
                edge = ?shown(claimed),
                ?backoff,
                "registration refused; the source is backed off and more refusals are summarised"
            );
        }
    }
}

/// One slot of the unregistered-connection cap, given back on drop.
pub(super) struct UnregisteredSlot {
    shared: Arc<Shared>,
    source: Source,
}

impl Drop for UnregisteredSlot {
    fn drop(&mut self) {
        let mut admission = lock(&self.shared.admission);
        admission.release(self.source);
        self.shared.set_unregistered(&admission);
    }
}

/// Refuses handshakes the admission refused: over the rate, says nothing at all (the
/// cheapest answer to a flood; an honest peer's retransmission tries again); otherwise
/// tells the peer to go away.
pub(super) fn turn_away(incoming: quinn::Incoming, refusal: Refusal) {
    match refusal {
        Refusal::HandshakeRate => incoming.ignore(),
        Refusal::UnregisteredCap | Refusal::SourceBackoff => incoming.refuse(),
    }
}

/// A registered edge.
struct Registered {
    client: SessionClient<QuinnConnection>,
    events: mpsc::Receiver<ClientEvent>,
    attachment: Attachment,
    /// Lets the edge's lanes join while the session lives.
    _lanes: Option<LaneEntry>,
}

/// What a connection that passed its handshakes turned out to be.
enum Admitted {
    /// An edge, registered (boxed: the lane variant is empty).
    Edge(Box<Registered>),
    /// A lane of a registered edge's session, handled (joined, or refused and closed).
    Lane,
}

/// Why a connection did not register.
enum Refused {
    /// The edge was told why (it gets a round trip to close by itself). The session is
    /// kept until then: dropping it would drop the answer still queued for the peer.
    Answered(SessionClient<QuinnConnection>),
    /// The session ended or failed first.
    Gone,
}

pub(super) async fn handle_connection<A>(
    incoming: Box<quinn::Incoming>,
    slot: UnregisteredSlot,
    shared: Arc<Shared>,
    authenticator: A,
    mut stop: watch::Receiver<bool>,
) where
    A: Service<AuthRequest, Response = EdgeName> + Send + 'static,
    A::Error: Into<BoxError>,
    A::Future: Send,
{
    // The handshakes and the registration hold far more state than an idle edge: boxed,
    // that state is freed once the edge is registered, instead of sizing the task (about
    // 5 KiB) for the edge's whole life. The incoming connection comes boxed for the same
    // reason: the task holds it until it first runs.
    let admitted = Box::pin(admit(*incoming, slot, &shared, authenticator, &mut stop)).await;
    match admitted {
        Some((connection, Some(registered))) => {
            serve_registered(&connection, registered, &mut stop).await;
        }
        // A lane lives as long as its connection: the task stays for it, so that the
        // shard it was placed on (`Acceptor::with_shards`) counts it meanwhile.
        Some((connection, None)) => {
            tokio::select! {
                _ = connection.closed() => {}
                () = stopping(&mut stop) => {}
            }
        }
        None => {}
    }
}

/// The QUIC handshake, the session handshake and the registration, within the deadline;
/// `None` beside the connection for a lane that joined (or was refused) a session.
async fn admit<A>(
    incoming: quinn::Incoming,
    slot: UnregisteredSlot,
    shared: &Arc<Shared>,
    authenticator: A,
    stop: &mut watch::Receiver<bool>,
) -> Option<(quinn::Connection, Option<Registered>)>
where
    A: Service<AuthRequest, Response = EdgeName> + Send + 'static,
    A::Error: Into<BoxError>,
    A::Future: Send,
{
    let counters = &shared.stats.counters;
    let deadline = Instant::now() + shared.register_timeout;
    let source = slot.source;
    let remote = incoming.remote_address();
    let connection = tokio::select! {
        handshake = timeout_at(deadline, incoming) => match handshake {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                AcceptStats::count(&counters.handshake_failed);
                debug!(error = ?error.to_string(), "QUIC handshake failed");
                return None;
            }
            Err(_) => {
                AcceptStats::count(&counters.timed_out);
                debug!("QUIC handshake not finished within the registration timeout");
                return None;
            }
        },
        () = stopping(stop) => return None,
    };
    let registering = register(&connection, shared, authenticator, remote, source, deadline);
    let registered = tokio::select! {
        registered = timeout_at(deadline, registering) => registered,
        () = stopping(stop) => {
            connection.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"relay shutting down");
            return None;
        }
    };
    let registered = match registered {
        Ok(Ok(Admitted::Edge(registered))) => *registered,
        Ok(Ok(Admitted::Lane)) => return Some((connection, None)),
        Ok(Err(refused)) => {
            if let Refused::Answered(_session) = refused {
                // Let the refusal reach the edge before the connection goes: an honest
                // edge closes on reading it; anyone else is closed after the linger.
                let linger = (Instant::now() + REFUSAL_LINGER).min(deadline);
                let _ = timeout_at(linger, connection.closed()).await;
            }
            connection.close(VarInt::from_u32(CLOSE_UNREGISTERED), b"registration failed");
            return None;
        }
        Err(_) => {
            AcceptStats::count(&counters.timed_out);
            debug!("no registration within the registration timeout");
            connection.close(
                VarInt::from_u32(CLOSE_UNREGISTERED),
                b"registration timed out",
            );
            return None;
        }
    };
    drop(slot);
    let name = registered.attachment.name().clone();
    tracing::Span::current().record("edge", name.as_str());
    let shard = registered.attachment.handle().shard().map(Shard::index);
    info!(epoch = %registered.attachment.epoch(), ?shard, "edge registered");
    Some((connection, Some(registered)))
}

/// A registered edge's life: refuses its opens (the relay serves nothing to edges) until
/// its session ends or the acceptor shuts down.
async fn serve_registered(
    connection: &quinn::Connection,
    registered: Registered,
    stop: &mut watch::Receiver<bool>,
) {
    let Registered {
        client,
        events,
        attachment,
        _lanes,
    } = registered;
    // The session answers the edge's opens itself from now on, so the events channel,
    // whose buffer an idle edge would pay for its whole life, is let go.
    let reason = "the relay offers no services to edges";
    client.answer_unserved_opens(RejectCode::UnsupportedService, Some(reason.to_owned()));
    refuse_queued_opens(&client, events, reason).await;
    tokio::select! {
        _ = client.closed() => {}
        () = stopping(stop) => {
            let reason = Some("relay shutting down".to_owned());
            let close = client.close(CloseCode::Normal, reason);
            let _ = Box::pin(timeout(SHUTDOWN_GRACE, close)).await;
            connection.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"relay shutting down");
        }
    }
    let reason = client.closed().await;
    let replaced = !attachment.is_current();
    drop(attachment);
    info!(reason = ?reason.to_string(), replaced, "edge disconnected");
}

/// Refuses the open requests already queued in `events`, then drops it. Closed first, so
/// that none can be queued after the last is taken: later ones are answered by the
/// session (see [`SessionClient::answer_unserved_opens`]).
async fn refuse_queued_opens(
    client: &SessionClient<QuinnConnection>,
    mut events: mpsc::Receiver<ClientEvent>,
    reason: &str,
) {
    events.close();
    while let Ok(event) = events.try_recv() {
        if let ClientEvent::OpenRequest { request_id, .. } = event {
            let refusal = client.reject_open(
                request_id,
                RejectCode::UnsupportedService,
                Some(reason.to_owned()),
            );
            let _ = Box::pin(refusal).await;
        }
    }
}

/// Resolves once the acceptor shuts down.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    // An error means the acceptor is gone: stop too.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The session handshake and the registration exchange, or a lane's join.
async fn register<A>(
    connection: &quinn::Connection,
    shared: &Arc<Shared>,
    authenticator: A,
    remote: SocketAddr,
    source: Source,
    deadline: Instant,
) -> Result<Admitted, Refused>
where
    A: Service<AuthRequest, Response = EdgeName>,
    A::Error: Into<BoxError>,
{
    let counters = &shared.stats.counters;
    let transport = QuinnConnection::new(connection.clone())
        .with_stream_limit(StreamLimit::fixed(UNREGISTERED_STREAMS));
    // The first stream's first bytes tell a session (a control frame's length) from a
    // lane joining one.
    let mut first = [0; LANE_MAGIC.len()];
    let (mut send, mut recv) = match transport.accept_bi().await {
        Ok(Some(stream)) => stream,
        Ok(None) | Err(_) => return Err(Refused::Gone),
    };
    if let Err(error) = recv.inner_mut().read_exact(&mut first).await {
        AcceptStats::count(&counters.handshake_failed);
        debug!(error = ?error.to_string(), "no session handshake");
        return Err(Refused::Gone);
    }
    if first == LANE_MAGIC {
        let (send, recv) = (send.inner_mut(), recv.inner_mut());
        lane::join(shared, connection, send, recv, source, deadline).await;
        return Ok(Admitted::Lane);
    }
    let session = Session::new(transport, Role::Server, shared.session_config.clone());
    let handle = match session.start_accepted(send, recv, &first).await {
        Ok(handle) => handle,
        Err(error) => {
            AcceptStats::count(&counters.handshake_failed);
            debug!(error = ?error.to_string(), "session handshake failed");
            return Err(Refused::Gone);
        }
    };
    let (client, mut events) = SessionClient::with_events(handle);
    let (request_id, service, metadata) =
        next_open_request(&mut events).await.ok_or(Refused::Gone)?;
    let claimed = metadata_text(&metadata, EDGE_FIELD)
        .filter(|_| service.as_str() == REGISTER_SERVICE)
        .map(str::to_owned);
    let Some(edge) = claimed else {
        shared.penalize(source, "");
        let reason = format!(
            "register first: open {REGISTER_SERVICE:?} with metadata {{edge, token}} (got {:?})",
            shown(service.as_str())
        );
        let _ = client
            .reject_open(request_id, RejectCode::Unauthorized, Some(reason))
            .await;
        return Err(Refused::Answered(client));
    };
    let instance = EdgeInstance::from_metadata(&metadata);
    let request = AuthRequest {
        edge: edge.clone(),
        metadata,
        remote,
    };
    let decided: Result<EdgeName, BoxError> =
        authenticator.oneshot(request).await.map_err(Into::into);
    let name = match decided {
        Ok(name) => name,
        Err(error) => {
            let (code, reason) = match unauthorized(error) {
                Ok(reason) => {
                    shared.penalize(source, &edge);
                    (RejectCode::Unauthorized, reason)
                }
                Err(error) => {
                    AcceptStats::count(&counters.auth_unavailable);
                    warn!(edge = ?shown(&edge), error = ?error.to_string(), "authentication failed; the edge is told to retry");
                    let reason = "authentication is unavailable; try again later";
                    (RejectCode::ServiceUnavailable, Some(reason.to_owned()))
                }
            };
            let _ = client.reject_open(request_id, code, reason).await;
            return Err(Refused::Answered(client));
        }
    };
    let attachment = match shared.registry.attach(name.clone(), client.clone()).await {
        Ok(attachment) => attachment,
        Err(Error::EdgeNameTaken { .. }) => {
            return Err(refuse_taken(shared, &client, request_id, &name).await);
        }
        Err(_) => return Err(Refused::Gone),
    };
    // Attached here first, so the claim carries this attach's epoch; the edge is not told
    // it is registered until the cluster agrees, and dropping the attachment undoes it.
    let claim = Claim {
        name: name.clone(),
        instance,
        epoch: attachment.epoch(),
    };
    match shared.claims.claim_boxed(claim).await {
        Ok(()) => {}
        Err(Error::EdgeNameTaken { .. }) => {
            drop(attachment);
            return Err(refuse_taken(shared, &client, request_id, &name).await);
        }
        Err(error) => {
            drop(attachment);
            AcceptStats::count(&counters.directory_unavailable);
            warn!(edge = %name, error = ?error.to_string(), "the name's cluster claim failed; the edge is told to retry");
            let reason = Some("the edge directory is unavailable; try again later".to_owned());
            let _ = client
                .reject_open(request_id, RejectCode::ServiceUnavailable, reason)
                .await;
            return Err(Refused::Answered(client));
        }
    }
    // Proven: from now on the edge may open as many streams as any tunnel, and send as
    // much as its streams' windows allow.
    client.connection().set_stream_limit(StreamLimit::new(
        INITIAL_STREAMS,
        shared.registered_max_streams,
    ));
    connection.set_receive_window(VarInt::MAX);
    // Counted as decided, before the edge hears it: whoever the edge tells (a test, an
    // operator reading metrics) already sees it counted.
    AcceptStats::count(&counters.registered);
    // Lanes may join from the moment the edge hears it is registered.
    let lanes = lane::enter(shared, client.connection());
    if !accept_registration(&client, request_id).await {
        return Err(Refused::Gone);
    }
    Ok(Admitted::Edge(Box::new(Registered {
        client,
        events,
        attachment,
        _lanes: lanes,
    })))
}

/// Refuses an edge whose name a live edge holds, here or elsewhere in the cluster.
async fn refuse_taken(
    shared: &Shared,
    client: &SessionClient<QuinnConnection>,
    request_id: u64,
    name: &EdgeName,
) -> Refused {
    AcceptStats::count(&shared.stats.counters.name_taken);
    warn!(
        edge = %name,
        "refusing a second edge under a name whose holder is alive (two edges share a name?)"
    );
    let reason = Some(format!(
        "edge name {:?} is already connected",
        name.as_str()
    ));
    let _ = client
        .reject_open(request_id, RejectCode::ServiceUnavailable, reason)
        .await;
    Refused::Answered(client.clone())
}

/// The reason of an authenticator's refusal ([`Error::Unauthorized`]), or the error that
/// kept it from deciding.
fn unauthorized(error: BoxError) -> Result<Option<String>, BoxError> {
    match error.downcast::<Error>() {
        Ok(error) => match *error {
            Error::Unauthorized { reason } => Ok(reason),
            other => Err(other.into()),
        },
        Err(error) => Err(error),
    }
}

/// The first open request; pings and the like before it are fine.
async fn next_open_request(
    events: &mut mpsc::Receiver<ClientEvent>,
) -> Option<(u64, ServiceId, Metadata)> {
    loop {
        if let ClientEvent::OpenRequest {
            request_id,
            service,
            metadata,
        } = events.recv().await?
        {
            return Some((request_id, service, metadata));
        }
    }
}

/// Accepts the `_register` open: the edge's open completes once its data stream is
/// bound; the stream carries nothing and is closed at once.
async fn accept_registration(client: &SessionClient<QuinnConnection>, request_id: u64) -> bool {
    let Ok(mut stream) = client.accept_stream(request_id).await else {
        return false;
    };
    let _ = stream.shutdown().await;
    let _ = client
        .close_stream(stream.logical_stream_id(), CloseCode::Normal, None)
        .await;
    true
}
