//! Which authority (`host[:port]`) an HTTP request is for, parsed strictly.
//!
//! A proxy that routes by Host passes that same Host on to its backend, so a loose parse
//! is a hole: a Host such as `web/redirect?.demo.example` could both route somewhere and
//! carry path or query characters to the backend. [`Authority`] therefore accepts only
//! what RFC 9110 §7.2 and RFC 3986 §3.2 allow a server name to be: DNS labels or an IP
//! literal, and an optional numeric port; no userinfo, path, query, fragment or
//! percent-encoding.
//!
//! [`request_authority`] decides which authority counts (RFC 9112 §3.2, RFC 9113 §8.3.1):
//! the request target's own when it has one (HTTP/1.1 absolute-form, HTTP/2 `:authority`),
//! else the Host header; an HTTP/1.1 request without exactly one valid Host is malformed.
//! Its error is this module's [`AuthorityError`] rather than the crate's `Error`: every
//! variant is the same answer (400 Bad Request) to a client, not a session failure.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use http::header::HOST;
use http::{HeaderMap, HeaderValue, Uri, Version};

/// Longest host name DNS allows (RFC 1035 §2.3.4), in text form.
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// A validated `host[:port]`.
///
/// ```
/// use backhaul::http::authority::{Authority, Host};
///
/// let authority: Authority = "Demo.Example.com:8080".parse()?;
/// assert_eq!(authority.as_str(), "Demo.Example.com:8080");
/// assert_eq!(authority.host(), &Host::Name("demo.example.com".into()));
/// assert_eq!(authority.port(), Some(8080));
/// assert!("web/x?.example.com".parse::<Authority>().is_err());
/// # Ok::<(), backhaul::http::authority::AuthorityError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// As the client wrote it; only LDH characters, dots, digits, brackets and colons.
    /// Kept as a header value: one read from a Host field shares that field's bytes, and
    /// passing it on as Host or X-Forwarded-Host copies nothing.
    text: HeaderValue,
    host: Host,
    port: Option<u16>,
}

/// The host part of an [`Authority`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// DNS labels, lowercased, without a trailing dot.
    Name(String),
    /// An IPv4 address or a bracketed IPv6 literal.
    Ip(IpAddr),
}

/// Why a request's authority is refused; each is a 400 Bad Request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// An HTTP/1.1 request without a Host header.
    #[error("an HTTP/1.1 request needs a Host header")]
    MissingHost,
    /// More than one Host header.
    #[error("more than one Host header")]
    DuplicateHost,
    /// A Host or target authority that is not `host[:port]` (the text, lossily decoded).
    #[error("invalid host {0:?}: expected DNS labels or an IP address, and an optional port")]
    Invalid(String),
    /// An absolute target whose scheme is neither `http` nor `https`.
    #[error("only http:// and https:// targets are served")]
    Scheme,
}

impl Authority {
    /// Parses `host[:port]` strictly; see the [module docs](self).
    pub fn parse(text: &str) -> Result<Self, AuthorityError> {
        Self::parse_strict(text).ok_or_else(|| AuthorityError::Invalid(text.to_owned()))
    }

    fn parse_strict(text: &str) -> Option<Self> {
        Self::checked(text, || HeaderValue::from_str(text).ok())
    }

    /// Checks `text` and keeps it as `value()` gives it.
    fn checked(text: &str, value: impl FnOnce() -> Option<HeaderValue>) -> Option<Self> {
        let (host, port) = split_port(text)?;
        let host = if let Some(literal) = host.strip_prefix('[') {
            let literal = literal.strip_suffix(']')?;
            Host::Ip(IpAddr::V6(literal.parse::<Ipv6Addr>().ok()?))
        } else if let Ok(v4) = host.parse::<Ipv4Addr>() {
            Host::Ip(IpAddr::V4(v4))
        } else {
            Host::Name(dns_name(host)?)
        };
        Some(Self {
            text: value()?,
            host,
            port,
        })
    }

    /// The authority as written (valid as a header value and safe to log).
    pub fn as_str(&self) -> &str {
        // Checked ASCII when made: the check here cannot fail.
        self.text.to_str().unwrap_or_default()
    }

    /// The host, normalised.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port, if one was given.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The authority as a header value (for Host or X-Forwarded-Host).
    pub fn to_header_value(&self) -> HeaderValue {
        self.text.clone()
    }
}

impl FromStr for Authority {
    type Err = AuthorityError;

    fn from_str(text: &str) -> Result<Self, AuthorityError> {
        Self::parse(text)
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Splits an optional `:port` off; a port is 1 to 5 digits up to 65535.
fn split_port(text: &str) -> Option<(&str, Option<u16>)> {
    let bytes = text.as_bytes();
    // A colon inside an IPv6 literal is not a port separator: the last colon is one only
    // if no `]` follows it. (Byte scans: this runs on every proxied request.)
    let port_colon = bytes
        .iter()
        .rposition(|&byte| byte == b':')
        .filter(|&colon| !bytes[colon..].contains(&b']'));
    let Some(colon) = port_colon else {
        return Some((text, None));
    };
    let (host, port) = (&text[..colon], &bytes[colon + 1..]);
    if port.is_empty() || port.len() > 5 {
        return None;
    }
    let mut value: u32 = 0;
    for &digit in port {
        if !digit.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(digit - b'0');
    }
    Some((host, Some(u16::try_from(value).ok()?)))
}

/// A DNS name of LDH labels (RFC 1123 §2.1), lowercased, one trailing dot allowed: labels
/// of 1 to 63 letters, digits and hyphens, not starting or ending with a hyphen, checked
/// in one pass over the bytes.
fn dns_name(host: &str) -> Option<String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    let mut label_len = 0;
    let mut previous = b'.';
    for &byte in name.as_bytes() {
        if byte == b'.' {
            if label_len == 0 || previous == b'-' {
                return None;
            }
            label_len = 0;
        } else if byte.is_ascii_alphanumeric() || byte == b'-' {
            if label_len == 0 && byte == b'-' {
                return None;
            }
            label_len += 1;
            if label_len > MAX_LABEL_LEN {
                return None;
            }
        } else {
            return None;
        }
        previous = byte;
    }
    if label_len == 0 || previous == b'-' {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// The authority a request is for, or `Ok(None)` if it names none (HTTP/1.0 without
/// Host, HTTP/2 without `:authority` or Host). Refuse CONNECT before calling this: its
/// authority-form target has no scheme and is refused as [`AuthorityError::Scheme`].
///
/// ```
/// use backhaul::http::authority::{request_authority, AuthorityError};
/// use http::{HeaderMap, Version};
///
/// let mut headers = HeaderMap::new();
/// headers.insert(http::header::HOST, "a.example".parse()?);
/// let absolute = "http://b.example/x".parse()?;
/// let authority = request_authority(Version::HTTP_11, &absolute, &headers)?;
/// assert_eq!(authority.unwrap().as_str(), "b.example"); // the target wins
/// let missing = request_authority(Version::HTTP_11, &"/".parse()?, &HeaderMap::new());
/// assert_eq!(missing, Err(AuthorityError::MissingHost));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn request_authority(
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Option<Authority>, AuthorityError> {
    let mut hosts = headers.get_all(HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(AuthorityError::DuplicateHost);
    }
    // A Host present must be valid even when the target's authority wins (RFC 9112 §3.2).
    let host_header = host_header.map(parse_header_value).transpose()?;
    if version == Version::HTTP_11 && host_header.is_none() {
        return Err(AuthorityError::MissingHost);
    }
    let Some(target) = uri.authority() else {
        return Ok(host_header);
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(AuthorityError::Scheme);
    }
    Authority::parse(target.as_str()).map(Some)
}

fn parse_header_value(value: &HeaderValue) -> Result<Authority, AuthorityError> {
    value
        .to_str()
        .ok()
        .and_then(|text| Authority::checked(text, || Some(value.clone())))
        .ok_or_else(|| AuthorityError::Invalid(String::from_utf8_lossy(value.as_bytes()).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_authorities_parse() {
        for text in [
            "demo.localhost",
            "demo.localhost:8080",
            "Demo.LOCALHOST.:1",
            "a-b.c1.localhost:65535",
            "127.0.0.1",
            "10.0.0.1:80",
            "[::1]",
            "[2001:db8::1]:8080",
            "xn--bcher-kva.example",
            "a--b.c-d.localhost:0",
            "web.localhost:00080",
        ] {
            let authority = Authority::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(authority.as_str(), text);
        }
        let v6 = Authority::parse("[::1]:443").expect("valid");
        assert_eq!(v6.port(), Some(443));
        assert_eq!(v6.host(), &Host::Ip("::1".parse().expect("an IP")));
        let name = Authority::parse("Demo.LOCALHOST.").expect("valid");
        assert_eq!(name.host(), &Host::Name("demo.localhost".into()));
        assert_eq!(name.port(), None);
    }

    #[test]
    fn authorities_with_other_characters_are_refused() {
        for text in [
            "",
            ":80",
            "web/redirect?.demo.localhost",
            "demo.localhost/x",
            "demo.localhost?x",
            "demo.localhost#x",
            "user@demo.localhost",
            "user:pass@demo.localhost",
            "demo.localhost:",
            "demo.localhost:80:80",
            "demo.localhost:65536",
            "demo.localhost:123456",
            "demo.localhost:+80",
            "demo.localhost: 80",
            "demo%2elocalhost",
            "de mo.localhost",
            "demo..localhost",
            ".demo.localhost",
            "-demo.localhost",
            "demo-.localhost",
            "web.-demo.localhost",
            "web.demo-.localhost",
            "web.demo.localhost-",
            "web.demo.localhost:99999",
            "web.demo.localhost:8a",
            "de_mo.localhost",
            "démo.localhost",
            "demo.localhost..",
            "[::1",
            "::1",
            "[::1]x",
            "[fe80::1%25eth0]",
            "[v1.fe]",
            "[127.0.0.1]",
            "demo.localhost\r\nx: y",
        ] {
            assert_eq!(
                Authority::parse(text),
                Err(AuthorityError::Invalid(text.to_owned())),
                "{text:?} must be refused"
            );
        }
        let long_label = "a".repeat(64);
        assert!(Authority::parse(&format!("{long_label}.localhost")).is_err());
        let longest_label = "a".repeat(63);
        assert!(Authority::parse(&format!("{longest_label}.localhost")).is_ok());
        let long_name = vec!["abcdefghi"; 26].join(".");
        assert!(Authority::parse(&long_name).is_err());
    }

    fn headers(hosts: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for host in hosts {
            headers.append(HOST, host.parse().expect("a header value"));
        }
        headers
    }

    fn authority_of(
        version: Version,
        uri: &str,
        hosts: &[&str],
    ) -> Result<Option<String>, AuthorityError> {
        let uri: Uri = uri.parse().expect("a URI");
        request_authority(version, &uri, &headers(hosts))
            .map(|authority| authority.map(|a| a.as_str().to_owned()))
    }

    #[test]
    fn the_target_authority_wins_over_host() {
        let http11 = Version::HTTP_11;
        assert_eq!(
            authority_of(http11, "/x", &["a.localhost"]),
            Ok(Some("a.localhost".into()))
        );
        // Absolute-form (RFC 9112 §3.2.2) and HTTP/2 :authority.
        assert_eq!(
            authority_of(http11, "http://b.localhost/x", &["a.localhost"]),
            Ok(Some("b.localhost".into()))
        );
        assert_eq!(
            authority_of(Version::HTTP_2, "http://b.localhost:1/x", &["a.localhost"]),
            Ok(Some("b.localhost:1".into()))
        );
        assert_eq!(
            authority_of(Version::HTTP_2, "http://b.localhost/x", &[]),
            Ok(Some("b.localhost".into()))
        );
    }

    #[test]
    fn malformed_hosts_are_refused() {
        let http11 = Version::HTTP_11;
        assert_eq!(
            authority_of(http11, "/", &[]),
            Err(AuthorityError::MissingHost)
        );
        assert_eq!(
            authority_of(http11, "http://a.localhost/", &[]),
            Err(AuthorityError::MissingHost)
        );
        assert_eq!(
            authority_of(http11, "/", &["a.localhost", "b.localhost"]),
            Err(AuthorityError::DuplicateHost)
        );
        assert_eq!(
            authority_of(http11, "/", &["a.localhost", "a.localhost"]),
            Err(AuthorityError::DuplicateHost)
        );
        assert!(matches!(
            authority_of(http11, "/", &["web/x?.a.localhost"]),
            Err(AuthorityError::Invalid(_))
        ));
        assert!(matches!(
            authority_of(http11, "http://u@a.localhost/", &["a.localhost"]),
            Err(AuthorityError::Invalid(_))
        ));
        assert_eq!(
            authority_of(http11, "ftp://a.localhost/", &["a.localhost"]),
            Err(AuthorityError::Scheme)
        );
        // A non-UTF-8 Host is refused, not a panic.
        let mut binary = HeaderMap::new();
        binary.insert(
            HOST,
            HeaderValue::from_bytes(b"a\xff.localhost").expect("bytes"),
        );
        assert!(matches!(
            request_authority(http11, &"/".parse().expect("a URI"), &binary),
            Err(AuthorityError::Invalid(_))
        ));
        // HTTP/1.0 without Host names nothing.
        assert_eq!(authority_of(Version::HTTP_10, "/", &[]), Ok(None));
    }
}
