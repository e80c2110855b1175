//! The QUIC side: admitting connections, registering edges, and counting opens to them.
//!
//! A connection is *unregistered* from its first packet until its edge has proven its
//! token, and until then it is treated as hostile: it holds one admission slot (see
//! `admission`: caps, handshake rate, per-source backoff), its QUIC handshake, session
//! handshake and registration must all finish within --register-timeout, and it may open
//! only [`UNREGISTERED_STREAMS`] streams. That last limit is about memory: quinn keeps a
//! table entry for every stream the peer may open, which at the registered limit
//! ([`DEFAULT_MAX_STREAMS`]) is most of a connection's ~400 KB; a registered edge gets the
//! full limit. A failed registration is answered (so an honest edge can say why it stops),
//! then the connection is closed and its source backed off.

use super::*;

use backhaul::quic::{
    server_config, server_endpoint_with_config, transport_config, DEFAULT_ALPN, DEFAULT_MAX_STREAMS,
};
use quinn::VarInt;

use super::admission::{Refusal, Source};
use crate::Escaped;

/// Streams an unregistered peer may open: the control stream, with room to spare.
const UNREGISTERED_STREAMS: u32 = 4;
/// Bytes an unregistered peer may have unread across its streams: its Hello and its
/// registration need a few hundred. (A registered edge's connection window is unlimited,
/// see `backhaul::quic::transport_config`.)
const UNREGISTERED_RECEIVE_WINDOW: u32 = 64 * 1024;
/// How long a refused edge gets to read the refusal and close the connection itself
/// before the relay closes it. An honest edge closes at once: this is a round trip.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Longest claimed edge name or service quoted back in logs and refusals.
const SHOWN_NAME_LEN: usize = 64;

/// The relay's QUIC endpoint: the library's server settings, except that connections
/// start with [`UNREGISTERED_STREAMS`] and [`UNREGISTERED_RECEIVE_WINDOW`].
pub(super) fn relay_endpoint(
    addr: SocketAddr,
    identity: Identity,
) -> Result<quinn::Endpoint, BoxError> {
    let mut config = server_config(identity, DEFAULT_ALPN)?;
    let mut transport = transport_config(UNREGISTERED_STREAMS);
    transport.receive_window(VarInt::from_u32(UNREGISTERED_RECEIVE_WINDOW));
    config.transport_config(Arc::new(transport));
    server_endpoint_with_config(addr, config)
        .map_err(|e| format!("binding the QUIC listener on {addr}: {e}").into())
}

pub(super) async fn accept_edges(
    endpoint: quinn::Endpoint,
    state: Arc<RelayState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut edges = JoinSet::new();
    let mut summaries = tokio::time::interval(state.limits.log_summary_interval);
    summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trims = tokio::time::interval(MEMORY_TRIM_INTERVAL);
    trims.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trims_due = 0;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => admit(incoming, &state, &mut edges),
                None => break,
            },
            Some(_) = edges.join_next(), if !edges.is_empty() => trims_due = TRIMS_AFTER_CLOSE,
            _ = trims.tick(), if trims_due > 0 => {
                trims_due -= 1;
                return_freed_memory();
            }
            _ = summaries.tick() => log_summaries(&state),
            () = until_stopped(&mut stop) => break,
        }
    }
    endpoint.close(0u32.into(), b"relay shutting down");
    edges.abort_all();
}

/// Lets a new connection start its handshake, or refuses it before any TLS work.
fn admit(incoming: quinn::Incoming, state: &Arc<RelayState>, edges: &mut JoinSet<()>) {
    let remote = incoming.remote_address();
    let source = Source::of(remote.ip());
    let decision = lock(&state.admission).admit(source, Instant::now());
    match decision {
        Ok(()) => {
            let slot = UnregisteredSlot::new(Arc::clone(state), source);
            let span = info_span!("edge", %remote, edge = tracing::field::Empty);
            edges.spawn(handle_edge(incoming, slot, Arc::clone(state)).instrument(span));
        }
        Err(refusal) => {
            let metrics = &state.metrics;
            metrics
                .handshakes_refused
                .with_label_values(&[refusal.label()])
                .inc();
            if refusal == Refusal::SourceBackoff {
                metrics
                    .registrations
                    .with_label_values(&["rate_limited"])
                    .inc();
            }
            if lock(&state.log_summary).note(refusal.label(), source) {
                warn!(
                    %source,
                    reason = refusal.label(),
                    "refusing QUIC handshakes; more refusals are summarised"
                );
            }
            // Over the rate, say nothing at all (the cheapest answer to a flood; an
            // honest peer's retransmission tries again); otherwise a refusal tells the
            // edge to back off.
            match refusal {
                Refusal::HandshakeRate => incoming.ignore(),
                Refusal::UnregisteredCap | Refusal::SourceBackoff => incoming.refuse(),
            }
        }
    }
}

/// How often, at most, the relay hands memory freed by closed connections back to the
/// system…
const MEMORY_TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// …and how many times after a connection task ends: quinn frees a closed connection's
/// state only after its draining period (a few round trips), later than the task ends.
const TRIMS_AFTER_CLOSE: u32 = 5;

/// glibc keeps freed memory in its arenas (one per thread that allocated): after a flood
/// of connections, the relay would stay at its peak size for good. `malloc_trim` returns
/// the free pages; it takes about a millisecond, and runs at most once per
/// [`MEMORY_TRIM_INTERVAL`] after connections closed.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only walks glibc's own heap structures; it has no
        // preconditions and is safe to call from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

fn log_summaries(state: &RelayState) {
    let interval = state.limits.log_summary_interval;
    for (kind, count, sources) in lock(&state.log_summary).flush() {
        let sources: Vec<String> = sources.iter().map(ToString::to_string).collect();
        warn!(kind, count, ?interval, ?sources, "refused again (summary)");
    }
}

/// One slot of the unregistered-connection cap, given back on drop.
struct UnregisteredSlot {
    state: Arc<RelayState>,
    source: Source,
}

impl UnregisteredSlot {
    fn new(state: Arc<RelayState>, source: Source) -> Self {
        let count = lock(&state.admission).unregistered();
        state.metrics.unregistered.set(count as i64);
        Self { state, source }
    }
}

impl Drop for UnregisteredSlot {
    fn drop(&mut self) {
        let mut admission = lock(&self.state.admission);
        admission.release(self.source);
        self.state
            .metrics
            .unregistered
            .set(admission.unregistered() as i64);
    }
}

async fn handle_edge(incoming: quinn::Incoming, slot: UnregisteredSlot, state: Arc<RelayState>) {
    let deadline = tokio::time::Instant::now() + state.limits.register_timeout;
    let connection = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            debug!(error = %Escaped(&error), "QUIC handshake failed");
            return;
        }
        Err(_) => {
            debug!("QUIC handshake not finished within the registration timeout");
            return;
        }
    };
    let registered = tokio::time::timeout_at(
        deadline,
        register_edge(&connection, slot.source, &state, deadline),
    )
    .await;
    let (name, client, mut events) = match registered {
        Ok(Some(registered)) => registered,
        Ok(None) => {
            connection.close(CLOSE_UNREGISTERED.into(), b"registration failed");
            return;
        }
        Err(_) => {
            debug!("no registration within the registration timeout");
            connection.close(CLOSE_UNREGISTERED.into(), b"registration timed out");
            return;
        }
    };
    drop(slot);
    tracing::Span::current().record("edge", name.as_str());
    let id = state.attach(&name, client.clone());
    info!(edge = %name, "edge registered");
    // The relay serves nothing else to edges.
    while let Some(event) = events.recv().await {
        if let ClientEvent::OpenRequest { request_id, .. } = event {
            let reason = Some("the relay offers no services to edges".to_owned());
            let _ = client
                .reject_open(request_id, RejectCode::UnsupportedService, reason)
                .await;
        }
    }
    let reason = client.closed().await;
    state.detach(&name, id);
    info!(edge = %name, reason = %Escaped(&reason), "edge disconnected");
}

type Registered = (
    String,
    SessionClient<QuinnConnection>,
    tokio::sync::mpsc::Receiver<ClientEvent>,
);

/// The session handshake and the registration; `None` if either failed (a refusal has
/// been answered and had its linger).
async fn register_edge(
    connection: &quinn::Connection,
    source: Source,
    state: &RelayState,
    deadline: tokio::time::Instant,
) -> Option<Registered> {
    let session = Session::new(
        QuinnConnection::new(connection.clone()),
        Role::Server,
        state.session_config.clone(),
    );
    let handle = match session.start().await {
        Ok(handle) => handle,
        Err(error) => {
            debug!(error = %Escaped(&error), "session handshake failed");
            return None;
        }
    };
    let (client, mut events) = SessionClient::with_events(handle);
    match register(state, &client, &mut events, source).await {
        Ok(name) => Some((name, client, events)),
        Err(Refused::Answered) => {
            // Let the refusal reach the edge before the connection goes: an honest edge
            // closes on reading it; anyone else is closed after the linger.
            let linger = (tokio::time::Instant::now() + REFUSAL_LINGER).min(deadline);
            let _ = tokio::time::timeout_at(linger, connection.closed()).await;
            None
        }
        Err(Refused::Gone) => None,
    }
}

enum Refused {
    /// The edge was told why.
    Answered,
    /// The session ended first.
    Gone,
}

/// Answers the first open request: a valid registration makes the edge routable; anything
/// else is refused, and the connection goes with it.
async fn register(
    state: &RelayState,
    client: &SessionClient<QuinnConnection>,
    events: &mut tokio::sync::mpsc::Receiver<ClientEvent>,
    source: Source,
) -> Result<String, Refused> {
    let (request_id, service, metadata) = loop {
        match events.recv().await {
            Some(ClientEvent::OpenRequest {
                request_id,
                service,
                metadata,
            }) => break (request_id, service, metadata),
            Some(_) => continue,
            None => return Err(Refused::Gone),
        }
    };
    let credentials = (service.as_str() == REGISTER_SERVICE)
        .then(|| parse_registration(&metadata))
        .flatten();
    let accepted = credentials
        .as_ref()
        .filter(|(edge, token)| valid_edge_name(edge) && state.tokens.check(edge, token));
    let Some((edge, _)) = accepted else {
        let claimed = credentials.map(|(edge, _)| edge).unwrap_or_default();
        refuse_credentials(
            state,
            client,
            request_id,
            source,
            service.as_str(),
            &claimed,
        )
        .await;
        return Err(Refused::Answered);
    };
    if state.holder_answers(edge).await {
        state
            .metrics
            .registrations
            .with_label_values(&["name_taken"])
            .inc();
        warn!(
            edge = %edge,
            "refusing a second edge under a name whose holder is alive (same token: two edges share a name?)"
        );
        let reason = Some(format!("edge name {edge:?} is already connected"));
        let _ = client
            .reject_open(request_id, RejectCode::ServiceUnavailable, reason)
            .await;
        return Err(Refused::Answered);
    }
    // Proven: from now on the edge may open as many streams as any tunnel, and send as
    // much as its streams' windows allow.
    let connection = client.connection().inner();
    connection.set_max_concurrent_bi_streams(VarInt::from_u32(DEFAULT_MAX_STREAMS));
    connection.set_receive_window(VarInt::MAX);
    let stream_id = client.allocate_stream_id();
    let bound = async {
        client.accept_open(request_id, stream_id).await.ok()?;
        let (mut send, _recv) = client.connection().inner().open_bi().await.ok()?;
        client.bind_stream(&mut send, stream_id).await.ok()?;
        let _ = send.finish();
        let _ = client
            .close_stream(stream_id, CloseCode::Normal, None)
            .await;
        Some(())
    };
    bound.await.ok_or(Refused::Gone)?;
    state.metrics.registrations.with_label_values(&["ok"]).inc();
    Ok(edge.clone())
}

/// Refuses bad credentials: counted, the source backed off, logged once per summary
/// interval, and answered with the reason the edge prints.
async fn refuse_credentials(
    state: &RelayState,
    client: &SessionClient<QuinnConnection>,
    request_id: u64,
    source: Source,
    service: &str,
    claimed: &str,
) {
    state
        .metrics
        .registrations
        .with_label_values(&["unauthorized"])
        .inc();
    let backoff = lock(&state.admission).failed(source, Instant::now());
    let claimed = shown(claimed);
    if lock(&state.log_summary).note("unauthorized", source) {
        warn!(
            %source,
            edge = ?claimed,
            service = ?shown(service),
            ?backoff,
            "registration refused; the source is backed off and more refusals are summarised"
        );
    }
    let reason = Some(format!("invalid credentials for edge {claimed:?}"));
    let _ = client
        .reject_open(request_id, RejectCode::Unauthorized, reason)
        .await;
}

/// A peer-given name cut to a length fit for a log line (still to be logged with `?`).
fn shown(name: &str) -> String {
    match name.char_indices().nth(SHOWN_NAME_LEN) {
        Some((cut, _)) => format!("{}…", &name[..cut]),
        None => name.to_owned(),
    }
}

/// A connector that counts opens by outcome.
#[derive(Clone)]
pub(super) struct MeteredConnector {
    pub(super) inner: Connector<QuinnConnection>,
    pub(super) opens: IntCounterVec,
}

type OpenFuture =
    Pin<Box<dyn Future<Output = Result<TunnelStream<QuinnConnection>, Error>> + Send>>;

impl Service<Uri> for MeteredConnector {
    type Response = TunnelStream<QuinnConnection>;
    type Error = Error;
    type Future = OpenFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Service::<Uri>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, uri: Uri) -> OpenFuture {
        let opening = self.inner.call(uri);
        let opens = self.opens.clone();
        Box::pin(async move {
            let result = opening.await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(Error::StreamRejected { .. }) => "rejected",
                Err(Error::Timeout(_)) => "timeout",
                Err(Error::SessionClosed | Error::Disconnected) => "disconnected",
                Err(_) => "error",
            };
            opens.with_label_values(&[outcome]).inc();
            result
        })
    }
}
