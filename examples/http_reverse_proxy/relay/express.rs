//! The relay's route for the library's express lane (on unless `--no-express`): plain
//! HTTP/1.1 requests for an edge attached to this relay go straight to it, parsed once.
//!
//! The route makes the same choices as the full path in `public.rs` (the same host
//! resolution, forwarding headers, Host, timeouts, metrics and access log); it declines
//! whatever the full path answers itself or explains (an index page, an unknown host, an
//! edge not attached here, a redirect to HTTPS), and the lane then hands the connection
//! to it.

use backhaul::http::authority::request_authority;
use backhaul::http::express::{
    Express, Failure, FailureAnswer, Handover, Outcome, RouteFuture, Upstream,
};
use backhaul::http::forwarded::Proto;
use backhaul::http::proxy::{express_failure, Failure as Explained, Timeouts};
use backhaul::relay::EdgeHandle;
use backhaul::{QuinnConnection, SessionClient};
use http::request::Parts;

use super::host::{resolve_host, Target};
use super::public::{record_request, what_only_the_relay_knows};
use super::*;

/// The relay's [`Express`] route for one listener.
pub(super) struct RelayExpress {
    pub(super) state: Arc<RelayState>,
}

impl Express for RelayExpress {
    fn route<'a>(&'a self, head: &'a mut Parts, info: &'a ConnectionInfo) -> RouteFuture<'a> {
        Box::pin(std::future::ready(self.upstream(head, info)))
    }

    fn handed_over(&self, reason: Handover, _info: &ConnectionInfo) {
        self.state
            .metrics
            .express_handovers
            .with_label_values(&[reason.label()])
            .inc();
    }
}

impl RelayExpress {
    fn upstream(&self, head: &mut Parts, info: &ConnectionInfo) -> Option<Upstream> {
        let state = &self.state;
        let authority = request_authority(head.version, &head.uri, &head.headers).ok()??;
        let Target::Edge { edge, service } =
            resolve_host(Some(&authority), &state.domain, &state.default_service)
        else {
            return None;
        };
        let pool = state.express.clone()?;
        let handle = state.registry.get(edge)?;
        let proto = if info.is_secure() {
            Proto::Https
        } else {
            Proto::Http
        };
        let headers = &mut head.headers;
        let trusted = &state.trusted_proxies;
        trusted.set_forwarding_headers(headers, info.peer_addr().ip(), &authority, proto);
        // Host is the public authority, as on the full path (usually it is already).
        if headers.get(HOST).map(HeaderValue::as_bytes) != Some(authority.as_str().as_bytes()) {
            headers.insert(HOST, authority.to_header_value());
        }
        let span = info_span!(
            "request",
            method = %head.method,
            host = authority.as_str(),
            path = ?head.uri.path(),
            edge,
            service,
        );
        let key = format!("{edge}\n{}\n{service}", handle.epoch().get());
        let connector = handle.connector();
        // One allocation shared by both hooks.
        let request = Arc::new(LaneRequest {
            state: Arc::clone(state),
            handle,
            names: format!("{edge}/{service}"),
            edge_len: edge.len(),
            span,
        });
        let explain = {
            let request = Arc::clone(&request);
            move |failure: &Failure| -> FailureAnswer {
                let failure = failure.clone();
                Box::pin(async move { request.answer(&failure).await })
            }
        };
        Some(
            Upstream::new(key, connector, service)
                .with_pool(pool)
                .answer_failures_with(explain)
                .with_timeouts(Timeouts {
                    response: state.request_timeout,
                    body_idle: state.upstream_idle_timeout,
                })
                .on_finished(move |outcome| request.finished(outcome)),
        )
    }
}

/// One request on the lane, for its hooks.
struct LaneRequest {
    state: Arc<RelayState>,
    /// The edge's registry entry (its session, for the ping that explains a timeout).
    handle: EdgeHandle<QuinnConnection>,
    /// `edge/service`, in one allocation.
    names: String,
    edge_len: usize,
    span: tracing::Span,
}

impl LaneRequest {
    fn edge(&self) -> &str {
        &self.names[..self.edge_len]
    }

    fn service(&self) -> &str {
        &self.names[self.edge_len + 1..]
    }

    /// Counts and logs the exchange as the full path does.
    fn finished(&self, outcome: &Outcome) {
        let metrics = &self.state.metrics;
        metrics
            .bytes_counter("to_edge")
            .inc_by(outcome.request_body_bytes);
        metrics
            .bytes_counter("from_edge")
            .inc_by(outcome.response_body_bytes);
        // Counted with the full path's opens; a failed open is counted as a failure.
        metrics
            .opens
            .with_label_values(&["ok"])
            .inc_by(u64::from(outcome.streams_opened));
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

    /// The status and words for a failure before any response head, logged.
    async fn answer(&self, failure: &Failure) -> (StatusCode, String) {
        let explained = explain(
            &self.state,
            self.handle.client(),
            self.edge(),
            self.service(),
            failure,
        )
        .await;
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
