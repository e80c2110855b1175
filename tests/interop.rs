//! Interop with the published `quic-reverse` 0.1.2 crate over real quinn connections.
//!
//! Every test dials one QUIC connection on 127.0.0.1 (`support::quic_pair`) and runs one crate
//! on each end. Most tests are written once, generic over which crate is the relay and which
//! the edge ([`Peer`], implemented by [`Ours`] and [`Theirs`]), and [`both_ways!`] runs each
//! of them twice: our relay against the reference edge, then the reference relay against our
//! edge. Data crosses every stream in both directions and is compared by length and
//! checksum. Every test is bounded by [`LIMIT`] so a hang fails.
//!
//! A few tests run one way only, because they probe a behaviour only one side has: the
//! reference relay takes whichever data stream arrives next for an open (so concurrent and
//! reordered opens are ours to match by logical id), and pending opens failing promptly is
//! our relay's promise, not the reference's.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backhaul::Features;
use quic_reverse_transport::Connection as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use support::http::Checksum;
use support::{pattern, quic_pair, within};

type OurConnection = backhaul::QuinnConnection;
type TheirConnection = quic_reverse_transport::QuinnConnection;

/// Upper bound on any single test.
const LIMIT: Duration = Duration::from_secs(60);

/// How long a peer has to notice something the other side did (a close, a rejection).
const PROMPTLY: Duration = Duration::from_secs(10);

/// Services both test edges expose: "echo" copies back, "source" writes the length and
/// pattern named by its metadata, "sink" reads everything and answers with length and
/// checksum. Anything else is rejected as unsupported.
const SERVICES: &[&str] = &["echo", "source", "sink"];

/// Payload sizes exchanged: a few KiB up to a few MiB, including odd lengths.
const SIZES: &[usize] = &[4 * 1024, 64 * 1024 + 3, 1024 * 1024, 3 * 1024 * 1024 + 17];

// ---------------------------------------------------------------------------------------------
// One vocabulary for both crates. Their types mirror each other (we implement the same API),
// so each conversion is a one-to-one mapping.

/// Open metadata, as either crate sends and receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Meta {
    Empty,
    Bytes(Vec<u8>),
    Structured(BTreeMap<String, Value>),
}

/// One structured metadata value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    String(String),
    Integer(i64),
    Boolean(bool),
    Bytes(Vec<u8>),
}

impl Meta {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Meta::Bytes(bytes) => bytes.clone(),
            _ => Vec::new(),
        }
    }
}

/// The session close codes the tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Normal,
    Error,
    Timeout,
}

/// The events an edge reports, from either crate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    OpenRequest {
        request_id: u64,
        service: String,
        metadata: Meta,
    },
    StreamClosed,
    PingReceived {
        sequence: u64,
    },
    Closing {
        code: Close,
        reason: Option<String>,
    },
}

/// How an operation failed, from either crate; `Other` keeps the original for the message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    Rejected {
        unsupported_service: bool,
        reason: Option<String>,
    },
    SessionClosed,
    Disconnected,
    VersionMismatch,
    ProtocolViolation,
    Other(String),
}

/// One side's session settings, applied to whichever crate runs that side.
#[derive(Debug, Clone, Default)]
struct Settings {
    agent: Option<&'static str>,
    features: Features,
    ping_interval: Option<Duration>,
    versions: Option<Vec<u16>>,
}

/// What negotiation settled, as one side saw it.
#[derive(Debug, Clone)]
struct Negotiated {
    version: u16,
    features: Features,
    remote_agent: Option<String>,
}

/// A negotiated session of one crate: its client, what it negotiated, its events, and
/// whatever must stay alive with it.
struct Started<P> {
    client: P,
    negotiated: Negotiated,
    events: mpsc::Receiver<Event>,
}

/// One crate's `SessionClient`, as the tests drive it in either role.
trait Peer: Clone + Send + Sync + Sized + 'static {
    /// Whether this is backhaul (for the checks only our crate promises).
    const OURS: bool;
    type Send: AsyncWrite + Unpin + Send + 'static;
    type Recv: AsyncRead + Unpin + Send + 'static;

    /// Negotiates a session on `connection`; `relay` picks the role.
    fn start(
        connection: quinn::Connection,
        relay: bool,
        settings: Settings,
    ) -> impl Future<Output = Result<Started<Self>, Failure>> + Send;
    fn open(
        &self,
        service: &str,
        metadata: Meta,
    ) -> impl Future<Output = Result<(Self::Send, Self::Recv), Failure>> + Send;
    /// Accepts an open request the way this crate's own edge example would.
    fn accept(&self, request_id: u64) -> impl Future<Output = (Self::Send, Self::Recv)> + Send;
    fn reject_unsupported(
        &self,
        request_id: u64,
        reason: String,
    ) -> impl Future<Output = ()> + Send;
    fn ping(&self) -> impl Future<Output = Result<(), Failure>> + Send;
    fn close(&self, code: Close, reason: Option<&str>) -> impl Future<Output = ()> + Send;
    /// What this crate's edge does on `Closing` (the reference example answers with its own
    /// close; ours lets the session end).
    fn on_closing(&self) -> impl Future<Output = ()> + Send;
    fn is_ready(&self) -> bool;
    /// Our client, when this side is ours.
    fn ours(&self) -> Option<&backhaul::SessionClient<OurConnection>>;
}

/// backhaul's side. Accepts with `accept_stream`, the one-call accept the `Router` uses.
#[derive(Clone)]
struct Ours(backhaul::SessionClient<OurConnection>);

/// The reference crate's side, accepting like its `edge` example: incrementing logical ids,
/// `accept_open`, `open_bi`, `bind_stream`.
#[derive(Clone)]
struct Theirs {
    client: quic_reverse::SessionClient<TheirConnection>,
    next_stream_id: Arc<AtomicU64>,
}

impl Peer for Ours {
    const OURS: bool = true;
    // Opened streams are quinn halves, accepted ones a `TunnelStream`'s halves.
    type Send = Box<dyn AsyncWrite + Unpin + Send>;
    type Recv = Box<dyn AsyncRead + Unpin + Send>;

    async fn start(
        connection: quinn::Connection,
        relay: bool,
        settings: Settings,
    ) -> Result<Started<Self>, Failure> {
        let mut config = backhaul::Config::new().with_features(settings.features);
        if let Some(agent) = settings.agent {
            config = config.with_agent(agent);
        }
        if let Some(every) = settings.ping_interval {
            config = config
                .with_ping_interval(every)
                .with_ping_timeout(Duration::from_secs(2));
        }
        if let Some(versions) = settings.versions {
            config = config.with_versions(versions);
        }
        let role = if relay {
            backhaul::Role::Server
        } else {
            backhaul::Role::Client
        };
        let (client, events) = backhaul::SessionClient::start(connection, role, config)
            .await
            .map_err(our_failure)?;
        let params = client.negotiated_params().expect("negotiated");
        let negotiated = Negotiated {
            version: params.version,
            features: params.features,
            remote_agent: params.remote_agent,
        };
        Ok(Started {
            client: Ours(client),
            negotiated,
            events: forward_events(events, our_event),
        })
    }

    async fn open(
        &self,
        service: &str,
        metadata: Meta,
    ) -> Result<(Self::Send, Self::Recv), Failure> {
        let metadata = match metadata {
            Meta::Empty => backhaul::Metadata::Empty,
            Meta::Bytes(bytes) => backhaul::Metadata::Bytes(bytes),
            Meta::Structured(map) => backhaul::Metadata::Structured(
                map.into_iter()
                    .map(|(key, value)| {
                        let value = match value {
                            Value::String(text) => backhaul::MetadataValue::String(text),
                            Value::Integer(number) => backhaul::MetadataValue::Integer(number),
                            Value::Boolean(flag) => backhaul::MetadataValue::Boolean(flag),
                            Value::Bytes(bytes) => backhaul::MetadataValue::Bytes(bytes),
                        };
                        (key, value)
                    })
                    .collect(),
            ),
        };
        let (send, recv) = self.0.open(service, metadata).await.map_err(our_failure)?;
        Ok((Box::new(send), Box::new(recv)))
    }

    async fn accept(&self, request_id: u64) -> (Self::Send, Self::Recv) {
        let stream = self
            .0
            .accept_stream(request_id)
            .await
            .expect("our edge accepts");
        let (recv, send) = tokio::io::split(stream);
        (Box::new(send), Box::new(recv))
    }

    async fn reject_unsupported(&self, request_id: u64, reason: String) {
        self.0
            .reject_open(
                request_id,
                backhaul::RejectCode::UnsupportedService,
                Some(reason),
            )
            .await
            .expect("our edge rejects");
    }

    async fn ping(&self) -> Result<(), Failure> {
        self.0.ping().await.map(drop).map_err(our_failure)
    }

    async fn close(&self, code: Close, reason: Option<&str>) {
        let code = match code {
            Close::Normal => backhaul::CloseCode::Normal,
            Close::Error => backhaul::CloseCode::Error,
            Close::Timeout => backhaul::CloseCode::Timeout,
        };
        self.0
            .close(code, reason.map(str::to_owned))
            .await
            .expect("our close");
    }

    async fn on_closing(&self) {}

    fn is_ready(&self) -> bool {
        self.0.is_ready()
    }

    fn ours(&self) -> Option<&backhaul::SessionClient<OurConnection>> {
        Some(&self.0)
    }
}

impl Peer for Theirs {
    const OURS: bool = false;
    type Send = <TheirConnection as quic_reverse_transport::Connection>::SendStream;
    type Recv = <TheirConnection as quic_reverse_transport::Connection>::RecvStream;

    async fn start(
        connection: quinn::Connection,
        relay: bool,
        settings: Settings,
    ) -> Result<Started<Self>, Failure> {
        let features = quic_reverse::Features::from_bits_truncate(settings.features.bits());
        let mut config = quic_reverse::Config::new().with_features(features);
        if let Some(agent) = settings.agent {
            config = config.with_agent(agent);
        }
        if let Some(versions) = settings.versions {
            config = config.with_versions(versions);
        }
        let role = if relay {
            quic_reverse::Role::Server
        } else {
            quic_reverse::Role::Client
        };
        let session = quic_reverse::Session::new(TheirConnection::new(connection), role, config);
        let handle = session.start().await.map_err(their_failure)?;
        let params = session.negotiated_params().expect("negotiated");
        let negotiated = Negotiated {
            version: params.version,
            features: Features::from_bits_truncate(params.features.bits()),
            remote_agent: params.remote_agent,
        };
        let (client, events) = quic_reverse::SessionClient::with_events(handle);
        Ok(Started {
            client: Theirs {
                client,
                next_stream_id: Arc::new(AtomicU64::new(1)),
            },
            negotiated,
            events: forward_events(events, their_event),
        })
    }

    async fn open(
        &self,
        service: &str,
        metadata: Meta,
    ) -> Result<(Self::Send, Self::Recv), Failure> {
        use quic_reverse_control::MetadataValue as TheirValue;
        let metadata = match metadata {
            Meta::Empty => quic_reverse::Metadata::Empty,
            Meta::Bytes(bytes) => quic_reverse::Metadata::Bytes(bytes),
            Meta::Structured(map) => quic_reverse::Metadata::Structured(
                map.into_iter()
                    .map(|(key, value)| {
                        let value = match value {
                            Value::String(text) => TheirValue::String(text),
                            Value::Integer(number) => TheirValue::Integer(number),
                            Value::Boolean(flag) => TheirValue::Boolean(flag),
                            Value::Bytes(bytes) => TheirValue::Bytes(bytes),
                        };
                        (key, value)
                    })
                    .collect(),
            ),
        };
        self.client
            .open(service, metadata)
            .await
            .map_err(their_failure)
    }

    async fn accept(&self, request_id: u64) -> (Self::Send, Self::Recv) {
        let stream_id = self.next_stream_id.fetch_add(1, Ordering::Relaxed);
        self.client
            .accept_open(request_id, stream_id)
            .await
            .expect("their edge accepts");
        let (mut send, recv) = self.client.connection().open_bi().await.expect("open_bi");
        self.client
            .bind_stream(&mut send, stream_id)
            .await
            .expect("their edge binds");
        (send, recv)
    }

    async fn reject_unsupported(&self, request_id: u64, reason: String) {
        self.client
            .reject_open(
                request_id,
                quic_reverse::RejectCode::UnsupportedService,
                Some(reason),
            )
            .await
            .expect("their edge rejects");
    }

    async fn ping(&self) -> Result<(), Failure> {
        self.client.ping().await.map(drop).map_err(their_failure)
    }

    async fn close(&self, code: Close, reason: Option<&str>) {
        let code = match code {
            Close::Normal => quic_reverse::CloseCode::Normal,
            Close::Error => quic_reverse::CloseCode::Error,
            Close::Timeout => quic_reverse::CloseCode::Timeout,
        };
        self.client
            .close(code, reason.map(str::to_owned))
            .await
            .expect("their close");
    }

    async fn on_closing(&self) {
        let _ = self
            .client
            .close(quic_reverse::CloseCode::Normal, None)
            .await;
    }

    fn is_ready(&self) -> bool {
        self.client.is_ready()
    }

    fn ours(&self) -> Option<&backhaul::SessionClient<OurConnection>> {
        None
    }
}

fn our_failure(error: backhaul::Error) -> Failure {
    match error {
        backhaul::Error::StreamRejected { code, reason } => Failure::Rejected {
            unsupported_service: code == backhaul::RejectCode::UnsupportedService,
            reason,
        },
        backhaul::Error::SessionClosed => Failure::SessionClosed,
        backhaul::Error::Disconnected => Failure::Disconnected,
        backhaul::Error::VersionMismatch { .. } => Failure::VersionMismatch,
        backhaul::Error::ProtocolViolation(_) => Failure::ProtocolViolation,
        other => Failure::Other(format!("{other:?}")),
    }
}

fn their_failure(error: quic_reverse::Error) -> Failure {
    match error {
        quic_reverse::Error::StreamRejected { code, reason } => Failure::Rejected {
            unsupported_service: code == quic_reverse::RejectCode::UnsupportedService,
            reason,
        },
        quic_reverse::Error::SessionClosed => Failure::SessionClosed,
        quic_reverse::Error::Disconnected => Failure::Disconnected,
        quic_reverse::Error::NegotiationFailed(cause) if cause.to_string().contains("version") => {
            Failure::VersionMismatch
        }
        quic_reverse::Error::ProtocolViolation(_) => Failure::ProtocolViolation,
        other => Failure::Other(format!("{other:?}")),
    }
}

fn our_event(event: backhaul::ClientEvent) -> Event {
    match event {
        backhaul::ClientEvent::OpenRequest {
            request_id,
            service,
            metadata,
        } => Event::OpenRequest {
            request_id,
            service: service.as_str().to_owned(),
            metadata: match metadata {
                backhaul::Metadata::Empty => Meta::Empty,
                backhaul::Metadata::Bytes(bytes) => Meta::Bytes(bytes),
                backhaul::Metadata::Structured(map) => Meta::Structured(
                    map.into_iter()
                        .map(|(key, value)| {
                            let value = match value {
                                backhaul::MetadataValue::String(text) => Value::String(text),
                                backhaul::MetadataValue::Integer(number) => Value::Integer(number),
                                backhaul::MetadataValue::Boolean(flag) => Value::Boolean(flag),
                                backhaul::MetadataValue::Bytes(bytes) => Value::Bytes(bytes),
                            };
                            (key, value)
                        })
                        .collect(),
                ),
            },
        },
        backhaul::ClientEvent::StreamClosed { .. } => Event::StreamClosed,
        backhaul::ClientEvent::PingReceived { sequence } => Event::PingReceived { sequence },
        backhaul::ClientEvent::Closing { code, reason } => Event::Closing {
            code: match code {
                backhaul::CloseCode::Normal => Close::Normal,
                backhaul::CloseCode::Timeout => Close::Timeout,
                _ => Close::Error,
            },
            reason,
        },
    }
}

fn their_event(event: quic_reverse::ClientEvent) -> Event {
    use quic_reverse_control::MetadataValue as TheirValue;
    match event {
        quic_reverse::ClientEvent::OpenRequest {
            request_id,
            service,
            metadata,
        } => Event::OpenRequest {
            request_id,
            service: service.as_str().to_owned(),
            metadata: match metadata {
                quic_reverse::Metadata::Empty => Meta::Empty,
                quic_reverse::Metadata::Bytes(bytes) => Meta::Bytes(bytes),
                quic_reverse::Metadata::Structured(map) => Meta::Structured(
                    map.into_iter()
                        .map(|(key, value)| {
                            let value = match value {
                                TheirValue::String(text) => Value::String(text),
                                TheirValue::Integer(number) => Value::Integer(number),
                                TheirValue::Boolean(flag) => Value::Boolean(flag),
                                TheirValue::Bytes(bytes) => Value::Bytes(bytes),
                            };
                            (key, value)
                        })
                        .collect(),
                ),
            },
        },
        quic_reverse::ClientEvent::StreamClosed { .. } => Event::StreamClosed,
        quic_reverse::ClientEvent::PingReceived { sequence } => Event::PingReceived { sequence },
        quic_reverse::ClientEvent::Closing { code, reason } => Event::Closing {
            code: match code {
                quic_reverse::CloseCode::Normal => Close::Normal,
                quic_reverse::CloseCode::Timeout => Close::Timeout,
                _ => Close::Error,
            },
            reason,
        },
    }
}

/// Re-issues a crate's events in the shared vocabulary; ends when the crate's channel does.
fn forward_events<T: Send + 'static>(
    mut events: mpsc::Receiver<T>,
    convert: fn(T) -> Event,
) -> mpsc::Receiver<Event> {
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if sender.send(convert(event)).await.is_err() {
                break;
            }
        }
    });
    receiver
}

// ---------------------------------------------------------------------------------------------
// Sessions, the test edge, and the data checks.

/// A relay of one crate and an edge of the other, negotiated over one fresh connection.
struct Pair<R, E> {
    relay: R,
    relay_negotiated: Negotiated,
    edge: E,
    edge_negotiated: Negotiated,
    edge_events: mpsc::Receiver<Event>,
    quic: support::QuicPair,
}

async fn pair<R: Peer, E: Peer>(relay: Settings, edge: Settings) -> Pair<R, E> {
    let quic = quic_pair().await;
    let (relay, edge) = tokio::join!(
        R::start(quic.relay.clone(), true, relay),
        E::start(quic.edge.clone(), false, edge),
    );
    let relay = relay.expect("relay negotiates");
    let edge = edge.expect("edge negotiates");
    Pair {
        relay: relay.client,
        relay_negotiated: relay.negotiated,
        edge: edge.client,
        edge_negotiated: edge.negotiated,
        edge_events: edge.events,
        quic,
    }
}

/// Serves [`SERVICES`] on `edge` until `Closing` (or the end of events), each stream on its
/// own task; returns every event seen, in order.
fn serve_edge<E: Peer>(
    edge: E,
    mut events: mpsc::Receiver<Event>,
) -> tokio::task::JoinHandle<Vec<Event>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(event) = events.recv().await {
            seen.push(event.clone());
            match event {
                Event::OpenRequest {
                    request_id,
                    service,
                    metadata,
                } => {
                    if !SERVICES.contains(&service.as_str()) {
                        let reason = format!("unknown service: {service}");
                        edge.reject_unsupported(request_id, reason).await;
                        continue;
                    }
                    let (send, recv) = edge.accept(request_id).await;
                    tokio::spawn(serve_stream(service, metadata.bytes(), send, recv));
                }
                Event::Closing { .. } => {
                    edge.on_closing().await;
                    break;
                }
                _ => {}
            }
        }
        seen
    })
}

/// The next open request on `events`, skipping nothing: anything else first is a failure.
async fn next_open_request(events: &mut mpsc::Receiver<Event>) -> (u64, String, Meta) {
    match within(PROMPTLY, events.recv()).await {
        Some(Event::OpenRequest {
            request_id,
            service,
            metadata,
        }) => (request_id, service, metadata),
        other => panic!("expected an open request, got {other:?}"),
    }
}

/// The events an edge task saw, once it ended (at `Closing`).
async fn events_seen(edge: tokio::task::JoinHandle<Vec<Event>>) -> Vec<Event> {
    within(PROMPTLY, edge).await.expect("edge task")
}

/// Checks that `relay` still opens streams and carries data after whatever just happened.
async fn still_serves<R: Peer>(relay: &R) {
    let (send, recv) = relay
        .open("echo", Meta::Empty)
        .await
        .expect("open after the event");
    check_echo(send, recv, b"still here").await;
}

/// Waits until `peer` reports it is no longer ready.
async fn until_not_ready<P: Peer>(peer: &P) {
    within(PROMPTLY, async {
        while peer.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Metadata bytes asking "source" for `len` bytes of the pattern seeded by `seed`.
fn source_request(len: usize, seed: &[u8]) -> Vec<u8> {
    let mut bytes = (len as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(seed);
    bytes
}

/// Runs one of [`SERVICES`] on an accepted data stream; `request` is the metadata bytes.
async fn serve_stream<S, R>(service: String, request: Vec<u8>, mut send: S, mut recv: R)
where
    S: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    match service.as_str() {
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
            let sum = Checksum::of(&data);
            let mut answer = sum.len.to_le_bytes().to_vec();
            answer.extend_from_slice(&sum.hash.to_le_bytes());
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
    assert_eq!(Checksum::of(&echoed), Checksum::of(data), "echo");
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
    assert_eq!(
        Checksum::of(&received),
        Checksum::of(&pattern(seed, len)),
        "source"
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
    let seen = Checksum {
        len: u64::from_le_bytes(answer[..8].try_into().unwrap()),
        hash: u64::from_le_bytes(answer[8..].try_into().unwrap()),
    };
    assert_eq!(seen, Checksum::of(data), "sink saw other bytes");
}

// ---------------------------------------------------------------------------------------------
// Both ways round: each test body once, run with our relay and their edge, then with their
// relay and our edge.

/// Generates, for each named generic test, one `#[tokio::test]` per direction.
macro_rules! both_ways {
    ($($test:ident),* $(,)?) => {
        mod our_relay_their_edge {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::within(super::LIMIT, super::$test::<super::Ours, super::Theirs>()).await;
                }
            )*
        }
        mod their_relay_our_edge {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::within(super::LIMIT, super::$test::<super::Theirs, super::Ours>()).await;
                }
            )*
        }
    };
}

both_ways!(
    sequential_opens_carry_every_service,
    rejection_is_stream_rejected_and_session_continues,
    structured_metadata_arrives_intact,
    relay_close_is_closing_on_the_edge,
    edge_close_ends_the_relay_session,
    pings_cross_both_ways_without_the_feature,
    our_keepalive_is_answered,
    handshake_exchanges_agents_and_intersects_features,
    disjoint_features_negotiate_to_none,
    version_mismatch_fails_both_sides_promptly,
);

/// Sequential opens of every service with payloads from 4 KiB to 3 MiB: each stream carries
/// its data intact both ways, the edge sees every open, and our side holds nothing after.
async fn sequential_opens_carry_every_service<R: Peer, E: Peer>() {
    let pair = pair::<R, E>(Settings::default(), Settings::default()).await;
    let edge = serve_edge(pair.edge.clone(), pair.edge_events);
    let relay = &pair.relay;
    for (round, &size) in SIZES.iter().enumerate() {
        let seed = [round as u8, 0xa5];
        let data = pattern(&seed, size);

        let (send, recv) = relay.open("echo", Meta::Empty).await.expect("open echo");
        check_echo(send, recv, &data).await;

        let request = Meta::Bytes(source_request(size, &seed));
        let (send, recv) = relay.open("source", request).await.expect("open source");
        check_source(send, recv, size, &seed).await;

        let (send, recv) = relay.open("sink", Meta::Empty).await.expect("open sink");
        check_sink(send, recv, &data).await;
    }
    relay.close(Close::Normal, Some("relay done")).await;
    let seen = events_seen(edge).await;
    let opens = seen
        .iter()
        .filter(|event| matches!(event, Event::OpenRequest { .. }))
        .count();
    assert_eq!(opens, 3 * SIZES.len());
    if let Some(ours) = pair.relay.ours() {
        assert_eq!(ours.stats().pending_opens, 0, "every open answered");
    }
    if let Some(ours) = pair.edge.ours() {
        assert_eq!(ours.stats().active_streams, 0, "every stream slot freed");
    }
}

/// The edge's rejection arrives at the relay as `StreamRejected` with its code and reason,
/// and the session keeps working afterwards.
async fn rejection_is_stream_rejected_and_session_continues<R: Peer, E: Peer>() {
    let pair = pair::<R, E>(Settings::default(), Settings::default()).await;
    let _edge = serve_edge(pair.edge.clone(), pair.edge_events);
    let failure = pair.relay.open("foobar", Meta::Empty).await.err();
    assert_eq!(
        failure,
        Some(Failure::Rejected {
            unsupported_service: true,
            reason: Some("unknown service: foobar".into()),
        })
    );
    assert!(pair.relay.is_ready());
    still_serves(&pair.relay).await;
}

/// Structured metadata sent by the relay reaches the edge intact, every value type.
async fn structured_metadata_arrives_intact<R: Peer, E: Peer>() {
    let mut pair = pair::<R, E>(Settings::default(), Settings::default()).await;
    let sent: BTreeMap<String, Value> = [
        ("k".to_owned(), Value::Integer(-5)),
        ("s".to_owned(), Value::String("v".into())),
        ("b".to_owned(), Value::Boolean(true)),
        ("x".to_owned(), Value::Bytes(vec![0xff, 0])),
    ]
    .into_iter()
    .collect();
    let relay = pair.relay.clone();
    let metadata = Meta::Structured(sent.clone());
    let open = tokio::spawn(async move { relay.open("echo", metadata).await.map(drop) });
    let (request_id, service, received) = next_open_request(&mut pair.edge_events).await;
    assert_eq!(service, "echo");
    assert_eq!(received, Meta::Structured(sent));
    let (send, recv) = pair.edge.accept(request_id).await;
    drop((send, recv));
    open.await.expect("open task").expect("open accepted");
}

/// The relay's `close()` reaches the edge as `Closing` with its code and reason, last; the
/// relay refuses new opens with `SessionClosed`, and the edge's session ends.
async fn relay_close_is_closing_on_the_edge<R: Peer, E: Peer>() {
    let pair = pair::<R, E>(Settings::default(), Settings::default()).await;
    let edge = serve_edge(pair.edge.clone(), pair.edge_events);
    still_serves(&pair.relay).await;
    pair.relay
        .close(Close::Timeout, Some("relay going away"))
        .await;
    let seen = events_seen(edge).await;
    assert_eq!(
        seen.last(),
        Some(&Event::Closing {
            code: Close::Timeout,
            reason: Some("relay going away".into()),
        }),
        "{seen:?}"
    );
    assert_eq!(
        pair.relay.open("echo", Meta::Empty).await.err(),
        Some(Failure::SessionClosed)
    );
    until_not_ready(&pair.edge).await;
    if let Some(ours) = pair.relay.ours() {
        assert!(matches!(
            ours.closed().await,
            backhaul::Error::SessionClosed
        ));
    }
    if let Some(ours) = pair.edge.ours() {
        assert!(matches!(
            within(PROMPTLY, ours.closed()).await,
            backhaul::Error::SessionClosed
        ));
        assert!(matches!(
            ours.ping().await,
            Err(backhaul::Error::SessionClosed)
        ));
    }
}

/// The edge's `close()` ends the relay's session: it stops being ready and opens fail with
/// `SessionClosed`.
async fn edge_close_ends_the_relay_session<R: Peer, E: Peer>() {
    let pair = pair::<R, E>(Settings::default(), Settings::default()).await;
    pair.edge.close(Close::Normal, Some("edge leaving")).await;
    until_not_ready(&pair.relay).await;
    assert_eq!(
        pair.relay.open("echo", Meta::Empty).await.err(),
        Some(Failure::SessionClosed)
    );
    if let Some(ours) = pair.relay.ours() {
        assert!(matches!(
            within(PROMPTLY, ours.closed()).await,
            backhaul::Error::SessionClosed
        ));
    }
}

/// Pings cross both ways with no feature negotiated (both crates answer a `Ping` whatever
/// was negotiated), and the edge reports each ping it answered, in sequence.
async fn pings_cross_both_ways_without_the_feature<R: Peer, E: Peer>() {
    let pair = pair::<R, E>(Settings::default(), Settings::default()).await;
    assert!(pair.relay_negotiated.features.is_empty());
    assert!(pair.edge_negotiated.features.is_empty());
    let edge = serve_edge(pair.edge.clone(), pair.edge_events);
    pair.relay.ping().await.expect("relay's ping answered");
    pair.edge.ping().await.expect("edge's ping answered");
    pair.relay.ping().await.expect("relay's second ping");
    pair.relay.close(Close::Normal, None).await;
    let sequences: Vec<u64> = events_seen(edge)
        .await
        .into_iter()
        .filter_map(|event| match event {
            Event::PingReceived { sequence } => Some(sequence),
            _ => None,
        })
        .collect();
    assert_eq!(sequences, [1, 2]);
}

/// With `PING_PONG` negotiated, our side's keep-alive (relay or edge) is answered by the
/// reference crate across several intervals, and the session keeps serving.
async fn our_keepalive_is_answered<R: Peer, E: Peer>() {
    let keepalive = |ours: bool| Settings {
        features: Features::PING_PONG,
        ping_interval: ours.then_some(Duration::from_millis(100)),
        ..Settings::default()
    };
    let pair = pair::<R, E>(keepalive(R::OURS), keepalive(E::OURS)).await;
    assert!(pair.relay_negotiated.features.contains(Features::PING_PONG));
    let _edge = serve_edge(pair.edge.clone(), pair.edge_events);
    let ours = pair
        .relay
        .ours()
        .or(pair.edge.ours())
        .expect("one side is ours");
    let mut control = ours.control_events();
    let mut pongs = 0;
    while pongs < 3 {
        let event = control.recv().await.expect("control events");
        if let backhaul::ControlEvent::Pong { .. } = event {
            pongs += 1;
        }
    }
    assert!(ours.is_ready(), "keep-alive must not have failed");
    still_serves(&pair.relay).await;
}

/// Each side sees the other's agent string (or none) and the intersection of the features
/// offered.
async fn handshake_exchanges_agents_and_intersects_features<R: Peer, E: Peer>() {
    let relay = Settings {
        agent: Some("test-relay/1.0"),
        features: Features::STRUCTURED_METADATA | Features::PING_PONG,
        ..Settings::default()
    };
    let edge = Settings {
        agent: None,
        features: Features::PING_PONG | Features::STREAM_PRIORITY,
        ..Settings::default()
    };
    let pair = pair::<R, E>(relay, edge).await;
    for negotiated in [&pair.relay_negotiated, &pair.edge_negotiated] {
        assert_eq!(negotiated.version, 1);
        assert_eq!(negotiated.features, Features::PING_PONG);
    }
    assert_eq!(pair.relay_negotiated.remote_agent, None);
    assert_eq!(
        pair.edge_negotiated.remote_agent.as_deref(),
        Some("test-relay/1.0")
    );
    assert!(pair.relay.is_ready());
    assert!(pair.edge.is_ready());
}

/// Disjoint feature sets negotiate to no features on both sides.
async fn disjoint_features_negotiate_to_none<R: Peer, E: Peer>() {
    let relay = Settings {
        features: Features::PING_PONG,
        ..Settings::default()
    };
    let edge = Settings {
        features: Features::STRUCTURED_METADATA | Features::STREAM_PRIORITY,
        ..Settings::default()
    };
    let pair = pair::<R, E>(relay, edge).await;
    assert!(pair.relay_negotiated.features.is_empty());
    assert!(pair.edge_negotiated.features.is_empty());
    still_serves_after_serving(pair).await;
}

/// Serves the pair's edge and checks the relay can use it.
async fn still_serves_after_serving<R: Peer, E: Peer>(pair: Pair<R, E>) {
    let _edge = serve_edge(pair.edge.clone(), pair.edge_events);
    still_serves(&pair.relay).await;
}

/// Our side offering only version 2 fails the handshake on both sides, promptly. As relay,
/// ours answers the reference edge's `Hello` before refusing, so both report a version
/// mismatch; as edge, the reference relay refuses our `Hello` without answering, and ours
/// fails as soon as the control stream ends instead of waiting for `negotiation_timeout`.
async fn version_mismatch_fails_both_sides_promptly<R: Peer, E: Peer>() {
    let settings = |ours: bool| Settings {
        versions: ours.then(|| vec![2]),
        ..Settings::default()
    };
    let quic = quic_pair().await;
    let (relay, edge) = within(Duration::from_secs(5), async {
        tokio::join!(
            R::start(quic.relay.clone(), true, settings(R::OURS)),
            E::start(quic.edge.clone(), false, settings(E::OURS)),
        )
    })
    .await;
    let relay = relay.err().expect("the relay must refuse");
    let edge = edge.err().expect("the edge must refuse");
    if R::OURS {
        assert_eq!(relay, Failure::VersionMismatch);
        assert_eq!(edge, Failure::VersionMismatch);
    } else {
        assert_eq!(edge, Failure::ProtocolViolation);
    }
}

// ---------------------------------------------------------------------------------------------
// One way: our relay's own promises, probed with a reference edge behaving unusually.

/// Our relay opens many streams at once on the reference edge; each open gets the stream
/// bound to its own logical id, so every echo comes back on the stream that sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_relay_concurrent_opens_on_their_edge() {
    within(LIMIT, async {
        let pair = pair::<Ours, Theirs>(Settings::default(), Settings::default()).await;
        let _edge = serve_edge(pair.edge.clone(), pair.edge_events);
        let mut opens = tokio::task::JoinSet::new();
        for index in 0..16u8 {
            let relay = pair.relay.clone();
            opens.spawn(async move {
                let data = pattern(&[index, 0x3c], 32 * 1024 + usize::from(index));
                let (send, recv) = relay.open("echo", Meta::Empty).await.expect("open");
                check_echo(send, recv, &data).await;
            });
        }
        while let Some(done) = opens.join_next().await {
            done.expect("concurrent open");
        }
        let stats = pair.relay.0.stats();
        assert_eq!(stats.pending_opens, 0);
        assert_eq!(stats.refused_streams, 0);
    })
    .await;
}

/// The reference edge answers four concurrent opens out of order, binding two data streams
/// before their `OpenResponse` is even sent and the others after, with ids our relay did not
/// choose; every open still gets the stream bound to the id announced for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_relay_matches_reordered_and_early_streams_from_their_edge() {
    within(LIMIT, async {
        let pair = pair::<Ours, Theirs>(Settings::default(), Settings::default()).await;
        let edge = pair.edge.client.clone();
        let mut events = pair.edge_events;
        let edge_task = tokio::spawn(async move {
            let mut requests = Vec::new();
            while requests.len() < 4 {
                let (request_id, _, metadata) = next_open_request(&mut events).await;
                requests.push((request_id, metadata.bytes()));
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
                let (send, mut recv) = relay
                    .open("tag", Meta::Bytes(tag.clone()))
                    .await
                    .expect("open");
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
        let stats = pair.relay.0.stats();
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
        let mut pair = pair::<Ours, Theirs>(Settings::default(), Settings::default()).await;
        let relay = pair.relay.clone();
        let open = tokio::spawn(async move { relay.open("echo", Meta::Empty).await.err() });
        next_open_request(&mut pair.edge_events).await;
        pair.edge.close(Close::Normal, Some("bye")).await;
        let failure = within(Duration::from_secs(5), open)
            .await
            .expect("open task");
        assert_eq!(failure, Some(Failure::SessionClosed));
    })
    .await;
}

/// An open waiting for the reference edge's answer fails with `Disconnected` as soon as the
/// edge's QUIC connection goes away, and so does the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_open_fails_when_their_edge_disconnects() {
    within(LIMIT, async {
        let mut pair = pair::<Ours, Theirs>(Settings::default(), Settings::default()).await;
        let relay = pair.relay.clone();
        let open = tokio::spawn(async move { relay.open("echo", Meta::Empty).await.err() });
        next_open_request(&mut pair.edge_events).await;
        pair.quic
            .edge
            .close(quinn::VarInt::from_u32(7), b"edge gone");
        let failure = within(Duration::from_secs(5), open)
            .await
            .expect("open task");
        assert_eq!(failure, Some(Failure::Disconnected));
        assert!(matches!(
            within(Duration::from_secs(5), pair.relay.0.closed()).await,
            backhaul::Error::Disconnected
        ));
    })
    .await;
}

/// `close()` leaves the connection "for the caller to close"; a caller that does so right
/// away must not lose the `StreamClose(0)`: the reference edge sees `Closing` every time
/// (`close()` returns once the message was delivered, not merely handed to quinn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_close_then_connection_close_reaches_their_edge() {
    within(LIMIT, async {
        const TRIALS: usize = 50;
        let mut lost = 0;
        for _ in 0..TRIALS {
            let pair = pair::<Ours, Theirs>(Settings::default(), Settings::default()).await;
            let edge = serve_edge(pair.edge.clone(), pair.edge_events);
            pair.relay.close(Close::Normal, Some("bye")).await;
            pair.quic.relay.close(0u32.into(), b"done");
            let seen = events_seen(edge).await;
            if !matches!(seen.last(), Some(Event::Closing { .. })) {
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
// One way: our edge's promise under a reference relay that closes abruptly.

/// The reference relay's `close()` is on the wire before its QUIC connection closes, and both
/// arrive at our edge together (the edge's runtime is busy meanwhile, as under load). The
/// reference edge still reads the buffered `StreamClose(0)` and reports `Closing` every
/// time; our edge must too, not drop it because the connection's end was noticed first.
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
            // The client must outlive the trial: dropping the last one ends the session.
            let Started {
                client: _edge,
                mut events,
                ..
            } = Ours::start(connection, false, Settings::default())
                .await
                .expect("our edge negotiates");
            ready_tx.send(handle).expect("ready");
            let mut closing = false;
            while let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_secs(5), events.recv()).await
            {
                closing |= matches!(event, Event::Closing { .. });
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
    let relay = Theirs::start(connection.clone(), true, Settings::default())
        .await
        .expect("their relay negotiates")
        .client;
    let edge_runtime: tokio::runtime::Handle = ready_rx.await.expect("edge ready");
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Keep both edge workers busy, so nothing is read until both packets are in.
    for _ in 0..2 {
        edge_runtime.spawn(async { std::thread::sleep(Duration::from_millis(250)) });
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    relay.close(Close::Normal, Some("bye")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    connection.close(0u32.into(), b"");
    tokio::task::spawn_blocking(move || edge_thread.join().expect("edge thread"))
        .await
        .expect("join")
}
