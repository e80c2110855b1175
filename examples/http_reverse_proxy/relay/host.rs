//! Which edge and service a request's authority routes to: `<edge>.<domain>` reaches the
//! edge's default service, `<service>.<edge>.<domain>` a named one, the bare domain the
//! relay's index page. The authority itself is parsed strictly by the library
//! (`backhaul::http::authority`), so every label here is a valid DNS label.

use backhaul::http::authority::{Authority, Host};
use backhaul::http::server::Placement;
use backhaul::relay::Registry;
use backhaul::shards::Shard;

/// Where an authority points (names borrowed from the authority or the default).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target<'a> {
    /// The bare domain: the relay's own index page.
    Index,
    /// A service on an edge.
    Edge { edge: &'a str, service: &'a str },
    /// Not under our domain.
    Unknown,
}

/// Routes an authority under `domain`; the port plays no part.
pub(super) fn resolve_host<'a>(
    authority: Option<&'a Authority>,
    domain: &str,
    default_service: &'a str,
) -> Target<'a> {
    let Some(Host::Name(host)) = authority.map(Authority::host) else {
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
    let (edge, service) = match labels.split_once('.') {
        None => (labels, default_service),
        Some((service, edge)) if !edge.contains('.') => (edge, service),
        Some(_) => return Target::Unknown,
    };
    Target::Edge { edge, service }
}

/// Where a public connection is served on a relay run on shards: on the shard of the edge
/// its host routes to (see `backhaul::shards`).
pub(super) struct EdgePlacement {
    pub(super) registry: Registry,
    pub(super) domain: String,
    pub(super) default_service: String,
}

impl Placement for EdgePlacement {
    fn shard(&self, host: &str) -> Option<Shard> {
        let authority = Authority::parse(host).ok()?;
        match resolve_host(Some(&authority), &self.domain, &self.default_service) {
            Target::Edge { edge, .. } => self.registry.get(edge)?.shard(),
            Target::Index | Target::Unknown => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `host` points, spelled out: `index`, `unknown` or `edge/service`.
    fn resolve(host: &str) -> String {
        let authority: Authority = host.parse().unwrap_or_else(|_| panic!("{host:?} is valid"));
        match resolve_host(Some(&authority), "localhost", "web") {
            Target::Index => "index".to_owned(),
            Target::Unknown => "unknown".to_owned(),
            Target::Edge { edge, service } => format!("{edge}/{service}"),
        }
    }

    #[test]
    fn hosts_resolve_to_edges_and_services() {
        assert_eq!(resolve("localhost:8080"), "index");
        assert_eq!(resolve("localhost."), "index");
        assert_eq!(resolve("demo.localhost:8080"), "demo/web");
        assert_eq!(resolve("API.Demo.localhost"), "demo/api");
        assert_eq!(resolve("example.com"), "unknown");
        assert_eq!(resolve("a.b.c.localhost"), "unknown");
        assert_eq!(resolve("b.c.localhost"), "c/b");
        assert_eq!(resolve("xlocalhost"), "unknown");
        assert_eq!(resolve("127.0.0.1:8080"), "unknown");
        assert_eq!(resolve("[::1]:8080"), "unknown");
        assert_eq!(resolve_host(None, "localhost", "web"), Target::Unknown);
    }
}
