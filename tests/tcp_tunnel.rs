//! Raw TCP through a tunnel: a public TCP port on the relay (`backhaul::tcp::TcpForward`)
//! reaching a TCP backend behind an edge (`backhaul::tcp::forward_to`), over real quinn
//! with TLS on 127.0.0.1 and real TCP sockets on both ends.

mod support;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backhaul::edge::Router;
use backhaul::relay::{EdgeName, Registry};
use backhaul::tcp::{self, ProxyHeader, Spliced, TcpFailure, TcpForward, TcpObserver};
use backhaul::{Config, Role, ServiceId, SessionClient};
use support::http::Checksum;
use support::{pattern, quic_pair, within, QuicPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(120);

/// Failures and clean closes a forwarder reported, by label.
#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<Vec<String>>>);

impl Recorded {
    fn labels(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    async fn wait_for(&self, label: &str) {
        within(Duration::from_secs(10), async {
            while !self.labels().iter().any(|seen| seen == label) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

impl TcpObserver for Recorded {
    fn closed(&self, edge: &str, service: &ServiceId, carried: Spliced) {
        assert_eq!((edge, service.as_str()), ("kiosk", "svc"));
        let _ = carried;
        self.0.lock().unwrap().push("closed".into());
    }

    fn failed(&self, edge: &str, service: &ServiceId, failure: &TcpFailure) {
        assert_eq!(service.as_str(), "svc");
        assert!(edge == "kiosk" || edge == "ghost");
        self.0.lock().unwrap().push(failure.label().into());
    }
}

/// A relay with a public TCP port forwarding to "svc" on the edge "kiosk", whose route
/// connects to `backend`.
struct Tunnel {
    public: SocketAddr,
    recorded: Recorded,
    quic: QuicPair,
    _attachment: backhaul::relay::Attachment,
    _serve: tokio::task::JoinHandle<()>,
}

async fn tunnel(route: tcp::TcpRoute) -> Tunnel {
    tunnel_to_edge(route, "kiosk").await
}

async fn tunnel_to_edge(route: tcp::TcpRoute, forwarded_edge: &str) -> Tunnel {
    tunnel_with(route, forwarded_edge, Stops::default()).await
}

/// Graceful shutdowns to wire in: the relay's forwarder and the edge's `Router` each stop
/// when their receiver fires, then give streams `DRAIN` before stopping them.
#[derive(Default)]
struct Stops {
    relay: Option<tokio::sync::oneshot::Receiver<()>>,
    edge: Option<tokio::sync::oneshot::Receiver<()>>,
}

const DRAIN: Duration = Duration::from_millis(300);

async fn tunnel_with(route: tcp::TcpRoute, forwarded_edge: &str, stops: Stops) -> Tunnel {
    let quic = quic_pair().await;
    let config = Config::new().with_max_concurrent_streams(2048);
    let (relay, edge) = tokio::join!(
        SessionClient::start(quic.relay.clone(), Role::Server, config.clone()),
        SessionClient::start(quic.edge.clone(), Role::Client, config),
    );
    let (relay, _) = relay.expect("relay session");
    let (edge, events) = edge.expect("edge session");
    let serving = Router::new().route("svc", route).serve(edge, events);
    tokio::spawn(match stops.edge {
        Some(stop) => serving
            .with_graceful_shutdown(async move {
                let _ = stop.await;
            })
            .with_drain_timeout(DRAIN)
            .into_future(),
        None => serving.into_future(),
    });

    let registry = Registry::new();
    let attachment = registry
        .attach(EdgeName::new("kiosk").unwrap(), relay)
        .await
        .expect("attach");
    // 500 connections at once: more than `TcpListener::bind`'s backlog of 128.
    let listener = backhaul::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let public = listener.local_addr().unwrap();
    let recorded = Recorded::default();
    let forward = TcpForward::new(listener, registry, forwarded_edge, "svc")
        .with_observer(recorded.clone())
        .with_drain_timeout(DRAIN)
        .serve();
    let forward = match stops.relay {
        Some(stop) => forward.with_graceful_shutdown(async move {
            let _ = stop.await;
        }),
        None => forward,
    };
    Tunnel {
        public,
        recorded,
        quic,
        _attachment: attachment,
        _serve: tokio::spawn(forward),
    }
}

/// A TCP backend on loopback running `handle` for each connection.
async fn backend<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = backhaul::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(stream));
        }
    });
    address
}

async fn echo_backend() -> SocketAddr {
    backend(|mut stream| async move {
        let (mut reader, mut writer) = stream.split();
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
        let _ = writer.shutdown().await;
    })
    .await
}

/// 64 MiB each way at once, checksummed at both ends; the client half-closes when done
/// sending while the backend is still sending, so half-close is exercised under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact() {
    within(LIMIT, async {
        const SIZE: usize = 64 * 1024 * 1024;
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let address = backend(move |stream| {
            let seen_tx = seen_tx.clone();
            async move {
                let (mut reader, mut writer) = stream.into_split();
                let send = async {
                    let block = pattern(b"down", 1024 * 1024);
                    for _ in 0..SIZE / block.len() {
                        writer.write_all(&block).await.expect("backend write");
                    }
                    writer.shutdown().await.expect("backend shutdown");
                };
                let receive = async {
                    let mut sum = Checksum::default();
                    let mut buffer = vec![0; 64 * 1024];
                    loop {
                        let read = reader.read(&mut buffer).await.expect("backend read");
                        if read == 0 {
                            break;
                        }
                        sum.update(&buffer[..read]);
                    }
                    sum
                };
                let ((), sum) = tokio::join!(send, receive);
                seen_tx.send(sum).unwrap();
            }
        })
        .await;
        let tunnel = tunnel(tcp::forward_to(address.to_string())).await;

        let client = TcpStream::connect(tunnel.public).await.unwrap();
        let (mut reader, mut writer) = client.into_split();
        let up_block = pattern(b"up", 1024 * 1024);
        let send = async {
            for _ in 0..SIZE / up_block.len() {
                writer.write_all(&up_block).await.expect("client write");
            }
            writer.shutdown().await.expect("client half-close");
        };
        let receive = async {
            let mut sum = Checksum::default();
            let mut buffer = vec![0; 64 * 1024];
            loop {
                let read = reader.read(&mut buffer).await.expect("client read");
                if read == 0 {
                    break;
                }
                sum.update(&buffer[..read]);
            }
            sum
        };
        let ((), down) = tokio::join!(send, receive);

        let mut expected_down = Checksum::default();
        let down_block = pattern(b"down", 1024 * 1024);
        let mut expected_up = Checksum::default();
        for _ in 0..SIZE / down_block.len() {
            expected_down.update(&down_block);
            expected_up.update(&up_block);
        }
        assert_eq!(down, expected_down, "backend → client");
        assert_eq!(
            seen_rx.recv().await.unwrap(),
            expected_up,
            "client → backend"
        );
        tunnel.recorded.wait_for("closed").await;
        assert_eq!(tunnel.recorded.labels(), ["closed"]);
    })
    .await;
}

/// The client sends a request and half-closes; the backend answers only after reading the
/// end, and the answer still reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_is_carried_both_ways() {
    within(LIMIT, async {
        let address = backend(|mut stream| async move {
            let mut request = Vec::new();
            stream.read_to_end(&mut request).await.expect("read to end");
            let answer = format!("got {} bytes after your FIN", request.len());
            stream.write_all(answer.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
        })
        .await;
        let tunnel = tunnel(tcp::forward_to(address.to_string())).await;
        let mut client = TcpStream::connect(tunnel.public).await.unwrap();
        client.write_all(&[9; 777]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "got 777 bytes after your FIN");
    })
    .await;
}

/// 500 connections at once, each echoing its own 16 KiB: every one gets its own bytes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_connections() {
    within(LIMIT, async {
        let tunnel = tunnel(tcp::forward_to(echo_backend().await.to_string())).await;
        let mut clients = tokio::task::JoinSet::new();
        for index in 0..500u32 {
            let public = tunnel.public;
            clients.spawn(async move {
                let data = pattern(&index.to_le_bytes(), 16 * 1024);
                let client = TcpStream::connect(public).await.expect("connect");
                let (mut reader, mut writer) = client.into_split();
                let write = async {
                    writer.write_all(&data).await.expect("write");
                    writer.shutdown().await.expect("half-close");
                };
                let mut echoed = Vec::new();
                let (_, read) = tokio::join!(write, reader.read_to_end(&mut echoed));
                read.expect("read echo");
                assert_eq!(Checksum::of(&echoed), Checksum::of(&data), "client {index}");
            });
        }
        while let Some(done) = clients.join_next().await {
            done.expect("client");
        }
        within(Duration::from_secs(10), async {
            while tunnel.recorded.labels().len() < 500 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(tunnel
            .recorded
            .labels()
            .iter()
            .all(|label| label == "closed"));
    })
    .await;
}

/// With PROXY protocol on, the backend first reads a v2 header naming the public client's
/// address and the relay's public port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_tells_the_backend_who_connected() {
    within(LIMIT, async {
        let address = backend(|mut stream| async move {
            let mut header = Vec::new();
            let parsed = loop {
                let mut byte = [0; 1];
                stream.read_exact(&mut byte).await.expect("header byte");
                header.push(byte[0]);
                if let Some(parsed) = ProxyHeader::parse(&header).expect("a PROXY v2 header") {
                    break parsed;
                }
            };
            let (
                ProxyHeader::Proxy {
                    source,
                    destination,
                },
                _,
            ) = parsed
            else {
                panic!("expected PROXY, got {parsed:?}");
            };
            let answer = format!("{source} {destination}");
            stream.write_all(answer.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
        })
        .await;
        let tunnel = tunnel(tcp::forward_to(address.to_string()).with_proxy_protocol(true)).await;
        let mut client = TcpStream::connect(tunnel.public).await.unwrap();
        let expected = format!("{} {}", client.local_addr().unwrap(), tunnel.public);
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, expected);
    })
    .await;
}

/// Reads until the connection ends; `Err` if it ended with a reset instead of a close.
async fn read_until_end(client: &mut TcpStream) -> std::io::Result<usize> {
    let mut total = 0;
    let mut buffer = vec![0; 64 * 1024];
    loop {
        match client.read(&mut buffer).await? {
            0 => return Ok(total),
            read => total += read,
        }
    }
}

/// A backend that refuses: the public connection is closed at once (reset, nothing
/// delivered), and the failure is reported as the backend's; the next good connection to
/// another tunnel still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_backend_closes_the_client_promptly() {
    within(LIMIT, async {
        let closed_port = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let tunnel = tunnel(tcp::forward_to(closed_port.to_string())).await;
        if let Ok(mut client) = TcpStream::connect(tunnel.public).await {
            let ended = within(Duration::from_secs(5), read_until_end(&mut client)).await;
            assert!(
                matches!(&ended, Err(_) | Ok(0)),
                "nothing may be delivered: {ended:?}"
            );
        }
        tunnel.recorded.wait_for("backend_unavailable").await;
    })
    .await;
}

/// An unknown edge: the client is cut at once and the failure says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_edge_closes_the_client_promptly() {
    within(LIMIT, async {
        let tunnel =
            tunnel_to_edge(tcp::forward_to(echo_backend().await.to_string()), "ghost").await;
        // The relay may reset the connection before `connect` even returns.
        if let Ok(mut client) = TcpStream::connect(tunnel.public).await {
            let ended = within(Duration::from_secs(5), read_until_end(&mut client)).await;
            assert!(matches!(&ended, Err(_) | Ok(0)), "{ended:?}");
        }
        tunnel.recorded.wait_for("edge_not_connected").await;
    })
    .await;
}

/// The edge vanishes mid-transfer: the client sees a reset, never a clean end that would
/// pass a truncated download off as complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_mid_stream_resets_the_client() {
    within(LIMIT, async {
        let address = backend(|mut stream| async move {
            let block = vec![5; 64 * 1024];
            while stream.write_all(&block).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let tunnel = tunnel(tcp::forward_to(address.to_string())).await;
        let mut client = TcpStream::connect(tunnel.public).await.unwrap();
        let mut buffer = vec![0; 64 * 1024];
        let mut received = 0;
        while received < 256 * 1024 {
            received += client.read(&mut buffer).await.expect("first bytes");
        }
        tunnel.quic.edge.close(0u32.into(), b"edge killed");
        let ended = within(Duration::from_secs(10), read_until_end(&mut client)).await;
        assert!(
            ended.is_err(),
            "the client must see a reset, got a clean end after {ended:?} more bytes"
        );
        tunnel.recorded.wait_for("tunnel_broken").await;
    })
    .await;
}

/// A backend that sends without end and reads what comes; reports how the upload ended:
/// `Ok(bytes)` for a clean end, `Err` for a reset.
async fn endless_backend() -> (
    SocketAddr,
    tokio::sync::mpsc::Receiver<std::io::Result<usize>>,
) {
    let (ended, endings) = tokio::sync::mpsc::channel(4);
    let address = backend(move |stream| {
        let ended = ended.clone();
        async move {
            let (mut reader, mut writer) = stream.into_split();
            // A socket reports a reset to one call only: if the writer meets it first,
            // the reader then reads an end. So the writer says when it failed.
            let write_failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writer_failed = std::sync::Arc::clone(&write_failed);
            tokio::spawn(async move {
                let block = vec![3; 16 * 1024];
                while writer.write_all(&block).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                writer_failed.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let mut buffer = vec![0; 64 * 1024];
            let mut total = 0;
            let ending = loop {
                match reader.read(&mut buffer).await {
                    Ok(0) if write_failed.load(std::sync::atomic::Ordering::SeqCst) => {
                        break Err(std::io::Error::other("reset (seen by the writer first)"))
                    }
                    Ok(0) => break Ok(total),
                    Ok(read) => total += read,
                    Err(error) => break Err(error),
                }
            };
            let _ = ended.send(ending).await;
        }
    })
    .await;
    (address, endings)
}

/// Starts a transfer both ways and waits until bytes crossed both ways; `stop` then stops
/// one side gracefully, whose drain times out with the transfer still running. Neither the
/// client nor the backend may see a clean end: the download and the upload were cut.
async fn a_drain_timeout_mid_transfer_resets_both_ends(stop_relay: bool) {
    let (address, mut endings) = endless_backend().await;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let stops = if stop_relay {
        Stops {
            relay: Some(stopped),
            edge: None,
        }
    } else {
        Stops {
            relay: None,
            edge: Some(stopped),
        }
    };
    let tunnel = tunnel_with(tcp::forward_to(address.to_string()), "kiosk", stops).await;
    let mut client = TcpStream::connect(tunnel.public).await.unwrap();
    client
        .write_all(&pattern(b"upload", 64 * 1024))
        .await
        .unwrap();
    let mut buffer = vec![0; 64 * 1024];
    let mut received = 0;
    while received < 64 * 1024 {
        received += client.read(&mut buffer).await.expect("first bytes");
    }
    stop.send(()).unwrap();
    let download = within(DRAIN * 20, read_until_end(&mut client)).await;
    assert!(
        download.is_err(),
        "the client must see a reset, got a clean end after {download:?} more bytes"
    );
    let upload = within(DRAIN * 20, endings.recv())
        .await
        .expect("backend ended");
    assert!(
        upload.is_err(),
        "the backend must see a reset, got a clean end after {upload:?} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_drain_timeout_mid_transfer_resets_client_and_backend() {
    within(LIMIT, a_drain_timeout_mid_transfer_resets_both_ends(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_drain_timeout_mid_transfer_resets_client_and_backend() {
    within(LIMIT, a_drain_timeout_mid_transfer_resets_both_ends(false)).await;
}

/// An edge routing "svc" to `backend` whose route reports, through the returned receiver,
/// each time a stream's splice ended; and the relay's session.
async fn edge_reporting_ends(
    backend: SocketAddr,
) -> (
    QuicPair,
    SessionClient,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    use tower::Service;
    let quic = quic_pair().await;
    let config = Config::new();
    let (relay, edge) = tokio::join!(
        SessionClient::start(quic.relay.clone(), Role::Server, config.clone()),
        SessionClient::start(quic.edge.clone(), Role::Client, config),
    );
    let (relay, _) = relay.expect("relay session");
    let (edge, events) = edge.expect("edge session");
    let (ended, ends) = tokio::sync::mpsc::unbounded_channel();
    let route = tcp::forward_to(backend.to_string());
    let reporting = tower::service_fn(move |stream: backhaul::stream::TunnelStream| {
        let mut route = route.clone();
        let ended = ended.clone();
        async move {
            let spliced = route.call(stream).await;
            let _ = ended.send(());
            spliced
        }
    });
    tokio::spawn(
        Router::new()
            .route("svc", reporting)
            .serve(edge, events)
            .into_future(),
    );
    (quic, relay, ends)
}

/// A backend that greets, reads until the edge half-closes, and then neither sends nor
/// closes (as some servers hold an idle connection until their own timeout).
async fn silent_after_greeting() -> SocketAddr {
    backend(|mut stream| async move {
        stream.write_all(b"hello").await.expect("greeting");
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
    })
    .await
}

/// Once the relay has finished a stream and stopped reading it, the edge's splice ends and
/// lets the backend connection go, though the backend neither sends nor closes; while the
/// relay still reads, a half-closed stream keeps its backend (an answer may follow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_relay_is_done_with_lets_a_silent_backend_go() {
    within(LIMIT, async {
        let (_quic, relay, mut ends) = edge_reporting_ends(silent_after_greeting().await).await;
        for done_with_it in [false, true] {
            let (mut send, mut recv) = relay
                .open("svc", backhaul::Metadata::Empty)
                .await
                .expect("open");
            let mut greeting = [0u8; 6];
            recv.read_exact(&mut greeting).await.expect("the greeting");
            assert_eq!(&greeting, b"\0hello", "the status byte, then the greeting");
            send.shutdown().await.expect("finish");
            if done_with_it {
                // Stop reading: the edge's splice ends at once.
                drop(recv);
                within(Duration::from_secs(10), ends.recv())
                    .await
                    .expect("the splice ended");
            } else {
                // Still reading: the backend is kept for the answer that may come.
                let kept = tokio::time::timeout(Duration::from_millis(500), ends.recv()).await;
                assert!(kept.is_err(), "a half-closed stream lost its backend");
                drop(recv);
                within(Duration::from_secs(10), ends.recv())
                    .await
                    .expect("the splice ended once the relay stopped reading");
            }
        }
    })
    .await;
}
