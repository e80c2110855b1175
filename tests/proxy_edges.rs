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

use backhaul::{QuinnConnection, SessionClient};
use http::StatusCode;
use support::peer::{endpoint_from, hello_only, try_register, Attempt};
use support::proxy::{
    binary, bounded, eventually, rss_kib, write_cert_and_key, Backend, Proc, Relay, TempDir,
};

/// Upper bound for any one test.
const LIMIT: Duration = Duration::from_secs(90);

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

/// The relay command line for `relay`'s ports and arguments (to start it by hand).
fn relay_command(relay: &Relay) -> Vec<String> {
    let mut command = vec![
        "relay".to_owned(),
        "--quic-listen".to_owned(),
        relay.spec.quic.to_string(),
        "--http-listen".to_owned(),
        relay.spec.http.to_string(),
        "--admin-listen".to_owned(),
        relay.spec.admin.to_string(),
    ];
    command.extend(relay.spec.args.iter().cloned());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_keeps_its_identity_and_guards_its_key() {
    bounded(LIMIT, async {
        let dir = TempDir::new("identity");
        let backend = Backend::start("web").await;
        // No --cert: the relay makes its own identity.
        let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], &[]).await;
        let key = dir.path().join("relay-key.pem");
        let cert_before = std::fs::read(&relay.cert).expect("the certificate");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key)
                .expect("the key file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "key file mode {mode:o}");
        }
        let edge = relay.spawn_edge(
            "alpha",
            "secret",
            &[("web", backend.addr)],
            &["--keepalive", "1s", "--max-backoff", "1s"],
        );
        relay.wait_edges(1).await;

        relay.proc.kill();
        relay.restart().await;
        assert_eq!(
            std::fs::read(&relay.cert).expect("the certificate"),
            cert_before
        );
        // The edge that pinned the certificate before the restart comes back.
        relay.wait_edges(1).await;
        let public = relay.public();
        assert_eq!(
            public.get("alpha", "/whoami").await,
            (StatusCode::OK, "web".to_owned())
        );
        assert!(!edge.stderr().contains("does not trust"), "{}", edge.logs());

        // A key others can read is refused, with what to do.
        relay.proc.kill();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        let mut refused = Proc::spawn("relay-open-key", dir.path(), &relay_command(&relay));
        let status = refused.wait_exit(Duration::from_secs(15)).await;
        assert!(!status.success(), "{}", refused.logs());
        refused
            .wait_for_stderr("chmod 600", |stderr| stderr.contains("chmod 600"))
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_does_not_trust_the_relay_says_so_and_exits_3() {
    bounded(LIMIT, async {
        let dir = TempDir::new("untrusted");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], &[]).await;
        // A certificate from another relay (same generator, same subject: the signature
        // check is what fails, as after a relay made itself a new certificate).
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).expect("a dir");
        let (stale, _) = write_cert_and_key(&other);
        let stale_arg = stale.to_str().expect("a UTF-8 path");
        let args: Vec<String> = [
            "edge",
            "--relay",
            &relay.spec.quic.to_string(),
            "--relay-cert",
            stale_arg,
            "--name",
            "alpha",
            "--token",
            "secret",
            "--expose",
            &format!("web=http://{}", backend.addr),
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        let mut edge = Proc::spawn("edge-stale-cert", dir.path(), &args);
        let status = edge.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(3), "{}", edge.logs());
        let stderr = edge
            .wait_for_stderr("the untrusted-relay error", |stderr| {
                stderr.contains("does not trust")
                    && stderr.contains(stale_arg)
                    && stderr.contains("copy its current certificate")
            })
            .await;
        assert!(stderr.contains("does not trust"), "{stderr}");
        assert!(stderr.contains(stale_arg), "{stderr}");
        assert!(stderr.contains("copy its current certificate"), "{stderr}");
        assert_eq!(relay.edges().await, Some(0));

        // A relay that is down is not a trust problem: the edge keeps retrying.
        relay.proc.kill();
        let mut waiting = relay.spawn_edge("alpha", "secret", &[("web", backend.addr)], &[]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(waiting.exited().is_none(), "{}", waiting.logs());
        relay.restart().await;
        relay.wait_edges(1).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guessing_is_closed_backed_off_and_summarised() {
    bounded(LIMIT, async {
        let dir = TempDir::new("guessing");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(dir.path(), &[("alpha", "right")], &[]).await;
        let relay_addr = relay.spec.quic;
        let endpoint = endpoint_from("127.0.0.2", &relay.cert);

        // The guesser: register with a wrong token, and reconnect whenever closed, for 5 s.
        let guesser = tokio::spawn(async move {
            let mut answered = Vec::new();
            let mut not_connected = 0;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                let (attempt, connection) =
                    try_register(&endpoint, relay_addr, "alpha", "guess").await;
                match attempt {
                    Attempt::NotConnected => not_connected += 1,
                    other => answered.push(other),
                }
                if let Some(connection) = connection {
                    // The relay closes the connection after the refusal: a second guess on
                    // it goes nowhere.
                    let closed =
                        tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
                    assert!(closed.is_ok(), "the relay kept a refused connection open");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (answered, not_connected)
        });
        // Meanwhile an honest edge (another source) registers and serves.
        let _edge = relay.spawn_edge("alpha", "right", &[("web", backend.addr)], &[]);
        relay.wait_edges(1).await;
        assert_eq!(
            relay.public().get("alpha", "/whoami").await,
            (StatusCode::OK, "web".to_owned())
        );

        let (answered, not_connected) = guesser.await.expect("the guesser");
        eprintln!(
            "in 5 s the guesser got {} answers and {not_connected} refused handshakes",
            answered.len()
        );
        // Backoff 1 s, 2 s, 4 s: at most 4 guesses in 5 s (one more for slack).
        assert!(
            (1..=5).contains(&answered.len()),
            "{} guesses answered",
            answered.len()
        );
        for attempt in &answered {
            assert_eq!(
                attempt,
                &Attempt::Unauthorized(Some("invalid credentials for edge \"alpha\"".to_owned()))
            );
        }
        assert!(not_connected >= 10, "{not_connected} refused handshakes");
        let metrics = relay.metrics().await;
        assert_eq!(
            metrics.get(
                "backhaul_edge_registrations_total",
                &[("outcome", "unauthorized")]
            ),
            answered.len() as f64
        );
        assert!(
            metrics.get(
                "backhaul_edge_registrations_total",
                &[("outcome", "rate_limited")]
            ) >= not_connected as f64 * 0.9,
        );
        // The log: the first refusal of each kind in full, nothing per guess.
        let log = relay.proc.stdout();
        let lines = log.lines().filter(|line| line.contains("WARN")).count();
        assert!(lines <= 4, "{lines} warnings for one guesser:\n{log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_edge_name_cannot_forge_log_lines() {
    bounded(LIMIT, async {
        let dir = TempDir::new("forged");
        let relay = Relay::start(dir.path(), &[("alpha", "right")], &[]).await;
        let endpoint = endpoint_from("127.0.0.3", &relay.cert);
        let forged = "evil\n\x1b[31mFAKE ERROR relay compromised";
        let (attempt, _connection) = try_register(&endpoint, relay.spec.quic, forged, "x").await;
        assert_eq!(
            attempt,
            Attempt::Unauthorized(Some(
                "invalid credentials for edge \"evil\\n\\u{1b}[31mFAKE ERROR relay compromised\""
                    .to_owned()
            ))
        );
        let log = eventually(Duration::from_secs(10), "the refusal logged", || {
            let log = relay.proc.stdout();
            async move { log.contains("registration refused").then_some(log) }
        })
        .await;
        assert!(!log.contains('\x1b'), "{log:?}");
        assert!(
            !log.lines()
                .any(|line| line.contains("FAKE") && !line.contains("evil")),
            "a forged line:\n{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_help_does_not_show_the_tokens() {
    let output = Command::new(binary())
        .args(["relay", "--help"])
        .env("BACKHAUL_EDGE_TOKENS", "alpha=hunter2-super-secret")
        .output()
        .expect("running relay --help");
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{help}");
    assert!(help.contains("--edge-token"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_lists_edges_only_when_asked() {
    bounded(LIMIT, async {
        let dir = TempDir::new("index");
        let backend = Backend::start("web").await;
        for (extra, listed) in [(&[][..], false), (&["--list-edges"][..], true)] {
            let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], extra).await;
            let _edge = relay.spawn_edge("alpha", "secret", &[("web", backend.addr)], &[]);
            relay.wait_edges(1).await;
            let (status, index) = relay.public().get("", "/").await;
            assert_eq!(status, StatusCode::OK);
            assert!(index.starts_with("backhaul relay"), "{index}");
            assert_eq!(index.contains("alpha"), listed, "{extra:?}: {index}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_edge_keeps_its_name_and_a_silent_one_is_replaced() {
    bounded(LIMIT, async {
        let dir = TempDir::new("duplicate");
        let first_app = Backend::start("first").await;
        let second_app = Backend::start("second").await;
        // A long keep-alive: the relay would not notice a silent edge by itself in time.
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "secret")],
            &["--keepalive", "60s", "--takeover-ping-timeout", "2s"],
        )
        .await;
        let public = relay.public();
        let fast = ["--max-backoff", "1s"];
        let mut first = relay.spawn_edge("alpha", "secret", &[("web", first_app.addr)], &fast);
        relay.wait_edges(1).await;

        // Same name, same token, while the first is alive: refused, loudly, and it waits.
        let mut second = relay.spawn_edge("alpha", "secret", &[("web", second_app.addr)], &fast);
        eventually(Duration::from_secs(20), "the second edge refused", || {
            let refused = second.stdout().contains("ANOTHER EDGE IS CONNECTED");
            async move { refused.then_some(()) }
        })
        .await;
        second
            .wait_for_log("already connected", |log| log.contains("already connected"))
            .await;
        for _ in 0..5 {
            assert_eq!(
                public.get("alpha", "/whoami").await,
                (StatusCode::OK, "first".to_owned())
            );
        }
        assert!(second.exited().is_none(), "{}", second.logs());
        assert!(
            !first.stdout().contains("lost the relay"),
            "{}",
            first.logs()
        );
        assert!(
            relay.metrics().await.get(
                "backhaul_edge_registrations_total",
                &[("outcome", "name_taken")]
            ) >= 1.0
        );

        // The first edge goes silent (its network drops, say): the second takes over.
        signal(&first, "STOP");
        let stopped = Instant::now();
        eventually(
            Duration::from_secs(20),
            "the second edge takes over",
            || {
                let public = public.clone();
                async move {
                    public
                        .try_get("alpha", "/whoami")
                        .await
                        .filter(|answer| answer.1 == "second")
                }
            },
        )
        .await;
        eprintln!(
            "took over {:?} after the holder went silent",
            stopped.elapsed()
        );
        signal(&first, "CONT");

        // The first, back, finds its name held by a live edge and waits in turn; when the
        // second stops, it takes the name back.
        eventually(Duration::from_secs(20), "the first edge refused", || {
            let refused = first.stdout().contains("ANOTHER EDGE IS CONNECTED");
            async move { refused.then_some(()) }
        })
        .await;
        second.kill();
        eventually(Duration::from_secs(30), "the first edge back", || {
            let public = public.clone();
            async move {
                public
                    .try_get("alpha", "/whoami")
                    .await
                    .filter(|answer| answer.1 == "first")
            }
        })
        .await;
        assert!(first.exited().is_none(), "{}", first.logs());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_asking_for_more_lanes_than_allowed_gets_the_limit_and_is_served() {
    bounded(LIMIT, async {
        let dir = TempDir::new("lanes");
        let backend = Backend::start("web").await;
        let mut relay =
            Relay::start(dir.path(), &[("alpha", "secret")], &["--max-lanes", "3"]).await;
        // Asks for four: the relay allows three.
        let _edge = relay.spawn_edge(
            "alpha",
            "secret",
            &[("web", backend.addr)],
            &["--lanes", "4"],
        );
        relay.wait_edges(1).await;
        eventually(LIMIT, "two lanes joined and one refused", || async {
            let scrape = relay.metrics().await;
            let count =
                |outcome| scrape.sample("backhaul_edge_lanes_total", &[("outcome", outcome)]);
            (count("joined") == Some(2.0) && count("refused") == Some(1.0)).then_some(())
        })
        .await;
        let public = relay.public();
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let public = public.clone();
            requests.spawn(async move { public.get("alpha", "/whoami").await });
        }
        while let Some(answer) = requests.join_next().await {
            assert_eq!(
                answer.expect("a request"),
                (StatusCode::OK, "web".to_owned())
            );
        }
        // Refused for being full, not for a bad key: nothing counted as unauthorized.
        let scrape = relay.metrics().await;
        assert_eq!(
            scrape.get(
                "backhaul_edge_registrations_total",
                &[("outcome", "unauthorized")]
            ),
            0.0
        );
    })
    .await;
}
