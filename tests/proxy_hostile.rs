//! The reverse proxy's public side under hostile and unlucky clients: clients that stop
//! reading, send heads a byte at a time, connect and say nothing, exhaust file descriptors,
//! or send garbage, while a well-behaved client keeps being served. The relay and edge run
//! as separate processes (the built example) on loopback; the hostile clients are raw TCP
//! sockets in the test.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::peer::{endpoint_from, hello_only, try_register, Attempt};
use support::proxy::{bounded, cpu_time, eventually, rss_kib, Backend, Public, Relay, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for any one test.
const LIMIT: Duration = Duration::from_secs(90);

/// A relay with one edge, "demo", exposing the test backend.
async fn relay_with_demo_edge(
    dir: &TempDir,
    relay_args: &[&str],
) -> (Relay, support::proxy::Proc, Backend) {
    let backend = Backend::start("demo-web").await;
    let mut relay = Relay::start(dir.path(), &[("demo", "demo-secret")], relay_args).await;
    let edge = relay.spawn_edge("demo", "demo-secret", &[("web", backend.addr)], &[]);
    relay.wait_edges(1).await;
    (relay, edge, backend)
}

/// Sends `head` on a fresh connection to the public listener.
async fn raw_request(addr: SocketAddr, head: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connecting");
    stream.write_all(head.as_bytes()).await.expect("sending");
    stream
}

/// True if the peer closes `stream` (EOF or reset) within `limit`; whatever it sent first
/// is read and dropped.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = vec![0; 64 * 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Reads until `needle` has arrived (a whole small response), or panics after 5 s.
async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let read = stream.read(&mut buf).await.expect("reading a response");
            assert!(
                read > 0,
                "closed before {needle:?}: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..read]);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no {needle:?} within 5 s: {:?}",
            String::from_utf8_lossy(&seen)
        )
    });
    String::from_utf8_lossy(&seen).into_owned()
}

/// A well-behaved client: a GET every `every` (or back to back if slower) for `duration`,
/// each with its own answer, every answer checked. Returns the latencies, sorted.
async fn well_behaved(public: &Public, duration: Duration, every: Duration) -> Vec<Duration> {
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut n = 0u64;
    while started.elapsed() < duration {
        n += 1;
        let sent = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            public.get("demo", &format!("/n/{n}")),
        )
        .await
        .unwrap_or_else(|_| panic!("request {n} got no answer within 10 s"));
        latencies.push(sent.elapsed());
        assert_eq!(
            answer,
            (StatusCode::OK, format!("reply {n}")),
            "request {n}"
        );
        tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
    }
    latencies.sort();
    latencies
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// Waits (at most 60 s) until no response bytes have flowed from edges for a second: every
/// slow reader's buffers are full.
async fn wait_until_stalled(relay: &Relay) {
    let flowed = || async {
        relay.metrics().await.get(
            "backhaul_proxied_bytes_total",
            &[("direction", "from_edge")],
        )
    };
    let started = Instant::now();
    let mut last = flowed().await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = flowed().await;
        if now == last {
            return;
        }
        last = now;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "responses kept flowing"
        );
    }
}

/// Clients that request 512 MiB and never read must neither starve other requests to the
/// same edge nor take the edge down; the relay's memory stays bounded, and the write
/// timeout cuts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_do_not_stall_the_edge() {
    bounded(LIMIT, async {
        const SLOW_READERS: usize = 100;
        let dir = TempDir::new("slow-readers");
        let (relay, _edge, _backend) = relay_with_demo_edge(&dir, &["--write-timeout", "6s"]).await;
        let baseline = rss_kib(relay.proc.id());
        let head = format!(
            "GET /download/536870912 HTTP/1.1\r\nHost: {}\r\n\r\n",
            relay.host("demo")
        );
        let mut stalled = Vec::new();
        for _ in 0..SLOW_READERS {
            stalled.push(raw_request(relay.spec.http, &head).await);
        }
        // Their responses flow until the clients' socket buffers and the tunnel's stream
        // windows are full (hundreds of MiB on loopback, seconds of CPU on a small
        // machine); then the relay goes quiet.
        let filling = Instant::now();
        wait_until_stalled(&relay).await;
        eprintln!("stalled after {:?}", filling.elapsed());

        let latencies = well_behaved(&relay.public(), Duration::from_secs(3), Duration::from_millis(10)).await;
        let peak = rss_kib(relay.proc.id());
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        eprintln!(
            "{} requests beside {SLOW_READERS} stalled 512 MiB downloads: p50 {p50:?}, p99 {p99:?}; \
             relay RSS {baseline} KiB before, {peak} KiB while stalled",
            latencies.len()
        );
        assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
        // The stated bound: 1.5 MiB per stalled response (1 MiB stream window plus hyper's
        // and the pipe's buffers) over the baseline.
        let bound = baseline + SLOW_READERS as u64 * 1536;
        assert!(peak < bound, "relay RSS {peak} KiB over the bound {bound} KiB");
        assert_eq!(relay.edges().await, Some(1), "the edge was dropped");
        // The log is written behind the events: first wait for the access line of the last
        // well-behaved request, so that what was logged before it is in the file.
        let last = format!("path=\"/n/{}\"", latencies.len());
        relay
            .proc
            .wait_for_log("the last well-behaved request", |log| {
                log.lines()
                    .any(|line| line.contains(&last) && line.contains(": request status="))
            })
            .await;
        assert!(
            !relay.proc.stderr().contains("keep-alive") && !relay.proc.stdout().contains("keep-alive"),
            "keep-alives failed:\n{}",
            relay.proc.logs()
        );

        // The write timeout cuts every stalled client.
        eventually(Duration::from_secs(30), "stalled clients cut", || async {
            let cut = relay
                .metrics()
                .await
                .get("backhaul_connections_cut_total", &[("reason", "write_timeout")]);
            (cut >= SLOW_READERS as f64).then_some(())
        })
        .await;
        for (index, stream) in stalled.iter_mut().enumerate() {
            let mut drained = 0usize;
            let mut buf = vec![0; 64 * 1024];
            let closed = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => drained += read,
                    }
                }
            })
            .await;
            assert!(
                closed.is_ok(),
                "stalled client {index} was not cut ({drained} bytes drained in 10 s)"
            );
        }
        eprintln!("relay RSS {} KiB after the cut", rss_kib(relay.proc.id()));
        assert_eq!(relay.edges().await, Some(1));
        assert_eq!(relay.public().get("demo", "/n/1").await.0, StatusCode::OK);
    })
    .await;
}

/// Heads sent a byte at a time and connections that say nothing are cut after the header
/// timeout; kept-alive connections idle until the idle timeout; requests keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_connections_are_cut() {
    bounded(LIMIT, async {
        const SLOWLORIS: usize = 200;
        const SILENT: usize = 300;
        let dir = TempDir::new("slowloris");
        let (relay, _edge, _backend) =
            // The relay runs on shards: every connection below is peeked for its host
            // first, within these placement limits, before the header timeout applies.
            relay_with_demo_edge(
                &dir,
                &[
                    "--header-timeout",
                    "2s",
                    "--idle-timeout",
                    "5s",
                    "--placement-patience",
                    "100ms",
                    "--placement-peek-bytes",
                    "2048",
                ],
            )
            .await;
        let addr = relay.spec.http;
        let host = relay.host("demo");
        let started = Instant::now();

        // Slowloris: a header line every 300 ms, never the blank line that ends the head.
        let mut slowloris = tokio::task::JoinSet::new();
        for _ in 0..SLOWLORIS {
            let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n");
            slowloris.spawn(async move {
                let mut stream = raw_request(addr, &head).await;
                for _ in 0..100 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if stream.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        break;
                    }
                }
                // Held until the relay cut it.
                started.elapsed()
            });
        }
        let mut silent = Vec::new();
        for _ in 0..SILENT {
            silent.push(TcpStream::connect(addr).await.expect("connecting"));
        }
        // A kept-alive connection: one request answered, then idle.
        let mut kept =
            raw_request(addr, &format!("GET /n/7 HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
        read_until(&mut kept, "reply 7").await;
        let kept_idle_from = Instant::now();

        let latencies = well_behaved(
            &relay.public(),
            Duration::from_secs(4),
            Duration::from_millis(10),
        )
        .await;
        eprintln!(
            "{} requests beside {SLOWLORIS} slowloris and {SILENT} silent connections: p99 {:?}",
            latencies.len(),
            percentile(&latencies, 0.99)
        );
        for stream in &mut silent {
            assert!(
                closed_within(stream, Duration::from_secs(5)).await,
                "a silent connection survived"
            );
        }
        while let Some(held) = slowloris.join_next().await {
            let held = held.expect("a slowloris task");
            assert!(
                held < Duration::from_secs(15),
                "a slowloris connection lived {held:?}"
            );
        }
        // Past the header timeout but within the idle timeout, the kept-alive one is open…
        let mut probe = [0u8; 1];
        tokio::time::sleep(Duration::from_secs(3).saturating_sub(kept_idle_from.elapsed())).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), kept.read(&mut probe))
                .await
                .is_err(),
            "the kept-alive connection was closed before its idle timeout"
        );
        // …and it is closed after the idle timeout.
        assert!(closed_within(&mut kept, Duration::from_secs(10)).await);
        assert!(kept_idle_from.elapsed() >= Duration::from_millis(4500));

        let scrape = relay.metrics().await;
        let header_cuts = scrape.get(
            "backhaul_connections_cut_total",
            &[("reason", "header_timeout")],
        );
        let idle_cuts = scrape.get(
            "backhaul_connections_cut_total",
            &[("reason", "idle_timeout")],
        );
        assert!(
            header_cuts >= (SLOWLORIS + SILENT) as f64,
            "header cuts {header_cuts}"
        );
        assert!(idle_cuts >= 1.0, "idle cuts {idle_cuts}");
    })
    .await;
}

/// With few file descriptors, the relay caps public connections below the limit: the
/// admin listener keeps answering, nothing spins, and once the timeouts free slots the
/// public side serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_file_limit_does_not_stop_the_relay() {
    bounded(LIMIT, async {
        const SILENT: usize = 400;
        let dir = TempDir::new("fd-limit");
        let backend = Backend::start("demo-web").await;
        let mut relay = Relay::start_with_open_files(
            dir.path(),
            &[("demo", "demo-secret")],
            &["--header-timeout", "2s"],
            256,
        )
        .await;
        let _edge = relay.spawn_edge("demo", "demo-secret", &[("web", backend.addr)], &[]);
        relay.wait_edges(1).await;
        relay
            .proc
            .wait_for_output("the warning about the lowered cap", |logs| {
                logs.contains("allows fewer public connections")
            })
            .await;

        // More silent connections than the relay has descriptors.
        let mut silent = Vec::new();
        for _ in 0..SILENT {
            silent.push(
                TcpStream::connect(relay.spec.http)
                    .await
                    .expect("connecting"),
            );
        }
        let cpu_before = cpu_time(relay.proc.id());
        let window = Instant::now();
        for _ in 0..10 {
            assert!(
                relay.healthz().await.is_some(),
                "the admin listener stopped answering"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let busy = cpu_time(relay.proc.id()) - cpu_before;
        let share = busy.as_secs_f64() / window.elapsed().as_secs_f64();
        eprintln!(
            "relay CPU while {SILENT} silent connections wait: {:.0} %",
            share * 100.0
        );
        assert!(share < 0.5, "the relay spins: {:.0} % CPU", share * 100.0);

        // The header timeout frees slots; a real request gets through.
        let public = relay.public();
        let answer = eventually(Duration::from_secs(20), "a request through", || async {
            public.try_get("demo", "/n/3").await
        })
        .await;
        assert_eq!(answer, (StatusCode::OK, "reply 3".to_owned()));
        for stream in &mut silent {
            assert!(closed_within(stream, Duration::from_secs(20)).await);
        }
    })
    .await;
}

/// On SIGTERM, idle connections and half-sent requests are closed at once; a request in
/// flight finishes; the relay exits long before its shutdown timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_at_once() {
    bounded(LIMIT, async {
        let dir = TempDir::new("shutdown-idle");
        let (mut relay, _edge, _backend) =
            relay_with_demo_edge(&dir, &["--shutdown-timeout", "30s"]).await;
        let addr = relay.spec.http;
        let host = relay.host("demo");
        let mut half_sent = raw_request(addr, &format!("GET / HTTP/1.1\r\nHost: {host}\r\n")).await;
        let mut kept =
            raw_request(addr, &format!("GET /n/1 HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
        read_until(&mut kept, "reply 1").await;
        let public = relay.public();
        let slow = tokio::spawn(async move { public.get("demo", "/slow/1500").await });
        tokio::time::sleep(Duration::from_millis(300)).await;

        let signalled = Instant::now();
        relay.proc.terminate();
        assert!(
            closed_within(&mut half_sent, Duration::from_secs(1)).await,
            "a half-sent request held on"
        );
        assert!(
            closed_within(&mut kept, Duration::from_secs(1)).await,
            "an idle connection held on"
        );
        assert_eq!(
            slow.await.expect("the slow request"),
            (StatusCode::OK, "done".to_owned())
        );
        let status = relay.proc.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "relay exit: {status}");
        let took = signalled.elapsed();
        eprintln!("relay stopped {took:?} after SIGTERM");
        assert!(took < Duration::from_secs(10));
    })
    .await;
}

/// Requests hyper refuses by itself (an unparsable head, a head too large) are counted in
/// metrics and logged like any other answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_counted_and_logged() {
    bounded(LIMIT, async {
        let dir = TempDir::new("malformed");
        let (relay, _edge, _backend) = relay_with_demo_edge(&dir, &[]).await;
        let addr = relay.spec.http;

        let mut garbage = raw_request(addr, "GARBAGE\x01\x02 / HTTP/9\r\n\r\n").await;
        let answer = read_until(&mut garbage, "\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");

        let huge = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nX-Big: {}\r\n\r\n",
            relay.host("demo"),
            "a".repeat(100 * 1024)
        );
        let mut big = TcpStream::connect(addr).await.expect("connecting");
        // The relay may answer and close before it has read everything.
        let _ = big.write_all(huge.as_bytes()).await;
        let answer = read_until(&mut big, "\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

        // Each is counted when its connection ends, in whichever order the relay's tasks
        // get to them.
        let scrape = eventually(Duration::from_secs(10), "both counted", || async {
            let scrape = relay.metrics().await;
            let count = |code| scrape.get("backhaul_http_requests_total", &[("code", code)]);
            (count("431") >= 1.0 && count("400") >= 1.0).then_some(scrape)
        })
        .await;
        for code in ["400", "431"] {
            assert_eq!(
                scrape.get("backhaul_http_requests_total", &[("code", code)]),
                1.0,
                "{code}"
            );
        }
        // Wait for both lines, then check there are no more.
        let logs = relay
            .proc
            .wait_for_output("both refusals logged", |logs| {
                logs.matches("malformed request refused").count() >= 2
            })
            .await;
        assert_eq!(
            logs.matches("malformed request refused").count(),
            2,
            "{logs}"
        );
        // A well-behaved client is unaffected.
        assert_eq!(
            relay.public().get("demo", "/n/5").await,
            (StatusCode::OK, "reply 5".to_owned())
        );
    })
    .await;
}

/// An edge that has not registered can make the relay hold only a little unread data:
/// bytes on a stream the relay keeps (a valid `StreamBind` it has not claimed) stop once
/// the unregistered connection's window is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_peers_cannot_fill_the_relays_memory() {
    bounded(LIMIT, async {
        let dir = TempDir::new("unregistered-window");
        let relay = Relay::start(dir.path(), &[("demo", "demo-secret")], &[]).await;
        let endpoint = endpoint_from("127.0.0.3", &relay.cert);
        let (connection, _client) = hello_only(&endpoint, relay.spec.quic)
            .await
            .expect("a Hello-only session");
        let (mut send, _recv) = connection.open_bi().await.expect("opening a stream");
        send.write_all(&backhaul::protocol::StreamBind::new(999).encode())
            .await
            .expect("the header");
        let chunk = vec![0x5a; 16 * 1024];
        let mut accepted = 0usize;
        while accepted < 8 * 1024 * 1024 {
            match tokio::time::timeout(Duration::from_secs(1), send.write_all(&chunk)).await {
                Ok(Ok(())) => accepted += chunk.len(),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        eprintln!("an unregistered peer got {} KiB accepted", accepted / 1024);
        assert!(accepted <= 128 * 1024, "{} KiB accepted", accepted / 1024);
    })
    .await;
}

/// Everything at once: slow readers, slowloris, silent and garbage TCP connections, garbage
/// datagrams on the QUIC port and a token guesser, while a well-behaved client sends a
/// request every 20 ms and checks every answer. Bounded loops, loopback only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_at_once_leave_a_steady_client_served() {
    bounded(LIMIT, async {
        const RUN: Duration = Duration::from_secs(8);
        let dir = TempDir::new("hostile");
        let (relay, _edge, _backend) = relay_with_demo_edge(
            &dir,
            &["--write-timeout", "3s", "--header-timeout", "2s", "--idle-timeout", "4s"],
        )
        .await;
        let http = relay.spec.http;
        let quic = relay.spec.quic;
        let host = relay.host("demo");
        let mut hostile = tokio::task::JoinSet::new();

        // 30 slow readers of 512 MiB each.
        let mut slow_readers = Vec::new();
        for _ in 0..30 {
            let head = format!("GET /download/536870912 HTTP/1.1\r\nHost: {host}\r\n\r\n");
            slow_readers.push(raw_request(http, &head).await);
        }
        // 100 slowloris heads, a header line every 300 ms, for the whole run.
        for _ in 0..100 {
            let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n");
            hostile.spawn(async move {
                let mut stream = raw_request(http, &head).await;
                let started = Instant::now();
                while started.elapsed() < RUN {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if stream.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        break;
                    }
                }
            });
        }
        // Garbage over TCP: bytes that are no HTTP at all, 50 connections in a loop.
        hostile.spawn(async move {
            let started = Instant::now();
            let mut noise = 0x2545_f491_4f6c_dd1d_u64;
            while started.elapsed() < RUN {
                let Ok(mut stream) = TcpStream::connect(http).await else { continue };
                let garbage: Vec<u8> = (0..4096)
                    .map(|_| {
                        noise ^= noise << 13;
                        noise ^= noise >> 7;
                        noise ^= noise << 17;
                        noise as u8
                    })
                    .collect();
                let _ = stream.write_all(&garbage).await;
                let _ = closed_within(&mut stream, Duration::from_secs(3)).await;
            }
        });
        // Garbage datagrams at the QUIC port.
        hostile.spawn(async move {
            let socket = tokio::net::UdpSocket::bind("127.0.0.4:0").await.expect("a UDP socket");
            let started = Instant::now();
            let mut sent = 0u32;
            while started.elapsed() < RUN {
                let datagram: Vec<u8> = (0..1200).map(|i| (i as u32 ^ sent) as u8).collect();
                let _ = socket.send_to(&datagram, quic).await;
                sent += 1;
                if sent % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        // A token guesser from another source, reconnecting whenever closed.
        let guesser_endpoint = endpoint_from("127.0.0.2", &relay.cert);
        let guesses = tokio::spawn(async move {
            let started = Instant::now();
            let mut answered = 0;
            while started.elapsed() < RUN {
                let (attempt, _connection) =
                    try_register(&guesser_endpoint, quic, "demo", "guess").await;
                if matches!(attempt, Attempt::Unauthorized(_)) {
                    answered += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answered
        });

        // The steady client: one request every 20 ms, every answer checked.
        let latencies = well_behaved(&relay.public(), RUN, Duration::from_millis(20)).await;
        let guesses = guesses.await.expect("the guesser");
        while hostile.join_next().await.is_some() {}
        eprintln!(
            "steady client: {} requests, p50 {:?}, p99 {:?}, max {:?}; guesser answered {guesses} times",
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies[latencies.len() - 1],
        );
        assert!(guesses <= 5, "{guesses} guesses answered");
        assert_eq!(relay.edges().await, Some(1), "the edge was dropped");
        let scrape = relay.metrics().await;
        let cut = |reason| scrape.get("backhaul_connections_cut_total", &[("reason", reason)]);
        assert!(cut("write_timeout") >= 30.0, "write cuts {}", cut("write_timeout"));
        assert!(cut("header_timeout") >= 100.0, "header cuts {}", cut("header_timeout"));
        for stream in &mut slow_readers {
            assert!(closed_within(stream, Duration::from_secs(10)).await);
        }
    })
    .await;
}

/// What one uploader saw: the answer's status line, and how many bytes it got out, and
/// for how long, after the answer, before the relay stopped taking them.
#[derive(Debug)]
struct Upload {
    status_line: String,
    sent_after_answer: u64,
    after_answer: Option<Duration>,
}

/// Posts a 1 GiB body to `/limited` (the service answers 413 at once) and keeps sending
/// `chunk` bytes every `every`, reading meanwhile, until the relay stops taking them or
/// `limit` passes.
async fn upload_past_an_early_answer(
    addr: SocketAddr,
    host: String,
    chunk: usize,
    every: Duration,
    limit: Duration,
) -> Upload {
    let stream = raw_request(
        addr,
        &format!("POST /limited HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1073741824\r\n\r\n"),
    )
    .await;
    let (mut reader, mut writer) = stream.into_split();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // When the answer came, and how much had been sent by then.
    let answered = std::sync::Arc::new(std::sync::Mutex::new(None::<(Instant, u64)>));
    let reading = {
        let answered = std::sync::Arc::clone(&answered);
        let sent = std::sync::Arc::clone(&sent);
        async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => {
                        seen.extend_from_slice(&buf[..read]);
                        if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            answered.lock().expect("the answer").get_or_insert_with(|| {
                                (
                                    Instant::now(),
                                    sent.load(std::sync::atomic::Ordering::SeqCst),
                                )
                            });
                        }
                    }
                }
            }
            let text = String::from_utf8_lossy(&seen).into_owned();
            text.lines().next().unwrap_or_default().to_owned()
        }
    };
    let writing = async {
        let bytes = vec![b'x'; chunk];
        let started = Instant::now();
        while started.elapsed() < limit {
            if writer.write_all(&bytes).await.is_err() {
                break;
            }
            sent.fetch_add(chunk as u64, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(every).await;
        }
        Instant::now()
    };
    let (status_line, stopped) = tokio::join!(reading, writing);
    let answer = *answered.lock().expect("the answer");
    let total = sent.load(std::sync::atomic::Ordering::SeqCst);
    Upload {
        status_line,
        sent_after_answer: answer.map_or(0, |(_, by_then)| total - by_then),
        after_answer: answer.map(|(at, _)| stopped.saturating_duration_since(at)),
    }
}

/// After a service answers before the end of an upload (a 413), the relay reads the rest
/// only within its linger bounds, then closes: a client sending fast is cut at
/// `--linger-bytes`, one sending slowly at `--linger-time`, each after reading its 413,
/// and a steady client is served meanwhile. On the express lane and on the full path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_past_an_early_answer_are_read_within_the_linger_bounds() {
    bounded(LIMIT, async {
        for way in ["lane", "full"] {
            // 20 fast senders (2 MiB/s each), bounded by bytes: 256 KiB with 60 s of time.
            // 20 slow ones (80 KiB/s each), bounded by time: 500 ms with 1 GiB of bytes.
            for (bound, chunk, every, linger_time, linger_bytes) in [
                (
                    "bytes",
                    32 * 1024,
                    Duration::from_millis(16),
                    "60s",
                    "256KiB",
                ),
                ("time", 4 * 1024, Duration::from_millis(50), "500ms", "1GiB"),
            ] {
                let dir = TempDir::new(&format!("linger-{way}-{bound}"));
                let mut args = vec!["--linger-time", linger_time, "--linger-bytes", linger_bytes];
                if way == "full" {
                    args.push("--no-express");
                }
                let (relay, _edge, _backend) = relay_with_demo_edge(&dir, &args).await;
                let mut uploads = tokio::task::JoinSet::new();
                for _ in 0..20 {
                    uploads.spawn(upload_past_an_early_answer(
                        relay.spec.http,
                        relay.host("demo"),
                        chunk,
                        every,
                        Duration::from_secs(30),
                    ));
                }
                let latencies = well_behaved(
                    &relay.public(),
                    Duration::from_secs(2),
                    Duration::from_millis(20),
                )
                .await;
                let mut most_sent = 0;
                let mut longest = Duration::ZERO;
                while let Some(upload) = uploads.join_next().await {
                    let upload = upload.expect("an uploader");
                    assert!(
                        upload.status_line.starts_with("HTTP/1.1 413"),
                        "{way}, {bound}: {upload:?}"
                    );
                    let after = upload.after_answer.expect("an answer");
                    most_sent = most_sent.max(upload.sent_after_answer);
                    longest = longest.max(after);
                    match bound {
                        // 256 KiB and what is on its way; 16 MiB by default, and on the
                        // full path 2 s of the edge's own reading on (4 MiB) before the
                        // relay cut the upload when the answer ended.
                        "bytes" => {
                            assert!(upload.sent_after_answer < 3 << 19, "{way}: {upload:?}");
                        }
                        // 30 s if nothing cut it.
                        _ => assert!(after < Duration::from_secs(5), "{way}: {upload:?}"),
                    }
                }
                eprintln!(
                    "{way}, {bound} bound: after the answer, most sent {most_sent} bytes, \
                     longest sending {longest:?}; steady client {} requests, p99 {:?}",
                    latencies.len(),
                    percentile(&latencies, 0.99)
                );
                assert_eq!(relay.edges().await, Some(1), "the edge was dropped");
            }
        }
    })
    .await;
}
