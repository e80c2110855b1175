//! Session behaviour over real quinn connections on 127.0.0.1 with real TLS.

mod support;

use std::time::{Duration, Instant};

use backhaul::protocol::{encode_frame, Hello, HelloAck, ProtocolMessage};
use backhaul::{
    ClientEvent, CloseCode, Config, Connection, Error, Features, Metadata, QuinnConnection,
    RejectCode, Role, SendStream, Session, SessionClient, State, TimeoutKind,
};
use bytes::BytesMut;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(20);

async fn read_all(mut recv: backhaul::QuinnRecvStream) -> Vec<u8> {
    let mut out = Vec::new();
    recv.read_to_end(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn echo_round_trip_carries_every_byte() {
    let pair = session_pair().await;
    let _served = serve_test_services(pair.edge.clone(), pair.edge_events);
    let payload = pattern(b"echo", 256 * 1024);
    let (mut send, recv) = within(LIMIT, pair.relay.open("echo", Metadata::Empty))
        .await
        .expect("open");
    let writer = {
        let payload = payload.clone();
        tokio::spawn(async move {
            send.write_all(&payload).await.unwrap();
            send.finish().await.unwrap();
        })
    };
    let echoed = within(LIMIT, read_all(recv)).await;
    writer.await.unwrap();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echoed bytes differ");
}

#[tokio::test]
async fn one_shot_service_sees_the_metadata() {
    let pair = session_pair().await;
    let _served = serve_test_services(pair.edge.clone(), pair.edge_events);
    let (_send, recv) = within(
        LIMIT,
        pair.relay
            .open("hello", Metadata::Bytes(b"tenant-7".to_vec())),
    )
    .await
    .expect("open");
    assert_eq!(within(LIMIT, read_all(recv)).await, b"hello tenant-7");
}

#[tokio::test]
async fn unknown_service_is_rejected_with_code_and_reason() {
    let pair = session_pair().await;
    let _served = serve_test_services(pair.edge.clone(), pair.edge_events);
    let error = within(LIMIT, pair.relay.open("nope", Metadata::Empty))
        .await
        .expect_err("must be rejected");
    match error {
        Error::StreamRejected { code, reason } => {
            assert_eq!(code, RejectCode::UnsupportedService);
            assert_eq!(reason.as_deref(), Some("no service named nope"));
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(
        pair.relay.is_ready(),
        "a rejection leaves the session usable"
    );
}

#[tokio::test]
async fn ping_round_trips_both_ways() {
    let pair = session_pair().await;
    let served = serve_test_services(pair.edge.clone(), pair.edge_events);
    let rtt = within(LIMIT, pair.relay.ping()).await.expect("relay ping");
    assert!(rtt < Duration::from_secs(1));
    within(LIMIT, pair.edge.ping()).await.expect("edge ping");
    pair.relay.close(CloseCode::Normal, None).await.unwrap();
    let events = within(LIMIT, served).await.unwrap();
    assert!(
        events
            .iter()
            .any(|event| matches!(event, ClientEvent::PingReceived { .. })),
        "the edge saw the relay's ping: {events:?}"
    );
}

#[tokio::test]
async fn graceful_close_is_seen_as_closing() {
    let pair = session_pair().await;
    let served = serve_test_services(pair.edge.clone(), pair.edge_events);
    within(
        LIMIT,
        pair.relay
            .close(CloseCode::Normal, Some("maintenance".into())),
    )
    .await
    .expect("close");
    assert_eq!(pair.relay.state(), State::Closed);
    assert!(matches!(
        pair.relay.open("echo", Metadata::Empty).await,
        Err(Error::SessionClosed)
    ));
    let events = within(LIMIT, served).await.unwrap();
    assert!(events.iter().any(|event| matches!(
        event,
        ClientEvent::Closing { code: CloseCode::Normal, reason: Some(reason) } if reason == "maintenance"
    )));
    assert!(matches!(pair.edge.closed().await, Error::SessionClosed));
}

#[tokio::test]
async fn stream_close_is_seen_as_stream_closed() {
    let mut pair = session_pair().await;
    pair.relay
        .close_stream(5, CloseCode::Timeout, Some("idle".into()))
        .await
        .unwrap();
    let event = within(LIMIT, pair.edge_events.recv()).await.expect("event");
    assert!(matches!(
        event,
        ClientEvent::StreamClosed {
            logical_stream_id: 5,
            code: CloseCode::Timeout
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_opens_each_get_their_own_bytes() {
    let relay_config = Config::new().with_max_inflight_opens(1000);
    let pair = session_pair_with(relay_config, Config::new()).await;
    let _served = serve_test_services(pair.edge.clone(), pair.edge_events);
    let opens = (0..500u32).map(|i| {
        let relay = pair.relay.clone();
        tokio::spawn(async move {
            let seed = i.to_be_bytes().to_vec();
            let (_send, recv) = relay
                .open("payload", Metadata::Bytes(seed.clone()))
                .await
                .unwrap_or_else(|error| panic!("open {i} failed: {error}"));
            let bytes = read_all(recv).await;
            assert!(
                bytes == pattern(&seed, 8 * 1024),
                "open {i} got another open's bytes"
            );
        })
    });
    let opens: Vec<_> = opens.collect();
    within(Duration::from_secs(60), async {
        for open in opens {
            open.await.expect("open task");
        }
    })
    .await;
    assert_eq!(pair.relay.stats().refused_streams, 0);
}

#[tokio::test]
async fn lost_connection_fails_fifty_waiting_opens_within_a_second() {
    let mut pair = session_pair().await;
    let waiting: Vec<_> = (0..50)
        .map(|_| {
            let relay = pair.relay.clone();
            tokio::spawn(async move { relay.open("echo", Metadata::Empty).await })
        })
        .collect();
    // The edge sees every request but never answers.
    for _ in 0..50 {
        within(LIMIT, pair.edge_events.recv())
            .await
            .expect("request");
    }
    let started = Instant::now();
    pair.quic.edge.close(0u32.into(), b"pulled the plug");
    for open in waiting {
        let result = within(Duration::from_secs(1), open).await.unwrap();
        assert!(matches!(result, Err(Error::Disconnected)), "got {result:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(pair.relay.state(), State::Disconnected);
}

#[tokio::test]
async fn open_times_out_when_the_peer_never_answers() {
    let relay_config = Config::new().with_open_timeout(Duration::from_millis(300));
    let pair = session_pair_with(relay_config, Config::new()).await;
    let _events = pair.edge_events; // held, never answered
    let result = within(LIMIT, pair.relay.open("echo", Metadata::Empty)).await;
    assert!(
        matches!(result, Err(Error::Timeout(TimeoutKind::OpenRequest))),
        "got {result:?}"
    );
    assert_eq!(
        pair.relay.stats().pending_opens,
        0,
        "the timed-out open left nothing behind"
    );
}

#[tokio::test]
async fn local_open_past_max_inflight_fails_at_once() {
    let relay_config = Config::new().with_max_inflight_opens(2);
    let pair = session_pair_with(relay_config, Config::new()).await;
    let _events = pair.edge_events;
    let first = tokio::spawn({
        let relay = pair.relay.clone();
        async move { relay.open("echo", Metadata::Empty).await }
    });
    let second = tokio::spawn({
        let relay = pair.relay.clone();
        async move { relay.open("echo", Metadata::Empty).await }
    });
    while pair.relay.stats().pending_opens < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let third = within(
        Duration::from_millis(100),
        pair.relay.open("echo", Metadata::Empty),
    )
    .await;
    assert!(
        matches!(third, Err(Error::CapacityExceeded { limit: 2, .. })),
        "got {third:?}"
    );
    first.abort();
    second.abort();
}

#[tokio::test]
async fn request_past_the_acceptors_limit_is_rejected() {
    let edge_config = Config::new().with_max_concurrent_streams(2);
    let pair = session_pair_with(Config::new(), edge_config).await;
    let mut events = pair.edge_events;
    // Two requests the edge has not answered yet fill its limit.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let relay = pair.relay.clone();
            tokio::spawn(async move { relay.open("hold", Metadata::Empty).await })
        })
        .collect();
    let mut requests = Vec::new();
    for _ in 0..2 {
        match within(LIMIT, events.recv()).await {
            Some(ClientEvent::OpenRequest { request_id, .. }) => requests.push(request_id),
            other => panic!("expected a request, got {other:?}"),
        }
    }
    let third = within(LIMIT, pair.relay.open("hold", Metadata::Empty)).await;
    match third {
        Err(Error::StreamRejected {
            code: RejectCode::LimitExceeded,
            reason,
        }) => {
            assert_eq!(
                reason.as_deref(),
                Some("too many concurrent streams (limit 2)")
            );
        }
        other => panic!("got {other:?}"),
    }
    // Answering one frees its slot.
    pair.edge
        .reject_open(requests[0], RejectCode::ServiceUnavailable, None)
        .await
        .unwrap();
    let fourth = tokio::spawn({
        let relay = pair.relay.clone();
        async move { relay.open("hold", Metadata::Empty).await }
    });
    assert!(matches!(
        within(LIMIT, events.recv()).await,
        Some(ClientEvent::OpenRequest { .. })
    ));
    assert_eq!(pair.edge.stats().active_streams, 2);
    fourth.abort();
    for open in waiting {
        open.abort();
    }
}

#[tokio::test]
async fn streams_served_by_hand_free_their_slot_once_bound() {
    let edge_config = Config::new().with_max_concurrent_streams(2);
    let pair = session_pair_with(Config::new(), edge_config).await;
    let _served = serve_test_services(pair.edge.clone(), pair.edge_events);
    // Many more long-lived streams than the limit: each slot is freed at bind time.
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(
            within(LIMIT, pair.relay.open("hold", Metadata::Empty))
                .await
                .unwrap(),
        );
    }
    assert_eq!(held.len(), 10);
}

#[tokio::test]
async fn data_stream_that_overtakes_its_response_is_held_for_its_open() {
    let mut pair = session_pair().await;
    let relay = pair.relay.clone();
    let open = tokio::spawn(async move { relay.open("early", Metadata::Empty).await });
    let (request_id, ..) = next_open_request(&mut pair.edge_events).await;
    // Bind and write before answering, so the stream surely arrives first.
    let (mut send, _recv) = pair.edge.connection().open_bi().await.unwrap();
    pair.edge.bind_stream(&mut send, 77).await.unwrap();
    send.write_all(b"early bytes").await.unwrap();
    send.finish().await.unwrap();
    while pair.relay.stats().early_streams == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pair.edge.accept_open(request_id, 77).await.unwrap();
    let (_send, recv) = within(LIMIT, open).await.unwrap().expect("open");
    assert_eq!(read_all(recv).await, b"early bytes");
}

#[tokio::test]
async fn wrong_stream_bind_magic_is_refused_and_the_session_goes_on() {
    let relay_config = Config::new().with_stream_bind_timeout(Duration::from_millis(400));
    let mut pair = session_pair_with(relay_config, Config::new()).await;
    let relay = pair.relay.clone();
    let open = tokio::spawn(async move { relay.open("echo", Metadata::Empty).await });
    let (request_id, ..) = next_open_request(&mut pair.edge_events).await;
    let id = pair.edge.allocate_stream_id();
    pair.edge.accept_open(request_id, id).await.unwrap();
    let (mut send, _recv) = pair.edge.connection().open_bi().await.unwrap();
    send.write_all(b"XXXX\x01\0\0\0\0\0\0\0\x01payload")
        .await
        .unwrap();
    let result = within(LIMIT, open).await.unwrap();
    assert!(
        matches!(result, Err(Error::Timeout(TimeoutKind::StreamBind))),
        "got {result:?}"
    );
    assert_eq!(pair.relay.stats().refused_streams, 1);
    assert!(pair.relay.is_ready());
    // The session still serves.
    let _served = serve_test_services(pair.edge.clone(), pair.edge_events);
    let (_send, recv) = within(LIMIT, pair.relay.open("hello", Metadata::Empty))
        .await
        .unwrap();
    assert_eq!(read_all(recv).await, b"hello ");
}

#[tokio::test]
async fn stream_for_an_already_bound_id_is_refused() {
    let mut pair = session_pair().await;
    let relay = pair.relay.clone();
    let open = tokio::spawn(async move { relay.open("x", Metadata::Empty).await });
    let (request_id, ..) = next_open_request(&mut pair.edge_events).await;
    pair.edge.accept_open(request_id, 9).await.unwrap();
    let (mut first, _r1) = pair.edge.connection().open_bi().await.unwrap();
    pair.edge.bind_stream(&mut first, 9).await.unwrap();
    let (_send, _recv) = within(LIMIT, open).await.unwrap().expect("open");
    let (mut second, mut second_recv) = pair.edge.connection().open_bi().await.unwrap();
    pair.edge.bind_stream(&mut second, 9).await.unwrap();
    // The relay resets the impostor at once (not after the bind timeout).
    let mut buf = [0u8; 1];
    let read = within(Duration::from_secs(2), second_recv.read(&mut buf)).await;
    assert!(read.is_err(), "the duplicate stream was reset: {read:?}");
    assert_eq!(pair.relay.stats().refused_streams, 1);
    assert!(pair.relay.is_ready());
}

#[tokio::test]
async fn dropping_the_last_client_ends_every_session_task() {
    let quic = quic_pair().await;
    let baseline = alive_tasks();
    let pair = start_sessions(
        quic,
        Config::new().with_ping_interval(Duration::from_millis(50)),
        Config::new().with_ping_interval(Duration::from_millis(50)),
    )
    .await;
    assert!(alive_tasks() > baseline);
    let clone = pair.relay.clone();
    drop(pair.relay);
    assert!(clone.is_ready(), "a clone keeps the session running");
    drop(clone);
    drop(pair.edge);
    drop(pair.edge_events);
    assert!(
        settle_tasks(baseline).await <= baseline,
        "session tasks outlived their clients"
    );
}

#[tokio::test]
async fn session_tasks_end_when_the_connection_is_lost() {
    let quic = quic_pair().await;
    let baseline = alive_tasks();
    let pair = start_sessions(quic, Config::new(), Config::new()).await;
    pair.quic.relay.close(0u32.into(), b"bye");
    assert!(matches!(
        within(LIMIT, pair.relay.closed()).await,
        Error::Disconnected
    ));
    assert!(matches!(
        within(LIMIT, pair.edge.closed()).await,
        Error::Disconnected
    ));
    // The clients are still held, yet nothing of the sessions keeps running.
    assert!(settle_tasks(baseline).await <= baseline);
    drop(pair.relay);
}

#[tokio::test]
async fn version_mismatch_is_reported_on_both_sides() {
    let quic = quic_pair().await;
    let relay = Session::new(
        QuinnConnection::new(quic.relay.clone()),
        Role::Server,
        Config::new(),
    );
    let edge = Session::new(
        QuinnConnection::new(quic.edge.clone()),
        Role::Client,
        Config::new().with_versions(vec![2]),
    );
    let (relay_result, edge_result) =
        within(LIMIT, async { tokio::join!(relay.start(), edge.start()) }).await;
    assert!(matches!(
        relay_result,
        Err(Error::VersionMismatch { remote: 2, .. })
    ));
    assert!(matches!(
        edge_result,
        Err(Error::VersionMismatch { remote: 1, .. })
    ));
    assert_eq!(relay.state(), State::Closed);
}

#[tokio::test]
async fn negotiation_is_bounded_by_its_timeout() {
    let quic = quic_pair().await;
    let relay = Session::new(
        QuinnConnection::new(quic.relay.clone()),
        Role::Server,
        Config::new().with_negotiation_timeout(Duration::from_millis(200)),
    );
    // The edge opens a stream and says nothing.
    let (mut send, _recv) = quic.edge.open_bi().await.unwrap();
    send.write_all(&[0, 0]).await.unwrap();
    let result = within(LIMIT, relay.start()).await;
    assert!(
        matches!(result, Err(Error::Timeout(TimeoutKind::Negotiation))),
        "got {result:?}"
    );
}

#[tokio::test]
async fn features_are_the_intersection_and_agents_are_exchanged() {
    let quic = quic_pair().await;
    let relay = Session::new(
        QuinnConnection::new(quic.relay.clone()),
        Role::Server,
        Config::new()
            .with_agent("relay/test")
            .with_features(Features::PING_PONG | Features::STRUCTURED_METADATA),
    );
    let edge = Session::new(
        QuinnConnection::new(quic.edge.clone()),
        Role::Client,
        Config::new()
            .with_agent("edge/test")
            .with_features(Features::PING_PONG),
    );
    let (a, b) = tokio::join!(relay.start(), edge.start());
    a.unwrap();
    b.unwrap();
    let relay_params = relay.negotiated_params().unwrap();
    let edge_params = edge.negotiated_params().unwrap();
    assert_eq!(relay_params.features, Features::PING_PONG);
    assert_eq!(edge_params.features, Features::PING_PONG);
    assert_eq!(relay_params.remote_agent.as_deref(), Some("edge/test"));
    assert_eq!(edge_params.remote_agent.as_deref(), Some("relay/test"));
    assert_eq!(relay_params.version, 1);
}

/// A fake edge over raw quinn that completes the handshake and then does as told.
async fn raw_edge_after_handshake(
    quic: &QuicPair,
    features: Features,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = quic.edge.open_bi().await.unwrap();
    let mut out = BytesMut::new();
    encode_frame(&ProtocolMessage::Hello(Hello::new(features)), &mut out).unwrap();
    send.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let _server_hello = read_frame(&mut recv, &mut buf).await;
    out.clear();
    let ack = HelloAck {
        selected_version: 1,
        selected_features: features,
    };
    encode_frame(&ProtocolMessage::HelloAck(ack), &mut out).unwrap();
    send.write_all(&out).await.unwrap();
    let _server_ack = read_frame(&mut recv, &mut buf).await;
    (send, recv)
}

async fn read_frame(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> ProtocolMessage {
    loop {
        if let Some(message) = backhaul::protocol::decode_frame(buf).unwrap() {
            return message;
        }
        let mut chunk = [0u8; 1024];
        let n = recv.read(&mut chunk).await.unwrap().expect("stream open");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn relay_against_raw_edge(
    config: Config,
    features: Features,
) -> (
    SessionClient<QuinnConnection>,
    quinn::SendStream,
    quinn::RecvStream,
    QuicPair,
) {
    let quic = quic_pair().await;
    let relay = Session::new(
        QuinnConnection::new(quic.relay.clone()),
        Role::Server,
        config,
    );
    let (handle, (send, recv)) =
        tokio::join!(relay.start(), raw_edge_after_handshake(&quic, features));
    (SessionClient::new(handle.unwrap()), send, recv, quic)
}

#[tokio::test]
async fn garbage_on_the_control_stream_is_a_protocol_error() {
    let (relay, mut send, _recv, _quic) =
        relay_against_raw_edge(Config::new(), Features::empty()).await;
    let waiting = tokio::spawn({
        let relay = relay.clone();
        async move { relay.open("echo", Metadata::Empty).await }
    });
    // A well-framed payload whose message tag means nothing.
    send.write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let reason = within(LIMIT, relay.closed()).await;
    assert!(matches!(reason, Error::Protocol(_)), "got {reason:?}");
    let open = within(LIMIT, waiting).await.unwrap();
    assert!(
        matches!(open, Err(Error::Protocol(_))),
        "pending open failed with the cause: {open:?}"
    );
    assert_eq!(relay.state(), State::Closed);
}

#[tokio::test]
async fn oversized_frame_length_is_refused_before_reading_it() {
    let (relay, mut send, _recv, _quic) =
        relay_against_raw_edge(Config::new(), Features::empty()).await;
    // Announce 16 MiB and send only the header.
    send.write_all(&[0x01, 0, 0, 0]).await.unwrap();
    let reason = within(LIMIT, relay.closed()).await;
    assert!(
        matches!(
            reason,
            Error::Protocol(backhaul::protocol::ProtocolError::FrameTooLarge { .. })
        ),
        "got {reason:?}"
    );
}

#[tokio::test]
async fn handshake_message_after_negotiation_is_a_violation() {
    let (relay, mut send, _recv, _quic) =
        relay_against_raw_edge(Config::new(), Features::empty()).await;
    let mut out = BytesMut::new();
    encode_frame(
        &ProtocolMessage::Hello(Hello::new(Features::empty())),
        &mut out,
    )
    .unwrap();
    send.write_all(&out).await.unwrap();
    let reason = within(LIMIT, relay.closed()).await;
    assert!(
        matches!(reason, Error::ProtocolViolation(_)),
        "got {reason:?}"
    );
}

#[tokio::test]
async fn missed_pong_marks_the_session_dead() {
    let config = Config::new()
        .with_ping_interval(Duration::from_millis(100))
        .with_ping_timeout(Duration::from_millis(300));
    // The raw edge negotiates PING_PONG, then never reads again.
    let (relay, _send, _recv, _quic) = relay_against_raw_edge(config, Features::PING_PONG).await;
    let started = Instant::now();
    let reason = within(LIMIT, relay.closed()).await;
    assert!(
        matches!(reason, Error::Timeout(TimeoutKind::Ping)),
        "got {reason:?}"
    );
    assert_eq!(relay.state(), State::Disconnected);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        !relay.connection().is_open(),
        "the dead connection was closed"
    );
}

#[tokio::test]
async fn keep_alives_keep_a_live_session_ready() {
    let config = || {
        Config::new()
            .with_ping_interval(Duration::from_millis(50))
            .with_ping_timeout(Duration::from_millis(500))
    };
    let pair = session_pair_with(config(), config()).await;
    let mut observed = pair.relay.control_events();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(pair.relay.is_ready() && pair.edge.is_ready());
    let mut pongs = 0;
    while let Ok(event) = observed.try_recv() {
        if matches!(event, backhaul::ControlEvent::Pong { .. }) {
            pongs += 1;
        }
    }
    assert!(pongs >= 3, "keep-alives were answered: {pongs}");
}

/// The observers' channel is made by the first of them: three hundred subscribing at
/// once, on several threads, all share it and each sees every ping that follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_observers_subscribing_at_once_each_see_every_event() {
    let pair = session_pair_with(
        Config::new().with_ping_interval(Duration::from_secs(60)),
        Config::new().with_ping_interval(Duration::from_secs(60)),
    )
    .await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(300));
    let subscribing: Vec<_> = (0..300)
        .map(|_| {
            let edge = pair.edge.clone();
            let barrier = std::sync::Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                edge.control_events()
            })
        })
        .collect();
    let mut observers = Vec::new();
    for subscribed in subscribing {
        observers.push(subscribed.await.expect("subscribe"));
    }
    for _ in 0..3 {
        pair.relay.ping().await.expect("ping");
    }
    for mut observed in observers {
        let pings = within(LIMIT, async {
            let mut pings = Vec::new();
            while pings.len() < 3 {
                if let backhaul::ControlEvent::Ping { sequence } =
                    observed.recv().await.expect("event")
                {
                    pings.push(sequence);
                }
            }
            pings
        })
        .await;
        assert_eq!(pings, [1, 2, 3]);
    }
}

#[tokio::test]
async fn accept_open_refuses_unknown_requests_and_reserved_ids() {
    let mut pair = session_pair().await;
    assert!(matches!(
        pair.edge.accept_open(12345, 1).await,
        Err(Error::UnknownRequest { request_id: 12345 })
    ));
    let relay = pair.relay.clone();
    let _open = tokio::spawn(async move { relay.open("x", Metadata::Empty).await });
    let (request_id, ..) = next_open_request(&mut pair.edge_events).await;
    assert!(matches!(
        pair.edge.accept_open(request_id, 0).await,
        Err(Error::InvalidStreamId(0))
    ));
    pair.edge
        .reject_open(request_id, RejectCode::Unauthorized, None)
        .await
        .unwrap();
    assert!(matches!(
        pair.edge
            .reject_open(request_id, RejectCode::Unauthorized, None)
            .await,
        Err(Error::UnknownRequest { .. })
    ));
}

#[tokio::test]
async fn relay_without_event_receiver_refuses_edge_opens() {
    let pair = session_pair().await;
    let result = within(LIMIT, pair.edge.open("anything", Metadata::Empty)).await;
    assert!(matches!(
        result,
        Err(Error::StreamRejected {
            code: RejectCode::ServiceUnavailable,
            ..
        })
    ));
    assert_eq!(pair.relay.stats().refused_requests, 1);
}

#[tokio::test]
async fn stream_for_an_unknown_id_is_refused_after_the_bind_timeout() {
    let relay_config = Config::new().with_stream_bind_timeout(Duration::from_millis(300));
    let pair = session_pair_with(relay_config, Config::new()).await;
    let (mut stray, mut stray_recv) = pair.edge.connection().open_bi().await.unwrap();
    pair.edge.bind_stream(&mut stray, 4242).await.unwrap();
    let mut buf = [0u8; 1];
    let read = within(Duration::from_secs(3), stray_recv.read(&mut buf)).await;
    assert!(read.is_err(), "the stray stream was reset: {read:?}");
    assert_eq!(pair.relay.stats().refused_streams, 1);
    assert_eq!(pair.relay.stats().early_streams, 0);
    // Other streams are undisturbed.
    let _served = serve_test_services(pair.edge.clone(), pair.edge_events);
    let (_send, recv) = within(LIMIT, pair.relay.open("hello", Metadata::Empty))
        .await
        .unwrap();
    assert_eq!(read_all(recv).await, b"hello ");
}

#[tokio::test]
async fn peer_vanishing_mid_stream_is_reported_not_truncated() {
    let mut pair = session_pair().await;
    let relay = pair.relay.clone();
    let open = tokio::spawn(async move { relay.open("big", Metadata::Empty).await });
    let (request_id, ..) = next_open_request(&mut pair.edge_events).await;
    let id = pair.edge.allocate_stream_id();
    pair.edge.accept_open(request_id, id).await.unwrap();
    let (mut send, _recv) = pair.edge.connection().open_bi().await.unwrap();
    pair.edge.bind_stream(&mut send, id).await.unwrap();
    send.write_all(&pattern(b"half", 64 * 1024)).await.unwrap();
    let (_relay_send, mut recv) = within(LIMIT, open).await.unwrap().unwrap();
    let mut first = vec![0u8; 64 * 1024];
    recv.read_exact(&mut first).await.unwrap();
    assert!(
        first == pattern(b"half", 64 * 1024),
        "bytes before the loss arrive intact"
    );
    pair.quic.edge.close(0u32.into(), b"power cut");
    let mut rest = Vec::new();
    let result = within(LIMIT, recv.read_to_end(&mut rest)).await;
    assert!(
        result.is_err(),
        "a vanished peer is an error, not a clean end: {result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_requests_is_bounded_by_the_acceptors_limit() {
    let relay_config = Config::new().with_max_inflight_opens(5000);
    let edge_config = Config::new().with_max_concurrent_streams(100);
    let pair = session_pair_with(relay_config, edge_config).await;
    let _never_answered = pair.edge_events;
    let opens: Vec<_> = (0..2000)
        .map(|_| {
            let relay = pair.relay.clone();
            tokio::spawn(async move { relay.open("x", Metadata::Empty).await })
        })
        .collect();
    // 100 wait for an answer; the rest are refused at once.
    let mut refused = 0;
    let mut waiting = Vec::new();
    for open in opens {
        if open.is_finished() {
            match open.await.unwrap() {
                Err(Error::StreamRejected {
                    code: RejectCode::LimitExceeded,
                    ..
                }) => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
        } else {
            waiting.push(open);
        }
    }
    let settle = within(LIMIT, async {
        loop {
            let stats = pair.edge.stats();
            if stats.refused_requests == 1900 && pair.relay.stats().pending_opens == 100 {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        settle.active_streams, 100,
        "the edge holds exactly its limit"
    );
    // Every rejection has reached its open; give those tasks a moment to finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut still_waiting = 0;
    for open in waiting {
        if open.is_finished() {
            assert!(matches!(
                open.await.unwrap(),
                Err(Error::StreamRejected {
                    code: RejectCode::LimitExceeded,
                    ..
                })
            ));
            refused += 1;
        } else {
            still_waiting += 1;
            open.abort();
        }
    }
    assert_eq!(refused, 1900);
    assert_eq!(still_waiting, 100);
    assert!(pair.relay.is_ready() && pair.edge.is_ready());
    within(LIMIT, pair.relay.ping())
        .await
        .expect("the session still answers");
}

#[tokio::test]
async fn stream_bind_split_across_packets_still_binds() {
    let mut pair = session_pair().await;
    let relay = pair.relay.clone();
    let open = tokio::spawn(async move { relay.open("split", Metadata::Empty).await });
    let (request_id, ..) = next_open_request(&mut pair.edge_events).await;
    let id = pair.edge.allocate_stream_id();
    pair.edge.accept_open(request_id, id).await.unwrap();
    let header = backhaul::StreamBind::new(id).encode();
    let (mut send, _recv) = pair.edge.connection().open_bi().await.unwrap();
    send.write_all(&header[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    send.write_all(&header[5..]).await.unwrap();
    send.write_all(b"after the header").await.unwrap();
    send.finish().await.unwrap();
    let (_send, recv) = within(LIMIT, open).await.unwrap().expect("open");
    assert_eq!(read_all(recv).await, b"after the header");
}
