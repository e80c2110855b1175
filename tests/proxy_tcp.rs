//! Raw TCP through the reverse proxy example: the relay's `--tcp PORT=EDGE/SERVICE` and the
//! edge's `--expose NAME=tcp://HOST:PORT`, as separate processes on loopback, with a TCP
//! backend in the test process.

mod support;

use std::time::Duration;

use support::http::Checksum;
use support::proxy::{echo_backend, echo_round, free_tcp_addr, Relay, TempDir};
use support::{pattern, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(90);

/// 8 MiB echoed through relay and edge processes, checksummed; 100 connections at once;
/// a PROXY v2 header naming the client; a backend that is gone cuts the client at once and
/// is counted by outcome in the relay's metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_ports_reach_edge_services() {
    within(LIMIT, async {
        let dir = TempDir::new("tcp");
        let echo = echo_backend(false).await;
        let proxied = echo_backend(true).await;
        let gone = free_tcp_addr();
        let ports = [free_tcp_addr(), free_tcp_addr(), free_tcp_addr()];
        let tcp_args: Vec<String> = [
            format!("{}=kiosk/echo", ports[0]),
            format!("{}=kiosk/who", ports[1]),
            format!("{}=kiosk/gone", ports[2]),
        ]
        .into_iter()
        .flat_map(|spec| ["--tcp".to_owned(), spec])
        .collect();
        let tcp_args: Vec<&str> = tcp_args.iter().map(String::as_str).collect();
        let mut relay = Relay::start(dir.path(), &[("kiosk", "secret")], &tcp_args).await;
        let echo_expose = format!("echo=tcp://{echo}");
        let who_expose = format!("who=tcp://{proxied}");
        let gone_expose = format!("gone=tcp://{gone}");
        let _edge = relay.spawn_edge(
            "kiosk",
            "secret",
            &[],
            &[
                "--expose",
                &echo_expose,
                "--expose",
                &who_expose,
                "--expose",
                &gone_expose,
                "--proxy-protocol",
                "who",
            ],
        );
        relay.wait_edges(1).await;

        let data = pattern(b"tcp", 8 * 1024 * 1024);
        let echoed = echo_round(ports[0], &data).await;
        assert_eq!(Checksum::of(&echoed), Checksum::of(&data), "8 MiB echo");

        let mut clients = tokio::task::JoinSet::new();
        for index in 0..100u32 {
            let public = ports[0];
            clients.spawn(async move {
                let data = pattern(&index.to_le_bytes(), 4096);
                let echoed = echo_round(public, &data).await;
                assert_eq!(Checksum::of(&echoed), Checksum::of(&data), "client {index}");
            });
        }
        while let Some(done) = clients.join_next().await {
            done.expect("client");
        }

        let mut who = TcpStream::connect(ports[1]).await.unwrap();
        let me = who.local_addr().unwrap();
        who.shutdown().await.unwrap();
        let mut answer = String::new();
        who.read_to_string(&mut answer).await.unwrap();
        assert_eq!(
            answer,
            format!("{me}\n"),
            "the backend sees the client's address"
        );

        // Nothing listens behind "gone": the client is cut without a byte.
        if let Ok(mut client) = TcpStream::connect(ports[2]).await {
            let mut rest = Vec::new();
            let ended = within(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
            assert!(rest.is_empty(), "{} bytes from a dead backend", rest.len());
            let _ = ended;
        }
        // The relay counts a connection when its splice has ended, which may be a moment
        // after the client saw the last byte: wait (bounded) for both counts to arrive.
        let count = |scrape: &support::proxy::Scrape, service: &str, outcome: &str| {
            scrape.sample(
                "backhaul_tcp_connections_total",
                &[
                    ("edge", "kiosk"),
                    ("service", service),
                    ("outcome", outcome),
                ],
            )
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (closed, unavailable) = loop {
            let scrape = relay.metrics().await;
            let closed = count(&scrape, "echo", "closed");
            let unavailable = count(&scrape, "gone", "backend_unavailable");
            let settled = closed == Some(101.0) && unavailable == Some(1.0);
            if settled || std::time::Instant::now() > deadline {
                break (closed, unavailable);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(unavailable, Some(1.0));
        assert_eq!(closed, Some(101.0));
    })
    .await;
}
