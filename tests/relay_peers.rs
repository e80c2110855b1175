//! Relay-to-relay forwarding over real quinn on 127.0.0.1: relay B reaches an edge
//! attached to relay A through `backhaul::relay::peer`, with real TLS, hyper clients on B
//! and an axum app on the edge. Large bodies, WebSocket, HTTP/2 and hundreds of
//! concurrent requests cross unchanged; unknown edges, wrong secrets, forged hop counts,
//! vanished peers and lost edges end in typed errors, within bounds, never as a clean end.

#[path = "support/relay.rs"]
mod relay_fixture;
mod support;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::http::{HeaderMap, Request, StatusCode};
use backhaul::edge::{Backoff, Router};
use backhaul::quic::Identity;
use backhaul::relay::peer::{
    self, ClusterSecret, PeerPool, PeerServer, PeerStats, CLOSE_PEER_REFUSED, PEER_SERVICE,
};
use backhaul::relay::{Directory, EdgeName, Location, Registry, RelayId};
use backhaul::stream::TunnelStream;
use backhaul::tcp::{Spliced, TcpFailure, TcpForward, TcpObserver};
use backhaul::{
    Config, Error, Metadata, MetadataValue, QuinnConnection, RejectCode, Role, SessionClient,
};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::{JoinHandle, JoinSet};

use relay_fixture::{close_code, eventually, register, Blackhole, TestRelay};
use support::http::{app, checksum_body, Checksum, PatternBody};
use support::within;

const LIMIT: Duration = Duration::from_secs(240);
const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "k7-Zq-cluster-key";
const EDGE: &str = "kiosk";
const TOKEN: &str = "kiosk-token";
/// The dial bound configured on B; failures must come within it plus slack for a
/// loaded machine.
const CONNECT_BOUND: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_secs(3);

/// Relay A's peer side: a `PeerServer` on its own endpoint, which can be killed and
/// started again on the same address.
struct PeerHost {
    addr: SocketAddr,
    identity: Identity,
    server: PeerServer,
    endpoint: Option<quinn::Endpoint>,
    task: Option<JoinHandle<()>>,
}

impl PeerHost {
    fn start(registry: Registry) -> Self {
        let identity = Identity::self_signed(&["localhost"]).expect("certificate");
        let endpoint = peer::server_endpoint("127.0.0.1:0".parse().unwrap(), identity.clone())
            .expect("peer endpoint");
        let addr = endpoint.local_addr().expect("address");
        let server = PeerServer::new(registry, ClusterSecret::new(SECRET).unwrap())
            .with_hello_timeout(Duration::from_secs(5));
        let mut host = Self {
            addr,
            identity,
            server,
            endpoint: None,
            task: None,
        };
        host.serve(endpoint);
        host
    }

    fn serve(&mut self, endpoint: quinn::Endpoint) {
        self.task = Some(tokio::spawn(self.server.clone().serve(endpoint.clone())));
        self.endpoint = Some(endpoint);
    }

    fn trusted(&self) -> Vec<CertificateDer<'static>> {
        self.identity.cert_chain.clone()
    }

    fn stats(&self) -> PeerStats {
        self.server.stats()
    }

    /// As a crash would leave it, except that the peers are told (the endpoint closes).
    fn kill(&mut self) {
        // The endpoint first, as a dead process sends nothing more: aborted tasks drop
        // their streams, and quinn finishes a stream dropped unfinished, so a FIN could
        // otherwise still leave before the close.
        if let Some(endpoint) = self.endpoint.take() {
            endpoint.close(0u32.into(), b"killed");
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Serves again on the same address (once the old socket is released).
    async fn restart(&mut self) {
        let deadline = Instant::now() + WAIT;
        let endpoint = loop {
            match peer::server_endpoint(self.addr, self.identity.clone()) {
                Ok(endpoint) => break endpoint,
                Err(error) => {
                    assert!(Instant::now() < deadline, "cannot rebind: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(endpoint);
    }
}

impl Drop for PeerHost {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Relay A with one edge, `kiosk`, serving the test app as `web` and `drip` (1 MiB, then
/// silence) as a raw service.
struct Cluster {
    relay_a: TestRelay,
    peers_a: PeerHost,
    edge_connection: quinn::Connection,
    edge_task: JoinHandle<Result<(), Error>>,
}

fn test_app() -> axum::Router {
    app().route(
        "/xff",
        axum::routing::get(|headers: HeaderMap| async move {
            headers
                .get("x-forwarded-for")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        }),
    )
}

async fn cluster() -> Cluster {
    cluster_with_tcp(None).await
}

/// [`cluster`], with a raw TCP service `tcp` reaching `tcp_backend` if given.
async fn cluster_with_tcp(tcp_backend: Option<SocketAddr>) -> Cluster {
    let registry = Registry::new();
    let relay_a = TestRelay::start(&[&format!("{EDGE}={TOKEN}")], registry.clone(), |a| a);
    let peers_a = PeerHost::start(registry.clone());
    let endpoint = relay_a.endpoint_from("127.0.0.1");
    let edge = register(&endpoint, relay_a.addr, EDGE, TOKEN)
        .await
        .expect("the edge registers");
    let drip = tower::service_fn(|mut stream: TunnelStream<QuinnConnection>| async move {
        stream.write_all(&vec![7u8; 1 << 20]).await?;
        stream.flush().await?;
        std::future::pending::<()>().await;
        Ok::<(), std::io::Error>(())
    });
    let mut router = Router::new()
        .route("web", backhaul::http::serve(test_app()))
        .route("drip", drip);
    if let Some(backend) = tcp_backend {
        router = router.route("tcp", backhaul::tcp::forward_to(backend.to_string()));
    }
    let relay_fixture::TestEdge {
        connection,
        client,
        events,
    } = edge;
    let edge_task = tokio::spawn(router.serve(client, events).into_future());
    assert!(registry.contains(EDGE));
    Cluster {
        relay_a,
        peers_a,
        edge_connection: connection,
        edge_task,
    }
}

/// Relay B's pool of peer sessions, dialing with `secret`.
fn pool_with(trusted: &[CertificateDer<'static>], secret: &str) -> PeerPool {
    PeerPool::new(
        peer::client_endpoint(trusted).expect("client endpoint"),
        ClusterSecret::new(secret).unwrap(),
    )
    .with_server_name("localhost")
    .with_relay_id(RelayId::new("relay-b"))
    .with_connect_timeout(CONNECT_BOUND)
    .with_backoff(Backoff::new(
        Duration::from_millis(50),
        Duration::from_millis(500),
    ))
}

fn kiosk() -> EdgeName {
    EdgeName::new(EDGE).unwrap()
}

type PeerClient<B> = Client<backhaul::relay::PeerConnector, B>;

fn http_client<B>(pool: &PeerPool, relay: SocketAddr) -> PeerClient<B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new()).build(pool.connector(relay, kiosk()))
}

async fn text(response: ::http::Response<hyper::body::Incoming>) -> String {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

/// Finds a `backhaul::Error` in an error's `source()` chain.
fn backhaul_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<Error>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_cross_both_ways_intact_and_headers_travel() {
    within(LIMIT, async {
        let cluster = cluster().await;
        let pool = pool_with(&cluster.peers_a.trusted(), SECRET);
        const LEN: u64 = 64 * 1024 * 1024;
        let expected = PatternBody::checksum(LEN);

        let uploads: PeerClient<PatternBody> = http_client(&pool, cluster.peers_a.addr);
        let request = Request::post("http://web/upload")
            .body(PatternBody::new(LEN))
            .unwrap();
        let response = uploads.request(request).await.expect("upload");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, expected.header());

        let downloads: PeerClient<Empty<Bytes>> = http_client(&pool, cluster.peers_a.addr);
        let response = downloads
            .get(format!("http://web/download/{LEN}").parse().unwrap())
            .await
            .expect("download");
        assert_eq!(response.status(), StatusCode::OK);
        let sum = checksum_body(response.into_body()).await.expect("body");
        assert_eq!(sum, expected);

        // What B's HTTP layer sets (the client's address) reaches the edge unchanged.
        let request = Request::get("http://web/xff")
            .header("x-forwarded-for", "203.0.113.9")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = downloads.request(request).await.expect("xff");
        assert_eq!(text(response).await, "203.0.113.9");

        let counts = cluster.peers_a.stats().snapshot();
        assert_eq!(
            counts.admitted, 1,
            "one peer session for everything: {counts:?}"
        );
        assert!(counts.forwarded >= 2, "{counts:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_http2_work_through_the_peer() {
    within(LIMIT, async {
        let cluster = cluster().await;
        let pool = pool_with(&cluster.peers_a.trusted(), SECRET);
        let mut connector = pool.connector(cluster.peers_a.addr, kiosk());

        let stream = connector.connect("web").await.expect("a forwarded stream");
        let (mut socket, response) =
            within(WAIT, tokio_tungstenite::client_async("ws://web/ws", stream))
                .await
                .expect("upgrade");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        for word in ["one", "two", "three"] {
            socket
                .send(tokio_tungstenite::tungstenite::Message::text(word))
                .await
                .unwrap();
            let reply = within(WAIT, socket.next()).await.unwrap().unwrap();
            assert_eq!(reply.into_text().unwrap().as_str(), format!("echo: {word}"));
        }
        socket.close(None).await.unwrap();

        let stream = connector.connect("web").await.expect("a forwarded stream");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), stream)
                .await
                .expect("HTTP/2 handshake");
        let connection = tokio::spawn(connection);
        let answers: Vec<_> = (0..20)
            .map(|n| {
                let request = Request::get(format!("http://web/n/{n}"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                sender.send_request(request)
            })
            .collect();
        for (n, answer) in answers.into_iter().enumerate() {
            let response = within(WAIT, answer).await.expect("HTTP/2 answer");
            assert_eq!(response.version(), ::http::Version::HTTP_2);
            assert_eq!(text(response).await, format!("reply {n}"));
        }
        drop(sender);
        within(WAIT, connection)
            .await
            .unwrap()
            .expect("HTTP/2 ends cleanly");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_requests_share_one_dial_and_one_session() {
    within(LIMIT, async {
        let cluster = cluster().await;
        let pool = pool_with(&cluster.peers_a.trusted(), SECRET);
        const REQUESTS: usize = 400;
        // All start before any session exists: one dial serves them all.
        let mut requests = JoinSet::new();
        for n in 0..REQUESTS {
            let mut connector = pool.connector(cluster.peers_a.addr, kiosk());
            requests.spawn(async move {
                let stream = connector.connect("web").await?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(Error::transport)?;
                tokio::spawn(connection);
                let request = Request::get(format!("http://web/n/{n}"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(Error::transport)?;
                Ok::<_, Error>((n, text(response).await))
            });
        }
        let mut answered = 0;
        while let Some(joined) = requests.join_next().await {
            let (n, body) = joined.expect("task").expect("request");
            assert_eq!(body, format!("reply {n}"));
            answered += 1;
        }
        assert_eq!(answered, REQUESTS);
        let counts = cluster.peers_a.stats().snapshot();
        assert_eq!(counts.admitted, 1, "{counts:?}");
        assert_eq!(counts.forwarded, REQUESTS as u64, "{counts:?}");

        // And through one pooled hyper client, concurrently too.
        let http: PeerClient<Empty<Bytes>> = http_client(&pool, cluster.peers_a.addr);
        let mut requests = JoinSet::new();
        for n in 0..REQUESTS {
            let http = http.clone();
            requests.spawn(async move {
                let response = http
                    .get(format!("http://web/n/{n}").parse().unwrap())
                    .await
                    .expect("pooled request");
                (n, text(response).await)
            });
        }
        while let Some(joined) = requests.join_next().await {
            let (n, body) = joined.expect("task");
            assert_eq!(body, format!("reply {n}"));
        }
        assert_eq!(cluster.peers_a.stats().snapshot().admitted, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_edges_and_services_are_refused_fast_and_typed() {
    within(LIMIT, async {
        let cluster = cluster().await;
        let pool = pool_with(&cluster.peers_a.trusted(), SECRET);

        let started = Instant::now();
        let mut ghost = pool.connector(cluster.peers_a.addr, EdgeName::new("ghost").unwrap());
        match ghost.connect("web").await {
            Err(Error::EdgeNotAttached { edge, relay }) => {
                assert_eq!(edge, "ghost");
                assert_eq!(relay, cluster.peers_a.addr);
            }
            other => panic!("expected EdgeNotAttached, got {other:?}"),
        }
        assert!(
            started.elapsed() < CONNECT_BOUND + SLACK,
            "{:?}",
            started.elapsed()
        );

        // The edge's own refusal comes back as the edge's, as for a local edge.
        let mut connector = pool.connector(cluster.peers_a.addr, kiosk());
        match connector.connect("nope").await {
            Err(Error::StreamRejected { code, .. }) => {
                assert_eq!(code, RejectCode::UnsupportedService);
            }
            other => panic!("expected the edge's rejection, got {other:?}"),
        }
        // Through hyper, the typed error is in the source chain (a 502 to give).
        let http: PeerClient<Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(ghost);
        let error = http
            .get("http://web/".parse().unwrap())
            .await
            .expect_err("no such edge");
        assert!(
            matches!(backhaul_error(&error), Some(Error::EdgeNotAttached { .. })),
            "{error:?}"
        );
        let counts = cluster.peers_a.stats().snapshot();
        assert_eq!(counts.not_attached, 2, "{counts:?}");
        assert_eq!(counts.refused_by_edge, 1, "{counts:?}");
        assert_eq!(counts.forwarded, 0, "{counts:?}");
    })
    .await;
}

/// Dials A's peer port without the pool: a raw session, as a hostile peer would.
async fn raw_peer(
    addr: SocketAddr,
    trusted: &[CertificateDer<'static>],
) -> (quinn::Connection, SessionClient<QuinnConnection>) {
    let endpoint = peer::client_endpoint(trusted).expect("endpoint");
    let connection = endpoint
        .connect(addr, "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake");
    let (client, _events) = SessionClient::start(connection.clone(), Role::Client, Config::new())
        .await
        .expect("session");
    (connection, client)
}

fn structured(fields: &[(&str, MetadataValue)]) -> Metadata {
    Metadata::Structured(
        fields
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect(),
    )
}

fn forward_to(edge: &str, hops: i64) -> Metadata {
    structured(&[
        ("_peer.edge", MetadataValue::String(edge.into())),
        ("_peer.hops", MetadataValue::Integer(hops)),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_secret_get_nothing_and_leave_no_task() {
    within(LIMIT, async {
        let cluster = cluster().await;
        let trusted = cluster.peers_a.trusted();
        let baseline = support::alive_tasks();

        // A pool with the wrong secret: refused, typed, and backed off.
        let wrong = pool_with(&trusted, "not the secret");
        let mut connector = wrong.connector(cluster.peers_a.addr, kiosk());
        match connector.connect("web").await {
            Err(Error::PeerRefused { relay, reason }) => {
                assert_eq!(relay, cluster.peers_a.addr);
                assert!(!reason.unwrap_or_default().contains(SECRET));
            }
            other => panic!("expected PeerRefused, got {other:?}"),
        }
        let again = Instant::now();
        assert!(matches!(
            connector.connect("web").await,
            Err(Error::PeerRefused { .. })
        ));
        assert!(
            again.elapsed() < Duration::from_secs(1),
            "the backoff answers at once"
        );
        drop((connector, wrong));

        // A peer that skips the hello and opens the edge's service directly: refused,
        // and its connection closed.
        let (connection, client) = raw_peer(cluster.peers_a.addr, &trusted).await;
        match client.open("web", forward_to(EDGE, 1)).await {
            Err(Error::StreamRejected { code, .. }) => assert_eq!(code, RejectCode::Unauthorized),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        assert_eq!(
            within(WAIT, close_code(&connection)).await,
            Some(u64::from(CLOSE_PEER_REFUSED))
        );
        drop(client);

        // A hello with the wrong secret: the same.
        let (connection, client) = raw_peer(cluster.peers_a.addr, &trusted).await;
        let hello = structured(&[
            ("relay", MetadataValue::String("mallory".into())),
            ("secret", MetadataValue::String("guess".into())),
        ]);
        assert!(matches!(
            client.open(PEER_SERVICE, hello).await,
            Err(Error::StreamRejected {
                code: RejectCode::Unauthorized,
                ..
            })
        ));
        assert_eq!(
            within(WAIT, close_code(&connection)).await,
            Some(u64::from(CLOSE_PEER_REFUSED))
        );
        drop(client);

        // A peer that says nothing at all is closed after the hello timeout (5 s).
        let (connection, client) = raw_peer(cluster.peers_a.addr, &trusted).await;
        assert_eq!(
            within(WAIT, close_code(&connection)).await,
            Some(u64::from(CLOSE_PEER_REFUSED))
        );
        drop(client);

        let counts = cluster.peers_a.stats().snapshot();
        assert_eq!(counts.admitted, 0, "{counts:?}");
        assert_eq!(counts.refused, 4, "{counts:?}");
        assert_eq!(counts.forwarded, 0, "nothing routed: {counts:?}");
        let settled = support::settle_tasks(baseline).await;
        assert!(
            settled <= baseline,
            "{settled} tasks alive, {baseline} before"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_hop_counts_are_refused() {
    within(LIMIT, async {
        let cluster = cluster().await;
        let (_connection, client) =
            raw_peer(cluster.peers_a.addr, &cluster.peers_a.trusted()).await;
        let hello = structured(&[
            ("relay", MetadataValue::String("relay-x".into())),
            ("secret", MetadataValue::String(SECRET.into())),
        ]);
        client.open(PEER_SERVICE, hello).await.expect("admitted");
        for hops in [2, 0, -1, i64::MAX] {
            match client.open("web", forward_to(EDGE, hops)).await {
                Err(Error::StreamRejected { code, reason }) => {
                    assert_eq!(code, RejectCode::Unauthorized);
                    let reason = reason.unwrap_or_default();
                    assert!(reason.starts_with("hop-limit:"), "{reason}");
                }
                other => panic!(
                    "hops {hops}: expected a refusal, got {:?}",
                    other.map(|_| ())
                ),
            }
        }
        // Not a forwarded open at all: refused too.
        assert!(matches!(
            client.open("web", Metadata::Empty).await,
            Err(Error::StreamRejected {
                code: RejectCode::Unauthorized,
                ..
            })
        ));
        // The same session, honest, is served.
        let (mut send, mut recv) = client
            .open("drip", forward_to(EDGE, 1))
            .await
            .expect("served");
        let mut first = vec![0u8; 1024];
        recv.read_exact(&mut first).await.unwrap();
        assert!(first.iter().all(|byte| *byte == 7));
        send.shutdown().await.ok();
        let counts = cluster.peers_a.stats().snapshot();
        assert_eq!(counts.hop_limit, 4, "{counts:?}");
        assert_eq!(counts.malformed, 1, "{counts:?}");
        assert_eq!(counts.forwarded, 1, "{counts:?}");
    })
    .await;
}

/// Reads `stream` until it fails; panics if it ends cleanly (a truncated stream passing
/// for a complete one) or neither within `limit`.
async fn expect_failure(stream: &mut TunnelStream<QuinnConnection>, limit: Duration) {
    let mut buffer = vec![0u8; 64 * 1024];
    within(limit, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => panic!("the stream ended cleanly though its source failed"),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_lost_mid_stream_is_an_error_at_b_not_an_end() {
    within(LIMIT, async {
        let cluster = cluster().await;
        let pool = pool_with(&cluster.peers_a.trusted(), SECRET);
        let mut connector = pool.connector(cluster.peers_a.addr, kiosk());
        let mut stream = connector.connect("drip").await.expect("stream");
        let mut first = vec![0u8; 1 << 20];
        within(WAIT, stream.read_exact(&mut first)).await.unwrap();
        cluster.edge_connection.close(0u32.into(), b"edge gone");
        expect_failure(&mut stream, WAIT).await;
        drop(cluster.edge_task);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_fails_streams_and_requests_within_the_bound_then_is_dialed_again() {
    within(LIMIT, async {
        let mut cluster = cluster().await;
        let pool = pool_with(&cluster.peers_a.trusted(), SECRET);
        let mut connector = pool.connector(cluster.peers_a.addr, kiosk());
        let mut stream = connector.connect("drip").await.expect("stream");
        let mut first = vec![0u8; 1 << 20];
        within(WAIT, stream.read_exact(&mut first)).await.unwrap();

        cluster.peers_a.kill();
        expect_failure(&mut stream, WAIT).await;

        let started = Instant::now();
        match connector.connect("web").await {
            Err(Error::PeerUnreachable { relay, .. }) => assert_eq!(relay, cluster.peers_a.addr),
            other => panic!("expected PeerUnreachable, got {other:?}"),
        }
        assert!(
            started.elapsed() < CONNECT_BOUND + SLACK,
            "failed after {:?}",
            started.elapsed()
        );

        cluster.peers_a.restart().await;
        let http: PeerClient<Empty<Bytes>> = http_client(&pool, cluster.peers_a.addr);
        eventually(WAIT, "B dials the restarted A again", || {
            let http = http.clone();
            async move {
                match http.get("http://web/n/1".parse().unwrap()).await {
                    Ok(response) => text(response).await == "reply 1",
                    Err(_) => false,
                }
            }
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_fails_streams_within_the_idle_timeout_and_dials_within_the_bound() {
    within(LIMIT, async {
        let cluster = cluster().await;
        let trusted = cluster.peers_a.trusted();
        let blackhole = Blackhole::start(cluster.peers_a.addr).await;
        let idle = Duration::from_secs(3);
        let pool = pool_with(&trusted, SECRET)
            .with_client_config(peer::client_config(&trusted, idle).unwrap());
        let mut connector = pool.connector(blackhole.addr, kiosk());
        let mut stream = connector.connect("drip").await.expect("stream");
        let mut first = vec![0u8; 1 << 20];
        within(WAIT, stream.read_exact(&mut first)).await.unwrap();

        // The network drops everything, without a goodbye.
        blackhole.go_silent();
        let started = Instant::now();
        expect_failure(&mut stream, idle + SLACK).await;
        assert!(started.elapsed() >= idle / 2, "{:?}", started.elapsed());

        let started = Instant::now();
        match connector.connect("web").await {
            Err(Error::PeerUnreachable { source, .. }) => {
                assert!(matches!(*source, Error::Timeout(_)), "{source:?}");
            }
            other => panic!("expected PeerUnreachable, got {other:?}"),
        }
        let took = started.elapsed();
        assert!(took < CONNECT_BOUND + SLACK, "failed after {took:?}");
    })
    .await;
}

/// Latency of `requests` small GETs, `concurrency` at a time, through `http`.
async fn measure<C>(http: Client<C, Empty<Bytes>>, requests: usize, concurrency: usize) -> Report
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(requests)));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let http = http.clone();
        let latencies = Arc::clone(&latencies);
        workers.spawn(async move {
            for n in (worker..requests).step_by(concurrency) {
                let begun = Instant::now();
                let response = http
                    .get(format!("http://web/n/{n}").parse().unwrap())
                    .await
                    .expect("request");
                assert_eq!(text(response).await, format!("reply {n}"));
                latencies.lock().unwrap().push(begun.elapsed());
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.expect("worker");
    }
    let elapsed = started.elapsed();
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort_unstable();
    assert_eq!(latencies.len(), requests);
    Report {
        per_second: requests as f64 / elapsed.as_secs_f64(),
        p50: latencies[requests / 2],
        p99: latencies[requests * 99 / 100],
    }
}

#[derive(Debug)]
struct Report {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} requests/s, p50 {:?}, p99 {:?}",
            self.per_second, self.p50, self.p99
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_requests_through_a_peer_cost_one_more_hop() {
    within(LIMIT, async {
        let cluster = cluster().await;
        let pool = pool_with(&cluster.peers_a.trusted(), SECRET);
        let local = cluster.relay_a.registry.get(EDGE).expect("attached");
        let direct: Client<_, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build(local.connector());
        let forwarded: PeerClient<Empty<Bytes>> = http_client(&pool, cluster.peers_a.addr);
        // Warm both pools.
        measure(direct.clone(), 64, 16).await;
        measure(forwarded.clone(), 64, 16).await;
        let (requests, concurrency) = (2000, 16);
        let local = measure(direct, requests, concurrency).await;
        let through_peer = measure(forwarded, requests, concurrency).await;
        println!("local edge:   {local}");
        println!("through peer: {through_peer}");
        // Generous: the hop must not turn milliseconds into seconds.
        assert!(
            through_peer.p99 < Duration::from_secs(2),
            "{through_peer:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_ends_every_peer_task_and_b_sees_the_peer_gone() {
    within(LIMIT, async {
        let cluster = cluster().await;
        let baseline = support::alive_tasks();
        // A second peer server for A's registry, stopped gracefully.
        let identity = Identity::self_signed(&["localhost"]).unwrap();
        let trusted = identity.cert_chain.clone();
        let endpoint = peer::server_endpoint("127.0.0.1:0".parse().unwrap(), identity).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let registry = cluster.relay_a.registry.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(
            PeerServer::new(registry, ClusterSecret::new(SECRET).unwrap())
                .serve(endpoint)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                }),
        );
        let pool = pool_with(&trusted, SECRET);
        let http: PeerClient<Empty<Bytes>> = http_client(&pool, addr);
        for n in 0..20 {
            let response = http
                .get(format!("http://web/n/{n}").parse().unwrap())
                .await
                .expect("request");
            assert_eq!(text(response).await, format!("reply {n}"));
        }
        let _ = stop.send(());
        within(WAIT, serving).await.expect("serving ends");
        let mut connector = pool.connector(addr, kiosk());
        let started = Instant::now();
        assert!(matches!(
            connector.connect("web").await,
            Err(Error::PeerUnreachable { .. })
        ));
        assert!(started.elapsed() < CONNECT_BOUND + SLACK);
        drop((http, connector, pool));
        let settled = support::settle_tasks(baseline).await;
        assert!(
            settled <= baseline,
            "{settled} tasks alive, {baseline} before"
        );
    })
    .await;
}

/// Relay B's directory: `kiosk` is attached to relay A (`relay-a`), `ghost` to relay A too
/// (which does not hold it), `stray` to a relay nobody knows the address of.
struct PeerDirectory;

impl Directory for PeerDirectory {
    type Future = std::future::Ready<Result<Location, Error>>;

    fn locate(&self, edge: &str) -> Self::Future {
        std::future::ready(Ok(match edge {
            EDGE | "ghost" => Location::Elsewhere(RelayId::new("relay-a")),
            "stray" => Location::Elsewhere(RelayId::new("relay-z")),
            _ => Location::Unknown,
        }))
    }
}

/// Failure labels a forwarder reported, and clean closes as `closed`.
#[derive(Clone, Default)]
struct TcpOutcomes(Arc<std::sync::Mutex<Vec<String>>>);

impl TcpOutcomes {
    async fn wait_for(&self, label: &str) {
        eventually(WAIT, label, || async {
            self.0.lock().unwrap().iter().any(|seen| seen == label)
        })
        .await;
    }
}

impl TcpObserver for TcpOutcomes {
    fn closed(&self, _edge: &str, _service: &backhaul::ServiceId, _carried: Spliced) {
        self.0.lock().unwrap().push("closed".into());
    }

    fn failed(&self, _edge: &str, _service: &backhaul::ServiceId, failure: &TcpFailure) {
        self.0.lock().unwrap().push(failure.label().into());
    }
}

/// Relay B's public TCP port for `edge`'s `tcp` service, reaching relay A through `pool`.
async fn tcp_port_on_b(
    edge: &str,
    pool: &PeerPool,
    relay_a: SocketAddr,
) -> (SocketAddr, TcpOutcomes, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public = listener.local_addr().unwrap();
    let outcomes = TcpOutcomes::default();
    let peers = std::collections::HashMap::from([(RelayId::new("relay-a"), relay_a)]);
    let forward = TcpForward::new(listener, PeerDirectory, edge, "tcp")
        .with_peers(pool.clone(), peers)
        .with_open_timeout(Duration::from_secs(10))
        .with_observer(outcomes.clone());
    (public, outcomes, tokio::spawn(forward.serve()))
}

/// Reads `reader` to its end, checksumming the first `len` bytes and returning the rest.
async fn read_checksummed(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    len: usize,
) -> (Checksum, Vec<u8>) {
    let mut sum = Checksum::default();
    let mut rest = Vec::new();
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = reader.read(&mut buffer).await.expect("read");
        if read == 0 {
            return (sum, rest);
        }
        let counted = usize::try_from(sum.len).unwrap();
        let take = read.min(len - counted);
        sum.update(&buffer[..take]);
        rest.extend_from_slice(&buffer[take..read]);
    }
}

/// A public TCP port on relay B reaches a TCP service of an edge attached to relay A:
/// 16 MiB each way at once, checksummed at both ends, and half-close carried (the backend
/// answers with the checksum of what it got only after the client's end reached it).
/// An edge A does not hold, and a relay whose address is unknown, close the client at
/// once and are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_ports_reach_edges_attached_to_a_peer() {
    within(LIMIT, async {
        const SIZE: usize = 16 * 1024 * 1024;
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = backend.accept().await {
                tokio::spawn(async move {
                    let (mut reader, mut writer) = stream.into_split();
                    let receive = read_checksummed(&mut reader, usize::MAX);
                    let send = async {
                        let block = support::pattern(b"down", 1024 * 1024);
                        for _ in 0..SIZE / block.len() {
                            writer.write_all(&block).await.expect("backend write");
                        }
                    };
                    let ((got, _), ()) = tokio::join!(receive, send);
                    // Only after the client's half-close: the answer crosses it.
                    writer
                        .write_all(got.header().as_bytes())
                        .await
                        .expect("answer");
                    writer.shutdown().await.expect("backend shutdown");
                });
            }
        });
        let cluster = cluster_with_tcp(Some(backend_addr)).await;
        let pool = pool_with(&cluster.peers_a.trusted(), SECRET);
        let (public, outcomes, _forward) = tcp_port_on_b(EDGE, &pool, cluster.peers_a.addr).await;

        let client = tokio::net::TcpStream::connect(public).await.unwrap();
        let (mut reader, mut writer) = client.into_split();
        let up_block = support::pattern(b"up", 1024 * 1024);
        let send = async {
            for _ in 0..SIZE / up_block.len() {
                writer.write_all(&up_block).await.expect("client write");
            }
            writer.shutdown().await.expect("client half-close");
        };
        let ((down, answer), ()) = tokio::join!(read_checksummed(&mut reader, SIZE), send);

        let (mut expected_down, mut expected_up) = (Checksum::default(), Checksum::default());
        let down_block = support::pattern(b"down", 1024 * 1024);
        for _ in 0..SIZE / up_block.len() {
            expected_down.update(&down_block);
            expected_up.update(&up_block);
        }
        assert_eq!(down, expected_down, "backend → client");
        assert_eq!(
            String::from_utf8_lossy(&answer),
            expected_up.header(),
            "client → backend, answered after the client's half-close"
        );
        outcomes.wait_for("closed").await;
        assert!(
            pool.live_session(cluster.peers_a.addr).is_some(),
            "the TCP stream went over the pool's session to A"
        );

        // Failures close the client promptly (never a hang), each counted.
        for (edge, label) in [("ghost", "open_refused"), ("stray", "peer_unreachable")] {
            let (public, outcomes, _forward) =
                tcp_port_on_b(edge, &pool, cluster.peers_a.addr).await;
            let started = Instant::now();
            // The reset can come before `connect` returns: that is a close too.
            if let Ok(mut client) = tokio::net::TcpStream::connect(public).await {
                let mut buffer = [0u8; 16];
                let read = client.read(&mut buffer).await;
                assert!(
                    matches!(read, Ok(0) | Err(_)),
                    "{edge}: the client must be closed, got {read:?}"
                );
            }
            assert!(
                started.elapsed() < SLACK,
                "{edge}: closed after {:?}",
                started.elapsed()
            );
            outcomes.wait_for(label).await;
        }
    })
    .await;
}
