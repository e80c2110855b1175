//! HTTP through a backhaul tunnel beside its baselines, over real quinn and TCP on 127.0.0.1.
//!
//! One small GET (`GET /` answering the 13-byte body `Hello, world!` from the same axum
//! app) four ways, in the same process and on the same runtime (multi-thread, 2 workers):
//!
//! - `tunnel`: the relay's pooled `hyper_util` client over a backhaul [`Connector`] → the
//!   edge's [`Router`] → [`backhaul::http::serve`] → axum.
//! - `raw_quinn_h1`: hyper HTTP/1 over raw quinn bidirectional streams, no backhaul: one
//!   `hyper::client::conn::http1` connection per concurrent worker, each on its own quinn
//!   stream, served by hyper-util's auto server (as `backhaul::http::serve` does) on the
//!   streams the other side accepts.
//! - `raw_quinn_pooled`: the same pooled `hyper_util` client as `tunnel`, but its connector
//!   opens raw quinn streams: the only difference from `tunnel` is backhaul itself.
//! - `tcp`: the pooled `hyper_util` client → hyper-util's auto server with axum on a
//!   loopback TCP listener (`TCP_NODELAY` on both sides).
//!
//! QUIC connections come from `backhaul::quic`'s endpoint helpers, one per way, built once
//! (with the TCP listener and the clients) before anything is measured. For each
//! concurrency level (1, 16, 64) an iteration sends a batch of requests: at concurrency 1
//! a single request (so the time per iteration *is* the latency), otherwise
//! `concurrency × 16` requests spread over `concurrency` tasks. Throughput is reported in
//! elements, so criterion prints requests per second. The timed loop runs on a task
//! spawned onto the runtime, not on the bench thread.
//!
//! After the criterion groups, a separate latency pass runs each case for a fixed time
//! with `concurrency` workers looping, records every request's latency, and prints p50/p99,
//! requests per second, the connections (tunnel streams, quinn streams, TCP connections)
//! each client ended up using, and the tunnel's ratios to the baselines.
//!
//! Run: `cargo bench --bench http -- --noplot`

use std::fmt::Write as _;
use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use backhaul::connector::Connector;
use backhaul::edge::Router;
use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};
use backhaul::{Config, QuinnConnection, Role, Session, SessionClient};
use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput};
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::runtime::Runtime;
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tower::Service;

/// The response body: 13 bytes.
const BODY: &str = "Hello, world!";
/// Concurrency levels measured.
const LEVELS: [usize; 3] = [1, 16, 64];
/// Requests each task sends per iteration at concurrency above 1.
const PER_TASK: usize = 16;
/// Latency pass: unrecorded warm-up, then the recorded run, per case.
const LATENCY_WARM_UP: Duration = Duration::from_millis(300);
const LATENCY_RUN: Duration = Duration::from_millis(1500);

/// The app every server runs.
fn app() -> axum::Router {
    axum::Router::new().route("/", axum::routing::get(|| async { BODY }))
}

/// The hyper-util server settings every server uses (those of `backhaul::http::serve`).
fn server_builder() -> Arc<auto::Builder<TokioExecutor>> {
    Arc::new(auto::Builder::new(TokioExecutor::new()))
}

/// Requests per iteration at `concurrency`.
fn batch_len(concurrency: usize) -> usize {
    if concurrency == 1 {
        1
    } else {
        concurrency * PER_TASK
    }
}

// ----- QUIC ------------------------------------------------------------------------------

/// Both ends of one QUIC connection on loopback, plus the endpoints that keep it alive.
struct QuicPair {
    /// The relay's end (QUIC server).
    relay: quinn::Connection,
    /// The edge's end (QUIC client).
    edge: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

impl QuicPair {
    /// Dials a fresh connection with backhaul's endpoint helpers.
    async fn new() -> Self {
        let identity = Identity::self_signed(&["localhost"]).expect("certificate");
        let trusted = identity.cert_chain.clone();
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let relay_endpoint =
            server_endpoint(addr, identity, DEFAULT_ALPN).expect("server endpoint");
        let relay_addr = relay_endpoint.local_addr().expect("relay address");
        let edge_endpoint = client_endpoint(&trusted, DEFAULT_ALPN).expect("client endpoint");
        let connecting = edge_endpoint
            .connect(relay_addr, "localhost")
            .expect("connect");
        let accepting = async { relay_endpoint.accept().await.expect("incoming").await };
        let (edge, relay) = tokio::join!(connecting, accepting);
        Self {
            relay: relay.expect("relay side"),
            edge: edge.expect("edge side"),
            _endpoints: (relay_endpoint, edge_endpoint),
        }
    }
}

/// A raw quinn bidirectional stream as one duplex byte stream, forwarding exactly what
/// backhaul's `TunnelStream` forwards (including vectored writes).
struct QuinnIo {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl AsyncRead for QuinnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuinnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write_vectored(Pin::new(&mut self.send), cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        AsyncWrite::is_write_vectored(&self.send)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

impl Connection for QuinnIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// A `hyper_util` connector that opens a raw quinn stream per connection.
#[derive(Clone)]
struct RawQuinnConnector {
    connection: quinn::Connection,
}

impl Service<Uri> for RawQuinnConnector {
    type Response = TokioIo<QuinnIo>;
    type Error = quinn::ConnectionError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let connection = self.connection.clone();
        Box::pin(async move {
            let (send, recv) = connection.open_bi().await?;
            Ok(TokioIo::new(QuinnIo { send, recv }))
        })
    }
}

/// Serves the app with hyper on every stream the peer opens on `connection`.
async fn serve_raw_quinn(connection: quinn::Connection) {
    let builder = server_builder();
    while let Ok((send, recv)) = connection.accept_bi().await {
        let builder = Arc::clone(&builder);
        tokio::spawn(async move {
            let service = TowerToHyperService::new(app());
            let io = TokioIo::new(QuinnIo { send, recv });
            let _ = builder.serve_connection_with_upgrades(io, service).await;
        });
    }
}

// ----- TCP -------------------------------------------------------------------------------

/// Serves the app with hyper on a loopback listener; returns its address.
async fn serve_tcp() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("tcp listener");
    let addr = listener.local_addr().expect("tcp address");
    let builder = server_builder();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let builder = Arc::clone(&builder);
            tokio::spawn(async move {
                let service = TowerToHyperService::new(app());
                let io = TokioIo::new(stream);
                let _ = builder.serve_connection_with_upgrades(io, service).await;
            });
        }
    });
    addr
}

// ----- the four ways ---------------------------------------------------------------------

/// A connector that counts its calls: the connections a pooled client makes.
#[derive(Clone)]
struct Counted<C> {
    inner: C,
    count: Arc<AtomicUsize>,
}

impl<C: Service<Uri>> Service<Uri> for Counted<C> {
    type Response = C::Response;
    type Error = C::Error;
    type Future = C::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.inner.call(uri)
    }
}

/// Wraps a connector so that its calls are counted in `count`.
fn counted<C>(inner: C, count: &Arc<AtomicUsize>) -> Counted<C> {
    Counted {
        inner,
        count: Arc::clone(count),
    }
}

/// Where a request goes; cheap to clone into worker tasks.
#[derive(Clone)]
enum Target {
    /// Pooled client → backhaul Connector → edge Router → axum.
    Tunnel(Client<Counted<Connector<QuinnConnection>>, Empty<Bytes>>),
    /// One hyper HTTP/1 connection per worker, each on a raw quinn stream.
    RawQuinnH1(Arc<Vec<Mutex<http1::SendRequest<Empty<Bytes>>>>>),
    /// Pooled client → raw quinn streams.
    RawQuinnPooled(Client<Counted<RawQuinnConnector>, Empty<Bytes>>),
    /// Pooled client → TCP.
    Tcp(Client<Counted<HttpConnector>, Empty<Bytes>>),
}

/// A way to send the GET, with what it needs.
#[derive(Clone)]
struct Way {
    name: &'static str,
    target: Target,
    uri: Uri,
    /// Connections (tunnel streams, quinn streams, TCP connections) opened so far.
    connections: Arc<AtomicUsize>,
}

impl Way {
    /// Sends one GET as worker `worker` and reads the whole body.
    async fn get(target: &Target, uri: &Uri, worker: usize) {
        let response = match target {
            Target::Tunnel(client) => client.get(uri.clone()).await.expect("tunnel GET"),
            Target::RawQuinnPooled(client) => client.get(uri.clone()).await.expect("raw GET"),
            Target::Tcp(client) => client.get(uri.clone()).await.expect("tcp GET"),
            Target::RawQuinnH1(senders) => {
                let request = Request::get("/")
                    .header(http::header::HOST, "raw")
                    .body(Empty::new())
                    .expect("request");
                let mut sender = senders[worker].lock().await;
                sender.ready().await.expect("raw h1 ready");
                sender.send_request(request).await.expect("raw h1 GET")
            }
        };
        assert!(response.status().is_success());
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body.len(), BODY.len());
    }
}

/// Builds the four ways: connections, sessions, servers and clients; the QUIC pairs are
/// returned to be kept alive.
async fn build_ways() -> (Vec<Way>, Vec<QuicPair>) {
    let executor = TokioExecutor::new();

    // (a) the tunnel: a backhaul session pair whose edge serves the app as "web".
    let quic = QuicPair::new().await;
    let relay = Session::new(
        QuinnConnection::new(quic.relay.clone()),
        Role::Server,
        Config::new(),
    );
    let edge = Session::new(
        QuinnConnection::new(quic.edge.clone()),
        Role::Client,
        Config::new(),
    );
    let (relay, edge) = tokio::join!(relay.start(), edge.start());
    let relay = SessionClient::new(relay.expect("relay negotiates"));
    let (edge, events) = SessionClient::with_events(edge.expect("edge negotiates"));
    let serving = Router::new()
        .route("web", backhaul::http::serve(app()))
        .serve(edge, events);
    tokio::spawn(serving.into_future());
    let tunnel_count = Arc::new(AtomicUsize::new(0));
    let tunnel = Client::builder(executor.clone())
        .build(counted(Connector::new(relay.clone()), &tunnel_count));
    let mut pairs = vec![quic];

    // (b) hyper HTTP/1 over raw quinn streams, one per worker.
    let quic = QuicPair::new().await;
    tokio::spawn(serve_raw_quinn(quic.edge.clone()));
    let max_workers = LEVELS.iter().copied().max().unwrap_or(1);
    let mut senders = Vec::with_capacity(max_workers);
    for _ in 0..max_workers {
        let (send, recv) = quic.relay.open_bi().await.expect("raw open_bi");
        let io = TokioIo::new(QuinnIo { send, recv });
        let (sender, connection) = http1::handshake(io).await.expect("raw h1 handshake");
        tokio::spawn(connection);
        senders.push(Mutex::new(sender));
    }
    let raw_h1_count = Arc::new(AtomicUsize::new(max_workers));
    pairs.push(quic);

    // (b') the pooled client over raw quinn streams.
    let quic = QuicPair::new().await;
    tokio::spawn(serve_raw_quinn(quic.edge.clone()));
    let raw_pooled_count = Arc::new(AtomicUsize::new(0));
    let connector = RawQuinnConnector {
        connection: quic.relay.clone(),
    };
    let raw_pooled = Client::builder(executor.clone()).build(counted(connector, &raw_pooled_count));
    pairs.push(quic);

    // (c) the pooled client over loopback TCP.
    let addr = serve_tcp().await;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let tcp_count = Arc::new(AtomicUsize::new(0));
    let tcp = Client::builder(executor).build(counted(connector, &tcp_count));

    let ways = vec![
        Way {
            name: "tunnel",
            target: Target::Tunnel(tunnel),
            uri: Uri::from_static("http://web/"),
            connections: tunnel_count,
        },
        Way {
            name: "raw_quinn_h1",
            target: Target::RawQuinnH1(Arc::new(senders)),
            uri: Uri::from_static("/"),
            connections: raw_h1_count,
        },
        Way {
            name: "raw_quinn_pooled",
            target: Target::RawQuinnPooled(raw_pooled),
            uri: Uri::from_static("http://raw/"),
            connections: raw_pooled_count,
        },
        Way {
            name: "tcp",
            target: Target::Tcp(tcp),
            uri: format!("http://{addr}/").parse().expect("tcp uri"),
            connections: tcp_count,
        },
    ];
    (ways, pairs)
}

/// One iteration: [`batch_len`] requests over `concurrency` tasks.
async fn batch(target: &Target, uri: &Uri, concurrency: usize) {
    if concurrency == 1 {
        Way::get(target, uri, 0).await;
        return;
    }
    let mut tasks = JoinSet::new();
    for worker in 0..concurrency {
        let target = target.clone();
        let uri = uri.clone();
        tasks.spawn(async move {
            for _ in 0..PER_TASK {
                Way::get(&target, &uri, worker).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("request task");
    }
}

// ----- latency pass ----------------------------------------------------------------------

/// What the latency pass measured for one way at one concurrency.
struct Measured {
    requests_per_sec: f64,
    p50: Duration,
    p99: Duration,
    connections: usize,
}

/// Runs `concurrency` looping workers for [`LATENCY_WARM_UP`] + [`LATENCY_RUN`], recording
/// the latency of every request issued after the warm-up.
async fn measure(way: &Way, concurrency: usize) -> Measured {
    let warm_until = Instant::now() + LATENCY_WARM_UP;
    let stop_at = warm_until + LATENCY_RUN;
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let target = way.target.clone();
        let uri = way.uri.clone();
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 14);
            loop {
                let started = Instant::now();
                if started >= stop_at {
                    break;
                }
                Way::get(&target, &uri, worker).await;
                if started >= warm_until {
                    latencies.push(started.elapsed());
                }
            }
            (latencies, Instant::now())
        });
    }
    let mut all = Vec::new();
    let mut last = stop_at;
    while let Some(done) = workers.join_next().await {
        let (latencies, ended) = done.expect("latency worker");
        all.extend(latencies);
        last = last.max(ended);
    }
    all.sort_unstable();
    let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize];
    Measured {
        requests_per_sec: all.len() as f64 / (last - warm_until).as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        connections: way.connections.load(Ordering::Relaxed),
    }
}

fn latency_pass(rt: &Runtime, ways: &[Way]) {
    println!();
    println!(
        "latency pass: {concurrency_note}, {LATENCY_WARM_UP:?} warm-up + {LATENCY_RUN:?} \
         recorded per case",
        concurrency_note = "workers loop one request at a time"
    );
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<18} {:>5} {:>10} {:>10} {:>10} {:>6}",
        "way", "conc", "req/s", "p50", "p99", "conns"
    );
    let mut results: Vec<Vec<Measured>> = Vec::new();
    for way in ways {
        let mut row = Vec::new();
        for &level in &LEVELS {
            let this = way.clone();
            let measured = rt.block_on(async move {
                tokio::spawn(async move { measure(&this, level).await })
                    .await
                    .expect("latency task")
            });
            let _ = writeln!(
                table,
                "{:<18} {:>5} {:>10.0} {:>10.1?} {:>10.1?} {:>6}",
                way.name,
                level,
                measured.requests_per_sec,
                measured.p50,
                measured.p99,
                measured.connections
            );
            row.push(measured);
        }
        results.push(row);
    }
    print!("{table}");
    println!();
    println!("tunnel relative to each baseline (req/s ratio; p50 and p99 ratios):");
    for (index, way) in ways.iter().enumerate().skip(1) {
        for (level_index, &level) in LEVELS.iter().enumerate() {
            let ours = &results[0][level_index];
            let theirs = &results[index][level_index];
            println!(
                "  tunnel/{:<16} c={level:<3} req/s {:.2}  p50 {:.2}  p99 {:.2}",
                way.name,
                ours.requests_per_sec / theirs.requests_per_sec,
                ours.p50.as_secs_f64() / theirs.p50.as_secs_f64(),
                ours.p99.as_secs_f64() / theirs.p99.as_secs_f64(),
            );
        }
    }
}

// ----- main ------------------------------------------------------------------------------

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (ways, _quic_pairs) = rt.block_on(build_ways());
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    for &level in &LEVELS {
        let mut group = criterion.benchmark_group(format!("http_get/c{level}"));
        group
            .sampling_mode(SamplingMode::Flat)
            .throughput(Throughput::Elements(batch_len(level) as u64));
        for way in &ways {
            group.bench_function(way.name, |b| {
                b.iter_custom(|iters| {
                    let target = way.target.clone();
                    let uri = way.uri.clone();
                    rt.block_on(async move {
                        tokio::spawn(async move {
                            let started = Instant::now();
                            for _ in 0..iters {
                                batch(&target, &uri, level).await;
                            }
                            started.elapsed()
                        })
                        .await
                        .expect("bench task")
                    })
                });
            });
        }
        group.finish();
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then each benchmark
    // ran once as a smoke test, and the latency pass is skipped.
    if std::env::args().any(|arg| arg == "--bench") {
        latency_pass(&rt, &ways);
    }
    criterion.final_summary();
}
