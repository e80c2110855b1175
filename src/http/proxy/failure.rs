//! Failed forwards in words an operator can act on: which edge, which service, what
//! happened, as a 502, 503 or 504 (and the full error chain for the log).
//!
//! The status says whose move it is: 502 for an edge or service that is not there or
//! broke the exchange, 503 for one that refused for load (try again later), 504 for one
//! that is alive but slow. A timeout alone cannot tell slow from gone, so
//! [`Failure::probe`] pings the edge: no pong turns the 504 into a 502.

use std::time::Duration;

use http::{Response, StatusCode};

use super::forward::ForwardError;
use super::{text_response, ProxyBody};
use crate::error::Error;
use crate::http::express::Failure as ExpressFailure;
use crate::protocol::RejectCode;
use crate::session::SessionClient;
use crate::transport::Connection;

/// A failed forward, as the client and the log see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The status to answer with.
    pub status: StatusCode,
    /// For the client: which edge or service, and what happened, in plain words.
    pub message: String,
    /// For the log: the full error chain.
    pub detail: String,
    timed_out: bool,
}

impl Failure {
    /// A failure that is not a timeout.
    pub fn new(status: StatusCode, message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            detail: detail.into(),
            timed_out: false,
        }
    }

    /// A 504 for an upstream that did not answer in time, which [`probe`](Self::probe)
    /// may revise.
    fn timeout(message: String, detail: String) -> Self {
        Self {
            timed_out: true,
            ..Self::new(StatusCode::GATEWAY_TIMEOUT, message, detail)
        }
    }

    /// True if the upstream timed out (a 504 that [`probe`](Self::probe) may revise).
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }

    /// For a timeout, pings the edge behind `client` for up to `probe`: an edge that
    /// answers is slow (the 504 stands, the round trip joins the detail), one that does
    /// not is not responding at all (502). Other failures are returned unchanged.
    pub async fn probe<C: Connection>(
        self,
        client: &SessionClient<C>,
        edge: &str,
        probe: Duration,
    ) -> Self {
        if !self.timed_out {
            return self;
        }
        let detail = self.detail;
        match tokio::time::timeout(probe, client.ping()).await {
            Ok(Ok(rtt)) => Self {
                detail: format!("{detail} (the edge answers pings: {rtt:?})"),
                ..self
            },
            Ok(Err(error)) => Self::new(
                StatusCode::BAD_GATEWAY,
                format!("edge {edge:?} is not responding (it went offline)"),
                format!("{detail}; then the ping failed: {}", error_chain(&error)),
            ),
            Err(_) => Self::new(
                StatusCode::BAD_GATEWAY,
                format!("edge {edge:?} is not responding (no answer to a ping within {probe:?})"),
                format!("{detail}; then no pong within {probe:?}"),
            ),
        }
    }

    /// The `text/plain` response telling the client [`message`](Self::message).
    pub fn into_response(self) -> Response<ProxyBody> {
        text_response(self.status, self.message)
    }
}

/// Maps a failed forward to `service` on `edge`: a timeout is a 504 (see
/// [`Failure::probe`]), a tunnel error goes through [`tunnel_failure`], a request hyper
/// could not send is a 400, a connection closed before the answer a 502.
///
/// ```
/// use std::time::Duration;
/// use backhaul::http::proxy::{forward_failure, ForwardError};
///
/// let failure = forward_failure(&ForwardError::Timeout(Duration::from_secs(3)), "kiosk", "web");
/// assert_eq!(failure.status, http::StatusCode::GATEWAY_TIMEOUT);
/// assert_eq!(failure.message, "edge \"kiosk\" did not answer within 3s");
/// assert!(failure.is_timeout());
/// ```
pub fn forward_failure(error: &ForwardError, edge: &str, service: &str) -> Failure {
    let detail = error_chain(error);
    if let ForwardError::Timeout(limit) = error {
        return Failure::timeout(
            format!("edge {edge:?} did not answer within {limit:?}"),
            detail,
        );
    }
    if let Some(tunnel) = find_cause::<Error>(error) {
        if let Error::Timeout(kind) = tunnel {
            return Failure::timeout(
                format!("edge {edge:?} did not answer in time (waiting for {kind})"),
                detail,
            );
        }
        let (status, message) = tunnel_failure(tunnel, edge, service);
        return Failure::new(status, message, detail);
    }
    let (status, message) = match find_cause::<hyper::Error>(error) {
        Some(http) if http.is_user() => (
            StatusCode::BAD_REQUEST,
            format!("the request could not be sent to edge {edge:?}: {http}"),
        ),
        Some(http) if http.is_incomplete_message() || http.is_canceled() || http.is_closed() => (
            StatusCode::BAD_GATEWAY,
            format!(
                "edge {edge:?} closed the connection before answering (it may have gone offline mid-request)"
            ),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            format!("edge {edge:?} failed: {detail}"),
        ),
    };
    Failure::new(status, message, detail)
}

/// Maps a failed [express](crate::http::express) exchange with `service` on `edge`, as
/// [`forward_failure`] does for the full path: a response timeout is a 504 (see
/// [`Failure::probe`]), a stream that could not be opened goes through
/// [`tunnel_failure`], the rest is a 502.
///
/// ```
/// use std::time::Duration;
/// use backhaul::http::express;
/// use backhaul::http::proxy::express_failure;
///
/// let timeout = express::Failure::ResponseTimeout(Duration::from_secs(3));
/// let failure = express_failure(&timeout, "kiosk", "web");
/// assert_eq!(failure.status, http::StatusCode::GATEWAY_TIMEOUT);
/// assert_eq!(failure.message, "edge \"kiosk\" did not answer within 3s");
/// assert!(failure.is_timeout());
/// ```
pub fn express_failure(failure: &ExpressFailure, edge: &str, service: &str) -> Failure {
    let detail = failure.to_string();
    match failure {
        ExpressFailure::ResponseTimeout(limit) => Failure::timeout(
            format!("edge {edge:?} did not answer within {limit:?}"),
            detail,
        ),
        ExpressFailure::Open(error) => {
            if let Error::Timeout(kind) = error.as_ref() {
                return Failure::timeout(
                    format!("edge {edge:?} did not answer in time (waiting for {kind})"),
                    detail,
                );
            }
            let (status, message) = tunnel_failure(error, edge, service);
            Failure::new(status, message, detail)
        }
        ExpressFailure::Upstream(_) => Failure::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "edge {edge:?} closed the stream before answering (it may have gone offline mid-request)"
            ),
            detail,
        ),
        ExpressFailure::BadResponse(why) => Failure::new(
            StatusCode::BAD_GATEWAY,
            format!("edge {edge:?} answered with a malformed response: {why}"),
            detail,
        ),
        _ => Failure::new(
            StatusCode::BAD_GATEWAY,
            format!("edge {edge:?} failed: {detail}"),
            detail.clone(),
        ),
    }
}

/// Maps a tunnel error (other than a timeout) to a status and a message naming `edge`
/// and `service`: 502 for an edge or service that is not there, 503 when the edge refuses
/// for load. Reasons the edge sent are quoted (`Debug`), so they cannot forge lines.
///
/// ```
/// use backhaul::http::proxy::tunnel_failure;
/// use backhaul::{Error, RejectCode};
///
/// let refused = Error::StreamRejected { code: RejectCode::UnsupportedService, reason: None };
/// let (status, message) = tunnel_failure(&refused, "kiosk", "web");
/// assert_eq!(status, http::StatusCode::BAD_GATEWAY);
/// assert_eq!(message, "edge \"kiosk\" has no service \"web\"");
/// ```
pub fn tunnel_failure(error: &Error, edge: &str, service: &str) -> (StatusCode, String) {
    match error {
        Error::StreamRejected {
            code: RejectCode::UnsupportedService,
            ..
        } => (
            StatusCode::BAD_GATEWAY,
            format!("edge {edge:?} has no service {service:?}"),
        ),
        Error::StreamRejected {
            code: RejectCode::LimitExceeded | RejectCode::ServiceUnavailable,
            reason,
        } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "edge {edge:?} is busy: {}",
                reason.as_deref().map_or_else(
                    || "try again later".to_owned(),
                    |reason| format!("{reason:?}")
                )
            ),
        ),
        Error::StreamRejected { code, reason } => (
            StatusCode::BAD_GATEWAY,
            format!(
                "edge {edge:?} refused the stream to {service:?}: {code}{}",
                reason
                    .as_deref()
                    .map(|reason| format!(" ({reason:?})"))
                    .unwrap_or_default()
            ),
        ),
        Error::StreamAbandoned { reason } => (
            StatusCode::BAD_GATEWAY,
            format!(
                "edge {edge:?} abandoned the stream to {service:?}{}",
                reason
                    .as_deref()
                    .map(|reason| format!(" ({reason:?})"))
                    .unwrap_or_default()
            ),
        ),
        Error::CapacityExceeded { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many requests in flight to edge {edge:?}"),
        ),
        Error::SessionClosed | Error::Disconnected => (
            StatusCode::BAD_GATEWAY,
            format!("edge {edge:?} went offline"),
        ),
        Error::Timeout(kind) => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("edge {edge:?} did not answer in time (waiting for {kind})"),
        ),
        other => (
            StatusCode::BAD_GATEWAY,
            format!("the tunnel to edge {edge:?} failed: {other}"),
        ),
    }
}

/// The first error of type `E` in `error`'s source chain, `error` included. Looks inside
/// `io::Error`s too (their `source` skips the error they wrap).
pub fn find_cause<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        cause = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

/// An error and its sources as one line, `outer: cause: root cause`, skipping a cause
/// whose text its parent already contains (hyper and io errors often repeat).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(current) = cause {
        let text = current.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = current.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_failures_say_what_happened() {
        let rejected = |code, reason: Option<&str>| Error::StreamRejected {
            code,
            reason: reason.map(str::to_owned),
        };
        let cases = [
            (
                rejected(RejectCode::UnsupportedService, None),
                StatusCode::BAD_GATEWAY,
                "edge \"alpha\" has no service \"web\"",
            ),
            (
                rejected(RejectCode::LimitExceeded, Some("full\n")),
                StatusCode::SERVICE_UNAVAILABLE,
                "edge \"alpha\" is busy: \"full\\n\"",
            ),
            (
                rejected(RejectCode::Unauthorized, None),
                StatusCode::BAD_GATEWAY,
                "edge \"alpha\" refused the stream to \"web\"",
            ),
            (
                Error::CapacityExceeded {
                    what: "opens",
                    limit: 1,
                },
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests in flight to edge \"alpha\"",
            ),
            (
                Error::Disconnected,
                StatusCode::BAD_GATEWAY,
                "edge \"alpha\" went offline",
            ),
            (
                Error::StreamAbandoned {
                    reason: Some("panicked\r\nX-Forged: 1".into()),
                },
                StatusCode::BAD_GATEWAY,
                "edge \"alpha\" abandoned the stream to \"web\" (\"panicked\\r\\nX-Forged: 1\")",
            ),
        ];
        for (error, status, message) in cases {
            let (got_status, got_message) = tunnel_failure(&error, "alpha", "web");
            assert_eq!(got_status, status, "{error}");
            assert!(got_message.starts_with(message), "{got_message:?}");
        }
    }

    #[test]
    fn causes_are_found_down_the_chain() {
        let inner = std::io::Error::other(Error::SessionClosed);
        let found = find_cause::<Error>(&inner);
        assert!(matches!(found, Some(Error::SessionClosed)), "{found:?}");
        assert!(find_cause::<hyper::Error>(&inner).is_none());
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_chains_skip_repeated_causes() {
        let error = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(
            error_chain(&error),
            "client error (Connect): connection refused"
        );
        // A tunnel error deep in an io::Error is still found.
        let tunnel = Outer(std::io::Error::other(Error::Timeout(
            crate::TimeoutKind::OpenRequest,
        )));
        assert!(matches!(
            find_cause::<Error>(&tunnel),
            Some(Error::Timeout(_))
        ));
        assert_eq!(
            error_chain(&tunnel),
            "client error (Connect): timed out waiting for open response"
        );
    }

    #[test]
    fn timeouts_are_504_until_probed() {
        let failure = forward_failure(&ForwardError::Timeout(Duration::from_secs(3)), "a", "web");
        assert_eq!(failure.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(failure.is_timeout());
        assert_eq!(failure.detail, "no response head within 3s");
        let other = Failure::new(StatusCode::BAD_GATEWAY, "x", "y");
        assert!(!other.is_timeout());
        assert_eq!(other.into_response().status(), StatusCode::BAD_GATEWAY);
    }
}
