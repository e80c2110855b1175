//! backhaul sessions beside their baselines, over real quinn on 127.0.0.1.
//!
//! Every group runs "ours" and its baseline in the same process, on the same runtime
//! (multi-thread, 2 workers) and over QUIC connections built the same way (endpoints from
//! `backhaul::quic`, one fresh connection per side per group). Setup is not measured: each
//! group builds its connections and sessions once, then times only the work, on a task
//! spawned onto the runtime.
//!
//! - `open_latency`: one sequential open of a bound stream whose edge service writes 1 byte
//!   and finishes, timed until that byte is read, vs a raw quinn round trip (client opens a
//!   stream and writes 1 byte, the server answers 1 byte). Two edges: `backhaul` answers
//!   like the reference `edge` example (accept and bind in the event loop, serve on a
//!   task), `backhaul_router` with backhaul's `Router` (accept, bind and serve on one task
//!   per stream). After criterion's pass, a paired pass runs them in turn, round after
//!   round, with two more ways: `raw_shape`, raw quinn in the protocol's shape (a request
//!   on a long-lived control stream, answered there and by a stream the edge opens, all
//!   awaited in the opener's own task), and `raw_shape_hop`, the same with the answer and
//!   the stream taken by a reader task and handed to the opener through a channel, as a
//!   backhaul session does (what that hand-off costs). Then the `Router` way and the raw
//!   round trip once more with each side on a runtime of its own: the relay's on the
//!   bench's runtime, the edge's a current-thread runtime on a thread of its own, as the
//!   proxy runs them (`BENCH_WORKER_THREADS=1` makes the relay's current-thread too, as a
//!   relay shard is). It prints medians and each way's median extra time
//!   over the raw round trip of the same round (this machine drifts too much between
//!   criterion's separate groups for a difference of a few tens of µs), then the UDP
//!   datagrams each way and the threads' sleeps per open.
//! - `throughput`: 256 MiB from the relay to the edge through a backhaul-opened stream (the
//!   edge's sink counts the bytes and answers the count when the stream ends) vs the same
//!   through a raw quinn stream the relay opens.
//! - `opens_64_concurrent`: opens per second with 64 concurrent openers, backhaul vs the
//!   `quic-reverse` 0.1.2 crate (its relay and its edge, served like its `edge` example).
//!   The reference relay hands each open whichever data stream `accept_bi` returns next, so
//!   concurrent opens can get each other's streams and fail with a bind-id mismatch; its
//!   openers retry until they have their share of completed opens, and the attempts and
//!   failures are printed after the group.
//! - `opens_500_at_once`: 500 opens launched at once vs 500 raw quinn open-and-answer
//!   rounds launched at once.
//!
//! Run: `cargo bench --bench session -- --noplot`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::future::IntoFuture;

use backhaul::edge::Router;
use backhaul::stream::TunnelStream;
use backhaul::{
    ClientEvent, CloseCode, Config, Connection as _, Metadata, QuinnConnection, Role, Session,
};
use criterion::{Criterion, SamplingMode, Throughput};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

type OurClient = backhaul::SessionClient<QuinnConnection>;
type TheirConnection = quic_reverse_transport::QuinnConnection;
type TheirClient = quic_reverse::SessionClient<TheirConnection>;

/// Bytes carried per `throughput` iteration.
const THROUGHPUT_BYTES: u64 = 256 * 1024 * 1024;
/// Size of each write in the `throughput` cases.
const WRITE_CHUNK: usize = 256 * 1024;
/// Concurrent openers in `opens_64_concurrent`.
const OPENERS: usize = 64;
/// Completed opens per opener per `opens_64_concurrent` iteration.
const OPENS_PER_OPENER: usize = 10;
/// Opens launched together in `opens_500_at_once`.
const AT_ONCE: usize = 500;

/// The edge service that writes one byte and finishes.
const ONE_BYTE: &str = "one";
/// The edge service that counts what it reads and answers the count (8 bytes, big endian).
const SINK: &str = "sink";

// ----- connections ---------------------------------------------------------------------

#[path = "../tests/support/quic.rs"]
mod quic;
#[path = "support/runtime.rs"]
mod runtime;
use quic::QuicPair;

/// A backhaul relay and a backhaul edge serving [`ONE_BYTE`] and [`SINK`].
struct OurPair {
    relay: OurClient,
    quic: QuicPair,
}

/// How the edge of an [`OurPair`] answers open requests.
#[derive(Clone, Copy)]
enum EdgeServing {
    /// Its event loop accepts and binds, then serves on a task (the reference `edge`
    /// example's way): [`serve_our_edge`].
    EventLoop,
    /// backhaul's `Router`, which accepts, binds and serves on one task per stream.
    Router,
}

impl OurPair {
    async fn new(relay_config: Config, edge_config: Config) -> Self {
        Self::served(relay_config, edge_config, EdgeServing::EventLoop).await
    }

    async fn served(relay_config: Config, edge_config: Config, serving: EdgeServing) -> Self {
        let quic = QuicPair::new().await;
        let relay = Session::new(
            QuinnConnection::new(quic.relay.clone()),
            Role::Server,
            relay_config,
        );
        let edge = Session::new(
            QuinnConnection::new(quic.edge.clone()),
            Role::Client,
            edge_config,
        );
        let (relay, edge) = tokio::join!(relay.start(), edge.start());
        let relay = backhaul::SessionClient::new(relay.expect("relay negotiates"));
        let (edge, events) = backhaul::SessionClient::with_events(edge.expect("edge negotiates"));
        match serving {
            EdgeServing::EventLoop => drop(tokio::spawn(serve_our_edge(edge, events))),
            EdgeServing::Router => drop(tokio::spawn(router().serve(edge, events).into_future())),
        }
        Self { relay, quic }
    }

    /// Opens [`ONE_BYTE`] and reads its byte.
    async fn open_one(&self) {
        let (send, mut recv) = self
            .relay
            .open(ONE_BYTE, Metadata::Empty)
            .await
            .expect("backhaul open");
        let mut byte = [0u8; 1];
        recv.read_exact(&mut byte).await.expect("backhaul answer");
        drop((send, recv));
    }
}

/// The [`ONE_BYTE`] service as a `Router` route.
fn router() -> Router<QuinnConnection> {
    Router::new().route(
        ONE_BYTE,
        tower::service_fn(|mut stream: TunnelStream<QuinnConnection>| async move {
            stream.write_all(&[1]).await?;
            stream.shutdown().await
        }),
    )
}

/// Serves backhaul open requests the way `SessionClient`'s docs (and the reference `edge`
/// example) do: accept, open and bind in the event loop, serve the stream on its own task.
/// The stream is closed after its service, which frees its `max_concurrent_streams` slot.
async fn serve_our_edge(edge: OurClient, mut events: mpsc::Receiver<ClientEvent>) {
    while let Some(event) = events.recv().await {
        let ClientEvent::OpenRequest {
            request_id,
            service,
            ..
        } = event
        else {
            continue;
        };
        let id = edge.allocate_stream_id();
        if edge.accept_open(request_id, id).await.is_err() {
            return;
        }
        let Ok((mut send, recv)) = edge.connection().open_bi().await else {
            return;
        };
        if edge.bind_stream(&mut send, id).await.is_err() {
            return;
        }
        let edge = edge.clone();
        tokio::spawn(async move {
            run_service(service.as_str(), send, recv).await;
            let _ = edge.close_stream(id, CloseCode::Normal, None).await;
        });
    }
}

/// The reference crate's relay and edge, the edge served like its `edge` example.
struct TheirPair {
    relay: TheirClient,
    quic: QuicPair,
}

impl TheirPair {
    async fn new() -> Self {
        let quic = QuicPair::new().await;
        let relay = quic_reverse::Session::new(
            TheirConnection::new(quic.relay.clone()),
            quic_reverse::Role::Server,
            quic_reverse::Config::new(),
        );
        let edge = quic_reverse::Session::new(
            TheirConnection::new(quic.edge.clone()),
            quic_reverse::Role::Client,
            quic_reverse::Config::new(),
        );
        let (relay, edge) = tokio::join!(relay.start(), edge.start());
        let relay = quic_reverse::SessionClient::new(relay.expect("reference relay negotiates"));
        let (edge, events) =
            quic_reverse::SessionClient::with_events(edge.expect("reference edge negotiates"));
        tokio::spawn(serve_their_edge(edge, events));
        Self { relay, quic }
    }

    /// Opens [`ONE_BYTE`] and reads its byte; false if the open failed.
    async fn try_open_one(&self) -> bool {
        let Ok((send, mut recv)) = self
            .relay
            .open(ONE_BYTE, quic_reverse::Metadata::Empty)
            .await
        else {
            return false;
        };
        let mut byte = [0u8; 1];
        let answered = recv.read_exact(&mut byte).await.is_ok();
        drop((send, recv));
        answered
    }
}

/// The reference `edge` example's loop: incrementing logical ids, accept, open and bind in
/// the event loop, serve the stream on its own task.
async fn serve_their_edge(
    edge: TheirClient,
    mut events: mpsc::Receiver<quic_reverse::ClientEvent>,
) {
    use quic_reverse_transport::Connection as _;
    let connection = edge.connection().clone();
    let mut next_stream_id: u64 = 1;
    while let Some(event) = events.recv().await {
        let quic_reverse::ClientEvent::OpenRequest {
            request_id,
            service,
            ..
        } = event
        else {
            continue;
        };
        let id = next_stream_id;
        next_stream_id += 1;
        if edge.accept_open(request_id, id).await.is_err() {
            return;
        }
        let Ok((mut send, recv)) = connection.open_bi().await else {
            return;
        };
        if edge.bind_stream(&mut send, id).await.is_err() {
            return;
        }
        tokio::spawn(async move { run_service(service.as_str(), send, recv).await });
    }
}

/// Raw quinn: a task answering every stream the peer opens with `service`.
fn serve_raw(connection: quinn::Connection, service: &'static str) {
    tokio::spawn(async move {
        while let Ok((send, mut recv)) = connection.accept_bi().await {
            tokio::spawn(async move {
                if service == ONE_BYTE {
                    // The client's request byte first, then the answer.
                    let mut byte = [0u8; 1];
                    if AsyncReadExt::read_exact(&mut recv, &mut byte).await.is_ok() {
                        run_service(service, send, recv).await;
                    }
                } else {
                    run_service(service, send, recv).await;
                }
            });
        }
    });
}

/// Raw quinn: one round trip on a fresh stream, 1 byte each way.
async fn raw_round_trip(connection: &quinn::Connection) {
    let (mut send, mut recv) = connection.open_bi().await.expect("raw open_bi");
    send.write_all(&[1]).await.expect("raw request");
    let mut byte = [0u8; 1];
    AsyncReadExt::read_exact(&mut recv, &mut byte)
        .await
        .expect("raw answer");
    drop((send, recv));
}

/// Raw quinn in the protocol's shape, with nothing else: the opener writes one request
/// byte on a long-lived control stream; the other side answers one byte on it and opens a
/// stream of its own carrying two bytes (where backhaul sends a `StreamBind` and the
/// service's byte). The opener waits for both in its own task. What backhaul adds over
/// this is its own doing; what this adds over [`raw_round_trip`] is the shape's.
struct ShapePair {
    quic: QuicPair,
    control: tokio::sync::Mutex<(quinn::SendStream, quinn::RecvStream)>,
}

impl ShapePair {
    async fn new() -> Self {
        let quic = QuicPair::new().await;
        let (mut edge_send, mut edge_recv) = quic.edge.open_bi().await.expect("control open");
        // quinn announces a stream with its first bytes.
        edge_send.write_all(&[0]).await.expect("control hello");
        let (relay_send, mut relay_recv) = quic.relay.accept_bi().await.expect("control");
        let mut hello = [0u8; 1];
        relay_recv
            .read_exact(&mut hello)
            .await
            .expect("control hello");
        let edge = quic.edge.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1];
            while edge_recv.read_exact(&mut request).await.is_ok() {
                if edge_send.write_all(&[2]).await.is_err() {
                    return;
                }
                let edge = edge.clone();
                tokio::spawn(async move {
                    if let Ok((mut send, _recv)) = edge.open_bi().await {
                        let _ = send.write_all(&[1, 1]).await;
                        let _ = send.finish();
                    }
                });
            }
        });
        Self {
            quic,
            control: tokio::sync::Mutex::new((relay_send, relay_recv)),
        }
    }

    async fn open_one(&self) {
        let mut control = self.control.lock().await;
        let (send, recv) = &mut *control;
        send.write_all(&[1]).await.expect("shape request");
        let mut answer = [0u8; 1];
        let (stream, answered) =
            tokio::join!(self.quic.relay.accept_bi(), recv.read_exact(&mut answer));
        answered.expect("shape answer");
        let (_send, mut recv) = stream.expect("shape stream");
        let mut bytes = [0u8; 2];
        recv.read_exact(&mut bytes).await.expect("shape bytes");
    }
}

/// [`ShapePair`] with the opener's side split as backhaul's is: a reader task takes the
/// answer and the stream and hands the stream to the waiting opener through a channel.
struct ShapeHopPair {
    quic: QuicPair,
    send: tokio::sync::Mutex<quinn::SendStream>,
    streams: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<quinn::RecvStream>>,
}

impl ShapeHopPair {
    async fn new() -> Self {
        let ShapePair { quic, control } = ShapePair::new().await;
        let (send, mut recv) = control.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let relay = quic.relay.clone();
        tokio::spawn(async move {
            loop {
                let mut answer = [0u8; 1];
                let (stream, answered) =
                    tokio::join!(relay.accept_bi(), recv.read_exact(&mut answer));
                let (Ok((_send, recv)), Ok(())) = (stream, answered) else {
                    return;
                };
                if tx.send(recv).await.is_err() {
                    return;
                }
            }
        });
        Self {
            quic,
            send: tokio::sync::Mutex::new(send),
            streams: tokio::sync::Mutex::new(rx),
        }
    }

    async fn open_one(&self) {
        let mut streams = self.streams.lock().await;
        self.send
            .lock()
            .await
            .write_all(&[1])
            .await
            .expect("hop request");
        let mut recv = streams.recv().await.expect("hop stream");
        let mut bytes = [0u8; 2];
        recv.read_exact(&mut bytes).await.expect("hop bytes");
    }
}

/// A runtime of its own for the edge's side: one thread, current-thread, as the proxy's
/// edge runs (and each relay shard).
struct EdgeThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EdgeThread {
    fn start() -> Self {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("edge runtime");
            handle_tx.send(rt.handle().clone()).expect("edge handle");
            let _ = rt.block_on(stopped);
        });
        let handle = handle_rx.recv().expect("edge runtime started");
        Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for EdgeThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One QUIC connection whose relay end is driven by the caller's runtime and whose edge
/// end (its endpoint, connection driver and every task of its side) by `edge`'s.
async fn split_quic_pair(edge: &EdgeThread) -> QuicPair {
    use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};
    let identity = Identity::self_signed(&["localhost"]).expect("certificate");
    let trusted = identity.cert_chain.clone();
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
    let relay_endpoint = server_endpoint(addr, identity, DEFAULT_ALPN).expect("server endpoint");
    let relay_addr = relay_endpoint.local_addr().expect("relay address");
    let dialing = edge.handle.spawn(async move {
        let endpoint = client_endpoint(&trusted, DEFAULT_ALPN).expect("client endpoint");
        let connection = endpoint
            .connect(relay_addr, "localhost")
            .expect("connect")
            .await
            .expect("edge side");
        (endpoint, connection)
    });
    let incoming = relay_endpoint.accept().await.expect("incoming");
    let relay = incoming.await.expect("relay side");
    let (edge_endpoint, edge) = dialing.await.expect("dialing task");
    QuicPair {
        relay,
        edge,
        relay_endpoint,
        edge_endpoint,
    }
}

/// The `Router` way and the raw round trip with each side on a runtime of its own: the
/// relay's on the bench's runtime, the edge's on an [`EdgeThread`].
struct SplitWays {
    routed: OurPair,
    raw: QuicPair,
    _edge: EdgeThread,
}

impl SplitWays {
    async fn new() -> Self {
        let edge_thread = EdgeThread::start();
        let quic = split_quic_pair(&edge_thread).await;
        let relay = Session::new(
            QuinnConnection::new(quic.relay.clone()),
            Role::Server,
            Config::new(),
        );
        let edge_connection = quic.edge.clone();
        let edge_side = edge_thread.handle.spawn(async move {
            let edge = Session::new(
                QuinnConnection::new(edge_connection),
                Role::Client,
                Config::new(),
            );
            let (edge, events) =
                backhaul::SessionClient::with_events(edge.start().await.expect("edge negotiates"));
            drop(tokio::spawn(router().serve(edge, events).into_future()));
        });
        let relay = relay.start().await.expect("relay negotiates");
        edge_side.await.expect("edge side started");
        let routed = OurPair {
            relay: backhaul::SessionClient::new(relay),
            quic,
        };
        let raw = split_quic_pair(&edge_thread).await;
        let answering = raw.edge.clone();
        edge_thread
            .handle
            .spawn(async move { serve_raw(answering, ONE_BYTE) });
        Self {
            routed,
            raw,
            _edge: edge_thread,
        }
    }

    /// A raw round trip opened by the relay's end, answered by the edge's.
    async fn raw_round_trip(&self) {
        raw_round_trip(&self.raw.relay).await;
    }
}

// ----- services --------------------------------------------------------------------------

async fn run_service<W, R>(service: &str, mut send: W, mut recv: R)
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    match service {
        ONE_BYTE => {
            let _ = send.write_all(&[1]).await;
        }
        SINK => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total: u64 = 0;
            loop {
                match recv.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = send.write_all(&total.to_be_bytes()).await;
        }
        _ => {}
    }
    // quinn's shutdown is `finish`.
    let _ = send.shutdown().await;
}

/// Writes [`THROUGHPUT_BYTES`], finishes, and checks the sink's count.
async fn push_through<W, R>(mut send: W, mut recv: R, chunk: &[u8])
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let mut left = THROUGHPUT_BYTES;
    while left > 0 {
        let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        send.write_all(&chunk[..n]).await.expect("write");
        left -= n as u64;
    }
    send.shutdown().await.expect("finish");
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await.expect("sink's count");
    assert_eq!(u64::from_be_bytes(count), THROUGHPUT_BYTES);
}

// ----- groups ------------------------------------------------------------------------------

/// Runs `work` on the runtime's workers (not on the bench thread) and returns its time.
async fn timed<F>(work: F) -> Duration
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let start = Instant::now();
        work.await;
        start.elapsed()
    })
    .await
    .expect("bench task")
}

fn open_latency(c: &mut Criterion, rt: &Runtime) {
    let (events, routed, raw) = rt.block_on(async {
        let events = OurPair::served(Config::new(), Config::new(), EdgeServing::EventLoop).await;
        let routed = OurPair::served(Config::new(), Config::new(), EdgeServing::Router).await;
        let raw = QuicPair::new().await;
        serve_raw(raw.relay.clone(), ONE_BYTE);
        (Arc::new(events), Arc::new(routed), raw)
    });
    let shape = Arc::new(rt.block_on(ShapePair::new()));
    let hop = Arc::new(rt.block_on(ShapeHopPair::new()));
    let split = Arc::new(rt.block_on(SplitWays::new()));
    let mut group = c.benchmark_group("open_latency");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, pair) in [("backhaul", &events), ("backhaul_router", &routed)] {
        group.bench_function(name, |b| {
            b.to_async(rt).iter_custom(|iters| {
                let pair = Arc::clone(pair);
                timed(async move {
                    for _ in 0..iters {
                        pair.open_one().await;
                    }
                })
            });
        });
    }
    group.bench_function("raw_quinn", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let edge = raw.edge.clone();
            timed(async move {
                for _ in 0..iters {
                    raw_round_trip(&edge).await;
                }
            })
        });
    });
    group.finish();

    let opener = raw.edge.clone();
    let rounds = rt.block_on({
        let (events, routed, shape, hop, split) = (
            Arc::clone(&events),
            Arc::clone(&routed),
            Arc::clone(&shape),
            Arc::clone(&hop),
            Arc::clone(&split),
        );
        async move {
            tokio::spawn(async move {
                let mut rounds = PairedRounds::default();
                for _ in 0..PAIRED_ROUNDS {
                    let start = Instant::now();
                    events.open_one().await;
                    rounds.events.push(start.elapsed());
                    let start = Instant::now();
                    routed.open_one().await;
                    rounds.routed.push(start.elapsed());
                    let start = Instant::now();
                    raw_round_trip(&opener).await;
                    rounds.raw.push(start.elapsed());
                    let start = Instant::now();
                    shape.open_one().await;
                    rounds.shape.push(start.elapsed());
                    let start = Instant::now();
                    hop.open_one().await;
                    rounds.hop.push(start.elapsed());
                    let start = Instant::now();
                    split.routed.open_one().await;
                    rounds.split_routed.push(start.elapsed());
                    let start = Instant::now();
                    split.raw_round_trip().await;
                    rounds.split_raw.push(start.elapsed());
                }
                rounds
            })
            .await
            .expect("paired rounds")
        }
    });
    rounds.report();
    for (name, pair) in [("backhaul", &events), ("backhaul_router", &routed)] {
        let connection = pair.quic.relay.clone();
        let counts = counts_per_round(rt, &connection, {
            let pair = Arc::clone(pair);
            move || {
                let pair = Arc::clone(&pair);
                async move { pair.open_one().await }
            }
        });
        counts.print(name, "open");
    }
    let opener = raw.edge.clone();
    let counts = counts_per_round(rt, &raw.edge, move || {
        let connection = opener.clone();
        async move { raw_round_trip(&connection).await }
    });
    counts.print("raw_quinn", "round trip");
    let counts = counts_per_round(rt, &shape.quic.relay, {
        let shape = Arc::clone(&shape);
        move || {
            let shape = Arc::clone(&shape);
            async move { shape.open_one().await }
        }
    });
    counts.print("raw_shape", "open");
    let counts = counts_per_round(rt, &hop.quic.relay, {
        let hop = Arc::clone(&hop);
        move || {
            let hop = Arc::clone(&hop);
            async move { hop.open_one().await }
        }
    });
    counts.print("raw_shape_hop", "open");
    hop.quic.close();
    split.routed.quic.close();
    split.raw.close();
    events.quic.close();
    routed.quic.close();
    raw.close();
    shape.quic.close();
}

/// The times of `open_latency`'s alternating rounds.
#[derive(Default)]
struct PairedRounds {
    events: Vec<Duration>,
    routed: Vec<Duration>,
    raw: Vec<Duration>,
    shape: Vec<Duration>,
    hop: Vec<Duration>,
    /// The `Router` way and the raw round trip with each side on a runtime of its own.
    split_routed: Vec<Duration>,
    split_raw: Vec<Duration>,
}

impl PairedRounds {
    /// Prints each way's median and the median of its extra time over the raw round trip
    /// of the same round.
    fn report(self) {
        let extra = |ours: &[Duration]| -> Vec<Duration> {
            ours.iter()
                .zip(&self.raw)
                .map(|(ours, raw)| ours.saturating_sub(*raw))
                .collect()
        };
        let (events_extra, routed_extra) = (extra(&self.events), extra(&self.routed));
        let (shape_extra, hop_extra) = (extra(&self.shape), extra(&self.hop));
        println!(
            "open_latency, {PAIRED_ROUNDS} alternating rounds (medians): raw quinn {:.1} µs; \
             backhaul {:.1} µs, {:.1} µs over raw; backhaul_router {:.1} µs, {:.1} µs over raw; \
             raw_shape {:.1} µs, {:.1} µs over raw; raw_shape_hop {:.1} µs, {:.1} µs over raw",
            micros(median(self.raw)),
            micros(median(self.events)),
            micros(median(events_extra)),
            micros(median(self.routed)),
            micros(median(routed_extra)),
            micros(median(self.shape)),
            micros(median(shape_extra)),
            micros(median(self.hop)),
            micros(median(hop_extra)),
        );
        // Signed: here an open often takes less than the raw round trip of its round.
        let mut split_extra: Vec<f64> = self
            .split_routed
            .iter()
            .zip(&self.split_raw)
            .map(|(ours, raw)| micros(*ours) - micros(*raw))
            .collect();
        split_extra.sort_by(f64::total_cmp);
        println!(
            "open_latency, each side on a runtime of its own (relay: the bench's, edge: a \
             current-thread runtime on a thread of its own): raw quinn {:.1} µs; \
             backhaul_router {:.1} µs, {:+.1} µs over raw",
            micros(median(self.split_raw)),
            micros(median(self.split_routed)),
            split_extra[split_extra.len() / 2],
        );
    }
}

/// Runs `round` [`COUNTED_ROUNDS`] times and returns, per round, the UDP datagrams
/// `connection` sent and received (from quinn's connection statistics) and the times the
/// process's threads slept (from Linux's `/proc`; 0 elsewhere).
fn counts_per_round<F, Fut>(rt: &Runtime, connection: &quinn::Connection, round: F) -> RoundCounts
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let before = connection.stats();
    let sleeps_before = thread_sleeps();
    rt.block_on(async move {
        tokio::spawn(async move {
            for _ in 0..COUNTED_ROUNDS {
                round().await;
            }
            // Let what the last round set off (acknowledgements) go out.
            tokio::time::sleep(Duration::from_millis(50)).await;
        })
        .await
        .expect("counted rounds");
    });
    let after = connection.stats();
    let sleeps = thread_sleeps() - sleeps_before;
    let per_round = |count: u64| count as f64 / COUNTED_ROUNDS as f64;
    RoundCounts {
        sent: per_round(after.udp_tx.datagrams - before.udp_tx.datagrams),
        received: per_round(after.udp_rx.datagrams - before.udp_rx.datagrams),
        sleeps: per_round(sleeps),
    }
}

/// What one round of `open_latency` costs besides time, on average.
struct RoundCounts {
    /// UDP datagrams the relay's connection sent.
    sent: f64,
    /// UDP datagrams it received.
    received: f64,
    /// Times a thread of the process went to sleep (each wakes again, often on a futex):
    /// a task hop to an idle worker costs one.
    sleeps: f64,
}

impl RoundCounts {
    fn print(&self, way: &str, round: &str) {
        println!(
            "open_latency/{way}: {:.2} datagrams out, {:.2} back, {:.2} thread sleeps per {round}",
            self.sent, self.received, self.sleeps
        );
    }
}

/// Voluntary context switches of all the process's threads so far (Linux).
fn thread_sleeps() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|count| count.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Rounds whose datagrams `open_latency` counts.
const COUNTED_ROUNDS: u64 = 1000;

/// Rounds of `open_latency`'s paired pass: an open of each way, then a raw round trip, in
/// turn, so that the machine's drift from one second to the next hits all alike.
const PAIRED_ROUNDS: usize = 3000;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

fn micros(time: Duration) -> f64 {
    time.as_secs_f64() * 1e6
}

fn throughput(c: &mut Criterion, rt: &Runtime) {
    let (ours, raw) = rt.block_on(async {
        let ours = Arc::new(OurPair::new(Config::new(), Config::new()).await);
        let raw = QuicPair::new().await;
        serve_raw(raw.edge.clone(), SINK);
        (ours, raw)
    });
    let chunk: Arc<[u8]> = (0..WRITE_CHUNK).map(|i| i as u8).collect();
    let mut group = c.benchmark_group("throughput");
    group
        .throughput(Throughput::Bytes(THROUGHPUT_BYTES))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    group.bench_function("backhaul_relay_to_edge", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let ours = Arc::clone(&ours);
            let chunk = Arc::clone(&chunk);
            timed(async move {
                for _ in 0..iters {
                    let (send, recv) = ours
                        .relay
                        .open(SINK, Metadata::Empty)
                        .await
                        .expect("backhaul open");
                    push_through(send, recv, &chunk).await;
                }
            })
        });
    });
    group.bench_function("raw_quinn_relay_to_edge", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let relay = raw.relay.clone();
            let chunk = Arc::clone(&chunk);
            timed(async move {
                for _ in 0..iters {
                    let (send, recv) = relay.open_bi().await.expect("raw open_bi");
                    push_through(send, recv, &chunk).await;
                }
            })
        });
    });
    group.finish();
    ours.quic.close();
    raw.close();
}

fn opens_64_concurrent(c: &mut Criterion, rt: &Runtime) {
    let (ours, theirs) = rt.block_on(async {
        let ours = Arc::new(OurPair::new(Config::new(), Config::new()).await);
        let theirs = Arc::new(TheirPair::new().await);
        (ours, theirs)
    });
    let opens = OPENERS * OPENS_PER_OPENER;
    let attempts = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("opens_64_concurrent");
    group
        .throughput(Throughput::Elements(opens as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.bench_function("backhaul", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let ours = Arc::clone(&ours);
            timed(async move {
                for _ in 0..iters {
                    let mut openers = JoinSet::new();
                    for _ in 0..OPENERS {
                        let ours = Arc::clone(&ours);
                        openers.spawn(async move {
                            for _ in 0..OPENS_PER_OPENER {
                                ours.open_one().await;
                            }
                        });
                    }
                    while let Some(done) = openers.join_next().await {
                        done.expect("opener");
                    }
                }
            })
        });
    });
    group.bench_function("quic_reverse_0_1_2", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let theirs = Arc::clone(&theirs);
            let attempts = Arc::clone(&attempts);
            let failures = Arc::clone(&failures);
            timed(async move {
                for _ in 0..iters {
                    let mut openers = JoinSet::new();
                    for _ in 0..OPENERS {
                        let theirs = Arc::clone(&theirs);
                        let attempts = Arc::clone(&attempts);
                        let failures = Arc::clone(&failures);
                        openers.spawn(async move {
                            let mut completed = 0;
                            while completed < OPENS_PER_OPENER {
                                attempts.fetch_add(1, Ordering::Relaxed);
                                if theirs.try_open_one().await {
                                    completed += 1;
                                } else {
                                    let failed = failures.fetch_add(1, Ordering::Relaxed) + 1;
                                    assert!(failed < 1_000_000, "reference opens keep failing");
                                }
                            }
                        });
                    }
                    while let Some(done) = openers.join_next().await {
                        done.expect("opener");
                    }
                }
            })
        });
    });
    group.finish();
    let attempts = attempts.load(Ordering::Relaxed);
    let failures = failures.load(Ordering::Relaxed);
    if attempts > 0 {
        println!(
            "opens_64_concurrent/quic_reverse_0_1_2: {attempts} open attempts, {failures} failed \
             ({:.1}%; retried, so the figure above counts completed opens only)",
            100.0 * failures as f64 / attempts as f64
        );
    }
    ours.quic.close();
    theirs.quic.close();
}

fn opens_500_at_once(c: &mut Criterion, rt: &Runtime) {
    let (ours, routed, raw) = rt.block_on(async {
        let relay_config = Config::new().with_max_inflight_opens(1024);
        let edge_config = Config::new().with_max_concurrent_streams(4096);
        let ours = Arc::new(OurPair::new(relay_config.clone(), edge_config.clone()).await);
        let routed =
            Arc::new(OurPair::served(relay_config, edge_config, EdgeServing::Router).await);
        let raw = QuicPair::new().await;
        serve_raw(raw.relay.clone(), ONE_BYTE);
        (ours, routed, raw)
    });
    let mut group = c.benchmark_group("opens_500_at_once");
    group
        .throughput(Throughput::Elements(AT_ONCE as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    // The edge answers in its event loop (`backhaul`) or with a `Router`, which takes the
    // requests in the session's control reader and spawns each stream's task from there.
    for (name, pair) in [("backhaul", &ours), ("backhaul_router", &routed)] {
        group.bench_function(name, |b| {
            b.to_async(rt).iter_custom(|iters| {
                let pair = Arc::clone(pair);
                timed(async move {
                    for _ in 0..iters {
                        let mut opens = JoinSet::new();
                        for _ in 0..AT_ONCE {
                            let pair = Arc::clone(&pair);
                            opens.spawn(async move { pair.open_one().await });
                        }
                        while let Some(done) = opens.join_next().await {
                            done.expect("open");
                        }
                    }
                })
            });
        });
    }
    group.bench_function("raw_quinn", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let edge = raw.edge.clone();
            timed(async move {
                for _ in 0..iters {
                    let mut rounds = JoinSet::new();
                    for _ in 0..AT_ONCE {
                        let edge = edge.clone();
                        rounds.spawn(async move { raw_round_trip(&edge).await });
                    }
                    while let Some(done) = rounds.join_next().await {
                        done.expect("round trip");
                    }
                }
            })
        });
    });
    group.finish();
    ours.quic.close();
    routed.quic.close();
    raw.close();
}

fn main() {
    let rt = runtime::from_env();
    let mut criterion = Criterion::default().configure_from_args();
    open_latency(&mut criterion, &rt);
    throughput(&mut criterion, &rt);
    opens_64_concurrent(&mut criterion, &rt);
    opens_500_at_once(&mut criterion, &rt);
    criterion.final_summary();
}
