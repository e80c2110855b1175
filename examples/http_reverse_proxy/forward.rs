//! Forwarding one HTTP request to an upstream and its response back, shared by the relay
//! (public client → edge) and the edge (tunnel → local service).
//!
//! Bodies stream through without buffering. Hop-by-hop headers (RFC 9110 §7.6.1) are
//! dropped both ways, except that a protocol upgrade (WebSocket) keeps its `Connection:
//! upgrade` + `Upgrade`, and once the upstream answers `101`, the two upgraded connections
//! are spliced together.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
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

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// True if the request asks to switch protocols.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including any named in `Connection`. With `keep_upgrade`,
/// `Connection: upgrade` and `Upgrade` survive.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
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
pub async fn forward<C>(
    client: &Client<C, ProxyBody>,
    mut request: Request<ProxyBody>,
    mut downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    response_timeout: Duration,
) -> Result<Response<ProxyBody>, ForwardError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let upgrading = downstream_upgrade.is_some();
    strip_hop_by_hop(request.headers_mut(), upgrading);
    let sent = tokio::time::timeout(response_timeout, client.request(request)).await;
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
    Ok(response.map(boxed::<Incoming>))
}

/// Copies bytes both ways between two upgraded connections until both sides finish.
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
}
