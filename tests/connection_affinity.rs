//! `ReverseProxy::with_affinity` over real quinn and real TCP on 127.0.0.1: a public
//! HTTP/1 connection to a relay-like proxy (`backhaul::http::server::Server`) keeps one
//! tunnel stream of its own for all its requests; hundreds of connections at once each
//! keep theirs; a stream the edge closes is replaced; a replaced edge session is never
//! reached through a stream kept for the old one; HTTP/2 requests still use the pool.

#[path = "support/relay.rs"]
mod relay_fixture;
mod support;

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes as AxumBytes;
use axum::extract::Path;
use axum::response::IntoResponse;
use backhaul::connector::Connector;
use backhaul::edge::Router;
use backhaul::http::proxy::{retarget, ProxyBody, ReverseProxy};
use backhaul::http::server::Server;
use backhaul::http::EdgeClients;
use backhaul::relay::{EdgeHandle, Registry, TakeoverPolicy};
use backhaul::stream::TunnelStream;
use backhaul::QuinnConnection;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tower::{Layer, Service, ServiceExt};

use relay_fixture::{eventually, register, TestEdge, TestRelay};
use support::within;

const LIMIT: Duration = Duration::from_secs(120);

/// Counts the tunnel streams opened through every session's connector.
#[derive(Clone, Default)]
struct CountOpens(Arc<AtomicUsize>);

#[derive(Clone)]
struct Counted {
    inner: Connector<QuinnConnection>,
    opens: Arc<AtomicUsize>,
}

impl Layer<Connector<QuinnConnection>> for CountOpens {
    type Service = Counted;

    fn layer(&self, inner: Connector<QuinnConnection>) -> Counted {
        Counted {
            inner,
            opens: Arc::clone(&self.0),
        }
    }
}

impl Service<Uri> for Counted {
    type Response = <Connector<QuinnConnection> as Service<Uri>>::Response;
    type Error = <Connector<QuinnConnection> as Service<Uri>>::Error;
    type Future = <Connector<QuinnConnection> as Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Uri>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        self.opens.fetch_add(1, Ordering::SeqCst);
        self.inner.call(uri)
    }
}

/// The tunnel stream a request came on.
#[derive(Clone, Copy)]
struct StreamId(u64);

/// `len` bytes that depend on `seed` and their position.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Registers as `name` and serves "web": `/bytes/{seed}/{len}` answers `pattern`, `/close`
/// answers with `Connection: close`, `/stream` names the tunnel stream it came on, POST `/echo` echoes, anything else answers `answer`.
async fn edge(relay: &TestRelay, name: &str, answer: &'static str) -> TestEdge {
    let endpoint = relay.endpoint_from("127.0.0.1");
    let TestEdge {
        connection,
        client,
        events,
    } = register(&endpoint, relay.addr, name, "s3cret")
        .await
        .expect("registered");
    let app =
        axum::Router::new()
            .route(
                "/bytes/{seed}/{len}",
                axum::routing::get(|Path((seed, len)): Path<(u8, usize)>| async move {
                    pattern(seed, len)
                }),
            )
            .route(
                "/stream",
                axum::routing::get(
                    |axum::Extension(stream): axum::Extension<StreamId>| async move {
                        stream.0.to_string()
                    },
                ),
            )
            .route(
                "/close",
                axum::routing::get(|| async {
                    ([(http::header::CONNECTION, "close")], "closing").into_response()
                }),
            )
            .route(
                "/echo",
                axum::routing::post(|body: AxumBytes| async move { body }),
            )
            .fallback(move || async move { answer })
            .layer(axum::extract::DefaultBodyLimit::max(8 << 20));
    // Each stream's requests carry its id, so a test can tell which stream served one.
    let router = Router::new().route(
        "web",
        tower::service_fn(move |stream: TunnelStream<QuinnConnection>| {
            let id = StreamId(stream.info().logical_stream_id);
            let mut route = backhaul::http::serve(app.clone().layer(axum::Extension(id)));
            async move { route.call(stream).await }
        }),
    );
    tokio::spawn(router.serve(client.clone(), events).into_future());
    TestEdge {
        connection,
        client,
        events: tokio::sync::mpsc::channel(1).1,
    }
}

async fn current(registry: &Registry, name: &str, not: Option<&EdgeHandle>) -> EdgeHandle {
    let mut found = None;
    eventually(Duration::from_secs(30), "the edge registered", || {
        found = registry
            .get(name)
            .filter(|edge| not.is_none_or(|old| old.epoch() != edge.epoch()));
        std::future::ready(found.is_some())
    })
    .await;
    found.expect("found")
}

/// A public listener forwarding every request to the current session of edge "alpha",
/// service "web", with affinity; returns its address.
async fn proxy(registry: Registry, clients: EdgeClients<ProxyBody, CountOpens>) -> SocketAddr {
    let service = tower::service_fn(move |request: Request<Incoming>| {
        let (registry, clients) = (registry.clone(), clients.clone());
        async move {
            let edge = registry.get("alpha").expect("alpha is connected");
            let mut request = request;
            retarget(&mut request, "web").expect("retargeted");
            let proxy = ReverseProxy::with_client(clients.client(&edge))
                .with_affinity(clients.affinity(&edge));
            let response = match proxy.oneshot(request).await {
                Ok(response) => response,
                Err(error) => Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(backhaul::http::proxy::boxed(Full::new(Bytes::from(
                        backhaul::http::proxy::error_chain(&error),
                    ))))
                    .expect("a response"),
            };
            Ok::<_, Infallible>(response)
        }
    });
    let server = Server::bind(([127, 0, 0, 1], 0)).await.expect("binding");
    let addr = server.local_addr().expect("address");
    tokio::spawn(server.serve(service).into_future());
    addr
}

/// One public HTTP/1 connection.
async fn public_connection(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connected");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: http::Method,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Bytes) {
    sender.ready().await.expect("connection ready");
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "alpha.example")
        .body(Full::new(Bytes::from(body)))
        .expect("a request");
    let response = sender.send_request(request).await.expect("a response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (status, body)
}

struct Setup {
    registry: Registry,
    relay: TestRelay,
    opens: Arc<AtomicUsize>,
    addr: SocketAddr,
}

async fn setup(policy: TakeoverPolicy) -> (Setup, TestEdge) {
    let registry = Registry::with_policy(policy);
    let relay = TestRelay::start(&["alpha=s3cret"], registry.clone(), |acceptor| acceptor);
    let edge = edge(&relay, "alpha", "first").await;
    current(&registry, "alpha", None).await;
    let count = CountOpens::default();
    let opens = Arc::clone(&count.0);
    let clients = EdgeClients::builder(registry.clone()).layer(count).build();
    let addr = proxy(registry.clone(), clients).await;
    let setup = Setup {
        registry,
        relay,
        opens,
        addr,
    };
    (setup, edge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_connection_keeps_one_tunnel_stream_for_all_its_requests() {
    within(LIMIT, async {
        let (setup, _edge) = setup(TakeoverPolicy::default()).await;
        let mut public = public_connection(setup.addr).await;
        for round in 0..40_u8 {
            let len = if round % 10 == 9 {
                1 << 20
            } else {
                100 + usize::from(round) * 1000
            };
            let (status, body) = send(
                &mut public,
                http::Method::GET,
                &format!("/bytes/{round}/{len}"),
                Vec::new(),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            assert!(
                body == pattern(round, len),
                "response {round} intact ({len} bytes)"
            );
        }
        let upload = pattern(7, 4 << 20);
        let (status, body) = send(&mut public, http::Method::POST, "/echo", upload.clone()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body == upload, "4 MiB echoed intact");
        assert_eq!(
            setup.opens.load(Ordering::SeqCst),
            1,
            "41 requests on one public connection, one tunnel stream"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_public_connections_never_share_a_stream() {
    within(LIMIT, async {
        let (setup, _edge) = setup(TakeoverPolicy::default()).await;
        let mut first = public_connection(setup.addr).await;
        let mut second = public_connection(setup.addr).await;
        let mut streams = [
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        ];
        // One after the other, never at once: a pool would hand both connections the
        // same idle stream.
        for _ in 0..20 {
            for (public, seen) in [(&mut first, 0), (&mut second, 1)] {
                let (status, body) = send(public, http::Method::GET, "/stream", Vec::new()).await;
                assert_eq!(status, StatusCode::OK);
                streams[seen].insert(String::from_utf8(body.to_vec()).expect("a number"));
            }
        }
        assert_eq!(
            streams[0].len(),
            1,
            "the first connection's streams: {:?}",
            streams[0]
        );
        assert_eq!(
            streams[1].len(),
            1,
            "the second connection's streams: {:?}",
            streams[1]
        );
        assert_ne!(streams[0], streams[1]);
        assert_eq!(setup.opens.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_public_connections_at_once_each_keep_their_own_stream() {
    within(LIMIT, async {
        let (setup, _edge) = setup(TakeoverPolicy::default()).await;
        let mut connections = JoinSet::new();
        for id in 0..300_usize {
            let addr = setup.addr;
            connections.spawn(async move {
                let mut public = public_connection(addr).await;
                for round in 0..5_usize {
                    let seed = (id * 5 + round) as u8;
                    let len = 2000 + id;
                    let (status, body) = send(
                        &mut public,
                        http::Method::GET,
                        &format!("/bytes/{seed}/{len}"),
                        Vec::new(),
                    )
                    .await;
                    assert_eq!(status, StatusCode::OK);
                    assert!(
                        body == pattern(seed, len),
                        "connection {id} request {round}"
                    );
                }
            });
        }
        while let Some(done) = connections.join_next().await {
            done.expect("a connection's requests");
        }
        // One stream per public connection. A kept stream that is not ready for the next
        // request within a second (the machine stalled) is replaced, hence the slack.
        let opens = setup.opens.load(Ordering::SeqCst);
        assert!(
            (300..=310).contains(&opens),
            "{opens} opens for 300 connections"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_edge_closes_is_replaced_and_nothing_is_lost() {
    within(LIMIT, async {
        let (setup, _edge) = setup(TakeoverPolicy::default()).await;
        let mut public = public_connection(setup.addr).await;
        for round in 0..10_u8 {
            let (status, body) = send(&mut public, http::Method::GET, "/close", Vec::new()).await;
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"closing"[..]));
            let (status, body) = send(
                &mut public,
                http::Method::GET,
                &format!("/bytes/{round}/5000"),
                Vec::new(),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "round {round}: {body:?}");
            assert!(body == pattern(round, 5000));
        }
        // The first request opens a stream; each /close ends one, so the request after it
        // opens the next.
        assert_eq!(setup.opens.load(Ordering::SeqCst), 11);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_kept_for_a_replaced_session_never_serves_the_new_one() {
    within(LIMIT, async {
        let (setup, _first) = setup(TakeoverPolicy::ReplaceHolder).await;
        let old = current(&setup.registry, "alpha", None).await;
        let mut public = public_connection(setup.addr).await;
        let (_, body) = send(&mut public, http::Method::GET, "/", Vec::new()).await;
        assert_eq!(&body[..], b"first");

        let _second = edge(&setup.relay, "alpha", "second").await;
        current(&setup.registry, "alpha", Some(&old)).await;
        for _ in 0..20 {
            let (status, body) = send(&mut public, http::Method::GET, "/", Vec::new()).await;
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"second"[..]));
        }
        assert_eq!(
            setup.opens.load(Ordering::SeqCst),
            2,
            "one stream per session"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_go_through_the_pool() {
    within(LIMIT, async {
        let (setup, _edge) = setup(TakeoverPolicy::default()).await;
        let tcp = TcpStream::connect(setup.addr).await.expect("connected");
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        // 100 requests at once on one HTTP/2 connection: the pool shares its streams
        // among them; none waits for another's kept stream.
        let mut requests = JoinSet::new();
        for id in 0..100_u8 {
            let mut sender = sender.clone();
            requests.spawn(async move {
                let request = Request::builder()
                    .uri(format!("http://alpha.example/bytes/{id}/3000"))
                    .body(Full::new(Bytes::new()))
                    .expect("a request");
                let response = sender.send_request(request).await.expect("a response");
                assert_eq!(response.status(), StatusCode::OK);
                let body = response.into_body().collect().await.expect("a body");
                assert!(body.to_bytes() == pattern(id, 3000));
            });
        }
        while let Some(done) = requests.join_next().await {
            done.expect("a request");
        }
        let opens = setup.opens.load(Ordering::SeqCst);
        assert!((1..=100).contains(&opens), "{opens} opens");
    })
    .await;
}
