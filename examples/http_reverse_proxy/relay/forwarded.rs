//! The forwarding headers the relay sends to edges, and whom it believes.
//!
//! The relay is the trust boundary: a backend must be able to trust what it receives. By
//! default every client-supplied `Forwarded` (RFC 7239), `X-Forwarded-*` and `X-Real-IP`
//! is dropped, and the relay sets its own:
//!
//! ```text
//! X-Forwarded-For:   <client IP>
//! X-Forwarded-Host:  <public authority>
//! X-Forwarded-Proto: http
//! X-Real-IP:         <client IP>
//! Forwarded:         for=<client IP>;host="<public authority>";proto=http
//! ```
//!
//! (IPv6 addresses in `Forwarded` are bracketed and quoted: `for="[2001:db8::1]"`.)
//!
//! Only when the TCP peer is listed in `--trusted-proxies` (a load balancer in front of
//! the relay) are its headers believed: the relay appends the peer to the
//! `X-Forwarded-For` and `Forwarded` chains, and keeps the peer's `X-Forwarded-Host`,
//! `X-Forwarded-Proto`, other `X-Forwarded-*` and `X-Real-IP` (setting its own where the
//! peer sent none). Edges pass all of these to local services unchanged.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The scheme clients reach the relay with (it has no TLS listener of its own).
const PUBLIC_PROTO: &str = "http";

/// Addresses whose forwarding headers are believed (`--trusted-proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

/// An address block: `network` with its first `prefix` bits significant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpNet {
    network: IpAddr,
    prefix: u8,
}

impl TrustedProxies {
    /// Parses IPs and CIDR blocks (`10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|entry| entry.trim())
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                IpNet::parse(entry).ok_or_else(|| {
                    format!("--trusted-proxies: {entry:?} is not an IP address or CIDR block")
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(ip))
    }
}

impl IpNet {
    fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().ok()?;
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) if prefix.bytes().all(|b| b.is_ascii_digit()) => prefix.parse().ok()?,
            Some(_) => return None,
            None => bits,
        };
        (prefix <= bits).then_some(Self { network, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(
                u128::from(u32::from(net)) << 96,
                u128::from(u32::from(ip)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(u128::from(net), u128::from(ip), self.prefix)
            }
            _ => false,
        }
    }
}

fn same_prefix(a: u128, b: u128, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    a & mask == b & mask
}

/// Sets the forwarding headers for a request from `peer` (the TCP peer) to `authority`.
/// Runs after hop-by-hop stripping, so nothing the client names in `Connection` can
/// remove them.
pub fn set_forwarding_headers(
    headers: &mut HeaderMap,
    peer: IpAddr,
    authority: &str,
    peer_is_trusted: bool,
) {
    let peer = peer.to_canonical();
    if peer_is_trusted {
        append_to_chain(headers, X_FORWARDED_FOR, peer.to_string());
        append_to_chain(headers, FORWARDED, forwarded_element(peer, authority));
        set_if_absent(headers, X_FORWARDED_HOST, authority);
        set_if_absent(headers, X_FORWARDED_PROTO, PUBLIC_PROTO);
        set_if_absent(headers, X_REAL_IP, &peer.to_string());
        return;
    }
    drop_client_forwarding_headers(headers);
    set(headers, X_FORWARDED_FOR, &peer.to_string());
    set(headers, X_FORWARDED_HOST, authority);
    set(headers, X_FORWARDED_PROTO, PUBLIC_PROTO);
    set(headers, X_REAL_IP, &peer.to_string());
    set(headers, FORWARDED, &forwarded_element(peer, authority));
}

fn drop_client_forwarding_headers(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            name.as_str().starts_with("x-forwarded-") || *name == X_REAL_IP || *name == FORWARDED
        })
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// One `Forwarded` element (RFC 7239 §4): IPv6 nodes are bracketed and quoted, and the
/// host is quoted when it is not a token (a port's colon).
fn forwarded_element(peer: IpAddr, authority: &str) -> String {
    let node = match peer {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    // The authority is validated (LDH, dots, digits, brackets, colons): quoting needs no
    // escapes.
    let is_token = authority
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    let host = if is_token {
        authority.to_owned()
    } else {
        format!("\"{authority}\"")
    };
    format!("for={node};host={host};proto={PUBLIC_PROTO}")
}

/// Appends `element` to a comma-separated chain, joining earlier lines of it.
fn append_to_chain(headers: &mut HeaderMap, name: HeaderName, element: String) {
    let mut chain: Vec<u8> = Vec::new();
    for earlier in headers.get_all(&name) {
        chain.extend_from_slice(earlier.as_bytes());
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(element.as_bytes());
    match HeaderValue::from_bytes(&chain) {
        Ok(value) => {
            headers.insert(name, value);
        }
        Err(_) => set(headers, name, &element),
    }
}

fn set_if_absent(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if !headers.contains_key(&name) {
        set(headers, name, value);
    }
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    // Every value here is an IP or a validated authority: always a valid header value.
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(entries: &[&str]) -> TrustedProxies {
        let entries: Vec<String> = entries.iter().map(|e| (*e).to_owned()).collect();
        TrustedProxies::parse(&entries).expect("valid entries")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an IP")
    }

    #[test]
    fn trusted_proxies_match_addresses_and_blocks() {
        let proxies = trusted(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", " ::1 "]);
        assert!(proxies.contains(ip("10.1.2.3")));
        assert!(proxies.contains(ip("192.0.2.7")));
        assert!(!proxies.contains(ip("192.0.2.8")));
        assert!(!proxies.contains(ip("11.0.0.1")));
        assert!(proxies.contains(ip("2001:db8:1::5")));
        assert!(!proxies.contains(ip("2001:db9::5")));
        assert!(proxies.contains(ip("::1")));
        // An IPv4 client on a dual-stack socket shows up IPv4-mapped.
        assert!(proxies.contains(ip("::ffff:10.9.9.9")));
        assert!(trusted(&["0.0.0.0/0"]).contains(ip("8.8.8.8")));
        assert!(!trusted(&[]).contains(ip("127.0.0.1")));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.1/",
            "10.0.0.0/+8",
            "example.com",
            "10.0.0.0/8/8",
        ] {
            assert!(
                TrustedProxies::parse(&[bad.to_owned()]).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    fn client_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "443"),
            ("x-real-ip", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("accept", "*/*"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        headers
    }

    fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|value| value.to_str().expect("ASCII").to_owned())
            .collect()
    }

    #[test]
    fn untrusted_clients_get_only_the_relays_headers() {
        let mut headers = client_headers();
        set_forwarding_headers(
            &mut headers,
            ip("203.0.113.9"),
            "demo.localhost:8080",
            false,
        );
        assert_eq!(values(&headers, "x-forwarded-for"), ["203.0.113.9"]);
        assert_eq!(
            values(&headers, "x-forwarded-host"),
            ["demo.localhost:8080"]
        );
        assert_eq!(values(&headers, "x-forwarded-proto"), ["http"]);
        assert_eq!(values(&headers, "x-real-ip"), ["203.0.113.9"]);
        assert_eq!(
            values(&headers, "forwarded"),
            ["for=203.0.113.9;host=\"demo.localhost:8080\";proto=http"]
        );
        assert!(values(&headers, "x-forwarded-port").is_empty());
        assert_eq!(values(&headers, "accept"), ["*/*"]);
    }

    #[test]
    fn ipv6_clients_are_quoted_in_forwarded() {
        let mut headers = HeaderMap::new();
        set_forwarding_headers(&mut headers, ip("2001:db8::1"), "demo.localhost", false);
        assert_eq!(
            values(&headers, "forwarded"),
            ["for=\"[2001:db8::1]\";host=demo.localhost;proto=http"]
        );
        assert_eq!(values(&headers, "x-forwarded-for"), ["2001:db8::1"]);
        let mut headers = HeaderMap::new();
        set_forwarding_headers(&mut headers, ip("::ffff:192.0.2.1"), "a.localhost", false);
        assert_eq!(values(&headers, "x-real-ip"), ["192.0.2.1"]);
    }

    #[test]
    fn trusted_proxies_extend_the_chain() {
        let mut headers = client_headers();
        set_forwarding_headers(&mut headers, ip("10.0.0.2"), "demo.localhost", true);
        assert_eq!(
            values(&headers, "x-forwarded-for"),
            ["6.6.6.6, 7.7.7.7, 10.0.0.2"]
        );
        assert_eq!(
            values(&headers, "forwarded"),
            ["for=6.6.6.6, for=10.0.0.2;host=demo.localhost;proto=http"]
        );
        assert_eq!(values(&headers, "x-forwarded-host"), ["evil.example"]);
        assert_eq!(values(&headers, "x-forwarded-proto"), ["https"]);
        assert_eq!(values(&headers, "x-forwarded-port"), ["443"]);
        assert_eq!(values(&headers, "x-real-ip"), ["6.6.6.6"]);

        // A trusted proxy that sent nothing: the relay's own values.
        let mut headers = HeaderMap::new();
        set_forwarding_headers(&mut headers, ip("10.0.0.2"), "demo.localhost", true);
        assert_eq!(values(&headers, "x-forwarded-for"), ["10.0.0.2"]);
        assert_eq!(values(&headers, "x-forwarded-host"), ["demo.localhost"]);
        assert_eq!(values(&headers, "x-real-ip"), ["10.0.0.2"]);
    }
}
