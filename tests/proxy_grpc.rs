//! gRPC through the reverse proxy example: a tonic client on the public side, a tonic
//! server behind an edge (`--expose grpc=h2c://HOST:PORT`), relay and edge as separate
//! processes. Over HTTPS (ALPN h2) and over plain HTTP/2 (h2c, prior knowledge), one test
//! body for both: unary calls with 1 MiB messages checksummed, a server stream of 16 MiB
//! whose first message arrives while the server still holds the rest back (nothing
//! buffers it), custom trailing metadata, and non-OK statuses with their messages, both
//! as a trailers-only answer and in the trailers after streamed messages.
//!
//! No protoc: messages are raw bytes, with a hand-written `tonic::codec::Codec`.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures_util::Stream;
use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use support::http::Checksum;
use support::pattern;
use support::proxy::{bounded, self_signed_pem, Relay, TempDir};

const LIMIT: Duration = Duration::from_secs(120);
const DOMAIN: &str = "tunnel.test";
const UNARY: &str = "/backhaul.test.Echo/Unary";
const FAIL: &str = "/backhaul.test.Echo/Fail";
const STREAM: &str = "/backhaul.test.Echo/Stream";
/// Streamed messages and their size: 16 MiB in all.
const MESSAGES: u32 = 64;
const MESSAGE_SIZE: u32 = 256 * 1024;

/// Messages as they are: bytes in, bytes out.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Streamed message `index`: a pattern seeded by its index.
fn streamed(index: u32) -> Bytes {
    Bytes::from(pattern(&index.to_le_bytes(), MESSAGE_SIZE as usize))
}

/// A server stream: messages from a channel the handler fills.
type MessageStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

struct ChannelStream(mpsc::Receiver<Result<Bytes, Status>>);

impl Stream for ChannelStream {
    type Item = Result<Bytes, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// A metadata value as text ("" if absent or not ASCII).
fn text<'a>(metadata: &'a MetadataMap, key: &str) -> &'a str {
    metadata
        .get(key)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
}

fn ascii(value: &str) -> MetadataValue<tonic::metadata::Ascii> {
    value.parse().expect("ASCII metadata")
}

/// The gRPC server behind the edge, on plain TCP with HTTP/2 only (as tonic serves):
/// - `Unary` echoes its message, telling in response headers the checksum of what it got
///   and the `X-Forwarded-Proto` the relay set;
/// - `Fail` answers `FAILED_PRECONDITION` with a message and metadata (trailers-only);
/// - `Stream` sends [`MESSAGES`] messages; after the first it waits until `first_seen` is
///   notified (the client got it: nothing on the way buffers), then ends with custom
///   trailing metadata (the checksum of all it sent), or, if the request is `fail`, with
///   `ABORTED` after half of them.
async fn grpc_server(first_seen: Arc<Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let first_seen = Arc::clone(&first_seen);
            let service =
                hyper::service::service_fn(move |request| handle(request, Arc::clone(&first_seen)));
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    address
}

async fn handle(
    request: http::Request<Incoming>,
    first_seen: Arc<Notify>,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let mut grpc = tonic::server::Grpc::new(RawCodec);
    let path = request.uri().path().to_owned();
    let response = match path.as_str() {
        UNARY => {
            let unary = tower::service_fn(|request: tonic::Request<Bytes>| async move {
                let proto = request
                    .metadata()
                    .get("x-forwarded-proto")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                let body = request.into_inner();
                let mut response = tonic::Response::new(body.clone());
                let metadata = response.metadata_mut();
                metadata.insert("x-checksum", ascii(&Checksum::of(&body).header()));
                metadata.insert("x-seen-proto", ascii(&proto));
                Ok::<_, Status>(response)
            });
            grpc.unary(unary, request).await
        }
        FAIL => {
            let fail = tower::service_fn(|_: tonic::Request<Bytes>| async {
                let mut metadata = MetadataMap::new();
                metadata.insert("x-reason", ascii("on-fire"));
                Err::<tonic::Response<Bytes>, _>(Status::with_metadata(
                    Code::FailedPrecondition,
                    "kiosk is on fire",
                    metadata,
                ))
            });
            grpc.unary(fail, request).await
        }
        STREAM => {
            let stream = tower::service_fn(move |request: tonic::Request<Bytes>| {
                let first_seen = Arc::clone(&first_seen);
                async move {
                    let fail = request.into_inner().as_ref() == b"fail";
                    let (sender, receiver) = mpsc::channel(4);
                    tokio::spawn(send_messages(sender, fail, first_seen));
                    let stream: MessageStream = Box::pin(ChannelStream(receiver));
                    Ok::<_, Status>(tonic::Response::new(stream))
                }
            });
            grpc.server_streaming(stream, request).await
        }
        _ => Status::unimplemented(path).into_http(),
    };
    Ok(response)
}

async fn send_messages(
    sender: mpsc::Sender<Result<Bytes, Status>>,
    fail: bool,
    first_seen: Arc<Notify>,
) {
    let mut sent = Checksum::default();
    let count = if fail { MESSAGES / 2 } else { MESSAGES };
    for index in 0..count {
        let message = streamed(index);
        sent.update(&message);
        if sender.send(Ok(message)).await.is_err() {
            return;
        }
        if index == 0 {
            let seen = tokio::time::timeout(Duration::from_secs(20), first_seen.notified()).await;
            if seen.is_err() {
                let status = Status::deadline_exceeded("the client never saw the first message");
                let _ = sender.send(Err(status)).await;
                return;
            }
        }
    }
    let mut metadata = MetadataMap::new();
    let end = if fail {
        metadata.insert("x-sent", ascii(&count.to_string()));
        Status::with_metadata(
            Code::Aborted,
            format!("stopped after {count} messages"),
            metadata,
        )
    } else {
        // An OK status with metadata: tonic's way to send custom trailing metadata.
        metadata.insert("x-checksum", ascii(&sent.header()));
        Status::with_metadata(Code::Ok, "", metadata)
    };
    let _ = sender.send(Err(end)).await;
}

/// The tonic client's transport: one HTTP/2 connection, as hyper's `SendRequest`.
type Sender = hyper::client::conn::http2::SendRequest<tonic::body::Body>;

async fn http2_over<I>(io: I) -> Sender
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

/// HTTPS to the relay at `addr` for `host`, trusting `roots`; the server must pick h2.
async fn https_connection(addr: SocketAddr, host: &str, roots: rustls::RootCertStore) -> Sender {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).expect("a name");
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
    http2_over(tls).await
}

type GrpcClient = tonic::client::Grpc<
    tower::util::BoxService<
        http::Request<tonic::body::Body>,
        http::Response<Incoming>,
        hyper::Error,
    >,
>;

/// A tonic client over `sender`, its requests for `origin` (`scheme://host:port`).
fn grpc_client(sender: Sender, origin: &str) -> GrpcClient {
    let service = tower::service_fn(move |request: http::Request<tonic::body::Body>| {
        let mut sender = sender.clone();
        async move { sender.send_request(request).await }
    });
    tonic::client::Grpc::with_origin(
        tower::util::BoxService::new(service),
        origin.parse().expect("an origin"),
    )
}

/// What every transport must carry; `proto` is what the edge's service must be told the
/// client used.
async fn calls_cross_the_relay(mut client: GrpcClient, first_seen: &Notify, proto: &str) {
    // Unary, 1 MiB each way, checksummed; headers from the server arrive.
    let sent = Bytes::from(pattern(b"unary", 1024 * 1024));
    client.ready().await.expect("ready");
    let response = client
        .unary(
            tonic::Request::new(sent.clone()),
            PathAndQuery::from_static(UNARY),
            RawCodec,
        )
        .await
        .expect("the unary call");
    let metadata = response.metadata().clone();
    assert_eq!(
        Checksum::of(response.get_ref()),
        Checksum::of(&sent),
        "the echo"
    );
    assert_eq!(
        text(&metadata, "x-checksum"),
        Checksum::of(&sent).header().as_str()
    );
    assert_eq!(
        text(&metadata, "x-seen-proto"),
        proto,
        "X-Forwarded-Proto at the server"
    );

    // A failure with its message and metadata (a trailers-only answer).
    client.ready().await.expect("ready");
    let status = client
        .unary(
            tonic::Request::new(Bytes::new()),
            PathAndQuery::from_static(FAIL),
            RawCodec,
        )
        .await
        .expect_err("the failing call");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "kiosk is on fire");
    assert_eq!(text(status.metadata(), "x-reason"), "on-fire");

    // A server stream: 16 MiB, the first message before the server sends the rest, and
    // the custom trailer after the last.
    client.ready().await.expect("ready");
    let mut stream = client
        .server_streaming(
            tonic::Request::new(Bytes::from_static(b"all")),
            PathAndQuery::from_static(STREAM),
            RawCodec,
        )
        .await
        .expect("the streaming call")
        .into_inner();
    let (mut received, mut expected) = (Checksum::default(), Checksum::default());
    for index in 0..MESSAGES {
        let message = stream
            .message()
            .await
            .unwrap_or_else(|status| panic!("message {index}: {status:?}"))
            .unwrap_or_else(|| panic!("the stream ended after {index} messages"));
        assert_eq!(message.len(), MESSAGE_SIZE as usize);
        received.update(&message);
        expected.update(&streamed(index));
        if index == 0 {
            first_seen.notify_one();
        }
    }
    assert_eq!(stream.message().await.expect("the end"), None);
    assert_eq!(received, expected, "16 MiB streamed");
    let trailers = stream
        .trailers()
        .await
        .expect("trailers")
        .expect("trailers");
    assert_eq!(
        text(&trailers, "x-checksum"),
        expected.header().as_str(),
        "{trailers:?}"
    );

    // A stream that fails midway: the messages, then the status from the trailers.
    client.ready().await.expect("ready");
    let mut stream = client
        .server_streaming(
            tonic::Request::new(Bytes::from_static(b"fail")),
            PathAndQuery::from_static(STREAM),
            RawCodec,
        )
        .await
        .expect("the failing stream")
        .into_inner();
    let mut messages = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => {
                messages += 1;
                if messages == 1 {
                    first_seen.notify_one();
                }
            }
            Ok(None) => panic!("the stream ended OK after {messages} messages"),
            Err(status) => break status,
        }
    };
    assert_eq!(messages, MESSAGES / 2);
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(
        status.message(),
        format!("stopped after {} messages", MESSAGES / 2)
    );
    assert_eq!(
        text(status.metadata(), "x-sent"),
        (MESSAGES / 2).to_string().as_str()
    );
}

/// Relay (HTTPS and plain listeners) and an edge exposing the gRPC server as `grpc`.
async fn relay_with_grpc_edge(
    dir: &Path,
    first_seen: Arc<Notify>,
) -> (
    Relay,
    SocketAddr,
    rustls::RootCertStore,
    support::proxy::Proc,
) {
    let names = [format!("*.{DOMAIN}"), format!("*.kiosk.{DOMAIN}")];
    let tls = self_signed_pem(dir, "https", &names);
    let (mut relay, https) =
        Relay::start_https(dir, &[("kiosk", "kiosk-token")], DOMAIN, &tls, &[]).await;
    let server = grpc_server(first_seen).await;
    let expose = format!("grpc=h2c://{server}");
    let edge = relay.spawn_edge("kiosk", "kiosk-token", &[], &["--expose", &expose]);
    relay.wait_edges(1).await;
    (relay, https, tls.roots, edge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_cross_the_relay_over_https() {
    bounded(LIMIT, async {
        let dir = TempDir::new("grpc-https");
        let first_seen = Arc::new(Notify::new());
        let (_relay, https, roots, _edge) =
            relay_with_grpc_edge(dir.path(), Arc::clone(&first_seen)).await;
        let host = format!("grpc.kiosk.{DOMAIN}");
        let sender = https_connection(https, &host, roots).await;
        let client = grpc_client(sender, &format!("https://{host}:{}", https.port()));
        calls_cross_the_relay(client, &first_seen, "https").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_cross_the_relay_over_h2c() {
    bounded(LIMIT, async {
        let dir = TempDir::new("grpc-h2c");
        let first_seen = Arc::new(Notify::new());
        let (relay, _https, _roots, _edge) =
            relay_with_grpc_edge(dir.path(), Arc::clone(&first_seen)).await;
        let tcp = TcpStream::connect(relay.spec.http)
            .await
            .expect("connecting");
        let sender = http2_over(tcp).await;
        let origin = format!("http://grpc.kiosk.{DOMAIN}:{}", relay.spec.http.port());
        let client = grpc_client(sender, &origin);
        calls_cross_the_relay(client, &first_seen, "http").await;
    })
    .await;
}
