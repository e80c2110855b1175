//! The forwarding headers a reverse proxy sends upstream, and whose it believes.
//!
//! The proxy is the trust boundary: a backend must be able to trust what it receives. So
//! by default every client-supplied `Forwarded` (RFC 7239), `X-Forwarded-*` and
//! `X-Real-IP` is dropped, and the proxy sets its own:
//!
//! ```text
//! X-Forwarded-For:   <client IP>
//! X-Forwarded-Host:  <public authority>
//! X-Forwarded-Proto: http | https
//! X-Real-IP:         <client IP>
//! Forwarded:         for=<client IP>;host="<public authority>";proto=http
//! ```
//!
//! (IPv6 addresses in `Forwarded` are bracketed and quoted: `for="[2001:db8::1]"`.)
//!
//! Only when the TCP peer is one of the [`TrustedProxies`] (a load balancer in front of
//! the proxy) are its headers believed: the proxy appends the peer to the
//! `X-Forwarded-For` and `Forwarded` chains, and keeps the peer's `X-Forwarded-Host`,
//! `X-Forwarded-Proto`, other `X-Forwarded-*` and `X-Real-IP` (setting its own where the
//! peer sent none).
//!
//! Set these *after* [`strip_hop_by_hop`](crate::http::proxy::strip_hop_by_hop), so a
//! client cannot name them in `Connection` to have them removed.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::error::Error;
use crate::http::authority::Authority;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The scheme the client used to reach the proxy (`proto` in `Forwarded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Proto {
    /// `"http"` or `"https"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// Addresses and CIDR blocks whose forwarding headers are believed; empty by default.
///
/// ```
/// use backhaul::http::authority::Authority;
/// use backhaul::http::forwarded::{Proto, TrustedProxies};
///
/// let trusted = TrustedProxies::parse(["10.0.0.0/8", "2001:db8::/32"])?;
/// assert!(trusted.contains("10.1.2.3".parse()?));
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("x-forwarded-for", "6.6.6.6".parse()?); // a client's lie
/// let public: Authority = "demo.example.com".parse()?;
/// trusted.set_forwarding_headers(&mut headers, "203.0.113.9".parse()?, &public, Proto::Http);
/// assert_eq!(headers["x-forwarded-for"], "203.0.113.9");
/// assert_eq!(headers["forwarded"], "for=203.0.113.9;host=demo.example.com;proto=http");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

/// An address block: `network` with its first `prefix` bits significant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpNet {
    network: IpAddr,
    prefix: u8,
}

impl TrustedProxies {
    /// No trusted proxies: every client's forwarding headers are replaced.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses IPs and CIDR blocks (`10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`); blank
    /// entries are skipped.
    ///
    /// # Errors
    /// [`Error::InvalidTrustedProxy`] naming the first entry that is neither.
    pub fn parse<I>(entries: I) -> Result<Self, Error>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut nets = Vec::new();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                continue;
            }
            let net =
                IpNet::parse(entry).ok_or_else(|| Error::InvalidTrustedProxy(entry.to_owned()))?;
            nets.push(net);
        }
        Ok(Self(nets))
    }

    /// True if `ip` (IPv4-mapped IPv6 counts as IPv4) is in one of the blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(ip))
    }

    /// Sets the forwarding headers of a request from `peer` (the TCP peer) for
    /// `authority`, reached over `proto`; see the [module docs](self).
    pub fn set_forwarding_headers(
        &self,
        headers: &mut HeaderMap,
        peer: IpAddr,
        authority: &Authority,
        proto: Proto,
    ) {
        let peer = peer.to_canonical();
        let ForwardingValues {
            client,
            authority: authority_value,
            element,
        } = ForwardingValues::new(peer, authority.as_str(), proto);
        let proto_value = HeaderValue::from_static(proto.as_str());
        if self.contains(peer) {
            append_to_chain(headers, X_FORWARDED_FOR, &client);
            append_to_chain(headers, FORWARDED, &element);
            set_if_absent(headers, X_FORWARDED_HOST, authority_value);
            set_if_absent(headers, X_FORWARDED_PROTO, proto_value);
            set_if_absent(headers, X_REAL_IP, client);
            return;
        }
        drop_client_forwarding_headers(headers);
        headers.insert(X_FORWARDED_FOR, client.clone());
        headers.insert(X_FORWARDED_HOST, authority_value);
        headers.insert(X_FORWARDED_PROTO, proto_value);
        headers.insert(X_REAL_IP, client);
        headers.insert(FORWARDED, element);
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

fn is_forwarding_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-forwarded-") || *name == X_REAL_IP || *name == FORWARDED
}

/// Drops the forwarding headers a client sent (all of them: the client is not trusted).
pub(crate) fn drop_client_forwarding_headers(headers: &mut HeaderMap) {
    // Most requests carry none: look before collecting anything.
    if !headers.keys().any(is_forwarding_header) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_forwarding_header(name))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// The values the proxy sets for one request, cut from one buffer: the `Forwarded`
/// element, and inside it the client's IP and the public authority.
struct ForwardingValues {
    client: HeaderValue,
    authority: HeaderValue,
    element: HeaderValue,
}

impl ForwardingValues {
    /// One `Forwarded` element (RFC 7239 §4): IPv6 nodes are bracketed and quoted, and
    /// the host is quoted when it is not a token (a port's colon, an IPv6 literal).
    fn new(peer: IpAddr, authority: &str, proto: Proto) -> Self {
        let mut text = BytesMut::with_capacity(64 + authority.len());
        text.put_slice(b"for=");
        let client = match peer {
            IpAddr::V4(v4) => {
                let start = text.len();
                put_ipv4(&mut text, v4);
                start..text.len()
            }
            IpAddr::V6(v6) => {
                text.put_slice(b"\"[");
                let start = text.len();
                // Writing into a `BytesMut` cannot fail.
                let _ = write!(text, "{v6}");
                let end = text.len();
                text.put_slice(b"]\"");
                start..end
            }
        };
        // A validated authority holds only LDH, dots, digits, brackets and colons:
        // quoting needs no escapes.
        let is_token = authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        text.put_slice(b";host=");
        if !is_token {
            text.put_u8(b'"');
        }
        let host = text.len()..text.len() + authority.len();
        text.put_slice(authority.as_bytes());
        if !is_token {
            text.put_u8(b'"');
        }
        text.put_slice(b";proto=");
        text.put_slice(proto.as_str().as_bytes());
        let text = text.freeze();
        let value = |bytes: Bytes| {
            HeaderValue::from_maybe_shared(bytes).expect("built from validated parts")
        };
        Self {
            client: value(text.slice(client)),
            authority: value(text.slice(host)),
            element: value(text),
        }
    }
}

/// The forwarding fields [`TrustedProxies::set_forwarding_headers`] sets for a peer it does
/// not trust, as field lines (`name: value` and CRLF, in the order it inserts them): what
/// the express lane appends to a head once it dropped the client's own. `peer` is the
/// client's address, `authority` the public authority's text (validated).
pub(crate) fn untrusted_forwarding_lines(peer: IpAddr, authority: &str, proto: Proto) -> Bytes {
    let ForwardingValues {
        client,
        authority,
        element,
    } = ForwardingValues::new(peer.to_canonical(), authority, proto);
    let fields: [(&HeaderName, &[u8]); 5] = [
        (&X_FORWARDED_FOR, client.as_bytes()),
        (&X_FORWARDED_HOST, authority.as_bytes()),
        (&X_FORWARDED_PROTO, proto.as_str().as_bytes()),
        (&X_REAL_IP, client.as_bytes()),
        (&FORWARDED, element.as_bytes()),
    ];
    let size = fields
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let mut lines = BytesMut::with_capacity(size);
    for (name, value) in fields {
        lines.put_slice(name.as_str().as_bytes());
        lines.put_slice(b": ");
        lines.put_slice(value);
        lines.put_slice(b"\r\n");
    }
    lines.freeze()
}

/// Writes `ip` in dotted decimal, as `Display` would, without the formatting machinery.
fn put_ipv4(text: &mut BytesMut, ip: Ipv4Addr) {
    for (index, octet) in ip.octets().into_iter().enumerate() {
        if index > 0 {
            text.put_u8(b'.');
        }
        if octet >= 100 {
            text.put_u8(b'0' + octet / 100);
        }
        if octet >= 10 {
            text.put_u8(b'0' + octet / 10 % 10);
        }
        text.put_u8(b'0' + octet % 10);
    }
}

/// Appends `element` to a comma-separated chain, joining earlier lines of it.
fn append_to_chain(headers: &mut HeaderMap, name: HeaderName, element: &HeaderValue) {
    let mut chain: Vec<u8> = Vec::new();
    for earlier in headers.get_all(&name) {
        chain.extend_from_slice(earlier.as_bytes());
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(element.as_bytes());
    let value = HeaderValue::from_bytes(&chain).unwrap_or_else(|_| element.clone());
    headers.insert(name, value);
}

fn set_if_absent(headers: &mut HeaderMap, name: HeaderName, value: HeaderValue) {
    if !headers.contains_key(&name) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(entries).expect("valid entries")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an IP")
    }

    fn authority(text: &str) -> Authority {
        text.parse().expect("an authority")
    }

    #[test]
    fn trusted_proxies_match_addresses_and_blocks() {
        let proxies = trusted(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", " ::1 ", ""]);
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
        assert!(!TrustedProxies::none().contains(ip("127.0.0.1")));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.1/",
            "10.0.0.0/+8",
            "example.com",
            "10.0.0.0/8/8",
        ] {
            match TrustedProxies::parse([bad]) {
                Err(Error::InvalidTrustedProxy(entry)) => assert_eq!(entry, bad),
                other => panic!("{bad:?} must be refused, got {other:?}"),
            }
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
    fn untrusted_clients_get_only_the_proxys_headers() {
        let mut headers = client_headers();
        TrustedProxies::none().set_forwarding_headers(
            &mut headers,
            ip("203.0.113.9"),
            &authority("demo.localhost:8080"),
            Proto::Http,
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
    fn the_scheme_is_a_parameter() {
        let mut headers = HeaderMap::new();
        TrustedProxies::none().set_forwarding_headers(
            &mut headers,
            ip("192.0.2.1"),
            &authority("demo.localhost"),
            Proto::Https,
        );
        assert_eq!(values(&headers, "x-forwarded-proto"), ["https"]);
        assert_eq!(
            values(&headers, "forwarded"),
            ["for=192.0.2.1;host=demo.localhost;proto=https"]
        );
    }

    #[test]
    fn ipv4_addresses_are_written_as_display_writes_them() {
        for octet in 0..=255u8 {
            for ip in [
                Ipv4Addr::new(octet, 0, 9, 10),
                Ipv4Addr::new(99, octet, 100, 255),
                Ipv4Addr::new(1, 200, octet, 0),
                Ipv4Addr::new(255, 10, 1, octet),
            ] {
                let mut text = BytesMut::new();
                put_ipv4(&mut text, ip);
                assert_eq!(&text[..], ip.to_string().as_bytes());
            }
        }
    }

    #[test]
    fn ipv6_clients_are_quoted_in_forwarded() {
        let none = TrustedProxies::none();
        let mut headers = HeaderMap::new();
        let host = authority("demo.localhost");
        none.set_forwarding_headers(&mut headers, ip("2001:db8::1"), &host, Proto::Http);
        assert_eq!(
            values(&headers, "forwarded"),
            ["for=\"[2001:db8::1]\";host=demo.localhost;proto=http"]
        );
        assert_eq!(values(&headers, "x-forwarded-for"), ["2001:db8::1"]);
        let mut headers = HeaderMap::new();
        let literal = authority("[2001:db8::2]:8080");
        none.set_forwarding_headers(&mut headers, ip("::ffff:192.0.2.1"), &literal, Proto::Http);
        assert_eq!(values(&headers, "x-real-ip"), ["192.0.2.1"]);
        assert_eq!(
            values(&headers, "forwarded"),
            ["for=192.0.2.1;host=\"[2001:db8::2]:8080\";proto=http"]
        );
        // Quoted in `Forwarded` only.
        assert_eq!(values(&headers, "x-forwarded-host"), ["[2001:db8::2]:8080"]);
    }

    #[test]
    fn trusted_proxies_extend_the_chain() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let host = authority("demo.localhost");
        let mut headers = client_headers();
        proxies.set_forwarding_headers(&mut headers, ip("10.0.0.2"), &host, Proto::Http);
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

        // A trusted proxy that sent nothing: the proxy's own values.
        let mut headers = HeaderMap::new();
        proxies.set_forwarding_headers(&mut headers, ip("10.0.0.2"), &host, Proto::Http);
        assert_eq!(values(&headers, "x-forwarded-for"), ["10.0.0.2"]);
        assert_eq!(values(&headers, "x-forwarded-host"), ["demo.localhost"]);
        assert_eq!(values(&headers, "x-real-ip"), ["10.0.0.2"]);
    }

    /// The lines the express lane appends are the fields `set_forwarding_headers` sets for
    /// an untrusted peer, in its order, for IPv4, IPv6 (bracketed and quoted in
    /// `Forwarded`), IPv4-mapped IPv6 (written as IPv4) and authorities with a port.
    #[test]
    fn the_lanes_lines_are_the_fields_set_for_an_untrusted_peer() {
        let cases = [
            ("203.0.113.9", "demo.example.com", Proto::Http),
            ("2001:db8::1", "demo.example.com:8443", Proto::Https),
            ("::ffff:198.51.100.7", "[2001:db8::5]:80", Proto::Http),
            ("10.0.0.255", "a-b.example", Proto::Https),
        ];
        for (peer, host, proto) in cases {
            let mut headers = HeaderMap::new();
            TrustedProxies::none().set_forwarding_headers(
                &mut headers,
                ip(peer),
                &authority(host),
                proto,
            );
            let expected: String = headers
                .iter()
                .map(|(name, value)| format!("{name}: {}\r\n", value.to_str().unwrap()))
                .collect();
            let lines = untrusted_forwarding_lines(ip(peer), host, proto);
            assert_eq!(
                std::str::from_utf8(&lines).unwrap(),
                expected,
                "{peer} {host}"
            );
        }
    }
}
