//! Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, so a proxy drops
//! them both ways, except that a protocol upgrade (WebSocket) keeps its `Connection:
//! upgrade` + `Upgrade`. `Upgrade: h2c` is not an upgrade a proxy that splices bytes can
//! take part in: it is dropped with its `HTTP2-Settings`, and the request goes on as the
//! plain HTTP/1.1 request it also is.
//!
//! `TE: trailers` is the one hop-by-hop value kept (reduced to exactly that): it says the
//! client takes trailers, and a proxy that streams bodies frame by frame passes trailers
//! on, so it may make the same promise to the next hop. gRPC servers need it, and HTTP/2
//! allows no other `TE`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

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

const H2C: &str = "h2c";

/// True if `name` is one of the fields [`strip_hop_by_hop`] always removes: a head
/// without any has nothing to strip but the fields its `Connection` names, and it has
/// no `Connection`.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}
const TRAILERS: &str = "trailers";

/// The comma-separated tokens of every `name` header.
/// The comma-separated items of every `name` field, trimmed, empty ones left out.
pub(crate) fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// The protocols `Upgrade` asks for, minus `h2c`.
fn upgrade_protocols(headers: &HeaderMap) -> Vec<&str> {
    tokens(headers, header::UPGRADE)
        .filter(|protocol| !protocol.eq_ignore_ascii_case(H2C))
        .collect()
}

/// True if `TE` lists `trailers`: the client takes trailer fields (gRPC clients always
/// say so).
///
/// ```
/// use backhaul::http::proxy::takes_trailers;
///
/// let mut headers = http::HeaderMap::new();
/// assert!(!takes_trailers(&headers));
/// headers.insert("te", "gzip, trailers".parse()?);
/// assert!(takes_trailers(&headers));
/// # Ok::<(), http::header::InvalidHeaderValue>(())
/// ```
pub fn takes_trailers(headers: &HeaderMap) -> bool {
    tokens(headers, header::TE).any(|token| token.eq_ignore_ascii_case(TRAILERS))
}

/// True if the headers ask to switch to a protocol a proxy can splice (not h2c): an
/// `Upgrade` besides h2c and `upgrade` among the `Connection` options.
///
/// ```
/// use backhaul::http::proxy::is_upgrade;
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("connection", "Upgrade".parse()?);
/// headers.insert("upgrade", "websocket".parse()?);
/// assert!(is_upgrade(&headers));
/// headers.insert("upgrade", "h2c".parse()?);
/// assert!(!is_upgrade(&headers));
/// # Ok::<(), http::header::InvalidHeaderValue>(())
/// ```
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    tokens(headers, header::UPGRADE).any(|protocol| !protocol.eq_ignore_ascii_case(H2C))
        && tokens(headers, header::CONNECTION).any(|token| token.eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including any named in `Connection` except Host (a client
/// must not be able to make the next hop lose the request's authority). With
/// `keep_upgrade`, `Connection: upgrade` and `Upgrade` (without h2c) survive. A `TE` that
/// lists `trailers` becomes `TE: trailers`: the proxy passes trailers through, so it may
/// promise the next hop to take them (gRPC servers want it; HTTP/2 allows no other `TE`).
///
/// Stripping twice changes nothing, so a caller can strip, add headers of its own that a
/// client must not be able to remove (forwarding headers, Host), and then hand the request
/// to [`ReverseProxy`](super::ReverseProxy), which strips again.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = keep_upgrade
        .then(|| upgrade_protocols(headers).join(", "))
        .filter(|protocols| !protocols.is_empty())
        .and_then(|protocols| HeaderValue::from_str(&protocols).ok());
    let trailers = takes_trailers(headers);
    // The options are read from copies of the `Connection` values (a reference count
    // each), so the headers they name can be removed by name as they are read; nearly
    // always there is one value, and the copies of the others stay unallocated.
    let mut options = headers.get_all(header::CONNECTION).iter();
    let first = options.next().cloned();
    let others: Vec<HeaderValue> = options.cloned().collect();
    for option in first
        .iter()
        .chain(&others)
        .filter_map(|value| value.to_str().ok())
    {
        for name in option.split(',').map(str::trim) {
            // Removing by `&str` ignores case and skips what is not a header name.
            if !name.is_empty() && !name.eq_ignore_ascii_case(header::HOST.as_str()) {
                headers.remove(name);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static(TRAILERS));
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
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
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::ACCEPT));
    }

    #[test]
    fn te_trailers_is_kept_and_nothing_else_of_te() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("gzip;q=0.5, Trailers"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("te"));
        assert!(takes_trailers(&headers));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers[header::TE], "trailers");
        // Stripping again changes nothing.
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers[header::TE], "trailers");
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
        // Stripping again (after a caller's own headers) keeps the upgrade.
        strip_hop_by_hop(&mut headers, true);
        assert!(is_upgrade(&headers));
        // Without `keep_upgrade` an upgrade is dropped like any hop-by-hop header.
        strip_hop_by_hop(&mut headers, false);
        assert!(headers.is_empty(), "{headers:?}");
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
        strip_hop_by_hop(&mut headers, true);
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
    fn every_connection_line_names_headers_to_drop() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("x-first"));
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static(" , X-Second ,"),
        );
        headers.append(header::CONNECTION, HeaderValue::from_static("x-third"));
        for name in ["x-first", "x-second", "x-third", "x-kept"] {
            headers.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn connection_cannot_remove_host() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("Host, X-Forwarded-For, not a header name"),
        );
        headers.insert(header::HOST, HeaderValue::from_static("demo.localhost"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers[header::HOST], "demo.localhost");
        assert!(!headers.contains_key("x-forwarded-for"));
    }
}
