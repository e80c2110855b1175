//! Which edge and service a request's Host names.

/// Where a Host header points.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// The bare domain: the relay's own index page.
    Index,
    /// A service on an edge.
    Edge { edge: String, service: String },
    /// Not under our domain.
    Unknown,
}

pub(super) fn resolve_host(host: &str, domain: &str, default_service: &str) -> Target {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
        _ => host,
    };
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

    #[test]
    fn hosts_resolve_to_edges_and_services() {
        let resolve = |host| resolve_host(host, "localhost", "web");
        assert_eq!(resolve("localhost:8080"), Target::Index);
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
    }
}
