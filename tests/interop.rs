//! Interop with the published `quic-reverse` 0.1.2 crate over real quinn connections.
//!
//! Each test dials one QUIC connection on 127.0.0.1 (`support::quic_pair`) and runs one crate
//! on each end: our relay against the reference edge, the reference relay against our edge,
//! and the handshake both ways round. Data crosses every stream in both directions and is
//! compared by length and checksum. Every test is bounded by [`LIMIT`] so a hang fails.
//!
//! The reference relay takes whichever data stream arrives next for an open, so its opens
//! are kept sequential here; our relay matches streams by logical id and is also driven
//! with concurrent opens.

mod support;

use std::time::Duration;

use backhaul::Connection as _;
use quic_reverse_transport::Connection as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use quic_reverse_control::MetadataValue as TheirValue;
use support::{pattern, quic_pair, within, QuicPair};

type OurConnection = backhaul::QuinnConnection;
type TheirConnection = quic_reverse_transport::QuinnConnection;

/// Upper bound on any single test.
const LIMIT: Duration = Duration::from_secs(60);

/// Services both test edges expose: "echo" copies back, "source" writes the length and
/// pattern named by its metadata, "sink" reads everything and answers with length and
/// checksum. Anything else is rejected.
const SERVICES: &[&str] = &["echo", "source", "sink"];

/// Payload sizes exchanged: a few KiB up to a few MiB, including odd lengths.
const SIZES: &[usize] = &[4 * 1024, 64 * 1024 + 3, 1024 * 1024, 3 * 1024 * 1024 + 17];

// ---------------------------------------------------------------------------------------------
// Data helpers, generic over both crates' streams (both are tokio AsyncRead/AsyncWrite).

/// FNV-1a over `data`.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |state, byte| {
        (state ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Metadata bytes asking "source" for `len` bytes of the pattern seeded by `seed`.
fn source_request(len: usize, seed: &[u8]) -> Vec<u8> {
    let mut bytes = (len as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(seed);
    bytes
}

/// Runs one of [`SERVICES`] on an accepted data stream; `request` is the metadata bytes.
async fn serve_stream<S, R>(service: &str, request: Vec<u8>, mut send: S, mut recv: R)
where
    S: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    match service {
        "echo" => {
            tokio::io::copy(&mut recv, &mut send)
                .await
                .expect("echo copy");
        }
        "source" => {
            let len = u64::from_le_bytes(request[..8].try_into().expect("length prefix"));
            let data = pattern(&request[8..], usize::try_from(len).expect("length"));
            send.write_all(&data).await.expect("source write");
        }
        "sink" => {
            let mut data = Vec::new();
            recv.read_to_end(&mut data).await.expect("sink read");
            let mut answer = (data.len() as u64).to_le_bytes().to_vec();
            answer.extend_from_slice(&checksum(&data).to_le_bytes());
            send.write_all(&answer).await.expect("sink answer");
        }
        other => panic!("no service {other}"),
    }
    send.shutdown().await.expect("finish");
}

/// Sends `data` to "echo" while reading the echo, and checks both match.
async fn check_echo<S, R>(mut send: S, mut recv: R, data: &[u8])
where
    S: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let write = async {
        send.write_all(data).await.expect("write to echo");
        send.shutdown().await.expect("finish echo");
    };
    let mut echoed = Vec::with_capacity(data.len());
    let read = recv.read_to_end(&mut echoed);
    let ((), read) = tokio::join!(write, read);
    read.expect("read echo");
    assert_eq!(echoed.len(), data.len(), "echo length");
    assert_eq!(checksum(&echoed), checksum(data), "echo checksum");
}

/// Reads what "source" wrote for `request` and checks it.
async fn check_source<S, R>(mut send: S, mut recv: R, len: usize, seed: &[u8])
where
    S: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    send.shutdown().await.expect("finish source request");
    let mut received = Vec::with_capacity(len);
    recv.read_to_end(&mut received).await.expect("read source");
    assert_eq!(received.len(), len, "source length");
    assert_eq!(
        checksum(&received),
        checksum(&pattern(seed, len)),
        "source checksum"
    );
}

/// Writes `data` to "sink" and checks the length and checksum it answers.
async fn check_sink<S, R>(mut send: S, mut recv: R, data: &[u8])
where
    S: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    send.write_all(data).await.expect("write to sink");
    send.shutdown().await.expect("finish sink");
    let mut answer = Vec::new();
    recv.read_to_end(&mut answer)
        .await
        .expect("read sink answer");
    assert_eq!(answer.len(), 16, "sink answer size");
    let len = u64::from_le_bytes(answer[..8].try_into().unwrap());
    let sum = u64::from_le_bytes(answer[8..].try_into().unwrap());
    assert_eq!(len, data.len() as u64, "sink saw a different length");
    assert_eq!(sum, checksum(data), "sink saw different bytes");
}

// ---------------------------------------------------------------------------------------------
// Session set-up.

/// Our relay (QUIC server, `Role::Server`) and the reference edge (`Role::Client`),
/// negotiated over one fresh connection.
struct OurRelayTheirEdge {
    relay_session: backhaul::Session<OurConnection>,
    relay: backhaul::SessionClient<OurConnection>,
    edge_session: quic_reverse::Session<TheirConnection>,
    edge: quic_reverse::SessionClient<TheirConnection>,
    edge_events: mpsc::Receiver<quic_reverse::ClientEvent>,
    quic: QuicPair,
}

async fn our_relay_their_edge(
    relay_config: backhaul::Config,
    edge_config: quic_reverse::Config,
) -> OurRelayTheirEdge {
    let quic = quic_pair().await;
    let relay_session = backhaul::Session::new(
        OurConnection::new(quic.relay.clone()),
        backhaul::Role::Server,
        relay_config,
    );
    let edge_session = quic_reverse::Session::new(
        TheirConnection::new(quic.edge.clone()),
        quic_reverse::Role::Client,
        edge_config,
    );
    let (relay, edge) = tokio::join!(relay_session.start(), edge_session.start());
    let relay = backhaul::SessionClient::new(relay.expect("our relay negotiates"));
    let (edge, edge_events) =
        quic_reverse::SessionClient::with_events(edge.expect("their edge negotiates"));
    OurRelayTheirEdge {
        relay_session,
        relay,
        edge_session,
        edge,
        edge_events,
        quic,
    }
}

/// The reference relay (`Role::Server`) and our edge (`Role::Client`).
struct TheirRelayOurEdge {
    relay_session: quic_reverse::Session<TheirConnection>,
    relay: quic_reverse::SessionClient<TheirConnection>,
    edge_session: backhaul::Session<OurConnection>,
    edge: backhaul::SessionClient<OurConnection>,
    edge_events: mpsc::Receiver<backhaul::ClientEvent>,
    _quic: QuicPair,
}

async fn their_relay_our_edge(
    relay_config: quic_reverse::Config,
    edge_config: backhaul::Config,
) -> TheirRelayOurEdge {
    let quic = quic_pair().await;
    let relay_session = quic_reverse::Session::new(
        TheirConnection::new(quic.relay.clone()),
        quic_reverse::Role::Server,
        relay_config,
    );
    let edge_session = backhaul::Session::new(
        OurConnection::new(quic.edge.clone()),
        backhaul::Role::Client,
        edge_config,
    );
    let (relay, edge) = tokio::join!(relay_session.start(), edge_session.start());
    let relay = quic_reverse::SessionClient::new(relay.expect("their relay negotiates"));
    let (edge, edge_events) =
        backhaul::SessionClient::with_events(edge.expect("our edge negotiates"));
    TheirRelayOurEdge {
        relay_session,
        relay,
        edge_session,
        edge,
        edge_events,
        _quic: quic,
    }
}

fn their_metadata_bytes(metadata: &quic_reverse::Metadata) -> Vec<u8> {
    match metadata {
        quic_reverse::Metadata::Bytes(bytes) => bytes.clone(),
        _ => Vec::new(),
    }
}

fn our_metadata_bytes(metadata: &backhaul::Metadata) -> Vec<u8> {
    match metadata {
        backhaul::Metadata::Bytes(bytes) => bytes.clone(),
        _ => Vec::new(),
    }
}

/// Serves the reference edge the way its `edge` example does: accept with incrementing
/// logical ids, open a data stream, bind it, serve it on its own task; reject unknown
/// services with `UnsupportedService`. Stops at `Closing`, answering with its own close as
/// the example does. Returns every event seen, in order.
fn serve_their_edge(
    edge: quic_reverse::SessionClient<TheirConnection>,
    mut events: mpsc::Receiver<quic_reverse::ClientEvent>,
) -> tokio::task::JoinHandle<Vec<quic_reverse::ClientEvent>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut next_stream_id: u64 = 1;
        while let Some(event) = events.recv().await {
            seen.push(event.clone());
            match event {
                quic_reverse::ClientEvent::OpenRequest {
                    request_id,
                    service,
                    metadata,
                } => {
                    let service = service.as_str().to_owned();
                    if !SERVICES.contains(&service.as_str()) {
                        edge.reject_open(
                            request_id,
                            quic_reverse::RejectCode::UnsupportedService,
                            Some(format!("unknown service: {service}")),
                        )
                        .await
                        .expect("their edge rejects");
                        continue;
                    }
                    let stream_id = next_stream_id;
                    next_stream_id += 1;
                    edge.accept_open(request_id, stream_id)
                        .await
                        .expect("their edge accepts");
                    let (mut send, recv) = edge.connection().open_bi().await.expect("open_bi");
                    edge.bind_stream(&mut send, stream_id)
                        .await
                        .expect("their edge binds");
                    let request = their_metadata_bytes(&metadata);
                    tokio::spawn(async move { serve_stream(&service, request, send, recv).await });
                }
                quic_reverse::ClientEvent::Closing { .. } => {
                    let _ = edge.close(quic_reverse::CloseCode::Normal, None).await;
                    break;
                }
                _ => {}
            }
        }
        seen
    })
}

/// Serves our edge: `allocate_stream_id`, `accept_open`, `connection().open_bi()`,
/// `bind_stream`, serve on its own task, then `close_stream`. Rejects unknown services
/// with `UnsupportedService`; stops at `Closing`. Returns every event seen, in order.
fn serve_our_edge(
    edge: backhaul::SessionClient<OurConnection>,
    mut events: mpsc::Receiver<backhaul::ClientEvent>,
) -> tokio::task::JoinHandle<Vec<backhaul::ClientEvent>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(event) = events.recv().await {
            seen.push(event.clone());
            match event {
                backhaul::ClientEvent::OpenRequest {
                    request_id,
                    service,
                    metadata,
                } => {
                    let service = service.as_str().to_owned();
                    if !SERVICES.contains(&service.as_str()) {
                        edge.reject_open(
                            request_id,
                            backhaul::RejectCode::UnsupportedService,
                            Some(format!("unknown service: {service}")),
                        )
                        .await
                        .expect("our edge rejects");
                        continue;
                    }
                    let stream_id = edge.allocate_stream_id();
                    edge.accept_open(request_id, stream_id)
                        .await
                        .expect("our edge accepts");
                    let (mut send, recv) = edge.connection().open_bi().await.expect("open_bi");
                    edge.bind_stream(&mut send, stream_id)
                        .await
                        .expect("our edge binds");
                    let request = our_metadata_bytes(&metadata);
                    let edge = edge.clone();
                    tokio::spawn(async move {
                        serve_stream(&service, request, send, recv).await;
                        let _ = edge
                            .close_stream(stream_id, backhaul::CloseCode::Normal, None)
                            .await;
                    });
                }
                backhaul::ClientEvent::Closing { .. } => break,
                _ => {}
            }
        }
        seen
    })
}

// ---------------------------------------------------------------------------------------------
// a. Our relay opens streams on the reference edge.

/// Sequential opens of every service with payloads from 4 KiB to 3 MiB: the reference edge
/// accepts with ids 1, 2, 3… and our relay gets each stream with the data intact both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_relay_opens_streams_on_their_edge() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
        let edge = serve_their_edge(pair.edge.clone(), pair.edge_events);
        let relay = &pair.relay;
        for (round, &size) in SIZES.iter().enumerate() {
            let seed = [round as u8, 0xa5];
            let data = pattern(&seed, size);

            let (send, recv) = relay
                .open("echo", backhaul::Metadata::Empty)
                .await
                .expect("open echo");
            check_echo(send, recv, &data).await;

            let request = backhaul::Metadata::Bytes(source_request(size, &seed));
            let (send, recv) = relay.open("source", request).await.expect("open source");
            check_source(send, recv, size, &seed).await;

            let (send, recv) = relay
                .open("sink", backhaul::Metadata::Empty)
                .await
                .expect("open sink");
            check_sink(send, recv, &data).await;
        }
        assert_eq!(relay.stats().pending_opens, 0);
        relay
            .close(backhaul::CloseCode::Normal, Some("relay done".into()))
            .await
            .expect("close");
        let seen = within(Duration::from_secs(10), edge)
            .await
            .expect("edge task");
        let opens = seen
            .iter()
            .filter(|event| matches!(event, quic_reverse::ClientEvent::OpenRequest { .. }))
            .count();
        assert_eq!(opens, 3 * SIZES.len());
    })
    .await;
}

/// Our relay opens many streams at once on the reference edge; each open gets the stream
/// bound to its own logical id, so every echo comes back on the stream that sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_relay_concurrent_opens_on_their_edge() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
        let _edge = serve_their_edge(pair.edge.clone(), pair.edge_events);
        let mut opens = tokio::task::JoinSet::new();
        for index in 0..16u8 {
            let relay = pair.relay.clone();
            opens.spawn(async move {
                let data = pattern(&[index, 0x3c], 32 * 1024 + usize::from(index));
                let (send, recv) = relay
                    .open("echo", backhaul::Metadata::Empty)
                    .await
                    .expect("open");
                check_echo(send, recv, &data).await;
            });
        }
        while let Some(done) = opens.join_next().await {
            done.expect("concurrent open");
        }
        assert_eq!(pair.relay.stats().pending_opens, 0);
        assert_eq!(pair.relay.stats().refused_streams, 0);
    })
    .await;
}

/// The reference edge's rejection arrives as `StreamRejected` with its code and reason, and
/// the session keeps working afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_edge_rejection_is_stream_rejected() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
        let _edge = serve_their_edge(pair.edge.clone(), pair.edge_events);
        let error = pair
            .relay
            .open("foobar", backhaul::Metadata::Empty)
            .await
            .expect_err("foobar must be rejected");
        match error {
            backhaul::Error::StreamRejected { code, reason } => {
                assert_eq!(code, backhaul::RejectCode::UnsupportedService);
                assert_eq!(reason.as_deref(), Some("unknown service: foobar"));
            }
            other => panic!("expected StreamRejected, got {other:?}"),
        }
        assert!(pair.relay.is_ready());
        let (send, recv) = pair
            .relay
            .open("echo", backhaul::Metadata::Empty)
            .await
            .expect("open after rejection");
        check_echo(send, recv, b"still here").await;
    })
    .await;
}

/// Structured metadata sent by our relay reaches the reference edge intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_structured_metadata_reaches_their_edge() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
        let edge = serve_their_edge(pair.edge.clone(), pair.edge_events);
        let ours = backhaul::Metadata::Structured(
            [
                ("k".to_owned(), backhaul::MetadataValue::Integer(-5)),
                ("s".to_owned(), backhaul::MetadataValue::String("v".into())),
                ("b".to_owned(), backhaul::MetadataValue::Boolean(true)),
                (
                    "x".to_owned(),
                    backhaul::MetadataValue::Bytes(vec![0xff, 0]),
                ),
            ]
            .into_iter()
            .collect(),
        );
        let (send, recv) = pair.relay.open("echo", ours).await.expect("open");
        check_echo(send, recv, b"meta").await;
        pair.relay
            .close(backhaul::CloseCode::Normal, None)
            .await
            .expect("close");
        let seen = within(Duration::from_secs(10), edge)
            .await
            .expect("edge task");
        let first = seen.first();
        let Some(quic_reverse::ClientEvent::OpenRequest {
            service, metadata, ..
        }) = first
        else {
            panic!("first event should be the open request: {seen:?}");
        };
        assert_eq!(service.as_str(), "echo");
        let quic_reverse::Metadata::Structured(map) = metadata else {
            panic!("expected structured metadata, got {metadata:?}");
        };
        assert_eq!(map.len(), 4);
        assert!(matches!(map.get("k"), Some(TheirValue::Integer(-5))));
        assert!(matches!(map.get("s"), Some(TheirValue::String(s)) if s == "v"));
        assert!(matches!(map.get("b"), Some(TheirValue::Boolean(true))));
        assert!(matches!(map.get("x"), Some(TheirValue::Bytes(b)) if b == &[0xff, 0]));
    })
    .await;
}

/// Our relay's `close()` reaches the reference edge as `ClientEvent::Closing` with its code
/// and reason; afterwards our relay refuses new opens with `SessionClosed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_relay_close_is_closing_on_their_edge() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
        let edge = serve_their_edge(pair.edge.clone(), pair.edge_events);
        let (send, recv) = pair
            .relay
            .open("echo", backhaul::Metadata::Empty)
            .await
            .expect("open");
        check_echo(send, recv, b"before close").await;
        pair.relay
            .close(backhaul::CloseCode::Error, Some("relay going away".into()))
            .await
            .expect("close");
        let seen = within(Duration::from_secs(10), edge)
            .await
            .expect("edge task");
        match seen.last() {
            Some(quic_reverse::ClientEvent::Closing { code, reason }) => {
                assert_eq!(*code, quic_reverse::CloseCode::Error);
                assert_eq!(reason.as_deref(), Some("relay going away"));
            }
            other => panic!("expected Closing last, got {other:?} in {seen:?}"),
        }
        assert_eq!(pair.edge.state(), quic_reverse::State::Closing);
        assert!(matches!(
            pair.relay.closed().await,
            backhaul::Error::SessionClosed
        ));
        assert!(matches!(
            pair.relay.open("echo", backhaul::Metadata::Empty).await,
            Err(backhaul::Error::SessionClosed)
        ));
    })
    .await;
}

/// The reference edge's `close()` ends our relay's session: `closed()` says `SessionClosed`
/// and opens fail with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_edge_close_ends_our_relay_session() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
        pair.edge
            .close(quic_reverse::CloseCode::Normal, Some("edge leaving".into()))
            .await
            .expect("their close");
        assert!(matches!(
            within(Duration::from_secs(10), pair.relay.closed()).await,
            backhaul::Error::SessionClosed
        ));
        assert!(!pair.relay.is_ready());
        assert!(matches!(
            pair.relay.open("echo", backhaul::Metadata::Empty).await,
            Err(backhaul::Error::SessionClosed)
        ));
        drop(pair.edge_events);
    })
    .await;
}

/// Pings cross both ways between our relay and the reference edge with no feature
/// negotiated (both crates answer a `Ping` whatever was negotiated), and the reference edge
/// reports the ping it answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_between_our_relay_and_their_edge() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
        assert!(pair
            .relay_session
            .negotiated_params()
            .unwrap()
            .features
            .is_empty());
        let edge = serve_their_edge(pair.edge.clone(), pair.edge_events);
        pair.relay
            .ping()
            .await
            .expect("our ping answered by their edge");
        pair.edge
            .ping()
            .await
            .expect("their ping answered by our relay");
        pair.relay.ping().await.expect("second ping");
        pair.relay
            .close(backhaul::CloseCode::Normal, None)
            .await
            .expect("close");
        let seen = within(Duration::from_secs(10), edge)
            .await
            .expect("edge task");
        let sequences: Vec<u64> = seen
            .iter()
            .filter_map(|event| match event {
                quic_reverse::ClientEvent::PingReceived { sequence } => Some(*sequence),
                _ => None,
            })
            .collect();
        assert_eq!(sequences, [1, 2]);
    })
    .await;
}

/// With `PING_PONG` negotiated, our relay's keep-alive is answered by the reference edge and
/// the session stays up across several intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_keepalive_is_answered_by_their_edge() {
    within(LIMIT, async {
        let relay_config = backhaul::Config::new()
            .with_ping_interval(Duration::from_millis(100))
            .with_ping_timeout(Duration::from_secs(2));
        let edge_config =
            quic_reverse::Config::new().with_features(quic_reverse::Features::PING_PONG);
        let pair = our_relay_their_edge(relay_config, edge_config).await;
        assert!(pair
            .relay_session
            .negotiated_params()
            .unwrap()
            .features
            .contains(backhaul::Features::PING_PONG));
        let edge = serve_their_edge(pair.edge.clone(), pair.edge_events);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(pair.relay.is_ready(), "keep-alive must not have failed");
        let (send, recv) = pair
            .relay
            .open("echo", backhaul::Metadata::Empty)
            .await
            .expect("open");
        check_echo(send, recv, b"alive").await;
        pair.relay
            .close(backhaul::CloseCode::Normal, None)
            .await
            .expect("close");
        let seen = within(Duration::from_secs(10), edge)
            .await
            .expect("edge task");
        let pings = seen
            .iter()
            .filter(|event| matches!(event, quic_reverse::ClientEvent::PingReceived { .. }))
            .count();
        assert!(pings >= 3, "expected several keep-alive pings, saw {pings}");
    })
    .await;
}

/// The reference edge answers four concurrent opens out of order, binding two data streams
/// before their `OpenResponse` is even sent and the others after, with ids our relay did not
/// choose; every open still gets the stream bound to the id announced for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_relay_matches_reordered_and_early_streams_from_their_edge() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
        let edge = pair.edge.clone();
        let mut events = pair.edge_events;
        let edge_task = tokio::spawn(async move {
            let mut requests = Vec::new();
            while requests.len() < 4 {
                match events.recv().await.expect("open requests") {
                    quic_reverse::ClientEvent::OpenRequest {
                        request_id,
                        metadata,
                        ..
                    } => requests.push((request_id, their_metadata_bytes(&metadata))),
                    other => panic!("unexpected event {other:?}"),
                }
            }
            let ids = [40_u64, 7, 1000, 3];
            let bind = |index: usize| {
                let edge = edge.clone();
                let tag = requests[index].1.clone();
                async move {
                    let (mut send, recv) = edge.connection().open_bi().await.expect("open_bi");
                    edge.bind_stream(&mut send, ids[index]).await.expect("bind");
                    send.write_all(&tag).await.expect("write tag");
                    send.shutdown().await.expect("finish");
                    (send, recv)
                }
            };
            // Data streams for requests 0 and 1 go out before any answer.
            let mut streams = vec![bind(0).await, bind(1).await];
            tokio::time::sleep(Duration::from_millis(100)).await;
            for index in (0..4).rev() {
                edge.accept_open(requests[index].0, ids[index])
                    .await
                    .expect("accept");
            }
            streams.push(bind(3).await);
            streams.push(bind(2).await);
            (events, streams)
        });
        let mut opens = tokio::task::JoinSet::new();
        for index in 0..4u8 {
            let relay = pair.relay.clone();
            opens.spawn(async move {
                let tag = vec![index; 3 + usize::from(index)];
                let metadata = backhaul::Metadata::Bytes(tag.clone());
                let (send, mut recv) = relay.open("tag", metadata).await.expect("open");
                let mut received = Vec::new();
                recv.read_to_end(&mut received).await.expect("read tag");
                assert_eq!(received, tag, "open {index} got another open's stream");
                drop(send);
            });
        }
        while let Some(done) = opens.join_next().await {
            done.expect("open");
        }
        let _keep_alive = edge_task.await.expect("edge task");
        let stats = pair.relay.stats();
        assert_eq!(stats.pending_opens, 0);
        assert_eq!(stats.early_streams, 0);
        assert_eq!(stats.refused_streams, 0);
    })
    .await;
}

/// An open waiting for the reference edge's answer fails with `SessionClosed` as soon as the
/// edge closes the session, not after `open_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_open_fails_when_their_edge_closes() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
        let edge = pair.edge.clone();
        let mut events = pair.edge_events;
        let edge_task = tokio::spawn(async move {
            let event = events.recv().await.expect("open request");
            assert!(matches!(
                event,
                quic_reverse::ClientEvent::OpenRequest { .. }
            ));
            edge.close(quic_reverse::CloseCode::Normal, Some("bye".into()))
                .await
                .expect("their close");
            events
        });
        let open = within(
            Duration::from_secs(5),
            pair.relay.open("echo", backhaul::Metadata::Empty),
        )
        .await;
        assert!(
            matches!(open, Err(backhaul::Error::SessionClosed)),
            "expected SessionClosed, got {:?}",
            open.map(|_| ())
        );
        drop(edge_task.await);
    })
    .await;
}

/// An open waiting for the reference edge's answer fails with `Disconnected` as soon as the
/// edge's QUIC connection goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_open_fails_when_their_edge_disconnects() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
        let edge_connection = pair.quic.edge.clone();
        let mut events = pair.edge_events;
        let edge_task = tokio::spawn(async move {
            let event = events.recv().await.expect("open request");
            assert!(matches!(
                event,
                quic_reverse::ClientEvent::OpenRequest { .. }
            ));
            edge_connection.close(quinn::VarInt::from_u32(7), b"edge gone");
            events
        });
        let open = within(
            Duration::from_secs(5),
            pair.relay.open("echo", backhaul::Metadata::Empty),
        )
        .await;
        assert!(
            matches!(open, Err(backhaul::Error::Disconnected)),
            "expected Disconnected, got {:?}",
            open.map(|_| ())
        );
        assert!(matches!(
            within(Duration::from_secs(5), pair.relay.closed()).await,
            backhaul::Error::Disconnected
        ));
        drop(edge_task.await);
    })
    .await;
}

/// `close()` leaves the connection "for the caller to close"; a caller that does so right
/// away must not lose the `StreamClose(0)`: the reference edge sees `Closing` every time.
///
/// Ignored: fails today (see the report of the interop work). `close()` returns once the
/// message is handed to quinn, not once it was delivered, and closing a quinn connection
/// discards stream data not yet sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_close_then_connection_close_reaches_their_edge() {
    within(LIMIT, async {
        const TRIALS: usize = 50;
        let mut lost = 0;
        for _ in 0..TRIALS {
            let pair =
                our_relay_their_edge(backhaul::Config::new(), quic_reverse::Config::new()).await;
            let edge = serve_their_edge(pair.edge.clone(), pair.edge_events);
            pair.relay
                .close(backhaul::CloseCode::Normal, Some("bye".into()))
                .await
                .expect("close");
            pair.quic.relay.close(0u32.into(), b"done");
            let seen = within(Duration::from_secs(10), edge)
                .await
                .expect("edge task");
            if !matches!(seen.last(), Some(quic_reverse::ClientEvent::Closing { .. })) {
                lost += 1;
            }
        }
        assert_eq!(
            lost, 0,
            "their edge missed our close in {lost} of {TRIALS} trials"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// b. The reference relay opens streams on our edge.

/// Sequential opens of every service with payloads from 4 KiB to 3 MiB from the reference
/// relay; our edge's streams carry the data intact both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_relay_opens_streams_on_our_edge() {
    within(LIMIT, async {
        let pair = their_relay_our_edge(quic_reverse::Config::new(), backhaul::Config::new()).await;
        let edge = serve_our_edge(pair.edge.clone(), pair.edge_events);
        let relay = &pair.relay;
        for (round, &size) in SIZES.iter().enumerate() {
            let seed = [round as u8, 0x5a];
            let data = pattern(&seed, size);

            let (send, recv) = relay
                .open("echo", quic_reverse::Metadata::Empty)
                .await
                .expect("open echo");
            check_echo(send, recv, &data).await;

            let request = quic_reverse::Metadata::Bytes(source_request(size, &seed));
            let (send, recv) = relay.open("source", request).await.expect("open source");
            check_source(send, recv, size, &seed).await;

            let (send, recv) = relay
                .open("sink", quic_reverse::Metadata::Empty)
                .await
                .expect("open sink");
            check_sink(send, recv, &data).await;
        }
        relay
            .close(quic_reverse::CloseCode::Normal, Some("relay done".into()))
            .await
            .expect("close");
        let seen = within(Duration::from_secs(10), edge)
            .await
            .expect("edge task");
        let opens = seen
            .iter()
            .filter(|event| matches!(event, backhaul::ClientEvent::OpenRequest { .. }))
            .count();
        assert_eq!(opens, 3 * SIZES.len());
        assert_eq!(
            pair.edge.stats().active_streams,
            0,
            "every stream slot freed"
        );
    })
    .await;
}

/// Our edge's rejection reaches the reference relay as its `StreamRejected` with the code
/// and reason, and the session keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_edge_rejection_reaches_their_relay() {
    within(LIMIT, async {
        let pair = their_relay_our_edge(quic_reverse::Config::new(), backhaul::Config::new()).await;
        let _edge = serve_our_edge(pair.edge.clone(), pair.edge_events);
        match pair
            .relay
            .open("foobar", quic_reverse::Metadata::Empty)
            .await
        {
            Err(quic_reverse::Error::StreamRejected { code, reason }) => {
                assert_eq!(code, quic_reverse::RejectCode::UnsupportedService);
                assert_eq!(reason.as_deref(), Some("unknown service: foobar"));
            }
            Err(other) => panic!("expected StreamRejected, got {other:?}"),
            Ok(_) => panic!("foobar must be rejected"),
        }
        let (send, recv) = pair
            .relay
            .open("echo", quic_reverse::Metadata::Empty)
            .await
            .expect("open after rejection");
        check_echo(send, recv, b"still here").await;
    })
    .await;
}

/// Pings cross both ways between the reference relay and our edge with no feature
/// negotiated, and our edge reports the ping it answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_between_their_relay_and_our_edge() {
    within(LIMIT, async {
        let pair = their_relay_our_edge(quic_reverse::Config::new(), backhaul::Config::new()).await;
        assert!(pair
            .edge_session
            .negotiated_params()
            .unwrap()
            .features
            .is_empty());
        let edge = serve_our_edge(pair.edge.clone(), pair.edge_events);
        pair.relay
            .ping()
            .await
            .expect("their ping answered by our edge");
        pair.edge
            .ping()
            .await
            .expect("our ping answered by their relay");
        pair.relay.ping().await.expect("second ping");
        pair.relay
            .close(quic_reverse::CloseCode::Normal, None)
            .await
            .expect("close");
        let seen = within(Duration::from_secs(10), edge)
            .await
            .expect("edge task");
        let sequences: Vec<u64> = seen
            .iter()
            .filter_map(|event| match event {
                backhaul::ClientEvent::PingReceived { sequence } => Some(*sequence),
                _ => None,
            })
            .collect();
        assert_eq!(sequences, [1, 2]);
    })
    .await;
}

/// With `PING_PONG` negotiated, our edge's keep-alive is answered by the reference relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_keepalive_is_answered_by_their_relay() {
    within(LIMIT, async {
        let relay_config =
            quic_reverse::Config::new().with_features(quic_reverse::Features::PING_PONG);
        let edge_config = backhaul::Config::new()
            .with_ping_interval(Duration::from_millis(100))
            .with_ping_timeout(Duration::from_secs(2));
        let pair = their_relay_our_edge(relay_config, edge_config).await;
        let _edge = serve_our_edge(pair.edge.clone(), pair.edge_events);
        let mut pongs = pair.edge.control_events();
        let mut seen = 0;
        while seen < 3 {
            if let backhaul::ControlEvent::Pong { .. } = pongs.recv().await.expect("control events")
            {
                seen += 1;
            }
        }
        assert!(pair.edge.is_ready());
        let (send, recv) = pair
            .relay
            .open("echo", quic_reverse::Metadata::Empty)
            .await
            .expect("open");
        check_echo(send, recv, b"alive").await;
    })
    .await;
}

/// The reference relay's `close()` reaches our edge as `ClientEvent::Closing` with its code
/// and reason; our edge's session then ends as `SessionClosed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_relay_close_is_closing_on_our_edge() {
    within(LIMIT, async {
        let pair = their_relay_our_edge(quic_reverse::Config::new(), backhaul::Config::new()).await;
        let edge = serve_our_edge(pair.edge.clone(), pair.edge_events);
        let (send, recv) = pair
            .relay
            .open("echo", quic_reverse::Metadata::Empty)
            .await
            .expect("open");
        check_echo(send, recv, b"before close").await;
        pair.relay
            .close(
                quic_reverse::CloseCode::Timeout,
                Some("relay going away".into()),
            )
            .await
            .expect("close");
        let seen = within(Duration::from_secs(10), edge)
            .await
            .expect("edge task");
        match seen.last() {
            Some(backhaul::ClientEvent::Closing { code, reason }) => {
                assert_eq!(*code, backhaul::CloseCode::Timeout);
                assert_eq!(reason.as_deref(), Some("relay going away"));
            }
            other => panic!("expected Closing last, got {other:?} in {seen:?}"),
        }
        assert!(matches!(
            within(Duration::from_secs(10), pair.edge.closed()).await,
            backhaul::Error::SessionClosed
        ));
        assert!(matches!(
            pair.edge.ping().await,
            Err(backhaul::Error::SessionClosed)
        ));
    })
    .await;
}

/// Our edge's `close()` reaches the reference relay, which stops taking opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_edge_close_ends_their_relay_session() {
    within(LIMIT, async {
        let pair = their_relay_our_edge(quic_reverse::Config::new(), backhaul::Config::new()).await;
        pair.edge
            .close(backhaul::CloseCode::Normal, Some("edge leaving".into()))
            .await
            .expect("our close");
        within(Duration::from_secs(10), async {
            while pair.relay.is_ready() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(matches!(
            pair.relay.open("echo", quic_reverse::Metadata::Empty).await,
            Err(quic_reverse::Error::SessionClosed)
        ));
        drop(pair.edge_events);
    })
    .await;
}

/// The reference relay's `close()` is on the wire before its QUIC connection closes, and both
/// arrive at our edge together (the edge's runtime is busy meanwhile, as under load). The
/// reference edge still reads the buffered `StreamClose(0)` and reports `Closing` every
/// time; our edge must too, not drop it because the connection's end was noticed first.
///
/// Ignored: fails today (see the report of the interop work). Our edge loses `Closing` in
/// roughly a third of the trials and ends as `Disconnected`: `accept_data_streams` in
/// src/session/driver.rs terminates the session with `Disconnected` as soon as `accept_bi`
/// reports the closed connection, and `read_control`'s unbiased `select!` then returns on
/// `session_ended` without reading the message quinn still holds for it (quinn 0.11 hands out
/// buffered stream data after the connection closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_close_arriving_with_connection_close_reaches_our_edge() {
    within(Duration::from_secs(120), async {
        const TRIALS: usize = 20;
        let mut lost = 0;
        for _ in 0..TRIALS {
            if !close_arriving_with_connection_close().await {
                lost += 1;
            }
        }
        assert_eq!(
            lost, 0,
            "our edge lost the relay's Closing in {lost} of {TRIALS} trials"
        );
    })
    .await;
}

/// One trial: our edge on its own two-worker runtime, frozen while the reference relay
/// closes the session, lets it reach the wire, then closes the connection. Returns whether
/// the edge reported `ClientEvent::Closing`.
async fn close_arriving_with_connection_close() -> bool {
    use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};

    let identity = Identity::self_signed(&["localhost"]).expect("certificate");
    let trusted = identity.cert_chain.clone();
    let relay_endpoint = server_endpoint(([127, 0, 0, 1], 0).into(), identity, DEFAULT_ALPN)
        .expect("relay endpoint");
    let relay_addr = relay_endpoint.local_addr().expect("relay address");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let edge_thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("edge runtime");
        let handle = runtime.handle().clone();
        runtime.block_on(async move {
            let endpoint = client_endpoint(&trusted, DEFAULT_ALPN).expect("edge endpoint");
            let connection = endpoint
                .connect(relay_addr, "localhost")
                .expect("connect")
                .await
                .expect("edge connection");
            let session = backhaul::Session::new(
                OurConnection::new(connection),
                backhaul::Role::Client,
                backhaul::Config::new(),
            );
            let negotiated = session.start().await.expect("our edge negotiates");
            let (_edge, mut events) = backhaul::SessionClient::with_events(negotiated);
            ready_tx.send(handle).expect("ready");
            let mut closing = false;
            while let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_secs(5), events.recv()).await
            {
                closing |= matches!(event, backhaul::ClientEvent::Closing { .. });
            }
            closing
        })
    });

    let connection = relay_endpoint
        .accept()
        .await
        .expect("incoming")
        .await
        .expect("relay connection");
    let session = quic_reverse::Session::new(
        TheirConnection::new(connection.clone()),
        quic_reverse::Role::Server,
        quic_reverse::Config::new(),
    );
    let relay = quic_reverse::SessionClient::new(session.start().await.expect("negotiation"));
    let edge_runtime: tokio::runtime::Handle = ready_rx.await.expect("edge ready");
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Keep both edge workers busy, so nothing is read until both packets are in.
    for _ in 0..2 {
        edge_runtime.spawn(async { std::thread::sleep(Duration::from_millis(250)) });
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    relay
        .close(quic_reverse::CloseCode::Normal, Some("bye".into()))
        .await
        .expect("their close");
    tokio::time::sleep(Duration::from_millis(100)).await;
    connection.close(0u32.into(), b"");
    tokio::task::spawn_blocking(move || edge_thread.join().expect("edge thread"))
        .await
        .expect("join")
}

// ---------------------------------------------------------------------------------------------
// c. Handshake.

/// Both sides see the other's agent string and the intersection of the features offered,
/// with our crate as relay and the reference as edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_our_relay_their_edge() {
    within(LIMIT, async {
        let relay_config = backhaul::Config::new()
            .with_agent("backhaul-relay/0.1")
            .with_features(backhaul::Features::STRUCTURED_METADATA | backhaul::Features::PING_PONG);
        let edge_config = quic_reverse::Config::new()
            .with_agent("quic-reverse-edge/0.1.2")
            .with_features(
                quic_reverse::Features::PING_PONG | quic_reverse::Features::STREAM_PRIORITY,
            );
        let pair = our_relay_their_edge(relay_config, edge_config).await;

        let ours = pair.relay_session.negotiated_params().expect("our params");
        assert_eq!(ours.version, 1);
        assert_eq!(ours.features, backhaul::Features::PING_PONG);
        assert_eq!(
            ours.remote_agent.as_deref(),
            Some("quic-reverse-edge/0.1.2")
        );

        let theirs = pair.edge_session.negotiated_params().expect("their params");
        assert_eq!(theirs.version, 1);
        assert_eq!(theirs.features, quic_reverse::Features::PING_PONG);
        assert_eq!(theirs.remote_agent.as_deref(), Some("backhaul-relay/0.1"));
        assert!(pair.relay.is_ready());
        assert!(pair.edge.is_ready());
    })
    .await;
}

/// The same with the reference crate as relay and ours as edge, without agents on one side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_their_relay_our_edge() {
    within(LIMIT, async {
        let relay_config = quic_reverse::Config::new()
            .with_agent("quic-reverse-relay/0.1.2")
            .with_features(
                quic_reverse::Features::STRUCTURED_METADATA
                    | quic_reverse::Features::STREAM_PRIORITY,
            );
        let edge_config = backhaul::Config::new()
            .with_features(backhaul::Features::STRUCTURED_METADATA | backhaul::Features::PING_PONG);
        let pair = their_relay_our_edge(relay_config, edge_config).await;

        let ours = pair.edge_session.negotiated_params().expect("our params");
        assert_eq!(ours.version, 1);
        assert_eq!(ours.features, backhaul::Features::STRUCTURED_METADATA);
        assert_eq!(
            ours.remote_agent.as_deref(),
            Some("quic-reverse-relay/0.1.2")
        );

        let theirs = pair
            .relay_session
            .negotiated_params()
            .expect("their params");
        assert_eq!(theirs.version, 1);
        assert_eq!(theirs.features, quic_reverse::Features::STRUCTURED_METADATA);
        assert_eq!(theirs.remote_agent, None);
        assert!(pair.relay.is_ready());
        assert!(pair.edge.is_ready());
    })
    .await;
}

/// Disjoint feature sets negotiate to no features on both sides, both ways round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_disjoint_features() {
    within(LIMIT, async {
        let pair = our_relay_their_edge(
            backhaul::Config::new().with_features(backhaul::Features::PING_PONG),
            quic_reverse::Config::new().with_features(quic_reverse::Features::STREAM_PRIORITY),
        )
        .await;
        assert!(pair
            .relay_session
            .negotiated_params()
            .unwrap()
            .features
            .is_empty());
        assert!(pair
            .edge_session
            .negotiated_params()
            .unwrap()
            .features
            .is_empty());

        let pair = their_relay_our_edge(
            quic_reverse::Config::new().with_features(quic_reverse::Features::STRUCTURED_METADATA),
            backhaul::Config::new().with_features(backhaul::Features::STREAM_PRIORITY),
        )
        .await;
        assert!(pair
            .relay_session
            .negotiated_params()
            .unwrap()
            .features
            .is_empty());
        assert!(pair
            .edge_session
            .negotiated_params()
            .unwrap()
            .features
            .is_empty());
    })
    .await;
}

/// A version only one side supports fails the handshake on both sides, promptly: our relay
/// answers the reference edge's `Hello` before refusing, so both report `VersionMismatch`;
/// the reference relay refuses our edge's `Hello` without answering, and our edge fails as
/// soon as the control stream ends instead of waiting for `negotiation_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_version_mismatch_fails_both_sides() {
    within(LIMIT, async {
        let quic = quic_pair().await;
        let relay = backhaul::Session::new(
            OurConnection::new(quic.relay.clone()),
            backhaul::Role::Server,
            backhaul::Config::new().with_versions(vec![2]),
        );
        let edge = quic_reverse::Session::new(
            TheirConnection::new(quic.edge.clone()),
            quic_reverse::Role::Client,
            quic_reverse::Config::new(),
        );
        let (ours, theirs) = within(Duration::from_secs(5), async {
            tokio::join!(relay.start(), edge.start())
        })
        .await;
        match ours {
            Err(backhaul::Error::VersionMismatch { local, remote }) => {
                assert_eq!(local, [2]);
                assert_eq!(remote, 1);
            }
            other => panic!(
                "our relay: expected VersionMismatch, got {:?}",
                other.map(|_| ())
            ),
        }
        match theirs {
            Err(error @ quic_reverse::Error::NegotiationFailed(_)) => {
                assert!(error.to_string().contains("version"), "{error}");
            }
            other => panic!(
                "their edge: expected a version mismatch, got {:?}",
                other.map(|_| ())
            ),
        }

        let quic = quic_pair().await;
        let relay = quic_reverse::Session::new(
            TheirConnection::new(quic.relay.clone()),
            quic_reverse::Role::Server,
            quic_reverse::Config::new(),
        );
        let edge = backhaul::Session::new(
            OurConnection::new(quic.edge.clone()),
            backhaul::Role::Client,
            backhaul::Config::new().with_versions(vec![2]),
        );
        let (theirs, ours) = within(Duration::from_secs(5), async {
            tokio::join!(relay.start(), edge.start())
        })
        .await;
        assert!(theirs.is_err(), "their relay must refuse version 2");
        // Their relay drops the control stream: our edge sees it end mid-handshake.
        assert!(
            matches!(ours, Err(backhaul::Error::ProtocolViolation(_))),
            "our edge: expected ProtocolViolation, got {:?}",
            ours.map(|_| ())
        );
        assert!(!edge.is_ready());
    })
    .await;
}
