//! The peer's stream limit starts small and grows with use, over real quinn on 127.0.0.1.
//!
//! A tunnel connection starts by letting the peer open `INITIAL_STREAMS` streams (quinn
//! sets aside state for each), and `QuinnConnection` doubles that whenever three quarters
//! are open. These tests open far more streams at once than the start allows and check
//! that every open completes, that the limit grew as far as needed and no further, and
//! that a limit at its maximum still serves every open in turn as streams close.

mod support;

use std::time::Duration;

use backhaul::quic::{DEFAULT_MAX_STREAMS, INITIAL_STREAMS};
use backhaul::transport::StreamLimit;
use backhaul::{Config, Metadata, QuinnConnection, Role, Session, SessionClient};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

/// Opens `count` streams to `service` at once and returns them all, failing the test if
/// any open fails.
async fn open_at_once(
    relay: &SessionClient<QuinnConnection>,
    service: &'static str,
    count: usize,
) -> Vec<(backhaul::QuinnSendStream, backhaul::QuinnRecvStream)> {
    let mut opens = JoinSet::new();
    for i in 0..count {
        let relay = relay.clone();
        opens.spawn(async move {
            relay
                .open(service, Metadata::Empty)
                .await
                .unwrap_or_else(|error| panic!("open {i} failed: {error}"))
        });
    }
    let mut streams = Vec::with_capacity(count);
    while let Some(opened) = opens.join_next().await {
        streams.push(opened.expect("open task"));
    }
    streams
}

#[tokio::test]
async fn twelve_hundred_streams_open_at_once_on_a_limit_that_starts_at_sixty_four() {
    const OPENS: usize = 1200;
    let pair = session_pair_with(
        Config::new().with_max_inflight_opens(OPENS),
        Config::new().with_max_concurrent_streams(OPENS * 2),
    )
    .await;
    // The relay accepted one stream so far, the control stream.
    let start = pair.relay.connection().incoming_streams();
    assert_eq!((start.open, start.limit), (1, INITIAL_STREAMS));
    assert_eq!(start.max, DEFAULT_MAX_STREAMS);
    let _served = serve_test_services(pair.edge.clone(), pair.edge_events);

    // "hold" keeps each stream open until the relay finishes it, so all 1 200 data
    // streams (and the control stream) are open on the relay at once.
    let streams = within(
        Duration::from_secs(60),
        open_at_once(&pair.relay, "hold", OPENS),
    )
    .await;
    assert_eq!(streams.len(), OPENS);
    let grown = pair.relay.connection().incoming_streams();
    assert_eq!(grown.open as usize, OPENS + 1);
    // Doubled from 64 until under three quarters were open: 1 201 < 1 536 = ¾ × 2 048.
    assert_eq!(grown.limit, 2048);
    // The edge was opened no stream but the relay's (none): its limit did not move.
    assert_eq!(
        pair.edge.connection().incoming_streams().limit,
        INITIAL_STREAMS
    );
    assert_eq!(pair.relay.stats().refused_streams, 0);

    drop(streams);
    let after = pair.relay.connection().incoming_streams();
    assert_eq!(
        (after.open, after.limit),
        (1, 2048),
        "dropped streams are uncounted"
    );
}

/// Streams that end quickly free their slots: 400 echo round trips at once on a limit
/// that may grow only to 32 all complete, each waiting in turn for a slot.
#[tokio::test]
async fn opens_past_the_maximum_wait_for_closing_streams_and_all_complete() {
    const OPENS: usize = 400;
    let quic = quic_pair().await;
    let relay = Session::new(
        QuinnConnection::new(quic.relay.clone()).with_stream_limit(StreamLimit::new(4, 32)),
        Role::Server,
        Config::new().with_max_inflight_opens(OPENS),
    );
    let edge = Session::new(
        QuinnConnection::new(quic.edge.clone()),
        Role::Client,
        Config::new().with_max_concurrent_streams(OPENS * 2),
    );
    let (relay, edge) = tokio::join!(relay.start(), edge.start());
    let relay = SessionClient::new(relay.expect("relay negotiation"));
    let (edge, events) = SessionClient::with_events(edge.expect("edge negotiation"));
    assert_eq!(relay.connection().incoming_streams().limit, 4);
    let _served = serve_test_services(edge, events);

    let mut round_trips = JoinSet::new();
    for i in 0..OPENS {
        let relay = relay.clone();
        round_trips.spawn(async move {
            let (mut send, mut recv) = relay
                .open("echo", Metadata::Empty)
                .await
                .unwrap_or_else(|error| panic!("open {i} failed: {error}"));
            let message = format!("round trip {i}");
            send.write_all(message.as_bytes()).await.expect("write");
            send.shutdown().await.expect("finish");
            let mut echoed = String::new();
            recv.read_to_string(&mut echoed).await.expect("read");
            assert_eq!(echoed, message);
        });
    }
    within(Duration::from_secs(60), async {
        while let Some(done) = round_trips.join_next().await {
            done.expect("round trip");
        }
    })
    .await;
    let end = relay.connection().incoming_streams();
    assert_eq!((end.limit, end.max), (32, 32));
    assert_eq!(end.open, 1, "only the control stream is left");
}
