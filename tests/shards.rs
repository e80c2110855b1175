//! A relay on shards (`backhaul::shards`) over real quinn, TLS and TCP on 127.0.0.1: edges
//! spread over the shards, every request of a public connection (plain HTTP by its
//! `Host`, HTTPS by its server name) and every TCP connection served on the shard that
//! drives its edge's QUIC connection, hundreds at once, bodies intact; connections whose
//! first bytes name nothing (silent, unknown hosts, heads in pieces) are still served or
//! cut on time, and never hold the others up.

#[path = "support/relay.rs"]
mod relay_fixture;
mod support;

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::http::request::Parts;
use ::http::{Request, Response, StatusCode};
use backhaul::edge::Router;
use backhaul::http::express::{Express, RouteFuture, StreamPool, Upstream};
use backhaul::http::server::{ConnectionInfo, Limits, Server};
use backhaul::relay::{self, Acceptor, Registry, Tokens};
use backhaul::shards::{Shard, ShardSet, Shards};
use backhaul::tcp::{forward_to, TcpForward, TcpObserver};
use backhaul::{QuinnConnection, ServiceId};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use relay_fixture::{eventually, open_admission, register, TestEdge};
use support::{pattern, within};

const LIMIT: Duration = Duration::from_secs(120);
const EDGES: usize = 12;
const SHARDS: usize = 3;
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// Where each request was served, against where its edge lives.
#[derive(Default)]
struct Placements {
    on_edge_shard: AtomicUsize,
    elsewhere: AtomicUsize,
}

impl Placements {
    fn record(&self, edge_shard: Option<Shard>) {
        if edge_shard.is_some() && Shards::current() == edge_shard {
            self.on_edge_shard.fetch_add(1, Ordering::SeqCst);
        } else {
            self.elsewhere.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// `<edge>.test` to that edge's `web` service on the express lane.
struct ByHost {
    registry: Registry,
    pool: StreamPool,
    placements: Arc<Placements>,
}

fn edge_of(host: &str) -> Option<&str> {
    host.split(':').next()?.strip_suffix(".test")
}

impl Express for ByHost {
    fn route<'a>(&'a self, head: &'a mut Parts, _info: &'a ConnectionInfo) -> RouteFuture<'a> {
        let host = head
            .headers
            .get(::http::header::HOST)
            .and_then(|host| host.to_str().ok());
        let upstream = host
            .and_then(edge_of)
            .and_then(|edge| self.registry.get(edge))
            .map(|handle| {
                self.placements.record(handle.shard());
                let key = format!("{}/{}/web", handle.name(), handle.epoch().get());
                Upstream::new(key, handle.connector(), "web").with_pool(self.pool.clone())
            });
        RouteFuture::ready(upstream)
    }
}

/// Counts where TCP connections were carried.
struct TcpPlacements {
    registry: Registry,
    placements: Arc<Placements>,
}

impl TcpObserver for TcpPlacements {
    fn closed(&self, edge: &str, _service: &ServiceId, _carried: backhaul::tcp::Spliced) {
        let shard = self.registry.get(edge).and_then(|handle| handle.shard());
        self.placements.record(shard);
    }
}

/// The body `/<n>` of `edge` answers with.
fn body_for(edge: &str, n: usize) -> Vec<u8> {
    pattern(format!("{edge}/{n}").as_bytes(), 1_000 + n * 1_531)
}

/// An edge serving `web` (HTTP: `/<n>` answers [`body_for`]) and `echo` (TCP, to
/// `echo_backend`).
fn serve_edge(
    name: String,
    edge: TestEdge,
    echo_backend: SocketAddr,
) -> tokio::task::JoinHandle<()> {
    let web = backhaul::http::serve(tower::service_fn(move |request: Request<Incoming>| {
        let n: usize = request.uri().path()[1..].parse().unwrap_or(0);
        let body = body_for(&name, n);
        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
    }));
    let router: Router<QuinnConnection> = Router::new()
        .route("web", web)
        .route("echo", forward_to(echo_backend.to_string()));
    let TestEdge { client, events, .. } = edge;
    tokio::spawn(async move {
        let _ = router.serve(client, events).into_future().await;
    })
}

/// A TCP backend that echoes what it reads.
async fn echo_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = socket.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `count` GETs for `edge` one after another on one keep-alive connection over
/// `io`, checking every body.
async fn requests_on<I>(io: I, edge: &str, first: usize, count: usize)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    for n in first..first + count {
        let request = Request::get(format!("/{n}"))
            .header("host", format!("{edge}.test"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = sender.send_request(request).await.expect("a response");
        assert_eq!(response.status(), StatusCode::OK, "{edge} /{n}");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        assert!(
            body[..] == body_for(edge, n)[..],
            "{edge} /{n}: the body differs"
        );
    }
}

fn tls_configs(names: &[String]) -> (Arc<rustls::ServerConfig>, tokio_rustls::TlsConnector) {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let identity = backhaul::quic::Identity::self_signed(&names).expect("certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for certificate in &identity.cert_chain {
        roots.add(certificate.clone()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        Arc::new(server),
        tokio_rustls::TlsConnector::from(Arc::new(client)),
    )
}

/// A public server for `registry`'s edges on `shards`: the express route, and for
/// everything else a 404.
fn public_server(
    listener: std::net::TcpListener,
    registry: &Registry,
    shards: &ShardSet,
    placements: &Arc<Placements>,
) -> Server {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let placement_registry = registry.clone();
    Server::from_listener(listener)
        .with_limits(Limits {
            header_timeout: HEADER_TIMEOUT,
            ..Limits::DEFAULT
        })
        .with_express(ByHost {
            registry: registry.clone(),
            pool: StreamPool::new(Duration::from_secs(30), 64),
            placements: Arc::clone(placements),
        })
        .with_shards(shards.clone(), move |host: &str| {
            placement_registry.get(edge_of(host)?)?.shard()
        })
}

fn not_found() -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|_request: Request<Incoming>| async {
        let mut response = Response::new(Full::new(Bytes::from_static(b"no such edge")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        Ok::<_, Infallible>(response)
    })
}

#[test]
fn edges_spread_over_the_shards_and_their_requests_are_served_on_their_shards() {
    let shards = Shards::new(SHARDS).expect("shards");
    let set = shards.set();
    // Edges and clients run on a runtime of their own, as if on other machines.
    let others = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let others = others.handle().clone();
    let names: Vec<String> = (0..EDGES).map(|i| format!("e{i}")).collect();
    let tls_names: Vec<String> = names.iter().map(|name| format!("{name}.test")).collect();
    let (tls_server, tls_connector) = tls_configs(&tls_names);

    shards.block_on(within(LIMIT, async move {
        // The relay, on the shards.
        let registry = Registry::new();
        let identity = backhaul::quic::Identity::self_signed(&["localhost"]).expect("certificate");
        let trusted = identity.cert_chain.clone();
        let endpoint = relay::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            identity,
            backhaul::quic::DEFAULT_ALPN,
        )
        .expect("relay endpoint");
        let relay_addr = endpoint.local_addr().unwrap();
        let tokens: Vec<String> = names.iter().map(|name| format!("{name}=secret")).collect();
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let acceptor = Acceptor::new(endpoint, registry.clone(), Tokens::parse(&tokens).unwrap())
            .with_admission(open_admission())
            .with_shards(set.clone());
        let mut relay_tasks = JoinSet::new();
        relay_tasks.spawn(acceptor.serve().into_future());

        let placements = Arc::new(Placements::default());
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let plain_addr = plain.local_addr().unwrap();
        let server = public_server(plain, &registry, &set, &placements);
        relay_tasks.spawn(server.serve(not_found()).into_future());
        let secure = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let secure_addr = secure.local_addr().unwrap();
        let server = public_server(secure, &registry, &set, &placements).with_tls(tls_server);
        relay_tasks.spawn(server.serve(not_found()).into_future());
        let tcp_placements = Arc::new(Placements::default());
        let tcp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp_listener.local_addr().unwrap();
        let forward = TcpForward::new(tcp_listener, registry.clone(), "e5", "echo")
            .with_shards(set.clone())
            .with_observer(TcpPlacements {
                registry: registry.clone(),
                placements: Arc::clone(&tcp_placements),
            });
        relay_tasks.spawn(forward.serve());

        // The edges, all at once.
        let edge_names = names.clone();
        let edges = others
            .spawn(async move {
                let echo = echo_backend().await;
                let mut joins = JoinSet::new();
                for name in edge_names {
                    let endpoint = relay_fixture::endpoint_from("127.0.0.1", &trusted);
                    joins.spawn(async move {
                        let edge = register(&endpoint, relay_addr, &name, "secret")
                            .await
                            .expect("registered");
                        (serve_edge(name, edge, echo), endpoint)
                    });
                }
                let mut served = Vec::new();
                while let Some(joined) = joins.join_next().await {
                    served.push(joined.unwrap());
                }
                served
            })
            .await
            .unwrap();
        eventually(LIMIT, "every edge registered", || {
            let registry = registry.clone();
            async move { registry.len() == EDGES }
        })
        .await;

        // Spread evenly, and each edge's shard is where it was counted.
        assert_eq!(set.edge_counts(), vec![EDGES / SHARDS; SHARDS]);
        let mut by_handle = vec![0; SHARDS];
        for name in &names {
            let shard = registry
                .get(name)
                .unwrap()
                .shard()
                .expect("attached on a shard");
            by_handle[set.index_of(shard).expect("one of ours")] += 1;
        }
        assert_eq!(by_handle, vec![EDGES / SHARDS; SHARDS]);

        // 300 requests at once over 60 plain keep-alive connections, and 12 HTTPS ones;
        // meanwhile silent connections, unknown hosts and heads in pieces.
        let names_for_clients = names.clone();
        let clients = others.spawn(async move {
            let mut clients = JoinSet::new();
            for (i, name) in names_for_clients.iter().cycle().take(60).enumerate() {
                let name = name.clone();
                clients.spawn(async move {
                    let tcp = TcpStream::connect(plain_addr).await.unwrap();
                    requests_on(tcp, &name, i * 5, 5).await;
                });
            }
            for name in &names_for_clients {
                let name = name.clone();
                let connector = tls_connector.clone();
                clients.spawn(async move {
                    let tcp = TcpStream::connect(secure_addr).await.unwrap();
                    let server_name = ServerName::try_from(format!("{name}.test")).unwrap();
                    let tls = connector.connect(server_name, tcp).await.expect("TLS");
                    requests_on(tls, &name, 1_000, 3).await;
                });
            }
            while let Some(joined) = clients.join_next().await {
                joined.expect("a client");
            }
        });
        let oddities = others.spawn(async move {
            let started = Instant::now();
            let mut silent = Vec::new();
            for _ in 0..20 {
                silent.push(TcpStream::connect(plain_addr).await.unwrap());
            }
            // An unknown host is placed in turn and answered by the service.
            let tcp = TcpStream::connect(plain_addr).await.unwrap();
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(connection);
            let request = Request::get("/")
                .header("host", "nobody.test")
                .body(Full::<Bytes>::default())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
            // A head sent in pieces: nothing to place it by at first, served all the same.
            let mut pieces = TcpStream::connect(plain_addr).await.unwrap();
            pieces.write_all(b"GET /7 HTTP/1.1\r\nHo").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            pieces
                .write_all(b"st: e3.test\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            pieces.read_to_end(&mut answer).await.unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 200"), "{:?}", &answer[..20]);
            assert!(answer.ends_with(&body_for("e3", 7)), "the body differs");
            // The silent ones are cut at the header timeout, counted from accept.
            for mut socket in silent {
                let mut byte = [0; 1];
                let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut byte));
                assert!(matches!(read.await, Ok(Ok(0) | Err(_))), "cut");
            }
            started.elapsed()
        });
        clients.await.expect("the clients");
        let silent_for = oddities.await.expect("the odd connections");
        // Waiting for first bytes to place a connection by must not restart its clock:
        // that would cut them at twice the timeout.
        assert!(
            silent_for >= HEADER_TIMEOUT && silent_for < HEADER_TIMEOUT * 9 / 5,
            "silent connections were cut after {silent_for:?}, not at the header timeout"
        );

        // Every routed request ran on its edge's shard (the head in pieces aside: it
        // was placed in turn, and may have landed there or not).
        let on = placements.on_edge_shard.load(Ordering::SeqCst);
        let elsewhere = placements.elsewhere.load(Ordering::SeqCst);
        assert_eq!(on + elsewhere, 300 + EDGES * 3 + 1);
        assert!(
            elsewhere <= 1,
            "{elsewhere} requests served off their edge's shard"
        );

        // TCP: 50 connections at once to e5's echo, carried on e5's shard, bytes intact.
        let tcp_clients = others.spawn(async move {
            let mut clients = JoinSet::new();
            for i in 0..50 {
                clients.spawn(async move {
                    let mut tcp = TcpStream::connect(tcp_addr).await.unwrap();
                    let sent = pattern(format!("tcp/{i}").as_bytes(), 20_000 + i * 997);
                    let (mut reader, mut writer) = tcp.split();
                    let write = async {
                        writer.write_all(&sent).await.unwrap();
                        writer.shutdown().await.unwrap();
                    };
                    let mut echoed = Vec::new();
                    let read = reader.read_to_end(&mut echoed);
                    let ((), read) = tokio::join!(write, read);
                    read.unwrap();
                    assert!(echoed == sent, "connection {i}: the echo differs");
                });
            }
            while let Some(joined) = clients.join_next().await {
                joined.expect("a TCP client");
            }
        });
        tcp_clients.await.expect("the TCP clients");
        eventually(LIMIT, "every TCP connection closed", || {
            let tcp_placements = Arc::clone(&tcp_placements);
            async move {
                tcp_placements.on_edge_shard.load(Ordering::SeqCst)
                    + tcp_placements.elsewhere.load(Ordering::SeqCst)
                    == 50
            }
        })
        .await;
        assert_eq!(tcp_placements.on_edge_shard.load(Ordering::SeqCst), 50);

        // Edges leave: their shards' counts go back to zero.
        for (serving, endpoint) in edges {
            serving.abort();
            endpoint.close(0u32.into(), b"done");
        }
        eventually(LIMIT, "every edge gone", || {
            let set = set.clone();
            async move { set.edge_counts().iter().sum::<usize>() == 0 }
        })
        .await;
        relay_tasks.abort_all();
    }));
}

/// Connections still waiting to be placed (nothing sent yet) do not hold a graceful
/// shutdown up: the server finishes at once, not after their header timeout.
#[test]
fn a_graceful_shutdown_does_not_wait_for_connections_being_placed() {
    let shards = Shards::new(2).expect("shards");
    let set = shards.set();
    let others = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let others = others.handle().clone();
    shards.block_on(within(LIMIT, async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let placed = Arc::new(AtomicUsize::new(0));
        let asked = Arc::clone(&placed);
        let open = Arc::new(OpenCount::default());
        let server = Server::from_listener(listener)
            .with_observer(Arc::clone(&open))
            .with_limits(Limits {
                header_timeout: Duration::from_secs(60),
                shutdown_timeout: Duration::from_secs(60),
                ..Limits::DEFAULT
            })
            .with_shards(set, move |_host: &str| {
                asked.fetch_add(1, Ordering::SeqCst);
                None
            });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(
            server
                .serve(not_found())
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .into_future(),
        );
        // Silent connections, and one served request to show the server is up.
        let silent = others
            .spawn(async move {
                let mut silent = Vec::new();
                for _ in 0..20 {
                    silent.push(TcpStream::connect(addr).await.unwrap());
                }
                let tcp = TcpStream::connect(addr).await.unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                let request = Request::get("/")
                    .header("host", "anyone.test")
                    .body(Full::<Bytes>::default())
                    .unwrap();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::NOT_FOUND);
                silent
            })
            .await
            .unwrap();
        assert_eq!(
            placed.load(Ordering::SeqCst),
            1,
            "only the request named a host"
        );
        let started = Instant::now();
        let _ = stop.send(());
        serving.await.expect("the server");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the shutdown took {:?}",
            started.elapsed()
        );
        assert_eq!(
            open.now.load(Ordering::SeqCst),
            0,
            "every connection closed"
        );
        // The silent connections were closed.
        others
            .spawn(async move {
                for mut socket in silent {
                    let mut byte = [0; 1];
                    let read =
                        tokio::time::timeout(Duration::from_secs(10), socket.read(&mut byte));
                    assert!(matches!(read.await, Ok(Ok(0) | Err(_))), "closed");
                }
            })
            .await
            .unwrap();
    }));
}

/// Connections open now, as the server's observer hears of them.
#[derive(Default)]
struct OpenCount {
    now: AtomicUsize,
}

impl backhaul::http::server::Observer for OpenCount {
    fn connection_opened(&self, _info: &ConnectionInfo) {
        self.now.fetch_add(1, Ordering::SeqCst);
    }

    fn connection_closed(&self, _info: &ConnectionInfo) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}
