//! `backhaul::http::server` over real sockets on 127.0.0.1, with real hyper clients and raw
//! TCP for the clients that misbehave: slowloris cut at the header timeout, idle
//! keep-alive cut, a client that never reads cut by the write timeout, the connection cap
//! under hundreds of clients, graceful shutdown, the observer's events, and the peer
//! address in each request. Every limit is configured short; well-behaved clients are
//! served meanwhile. Every test is bounded.

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backhaul::http::server::{ConnectionInfo, Cut, Limits, Observer, Server};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

/// The bound on every test: generous, since the machine is shared.
const LIMIT: Duration = Duration::from_secs(90);

type Body = BoxBody<Bytes, Infallible>;

/// What the observer heard, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Opened(SocketAddr),
    Cut(SocketAddr, Cut),
    Refused(SocketAddr, StatusCode),
    Closed(SocketAddr),
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    open: AtomicUsize,
    most_open: AtomicUsize,
    at_capacity: AtomicUsize,
}

impl Recorder {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn cuts(&self, reason: Cut) -> usize {
        let events = self.events();
        events
            .iter()
            .filter(|event| matches!(event, Event::Cut(_, cut) if *cut == reason))
            .count()
    }

    fn push(&self, event: Event) {
        self.events.lock().unwrap().push(event);
    }
}

impl Observer for Recorder {
    fn connection_opened(&self, info: &ConnectionInfo) {
        let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_open.fetch_max(open, Ordering::SeqCst);
        self.push(Event::Opened(info.peer_addr()));
    }
    fn at_capacity(&self, _: usize) {
        self.at_capacity.fetch_add(1, Ordering::SeqCst);
    }
    fn connection_cut(&self, info: &ConnectionInfo, reason: Cut) {
        self.push(Event::Cut(info.peer_addr(), reason));
    }
    fn request_refused(&self, info: &ConnectionInfo, status: StatusCode) {
        self.push(Event::Refused(info.peer_addr(), status));
    }
    fn connection_closed(&self, info: &ConnectionInfo) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.push(Event::Closed(info.peer_addr()));
    }
}

/// A running test server.
struct TestServer {
    addr: SocketAddr,
    recorder: Arc<Recorder>,
    /// Released to let `/hold` answer.
    release: Arc<Notify>,
    /// Notified when `/hold` has a request.
    holding: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// The service: `/` answers "hello", `/peer` the client's address as the server saw it,
/// `/large` 64 MiB, `/hold` waits for the test's release.
async fn start(limits: Limits) -> TestServer {
    let recorder = Arc::new(Recorder::default());
    let release = Arc::new(Notify::new());
    let holding = Arc::new(Notify::new());
    let (hold_release, hold_started) = (Arc::clone(&release), Arc::clone(&holding));
    let service = tower::service_fn(move |mut request: Request<Incoming>| {
        let (release, holding) = (Arc::clone(&hold_release), Arc::clone(&hold_started));
        async move {
            if let Some(shut_down) = match request.uri().path() {
                "/upgrade-cut" => Some(false),
                "/upgrade-done" => Some(true),
                _ => None,
            } {
                return Ok(upgrade_then_end(&mut request, shut_down));
            }
            let body = match request.uri().path() {
                "/peer" => {
                    let info = request.extensions().get::<ConnectionInfo>().copied();
                    full(format!("{:?}", info.map(|info| info.peer_addr())))
                }
                "/large" => {
                    let chunks =
                        (0..1024).map(|_| Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))));
                    StreamBody::new(futures_util::stream::iter(chunks)).boxed()
                }
                "/hold" => {
                    holding.notify_one();
                    release.notified().await;
                    full("released".to_owned())
                }
                _ => full("hello".to_owned()),
            };
            Ok::<_, Infallible>(Response::new(body))
        }
    });
    let server = Server::bind(([127, 0, 0, 1], 0))
        .await
        .expect("binding")
        .with_limits(limits)
        .with_observer(Arc::clone(&recorder));
    let addr = server.local_addr().expect("address");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        server
            .serve(service)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .into_future(),
    );
    TestServer {
        addr,
        recorder,
        release,
        holding,
        stop: Some(stop),
        task,
    }
}

impl TestServer {
    /// Signals shutdown and waits for the server to finish.
    async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("the server task");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers `101` and, on the upgraded connection, writes "partial" and then either shuts
/// the connection down (a clean end) or drops it (a failure half way).
fn upgrade_then_end(request: &mut Request<Incoming>, shut_down: bool) -> Response<Body> {
    let upgrading = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrading.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let _ = io.write_all(b"partial").await;
        let _ = io.flush().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if shut_down {
            let _ = io.shutdown().await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "test")
        .body(Empty::new().boxed())
        .expect("a response")
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text)).boxed()
}

/// Limits with every timeout long, so a test shortens only the one it is about.
fn patient() -> Limits {
    Limits {
        header_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(60),
        ..Limits::DEFAULT
    }
}

async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .expect("the test did not finish in time")
}

/// One request on a new HTTP/1 connection; the status and body.
async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let (mut sender, _connection) = connect(addr).await;
    let response = sender.send_request(request(path)).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP/1 connection: its sender and its task (which ends when the connection closes).
async fn connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    JoinHandle<()>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    (
        sender,
        tokio::spawn(async move {
            let _ = connection.await;
        }),
    )
}

/// One request on an open HTTP/1 connection, answered 200 and read to its end.
async fn served_on(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) {
    let response = sender.send_request(request("/")).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.expect("body");
}

fn request(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "test")
        .body(Empty::new())
        .expect("request")
}

/// True once the server closed (or reset) `stream`, reading and discarding what it sends.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
}

/// Requests from a well-behaved client, one after another, for `duration`; every one
/// must succeed. Returns how many were made.
async fn well_behaved(addr: SocketAddr, duration: Duration) -> usize {
    let started = tokio::time::Instant::now();
    let mut served = 0;
    while started.elapsed() < duration {
        let (status, body) = get(addr, "/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_the_header_timeout_while_others_are_served() {
    bounded(async {
        let server = start(Limits {
            header_timeout: Duration::from_secs(1),
            ..patient()
        })
        .await;
        let mut slowloris = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let addr = server.addr;
            slowloris.spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connecting");
                // A head that never ends, a byte every 100 ms, until the server cuts it.
                let head = b"GET / HTTP/1.1\r\nHost: test\r\nX-Slow: ";
                stream.write_all(head).await.expect("the first bytes");
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if stream.write_all(b"a").await.is_err() {
                        return;
                    }
                    let mut byte = [0; 1];
                    let read = tokio::time::timeout(Duration::ZERO, stream.read(&mut byte)).await;
                    if matches!(read, Ok(Ok(0) | Err(_))) {
                        return;
                    }
                }
            });
        }
        let served = well_behaved(server.addr, Duration::from_secs(2)).await;
        assert!(served > 0);
        // Each slowloris task ends only when its connection is cut.
        while let Some(ended) = slowloris.join_next().await {
            ended.expect("a slowloris client");
        }
        let recorder = &server.recorder;
        assert_eq!(recorder.cuts(Cut::Header), 20, "{:?}", recorder.events());
        assert_eq!(get(server.addr, "/").await.0, StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_cut_at_the_idle_timeout() {
    bounded(async {
        let server = start(Limits {
            idle_timeout: Duration::from_millis(500),
            ..patient()
        })
        .await;
        let (mut sender, connection) = connect(server.addr).await;
        served_on(&mut sender).await;
        // The client keeps the connection: only the server's idle timeout closes it (the
        // header timeout, 60 s, is past the test's bound).
        connection.await.expect("the connection task");
        assert_eq!(
            server.recorder.cuts(Cut::Idle),
            1,
            "{:?}",
            server.recorder.events()
        );
        assert_eq!(server.recorder.cuts(Cut::Header), 0);
    })
    .await;
}

/// The read timer armed for an earlier deadline (the header timeout from accept) fires
/// early once the connection is idle between requests: the connection must outlive it,
/// serve its next request, and be cut at the idle timeout counted from its last response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_outlives_earlier_deadlines_and_is_cut_at_its_own() {
    bounded(async {
        let header_timeout = Duration::from_millis(300);
        let idle_timeout = Duration::from_millis(1500);
        let server = start(Limits {
            header_timeout,
            idle_timeout,
            ..patient()
        })
        .await;
        let (mut sender, connection) = connect(server.addr).await;
        for _ in 0..2 {
            served_on(&mut sender).await;
            // Idle for over twice the header timeout, well within the idle timeout.
            tokio::time::sleep(header_timeout * 5 / 2).await;
            assert!(!connection.is_finished(), "cut before the idle timeout");
        }
        // The server's idle time starts after the request it answers, so counting from
        // before the request is a strict bound.
        let before_last_request = tokio::time::Instant::now();
        served_on(&mut sender).await;
        connection.await.expect("the connection task");
        let elapsed = before_last_request.elapsed();
        assert!(
            elapsed >= idle_timeout,
            "cut {elapsed:?} after the last request"
        );
        assert_eq!(
            server.recorder.cuts(Cut::Idle),
            1,
            "{:?}",
            server.recorder.events()
        );
        assert_eq!(server.recorder.cuts(Cut::Header), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_by_the_write_timeout() {
    bounded(async {
        let server = start(Limits {
            write_timeout: Duration::from_secs(1),
            ..patient()
        })
        .await;
        let mut stream = TcpStream::connect(server.addr).await.expect("connecting");
        stream
            .write_all(b"GET /large HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .expect("the request");
        // It never reads the 64 MiB; others are served meanwhile.
        let started = tokio::time::Instant::now();
        while server.recorder.cuts(Cut::Write) == 0 {
            assert!(started.elapsed() < Duration::from_secs(60), "no write cut");
            let (status, _) = get(server.addr, "/").await;
            assert_eq!(status, StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The connection is reset, not left with the body queued.
        assert!(closed(&mut stream).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_holds_extra_connections_until_a_slot_frees() {
    bounded(async {
        let server = start(Limits {
            max_connections: 4,
            ..patient()
        })
        .await;
        // Four connections take every slot (served: each answered once).
        let mut held = Vec::new();
        for _ in 0..4 {
            let (mut sender, connection) = connect(server.addr).await;
            let response = sender.send_request(request("/")).await.expect("response");
            response.into_body().collect().await.expect("body");
            held.push((sender, connection));
        }
        assert!(server.recorder.at_capacity.load(Ordering::SeqCst) >= 1);
        // A fifth waits in the backlog: no answer while the four stay.
        let fifth = tokio::spawn(get(server.addr, "/"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !fifth.is_finished(),
            "a fifth connection was served past the cap"
        );
        // One closes: the fifth is served.
        let (sender, connection) = held.pop().expect("a held connection");
        drop(sender);
        connection.await.expect("the connection task");
        let (status, _) = fifth.await.expect("the fifth client");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(server.recorder.most_open.load(Ordering::SeqCst), 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_clients_are_all_served_within_the_cap() {
    bounded(async {
        let server = start(Limits {
            max_connections: 16,
            ..patient()
        })
        .await;
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..300 {
            let addr = server.addr;
            clients.spawn(async move { get(addr, "/").await });
        }
        let mut served = 0;
        while let Some(answer) = clients.join_next().await {
            let (status, body) = answer.expect("a client");
            assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));
            served += 1;
        }
        assert_eq!(served, 300);
        let recorder = &server.recorder;
        let most = recorder.most_open.load(Ordering::SeqCst);
        assert!((1..=16).contains(&most), "{most} connections open at once");
        // Every slot comes back.
        let started = tokio::time::Instant::now();
        while recorder.open.load(Ordering::SeqCst) != 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "slots not freed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let opened = recorder
            .events()
            .iter()
            .filter(|e| matches!(e, Event::Opened(_)))
            .count();
        assert_eq!(opened, 300);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_at_once_and_finishes_in_flight_ones() {
    bounded(async {
        let mut server = start(patient()).await;
        // An idle keep-alive connection (its timeouts are 60 s).
        let mut idle = TcpStream::connect(server.addr).await.expect("connecting");
        idle.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .expect("a request");
        let mut answer = [0; 12];
        idle.read_exact(&mut answer).await.expect("the answer");
        assert_eq!(&answer, b"HTTP/1.1 200");
        // A request in flight.
        let (mut sender, _connection) = connect(server.addr).await;
        let holding = server.holding.notified();
        let in_flight = tokio::spawn(sender.send_request(request("/hold")));
        holding.await;

        let stop = server.stop.take().expect("not stopped yet");
        let _ = stop.send(());
        // The idle connection closes now, well before its 60 s timeouts.
        tokio::time::timeout(Duration::from_secs(20), closed(&mut idle))
            .await
            .expect("the idle connection stayed open after shutdown");
        assert!(!in_flight.is_finished());
        // The in-flight request still gets its answer, then the server finishes.
        server.release.notify_one();
        let response = in_flight.await.expect("the client").expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"released");
        server.shut_down().await;
        assert_eq!(server.recorder.open.load(Ordering::SeqCst), 0);
        // Nothing is accepted any more.
        let refused = match TcpStream::connect(server.addr).await {
            Err(_) => true,
            Ok(mut stream) => {
                let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
                closed(&mut stream).await
            }
        };
        assert!(refused);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_observer_hears_every_connection_and_hypers_own_answers() {
    bounded(async {
        let server = start(patient()).await;
        let addr = server.addr;
        let raw = |bytes: Vec<u8>| async move {
            let mut stream = TcpStream::connect(addr).await.expect("connecting");
            let local = stream.local_addr().expect("local address");
            let _ = stream.write_all(&bytes).await;
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            (local, String::from_utf8_lossy(&answer).into_owned())
        };
        let (garbage, answer) = raw(b"\x01\x02 not http\r\n\r\n".to_vec()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
        let mut huge = b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 80 * 1024));
        huge.extend(b"\r\n\r\n");
        let (too_large, answer) = raw(huge).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
        let (_, body) = get(server.addr, "/").await;
        assert_eq!(body, "hello");

        let started = tokio::time::Instant::now();
        while server.recorder.open.load(Ordering::SeqCst) != 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "connections not closed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let events = server.recorder.events();
        let of = |peer| {
            events
                .iter()
                .filter(|event| event_peer(event) == peer)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            of(garbage),
            [
                Event::Opened(garbage),
                Event::Refused(garbage, StatusCode::BAD_REQUEST),
                Event::Closed(garbage)
            ]
        );
        assert_eq!(
            of(too_large),
            [
                Event::Opened(too_large),
                Event::Refused(too_large, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
                Event::Closed(too_large)
            ]
        );
        assert_eq!(events.len(), 8, "{events:?}");
    })
    .await;
}

fn event_peer(event: &Event) -> SocketAddr {
    match event {
        Event::Opened(peer)
        | Event::Cut(peer, _)
        | Event::Refused(peer, _)
        | Event::Closed(peer) => *peer,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_carries_the_peer_address() {
    bounded(async {
        let server = start(patient()).await;
        let tcp = TcpStream::connect(server.addr).await.expect("connecting");
        let local = tcp.local_addr().expect("local address");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        for _ in 0..3 {
            sender.ready().await.expect("the connection");
            let response = sender
                .send_request(request("/peer"))
                .await
                .expect("response");
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(String::from_utf8_lossy(&body), format!("{:?}", Some(local)));
        }
    })
    .await;
}

#[tokio::test]
async fn binding_a_taken_address_is_a_typed_error() {
    let server = Server::bind(([127, 0, 0, 1], 0)).await.expect("binding");
    let addr = server.local_addr().expect("address");
    match Server::bind(addr).await {
        Err(backhaul::Error::Listen { addr: failed, .. }) => assert_eq!(failed, addr),
        other => panic!("expected Error::Listen, got {other:?}"),
    }
}

/// Over TLS, a client that trickles its handshake is held to the header timeout like a
/// slow request head, while clients that complete theirs are served (HTTP/1.1 over TLS),
/// and requests say they came over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_tls_handshake_is_cut_at_the_header_timeout() {
    bounded(async {
        let identity = backhaul::quic::Identity::self_signed(&["localhost"]).expect("certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
            .expect("server config");
        let recorder = Arc::new(Recorder::default());
        let service = tower::service_fn(|request: Request<Incoming>| async move {
            let secure = request
                .extensions()
                .get::<ConnectionInfo>()
                .is_some_and(ConnectionInfo::is_secure);
            Ok::<_, Infallible>(Response::new(full(format!("hello, secure: {secure}"))))
        });
        let server = Server::bind(([127, 0, 0, 1], 0))
            .await
            .expect("binding")
            .with_limits(Limits {
                header_timeout: Duration::from_secs(1),
                ..patient()
            })
            .with_observer(Arc::clone(&recorder))
            .with_tls(Arc::new(server_config));
        let addr = server.local_addr().expect("address");
        let task = tokio::spawn(server.serve(service).into_future());

        let mut trickling = tokio::task::JoinSet::new();
        for _ in 0..10 {
            trickling.spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connecting");
                // A TLS record header announcing a ClientHello, then a byte at a time.
                stream
                    .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
                    .await
                    .expect("first bytes");
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if stream.write_all(&[0x01]).await.is_err() {
                        return;
                    }
                    let mut byte = [0; 1];
                    let read = tokio::time::timeout(Duration::ZERO, stream.read(&mut byte)).await;
                    if matches!(read, Ok(Ok(0) | Err(_))) {
                        return;
                    }
                }
            });
        }

        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.cert_chain[0].clone()).expect("root");
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let started = tokio::time::Instant::now();
        let mut served = 0;
        while started.elapsed() < Duration::from_secs(2) {
            let tcp = TcpStream::connect(addr).await.expect("connecting");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let tls = connector.connect(name, tcp).await.expect("TLS handshake");
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("HTTP handshake");
            tokio::spawn(connection);
            let response = sender.send_request(request("/")).await.expect("response");
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(&body[..], b"hello, secure: true");
            served += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served > 0);
        while let Some(ended) = trickling.join_next().await {
            ended.expect("a trickling client");
        }
        assert_eq!(recorder.cuts(Cut::Header), 10, "{:?}", recorder.events());
        task.abort();
    })
    .await;
}

/// How reading an upgraded connection to its end went: the bytes, and whether it ended
/// cleanly (`None`) or with a read error.
async fn read_upgraded(addr: SocketAddr, path: &str) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let mut tcp = TcpStream::connect(addr).await.expect("connecting");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("request");
    let mut received = Vec::new();
    let mut buf = [0; 1024];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) => return (received, None),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(error) => return (received, Some(error.kind())),
        }
    }
}

#[tokio::test]
async fn a_connection_dropped_half_way_is_reset_and_one_shut_down_is_finished() {
    let server = start(patient()).await;
    let (received, failed) = bounded(read_upgraded(server.addr, "/upgrade-done")).await;
    assert!(received.ends_with(b"\r\n\r\npartial"), "{received:?}");
    assert_eq!(failed, None, "a connection shut down ends cleanly");
    // Dropped without a shutdown (a splice that failed, a task that was aborted): the
    // client must not take the bytes it got for everything there was.
    let (received, failed) = bounded(read_upgraded(server.addr, "/upgrade-cut")).await;
    assert!(received.ends_with(b"\r\n\r\npartial"), "{received:?}");
    assert_eq!(failed, Some(std::io::ErrorKind::ConnectionReset));
    // Plain requests still end with a graceful close.
    assert_eq!(get(server.addr, "/").await.1, "hello");
}
