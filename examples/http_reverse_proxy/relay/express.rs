//! The relay's route for the library's express lane (on unless `--no-express`): plain
//! HTTP/1.1 requests for an edge go straight to it, parsed once: over the edge's session
//! if it is attached here, through the peer relay it is attached to in a cluster (whose
//! peer endpoint splices the stream to the edge untouched).
//!
//! The route makes the same choices as the full path in `public.rs` (the same host
//! resolution, forwarding headers, Host, timeouts, metrics, access log and failure
//! wording, a peer's included); it declines whatever the full path answers itself or
//! explains (an index page, an unknown host, an edge connected nowhere, a directory that
//! cannot be read, a redirect to HTTPS), and the lane then hands the connection to it.

use std::fmt::Write as _;

use backhaul::connector::OpenTarget;
use backhaul::http::authority::{request_authority, Authority};
use backhaul::http::express::{
    Express, Failure, FailureAnswer, Handover, Hooks, Opener, Outcome, RouteFuture, Upstream,
};
use backhaul::http::forwarded::Proto;
use backhaul::http::proxy::{express_failure, Failure as Explained, Timeouts};
use backhaul::relay::{EdgeHandle, Location, RelayId};
use backhaul::{QuinnConnection, SessionClient};
use http::request::Parts;

use super::cluster::{lane_peer_failure, PeerWay};
use super::edges::open_failure;
use super::host::{resolve_host, Target};
use super::public::{record_request, what_only_the_relay_knows};
use super::*;

/// The relay's [`Express`] route for one listener.
pub(super) struct RelayExpress {
    pub(super) state: Arc<RelayState>,
}

impl Express for RelayExpress {
    fn route<'a>(&'a self, head: &'a mut Parts, info: &'a ConnectionInfo) -> RouteFuture<'a> {
        match self.locally(head, info) {
            Local::Routed(upstream) => RouteFuture::ready(upstream),
            // Not attached here: in a cluster, through the relay it is attached to.
            Local::Elsewhere(authority, edge, service) if self.state.cluster.is_some() => {
                RouteFuture::new(self.through_peer((authority, edge, service), head, info))
            }
            Local::Elsewhere(..) => RouteFuture::ready(None),
        }
    }

    fn handed_over(&self, reason: Handover, _info: &ConnectionInfo) {
        self.state
            .metrics
            .express_handovers
            .with_label_values(&[reason.label()])
            .inc();
    }
}

/// What the route decides without waiting.
// Made once per request and taken apart at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Local {
    Routed(Option<Upstream>),
    /// An edge not attached to this relay: the public authority, the edge, the service.
    Elsewhere(Authority, String, String),
}

impl RelayExpress {
    /// The upstream for an edge attached here (`None` for what the full path answers
    /// itself), or the edge to look for elsewhere.
    fn locally(&self, head: &mut Parts, info: &ConnectionInfo) -> Local {
        let state = &self.state;
        if state.express.is_none() {
            return Local::Routed(None);
        }
        let Some(authority) = request_authority(head.version, &head.uri, &head.headers)
            .ok()
            .flatten()
        else {
            return Local::Routed(None);
        };
        let Target::Edge { edge, service } =
            resolve_host(Some(&authority), &state.domain, &state.default_service)
        else {
            return Local::Routed(None);
        };
        let Some(handle) = state.registry.get(edge) else {
            let (edge, service) = (edge.to_owned(), service.to_owned());
            return Local::Elsewhere(authority, edge, service);
        };
        let names = LaneNames::new(edge, service);
        Local::Routed(self.attached(head, info, &authority, handle, names))
    }

    /// The upstream over the session of an edge attached here.
    fn attached(
        &self,
        head: &mut Parts,
        info: &ConnectionInfo,
        authority: &Authority,
        handle: EdgeHandle<QuinnConnection>,
        names: LaneNames,
    ) -> Option<Upstream> {
        // Made to size: `format!` starts small and grows, an allocation more per request.
        let (edge, service) = (names.edge(), names.service());
        let mut key = String::with_capacity(edge.len() + service.len() + 22);
        key.push_str(edge);
        key.push('\n');
        let _ = write!(key, "{}", handle.epoch().get());
        key.push('\n');
        key.push_str(service);
        let connector = handle.connector();
        self.upstream(
            head,
            info,
            authority,
            key,
            connector,
            names,
            Way::Local(handle),
        )
    }

    /// The upstream through the peer relay `edge` is attached to (or here, if it just
    /// came); `None` leaves the request to the full path, which explains why.
    async fn through_peer(
        &self,
        (authority, edge, service): (Authority, String, String),
        head: &mut Parts,
        info: &ConnectionInfo,
    ) -> Option<Upstream> {
        let state = &self.state;
        let cluster = state.cluster.as_ref()?;
        let location = cluster.directory.locate(&edge).await.ok()?;
        let names = LaneNames::new(&edge, &service);
        match location {
            Location::Local(handle) => self.attached(head, info, &authority, handle, names),
            Location::Elsewhere(relay) => {
                let (address, connector) = cluster.connector(&relay, &edge).await.ok()?;
                let forwarded = &state.metrics.requests_forwarded;
                forwarded.with_label_values(&[relay.as_str()]).inc();
                // The far relay splices the stream to its edge untouched: the forwarding
                // headers set here reach the edge as they are.
                let key = format!("{edge}\n{service}\nthrough {address}");
                let way = Way::Peer { relay, address };
                self.upstream(head, info, &authority, key, connector, names, way)
            }
            _ => None,
        }
    }

    /// The request made ready for the edge (forwarding headers, Host), and its upstream
    /// with the relay's pool, timeouts, failure answers, metrics and access log.
    #[allow(clippy::too_many_arguments)]
    fn upstream(
        &self,
        head: &mut Parts,
        info: &ConnectionInfo,
        authority: &Authority,
        key: String,
        opener: impl Into<Opener>,
        names: LaneNames,
        way: Way,
    ) -> Option<Upstream> {
        let state = &self.state;
        let pool = state.express.clone()?;
        let proto = if info.is_secure() {
            Proto::Https
        } else {
            Proto::Http
        };
        let headers = &mut head.headers;
        let trusted = &state.trusted_proxies;
        let peer = info.peer_addr().ip();
        // A trusted peer's chains are extended in the head; anyone else's headers are
        // replaced by the lane, from lines it keeps for the connection.
        let believed = trusted.contains(peer);
        if believed {
            trusted.set_forwarding_headers(headers, peer, authority, proto);
        }
        // Host is the public authority, as on the full path (usually it is already).
        if headers.get(HOST).map(HeaderValue::as_bytes) != Some(authority.as_str().as_bytes()) {
            headers.insert(HOST, authority.to_header_value());
        }
        let span = info_span!(
            "request",
            method = %head.method,
            host = authority.as_str(),
            path = ?head.uri.path(),
            edge = names.edge(),
            service = names.service(),
        );
        let target = OpenTarget::from(names.service());
        // One allocation for both hooks.
        let request = Arc::new(LaneRequest {
            state: Arc::clone(state),
            way,
            names,
            span,
        });
        let upstream = Upstream::new(key, opener, target);
        let upstream = if believed {
            upstream
        } else {
            upstream.with_forwarding_headers(authority, proto)
        };
        Some(
            upstream
                .with_pool(pool)
                .with_timeouts(Timeouts {
                    response: state.request_timeout,
                    body_idle: state.upstream_idle_timeout,
                })
                .with_linger(state.linger)
                .with_hooks(request),
        )
    }
}

/// `edge/service`, in one allocation.
struct LaneNames {
    names: String,
    edge_len: usize,
}

impl LaneNames {
    fn new(edge: &str, service: &str) -> Self {
        let mut names = String::with_capacity(edge.len() + 1 + service.len());
        names.push_str(edge);
        names.push('/');
        names.push_str(service);
        Self {
            names,
            edge_len: edge.len(),
        }
    }

    fn edge(&self) -> &str {
        &self.names[..self.edge_len]
    }

    fn service(&self) -> &str {
        &self.names[self.edge_len + 1..]
    }
}

/// How a lane request reaches its edge.
enum Way {
    /// Attached here: its registry entry (its session, for the ping that explains a
    /// timeout).
    Local(EdgeHandle<QuinnConnection>),
    /// Attached to another relay of the cluster, reached at `address`.
    Peer { relay: RelayId, address: SocketAddr },
}

/// One request on the lane, for its hooks.
struct LaneRequest {
    state: Arc<RelayState>,
    way: Way,
    names: LaneNames,
    span: tracing::Span,
}

impl Hooks for LaneRequest {
    fn answer(self: Arc<Self>, failure: &Failure) -> FailureAnswer {
        let failure = failure.clone();
        Box::pin(async move { self.explain(&failure).await })
    }

    /// Counts and logs the exchange as the full path does.
    fn finished(&self, outcome: &Outcome) {
        let metrics = &self.state.metrics;
        metrics.bytes_to_edge().inc_by(outcome.request_body_bytes);
        metrics
            .bytes_from_edge()
            .inc_by(outcome.response_body_bytes);
        // Counted with the full path's opens to local edges, a failed one by its outcome.
        if let Way::Local(_) = self.way {
            metrics.opens_ok().inc_by(u64::from(outcome.streams_opened));
            if let Some(Failure::Open(error)) = &outcome.failure {
                metrics
                    .opens
                    .with_label_values(&[open_failure(error)])
                    .inc();
            }
        }
        let span = &self.span;
        match &outcome.failure {
            Some(Failure::BodyIdle(idle)) => {
                metrics.upstream_idle_timeouts.inc();
                span.in_scope(|| {
                    warn!(
                        ?idle,
                        "the edge stalled mid-body: aborting the client's response"
                    )
                });
            }
            // Failures answered with a status were logged with their explanation.
            Some(failure) if outcome.status.is_none() => {
                span.in_scope(|| debug!(%failure, "the exchange was cut"));
            }
            _ => {}
        }
        // A connection cut before any answer is no request answered.
        if let Some(status) = outcome.status {
            metrics.express_requests.inc();
            record_request(&self.state, span, status, outcome.elapsed);
        }
    }
}

impl LaneRequest {
    /// The status and words for a failure before any response head, logged.
    async fn explain(&self, failure: &Failure) -> (StatusCode, String) {
        let (edge, service) = (self.names.edge(), self.names.service());
        let explained = match (&self.way, &self.state.cluster) {
            (Way::Local(handle), _) => {
                explain(&self.state, handle.client(), edge, service, failure).await
            }
            (Way::Peer { relay, address }, Some(cluster)) => {
                let way = PeerWay {
                    relay,
                    address: *address,
                };
                lane_peer_failure(cluster, way, failure, edge, service)
            }
            (Way::Peer { .. }, None) => express_failure(failure, edge, service),
        };
        // The chain can hold text from the edge: Debug escapes it.
        self.span.in_scope(|| {
            warn!(
                error = ?explained.detail,
                status = explained.status.as_u16(),
                "forwarding to the edge failed"
            )
        });
        (explained.status, explained.message)
    }
}

/// What went wrong on the way to `edge`, worded as the full path words it.
async fn explain(
    state: &RelayState,
    client: &SessionClient<QuinnConnection>,
    edge: &str,
    service: &str,
    failure: &Failure,
) -> Explained {
    let explained = express_failure(failure, edge, service);
    let broke = matches!(failure, Failure::Upstream(_));
    what_only_the_relay_knows(state, client, edge, explained, broke).await
}
