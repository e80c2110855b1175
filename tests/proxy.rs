//! The HTTP reverse proxy example end to end: the relay and each edge run as separate
//! processes (the built `http_reverse_proxy` example) on loopback, the backends they expose
//! are axum apps in the test process, and a real HTTP client talks to the relay with
//! `Host: <edge>.localhost:<port>`. Readiness is read from the relay's /healthz, and every
//! child process is killed when its guard drops, even when a test fails.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use support::http::{checksum_body, Checksum, PatternBody};
use support::proxy::{
    bounded, boxed, empty, eventually, full, text, write_cert_and_key, Backend, Relay, TempDir,
};
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for any one test.
const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_to_edges_and_services() {
    routes_by_host_to_edges_and_services_with(&[]).await;
}

/// The same on the relay's full path (`--no-express`: hyper's server and client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_to_edges_and_services_on_the_full_path() {
    routes_by_host_to_edges_and_services_with(&["--no-express"]).await;
}

async fn routes_by_host_to_edges_and_services_with(relay_flags: &[&str]) {
    bounded(LIMIT, async {
        let dir = TempDir::new("routing");
        let alpha_web = Backend::start("alpha-web").await;
        let alpha_api = Backend::start("alpha-api").await;
        let beta_web = Backend::start("beta-web").await;
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "alpha-secret"), ("beta", "beta-secret")],
            // The edge list on the index page is opt-in.
            &[&["--list-edges"], relay_flags].concat(),
        )
        .await;
        let _alpha = relay.spawn_edge(
            "alpha",
            "alpha-secret",
            &[("web", alpha_web.addr), ("api", alpha_api.addr)],
            &[],
        );
        let _beta = relay.spawn_edge("beta", "beta-secret", &[("web", beta_web.addr)], &[]);
        relay.wait_edges(2).await;
        let public = relay.public();

        // <edge>.localhost reaches that edge's default service; two edges, two backends.
        assert_eq!(
            public.get("alpha", "/whoami").await,
            (StatusCode::OK, "alpha-web".to_owned())
        );
        assert_eq!(
            public.get("beta", "/whoami").await,
            (StatusCode::OK, "beta-web".to_owned())
        );
        // <service>.<edge>.localhost reaches a named service; host matching ignores case.
        assert_eq!(
            public.get("api.alpha", "/whoami").await,
            (StatusCode::OK, "alpha-api".to_owned())
        );
        assert_eq!(
            public.get("WEB.Beta", "/whoami").await,
            (StatusCode::OK, "beta-web".to_owned())
        );
        // A request body goes through too.
        let response = public
            .send(public.request(Method::POST, &public.host("beta"), "/echo", full("ping")))
            .await;
        assert_eq!(
            text(response).await,
            (StatusCode::OK, "you sent: ping".to_owned())
        );

        // The backend sees the public Host and the forwarding headers.
        let (status, headers) = public.get("alpha", "/headers").await;
        assert_eq!(status, StatusCode::OK);
        let host = public.host("alpha");
        for expected in [
            format!("host: {host}"),
            format!("x-forwarded-host: {host}"),
            "x-forwarded-for: 127.0.0.1".to_owned(),
            "x-forwarded-proto: http".to_owned(),
        ] {
            assert!(
                headers.lines().any(|line| line == expected),
                "{expected:?} missing from\n{headers}"
            );
        }

        // Hosts outside the domain, or with too many labels: 404.
        for host in ["example.com", "a.b.alpha.localhost", "localhost.example"] {
            let (status, body) = public.get_host(host, "/").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{host}: {body}");
            assert!(body.contains("unknown host"), "{host}: {body}");
        }
        // An edge that is not connected, and a service the edge does not expose: 502.
        let (status, body) = public.get("gamma", "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert!(body.contains("edge \"gamma\" is not connected"), "{body}");
        let (status, body) = public.get("nope.alpha", "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert!(
            body.contains("edge \"alpha\" has no service \"nope\""),
            "{body}"
        );

        // The bare domain: the relay's index listing the connected edges.
        let (status, index) = public.get("", "/").await;
        assert_eq!(status, StatusCode::OK, "{index}");
        assert!(index.contains("connected edges (2)"), "{index}");
        assert!(index.contains("http://alpha.localhost/"), "{index}");
        assert!(index.contains("http://beta.localhost/"), "{index}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_64_mib_both_ways_with_checksums() {
    streams_64_mib_both_ways_with_checksums_with(&[]).await;
}

/// The same on the relay's full path (`--no-express`: hyper's server and client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_64_mib_both_ways_with_checksums_on_the_full_path() {
    streams_64_mib_both_ways_with_checksums_with(&["--no-express"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_64_mib_both_ways_with_checksums_on_one_thread() {
    streams_64_mib_both_ways_with_checksums_with(&["--worker-threads", "1"]).await;
}

async fn streams_64_mib_both_ways_with_checksums_with(relay_flags: &[&str]) {
    const LEN: u64 = 64 << 20;
    bounded(LIMIT, async {
        let dir = TempDir::new("stream");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], relay_flags).await;
        let _edge = relay.spawn_edge("alpha", "secret", &[("web", backend.addr)], &[]);
        relay.wait_edges(1).await;
        let public = relay.public();
        let expected = PatternBody::checksum(LEN);
        let host = public.host("alpha");

        // Both directions at once, each streamed and checksummed chunk by chunk.
        let download = async {
            let response = public
                .send(public.request(Method::GET, &host, &format!("/download/{LEN}"), empty()))
                .await;
            assert_eq!(response.status(), StatusCode::OK);
            checksum_body(response.into_body())
                .await
                .expect("download body")
        };
        let upload = async {
            let response = public
                .send(public.request(Method::POST, &host, "/upload", boxed(PatternBody::new(LEN))))
                .await;
            text(response).await
        };
        let started = Instant::now();
        let (downloaded, uploaded): (Checksum, _) = tokio::join!(download, upload);
        eprintln!(
            "64 MiB each way through relay and edge in {:?}",
            started.elapsed()
        );
        assert_eq!(downloaded, expected, "download checksum");
        assert_eq!(
            uploaded,
            (StatusCode::OK, expected.header()),
            "upload checksum"
        );
    })
    .await;
}

/// Uploads a service answers before their end: a 413 from a body limit (the service then
/// closes with the rest unread) reaches the client, and a body echoed back as it comes
/// arrives whole. Through an edge passing streams through (`--pass-through`) and one
/// serving HTTP itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_before_the_uploads_end_reach_the_client() {
    answers_before_the_uploads_end_reach_the_client_with(&[]).await;
}

/// The same on the relay's full path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_before_the_uploads_end_reach_the_client_on_the_full_path() {
    answers_before_the_uploads_end_reach_the_client_with(&["--no-express"]).await;
}

async fn answers_before_the_uploads_end_reach_the_client_with(relay_flags: &[&str]) {
    const REFUSED: u64 = 8 << 20;
    const ECHOED: u64 = 16 << 20;
    bounded(LIMIT, async {
        let dir = TempDir::new("early");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "secret"), ("beta", "secret")],
            relay_flags,
        )
        .await;
        let _passing = relay.spawn_edge(
            "alpha",
            "secret",
            &[("web", backend.addr)],
            &["--pass-through", "web"],
        );
        let _serving = relay.spawn_edge("beta", "secret", &[("web", backend.addr)], &[]);
        relay.wait_edges(2).await;
        let public = relay.public();
        for edge in ["alpha", "beta"] {
            let host = public.host(edge);
            for _ in 0..3 {
                let response = public
                    .send(public.request(
                        Method::POST,
                        &host,
                        "/limited",
                        boxed(PatternBody::new(REFUSED)),
                    ))
                    .await;
                assert_eq!(
                    response.status(),
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "through {edge}"
                );
            }
            let response = public
                .send(public.request(
                    Method::POST,
                    &host,
                    "/duplex",
                    boxed(PatternBody::new(ECHOED)),
                ))
                .await;
            assert_eq!(response.status(), StatusCode::OK, "through {edge}");
            let echoed = checksum_body(response.into_body())
                .await
                .expect("the echoed body");
            assert_eq!(echoed, PatternBody::checksum(ECHOED), "through {edge}");
            assert_eq!(
                public.get(edge, "/").await,
                (StatusCode::OK, "hello from the edge".to_owned())
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_200_concurrent_requests_correctly() {
    answers_200_concurrent_requests_correctly_with(&[]).await;
}

/// The same on the relay's full path (`--no-express`: hyper's server and client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_200_concurrent_requests_correctly_on_the_full_path() {
    answers_200_concurrent_requests_correctly_with(&["--no-express"]).await;
}

/// The relay on one thread (`--worker-threads 1`, a current-thread runtime), as the edge
/// runs by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_200_concurrent_requests_correctly_on_one_thread() {
    answers_200_concurrent_requests_correctly_with(&["--worker-threads", "1"]).await;
}

async fn answers_200_concurrent_requests_correctly_with(relay_flags: &[&str]) {
    bounded(LIMIT, async {
        let dir = TempDir::new("concurrent");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], relay_flags).await;
        let _edge = relay.spawn_edge("alpha", "secret", &[("web", backend.addr)], &[]);
        relay.wait_edges(1).await;
        let public = relay.public();
        let host = public.host("alpha");

        let mut requests = tokio::task::JoinSet::new();
        for n in 0..200u32 {
            let public = public.clone();
            let host = host.clone();
            requests.spawn(async move {
                let (request, expected) = if n % 4 == 0 {
                    let body = format!("message {n}");
                    (
                        public.request(Method::POST, &host, "/echo", full(body.clone())),
                        format!("you sent: {body}"),
                    )
                } else {
                    (
                        public.request(Method::GET, &host, &format!("/n/{n}"), empty()),
                        format!("reply {n}"),
                    )
                };
                let answer = text(public.send(request).await).await;
                assert_eq!(answer, (StatusCode::OK, expected), "request {n}");
            });
        }
        let mut done = 0;
        while let Some(joined) = requests.join_next().await {
            joined.expect("a request task");
            done += 1;
        }
        assert_eq!(done, 200);
        let metrics = relay.metrics().await;
        assert_eq!(
            metrics.get("backhaul_http_requests_total", &[("code", "200")]),
            200.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echoes_through_relay_and_edge() {
    bounded(LIMIT, async {
        let dir = TempDir::new("websocket");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], &[]).await;
        let _edge = relay.spawn_edge("alpha", "secret", &[("web", backend.addr)], &[]);
        relay.wait_edges(1).await;

        // A TCP connection to the relay's public port, upgraded with Host = the edge.
        let tcp = tokio::net::TcpStream::connect(relay.spec.http)
            .await
            .expect("connecting to the relay");
        let url = format!("ws://{}/ws", relay.host("alpha"));
        let (mut socket, response) = tokio_tungstenite::client_async(url.as_str(), tcp)
            .await
            .expect("WebSocket handshake through the relay");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);

        for word in ["hello", "through", "the tunnel"] {
            socket.send(Message::text(word)).await.expect("send");
            let reply = socket.next().await.expect("a reply").expect("a message");
            assert_eq!(reply, Message::text(format!("echo: {word}")));
        }
        let binary = support::pattern(b"websocket", 256 * 1024);
        socket
            .send(Message::binary(binary.clone()))
            .await
            .expect("send binary");
        let reply = socket.next().await.expect("a reply").expect("a message");
        assert_eq!(reply.into_data().as_ref(), binary.as_slice());
        socket.close(None).await.expect("close");
        while let Some(message) = socket.next().await {
            if message.is_err() {
                break;
            }
        }
        let metrics = relay.metrics().await;
        assert_eq!(
            metrics.get("backhaul_http_requests_total", &[("code", "101")]),
            1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_502_when_the_edge_is_down() {
    bounded(LIMIT, async {
        let dir = TempDir::new("edge-down");
        let backend = Backend::start("web").await;
        // Short keep-alive so the relay notices a killed edge quickly.
        let mut relay =
            Relay::start(dir.path(), &[("alpha", "secret")], &["--keepalive", "1s"]).await;
        let public = relay.public();

        // Never started.
        let (status, body) = public.get("alpha", "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert_eq!(body, "edge \"alpha\" is not connected\n");

        let mut edge = relay.spawn_edge("alpha", "secret", &[("web", backend.addr)], &[]);
        relay.wait_edges(1).await;
        assert_eq!(
            public.get("alpha", "/whoami").await,
            (StatusCode::OK, "web".to_owned())
        );

        // Killed outright (no goodbye): the relay's keep-alive drops it within ~2 s.
        edge.kill();
        let started = Instant::now();
        relay.wait_edges(0).await;
        eprintln!(
            "the relay noticed the killed edge in {:?}",
            started.elapsed()
        );
        let (status, body) = public.get("alpha", "/whoami").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert_eq!(body, "edge \"alpha\" is not connected\n");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_makes_the_edge_exit_2_and_routes_nothing() {
    bounded(LIMIT, async {
        let dir = TempDir::new("wrong-token");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(dir.path(), &[("alpha", "right")], &[]).await;
        let public = relay.public();

        let mut edge = relay.spawn_edge("alpha", "wrong", &[("web", backend.addr)], &[]);
        let status = edge.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(2), "{}", edge.logs());
        edge.wait_for_stderr("the unauthorized error", |stderr| {
            stderr.contains("error: unauthorized: invalid credentials for edge \"alpha\"")
        })
        .await;

        // An edge name the relay does not know is refused the same way.
        let mut stranger = relay.spawn_edge("mallory", "right", &[("web", backend.addr)], &[]);
        let status = stranger.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(2), "{}", stranger.logs());
        stranger
            .wait_for_stderr("unauthorized", |stderr| stderr.contains("unauthorized"))
            .await;

        assert_eq!(relay.edges().await, Some(0));
        let (status, body) = public.get("alpha", "/whoami").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        let (status, _) = public.get("mallory", "/whoami").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        let metrics = relay.metrics().await;
        assert_eq!(
            metrics.get(
                "backhaul_edge_registrations_total",
                &[("outcome", "unauthorized")]
            ),
            2.0
        );
        assert_eq!(
            metrics.get("backhaul_edge_registrations_total", &[("outcome", "ok")]),
            0.0
        );
        assert_eq!(backend.holds.load(std::sync::atomic::Ordering::SeqCst), 0);
        relay.wait_edges(0).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_name_cannot_be_taken_without_its_token() {
    bounded(LIMIT, async {
        let dir = TempDir::new("impostor");
        let genuine = Backend::start("genuine").await;
        let impostor = Backend::start("impostor").await;
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "alpha-secret"), ("beta", "beta-secret")],
            &[],
        )
        .await;
        let public = relay.public();
        let mut first = relay.spawn_edge("alpha", "alpha-secret", &[("web", genuine.addr)], &[]);
        relay.wait_edges(1).await;
        assert_eq!(
            public.get("alpha", "/whoami").await,
            (StatusCode::OK, "genuine".to_owned())
        );

        // A second edge claims "alpha" with a token that is valid, but for "beta".
        let mut second = relay.spawn_edge("alpha", "beta-secret", &[("web", impostor.addr)], &[]);
        let status = second.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(2), "{}", second.logs());
        second
            .wait_for_stderr("unauthorized", |stderr| stderr.contains("unauthorized"))
            .await;

        // The first edge never noticed: still running, still registered, still serving.
        assert!(first.exited().is_none(), "{}", first.logs());
        assert_eq!(relay.edges().await, Some(1));
        for _ in 0..5 {
            assert_eq!(
                public.get("alpha", "/whoami").await,
                (StatusCode::OK, "genuine".to_owned())
            );
        }
        assert!(
            !first.stdout().contains("lost the relay"),
            "{}",
            first.logs()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_reconnects_after_the_relay_restarts() {
    bounded(LIMIT, async {
        let dir = TempDir::new("restart");
        let backend = Backend::start("web").await;
        // The relay's own certificate and key, so a restarted relay is the same relay.
        let (cert, key) = write_cert_and_key(dir.path());
        let mut relay =
            Relay::start_with_cert(dir.path(), &[("alpha", "secret")], &cert, &key, &[]).await;
        let mut edge = relay.spawn_edge(
            "alpha",
            "secret",
            &[("web", backend.addr)],
            &["--keepalive", "1s", "--max-backoff", "1s"],
        );
        relay.wait_edges(1).await;
        let public = relay.public();
        assert_eq!(
            public.get("alpha", "/whoami").await,
            (StatusCode::OK, "web".to_owned())
        );

        relay.proc.kill();
        assert!(public.try_get("alpha", "/whoami").await.is_none());
        tokio::time::sleep(Duration::from_millis(500)).await;
        relay.restart().await;
        let restarted = Instant::now();

        let answer = eventually(
            Duration::from_secs(15),
            "a request after the restart",
            || {
                let public = public.clone();
                async move {
                    public
                        .try_get("alpha", "/whoami")
                        .await
                        .filter(|(status, _)| *status == StatusCode::OK)
                }
            },
        )
        .await;
        eprintln!(
            "requests succeed again {:?} after the relay restarted",
            restarted.elapsed()
        );
        assert_eq!(answer.1, "web");
        assert!(restarted.elapsed() < Duration::from_secs(10));
        // The same edge process reconnected on its own.
        assert!(edge.exited().is_none(), "{}", edge.logs());
        edge.wait_for_log("reconnecting", |log| log.contains("reconnecting"))
            .await;
        relay.wait_edges(1).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent() {
    metrics_count_what_was_sent_with(&[]).await;
}

/// The same on the relay's full path (`--no-express`: hyper's server and client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent_on_the_full_path() {
    metrics_count_what_was_sent_with(&["--no-express"]).await;
}

async fn metrics_count_what_was_sent_with(relay_flags: &[&str]) {
    bounded(LIMIT, async {
        let dir = TempDir::new("metrics");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], relay_flags).await;
        let mut edge = relay.spawn_edge("alpha", "secret", &[("web", backend.addr)], &[]);
        relay.wait_edges(1).await;
        let public = relay.public();
        let host = public.host("alpha");

        let before = relay.metrics().await;
        assert_eq!(before.get("backhaul_edges_connected", &[]), 1.0);
        // The relay runs on shards (a runtime per core): the edge is on one of them.
        let on_shards: f64 = (0..256)
            .map(|shard| before.get("backhaul_shard_edges", &[("shard", &shard.to_string())]))
            .sum();
        assert_eq!(on_shards, 1.0);
        assert_eq!(
            before.get("backhaul_edge_registrations_total", &[("outcome", "ok")]),
            1.0
        );
        assert_eq!(
            before.get("backhaul_proxied_bytes_total", &[("direction", "to_edge")]),
            0.0
        );

        let mut to_edge = 0u64;
        let mut from_edge = 0u64;
        let mut ok = 0;
        for n in 0..5 {
            let (status, body) = public.get_bytes("alpha", &format!("/n/{n}")).await;
            assert_eq!(status, StatusCode::OK);
            from_edge += body.len() as u64;
            ok += 1;
        }
        let upload_len = 1 << 20;
        let (status, body) = text(
            public
                .send(public.request(
                    Method::POST,
                    &host,
                    "/upload",
                    boxed(PatternBody::new(upload_len)),
                ))
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        to_edge += upload_len;
        from_edge += body.len() as u64;
        ok += 1;
        let (status, body) = public.get_bytes("alpha", "/download/300000").await;
        assert_eq!((status, body.len()), (StatusCode::OK, 300_000));
        from_edge += 300_000;
        ok += 1;
        let (status, body) = text(
            public
                .send(public.request(Method::POST, &host, "/echo", full("abc")))
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        to_edge += 3;
        from_edge += body.len() as u64;
        ok += 1;
        for _ in 0..3 {
            assert_eq!(public.get("gamma", "/").await.0, StatusCode::BAD_GATEWAY);
        }
        for _ in 0..2 {
            assert_eq!(
                public.get_host("example.com", "/").await.0,
                StatusCode::NOT_FOUND
            );
        }
        // A service the edge does not have: the edge rejects the open.
        assert_eq!(
            public.get("nope.alpha", "/").await.0,
            StatusCode::BAD_GATEWAY
        );

        let after = relay.metrics().await;
        // The plain GETs at least take the express lane, unless it is off.
        let express = after.get("backhaul_http_express_requests_total", &[]);
        // What the route leaves to the full path (unknown edges and hosts) is counted
        // once per connection: later requests on it are hyper's without asking.
        let left = after.get(
            "backhaul_http_express_handovers_total",
            &[("reason", "route")],
        );
        if relay_flags.contains(&"--no-express") {
            assert_eq!(express, 0.0);
            assert_eq!(left, 0.0);
        } else {
            assert!(
                (5.0..=f64::from(ok) + 1.0).contains(&express),
                "express: {express}"
            );
            assert!((1.0..=5.0).contains(&left), "handed over: {left}");
        }
        let requests = |code| after.get("backhaul_http_requests_total", &[("code", code)]);
        assert_eq!(requests("200"), f64::from(ok));
        assert_eq!(requests("502"), 4.0);
        assert_eq!(requests("404"), 2.0);
        assert_eq!(
            after.get(
                "backhaul_http_request_duration_seconds_count",
                &[("class", "2xx")]
            ),
            f64::from(ok)
        );
        assert_eq!(
            after.get("backhaul_proxied_bytes_total", &[("direction", "to_edge")]),
            to_edge as f64
        );
        assert_eq!(
            after.get(
                "backhaul_proxied_bytes_total",
                &[("direction", "from_edge")]
            ),
            from_edge as f64
        );
        let opens = |outcome| after.get("backhaul_tunnel_opens_total", &[("outcome", outcome)]);
        assert_eq!(opens("rejected"), 1.0);
        // Keep-alive reuses tunnel streams: at least one open, at most one per request.
        assert!(
            (1.0..=f64::from(ok)).contains(&opens("ok")),
            "opens ok: {}",
            opens("ok")
        );
        for outcome in ["timeout", "disconnected", "error"] {
            assert_eq!(opens(outcome), 0.0, "opens {outcome}");
        }
        assert_eq!(after.get("backhaul_edges_connected", &[]), 1.0);

        // The gauge follows the edge going away.
        edge.terminate();
        assert!(edge.wait_exit(Duration::from_secs(15)).await.success());
        relay.wait_edges(0).await;
        assert_eq!(
            relay.metrics().await.get("backhaul_edges_connected", &[]),
            0.0
        );
    })
    .await;
}

/// On the express lane (the default) and on the full path alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_tunnel_streams_follow_the_pool_flags() {
    kept_alive_tunnel_streams_follow_the_pool_flags_with(&[]).await;
}

/// The same on the relay's full path (`--no-express`: hyper's server and client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_tunnel_streams_follow_the_pool_flags_on_the_full_path() {
    kept_alive_tunnel_streams_follow_the_pool_flags_with(&["--no-express"]).await;
}

async fn kept_alive_tunnel_streams_follow_the_pool_flags_with(relay_flags: &[&str]) {
    bounded(LIMIT, async {
        let dir = TempDir::new("pool-flags");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "secret")],
            &[
                &["--pool-max-idle", "2", "--pool-idle-timeout", "2s"],
                relay_flags,
            ]
            .concat(),
        )
        .await;
        let _edge = relay.spawn_edge("alpha", "secret", &[("web", backend.addr)], &[]);
        relay.wait_edges(1).await;
        let public = relay.public();
        // Eight requests at once, each held by the backend: eight tunnel streams.
        let round = || async {
            let mut requests = tokio::task::JoinSet::new();
            for _ in 0..8 {
                let public = public.clone();
                requests.spawn(async move { public.get("alpha", "/hold/300").await });
            }
            while let Some(answer) = requests.join_next().await {
                assert_eq!(
                    answer.expect("a request task"),
                    (StatusCode::OK, "held 300 ms".to_owned())
                );
            }
        };
        let opened = || async {
            relay
                .metrics()
                .await
                .get("backhaul_tunnel_opens_total", &[("outcome", "ok")])
        };

        round().await;
        assert_eq!(opened().await, 8.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Only two streams were kept: the next eight reuse them and open six.
        round().await;
        assert_eq!(opened().await, 14.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(public.get("alpha", "/n/1").await.0, StatusCode::OK);
        assert_eq!(opened().await, 14.0, "a fresh idle stream is reused");
        // Past the idle timeout the kept streams are closed: a new request opens one.
        tokio::time::sleep(Duration::from_millis(2_700)).await;
        assert_eq!(public.get("alpha", "/n/2").await.0, StatusCode::OK);
        assert_eq!(
            opened().await,
            15.0,
            "an idle stream outlived --pool-idle-timeout"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_edge_finish_a_slow_request_and_exit_0() {
    bounded(LIMIT, async {
        let dir = TempDir::new("edge-sigterm");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], &[]).await;
        let mut edge = relay.spawn_edge("alpha", "secret", &[("web", backend.addr)], &[]);
        relay.wait_edges(1).await;
        let public = relay.public();

        let slow = tokio::spawn({
            let public = public.clone();
            async move { public.get("alpha", "/hold/2500").await }
        });
        let holds = std::sync::Arc::clone(&backend.holds);
        eventually(
            Duration::from_secs(10),
            "the slow request reaching the backend",
            || {
                let holds = std::sync::Arc::clone(&holds);
                async move { (holds.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(()) }
            },
        )
        .await;
        edge.terminate();
        let terminated = Instant::now();

        // The relay stops routing to the leaving edge: at first the edge may still refuse
        // new streams itself (503) before the relay has its goodbye, then 502. A fresh
        // client each time, so no pooled connection is reused.
        eventually(Duration::from_secs(5), "502 for a leaving edge", || {
            let fresh = relay.public();
            async move {
                let (status, body) = fresh.get("alpha", "/whoami").await;
                assert!(
                    [
                        StatusCode::OK,
                        StatusCode::BAD_GATEWAY,
                        StatusCode::SERVICE_UNAVAILABLE
                    ]
                    .contains(&status),
                    "{status}: {body}"
                );
                (status == StatusCode::BAD_GATEWAY).then_some(())
            }
        })
        .await;
        assert!(
            !slow.is_finished(),
            "the slow request ended before the check"
        );

        // ... while the request in flight completes.
        let answer = slow.await.expect("the slow request task");
        assert_eq!(answer, (StatusCode::OK, "held 2500 ms".to_owned()));
        let status = edge.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(0), "{}", edge.logs());
        eprintln!("the edge exited {:?} after SIGTERM", terminated.elapsed());
        edge.wait_for_log("edge stopped", |log| log.contains("edge stopped"))
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_relay_finish_a_slow_request_and_exit_0() {
    bounded(LIMIT, async {
        let dir = TempDir::new("relay-sigterm");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], &[]).await;
        let mut edge = relay.spawn_edge(
            "alpha",
            "secret",
            &[("web", backend.addr)],
            &["--max-backoff", "1s"],
        );
        relay.wait_edges(1).await;
        let public = relay.public();

        let slow = tokio::spawn({
            let public = public.clone();
            async move { public.get("alpha", "/hold/1500").await }
        });
        let holds = std::sync::Arc::clone(&backend.holds);
        eventually(
            Duration::from_secs(10),
            "the slow request reaching the backend",
            || {
                let holds = std::sync::Arc::clone(&holds);
                async move { (holds.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(()) }
            },
        )
        .await;
        relay.proc.terminate();
        let answer = slow.await.expect("the slow request task");
        assert_eq!(answer, (StatusCode::OK, "held 1500 ms".to_owned()));
        let status = relay.proc.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(0), "{}", relay.proc.logs());
        // The edge outlives its relay and keeps trying to reconnect.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(edge.exited().is_none(), "{}", edge.logs());
    })
    .await;
}

/// A slow edge gets 504 from the relay's request timeout; a busy one (its stream limit
/// reached) gets 503; both with a message saying which edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_edges_get_504_and_busy_edges_503() {
    bounded(LIMIT, async {
        let dir = TempDir::new("status-codes");
        let backend = Backend::start("web").await;
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "secret")],
            &["--request-timeout", "1s"],
        )
        .await;
        let public = relay.public();
        let _edge = relay.spawn_edge(
            "alpha",
            "secret",
            &[("web", backend.addr)],
            &["--max-streams", "1"],
        );
        relay.wait_edges(1).await;

        // One request holds the edge's only stream; a second, concurrent one needs a
        // second stream and is refused for load.
        let holding = tokio::spawn({
            let public = relay.public();
            async move { public.get("alpha", "/hold/800").await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, body) = public.get("alpha", "/whoami").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("\"alpha\" is busy"), "{body}");
        let (status, _) = holding.await.unwrap();
        assert_eq!(status, StatusCode::OK);

        // The idle keep-alive connection still holds the stream; the slow request reuses it.
        let started = Instant::now();
        let (status, body) = public.get("alpha", "/slow/3000").await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
        assert!(body.contains("\"alpha\" did not answer"), "{body}");
        assert!(started.elapsed() < Duration::from_secs(3));
    })
    .await;
}
