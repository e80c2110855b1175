//! The relay's Prometheus metrics, kept in a registry of its own (not a global), the
//! listeners' observer, and a body wrapper that counts bytes as they stream.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use backhaul::http::server::{ConnectionInfo, Cut, Observer};
use backhaul::tcp::{Spliced, TcpFailure, TcpObserver};
use backhaul::ServiceId;
use bytes::Bytes;
use http::StatusCode;
use hyper::body::{Body, Frame, SizeHint};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Everything the relay measures.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub edges_connected: IntGauge,
    /// Edge QUIC connections (lanes included) on each of the relay's runtimes (shards).
    pub shard_edges: IntGaugeVec,
    pub registrations: IntCounterVec,
    pub unregistered: IntGauge,
    pub handshakes_refused: IntCounterVec,
    /// Further QUIC connections (lanes) offered to edges' sessions, by outcome.
    pub lanes: IntCounterVec,
    pub opens: IntCounterVec,
    pub bytes: IntCounterVec,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// Public requests forwarded to an edge attached to another relay, by that relay.
    pub requests_forwarded: IntCounterVec,
    /// Public TCP connections (`--tcp`) by edge, service and outcome.
    pub tcp_connections: IntCounterVec,
    pub connections_open: IntGaugeVec,
    pub connections_cut: IntCounterVec,
    /// Edge response bodies cut because the edge stalled mid-body.
    pub upstream_idle_timeouts: IntCounter,
    /// Requests answered on the relay's express lane (also counted in `requests`).
    pub express_requests: IntCounter,
    pub express_handovers: IntCounterVec,
    /// Series every request touches, each looked up once.
    hot: Arc<HotSeries>,
}

/// The series of label vectors that every request touches, each resolved on first use:
/// `with_label_values` hashes the labels and takes a lock on every call, some 25 ns per
/// series, five per request. A series appears in the exposition once used, as before.
struct HotSeries {
    to_edge: OnceLock<IntCounter>,
    from_edge: OnceLock<IntCounter>,
    opens_ok: OnceLock<IntCounter>,
    /// By status code, 100 to 599.
    statuses: [OnceLock<IntCounter>; 500],
    /// By class: 1xx to 5xx.
    durations: [OnceLock<Histogram>; 5],
}

impl Default for HotSeries {
    fn default() -> Self {
        Self {
            to_edge: OnceLock::new(),
            from_edge: OnceLock::new(),
            opens_ok: OnceLock::new(),
            statuses: [const { OnceLock::new() }; 500],
            durations: [const { OnceLock::new() }; 5],
        }
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let edges_connected = IntGauge::new(
            "backhaul_edges_connected",
            "Edges registered and connected now",
        )?;
        let shard_edges = IntGaugeVec::new(
            Opts::new(
                "backhaul_shard_edges",
                "Edge QUIC connections (lanes included) served by each of the relay's runtimes (shards; absent with --shared-runtime or one thread)",
            ),
            &["shard"],
        )?;
        let registrations = IntCounterVec::new(
            Opts::new(
                "backhaul_edge_registrations_total",
                "Edge registration attempts by outcome: ok, unauthorized, name_taken, rate_limited (refused at the handshake while the source backs off)",
            ),
            &["outcome"],
        )?;
        let unregistered = IntGauge::new(
            "backhaul_unregistered_connections",
            "QUIC connections admitted that have not registered yet",
        )?;
        let handshakes_refused = IntCounterVec::new(
            Opts::new(
                "backhaul_quic_handshakes_refused_total",
                "New QUIC connections refused before the handshake, by reason",
            ),
            &["reason"],
        )?;
        let opens = IntCounterVec::new(
            Opts::new(
                "backhaul_tunnel_opens_total",
                "Tunnel stream opens to edges by outcome",
            ),
            &["outcome"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "backhaul_proxied_bytes_total",
                "HTTP body bytes proxied, by direction",
            ),
            &["direction"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "backhaul_http_requests_total",
                "Public HTTP requests by status code",
            ),
            &["code"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "backhaul_http_request_duration_seconds",
                "Time from request to response head, by status class",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["class"],
        )?;
        let connections_open = IntGaugeVec::new(
            Opts::new(
                "backhaul_connections_open",
                "HTTP connections open now, by listener",
            ),
            &["listener"],
        )?;
        let connections_cut = IntCounterVec::new(
            Opts::new(
                "backhaul_connections_cut_total",
                "HTTP connections the relay cut, by reason",
            ),
            &["reason"],
        )?;
        let requests_forwarded = IntCounterVec::new(
            Opts::new(
                "backhaul_requests_forwarded_total",
                "Public requests forwarded to an edge attached to another relay of the cluster, by that relay's id",
            ),
            &["relay"],
        )?;
        registry.register(Box::new(requests_forwarded.clone()))?;
        let tcp_connections = IntCounterVec::new(
            Opts::new(
                "backhaul_tcp_connections_total",
                "Public TCP connections by edge, service and outcome: closed (ended cleanly), or why they failed (edge_not_connected, backend_unavailable, tunnel_broken…)",
            ),
            &["edge", "service", "outcome"],
        )?;
        registry.register(Box::new(tcp_connections.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_cut.clone()))?;
        let upstream_idle_timeouts = IntCounter::new(
            "backhaul_upstream_idle_timeouts_total",
            "Edge response bodies aborted because the edge sent nothing for --upstream-idle-timeout",
        )?;
        registry.register(Box::new(edges_connected.clone()))?;
        registry.register(Box::new(shard_edges.clone()))?;
        registry.register(Box::new(registrations.clone()))?;
        registry.register(Box::new(unregistered.clone()))?;
        registry.register(Box::new(handshakes_refused.clone()))?;
        let lanes = IntCounterVec::new(
            Opts::new(
                "backhaul_edge_lanes_total",
                "Further QUIC connections edges joined to their sessions (--lanes), by outcome: joined, refused",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(lanes.clone()))?;
        registry.register(Box::new(opens.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_idle_timeouts.clone()))?;
        let express_requests = IntCounter::new(
            "backhaul_http_express_requests_total",
            "Requests answered on the relay's express lane (a part of backhaul_http_requests_total; the rest took the full path)",
        )?;
        registry.register(Box::new(express_requests.clone()))?;
        let express_handovers = IntCounterVec::new(
            Opts::new(
                "backhaul_http_express_handovers_total",
                "Connections the express lane left to the full path, by reason: the route (an unknown host, the index, an edge elsewhere), http2, version (HTTP/1.0), framing (a chunked request body), expect, upgrade, target_form, host, malformed, head_too_large",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(express_handovers.clone()))?;
        Ok(Self {
            registry,
            edges_connected,
            shard_edges,
            registrations,
            unregistered,
            handshakes_refused,
            lanes,
            opens,
            bytes,
            requests,
            request_duration,
            requests_forwarded,
            tcp_connections,
            connections_open,
            connections_cut,
            upstream_idle_timeouts,
            express_requests,
            express_handovers,
            hot: Arc::new(HotSeries::default()),
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// What the `--tcp` forwarders report.
    pub fn tcp_observer(&self) -> TcpMetrics {
        TcpMetrics {
            connections: self.tcp_connections.clone(),
            bytes: self.bytes.clone(),
        }
    }

    /// Bytes of request bodies sent to edges.
    pub fn bytes_to_edge(&self) -> &IntCounter {
        self.hot
            .to_edge
            .get_or_init(|| self.bytes.with_label_values(&["to_edge"]))
    }

    /// Bytes of response bodies received from edges.
    pub fn bytes_from_edge(&self) -> &IntCounter {
        self.hot
            .from_edge
            .get_or_init(|| self.bytes.with_label_values(&["from_edge"]))
    }

    /// Successful opens of tunnel streams.
    pub fn opens_ok(&self) -> &IntCounter {
        self.hot
            .opens_ok
            .get_or_init(|| self.opens.with_label_values(&["ok"]))
    }

    /// Counts a public request answered with `status` and how long it took.
    pub fn record_request(&self, status: StatusCode, elapsed: Duration) {
        let code = status.as_u16();
        // `StatusCode` is 100 to 999; codes past 599 are counted by lookup.
        match self.hot.statuses.get(usize::from(code).wrapping_sub(100)) {
            Some(slot) => slot
                .get_or_init(|| self.requests.with_label_values(&[status.as_str()]))
                .inc(),
            None => self.requests.with_label_values(&[status.as_str()]).inc(),
        }
        let class = usize::from(code / 100).clamp(1, 5) - 1;
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        self.hot.durations[class]
            .get_or_init(|| self.request_duration.with_label_values(&[CLASSES[class]]))
            .observe(elapsed.as_secs_f64());
    }
}

/// What an HTTP listener (`public`, `admin`) reports: connections open and cut, and the
/// malformed requests hyper answered by itself, counted like any other answer.
pub struct ListenerMetrics {
    open: IntGauge,
    metrics: Metrics,
}

impl ListenerMetrics {
    pub fn new(metrics: &Metrics, listener: &str) -> Self {
        Self {
            open: metrics.connections_open.with_label_values(&[listener]),
            metrics: metrics.clone(),
        }
    }
}

impl Observer for ListenerMetrics {
    fn connection_opened(&self, _: &ConnectionInfo) {
        self.open.inc();
    }

    fn connection_cut(&self, _: &ConnectionInfo, reason: Cut) {
        let cut = &self.metrics.connections_cut;
        cut.with_label_values(&[reason.label()]).inc();
    }

    fn request_refused(&self, _: &ConnectionInfo, status: StatusCode) {
        let requests = &self.metrics.requests;
        requests.with_label_values(&[status.as_str()]).inc();
    }

    fn connection_closed(&self, _: &ConnectionInfo) {
        self.open.dec();
    }
}

/// Counts `--tcp` connections by outcome and their bytes with the HTTP bytes.
pub struct TcpMetrics {
    connections: IntCounterVec,
    bytes: IntCounterVec,
}

impl TcpObserver for TcpMetrics {
    fn closed(&self, edge: &str, service: &ServiceId, carried: Spliced) {
        let labels = [edge, service.as_str(), "closed"];
        self.connections.with_label_values(&labels).inc();
        self.bytes
            .with_label_values(&["to_edge"])
            .inc_by(carried.forward);
        self.bytes
            .with_label_values(&["from_edge"])
            .inc_by(carried.backward);
    }

    fn failed(&self, edge: &str, service: &ServiceId, failure: &TcpFailure) {
        let labels = [edge, service.as_str(), failure.label()];
        self.connections.with_label_values(&labels).inc();
    }
}

/// A body that adds the size of each data frame to a counter as it passes.
pub struct CountingBody<B> {
    inner: B,
    counter: IntCounter,
}

impl<B> CountingBody<B> {
    pub fn new(inner: B, counter: IntCounter) -> Self {
        Self { inner, counter }
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counter.inc_by(data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
