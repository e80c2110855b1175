//! Forwarding one HTTP request to an upstream and its response back, shared by the relay
//! (public client → edge) and the edge (tunnel → local service).
//!
//! Bodies stream through without buffering. Hop-by-hop headers (RFC 9110 §7.6.1) are
//! dropped both ways, except that a protocol upgrade (WebSocket) keeps its `Connection:
//! upgrade` + `Upgrade`, and once the upstream answers `101`, the two upgraded connections
//! are spliced together. `Upgrade: h2c` is not an upgrade the proxy takes part in: it is
//! dropped with its `HTTP2-Settings`, and the request goes on as plain HTTP/1.1.
//!
//! Response bodies from the upstream have an idle limit (time between frames while the
//! downstream waits for one): a stalled upstream makes the body fail, which aborts the
//! downstream connection instead of holding it forever. Upgraded connections have none.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::Connect;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use tokio::time::Sleep;
use tracing::{debug, warn};

use crate::BoxError;

/// The body type both directions are converted to.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Converts any body into a [`ProxyBody`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// A short plain-text response.
pub fn text_response(status: StatusCode, message: impl Into<String>) -> Response<ProxyBody> {
    let mut response = Response::new(boxed(Full::new(Bytes::from(message.into() + "\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    // Belongs to an `Upgrade: h2c` (RFC 7540 §3.2), which is never passed on.
    HeaderName::from_static("http2-settings"),
];

/// The HTTP/2 cleartext upgrade: a proxy that splices bytes cannot take part in it, so it
/// is dropped and the request served as the HTTP/1.1 request it also is.
const H2C: &str = "h2c";

/// The protocols a request's `Upgrade` asks for, minus `h2c`.
fn upgrade_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|protocol| !protocol.is_empty() && !protocol.eq_ignore_ascii_case(H2C))
        .map(str::to_owned)
        .collect()
}

/// True if the request asks to switch to a protocol the proxy can splice (not h2c).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    !upgrade_protocols(headers).is_empty()
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including any named in `Connection` except Host (a
/// client must not be able to make the next hop lose the request's authority). With
/// `keep_upgrade`, `Connection: upgrade` and `Upgrade` (without h2c) survive.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = keep_upgrade
        .then(|| upgrade_protocols(headers).join(", "))
        .filter(|protocols| !protocols.is_empty())
        .and_then(|protocols| HeaderValue::from_str(&protocols).ok());
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| name != header::HOST)
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// Points `request` at `authority` (keeping path and query) over plain `http`.
pub fn retarget(request: &mut Request<ProxyBody>, authority: &str) -> Result<(), http::Error> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    let uri: Uri = format!("http://{authority}{path}").parse()?;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_11;
    Ok(())
}

/// How long an upstream may take.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    /// Until the response head.
    pub response: Duration,
    /// Between two frames of the response body, counted from when the downstream asks
    /// for the next one (so a slow client does not count against the upstream).
    pub body_idle: Duration,
}

/// Called once when an upstream response body goes idle too long (to log and count).
pub type IdleHook = Arc<dyn Fn(Duration) + Send + Sync>;

/// Why forwarding failed.
#[derive(Debug)]
pub enum ForwardError {
    /// The upstream did not answer in time.
    Timeout,
    /// The upstream (or the way to it) failed.
    Upstream(hyper_util::client::legacy::Error),
}

/// Sends `request` upstream with `client` and returns the upstream's response, splicing
/// the connections if it switches protocols. `request` must already be retargeted.
///
/// Hop-by-hop headers are stripped first, then `set_headers` runs: headers the proxy adds
/// itself (forwarding headers, Host) can therefore never be removed by a `Connection`
/// header the client chose.
pub async fn forward<C>(
    client: &Client<C, ProxyBody>,
    mut request: Request<ProxyBody>,
    mut downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    set_headers: impl FnOnce(&mut HeaderMap),
    timeouts: UpstreamTimeouts,
    on_idle: IdleHook,
) -> Result<Response<ProxyBody>, ForwardError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let upgrading = downstream_upgrade.is_some();
    strip_hop_by_hop(request.headers_mut(), upgrading);
    set_headers(request.headers_mut());
    let sent = tokio::time::timeout(timeouts.response, client.request(request)).await;
    let mut response = match sent {
        Err(_) => return Err(ForwardError::Timeout),
        Ok(Err(error)) => return Err(ForwardError::Upstream(error)),
        Ok(Ok(response)) => response,
    };
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        if let Some(downstream) = downstream_upgrade.take() {
            let upstream = hyper::upgrade::on(&mut response);
            tokio::spawn(splice(downstream, upstream));
        }
    }
    strip_hop_by_hop(response.headers_mut(), switching);
    Ok(response.map(|body| boxed(IdleTimeoutBody::new(body, timeouts.body_idle, on_idle))))
}

/// Copies bytes both ways between two upgraded connections until both sides finish.
/// No idle limit here: a WebSocket may legitimately stay quiet for a long time.
async fn splice(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            warn!(%error, "upgrade failed");
            return;
        }
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((down, up)) => debug!(
            to_upstream = down,
            to_downstream = up,
            "upgraded connection ended"
        ),
        Err(error) => debug!(%error, "upgraded connection ended with an error"),
    }
}

/// The body error when an upstream stalls mid-body.
#[derive(Debug)]
pub struct BodyIdle(pub Duration);

impl std::fmt::Display for BodyIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the upstream sent nothing for {:?} mid-body", self.0)
    }
}

impl std::error::Error for BodyIdle {}

/// A body that fails if its inner body produces no frame within `idle` of being asked for
/// one. Failing (rather than ending) matters: the server then aborts the downstream
/// connection, so a client never takes a truncated body for a complete one.
pub struct IdleTimeoutBody<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// Whether the timer is armed for the frame being waited for.
    waiting: bool,
    timed_out: bool,
    on_idle: IdleHook,
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, idle: Duration, on_idle: IdleHook) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
            timed_out: false,
            on_idle,
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(None);
        }
        if !this.waiting {
            let deadline = tokio::time::Instant::now() + this.idle;
            this.timer.as_mut().reset(deadline);
            this.waiting = true;
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            this.timed_out = true;
            (this.on_idle)(this.idle);
            return Poll::Ready(Some(Err(Box::new(BodyIdle(this.idle)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-custom"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-custom", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::ACCEPT));
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "upgrade");
    }

    #[test]
    fn h2c_upgrades_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAoAAAAAIAAAAA"),
        );
        assert!(!is_upgrade(&headers));
        strip_hop_by_hop(&mut headers, false);
        assert!(headers.is_empty(), "{headers:?}");

        // Offered beside a protocol the proxy can splice, only h2c goes.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c, websocket"));
        assert!(is_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::UPGRADE], "websocket");
    }

    #[test]
    fn connection_cannot_remove_host() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("Host, X-Forwarded-For"),
        );
        headers.insert(header::HOST, HeaderValue::from_static("demo.localhost"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers[header::HOST], "demo.localhost");
        assert!(!headers.contains_key("x-forwarded-for"));
    }

    #[test]
    fn error_chains_skip_repeated_causes() {
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
        let error = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(
            error_chain(&error),
            "client error (Connect): connection refused"
        );
    }

    /// A body fed by the test, frame by frame.
    struct FedBody(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for FedBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|data| Ok(Frame::data(data))))
        }
    }

    fn idle_body(
        idle: Duration,
    ) -> (
        tokio::sync::mpsc::Sender<Bytes>,
        IdleTimeoutBody<FedBody>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let (feed, frames) = tokio::sync::mpsc::channel(16);
        let fired = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hook: IdleHook = {
            let fired = Arc::clone(&fired);
            Arc::new(move |_| {
                fired.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        };
        (
            feed,
            IdleTimeoutBody::new(FedBody(frames), idle, hook),
            fired,
        )
    }

    #[tokio::test]
    async fn a_stalled_body_fails_after_the_idle_limit() {
        let idle = Duration::from_millis(200);
        let (feed, mut body, fired) = idle_body(idle);
        feed.send(Bytes::from_static(b"half")).await.unwrap();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().unwrap(), "half");
        let started = std::time::Instant::now();
        let error = body
            .frame()
            .await
            .expect("an error, not the end")
            .unwrap_err();
        assert!(error.downcast_ref::<BodyIdle>().is_some(), "{error}");
        assert!(started.elapsed() >= idle);
        assert_eq!(fired.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(body.frame().await.is_none());
        drop(feed);
    }

    #[tokio::test]
    async fn a_body_that_keeps_sending_or_a_slow_reader_is_not_cut() {
        let idle = Duration::from_millis(300);
        let (feed, mut body, fired) = idle_body(idle);
        tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = feed.send(Bytes::from_static(b"tick")).await;
            }
        });
        let mut ticks = 0;
        while let Some(frame) = body.frame().await {
            frame.expect("no idle error");
            ticks += 1;
            // The reader is slower than the idle limit: not the upstream's fault.
            if ticks == 2 {
                tokio::time::sleep(idle * 3).await;
            }
        }
        assert_eq!(ticks, 6);
        assert_eq!(fired.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
