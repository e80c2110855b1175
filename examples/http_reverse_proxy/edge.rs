//! The edge: dial the relay, register, serve local HTTP services, and stay connected.
//!
//! The edge never listens. It reconnects with exponential backoff and jitter when the
//! relay restarts, the network drops, or the relay refuses it for a while (another edge
//! holds its name, or its source is backing off), and stops for good only on Ctrl-C,
//! when the relay refuses its credentials (exit code 2), or when the relay presents a
//! certificate the edge does not trust (exit code 3): those need an operator, and
//! retrying would only hide them.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backhaul::edge::{Backoff, Edge, RegisterError, Router};
use backhaul::http::proxy::{pass_through, to_local, Timeouts};
use backhaul::quic::load_certs;
use backhaul::relay::{
    registration_metadata, EdgeInstance, EdgeName, INSTANCE_FIELD, REGISTER_SERVICE,
};
use backhaul::tcp;
use backhaul::{
    Config, Error, Metadata, MetadataValue, QuinnConnection, RejectCode, SessionClient,
};
use clap::Args;
use http::Uri;
use rustls::pki_types::CertificateDer;
use tracing::{info, warn};

use crate::{parse_duration, shutdown_signal, until_stopped, BoxError, Escaped};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The relay refused the edge's credentials.
#[derive(Debug, thiserror::Error)]
#[error("unauthorized: {0}")]
pub struct Unauthorized(pub String);

/// The relay presented a certificate this edge does not trust.
#[derive(Debug, thiserror::Error)]
#[error(
    "the relay at {relay} presented a certificate that {trusted} does not trust ({reason}); \
     if the relay's certificate changed, copy its current certificate (the relay's \
     --cert-out file, backhaul-relay-cert.pem by default, or its --cert) to {trusted}; \
     if the name differs, check --server-name"
)]
pub struct UntrustedRelay {
    pub relay: String,
    pub trusted: String,
    pub reason: String,
}

#[derive(Debug, Clone, Args)]
pub struct EdgeArgs {
    /// The relay's QUIC address (host:port); several, comma-separated, are tried in turn
    /// on every (re)connection, the first that answers is used (failover between the
    /// relays of a cluster).
    #[arg(long, default_value = "127.0.0.1:4433", env = "BACKHAUL_RELAY")]
    pub relay: String,
    /// Certificate (PEM or DER) to trust for the relay.
    #[arg(
        long,
        default_value = "backhaul-relay-cert.pem",
        env = "BACKHAUL_RELAY_CERT"
    )]
    pub relay_cert: PathBuf,
    /// Name the relay's certificate is issued for.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// This edge's name: it is reached at `<name>.<domain>`.
    #[arg(long, env = "BACKHAUL_EDGE_NAME")]
    pub name: String,
    /// This edge's token, as configured on the relay.
    #[arg(long, env = "BACKHAUL_EDGE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// A local service to expose, as NAME=http://HOST:PORT (HTTP, reached by Host on the
    /// relay), NAME=h2c://HOST:PORT (HTTP/2 with prior knowledge: gRPC servers) or
    /// NAME=tcp://HOST:PORT (raw TCP, reached on a relay port given with its --tcp);
    /// repeat for more.
    #[arg(long = "expose", required = true)]
    pub expose: Vec<String>,
    /// Send a PROXY protocol v2 header to this TCP service first, so it sees the public
    /// client's address (repeat for more; the service must expect the header).
    #[arg(long = "proxy-protocol", value_name = "NAME")]
    pub proxy_protocol: Vec<String>,
    /// Pass this HTTP service's streams through at layer 4: each tunnel stream is spliced
    /// to one connection to the service, with no HTTP parsing on the edge (about half the
    /// edge's CPU per request). The relay's timeouts and headers still apply; the edge's
    /// own --request-timeout, --upstream-idle-timeout and --rewrite-host do not, and on
    /// shutdown the edge waits for each stream to end rather than for its requests
    /// (repeat for more).
    #[arg(long = "pass-through", value_name = "NAME")]
    pub pass_through: Vec<String>,
    /// With --pass-through, when the local service cannot be reached: how long a stream
    /// may wait for the request that gets its 502 before it is closed unanswered. The
    /// relay sends its request at once, so this only bounds streams that carry none.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub pass_through_answer_timeout: Duration,
    /// Send requests to local services with the local address as Host.
    #[arg(long)]
    pub rewrite_host: bool,
    /// Keep-alive ping interval; a relay missing a pong for as long again is given up.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub keepalive: Duration,
    /// How long a local service may take to answer (response head).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long in-flight requests may finish after Ctrl-C.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// How long a local service's response body may stall between two chunks before the
    /// response is aborted (WebSockets and streams that keep sending are not cut).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,
    /// Streams the relay may have open to this edge at once; past it requests get 503.
    #[arg(long, default_value_t = 1000)]
    pub max_streams: usize,
    /// Longest wait between reconnection attempts.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,
    /// How long one QUIC handshake with a relay may take before the next relay of
    /// --relay is tried.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// With several --relay addresses: hold a session to every one of them at once (the
    /// relays of a cluster then all have this edge attached, and losing one changes
    /// nothing for the others) instead of using the first that answers.
    #[arg(long)]
    pub attach_all: bool,
    /// QUIC connections per relay session (lanes). One connection is processed by one
    /// core at a time on each side; a busy edge on a relay with cores to spare serves
    /// more with 2–4. The relay may allow fewer (its --max-lanes).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub lanes: u8,
}

/// Everything an edge needs to run.
#[derive(Clone)]
pub struct EdgeConfig {
    pub relay: String,
    pub trusted: Vec<CertificateDer<'static>>,
    /// Where `trusted` came from, for the message when the relay's certificate is not it.
    pub trusted_from: String,
    pub server_name: String,
    pub name: String,
    pub token: String,
    /// (service name, local service)
    pub services: Vec<(String, Upstream)>,
    pub rewrite_host: bool,
    pub keepalive: Duration,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    /// See [`EdgeArgs::pass_through_answer_timeout`].
    pub pass_through_answer_timeout: Duration,
    pub max_streams: usize,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// One session per relay of `relay` at once, rather than failover between them.
    pub attach_all: bool,
    /// QUIC connections per session.
    pub lanes: usize,
}

pub async fn run(args: EdgeArgs) -> Result<(), BoxError> {
    let trusted = load_certs(&args.relay_cert)?;
    let mut services = args
        .expose
        .iter()
        .map(|spec| parse_expose(spec))
        .collect::<Result<Vec<_>, _>>()?;
    for name in &args.proxy_protocol {
        match services.iter_mut().find(|(service, _)| service == name) {
            Some((_, Upstream::Tcp { proxy_protocol, .. })) => *proxy_protocol = true,
            _ => {
                return Err(
                    format!("--proxy-protocol {name:?}: no TCP service of that name").into(),
                )
            }
        }
    }
    mark_pass_through(&mut services, &args.pass_through, args.rewrite_host)?;
    if !EdgeName::is_valid(&args.name) {
        return Err(format!("edge name {:?} must be a lowercase DNS label", args.name).into());
    }
    let config = EdgeConfig {
        relay: args.relay,
        trusted,
        trusted_from: args.relay_cert.display().to_string(),
        server_name: args.server_name,
        name: args.name,
        token: args.token,
        services,
        rewrite_host: args.rewrite_host,
        keepalive: args.keepalive,
        request_timeout: args.request_timeout,
        shutdown_timeout: args.shutdown_timeout,
        upstream_idle_timeout: args.upstream_idle_timeout,
        pass_through_answer_timeout: args.pass_through_answer_timeout,
        max_streams: args.max_streams,
        max_backoff: args.max_backoff,
        connect_timeout: args.connect_timeout,
        attach_all: args.attach_all,
        lanes: usize::from(args.lanes),
    };
    run_edge(config, shutdown_signal()).await
}

/// A local service an edge exposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// An HTTP service (`http://` or, HTTP/2 only, `h2c://`), forwarded request by
    /// request.
    Http(Uri),
    /// An HTTP service whose streams are spliced to it unparsed (--pass-through).
    PassThrough(Uri),
    /// A TCP service (`host:port`), spliced byte for byte.
    Tcp {
        address: String,
        proxy_protocol: bool,
    },
}

/// Parses `NAME=http://HOST:PORT`, `NAME=h2c://HOST:PORT` or `NAME=tcp://HOST:PORT`.
fn parse_expose(spec: &str) -> Result<(String, Upstream), String> {
    let (name, url) = spec
        .split_once('=')
        .ok_or_else(|| format!("--expose {spec:?} is not NAME=http://HOST:PORT"))?;
    // Service names become host labels (<service>.<edge>.<domain>).
    if !EdgeName::is_valid(name) {
        return Err(format!(
            "--expose {spec:?}: the service name must be a lowercase DNS label"
        ));
    }
    if let Some(address) = url.strip_prefix("tcp://") {
        let valid = address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(format!("--expose {spec:?}: expected tcp://HOST:PORT"));
        }
        let upstream = Upstream::Tcp {
            address: address.to_owned(),
            proxy_protocol: false,
        };
        return Ok((name.to_owned(), upstream));
    }
    let uri: Uri = url.parse().map_err(|e| format!("--expose {spec:?}: {e}"))?;
    to_local(uri.clone()).map_err(|e| format!("--expose {spec:?}: {e}"))?;
    Ok((name.to_owned(), Upstream::Http(uri)))
}

/// Turns the HTTP services named by --pass-through into pass-through ones.
fn mark_pass_through(
    services: &mut [(String, Upstream)],
    names: &[String],
    rewrite_host: bool,
) -> Result<(), String> {
    for name in names {
        let upstream = services
            .iter_mut()
            .find(|(service, _)| service == name)
            .map(|(_, upstream)| upstream);
        let uri = match upstream.as_deref() {
            Some(Upstream::Http(uri)) if uri.scheme_str() == Some("http") => uri.clone(),
            _ => {
                return Err(format!(
                    "--pass-through {name:?}: no http:// service of that name"
                ))
            }
        };
        if rewrite_host {
            return Err(format!(
                "--pass-through {name:?}: the edge cannot rewrite Host (--rewrite-host) on \
                 streams it does not parse"
            ));
        }
        if let Some(upstream) = upstream {
            *upstream = Upstream::PassThrough(uri);
        }
    }
    Ok(())
}

/// Runs until `shutdown` resolves (Ok), or until the relay refuses the credentials or
/// presents a certificate this edge does not trust (Err). Dialing, reconnecting with
/// backoff and telling the relay before draining are the library's [`Edge`].
pub async fn run_edge(
    config: EdgeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let relays: Vec<String> = config
        .relay
        .split(',')
        .map(str::trim)
        .filter(|relay| !relay.is_empty())
        .map(str::to_owned)
        .collect();
    // One id for this process's life: every session (to any relay of a cluster) registers
    // as the same edge instance, so a reconnection to another relay, or a session to each
    // relay with --attach-all, is not refused as another edge taking the name.
    let instance: Arc<str> = Arc::from(EdgeInstance::generate().as_str());
    if !config.attach_all || relays.len() < 2 {
        return run_sessions(&config, relays, instance, shutdown).await;
    }
    // One library `Edge` per relay, each with the same services and instance id.
    let (stop, stopped) = watch::channel(false);
    let mut edges = JoinSet::new();
    for relay in relays {
        let (config, instance, mut stopped) = (config.clone(), instance.clone(), stopped.clone());
        edges.spawn(async move {
            let stop = async move { until_stopped(&mut stopped).await };
            run_sessions(&config, vec![relay], instance, stop).await
        });
    }
    let mut shutdown = std::pin::pin!(shutdown);
    let mut result = Ok(());
    loop {
        tokio::select! {
            () = &mut shutdown, if !*stop.borrow() => {
                let _ = stop.send(true);
            }
            joined = edges.join_next() => {
                let outcome = match joined {
                    None => break,
                    Some(Ok(outcome)) => outcome,
                    Some(Err(error)) => Err(error.into()),
                };
                // One relay refusing the credentials or the certificate stops them all,
                // as it would stop a single edge.
                if let Err(error) = outcome {
                    let _ = stop.send(true);
                    if result.is_ok() {
                        result = Err(error);
                    }
                }
            }
        }
    }
    result
}

/// Runs one library [`Edge`] over `relays` (tried in order on each connection) until
/// `shutdown` or a fatal refusal.
async fn run_sessions(
    config: &EdgeConfig,
    relays: Vec<String>,
    instance: Arc<str>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let session_config = Config::new()
        .with_agent(concat!("backhaul-edge/", env!("CARGO_PKG_VERSION")))
        .with_ping_interval(config.keepalive)
        .with_ping_timeout(config.keepalive)
        .with_max_concurrent_streams(config.max_streams);
    let edge = Edge::builder()
        .relays(relays)
        .trust(config.trusted.clone())
        .server_name(&config.server_name)
        .config(session_config)
        .register(tower::service_fn({
            let identity = Registration {
                edge: Arc::from(config.name.as_str()),
                token: Arc::from(config.token.as_str()),
                instance,
            };
            move |client| register(client, identity.clone())
        }))
        .backoff(Backoff::new(Duration::from_millis(250), config.max_backoff))
        .connect_timeout(config.connect_timeout)
        .drain_timeout(config.shutdown_timeout)
        .lanes(config.lanes)
        .build(build_router(config)?)?
        .with_graceful_shutdown(shutdown);
    match edge.await {
        Ok(()) => Ok(()),
        // The registration step's own error: `Unauthorized` (exit code 2).
        Err(Error::RegistrationRefused(refusal)) => Err(refusal),
        Err(Error::UntrustedCertificate { relay, reason, .. }) => Err(Box::new(UntrustedRelay {
            relay: relay.to_string(),
            trusted: config.trusted_from.clone(),
            reason,
        })),
        Err(error) => Err(error.into()),
    }
}

/// What the edge registers with: its name, token and instance id.
#[derive(Clone)]
struct Registration {
    edge: Arc<str>,
    token: Arc<str>,
    instance: Arc<str>,
}

impl Registration {
    /// The library's registration metadata plus the instance field.
    fn metadata(&self) -> Metadata {
        let mut metadata = registration_metadata(&self.edge, &self.token);
        if let Metadata::Structured(fields) = &mut metadata {
            fields.insert(
                INSTANCE_FIELD.to_owned(),
                MetadataValue::String(self.instance.to_string()),
            );
        }
        metadata
    }
}

/// The registration run on every new session: open the relay's `_register` service with
/// this edge's name and token. A refusal of the credentials is final; a name held by a
/// live edge is retried (with a loud warning), so this edge takes over once the other is
/// gone.
async fn register(
    client: SessionClient<QuinnConnection>,
    registration: Registration,
) -> Result<(), RegisterError> {
    let edge = &registration.edge;
    match client.open(REGISTER_SERVICE, registration.metadata()).await {
        Ok(_) => {
            info!(edge = %edge, "registered with the relay");
            Ok(())
        }
        Err(Error::StreamRejected {
            code: RejectCode::Unauthorized,
            reason,
        }) => {
            let reason = reason.unwrap_or_else(|| "credentials refused".to_owned());
            Err(RegisterError::fatal(Unauthorized(reason)))
        }
        Err(Error::StreamRejected {
            code: RejectCode::ServiceUnavailable,
            reason,
        }) => {
            let reason = reason.unwrap_or_else(|| "registration refused for now".to_owned());
            if reason.contains("already connected") {
                warn!(
                    reason = %Escaped(&reason),
                    "ANOTHER EDGE IS CONNECTED UNDER THIS NAME: is this edge running twice? \
                     retrying, so this edge takes over once the other is gone"
                );
            } else {
                warn!(reason = %Escaped(&reason), "the relay cannot register this edge now; retrying");
            }
            Err(RegisterError::retryable(reason))
        }
        Err(error) => Err(RegisterError::retryable(error)),
    }
}

/// One route per exposed service: the library's `to_local`, which forwards tunnel
/// requests to the local service (hop-by-hop headers, upgrades, idle limit) and answers
/// its failures itself, naming the edge and the service (the relay passes them through).
/// Headers pass through unchanged otherwise: the relay's forwarding headers and Host reach
/// the service as the relay set them (Host is replaced only with --rewrite-host).
fn build_router(config: &EdgeConfig) -> Result<Router<QuinnConnection>, Error> {
    let timeouts = Timeouts {
        response: config.request_timeout,
        body_idle: config.upstream_idle_timeout,
    };
    config
        .services
        .iter()
        .try_fold(Router::new(), |router, (name, upstream)| {
            let upstream = match upstream {
                Upstream::Http(uri) => uri,
                Upstream::Tcp {
                    address,
                    proxy_protocol,
                } => {
                    let route = tcp::forward_to(address.as_str())
                        .with_proxy_protocol(*proxy_protocol)
                        .with_connect_timeout(config.request_timeout.min(Duration::from_secs(10)));
                    return Ok(router.route(name.as_str(), route));
                }
                Upstream::PassThrough(uri) => {
                    let authority = uri.authority().map_or("", |a| a.as_str());
                    let route = pass_through(uri.clone())?
                        .with_description(format!(
                            "edge {:?}: local service {name:?} at {authority}",
                            config.name
                        ))
                        .with_connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
                        .with_answer_timeout(config.pass_through_answer_timeout);
                    return Ok(router.route(name.as_str(), route));
                }
            };
            let authority = upstream.authority().map_or("", |a| a.as_str());
            let local = to_local(upstream.clone())?
                .with_description(format!(
                    "edge {:?}: local service {name:?} at {authority}",
                    config.name
                ))
                .with_host_rewrite(config.rewrite_host)
                .with_timeouts(timeouts);
            Ok(router.route(name.as_str(), backhaul::http::serve(local)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expose_specs_parse() {
        assert_eq!(
            parse_expose("web=http://127.0.0.1:3000").unwrap(),
            (
                "web".to_owned(),
                Upstream::Http(Uri::from_static("http://127.0.0.1:3000"))
            )
        );
        assert_eq!(
            parse_expose("ssh=tcp://127.0.0.1:22").unwrap(),
            (
                "ssh".to_owned(),
                Upstream::Tcp {
                    address: "127.0.0.1:22".into(),
                    proxy_protocol: false
                }
            )
        );
        assert_eq!(
            parse_expose("grpc=h2c://127.0.0.1:50051").unwrap(),
            (
                "grpc".to_owned(),
                Upstream::Http(Uri::from_static("h2c://127.0.0.1:50051"))
            )
        );
        assert!(parse_expose("grpc=h2c://127.0.0.1:50051/pkg").is_err());
        assert!(parse_expose("ssh=tcp://127.0.0.1").is_err());
        assert!(parse_expose("ssh=tcp://:22").is_err());
        assert!(parse_expose("web").is_err());
        assert!(parse_expose("web=https://x").is_err());
        assert!(parse_expose("web=http://127.0.0.1:3000/app").is_err());
        assert!(parse_expose("we\nb=http://127.0.0.1:1").is_err());
        assert!(parse_expose("Web=http://127.0.0.1:1").is_err());
    }

    #[test]
    fn the_pass_through_answer_timeout_defaults_to_the_librarys() {
        use clap::Parser;

        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            edge: EdgeArgs,
        }
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "edge",
                "--name",
                "e",
                "--token",
                "t",
                "--expose",
                "web=http://127.0.0.1:1",
            ];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).unwrap().edge
        };
        assert_eq!(
            parse(&[]).pass_through_answer_timeout,
            backhaul::http::proxy::DEFAULT_ANSWER_TIMEOUT
        );
        let set = parse(&["--pass-through-answer-timeout", "750ms"]);
        assert_eq!(set.pass_through_answer_timeout, Duration::from_millis(750));
    }

    #[test]
    fn pass_through_applies_to_plain_http_services_only() {
        let services = || {
            [
                "web=http://127.0.0.1:3000",
                "grpc=h2c://127.0.0.1:50051",
                "ssh=tcp://127.0.0.1:22",
            ]
            .iter()
            .map(|spec| parse_expose(spec).unwrap())
            .collect::<Vec<_>>()
        };
        let names = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();

        let mut marked = services();
        mark_pass_through(&mut marked, &names(&["web"]), false).unwrap();
        assert_eq!(
            marked[0].1,
            Upstream::PassThrough(Uri::from_static("http://127.0.0.1:3000"))
        );
        assert_eq!(marked[1..], services()[1..], "the others are untouched");

        for name in ["grpc", "ssh", "nope"] {
            let error = mark_pass_through(&mut services(), &names(&[name]), false).unwrap_err();
            assert!(error.contains("no http:// service"), "{name}: {error}");
        }
        let error = mark_pass_through(&mut services(), &names(&["web"]), true).unwrap_err();
        assert!(error.contains("--rewrite-host"), "{error}");
    }
}
