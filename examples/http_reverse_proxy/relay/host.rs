//! Which authority a request names, and which edge and service that authority routes to.
//!
//! The authority is parsed strictly (RFC 9110 §7.2, RFC 3986 §3.2): a host that is DNS
//! labels or an IP literal, and an optional numeric port; nothing else. Anything looser
//! would let a Host such as `web/redirect?.demo.localhost` both route somewhere and carry
//! path or query characters on to the backend, which sees the same value as its Host.
//!
//! Which authority counts (RFC 9112 §3.2, RFC 9113 §8.3.1): the request target's own
//! authority when it has one (HTTP/1.1 absolute-form, HTTP/2 `:authority`), else the Host
//! header. An HTTP/1.1 request without exactly one valid Host is malformed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::header::HOST;
use http::{HeaderMap, Uri, Version};

/// Longest host name DNS allows (RFC 1035 §2.3.4), in text form.
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// A validated `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Authority {
    /// The authority as the client wrote it (validated: only LDH, dots, digits, brackets,
    /// colons), which the backend gets as its Host.
    text: String,
    host: HostPart,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPart {
    /// Lowercase DNS labels without a trailing dot.
    Name(String),
    Ip(IpAddr),
}

/// Why a request's authority was refused (each one a 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AuthorityError {
    MissingHost,
    DuplicateHost,
    Invalid(String),
    Scheme,
}

impl std::fmt::Display for AuthorityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MissingHost => f.write_str("an HTTP/1.1 request needs a Host header"),
            Self::DuplicateHost => f.write_str("more than one Host header"),
            Self::Invalid(text) => write!(
                f,
                "invalid host {text:?}: expected DNS labels or an IP address, and an optional port"
            ),
            Self::Scheme => f.write_str("only http:// and https:// targets are served"),
        }
    }
}

impl Authority {
    /// Parses `host[:port]` strictly; `None` for anything else (userinfo, path, query,
    /// fragment, percent-encoding, empty or non-numeric port, bad labels).
    pub(super) fn parse(text: &str) -> Option<Self> {
        let (host, port) = split_port(text)?;
        let host = if let Some(literal) = host.strip_prefix('[') {
            let literal = literal.strip_suffix(']')?;
            HostPart::Ip(IpAddr::V6(literal.parse::<Ipv6Addr>().ok()?))
        } else if let Ok(v4) = host.parse::<Ipv4Addr>() {
            HostPart::Ip(IpAddr::V4(v4))
        } else {
            HostPart::Name(dns_name(host)?)
        };
        Some(Self {
            text: text.to_owned(),
            host,
            port,
        })
    }

    pub(super) fn as_str(&self) -> &str {
        &self.text
    }
}

/// Splits an optional `:port` off; a port is 1 to 5 digits up to 65535.
fn split_port(text: &str) -> Option<(&str, Option<u16>)> {
    let port_colon = match text.rfind(':') {
        // A colon inside an IPv6 literal is not a port separator.
        Some(colon) if !text[colon..].contains(']') => Some(colon),
        _ => None,
    };
    let Some(colon) = port_colon else {
        return Some((text, None));
    };
    let (host, port) = (&text[..colon], &text[colon + 1..]);
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((host, Some(port.parse().ok()?)))
}

/// A DNS name of LDH labels (RFC 1123 §2.1), lowercased, one trailing dot allowed.
fn dns_name(host: &str) -> Option<String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    name.split('.')
        .all(valid_dns_label)
        .then(|| name.to_ascii_lowercase())
}

/// 1 to 63 letters, digits and hyphens, not starting or ending with a hyphen.
pub(super) fn valid_dns_label(label: &str) -> bool {
    (1..=MAX_LABEL_LEN).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// The authority a request is for (CONNECT is refused before this: its authority-form
/// target has no scheme), or `Ok(None)` if it names none (HTTP/1.0 without Host,
/// or HTTP/2 without `:authority` or Host): such a request reaches no edge.
pub(super) fn request_authority(
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
    Authority::parse(target.as_str())
        .map(Some)
        .ok_or_else(|| AuthorityError::Invalid(target.as_str().to_owned()))
}

fn parse_header_value(value: &http::HeaderValue) -> Result<Authority, AuthorityError> {
    value
        .to_str()
        .ok()
        .and_then(Authority::parse)
        .ok_or_else(|| AuthorityError::Invalid(String::from_utf8_lossy(value.as_bytes()).into()))
}

/// Where an authority points.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// The bare domain: the relay's own index page.
    Index,
    /// A service on an edge.
    Edge { edge: String, service: String },
    /// Not under our domain.
    Unknown,
}

/// Routes `<edge>.<domain>` to the edge's default service and `<service>.<edge>.<domain>`
/// to a named one; the port plays no part. Labels are valid DNS labels by construction.
pub(super) fn resolve_host(
    authority: Option<&Authority>,
    domain: &str,
    default_service: &str,
) -> Target {
    let Some(HostPart::Name(host)) = authority.map(|authority| &authority.host) else {
        return Target::Unknown;
    };
    let domain = domain.trim_end_matches('.');
    if host == domain {
        return Target::Index;
    }
    let Some(labels) = host
        .strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix('.'))
    else {
        return Target::Unknown;
    };
    match labels.split('.').collect::<Vec<_>>().as_slice() {
        [edge] => Target::Edge {
            edge: (*edge).to_owned(),
            service: default_service.to_owned(),
        },
        [service, edge] => Target::Edge {
            edge: (*edge).to_owned(),
            service: (*service).to_owned(),
        },
        _ => Target::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(host: &str) -> Target {
        let authority = Authority::parse(host).unwrap_or_else(|| panic!("{host:?} is valid"));
        resolve_host(Some(&authority), "localhost", "web")
    }

    #[test]
    fn hosts_resolve_to_edges_and_services() {
        assert_eq!(resolve("localhost:8080"), Target::Index);
        assert_eq!(resolve("localhost."), Target::Index);
        assert_eq!(
            resolve("demo.localhost:8080"),
            Target::Edge {
                edge: "demo".into(),
                service: "web".into()
            }
        );
        assert_eq!(
            resolve("API.Demo.localhost"),
            Target::Edge {
                edge: "demo".into(),
                service: "api".into()
            }
        );
        assert_eq!(resolve("example.com"), Target::Unknown);
        assert_eq!(resolve("a.b.c.localhost"), Target::Unknown);
        assert_eq!(resolve("xlocalhost"), Target::Unknown);
        assert_eq!(resolve("127.0.0.1:8080"), Target::Unknown);
        assert_eq!(resolve("[::1]:8080"), Target::Unknown);
        assert_eq!(resolve_host(None, "localhost", "web"), Target::Unknown);
    }

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
        ] {
            let authority = Authority::parse(text).unwrap_or_else(|| panic!("{text:?}"));
            assert_eq!(authority.as_str(), text);
        }
        assert_eq!(
            Authority::parse("[::1]:443").map(|a| a.port),
            Some(Some(443))
        );
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
            assert_eq!(Authority::parse(text), None, "{text:?} must be refused");
        }
        let long_label = "a".repeat(64);
        assert_eq!(Authority::parse(&format!("{long_label}.localhost")), None);
        let long_name = vec!["abcdefghi"; 26].join(".");
        assert_eq!(Authority::parse(&long_name), None);
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
        // HTTP/1.0 without Host names nothing: it reaches no edge.
        assert_eq!(authority_of(Version::HTTP_10, "/", &[]), Ok(None));
    }
}
