//! HTTP correctness of the reverse proxy example (RFC 9110 / 9112 / 9113), end to end:
//! relay and edges as separate processes, backends in the test process. Requests a normal
//! client cannot send are written byte by byte on a TCP socket (`support::raw`).

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::proxy::{bounded, eventually, Backend, Proc, Relay, TempDir};
use support::raw::{exchange, get_request, read_request_head, Ended, RawBackend};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for any one test.
const LIMIT: Duration = Duration::from_secs(90);
/// How long a raw exchange may take before it counts as hanging.
const RAW_LIMIT: Duration = Duration::from_secs(20);

/// A relay with edge `alpha` exposing `web` (and `other`, the same backend), edge `beta`
/// exposing `web` on a second backend.
struct Setup {
    _dir: TempDir,
    relay: Relay,
    _edges: Vec<Proc>,
    _alpha: Backend,
    _beta: Backend,
}

impl Setup {
    async fn start(tag: &str, relay_args: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        let alpha = Backend::start("alpha-web").await;
        let beta = Backend::start("beta-web").await;
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "alpha-secret"), ("beta", "beta-secret")],
            relay_args,
        )
        .await;
        let edges = vec![
            relay.spawn_edge(
                "alpha",
                "alpha-secret",
                &[("web", alpha.addr), ("other", alpha.addr)],
                &[],
            ),
            relay.spawn_edge("beta", "beta-secret", &[("web", beta.addr)], &[]),
        ];
        relay.wait_edges(2).await;
        Self {
            _dir: dir,
            relay,
            _edges: edges,
            _alpha: alpha,
            _beta: beta,
        }
    }

    fn host(&self, label: &str) -> String {
        self.relay.host(label)
    }

    async fn raw(
        &self,
        target: &str,
        version: &str,
        headers: &[&str],
    ) -> support::raw::RawResponse {
        let request = get_request(target, version, headers);
        exchange(self.relay.spec.http, &request, RAW_LIMIT).await
    }

    /// The request headers the backend received for a raw GET /headers.
    async fn backend_headers(&self, headers: &[&str]) -> Vec<String> {
        let response = self.raw("/headers", "HTTP/1.1", headers).await;
        assert_eq!(response.status, 200, "{response:?}");
        response.body_text().lines().map(str::to_owned).collect()
    }
}

fn lines_named<'a>(lines: &'a [String], name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}: ");
    lines
        .iter()
        .filter_map(|line| line.strip_prefix(&prefix))
        .collect()
}

/// Item 7: a Host with path or query characters (or userinfo, or a bad port) is refused
/// before it can change what the backend sees; valid hosts keep routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_are_not_plain_authorities_get_400() {
    bounded(LIMIT, async {
        let setup = Setup::start("http-bad-host", &[]).await;
        let port = setup.relay.spec.http.port();
        for host in [
            "web/redirect?.alpha.localhost".to_owned(),
            format!("alpha.localhost/whoami?:{port}"),
            "user@alpha.localhost".to_owned(),
            "alpha.localhost:80:80".to_owned(),
            "alpha.localhost:http".to_owned(),
            "alpha.localhost#x".to_owned(),
            "al pha.localhost".to_owned(),
            "al_pha.localhost".to_owned(),
            "alpha%2elocalhost".to_owned(),
        ] {
            let header = format!("Host: {host}");
            let response = setup.raw("/whoami", "HTTP/1.1", &[&header]).await;
            assert_eq!(response.status, 400, "{host:?}: {response:?}");
            assert!(
                response.body_text().contains("invalid host"),
                "{host:?}: {response:?}"
            );
        }
        // An absolute-form target with userinfo is refused the same way.
        let target = format!("http://user@{}/whoami", setup.host("alpha"));
        let host = format!("Host: {}", setup.host("alpha"));
        let response = setup.raw(&target, "HTTP/1.1", &[&host]).await;
        assert_eq!(response.status, 400, "{response:?}");

        // Valid hosts still route, with a trailing dot and any case.
        for host in [
            setup.host("alpha"),
            setup.host("ALPHA"),
            "alpha.localhost.".to_owned(),
        ] {
            let header = format!("Host: {host}");
            let response = setup.raw("/whoami", "HTTP/1.1", &[&header]).await;
            assert_eq!(
                (response.status, response.body_text().as_str()),
                (200, "alpha-web"),
                "{host:?}"
            );
        }
    })
    .await;
}

/// Item 9: RFC 9112 §3.2 — one Host, present on HTTP/1.1; absolute-form targets route by
/// their own authority, which is also the Host the backend sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_headers_follow_rfc_9112() {
    bounded(LIMIT, async {
        let setup = Setup::start("http-host-rules", &[]).await;
        let alpha = format!("Host: {}", setup.host("alpha"));
        let beta = format!("Host: {}", setup.host("beta"));

        let response = setup.raw("/whoami", "HTTP/1.1", &[&alpha, &beta]).await;
        assert_eq!(response.status, 400, "{response:?}");
        assert!(
            response.body_text().contains("more than one Host"),
            "{response:?}"
        );
        let response = setup.raw("/whoami", "HTTP/1.1", &[&alpha, &alpha]).await;
        assert_eq!(response.status, 400, "{response:?}");

        let response = setup.raw("/whoami", "HTTP/1.1", &[]).await;
        assert_eq!(response.status, 400, "{response:?}");
        assert!(
            response.body_text().contains("needs a Host"),
            "{response:?}"
        );
        // HTTP/1.0 may omit Host: it names no edge.
        let response = setup.raw("/whoami", "HTTP/1.0", &[]).await;
        assert_eq!(response.status, 404, "{response:?}");
        assert!(
            response.body_text().contains("unknown host"),
            "{response:?}"
        );

        // Absolute-form: the target's authority wins over Host (RFC 9112 §3.2.2).
        let target = format!("http://{}/whoami", setup.host("beta"));
        let response = setup.raw(&target, "HTTP/1.1", &[&alpha]).await;
        assert_eq!(
            (response.status, response.body_text().as_str()),
            (200, "beta-web"),
            "{response:?}"
        );
        let target = format!("http://{}/headers", setup.host("alpha"));
        let response = setup.raw(&target, "HTTP/1.1", &[&beta]).await;
        assert_eq!(response.status, 200, "{response:?}");
        let lines: Vec<String> = response.body_text().lines().map(str::to_owned).collect();
        assert_eq!(
            lines_named(&lines, "host"),
            [setup.host("alpha")],
            "{lines:?}"
        );
        let response = setup.raw(&target, "HTTP/1.1", &[]).await;
        assert_eq!(
            response.status, 400,
            "absolute-form without Host: {response:?}"
        );

        // CONNECT is not a reverse proxy's business.
        let connect = format!(
            "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            setup.host("alpha")
        );
        let response = exchange(setup.relay.spec.http, connect.as_bytes(), RAW_LIMIT).await;
        assert_eq!(response.status, 405, "{response:?}");
    })
    .await;
}

/// Item 8: the forwarding headers a backend gets are the relay's own, whatever the client
/// sent, and `Connection` cannot remove them or Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_get_the_relays_forwarding_headers_only() {
    bounded(LIMIT, async {
        let setup = Setup::start("http-forwarded", &[]).await;
        let host = setup.host("alpha");
        let host_line = format!("Host: {host}");
        let lines = setup
            .backend_headers(&[
                &host_line,
                "X-Forwarded-For: 6.6.6.6",
                "X-Forwarded-Host: evil.example",
                "X-Forwarded-Proto: https",
                "X-Forwarded-Port: 443",
                "X-Real-IP: 6.6.6.6",
                "Forwarded: for=6.6.6.6;proto=https",
                "Connection: X-Forwarded-For, X-Forwarded-Host, X-Forwarded-Proto, host, X-Real-IP, Forwarded",
            ])
            .await;
        let expect = |name: &str, value: &str| {
            assert_eq!(lines_named(&lines, name), [value], "{name} in {lines:#?}");
        };
        expect("host", &host);
        expect("x-forwarded-for", "127.0.0.1");
        expect("x-forwarded-host", &host);
        expect("x-forwarded-proto", "http");
        expect("x-real-ip", "127.0.0.1");
        expect(
            "forwarded",
            &format!("for=127.0.0.1;host=\"{host}\";proto=http"),
        );
        assert!(lines_named(&lines, "x-forwarded-port").is_empty(), "{lines:#?}");
        assert!(
            !lines.iter().any(|line| line.contains("6.6.6.6") || line.contains("evil")),
            "{lines:#?}"
        );
        assert!(lines_named(&lines, "connection").is_empty(), "{lines:#?}");
    })
    .await;
}

/// Item 8: a peer in --trusted-proxies has its chain kept and extended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_keep_their_forwarding_chain() {
    bounded(LIMIT, async {
        let setup = Setup::start(
            "http-trusted",
            &["--trusted-proxies", "10.0.0.0/8,127.0.0.1"],
        )
        .await;
        let host = setup.host("alpha");
        let host_line = format!("Host: {host}");
        let lines = setup
            .backend_headers(&[
                &host_line,
                "X-Forwarded-For: 203.0.113.5",
                "X-Forwarded-Proto: https",
                "X-Real-IP: 203.0.113.5",
                "Forwarded: for=203.0.113.5;proto=https",
            ])
            .await;
        let expect = |name: &str, value: &str| {
            assert_eq!(lines_named(&lines, name), [value], "{name} in {lines:#?}");
        };
        expect("x-forwarded-for", "203.0.113.5, 127.0.0.1");
        expect("x-forwarded-proto", "https");
        expect("x-forwarded-host", &host);
        expect("x-real-ip", "203.0.113.5");
        expect(
            "forwarded",
            &format!("for=203.0.113.5;proto=https, for=127.0.0.1;host=\"{host}\";proto=http"),
        );
    })
    .await;
}

/// Item 9: `Upgrade: h2c` is not forwarded; the request is served as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_not_forwarded() {
    bounded(LIMIT, async {
        let setup = Setup::start("http-h2c", &[]).await;
        let host_line = format!("Host: {}", setup.host("alpha"));
        let response = setup
            .raw(
                "/headers",
                "HTTP/1.1",
                &[
                    &host_line,
                    "Connection: Upgrade, HTTP2-Settings",
                    "Upgrade: h2c",
                    "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                ],
            )
            .await;
        assert!(response.head.starts_with("HTTP/1.1 200"), "{response:?}");
        let lines: Vec<String> = response.body_text().lines().map(str::to_owned).collect();
        for name in ["upgrade", "http2-settings", "connection"] {
            assert!(lines_named(&lines, name).is_empty(), "{name} in {lines:#?}");
        }
    })
    .await;
}

/// Sends one HTTP/2 (prior knowledge) GET to the relay with `authority` as `:authority`
/// and optionally a (disagreeing) Host header; returns status and body.
async fn h2_get(
    relay: &Relay,
    authority: &str,
    path: &str,
    host: Option<&str>,
) -> (StatusCode, String) {
    let tcp = tokio::net::TcpStream::connect(relay.spec.http)
        .await
        .expect("connecting");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let mut request = Request::get(format!("http://{authority}{path}"));
    if let Some(host) = host {
        request = request.header(http::header::HOST, host);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let response = sender.send_request(request).await.expect("h2 response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("h2 body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Item 9: over HTTP/2 the backend sees the public authority as Host (not the service
/// name), and `:authority` wins over a Host header that disagrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_carry_the_public_authority() {
    bounded(LIMIT, async {
        let setup = Setup::start("http-h2", &[]).await;
        let alpha = setup.host("alpha");
        let (status, body) = h2_get(&setup.relay, &alpha, "/headers", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let lines: Vec<String> = body.lines().map(str::to_owned).collect();
        assert_eq!(lines_named(&lines, "host"), [alpha.as_str()], "{lines:#?}");
        assert_eq!(
            lines_named(&lines, "x-forwarded-host"),
            [alpha.as_str()],
            "{lines:#?}"
        );

        let beta = setup.host("beta");
        let (status, body) = h2_get(&setup.relay, &alpha, "/whoami", Some(&beta)).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "alpha-web"));
        let (status, body) = h2_get(&setup.relay, &alpha, "/headers", Some(&beta)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let lines: Vec<String> = body.lines().map(str::to_owned).collect();
        assert_eq!(lines_named(&lines, "host"), [alpha.as_str()], "{lines:#?}");
        // A bad :authority is refused like a bad Host.
        let (status, _) = h2_get(&setup.relay, "alpha.localhost:99999", "/", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    })
    .await;
}

/// A backend that answers every request with a 1000-byte Content-Length, sends half of
/// it, and stalls.
async fn stalling_backend() -> RawBackend {
    RawBackend::start(|mut tcp| async move {
        if !read_request_head(&mut tcp).await {
            return;
        }
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n";
        let _ = tcp.write_all(head).await;
        let _ = tcp.write_all(&[b'x'; 500]).await;
        let _ = tcp.flush().await;
        tokio::time::sleep(Duration::from_secs(600)).await;
    })
    .await
}

/// A server-sent-events backend: a chunk every 500 ms for 3.5 s, then the end.
async fn ticking_backend() -> RawBackend {
    RawBackend::start(|mut tcp| async move {
        if !read_request_head(&mut tcp).await {
            return;
        }
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        if tcp.write_all(head).await.is_err() {
            return;
        }
        for tick in 0..7 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let event = format!("data: tick {tick}\n\n");
            let chunk = format!("{:x}\r\n{event}\r\n", event.len());
            if tcp.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = tcp.write_all(b"0\r\n\r\n").await;
    })
    .await
}

/// Item 10: an edge that stalls mid-body makes the relay abort the client's connection
/// after --upstream-idle-timeout (never a truncated "complete" response), counted in
/// /metrics; other requests are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_edge_body_aborts_the_client_connection() {
    bounded(LIMIT, async {
        let dir = TempDir::new("http-stall-relay");
        let stalling = stalling_backend().await;
        let web = Backend::start("web").await;
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "secret")],
            &["--upstream-idle-timeout", "1s"],
        )
        .await;
        // The edge's own limit is the default (60 s): the relay's must act.
        let _edge = relay.spawn_edge(
            "alpha",
            "secret",
            &[("web", web.addr), ("stall", stalling.addr)],
            &[],
        );
        relay.wait_edges(1).await;
        let host_line = format!("Host: {}", relay.host("stall.alpha"));
        let request = get_request("/", "HTTP/1.1", &[&host_line]);
        let stalled = tokio::spawn({
            let addr = relay.spec.http;
            async move { exchange(addr, &request, RAW_LIMIT).await }
        });
        // While that one stalls, a well-behaved request is served.
        let public = relay.public();
        assert_eq!(
            public.get("alpha", "/whoami").await,
            (StatusCode::OK, "web".to_owned())
        );
        let response = stalled.await.expect("the stalled exchange");
        eprintln!(
            "stalled response: status {}, {} of {:?} body bytes, {:?} after {:?}",
            response.status,
            response.body.len(),
            response.content_length(),
            response.ended,
            response.elapsed
        );
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.content_length(), Some(1000));
        assert!(response.body.len() < 1000, "{response:?}");
        assert_ne!(
            response.ended,
            Ended::StillOpen,
            "the connection was not aborted"
        );
        assert!(
            response.elapsed >= Duration::from_millis(900),
            "{response:?}"
        );
        assert!(response.elapsed < Duration::from_secs(10), "{response:?}");
        let metrics = relay.metrics().await;
        assert_eq!(
            metrics.get("backhaul_upstream_idle_timeouts_total", &[]),
            1.0
        );
        relay
            .proc
            .wait_for_log("stalled mid-body", |log| log.contains("stalled mid-body"))
            .await;
    })
    .await;
}

/// Item 10, edge side: a local service that stalls mid-body is cut by the edge's
/// --upstream-idle-timeout, and the client's connection is aborted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_local_service_is_cut_by_the_edge() {
    bounded(LIMIT, async {
        let dir = TempDir::new("http-stall-edge");
        let stalling = stalling_backend().await;
        let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], &[]).await;
        let edge = relay.spawn_edge(
            "alpha",
            "secret",
            &[("web", stalling.addr)],
            &["--upstream-idle-timeout", "1s"],
        );
        relay.wait_edges(1).await;
        let host_line = format!("Host: {}", relay.host("alpha"));
        let request = get_request("/", "HTTP/1.1", &[&host_line]);
        let response = exchange(relay.spec.http, &request, RAW_LIMIT).await;
        eprintln!(
            "stalled response: status {}, {} body bytes, {:?} after {:?}",
            response.status,
            response.body.len(),
            response.ended,
            response.elapsed
        );
        assert_eq!(response.status, 200, "{response:?}");
        assert!(response.body.len() < 1000, "{response:?}");
        assert_ne!(
            response.ended,
            Ended::StillOpen,
            "the connection was not aborted"
        );
        assert!(response.elapsed < Duration::from_secs(10), "{response:?}");
        eventually(
            Duration::from_secs(5),
            "the edge logs the stall",
            || async { edge.stdout().contains("stalled mid-body").then_some(()) },
        )
        .await;
    })
    .await;
}

/// Item 10: the idle limit is about silence, not length: a stream that keeps sending
/// outlives it several times over, and so does a quiet WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_keep_sending_and_quiet_websockets_are_not_cut() {
    bounded(LIMIT, async {
        let dir = TempDir::new("http-idle-ok");
        let ticking = ticking_backend().await;
        let web = Backend::start("web").await;
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "secret")],
            &["--upstream-idle-timeout", "1s"],
        )
        .await;
        let _edge = relay.spawn_edge(
            "alpha",
            "secret",
            &[("web", web.addr), ("events", ticking.addr)],
            &["--upstream-idle-timeout", "1s"],
        );
        relay.wait_edges(1).await;

        let host_line = format!("Host: {}", relay.host("events.alpha"));
        let response = exchange(
            relay.spec.http,
            &get_request("/", "HTTP/1.1", &[&host_line]),
            RAW_LIMIT,
        )
        .await;
        let body = response.body_text();
        assert_eq!(response.status, 200, "{response:?}");
        assert!(body.contains("data: tick 6"), "{response:?}");
        assert!(
            body.ends_with("0\r\n\r\n"),
            "not the chunked end: {response:?}"
        );
        assert!(response.elapsed >= Duration::from_secs(3), "{response:?}");

        let tcp = tokio::net::TcpStream::connect(relay.spec.http)
            .await
            .expect("connecting to the relay");
        let url = format!("ws://{}/ws", relay.host("alpha"));
        let (mut socket, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
            .await
            .expect("WebSocket handshake through the relay");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        socket
            .send(Message::text("still there?"))
            .await
            .expect("send");
        let reply = socket.next().await.expect("a reply").expect("a message");
        assert_eq!(reply, Message::text("echo: still there?"));
        let metrics = relay.metrics().await;
        assert_eq!(
            metrics.get("backhaul_upstream_idle_timeouts_total", &[]),
            0.0
        );
    })
    .await;
}

/// Item 11: a local service that is down: the edge's 502 names the edge, the service and
/// the cause, and the relay passes it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_local_service_is_named() {
    bounded(LIMIT, async {
        let dir = TempDir::new("http-unreachable");
        // A port that was free a moment ago: nothing listens there.
        let closed = support::proxy::free_tcp_addr();
        let mut relay = Relay::start(dir.path(), &[("alpha", "secret")], &[]).await;
        let _edge = relay.spawn_edge("alpha", "secret", &[("web", closed)], &[]);
        relay.wait_edges(1).await;
        let (status, body) = relay.public().get("alpha", "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert!(
            body.contains(&format!(
                "edge \"alpha\": local service \"web\" at {closed} is unreachable"
            )),
            "{body}"
        );
        assert!(body.to_lowercase().contains("refused"), "{body}");
        assert!(!body.contains("client error (Connect)\n"), "{body}");
    })
    .await;
}

/// Sends a signal to a process (`kill -<signal> <pid>`).
fn signal(proc: &Proc, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), proc.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} {} failed", proc.id());
}

/// Item 11: an edge that stops answering (SIGSTOP: its connection looks alive, keep-alive
/// has not noticed yet) gets 502 "not responding", not 504, whether the request waited on
/// an open or on a pooled connection; a merely slow edge still gets 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_edge_is_reported_as_not_responding() {
    bounded(LIMIT, async {
        let dir = TempDir::new("http-sigstop");
        let web = Backend::start("web").await;
        let mut relay = Relay::start(
            dir.path(),
            &[("alpha", "secret")],
            &[
                "--keepalive",
                "60s",
                "--open-timeout",
                "1s",
                "--request-timeout",
                "3s",
            ],
        )
        .await;
        let edge = relay.spawn_edge(
            "alpha",
            "secret",
            &[("web", web.addr)],
            &["--keepalive", "60s"],
        );
        relay.wait_edges(1).await;
        let public = relay.public();
        assert_eq!(
            public.get("alpha", "/whoami").await,
            (StatusCode::OK, "web".to_owned())
        );
        // Slow but alive: 504.
        let (status, body) = public.get("alpha", "/slow/5000").await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
        assert!(body.contains("\"alpha\" did not answer within"), "{body}");
        // Leaves an idle pooled connection (tunnel stream) to the edge.
        assert_eq!(
            public.get("alpha", "/whoami").await,
            (StatusCode::OK, "web".to_owned())
        );

        signal(&edge, "STOP");
        // Two at once: one can take a pooled tunnel stream, the other must open one.
        let started = Instant::now();
        let requests: Vec<_> = (0..2)
            .map(|_| {
                let public = relay.public();
                tokio::spawn(async move { public.get("alpha", "/whoami").await })
            })
            .collect();
        let mut answers = Vec::new();
        for request in requests {
            answers.push(request.await.expect("a request task"));
        }
        let elapsed = started.elapsed();
        signal(&edge, "CONT");
        eprintln!("answers for a stopped edge after {elapsed:?}: {answers:?}");
        for (status, body) in &answers {
            assert_eq!(*status, StatusCode::BAD_GATEWAY, "{body}");
            assert!(body.contains("edge \"alpha\" is not responding"), "{body}");
        }
        assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
        for cause in [
            "no response head within",
            "timed out waiting for open response",
        ] {
            relay
                .proc
                .wait_for_log(&format!("{cause:?} with \"no pong within\""), |log| {
                    log.lines()
                        .any(|line| line.contains(cause) && line.contains("no pong within"))
                })
                .await;
        }
    })
    .await;
}

/// Item 11: an edge that dies while a request is in flight: 502 saying it went offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_lost_mid_request_is_reported_as_gone() {
    bounded(LIMIT, async {
        let dir = TempDir::new("http-lost-edge");
        let web = Backend::start("web").await;
        let mut relay =
            Relay::start(dir.path(), &[("alpha", "secret")], &["--keepalive", "1s"]).await;
        let mut edge = relay.spawn_edge("alpha", "secret", &[("web", web.addr)], &[]);
        relay.wait_edges(1).await;
        let holding = tokio::spawn({
            let public = relay.public();
            async move { public.get("alpha", "/hold/10000").await }
        });
        let holds = std::sync::Arc::clone(&web.holds);
        eventually(
            Duration::from_secs(10),
            "the request reaches the backend",
            || {
                let holds = std::sync::Arc::clone(&holds);
                async move { (holds.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(()) }
            },
        )
        .await;
        edge.kill();
        let started = Instant::now();
        let (status, body) = holding.await.expect("the held request");
        eprintln!(
            "answer for an edge lost mid-request after {:?}: {status} {body:?}",
            started.elapsed()
        );
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert!(body.contains("edge \"alpha\""), "{body}");
        assert!(body.contains("went offline"), "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "{:?}",
            started.elapsed()
        );
        relay
            .proc
            .wait_for_log("forwarding to the edge failed", |log| {
                log.contains("forwarding to the edge failed")
            })
            .await;
    })
    .await;
}
