//! HTTP through a backhaul tunnel beside its baselines, over real quinn and TCP on 127.0.0.1.
//!
//! One small GET (`GET /` answering the 13-byte body `Hello, world!` from the same axum
//! app) nine ways, in the same process and on the same runtime (multi-thread, 2 workers):
//!
//! - `tunnel`: the relay's pooled `hyper_util` client over a backhaul [`Connector`] → the
//!   edge's [`Router`] → [`backhaul::http::serve`] → axum.
//! - `tunnel_pool`: like `tunnel` with backhaul's lean [`Http1Pool`] instead of
//!   hyper-util's client (what the relay forwards through).
//! - `tunnel_pool_x2`: like `tunnel_pool` over two sessions (two QUIC connections), half
//!   the workers on each.
//! - `tunnel_pool_lanes2`: like `tunnel_pool` over one session running on two lanes (two
//!   QUIC connections joined as `Edge::lanes(2)` does): one pool, the streams spread
//!   over both connections.
//! - `tunnel_h1`: like `tunnel` without the pool: one `hyper::client::conn::http1`
//!   connection per concurrent worker, each on a tunnel stream from
//!   `Connector::connect`; it pairs with `raw_quinn_h1` to isolate backhaul's own cost.
//! - `raw_quinn_h1`: hyper HTTP/1 over raw quinn bidirectional streams, no backhaul: one
//!   `hyper::client::conn::http1` connection per concurrent worker, each on its own quinn
//!   stream, served by hyper-util's auto server (as `backhaul::http::serve` does) on the
//!   streams the other side accepts.
//! - `raw_quinn_h1_x2`: as `raw_quinn_h1`, with the workers spread over two QUIC
//!   connections (their own endpoints): how much a second connection, whose packets another
//!   core can process, raises QUIC's ceiling on this machine.
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
//! After the criterion groups, a separate latency pass runs each case with `concurrency`
//! workers looping, in interleaved rounds (every way once per round, so background load
//! hits all ways alike), records every request's latency, and prints p50/p99, requests per
//! second, the connections (tunnel streams, quinn streams, TCP connections) each client
//! ended up using, and the tunnel's ratios to the baselines.
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
use backhaul::http::pool::Http1Pool;
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
/// The ratios the latency pass prints: (ours, baseline).
const RATIOS: [(&str, &str); 14] = [
    ("tunnel_pool_lanes2", "tunnel_pool"),
    ("tunnel_pool_lanes2", "tunnel_pool_x2"),
    ("tunnel_pool_lanes2", "tcp"),
    ("raw_quinn_h1_x2", "raw_quinn_h1"),
    ("raw_quinn_h1_x2", "tcp"),
    ("tunnel_pool_x2", "tunnel_pool"),
    ("tunnel_pool_x2", "tcp"),
    ("tunnel", "raw_quinn_h1"),
    ("tunnel", "raw_quinn_pooled"),
    ("tunnel", "tcp"),
    ("tunnel_pool", "tcp"),
    ("tunnel_pool", "tunnel"),
    ("tunnel_h1", "raw_quinn_h1"),
    ("tunnel", "tunnel_h1"),
];
/// Latency pass: rounds per case; in each, an unrecorded warm-up, then the recorded run.
const LATENCY_ROUNDS: usize = 5;
const LATENCY_WARM_UP: Duration = Duration::from_millis(100);
const LATENCY_ROUND: Duration = Duration::from_millis(400);

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

#[path = "../tests/support/quic.rs"]
mod quic;
#[path = "support/runtime.rs"]
mod runtime;
use quic::QuicPair;

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
    /// One hyper HTTP/1 connection per worker (on a tunnel stream or a raw quinn stream);
    /// requests carry `host`.
    PerWorkerH1 {
        senders: Arc<Vec<Mutex<http1::SendRequest<Empty<Bytes>>>>>,
        host: &'static str,
    },
    /// backhaul's lean HTTP/1 pool → backhaul Connector → edge Router → axum; with more
    /// than one pool (each on a session of its own), worker `w` uses pool `w % len`.
    TunnelPool(Vec<Http1Pool<Counted<Connector<QuinnConnection>>, Empty<Bytes>>>),
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
            Target::TunnelPool(pools) => {
                let request = Request::get(uri.clone())
                    .body(Empty::new())
                    .expect("request");
                let pool = &pools[worker % pools.len()];
                let response = pool.send(request).await.expect("pool GET");
                let (parts, body) = response.into_parts();
                let body = body.collect().await.expect("body").to_bytes();
                assert!(parts.status.is_success());
                assert_eq!(body.len(), BODY.len());
                return;
            }
            Target::PerWorkerH1 { senders, host } => {
                let request = Request::get(uri.clone())
                    .header(http::header::HOST, *host)
                    .body(Empty::new())
                    .expect("request");
                let mut sender = senders[worker].lock().await;
                sender.ready().await.expect("h1 ready");
                sender.send_request(request).await.expect("h1 GET")
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

/// A backhaul session pair on a fresh QUIC connection whose edge serves the app as "web"
/// with an edge `Router`; returns the relay's client and the connection to keep alive.
async fn tunnel_pair() -> (SessionClient<QuinnConnection>, QuicPair) {
    let (relay, mut quics) = tunnel_lanes(1).await;
    (relay, quics.remove(0))
}

/// As [`tunnel_pair`], the session running over `lanes` QUIC connections (its own and
/// `lanes - 1` joined to it on both sides, as `Edge::lanes` and the relay's `Acceptor`
/// do after the lane handshake).
async fn tunnel_lanes(lanes: usize) -> (SessionClient<QuinnConnection>, Vec<QuicPair>) {
    let mut quics = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        quics.push(QuicPair::new().await);
    }
    let relay_transport = QuinnConnection::new(quics[0].relay.clone());
    let edge_transport = QuinnConnection::new(quics[0].edge.clone());
    for lane in &quics[1..] {
        relay_transport
            .add_lane(lane.relay.clone(), lanes)
            .expect("lane");
        edge_transport
            .add_lane(lane.edge.clone(), lanes)
            .expect("lane");
    }
    let relay = Session::new(relay_transport, Role::Server, Config::new());
    let edge = Session::new(edge_transport, Role::Client, Config::new());
    let (relay, edge) = tokio::join!(relay.start(), edge.start());
    let relay = SessionClient::new(relay.expect("relay negotiates"));
    let (edge, events) = SessionClient::with_events(edge.expect("edge negotiates"));
    let serving = Router::new()
        .route("web", backhaul::http::serve(app()))
        .serve(edge, events);
    tokio::spawn(serving.into_future());
    (relay, quics)
}

/// What must outlive the measurements: QUIC connections, and sessions no client holds.
type KeepAlive = Vec<(QuicPair, Option<SessionClient<QuinnConnection>>)>;

/// Builds the nine ways: connections, sessions, servers and clients, and what to keep
/// alive meanwhile.
async fn build_ways() -> (Vec<Way>, KeepAlive) {
    let executor = TokioExecutor::new();

    let max_workers = LEVELS.iter().copied().max().unwrap_or(1);

    // (a) the tunnel: a backhaul session pair whose edge serves the app as "web".
    let (relay, quic) = tunnel_pair().await;
    let tunnel_count = Arc::new(AtomicUsize::new(0));
    let tunnel =
        Client::builder(executor.clone()).build(counted(Connector::new(relay), &tunnel_count));
    let mut pairs = vec![(quic, None)];

    // (a'') backhaul's lean HTTP/1 pool over the same kind of session.
    let (relay, quic) = tunnel_pair().await;
    let tunnel_pool_count = Arc::new(AtomicUsize::new(0));
    let tunnel_pool = vec![Http1Pool::new(counted(
        Connector::new(relay),
        &tunnel_pool_count,
    ))];
    pairs.push((quic, None));

    // (a2) the same over two sessions (two QUIC connections), half the workers on each.
    let tunnel_pool_x2_count = Arc::new(AtomicUsize::new(0));
    let mut tunnel_pool_x2 = Vec::new();
    for _ in 0..2 {
        let (relay, quic) = tunnel_pair().await;
        tunnel_pool_x2.push(Http1Pool::new(counted(
            Connector::new(relay),
            &tunnel_pool_x2_count,
        )));
        pairs.push((quic, None));
    }

    // (a3) one session over two lanes (two QUIC connections), one pool.
    let (relay, quics) = tunnel_lanes(2).await;
    let tunnel_lanes_count = Arc::new(AtomicUsize::new(0));
    let tunnel_pool_lanes2 = vec![Http1Pool::new(counted(
        Connector::new(relay),
        &tunnel_lanes_count,
    ))];
    pairs.extend(quics.into_iter().map(|quic| (quic, None)));

    // (a') hyper HTTP/1 over tunnel streams, one per worker (no pool), on a session of
    // its own.
    let (relay, quic) = tunnel_pair().await;
    // The streams do not keep the session alive: dropping its last `SessionClient` would
    // end the session (and the edge would close every stream), so it is kept.
    let mut connector = Connector::new(relay.clone());
    let mut senders = Vec::with_capacity(max_workers);
    for _ in 0..max_workers {
        let stream = connector.connect("web").await.expect("tunnel open");
        let (sender, connection) = http1::handshake(stream).await.expect("tunnel h1 handshake");
        tokio::spawn(connection);
        senders.push(Mutex::new(sender));
    }
    let tunnel_h1 = Target::PerWorkerH1 {
        senders: Arc::new(senders),
        host: "web",
    };
    let tunnel_h1_count = Arc::new(AtomicUsize::new(max_workers));
    pairs.push((quic, Some(relay)));

    // (b) hyper HTTP/1 over raw quinn streams, one per worker (no pool).
    let quics = vec![QuicPair::new().await];
    let raw_h1 = raw_h1_target(&quics, max_workers).await;
    let raw_h1_count = Arc::new(AtomicUsize::new(max_workers));
    pairs.extend(quics.into_iter().map(|quic| (quic, None)));

    // (b2) as (b), with the workers spread over two QUIC connections.
    let quics = vec![QuicPair::new().await, QuicPair::new().await];
    let raw_h1_x2 = raw_h1_target(&quics, max_workers).await;
    let raw_h1_x2_count = Arc::new(AtomicUsize::new(max_workers));
    pairs.extend(quics.into_iter().map(|quic| (quic, None)));

    // (b') the pooled client over raw quinn streams.
    let quic = QuicPair::new().await;
    tokio::spawn(serve_raw_quinn(quic.edge.clone()));
    let raw_pooled_count = Arc::new(AtomicUsize::new(0));
    let connector = RawQuinnConnector {
        connection: quic.relay.clone(),
    };
    let raw_pooled = Client::builder(executor.clone()).build(counted(connector, &raw_pooled_count));
    pairs.push((quic, None));

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
            name: "tunnel_pool",
            target: Target::TunnelPool(tunnel_pool),
            uri: Uri::from_static("http://web/"),
            connections: tunnel_pool_count,
        },
        Way {
            name: "tunnel_pool_x2",
            target: Target::TunnelPool(tunnel_pool_x2),
            uri: Uri::from_static("http://web/"),
            connections: tunnel_pool_x2_count,
        },
        Way {
            name: "tunnel_pool_lanes2",
            target: Target::TunnelPool(tunnel_pool_lanes2),
            uri: Uri::from_static("http://web/"),
            connections: tunnel_lanes_count,
        },
        Way {
            name: "tunnel_h1",
            target: tunnel_h1,
            uri: Uri::from_static("/"),
            connections: tunnel_h1_count,
        },
        Way {
            name: "raw_quinn_h1",
            target: raw_h1,
            uri: Uri::from_static("/"),
            connections: raw_h1_count,
        },
        Way {
            name: "raw_quinn_h1_x2",
            target: raw_h1_x2,
            uri: Uri::from_static("/"),
            connections: raw_h1_x2_count,
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

/// One hyper HTTP/1 connection per worker, each on a raw quinn stream of its own, the
/// workers spread in turn over `quics` (whose edges serve the app).
async fn raw_h1_target(quics: &[QuicPair], workers: usize) -> Target {
    for quic in quics {
        tokio::spawn(serve_raw_quinn(quic.edge.clone()));
    }
    let mut senders = Vec::with_capacity(workers);
    for worker in 0..workers {
        let quic = &quics[worker % quics.len()];
        let (send, recv) = quic.relay.open_bi().await.expect("raw open_bi");
        let io = TokioIo::new(QuinnIo { send, recv });
        let (sender, connection) = http1::handshake(io).await.expect("raw h1 handshake");
        tokio::spawn(connection);
        senders.push(Mutex::new(sender));
    }
    Target::PerWorkerH1 {
        senders: Arc::new(senders),
        host: "raw",
    }
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

/// What the latency pass recorded for one way at one concurrency, over all rounds.
#[derive(Default)]
struct Measured {
    latencies: Vec<Duration>,
    elapsed: Duration,
    /// Requests sent, warm-up included, and the process's CPU time meanwhile.
    sent: usize,
    cpu: Option<Duration>,
    /// Connections the client had opened when the level was done.
    connections: usize,
}

impl Measured {
    /// Adds a round's figures.
    fn absorb(&mut self, round: Measured) {
        self.cpu = if self.sent == 0 {
            round.cpu
        } else {
            self.cpu.zip(round.cpu).map(|(total, cpu)| total + cpu)
        };
        self.sent += round.sent;
        self.latencies.extend(round.latencies);
        self.elapsed += round.elapsed;
    }

    /// CPU time (all threads of the process) per request.
    fn cpu_per_request(&self) -> Option<Duration> {
        let sent = u32::try_from(self.sent).ok().filter(|sent| *sent > 0)?;
        Some(self.cpu? / sent)
    }

    fn requests_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile; call after sorting.
    fn quantile(&self, q: f64) -> Duration {
        let last = self.latencies.len().saturating_sub(1);
        self.latencies
            .get((last as f64 * q).round() as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// Runs `concurrency` looping workers for [`LATENCY_WARM_UP`] + [`LATENCY_ROUND`],
/// recording the latency of every request issued after the warm-up.
async fn measure_round(way: &Way, concurrency: usize) -> Measured {
    let mut round = Measured::default();
    let cpu_before = process_cpu_time();
    let warm_until = Instant::now() + LATENCY_WARM_UP;
    let stop_at = warm_until + LATENCY_ROUND;
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let target = way.target.clone();
        let uri = way.uri.clone();
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 14);
            let mut sent = 0;
            loop {
                let started = Instant::now();
                if started >= stop_at {
                    break;
                }
                Way::get(&target, &uri, worker).await;
                sent += 1;
                if started >= warm_until {
                    latencies.push(started.elapsed());
                }
            }
            (latencies, sent, Instant::now())
        });
    }
    let mut last = stop_at;
    while let Some(done) = workers.join_next().await {
        let (latencies, sent, ended) = done.expect("latency worker");
        round.latencies.extend(latencies);
        round.sent += sent;
        last = last.max(ended);
    }
    round.elapsed = last - warm_until;
    round.cpu = cpu_before
        .zip(process_cpu_time())
        .map(|(before, after)| after.saturating_sub(before));
    round
}

/// On-CPU time of all the process's threads so far (Linux: `/proc/self/task/*/schedstat`),
/// or `None` where that cannot be read.
fn process_cpu_time() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// For each concurrency level, [`LATENCY_ROUNDS`] rounds in which every way runs once in
/// turn (so a change in background load hits all ways alike); then prints the table.
fn latency_pass(rt: &Runtime, ways: &[Way]) {
    println!();
    println!(
        "latency pass: {LATENCY_ROUNDS} interleaved rounds of {LATENCY_WARM_UP:?} warm-up + \
         {LATENCY_ROUND:?} recorded per way and concurrency; workers loop one request at a time"
    );
    let mut results: Vec<Vec<Measured>> = ways.iter().map(|_| Vec::new()).collect();
    for &level in &LEVELS {
        let mut measured: Vec<Measured> = ways.iter().map(|_| Measured::default()).collect();
        for _ in 0..LATENCY_ROUNDS {
            for (way, into) in ways.iter().zip(measured.iter_mut()) {
                let way = way.clone();
                let round = rt.block_on(async move {
                    tokio::spawn(async move { measure_round(&way, level).await })
                        .await
                        .expect("latency task")
                });
                into.absorb(round);
            }
        }
        for ((row, mut done), way) in results.iter_mut().zip(measured).zip(ways) {
            done.latencies.sort_unstable();
            done.connections = way.connections.load(Ordering::Relaxed);
            row.push(done);
        }
    }
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<18} {:>5} {:>10} {:>10} {:>10} {:>9} {:>6}",
        "way", "conc", "req/s", "p50", "p99", "cpu/req", "conns"
    );
    for (way, row) in ways.iter().zip(&results) {
        for (&level, measured) in LEVELS.iter().zip(row) {
            let cpu = measured
                .cpu_per_request()
                .map_or_else(|| "n/a".to_owned(), |cpu| format!("{cpu:.1?}"));
            let _ = writeln!(
                table,
                "{:<18} {:>5} {:>10.0} {:>10.1?} {:>10.1?} {:>9} {:>6}",
                way.name,
                level,
                measured.requests_per_sec(),
                measured.quantile(0.50),
                measured.quantile(0.99),
                cpu,
                measured.connections
            );
        }
    }
    print!("{table}");
    println!(
        "(cpu/req: on-CPU time of all the process's threads, client and server together, per \
         request; conns: connections the client had opened by the end of that level)"
    );
    println!();
    println!("ratios (req/s; p50; p99):");
    let find = |name: &str| ways.iter().position(|way| way.name == name);
    for (ours, theirs) in RATIOS {
        let (Some(ours_at), Some(theirs_at)) = (find(ours), find(theirs)) else {
            continue;
        };
        for (level_index, &level) in LEVELS.iter().enumerate() {
            let ours = &results[ours_at][level_index];
            let theirs_measured = &results[theirs_at][level_index];
            println!(
                "  {:<30} c={level:<3} req/s {:.2}  p50 {:.2}  p99 {:.2}",
                format!("{}/{theirs}", ways[ours_at].name),
                ours.requests_per_sec() / theirs_measured.requests_per_sec(),
                ours.quantile(0.50).as_secs_f64() / theirs_measured.quantile(0.50).as_secs_f64(),
                ours.quantile(0.99).as_secs_f64() / theirs_measured.quantile(0.99).as_secs_f64(),
            );
        }
    }
}

// ----- main ------------------------------------------------------------------------------

fn main() {
    let rt = runtime::from_env();
    let (ways, _keep_alive) = rt.block_on(build_ways());
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
    // ran once as a smoke test, and the latency pass is skipped. It is skipped under
    // `--profile-time` too, so a profiler sees only the benchmark asked for.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|arg| arg == "--bench") && !args.iter().any(|arg| arg == "--profile-time") {
        latency_pass(&rt, &ways);
    }
    criterion.final_summary();
}
