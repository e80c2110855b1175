//! Three relays of the reverse proxy example serving as one (`relay --redis`): processes
//! on loopback, one real redis-server, two edges each attached to one relay.
//!
//! What it proves: a request through any relay reaches any edge, whether the edge is
//! attached there or to another relay (large bodies both ways, the client's address, a
//! WebSocket); and when the relay an edge is attached to is SIGKILLed, the edge moves to
//! the next relay of its list and requests through the surviving relays succeed again
//! within a bound, every request meanwhile answered (never a hang); an edge attached to
//! two relays at once (`--attach-all`) stays reachable without a gap through the one that
//! survives. Also: a fourth edge; 64 MiB each way through a relay the edge is not attached
//! to; two different edge processes racing for one name on two relays end with exactly one
//! attachment; no directory entry of the killed relay outlives its lease; Redis SIGKILLed
//! and restarted: requests go on meanwhile and the directory is rebuilt from live
//! sessions. A TCP port of one relay (`--tcp`) reaches an edge attached to another, and
//! follows it when it fails over. Timings are printed.
#![cfg(feature = "redis")]

#[path = "support/redis.rs"]
mod redis_fixture;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use tokio_tungstenite::tungstenite::Message;

use redis_fixture::RedisServer;
use support::http::{checksum_body, Checksum, PatternBody};
use support::pattern;
use support::proxy::{
    bounded, boxed, echo_backend, echo_through, eventually, free_tcp_addr, free_udp_addr,
    write_cert_and_key, Backend, Proc, Public, Relay, TempDir,
};

/// Upper bound on the whole test (a loaded 2-core machine).
const LIMIT: Duration = Duration::from_secs(120);
/// The directory's lease: a SIGKILLed relay is forgotten within it.
const LEASE: &str = "3s";
/// Failover must complete within this (edge notices the loss within 2 keep-alives of 1 s,
/// tries the dead relay for --connect-timeout 2 s, registers on the next; the other
/// relays forget the dead one within the lease).
const FAILOVER_BOUND: Duration = Duration::from_secs(20);
/// Body size checked through every relay.
const BODY: u64 = 8 << 20;
const SECRET: &str = "cluster-secret-for-the-test";

fn relay_args(redis: &RedisServer, id: &str, peer: SocketAddr) -> Vec<String> {
    [
        "--redis",
        &redis.url(),
        "--relay-id",
        id,
        "--peer-listen",
        &peer.to_string(),
        "--cluster-secret",
        SECRET,
        "--cluster-lease",
        LEASE,
        "--keepalive",
        "1s",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect()
}

/// GET `path` on edge `label` through `public`: status and body, or `None` on no answer
/// within `limit`.
async fn try_get(
    public: &Public,
    label: &str,
    path: &str,
    limit: Duration,
) -> Option<(StatusCode, String)> {
    let request = public.request(
        Method::GET,
        &public.host(label),
        path,
        support::proxy::empty(),
    );
    let response = tokio::time::timeout(limit, public.client.request(request))
        .await
        .ok()?
        .ok()?;
    Some(support::proxy::text(response).await)
}

/// Median time of `n` GETs of `/whoami` on `label` through `public`.
async fn median_latency(public: &Public, label: &str, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let (status, body) = public.get(label, "/whoami").await;
        times.push(started.elapsed());
        assert_eq!((status, body.as_str()), (StatusCode::OK, label));
    }
    times.sort();
    times[n / 2]
}

/// `total` GETs to `label`, `concurrency` at a time: requests/s, p50 and p99.
async fn load(
    public: &Public,
    label: &str,
    total: usize,
    concurrency: usize,
) -> (f64, Duration, Duration) {
    let started = Instant::now();
    let mut times = Vec::with_capacity(total);
    let mut running = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < total || !running.is_empty() {
        while next < total && running.len() < concurrency {
            let public = public.clone();
            let label = label.to_owned();
            running.spawn(async move {
                let asked = Instant::now();
                let (status, body) = public.get(&label, "/whoami").await;
                assert_eq!((status, body.as_str()), (StatusCode::OK, label.as_str()));
                asked.elapsed()
            });
            next += 1;
        }
        if let Some(done) = running.join_next().await {
            times.push(done.expect("request"));
        }
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    times.sort();
    (rate, times[total / 2], times[total * 99 / 100])
}

/// Directory keys of attachments in Redis (`backhaul:edge:{name}:at:relay`), sorted.
fn attachment_keys(redis: &RedisServer) -> Vec<String> {
    let mut connection = redis.connection();
    let mut keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("backhaul:edge:*:at:*")
        .query(&mut connection)
        .expect("KEYS");
    keys.sort();
    keys
}

/// The attachment key of edge `name` on relay `relay`.
fn attachment(name: &str, relay: &str) -> String {
    format!("backhaul:edge:{{{name}}}:at:{relay}")
}

/// Waits until `check` holds for the directory's keys, or fails after `limit`.
async fn until_keys(
    redis: &RedisServer,
    limit: Duration,
    what: &str,
    check: impl Fn(&[String]) -> bool,
) {
    let started = Instant::now();
    loop {
        let keys = attachment_keys(redis);
        if check(&keys) {
            return;
        }
        assert!(started.elapsed() < limit, "{what}: keys now {keys:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A download and upload of `BODY` bytes through `public` to `label`, checksummed.
async fn check_bodies(public: &Public, label: &str) {
    check_bodies_of(public, label, BODY).await;
}

/// A download and upload of `size` bytes through `public` to `label`, checksummed.
async fn check_bodies_of(public: &Public, label: &str, size: u64) {
    let body = size;
    let request = public.request(
        Method::GET,
        &public.host(label),
        &format!("/download/{body}"),
        support::proxy::empty(),
    );
    let response = public.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let sum = checksum_body(response.into_body())
        .await
        .expect("the download body");
    assert_eq!(sum, PatternBody::checksum(body), "download from {label}");

    let request = public.request(
        Method::POST,
        &public.host(label),
        "/upload",
        boxed(PatternBody::new(body)),
    );
    let (status, answer) = support::proxy::text(public.send(request).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        answer,
        PatternBody::checksum(body).header(),
        "upload to {label}"
    );
}

async fn check_websocket(relay: &Relay, label: &str) {
    let tcp = tokio::net::TcpStream::connect(relay.spec.http)
        .await
        .expect("connecting to the relay");
    let url = format!("ws://{}/ws", relay.host(label));
    let (mut socket, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
        .await
        .expect("WebSocket handshake through the relay");
    socket.send(Message::text("across")).await.expect("send");
    let reply = socket.next().await.expect("a reply").expect("a message");
    assert_eq!(reply, Message::text("echo: across"));
}

/// Through `relay`'s TCP port for alpha's `echo` service (a PROXY v2 echo backend), with
/// alpha attached to relay `holder`: 8 MiB echoed intact after a half-close, the client's
/// address announced to the backend, the connection counted as closed.
async fn check_tcp(relay: &Relay, port: SocketAddr, holder: &str) {
    let labels = [
        ("edge", "alpha"),
        ("service", "echo"),
        ("outcome", "closed"),
    ];
    let before = relay
        .metrics()
        .await
        .get("backhaul_tcp_connections_total", &labels);
    let data = pattern(b"cluster-tcp", 8 << 20);
    let client = tokio::net::TcpStream::connect(port).await.expect("connect");
    let me = client.local_addr().expect("address");
    let echoed = echo_through(client, &data).await;
    let line = format!("{me}\n");
    assert!(
        echoed.starts_with(line.as_bytes()),
        "the backend names the client through {holder}: {:?}",
        String::from_utf8_lossy(&echoed[..echoed.len().min(64)])
    );
    assert_eq!(
        Checksum::of(&echoed[line.len()..]),
        Checksum::of(&data),
        "8 MiB echoed through a TCP port of a relay the edge is not attached to ({holder})"
    );
    eventually(
        Duration::from_secs(10),
        "the TCP connection counted",
        || async {
            let now = relay
                .metrics()
                .await
                .get("backhaul_tcp_connections_total", &labels);
            (now == before + 1.0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_on_one_redis_serve_as_one_and_survive_a_sigkill() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(LIMIT, async {
        let dir = TempDir::new("proxy-cluster");
        // One identity for every relay: each trusts its peers as itself.
        let (cert, key) = write_cert_and_key(dir.path());
        let tokens = [
            ("alpha", "alpha-token"),
            ("beta", "beta-token"),
            ("gamma", "gamma-token"),
            ("delta", "delta-token"),
            ("epsilon", "epsilon-token"),
        ];
        // r3 has a TCP port for alpha's "echo" service; alpha is attached to r1.
        let tcp_port = free_tcp_addr();
        let mut relays = Vec::new();
        for id in ["r1", "r2", "r3"] {
            let mut args = relay_args(&redis, id, free_udp_addr());
            if id == "r3" {
                args.extend(["--tcp".to_owned(), format!("{tcp_port}=alpha/echo")]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            relays.push(Relay::start_with_cert(dir.path(), &tokens, &cert, &key, &args).await);
        }
        let alpha_app = Backend::start("alpha").await;
        let beta_app = Backend::start("beta").await;
        let edge_args = ["--keepalive", "1s", "--connect-timeout", "2s", "--max-backoff", "1s"];
        // alpha on r1 (then r2), beta on r2 (then r3).
        let echo = echo_backend(true).await;
        let echo_expose = format!("echo=tcp://{echo}");
        let alpha_args = [
            &edge_args[..],
            &["--expose", &echo_expose, "--proxy-protocol", "echo"],
        ]
        .concat();
        let _alpha: Proc = relays[0].spawn_edge_with_fallbacks(
            &[relays[1].spec.quic],
            "alpha",
            "alpha-token",
            &[("web", alpha_app.addr)],
            &alpha_args,
        );
        let _beta: Proc = relays[1].spawn_edge_with_fallbacks(
            &[relays[2].spec.quic],
            "beta",
            "beta-token",
            &[("web", beta_app.addr)],
            &edge_args,
        );
        // gamma holds sessions to r1 and r3 at once (one process, one instance id).
        let gamma_app = Backend::start("gamma").await;
        let gamma_args = [&edge_args[..], &["--attach-all"]].concat();
        let _gamma: Proc = relays[0].spawn_edge_with_fallbacks(
            &[relays[2].spec.quic],
            "gamma",
            "gamma-token",
            &[("web", gamma_app.addr)],
            &gamma_args,
        );
        // delta on r3 (then r1).
        let delta_app = Backend::start("delta").await;
        let _delta: Proc = relays[2].spawn_edge_with_fallbacks(
            &[relays[0].spec.quic],
            "delta",
            "delta-token",
            &[("web", delta_app.addr)],
            &edge_args,
        );
        relays[0].wait_edges(2).await;
        relays[1].wait_edges(1).await;
        relays[2].wait_edges(2).await;

        // Two different edge processes race for "epsilon" on r2 and r3: one name, one
        // owner, cluster-wide.
        let epsilon_app = Backend::start("epsilon").await;
        let _epsilon_on_r2: Proc = relays[1].spawn_edge(
            "epsilon",
            "epsilon-token",
            &[("web", epsilon_app.addr)],
            &edge_args,
        );
        let _epsilon_on_r3: Proc = relays[2].spawn_edge(
            "epsilon",
            "epsilon-token",
            &[("web", epsilon_app.addr)],
            &edge_args,
        );
        until_keys(&redis, Duration::from_secs(15), "epsilon attached", |keys| {
            keys.iter().any(|key| key.contains("{epsilon}"))
        })
        .await;
        // Both keep trying for a while (the loser every second): still exactly one.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let epsilon: Vec<String> = attachment_keys(&redis)
            .into_iter()
            .filter(|key| key.contains("{epsilon}"))
            .collect();
        assert_eq!(epsilon.len(), 1, "two edges racing for one name: {epsilon:?}");
        println!("epsilon race won by {}", epsilon[0]);
        let publics: Vec<Public> = relays.iter().map(Relay::public).collect();

        // Every relay reaches every edge, local or not.
        for (r, public) in publics.iter().enumerate() {
            for label in ["alpha", "beta"] {
                let what = format!("{label} through r{}", r + 1);
                eventually(Duration::from_secs(15), &what, || async {
                    match try_get(public, label, "/whoami", Duration::from_secs(5)).await {
                        Some((StatusCode::OK, body)) if body == label => Some(()),
                        _ => None,
                    }
                })
                .await;
                check_bodies(public, label).await;
            }
        }
        // 64 MiB each way through a relay the edge is not attached to.
        check_bodies_of(&publics[2], "alpha", 64 << 20).await;
        // The client's address travels to an edge behind another relay.
        let (status, headers) = publics[2].get("alpha", "/headers").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers.contains("x-forwarded-for: 127.0.0.1"),
            "forwarding headers through a peer relay: {headers}"
        );
        check_websocket(&relays[2], "alpha").await;
        check_tcp(&relays[2], tcp_port, "r1").await;
        let forwarded = relays[2].metrics().await.get(
            "backhaul_requests_forwarded_total",
            &[("relay", "r1")],
        );
        assert!(forwarded >= 3.0, "r3 forwarded {forwarded} requests to r1");
        // Plain requests for an edge behind another relay take the express lane too.
        let express = "backhaul_http_express_requests_total";
        let before = relays[2].metrics().await.get(express, &[]);
        for _ in 0..10 {
            assert_eq!(
                publics[2].get("alpha", "/whoami").await,
                (StatusCode::OK, "alpha".to_owned())
            );
        }
        let after = relays[2].metrics().await.get(express, &[]);
        assert_eq!(after - before, 10.0, "r3's lane carried the requests to r1's edge");

        let local = median_latency(&publics[0], "alpha", 21).await;
        let forwarded = median_latency(&publics[2], "alpha", 21).await;
        println!("median GET latency to alpha: local (r1) {local:?}, through a peer (r3 -> r1) {forwarded:?}");
        for (way, public) in [("local (r1)", &publics[0]), ("through a peer (r3 -> r1)", &publics[2])] {
            let (rate, p50, p99) = load(public, "alpha", 600, 16).await;
            println!("alpha {way}: {rate:.0} requests/s, p50 {p50:?}, p99 {p99:?} (600 GETs, 16 at a time)");
        }

        // SIGKILL alpha's relay: alpha moves to r2; r2 and r3 reach it again.
        relays[0].proc.kill();
        let killed = Instant::now();
        // gamma is attached to r3 as well: no gap there.
        for _ in 0..5 {
            assert_eq!(
                publics[2].get("gamma", "/whoami").await,
                (StatusCode::OK, "gamma".to_owned())
            );
        }
        let mut slowest_answer = Duration::ZERO;
        let mut answers = 0;
        let mut meanwhile = std::collections::BTreeSet::new();
        for (r, public) in publics.iter().enumerate().skip(1) {
            loop {
                let asked = Instant::now();
                let answer = try_get(public, "alpha", "/whoami", Duration::from_secs(15)).await;
                let took = asked.elapsed();
                slowest_answer = slowest_answer.max(took);
                let Some((status, body)) = answer else {
                    panic!("r{}: no answer within 15 s during the failover", r + 1);
                };
                answers += 1;
                if status == StatusCode::OK && body == "alpha" {
                    break;
                }
                // Only the relay's own answers: the peer is gone, or alpha is not yet
                // attached anywhere.
                assert_eq!(status, StatusCode::BAD_GATEWAY, "r{}: {body}", r + 1);
                assert!(
                    body.contains("relay r1 is unreachable (cluster)")
                        || body.contains("is not connected"),
                    "r{}: {body}",
                    r + 1
                );
                meanwhile.insert(format!("r{}: {status} {body}", r + 1));
                assert!(
                    killed.elapsed() < FAILOVER_BOUND,
                    "alpha not reachable through r{} {FAILOVER_BOUND:?} after the kill: {status} {body}",
                    r + 1
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let failover = killed.elapsed();
        println!(
            "failover after SIGKILL of alpha's relay: {failover:?} until r2 and r3 both reach \
             alpha ({answers} requests meanwhile, slowest answer {slowest_answer:?})"
        );
        println!("answers during the failover: {meanwhile:#?}");
        until_keys(&redis, Duration::from_secs(10), "alpha attached to r2", |keys| {
            keys.contains(&attachment("alpha", "r2"))
        })
        .await;
        // No directory entry outlives the dead relay's lease.
        let lease_bound = Duration::from_secs(3 + 3);
        let remaining = lease_bound.saturating_sub(killed.elapsed());
        until_keys(&redis, remaining, "r1's entries past its lease", |keys| {
            !keys.iter().any(|key| key.ends_with(":at:r1"))
        })
        .await;
        println!("r1's directory entries gone {:?} after the kill", killed.elapsed());
        // r3's TCP port follows alpha to r2.
        check_tcp(&relays[2], tcp_port, "r2").await;
        for public in &publics[1..] {
            for label in ["alpha", "beta", "gamma", "delta"] {
                let what = format!("{label} after the failover");
                eventually(Duration::from_secs(10), &what, || async {
                    match try_get(public, label, "/whoami", Duration::from_secs(5)).await {
                        Some((StatusCode::OK, body)) if body == label => Some(()),
                        _ => None,
                    }
                })
                .await;
            }
        }

        // Redis SIGKILLed: the relays serve from their caches meanwhile.
        let mut redis = redis;
        redis.kill();
        for public in &publics[1..] {
            for label in ["alpha", "beta", "gamma", "delta"] {
                let answer = try_get(public, label, "/whoami", Duration::from_secs(10)).await;
                assert_eq!(
                    answer,
                    Some((StatusCode::OK, label.to_owned())),
                    "{label} while Redis is down"
                );
            }
        }
        // Restarted empty on the same port: every live attachment is published again.
        let restarted = Instant::now();
        redis.restart();
        let expected = [
            attachment("alpha", "r2"),
            attachment("beta", "r2"),
            attachment("gamma", "r3"),
            attachment("delta", "r3"),
        ];
        until_keys(&redis, Duration::from_secs(20), "directory rebuilt", |keys| {
            expected.iter().all(|key| keys.contains(key))
                && keys.iter().filter(|key| key.contains("{epsilon}")).count() == 1
        })
        .await;
        println!("directory rebuilt {:?} after Redis restarted", restarted.elapsed());
        for public in &publics[1..] {
            for label in ["alpha", "beta", "gamma", "delta"] {
                assert_eq!(
                    public.get(label, "/whoami").await,
                    (StatusCode::OK, label.to_owned())
                );
            }
        }
    })
    .await;
}
