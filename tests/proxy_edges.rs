//! The HTTP reverse proxy's edge-facing side under hostile and clumsy peers, as separate
//! processes on loopback: unregistered QUIC connections capped and their memory returned,
//! token guessing closed, backed off and summarised, forged names kept out of the log, the
//! relay's identity kept across restarts, edges that do not trust the relay stopping
//! plainly, tokens hidden from --help, the edge list opt-in, and one live edge per name.
//!
//! Hostile peers are test-side quinn clients speaking backhaul's session protocol, bound
//! to other loopback addresses (127.0.0.2…) so the relay sees them as other sources.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use backhaul::quic::{client_config, load_certs, DEFAULT_ALPN};
use backhaul::{
    Config, Error, Metadata, MetadataValue, QuinnConnection, RejectCode, Role, Session,
    SessionClient,
};
use http::StatusCode;
use support::proxy::{
    binary, bounded, eventually, write_cert_and_key, Backend, Proc, Relay, TempDir,
};

/// Upper bound for any one test.
const LIMIT: Duration = Duration::from_secs(90);

/// A quinn client endpoint bound to `ip` (a loopback address), trusting `cert`.
fn endpoint_from(ip: &str, cert: &Path) -> quinn::Endpoint {
    let trusted = load_certs(cert).expect("the relay's certificate");
    let bind: SocketAddr = format!("{ip}:0").parse().expect("an address");
    let mut endpoint = quinn::Endpoint::client(bind).expect("binding a client endpoint");
    endpoint.set_default_client_config(client_config(&trusted, DEFAULT_ALPN).expect("config"));
    endpoint
}

/// A connection that completes the QUIC and session handshakes and then says nothing.
async fn hello_only(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
) -> Option<(quinn::Connection, SessionClient<QuinnConnection>)> {
    let connection = endpoint.connect(relay, "localhost").ok()?.await.ok()?;
    let session = Session::new(
        QuinnConnection::new(connection.clone()),
        Role::Client,
        Config::new(),
    );
    let handle = tokio::time::timeout(Duration::from_secs(20), session.start())
        .await
        .ok()?
        .ok()?;
    Some((connection, SessionClient::new(handle)))
}

fn credentials(edge: &str, token: &str) -> Metadata {
    let mut fields = std::collections::HashMap::new();
    fields.insert("edge".to_owned(), MetadataValue::String(edge.to_owned()));
    fields.insert("token".to_owned(), MetadataValue::String(token.to_owned()));
    Metadata::Structured(fields)
}

/// How one registration attempt from a test client ended.
#[derive(Debug, PartialEq)]
enum Attempt {
    /// The relay refused the handshake (the source is backing off, or a cap).
    NotConnected,
    /// Registration refused with this reason.
    Unauthorized(Option<String>),
    /// Anything else.
    Other(String),
}

/// Connects and registers `edge` with `token`; returns how it went and the connection.
async fn try_register(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    edge: &str,
    token: &str,
) -> (Attempt, Option<quinn::Connection>) {
    let Some((connection, client)) = hello_only(endpoint, relay).await else {
        return (Attempt::NotConnected, None);
    };
    let opened = tokio::time::timeout(
        Duration::from_secs(20),
        client.open("_register", credentials(edge, token)),
    )
    .await;
    let attempt = match opened {
        Ok(Err(Error::StreamRejected {
            code: RejectCode::Unauthorized,
            reason,
        })) => Attempt::Unauthorized(reason),
        Ok(Err(error)) => Attempt::Other(error.to_string()),
        Ok(Ok(_)) => Attempt::Other("registered".to_owned()),
        Err(_) => Attempt::Other("no answer".to_owned()),
    };
    (attempt, Some(connection))
}

/// The relay's resident memory, in KiB (VmRSS in /proc/<pid>/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

async fn gauge(relay: &Relay, name: &str) -> f64 {
    relay.metrics().await.get(name, &[])
}

/// Sends a signal to a process (STOP, CONT…).
fn signal(proc: &Proc, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &proc.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
}

/// Opens `per_source` Hello-only connections from each of `sources` at once; returns the
/// ones that got through.
async fn flood(
    sources: &[&str],
    per_source: usize,
    relay: SocketAddr,
    cert: &Path,
) -> Vec<(
    quinn::Endpoint,
    Vec<(quinn::Connection, SessionClient<QuinnConnection>)>,
)> {
    let mut tasks = Vec::new();
    for ip in sources {
        let endpoint = endpoint_from(ip, cert);
        tasks.push(tokio::spawn(async move {
            let attempts: Vec<_> = (0..per_source)
                .map(|_| {
                    let endpoint = endpoint.clone();
                    tokio::spawn(async move { hello_only(&endpoint, relay).await })
                })
                .collect();
            let mut held = Vec::new();
            for attempt in attempts {
                if let Ok(Some(connection)) = attempt.await {
                    held.push(connection);
                }
            }
            (endpoint, held)
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("a flood task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_connections_are_capped_and_their_memory_returns() {
    bounded(LIMIT, async {
        let dir = TempDir::new("unregistered");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "alpha-secret"), ("beta", "beta-secret")],
            &[
                "--max-unregistered",
                "200",
                "--max-unregistered-per-source",
                "60",
                "--register-timeout",
                "5s",
                "--handshake-rate",
                "2000",
                "--handshake-burst",
                "2000",
            ],
        )
        .await;
        let _alpha = relay.spawn_edge("alpha", "alpha-secret", &[("web", backend.addr)], &[]);
        relay.wait_edges(1).await;
        let public = relay.public();
        assert_eq!(
            public.get("alpha", "/whoami").await,
            (StatusCode::OK, "web".to_owned())
        );
        let pid = relay.proc.id();
        let baseline = rss_kib(pid);
        let sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];

        let mut after_rounds = Vec::new();
        let mut beta = None;
        for round in 1..=2 {
            // 4 sources x 100 attempts: the per-source cap (60) and the overall cap (200)
            // both bind.
            let started = Instant::now();
            let held = flood(&sources, 100, relay.spec.quic, &relay.cert).await;
            let counts: Vec<usize> = held.iter().map(|(_, held)| held.len()).collect();
            let total: usize = counts.iter().sum();
            let unregistered = gauge(&relay, "backhaul_unregistered_connections").await;
            let peak = rss_kib(pid);
            eprintln!(
                "round {round}: {counts:?} = {total} Hello-only connections held after {:?}; \
                 relay reports {unregistered} unregistered; RSS {baseline} KiB -> {peak} KiB",
                started.elapsed()
            );
            assert!(counts.iter().all(|count| *count <= 60), "{counts:?}");
            assert!(total <= 200, "{total} connections got past a cap of 200");
            assert!(total >= 100, "only {total} connections got through");
            assert!(unregistered <= 200.0, "{unregistered}");
            let refused = relay.metrics().await.get(
                "backhaul_quic_handshakes_refused_total",
                &[("reason", "unregistered_cap")],
            );
            assert!(refused >= 200.0 * f64::from(round), "{refused}");

            // Registered edges are not affected meanwhile.
            assert_eq!(
                public.get("alpha", "/whoami").await,
                (StatusCode::OK, "web".to_owned())
            );
            if round == 1 {
                // A new edge gets in too, at the latest once the register timeout has
                // cleared the squatters (it retries with backoff until then).
                beta = Some(relay.spawn_edge(
                    "beta",
                    "beta-secret",
                    &[("web", backend.addr)],
                    &["--max-backoff", "1s"],
                ));
                relay.wait_edges(2).await;
                assert_eq!(
                    public.get("beta", "/whoami").await,
                    (StatusCode::OK, "web".to_owned())
                );
                eprintln!("beta registered {:?} into the flood", started.elapsed());
            }

            // The relay closes them at the register timeout; the slots come back.
            eventually(Duration::from_secs(20), "unregistered back to 0", || {
                let relay = &relay;
                async move {
                    (gauge(relay, "backhaul_unregistered_connections").await == 0.0).then_some(())
                }
            })
            .await;
            for (endpoint, held) in &held {
                for (connection, _) in held {
                    connection.close(0u32.into(), b"done");
                }
                endpoint.close(0u32.into(), b"done");
            }
            drop(held);
            // Let the relay drop the closed connections' state (quinn drains for a few
            // RTTs after a close).
            tokio::time::sleep(Duration::from_secs(3)).await;
            let after = rss_kib(pid);
            eprintln!("round {round}: RSS after they closed {after} KiB");
            after_rounds.push(after);
        }
        // Bounds (loopback, debug build): the flood's state is returned, within 16 MiB
        // of the baseline, and a second round does not add to the first.
        assert!(beta.is_some_and(|mut beta| beta.exited().is_none()));
        let (first, second) = (after_rounds[0], after_rounds[1]);
        assert!(
            first < baseline + 16 * 1024,
            "RSS {baseline} KiB before, {first} KiB after"
        );
        assert!(
            second < first + 4 * 1024,
            "RSS grows round after round: {first} KiB, then {second} KiB"
        );
    })
    .await;
}
