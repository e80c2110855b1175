//! Flow control cannot take a tunnel down: streams whose reader stalls (a relay's public
//! client that stops reading a large response) must not block the control stream's
//! keep-alives or any other stream. Real quinn connections on 127.0.0.1.

mod support;

use std::time::{Duration, Instant};

use backhaul::{ClientEvent, Config, Metadata, QuinnConnection, SessionClient, State};
use support::{pattern, session_pair_with, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Streams the relay opens and never reads: together they could hold far more than any
/// connection-wide window worth having (the old 16 MiB one among them).
const STALLED_STREAMS: usize = 40;

/// Serves "flood" (writes a pattern seeded by the metadata until the stream fails) and
/// "hello" (a short answer).
fn serve_flood(edge: SessionClient<QuinnConnection>, mut events: mpsc::Receiver<ClientEvent>) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let ClientEvent::OpenRequest {
                request_id,
                service,
                metadata,
            } = event
            else {
                continue;
            };
            let edge = edge.clone();
            tokio::spawn(async move {
                let mut stream = edge.accept_stream(request_id).await.expect("accept");
                if service.as_str() == "flood" {
                    let Metadata::Bytes(seed) = metadata else {
                        panic!("flood wants a seed")
                    };
                    let chunk = pattern(&seed, 1024 * 1024);
                    while stream.write_all(&chunk).await.is_ok() {}
                } else {
                    let _ = stream.write_all(b"hello").await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_leave_keepalives_and_other_streams_flowing() {
    let keepalive = Config::new()
        .with_ping_interval(Duration::from_millis(200))
        .with_ping_timeout(Duration::from_secs(2));
    let pair = session_pair_with(keepalive.clone(), keepalive).await;
    serve_flood(pair.edge.clone(), pair.edge_events);

    // Open the floods and read nothing: each fills its stream window and stops there.
    let mut stalled = Vec::new();
    for index in 0..STALLED_STREAMS {
        let seed = Metadata::Bytes(format!("flood-{index}").into_bytes());
        let stream = within(Duration::from_secs(10), pair.relay.open("flood", seed))
            .await
            .expect("opening a flood");
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // For three seconds, pings and fresh streams keep crossing the connection promptly.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let round = Instant::now();
        within(Duration::from_secs(2), pair.relay.ping())
            .await
            .expect("ping while streams are stalled");
        let (_send, mut recv) = within(
            Duration::from_secs(2),
            pair.relay.open("hello", Metadata::Empty),
        )
        .await
        .expect("open while streams are stalled");
        let mut answer = Vec::new();
        within(Duration::from_secs(2), recv.read_to_end(&mut answer))
            .await
            .expect("reading the answer");
        assert_eq!(answer, b"hello");
        slowest = slowest.max(round.elapsed());
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{rounds} ping + open rounds beside {STALLED_STREAMS} stalled streams, slowest {slowest:?}"
    );
    assert_eq!(pair.relay.state(), State::Ready);
    assert_eq!(pair.edge.state(), State::Ready);

    // The stalled bytes were held, not lost: a stalled stream reads back intact.
    let (_send, recv) = &mut stalled[7];
    let expected = pattern(b"flood-7", 1024 * 1024);
    for _ in 0..4 {
        let mut chunk = vec![0; expected.len()];
        within(Duration::from_secs(10), recv.read_exact(&mut chunk))
            .await
            .expect("reading a stalled stream");
        assert!(chunk == expected, "a stalled stream's bytes changed");
    }
    pair.quic.close();
}
