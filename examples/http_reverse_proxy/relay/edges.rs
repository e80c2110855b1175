//! The edges as the HTTP side sees them, on top of the library's `Acceptor`, `Registry`
//! and `EdgeClients`: opens counted by outcome (a layer on each edge's connector), the
//! edge metrics (from the acceptor's counts, at each scrape), and memory handed back after
//! connections close.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use backhaul::connector::Connector;
use backhaul::http::pool::Http1Pool;
use backhaul::http::proxy::Upstream;
use backhaul::http::EdgeClients;
use backhaul::relay::{EdgeHandle, RegistryEvent};
use backhaul::stream::TunnelStream;
use backhaul::{QuinnConnection, SessionClient};
use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::broadcast::{self, error::RecvError};
use tower::{Layer, Service};

use super::*;

/// The edges' pooled HTTP clients, one per session, counting opens.
pub(super) type MeteredClients = EdgeClients<ProxyBody, MeterOpens>;

/// The edges' clients, with opens counted in `metrics` and idle streams bounded by
/// `pool`: HTTP/1.1 ones (the library's lean `Http1Pool`, through `EdgeClients::pool`),
/// or with `http2` HTTP/2 ones (a hyper-util client speaking prior knowledge; for
/// requests `tunnel_version` sends as HTTP/2).
pub(super) fn clients(
    registry: Registry,
    metrics: &Metrics,
    pool: PoolLimits,
    http2: bool,
) -> MeteredClients {
    let builder = EdgeClients::builder(registry).layer(MeterOpens {
        opens: metrics.opens.clone(),
    });
    if !http2 {
        return builder
            .pool_builder(
                Http1Pool::builder()
                    .idle_timeout(pool.idle_timeout)
                    .max_idle_per_authority(pool.max_idle),
            )
            .build();
    }
    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_idle_timeout(pool.idle_timeout)
        .pool_max_idle_per_host(pool.max_idle)
        .http2_only(true);
    builder.client_builder(client).build()
}

/// A connected edge and the HTTP client (HTTP/1.1 or HTTP/2) for one request.
#[derive(Clone)]
pub(super) struct EdgeEntry {
    pub(super) handle: EdgeHandle,
    pub(super) http: Upstream<MeteredConnector>,
}

impl EdgeEntry {
    pub(super) fn client(&self) -> &SessionClient<QuinnConnection> {
        self.handle.client()
    }
}

/// Follows the registry: returns freed memory after edge sessions or unregistered
/// connections closed. Runs until aborted.
pub(super) async fn follow_edges(
    state: Arc<RelayState>,
    mut events: broadcast::Receiver<RegistryEvent>,
) {
    let mut trims = tokio::time::interval(MEMORY_TRIM_INTERVAL);
    trims.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trims_due = 0;
    let mut unregistered = 0;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(RegistryEvent::Detached { .. }) | Err(RecvError::Lagged(_)) => {
                    trims_due = TRIMS_AFTER_CLOSE;
                }
                Ok(_) => {}
                Err(RecvError::Closed) => break,
            },
            _ = trims.tick() => {
                // Fewer unregistered connections: some closed (refused, timed out) or
                // registered; either way a flood's memory may be free.
                let now = state.accept_stats.snapshot().unregistered;
                if now < unregistered {
                    trims_due = TRIMS_AFTER_CLOSE;
                }
                unregistered = now;
                if trims_due > 0 {
                    trims_due -= 1;
                    return_freed_memory();
                }
            }
        }
    }
}

/// Brings the edge metrics up to date with the registry and the acceptor's counts; run
/// before each scrape. Counters are raised by the difference, so they stay counters.
pub(super) fn sync_edge_metrics(state: &RelayState) {
    let _serialised = lock(&state.metrics_sync);
    let metrics = &state.metrics;
    let counts = state.accept_stats.snapshot();
    metrics
        .edges_connected
        .set(i64::try_from(state.registry.len()).unwrap_or(i64::MAX));
    metrics
        .unregistered
        .set(i64::try_from(counts.unregistered).unwrap_or(i64::MAX));
    if let Some(shards) = &state.shards {
        for (index, count) in shards.edge_counts().into_iter().enumerate() {
            metrics
                .shard_edges
                .with_label_values(&[index.to_string().as_str()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
    for (outcome, count) in [
        ("ok", counts.registered),
        ("unauthorized", counts.unauthorized),
        // Refused at the handshake while the source backs off.
        ("rate_limited", counts.refused_source_backoff),
        ("name_taken", counts.name_taken),
    ] {
        raise(&metrics.registrations.with_label_values(&[outcome]), count);
    }
    for (outcome, count) in [
        ("joined", counts.lanes_joined),
        ("refused", counts.lanes_refused),
    ] {
        raise(&metrics.lanes.with_label_values(&[outcome]), count);
    }
    for (reason, count) in [
        ("handshake_rate", counts.refused_handshake_rate),
        ("unregistered_cap", counts.refused_unregistered_cap),
        ("source_backoff", counts.refused_source_backoff),
    ] {
        raise(
            &metrics.handshakes_refused.with_label_values(&[reason]),
            count,
        );
    }
}

fn raise(counter: &IntCounter, count: u64) {
    let shown = counter.get();
    if count > shown {
        counter.inc_by(count - shown);
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

/// Counts each edge connector's opens by outcome.
#[derive(Clone)]
pub(super) struct MeterOpens {
    opens: IntCounterVec,
}

impl Layer<Connector<QuinnConnection>> for MeterOpens {
    type Service = MeteredConnector;

    fn layer(&self, inner: Connector<QuinnConnection>) -> MeteredConnector {
        MeteredConnector {
            inner,
            opens: self.opens.clone(),
        }
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
            let outcome = result.as_ref().map_or_else(open_failure, |_| "ok");
            opens.with_label_values(&[outcome]).inc();
            result
        })
    }
}

/// The `outcome` label of `backhaul_tunnel_opens_total` for an open that failed with
/// `error` (the full path's connector and the express lane count alike).
pub(super) fn open_failure(error: &Error) -> &'static str {
    match error {
        Error::StreamRejected { .. } => "rejected",
        Error::Timeout(_) => "timeout",
        Error::SessionClosed | Error::Disconnected => "disconnected",
        _ => "error",
    }
}
