//! The relay's acceptor over real quinn on 127.0.0.1: bad credentials refused and the
//! connection closed, admission caps holding against many Hello-only connections, any
//! tower service as the authenticator, and a graceful shutdown that empties the registry.

#[path = "support/relay.rs"]
mod relay_fixture;
mod support;

use std::time::Duration;

use backhaul::relay::{
    AdmissionConfig, AuthRequest, EdgeName, Registry, CLOSE_UNREGISTERED, REGISTER_SERVICE,
};
use backhaul::{ClientEvent, Error, Metadata, RejectCode};
use tokio::task::JoinSet;
use tower::ServiceBuilder;

use relay_fixture::{close_code, connect, eventually, register, Registration, TestRelay};
use support::within;

const LIMIT: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(60);

/// The rejection a registration got, and the connection's close code after it.
async fn refusal(
    registration: Result<relay_fixture::TestEdge, Registration>,
) -> (RejectCode, String, Option<u64>) {
    match registration {
        Err(Registration::Refused(Error::StreamRejected { code, reason }, edge)) => {
            let closed = within(WAIT, close_code(&edge.connection)).await;
            (code, reason.unwrap_or_default(), closed)
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_the_connection_closed_and_the_source_backed_off() {
    within(LIMIT, async {
        let registry = Registry::new();
        let relay = TestRelay::start(&["alpha=secret"], registry.clone(), |acceptor| {
            acceptor.with_admission(AdmissionConfig {
                auth_backoff: Duration::from_secs(30),
                ..relay_fixture::open_admission()
            })
        });

        let guesser = relay.endpoint_from("127.0.0.1");
        let (code, reason, closed) =
            refusal(register(&guesser, relay.addr, "alpha", "guess").await).await;
        assert_eq!(code, RejectCode::Unauthorized);
        assert!(reason.contains("invalid credentials"), "{reason}");
        assert!(!reason.contains("secret"));
        assert_eq!(closed, Some(u64::from(CLOSE_UNREGISTERED)));
        assert!(registry.is_empty());

        // The source is backed off: its next handshake is refused before any TLS work.
        match register(&guesser, relay.addr, "alpha", "secret").await {
            Err(Registration::NotConnected(_)) => {}
            other => panic!("expected a refused handshake, got {:?}", other.map(|_| ())),
        }
        let counts = relay.stats.snapshot();
        assert_eq!(counts.unauthorized, 1, "{counts:?}");
        assert_eq!(counts.refused_source_backoff, 1, "{counts:?}");

        // Other malformed registrations, each from its own source: refused alike.
        let cases: [(&str, Metadata); 4] = [
            (
                "web",
                backhaul::relay::registration_metadata("alpha", "secret"),
            ),
            (REGISTER_SERVICE, Metadata::Empty),
            (REGISTER_SERVICE, Metadata::Bytes(b"alpha:secret".to_vec())),
            (
                REGISTER_SERVICE,
                backhaul::relay::registration_metadata(&"x".repeat(10_000), "s"),
            ),
        ];
        for (i, (service, metadata)) in cases.into_iter().enumerate() {
            let endpoint = relay.endpoint_from(&format!("127.0.0.{}", 10 + i));
            let edge = connect(&endpoint, relay.addr).await.expect("connects");
            let opened = edge.client.open(service, metadata).await;
            match opened {
                Err(Error::StreamRejected {
                    code: RejectCode::Unauthorized,
                    reason,
                }) => assert!(
                    reason.unwrap_or_default().len() < 300,
                    "case {i}: reasons are short"
                ),
                other => panic!(
                    "case {i}: expected Unauthorized, got {:?}",
                    other.map(|_| ())
                ),
            }
            let code = within(WAIT, close_code(&edge.connection)).await;
            assert_eq!(code, Some(u64::from(CLOSE_UNREGISTERED)), "case {i}");
        }

        // The right token from a clean source registers.
        let honest = relay.endpoint_from("127.0.0.2");
        let edge = register(&honest, relay.addr, "alpha", "secret")
            .await
            .expect("registers");
        assert!(registry.contains("alpha"));
        let counts = relay.stats.snapshot();
        assert_eq!(
            (counts.unauthorized, counts.registered),
            (5, 1),
            "{counts:?}"
        );
        drop(edge);
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_caps_hold_against_many_hello_only_connections() {
    const SOURCES: usize = 4;
    const PER_SOURCE: usize = 8;
    const MAX_UNREGISTERED: usize = 10;
    const MAX_PER_SOURCE: usize = 3;
    within(LIMIT, async {
        let registry = Registry::new();
        let relay = TestRelay::start(&["alpha=secret"], registry.clone(), |acceptor| {
            acceptor
                .with_admission(AdmissionConfig {
                    max_unregistered: MAX_UNREGISTERED,
                    max_unregistered_per_source: MAX_PER_SOURCE,
                    ..relay_fixture::open_admission()
                })
                .with_register_timeout(Duration::from_secs(4))
        });

        // Many connections that finish their handshakes and then say nothing.
        let mut dialing = JoinSet::new();
        for source in 0..SOURCES {
            let endpoint = relay.endpoint_from(&format!("127.0.0.{}", 20 + source));
            for _ in 0..PER_SOURCE {
                let endpoint = endpoint.clone();
                let addr = relay.addr;
                dialing.spawn(async move { (source, connect(&endpoint, addr).await.ok()) });
            }
        }
        let mut admitted_by_source = [0usize; SOURCES];
        let mut silent = Vec::new();
        for (source, connected) in dialing.join_all().await {
            if let Some(edge) = connected {
                admitted_by_source[source] += 1;
                silent.push(edge);
            }
        }
        let admitted: usize = admitted_by_source.iter().sum();
        eprintln!(
            "admitted {admitted} of {} Hello-only connections: {admitted_by_source:?}",
            SOURCES * PER_SOURCE
        );
        assert!(admitted <= MAX_UNREGISTERED, "{admitted_by_source:?}");
        assert!(
            admitted_by_source.iter().all(|n| *n <= MAX_PER_SOURCE),
            "{admitted_by_source:?}"
        );
        assert!(
            admitted >= MAX_PER_SOURCE,
            "some got in: {admitted_by_source:?}"
        );
        let counts = relay.stats.snapshot();
        assert!(counts.unregistered <= MAX_UNREGISTERED, "{counts:?}");
        assert!(
            counts.refused_unregistered_cap >= (SOURCES * PER_SOURCE - MAX_UNREGISTERED) as u64,
            "{counts:?}"
        );

        // Past the registration timeout the silent ones are closed and the slots return…
        for edge in &silent {
            let code = within(WAIT, close_code(&edge.connection)).await;
            assert_eq!(code, Some(u64::from(CLOSE_UNREGISTERED)));
        }
        eventually(WAIT, "the slots are given back", || {
            let stats = relay.stats.clone();
            async move { stats.snapshot().unregistered == 0 }
        })
        .await;
        assert_eq!(relay.stats.snapshot().timed_out, admitted as u64);

        // …and an honest edge gets in.
        let endpoint = relay.endpoint_from("127.0.0.20");
        let _edge = register(&endpoint, relay.addr, "alpha", "secret")
            .await
            .expect("registers");
        assert!(registry.contains("alpha"));
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_tower_service_authenticates_and_its_failures_are_not_the_edges_fault() {
    within(LIMIT, async {
        // Accepts any edge whose token is its name reversed, registered under
        // "team-<name>"; "down" stands for a database that does not answer, "slow" for one
        // too slow for the timeout layer.
        let authenticate = tower::service_fn(|request: AuthRequest| async move {
            match request.token() {
                Some("down") => Err(Error::transport(std::io::Error::other("database down"))),
                Some("slow") => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Err(Error::Unauthorized { reason: None })
                }
                Some(token) if token.chars().rev().eq(request.edge.chars()) => {
                    EdgeName::new(format!("team-{}", request.edge))
                }
                _ => Err(Error::Unauthorized {
                    reason: Some("ask the team for a token".to_owned()),
                }),
            }
        });
        let authenticator = ServiceBuilder::new()
            .timeout(Duration::from_millis(500))
            .service(authenticate);
        let registry = Registry::new();
        let relay = TestRelay::start_with(registry.clone(), |endpoint, registry| {
            backhaul::relay::Acceptor::new(endpoint, registry, authenticator)
                .with_admission(AdmissionConfig {
                    auth_backoff: Duration::from_secs(30),
                    ..relay_fixture::open_admission()
                })
                .serve()
        });
        let endpoint = relay.endpoint_from("127.0.0.30");

        // The backend fails or is too slow: "unavailable", and the source is not backed off.
        for token in ["down", "slow"] {
            let (code, reason, _) =
                refusal(register(&endpoint, relay.addr, "abc", token).await).await;
            assert_eq!(code, RejectCode::ServiceUnavailable, "{token}");
            assert!(reason.contains("unavailable"), "{reason}");
        }
        // Accepted under the name the service chose.
        let edge = register(&endpoint, relay.addr, "abc", "cba")
            .await
            .expect("registers");
        assert!(registry.contains("team-abc"));
        // Refused with the service's reason; now the source is backed off.
        let (code, reason, _) = refusal(register(&endpoint, relay.addr, "abc", "abc").await).await;
        assert_eq!(
            (code, reason.as_str()),
            (RejectCode::Unauthorized, "ask the team for a token")
        );
        assert!(matches!(
            register(&endpoint, relay.addr, "abc", "cba").await,
            Err(Registration::NotConnected(_))
        ));
        drop(edge);
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_tells_every_edge_and_empties_the_registry() {
    const EDGES: usize = 50;
    within(LIMIT, async {
        let tasks_before = support::alive_tasks();
        let entries: Vec<String> = (0..EDGES).map(|i| format!("edge-{i}=t{i}")).collect();
        let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
        let registry = Registry::new();
        let relay = TestRelay::start(&entries, registry.clone(), |acceptor| acceptor);
        let endpoint = relay.endpoint_from("127.0.0.40");
        let mut edges = Vec::new();
        for i in 0..EDGES {
            edges.push(
                register(
                    &endpoint,
                    relay.addr,
                    &format!("edge-{i}"),
                    &format!("t{i}"),
                )
                .await
                .expect("registers"),
            );
        }
        assert_eq!(registry.len(), EDGES);
        let addr = relay.addr;
        let started = std::time::Instant::now();
        relay.shutdown().await;
        eprintln!("shut down with {EDGES} edges in {:?}", started.elapsed());
        assert!(registry.is_empty(), "{:?}", registry.names());
        for mut edge in edges {
            // Each edge heard why before its connection closed.
            let mut told = false;
            while let Some(event) = within(WAIT, edge.events.recv()).await {
                if let ClientEvent::Closing { reason, .. } = event {
                    told = reason.as_deref() == Some("relay shutting down");
                }
            }
            assert!(told, "an edge was not told");
            assert!(matches!(
                within(WAIT, edge.client.closed()).await,
                Error::SessionClosed | Error::Disconnected
            ));
        }
        // Nobody answers new connections (the socket is gone: the dial fails or waits).
        let dialed = tokio::time::timeout(Duration::from_secs(3), connect(&endpoint, addr)).await;
        assert!(!matches!(dialed, Ok(Ok(_))), "a connection after shutdown");
        drop(endpoint);
        let tasks = support::settle_tasks(tasks_before).await;
        assert!(
            tasks <= tasks_before,
            "{tasks} tasks alive, {tasks_before} before"
        );
    })
    .await;
}
