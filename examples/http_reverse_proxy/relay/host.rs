//! Which edge and service a request's authority routes to: `<edge>.<domain>` reaches the
//! edge's default service, `<service>.<edge>.<domain>` a named one, the bare domain the
//! relay's index page. The authority itself is parsed strictly by the library
//! (`backhaul::http::authority`), so every label here is a valid DNS label.

use backhaul::http::authority::{Authority, Host};

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

/// Routes an authority under `domain`; the port plays no part.
pub(super) fn resolve_host(
    authority: Option<&Authority>,
    domain: &str,
    default_service: &str,
) -> Target {
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
    let (edge, service) = match labels.split('.').collect::<Vec<_>>().as_slice() {
        [edge] => (*edge, default_service),
        [service, edge] => (*edge, *service),
        _ => return Target::Unknown,
    };
    Target::Edge {
        edge: edge.to_owned(),
        service: service.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(host: &str) -> Target {
        let authority: Authority = host.parse().unwrap_or_else(|_| panic!("{host:?} is valid"));
        resolve_host(Some(&authority), "localhost", "web")
    }

    fn edge(edge: &str, service: &str) -> Target {
        Target::Edge {
            edge: edge.into(),
            service: service.into(),
        }
    }

    #[test]
    fn hosts_resolve_to_edges_and_services() {
        assert_eq!(resolve("localhost:8080"), Target::Index);
        assert_eq!(resolve("localhost."), Target::Index);
        assert_eq!(resolve("demo.localhost:8080"), edge("demo", "web"));
        assert_eq!(resolve("API.Demo.localhost"), edge("demo", "api"));
        assert_eq!(resolve("example.com"), Target::Unknown);
        assert_eq!(resolve("a.b.c.localhost"), Target::Unknown);
        assert_eq!(resolve("xlocalhost"), Target::Unknown);
        assert_eq!(resolve("127.0.0.1:8080"), Target::Unknown);
        assert_eq!(resolve("[::1]:8080"), Target::Unknown);
        assert_eq!(resolve_host(None, "localhost", "web"), Target::Unknown);
    }
}
