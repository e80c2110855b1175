//! `backhaul::http::proxy` end to end over real quinn + TLS on 127.0.0.1: a public hyper
//! server on the relay forwards with `ReverseProxy` through the tunnel to an edge whose
//! `to_local` route forwards to a real axum backend over TCP.
//!
//! ```text
//! hyper client ─TCP─▶ relay (ReverseProxy) ═QUIC═▶ edge (to_local) ─TCP─▶ axum backend
//! ```
//!
//! What holds for both edge routes runs twice: once with `to_local` (HTTP parsed on the
//! edge) and once with `pass_through` (tunnel streams spliced to the backend unparsed).

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ::http::header::{CONNECTION, HOST};
use ::http::{Request, Response, StatusCode, Uri};
use backhaul::connector::Connector;
use backhaul::edge::Router;
use backhaul::http::authority::{request_authority, Host};
use backhaul::http::forwarded::{Proto, TrustedProxies};
use backhaul::http::proxy::{
    boxed, forward_failure, is_upgrade, pass_through, retarget, strip_hop_by_hop, text_response,
    to_local, ProxyBody, ReverseProxy, Timeouts,
};
use backhaul::{QuinnConnection, SessionClient};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::future::IntoFuture;
use support::http::{checksum_body, PatternBody};
use support::proxy::Backend;
use support::*;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceExt;

const LIMIT: Duration = Duration::from_secs(120);
const EDGE: &str = "alpha";
/// What the stalling route sends before it stops.
const STALL_PREFIX: usize = 1024;

/// A backend whose `/stall` sends `STALL_PREFIX` bytes and then nothing.
async fn stalling_backend(tasks: &mut JoinSet<()>) -> SocketAddr {
    let stall = || async {
        let prefix = futures_util::stream::once(async {
            Ok::<_, Infallible>(Bytes::from(vec![b'x'; STALL_PREFIX]))
        });
        axum::body::Body::from_stream(prefix.chain(futures_util::stream::pending()))
    };
    let app = axum::Router::new().route("/stall", axum::routing::get(stall));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tasks.spawn(async move {
        let _ = axum::serve(listener, app).into_future().await;
    });
    addr
}

fn http_uri(addr: SocketAddr) -> Uri {
    format!("http://{addr}").parse().expect("a URI")
}

/// The relay's public side: the service is the Host's first label (`web.test` → `web`).
async fn relay_request(
    proxy: ReverseProxy<Connector<QuinnConnection>>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, Infallible> {
    let authority = match request_authority(request.version(), request.uri(), request.headers()) {
        Ok(Some(authority)) => authority,
        other => return Ok(text_response(StatusCode::BAD_REQUEST, format!("{other:?}"))),
    };
    let service = match authority.host() {
        Host::Name(name) => name.split('.').next().unwrap_or_default().to_owned(),
        Host::Ip(_) => return Ok(text_response(StatusCode::NOT_FOUND, "no service")),
    };
    retarget(&mut request, &service).expect("a service name is an authority");
    let headers = request.headers_mut();
    strip_hop_by_hop(headers, is_upgrade(headers));
    TrustedProxies::none().set_forwarding_headers(headers, peer.ip(), &authority, Proto::Http);
    headers.insert(HOST, authority.to_header_value());
    Ok(match proxy.oneshot(request).await {
        Ok(response) => response,
        Err(error) => forward_failure(&error, EDGE, &service).into_response(),
    })
}

/// A relay + edge over real quinn, the edge's routes forwarding to local upstreams, and
/// the relay's public HTTP listener.
struct Tunnel {
    public: SocketAddr,
    client: Client<HttpConnector, ProxyBody>,
    _relay: SessionClient<QuinnConnection>,
    _quic: QuicPair,
    _backend: Option<Backend>,
    _tasks: JoinSet<()>,
}

/// How the edge reaches its local services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EdgeMode {
    /// `to_local`: each request parsed and forwarded.
    Parse,
    /// `pass_through`: each stream spliced to a backend connection.
    PassThrough,
}

/// The edge routes `web` to `web` (a test backend if `None`) and `stall` to a backend
/// that stalls mid-body.
async fn tunnel_with(
    mode: EdgeMode,
    web: Option<Uri>,
    relay_timeouts: Timeouts,
    edge_timeouts: Timeouts,
) -> Tunnel {
    let mut tasks = JoinSet::new();
    let backend = match web {
        Some(_) => None,
        None => Some(Backend::start("web").await),
    };
    let web = web.unwrap_or_else(|| http_uri(backend.as_ref().expect("a backend").addr));
    let stall = http_uri(stalling_backend(&mut tasks).await);
    let SessionPair {
        relay,
        edge,
        edge_events,
        quic,
    } = session_pair().await;
    let mut router: Router<QuinnConnection> = Router::new();
    for (name, upstream) in [("web", web), ("stall", stall)] {
        let authority = upstream.authority().expect("an authority").to_string();
        let description = format!("edge {EDGE:?}: local service {name:?} at {authority}");
        router = match mode {
            EdgeMode::Parse => {
                let local = to_local(upstream)
                    .expect("an http upstream")
                    .with_description(description)
                    .with_timeouts(edge_timeouts);
                router.route(name, backhaul::http::serve(local))
            }
            EdgeMode::PassThrough => {
                let local = pass_through(upstream)
                    .expect("an http upstream")
                    .with_description(description);
                router.route(name, local)
            }
        };
    }
    tasks.spawn(async move {
        let _ = router.serve(edge, edge_events).into_future().await;
    });

    let proxy = ReverseProxy::new(Connector::new(relay.clone())).with_timeouts(relay_timeouts);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let public = listener.local_addr().expect("addr");
    tasks.spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((tcp, peer)) = listener.accept().await {
            let proxy = proxy.clone();
            let service = hyper::service::service_fn(move |request| {
                relay_request(proxy.clone(), request, peer)
            });
            connections.spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    Tunnel {
        public,
        client,
        _relay: relay,
        _quic: quic,
        _backend: backend,
        _tasks: tasks,
    }
}

async fn default_tunnel(mode: EdgeMode) -> Tunnel {
    tunnel_with(mode, None, Timeouts::default(), Timeouts::default()).await
}

/// Two tests from one body taking an [`EdgeMode`]: `$parse` runs it with `to_local`,
/// `$pass` with `pass_through`.
macro_rules! both_edge_modes {
    ($body:ident, $parse:ident, $pass:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $parse() {
            $body(EdgeMode::Parse).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $pass() {
            $body(EdgeMode::PassThrough).await;
        }
    };
}

impl Tunnel {
    fn request(
        &self,
        method: &str,
        service: &str,
        path: &str,
        body: ProxyBody,
    ) -> Request<ProxyBody> {
        Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.public))
            .header(HOST, format!("{service}.test"))
            .body(body)
            .expect("a request")
    }

    async fn send(&self, request: Request<ProxyBody>) -> Response<Incoming> {
        within(LIMIT, self.client.request(request))
            .await
            .expect("the relay answers")
    }

    async fn get_text(&self, service: &str, path: &str) -> (StatusCode, String) {
        let request = self.request("GET", service, path, boxed(Empty::new()));
        let response = self.send(request).await;
        (response.status(), text(response).await)
    }
}

/// A response's whole body as text.
async fn text(response: Response<Incoming>) -> String {
    let body = within(LIMIT, response.into_body().collect())
        .await
        .expect("a complete body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

both_edge_modes!(
    sixteen_mib_each_way_arrive_intact,
    sixteen_mib_each_way_arrive_intact_parsed,
    sixteen_mib_each_way_arrive_intact_passed_through
);

async fn sixteen_mib_each_way_arrive_intact(mode: EdgeMode) {
    const LEN: u64 = 16 * 1024 * 1024;
    let tunnel = default_tunnel(mode).await;
    let expected = PatternBody::checksum(LEN);

    let upload = tunnel.request("POST", "web", "/upload", boxed(PatternBody::new(LEN)));
    let response = tunnel.send(upload).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        text(response).await,
        expected.header(),
        "the backend saw the upload intact"
    );

    let download = tunnel.request(
        "GET",
        "web",
        &format!("/download/{LEN}"),
        boxed(Empty::new()),
    );
    let response = tunnel.send(download).await;
    assert_eq!(response.status(), StatusCode::OK);
    let received = within(LIMIT, checksum_body(response.into_body()))
        .await
        .expect("body");
    assert_eq!(received, expected, "the download arrived intact");
}

both_edge_modes!(
    a_websocket_upgrade_is_spliced_end_to_end,
    a_websocket_upgrade_is_spliced_end_to_end_parsed,
    a_websocket_upgrade_is_spliced_end_to_end_passed_through
);

async fn a_websocket_upgrade_is_spliced_end_to_end(mode: EdgeMode) {
    let tunnel = default_tunnel(mode).await;
    let tcp = tokio::net::TcpStream::connect(tunnel.public)
        .await
        .expect("connect");
    let request = "ws://web.test/ws".into_client_request().expect("a request");
    let (mut socket, response) = within(LIMIT, tokio_tungstenite::client_async(request, tcp))
        .await
        .expect("the upgrade through relay and edge");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for n in 0..20 {
        socket
            .send(Message::text(format!("ping {n}")))
            .await
            .expect("send");
        let reply = within(LIMIT, socket.next())
            .await
            .expect("a reply")
            .expect("a message");
        assert_eq!(reply, Message::text(format!("echo: ping {n}")));
    }
    let large: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    socket
        .send(Message::binary(large.clone()))
        .await
        .expect("send");
    let reply = within(LIMIT, socket.next())
        .await
        .expect("a reply")
        .expect("a message");
    assert_eq!(reply.into_data(), large, "256 KiB echoed intact");
    socket.close(None).await.expect("close");
}

/// Shared body: the stalled backend's response starts (200, the first bytes), then the
/// body fails, so the client sees an aborted response, never a complete one.
async fn a_stalled_upstream_aborts_the_client(relay_idle: Duration, edge_idle: Duration) {
    a_stalled_upstream_aborts_the_client_with(EdgeMode::Parse, relay_idle, edge_idle).await;
}

async fn a_stalled_upstream_aborts_the_client_with(
    mode: EdgeMode,
    relay_idle: Duration,
    edge_idle: Duration,
) {
    let timeouts = |body_idle| Timeouts {
        body_idle,
        ..Timeouts::default()
    };
    let tunnel = tunnel_with(mode, None, timeouts(relay_idle), timeouts(edge_idle)).await;
    let started = Instant::now();
    let response = tunnel
        .send(tunnel.request("GET", "stall", "/stall", boxed(Empty::new())))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = 0;
    let ending = within(LIMIT, async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => received += frame.into_data().map_or(0, |data| data.len()),
                Some(Err(error)) => break Err(error),
                None => break Ok(()),
            }
        }
    })
    .await;
    assert!(
        ending.is_err(),
        "a stalled body must fail, not end ({received} bytes)"
    );
    assert_eq!(
        received, STALL_PREFIX,
        "the bytes sent before the stall got through"
    );
    assert!(started.elapsed() >= relay_idle.min(edge_idle));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_local_service_is_cut_by_the_edge_and_the_client_sees_it() {
    a_stalled_upstream_aborts_the_client(Duration::from_secs(600), Duration::from_millis(500))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_edge_is_cut_by_the_relay() {
    a_stalled_upstream_aborts_the_client(Duration::from_millis(500), Duration::from_secs(600))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_service_behind_a_pass_through_edge_is_cut_by_the_relay() {
    a_stalled_upstream_aborts_the_client_with(
        EdgeMode::PassThrough,
        Duration::from_millis(500),
        Duration::from_secs(600),
    )
    .await;
}

both_edge_modes!(
    a_refused_upstream_is_a_502_naming_the_service,
    a_refused_upstream_is_a_502_naming_the_service_parsed,
    a_refused_upstream_is_a_502_naming_the_service_passed_through
);

async fn a_refused_upstream_is_a_502_naming_the_service(mode: EdgeMode) {
    // A port that was free a moment ago: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_addr = closed.local_addr().expect("addr");
    drop(closed);
    let upstream = http_uri(closed_addr);
    let tunnel = tunnel_with(
        mode,
        Some(upstream),
        Timeouts::default(),
        Timeouts::default(),
    )
    .await;
    let (status, body) = tunnel.get_text("web", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let named = format!("edge \"alpha\": local service \"web\" at {closed_addr} is unreachable");
    assert!(body.starts_with(&named), "{body}");
    assert!(body.to_lowercase().contains("refused"), "{body}");

    // A service the edge does not have: the relay's mapping of the tunnel's refusal.
    let (status, body) = tunnel.get_text("nope", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body, "edge \"alpha\" has no service \"nope\"\n");
}

both_edge_modes!(
    forwarding_headers_reach_the_backend_and_hop_by_hop_ones_do_not,
    forwarding_headers_reach_the_backend_and_hop_by_hop_ones_do_not_parsed,
    forwarding_headers_reach_the_backend_and_hop_by_hop_ones_do_not_passed_through
);

async fn forwarding_headers_reach_the_backend_and_hop_by_hop_ones_do_not(mode: EdgeMode) {
    let tunnel = default_tunnel(mode).await;
    let mut request = tunnel.request("GET", "web", "/headers", boxed(Empty::new()));
    let headers = request.headers_mut();
    headers.insert(
        CONNECTION,
        "x-forwarded-for, x-secret".parse().expect("a value"),
    );
    headers.insert("x-forwarded-for", "6.6.6.6".parse().expect("a value"));
    headers.insert("x-secret", "hop".parse().expect("a value"));
    let response = tunnel.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = text(response).await;
    let lines: Vec<&str> = seen.lines().collect();
    for expected in [
        "host: web.test",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-host: web.test",
        "x-forwarded-proto: http",
        "forwarded: for=127.0.0.1;host=web.test;proto=http",
    ] {
        assert!(
            lines.contains(&expected),
            "{expected:?} missing from\n{seen}"
        );
    }
    assert!(
        !seen.contains("x-secret") && !seen.contains("6.6.6.6"),
        "{seen}"
    );
}

both_edge_modes!(
    hundreds_of_concurrent_requests_are_all_answered_correctly,
    hundreds_of_concurrent_requests_are_all_answered_correctly_parsed,
    hundreds_of_concurrent_requests_are_all_answered_correctly_passed_through
);

async fn hundreds_of_concurrent_requests_are_all_answered_correctly(mode: EdgeMode) {
    let tunnel = std::sync::Arc::new(default_tunnel(mode).await);
    let requests: Vec<_> = (0..300)
        .map(|n| {
            let tunnel = std::sync::Arc::clone(&tunnel);
            tokio::spawn(async move { (n, tunnel.get_text("web", &format!("/n/{n}")).await) })
        })
        .collect();
    within(LIMIT, async {
        for request in requests {
            let (n, (status, body)) = request.await.expect("a request task");
            assert_eq!(status, StatusCode::OK, "request {n}: {body}");
            assert_eq!(
                body,
                format!("reply {n}"),
                "request {n} got another's answer"
            );
        }
    })
    .await;
}

/// A pass-through edge whose service is down answers each stream's request with a 502,
/// but a stream that never carries a request (a hostile or broken relay) is closed at the
/// answer timeout; 100 such streams at once do not delay the answer to a real request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_streams_to_an_unreachable_pass_through_service_are_closed_at_the_answer_timeout() {
    within(Duration::from_secs(60), async {
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closed_addr = closed.local_addr().expect("addr");
        drop(closed);
        let SessionPair {
            relay,
            edge,
            edge_events,
            quic: _quic,
        } = session_pair().await;
        let answer_timeout = Duration::from_millis(1500);
        assert!(answer_timeout < backhaul::http::proxy::DEFAULT_ANSWER_TIMEOUT);
        let route = pass_through(http_uri(closed_addr))
            .expect("an http upstream")
            .with_answer_timeout(answer_timeout);
        let router: Router<QuinnConnection> = Router::new().route("web", route);
        tokio::spawn(router.serve(edge, edge_events).into_future());
        let mut connector = Connector::new(relay.clone());

        let mut silent = JoinSet::new();
        for _ in 0..100 {
            // The edge starts waiting once it has the open request, so not before this
            // (it may start before the stream reaches this side).
            let opened = Instant::now();
            let mut stream = connector.connect("web").await.expect("a stream");
            silent.spawn(async move {
                let mut rest = Vec::new();
                let read = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest).await;
                (read.is_err() || rest.is_empty(), opened.elapsed())
            });
        }

        // Meanwhile a real request is answered at once.
        let started = Instant::now();
        let stream = connector.connect("web").await.expect("a stream");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        let request = Request::get("/")
            .header(HOST, "alpha.example")
            .body(Empty::<Bytes>::new())
            .expect("a request");
        let response = sender.send_request(request).await.expect("a response");
        let answered = started.elapsed();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert!(answered < answer_timeout, "answered after {answered:?}");

        while let Some(closed) = silent.join_next().await {
            let (empty, after) = closed.expect("a silent stream");
            assert!(empty, "a silent stream got bytes");
            assert!(
                after >= answer_timeout && after < answer_timeout * 10,
                "closed after {after:?}"
            );
        }
    })
    .await;
}

/// How a raw upgrade backend's read of the upgraded connection ended.
#[derive(Debug, PartialEq, Eq)]
enum UpgradedEnd {
    /// A clean end after these bytes.
    Finished(Vec<u8>),
    /// A read error of this kind after these bytes.
    Failed(std::io::ErrorKind, Vec<u8>),
}

/// A backend answering one upgrade request (`Upgrade: test`) by hand, then reading the
/// upgraded connection to its end; says how it ended.
async fn raw_upgrade_backend() -> (SocketAddr, tokio::sync::oneshot::Receiver<UpgradedEnd>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (report, reported) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut byte = [0; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut byte).await.expect("request head");
            head.push(byte[0]);
        }
        tcp.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n",
        )
        .await
        .expect("101");
        let mut received = Vec::new();
        let mut buf = [0; 1024];
        let end = loop {
            match tcp.read(&mut buf).await {
                Ok(0) => break UpgradedEnd::Finished(received),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(error) => break UpgradedEnd::Failed(error.kind(), received),
            }
        };
        let _ = report.send(end);
    });
    (addr, reported)
}

/// Sends an upgrade request for `web.test` on `tcp` and reads the answer's head.
async fn upgrade_through(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(
        b"GET /raw HTTP/1.1\r\nHost: web.test\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n",
    )
    .await
    .expect("request");
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.expect("answer head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_cut_by_the_client_is_reset_at_the_backend_not_finished() {
    use tokio::io::AsyncWriteExt;
    let (backend, ended) = raw_upgrade_backend().await;
    let tunnel = tunnel_with(
        EdgeMode::PassThrough,
        Some(http_uri(backend)),
        Timeouts::default(),
        Timeouts::default(),
    )
    .await;
    let mut tcp = tokio::net::TcpStream::connect(tunnel.public)
        .await
        .expect("connect");
    let head = within(LIMIT, upgrade_through(&mut tcp)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(b"half of a message").await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The client's machine drops the connection: a reset, not a goodbye.
    tcp.set_zero_linger().expect("linger");
    drop(tcp);
    let end = within(LIMIT, ended).await.expect("the backend's report");
    // The relay's splice fails on the reset and drops the tunnel's side: that must reach
    // the backend as a failure (the edge splices pass-through streams aborting), never as
    // the clean end of a complete exchange.
    assert!(
        matches!(&end, UpgradedEnd::Failed(_, received) if received == b"half of a message"),
        "{end:?}"
    );
}

/// What the coded backend sends as the body: bytes a client must decode (they stand in
/// for gzip; the proxy never decodes them).
const CODED: &[u8] = b"\x1f\x8b coded bytes the client decodes";

/// A backend answering every request with a body in a transfer coding: `gzip` alone
/// (delimited by the close), or `gzip, chunked` (one chunk).
async fn coded_backend(chunked: bool) -> support::raw::RawBackend {
    support::raw::RawBackend::start(move |mut tcp| async move {
        if !support::raw::read_request_head(&mut tcp).await {
            return;
        }
        let mut response = Vec::new();
        if chunked {
            response
                .extend_from_slice(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
            response.extend_from_slice(format!("{:x}\r\n", CODED.len()).as_bytes());
            response.extend_from_slice(CODED);
            response.extend_from_slice(b"\r\n0\r\n\r\n");
        } else {
            response.extend_from_slice(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
            response.extend_from_slice(CODED);
        }
        let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, &response).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tcp).await;
    })
    .await
}

both_edge_modes!(
    a_body_in_a_transfer_coding_keeps_its_coding,
    a_body_in_a_transfer_coding_keeps_its_coding_parsed,
    a_body_in_a_transfer_coding_keeps_its_coding_passed_through
);

/// A body in a transfer coding (`gzip`, chunked or delimited by the close) reaches the
/// client with that coding named: `Transfer-Encoding` is hop-by-hop, but without it the
/// client would take the coded bytes for the body itself.
async fn a_body_in_a_transfer_coding_keeps_its_coding(mode: EdgeMode) {
    for chunked in [false, true] {
        let backend = coded_backend(chunked).await;
        let tunnel = tunnel_with(
            mode,
            Some(http_uri(backend.addr)),
            Timeouts::default(),
            Timeouts::default(),
        )
        .await;
        let response = tunnel
            .send(tunnel.request("GET", "web", "/", boxed(Empty::new())))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let codings = response
            .headers()
            .get(::http::header::TRANSFER_ENCODING)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            codings.starts_with("gzip"),
            "chunked upstream: {chunked}, Transfer-Encoding: {codings:?}"
        );
        let body = within(LIMIT, response.into_body().collect())
            .await
            .expect("the whole body")
            .to_bytes();
        assert_eq!(&body[..], CODED, "chunked upstream: {chunked}");
    }
}
