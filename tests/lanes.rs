//! Lanes over real quinn on 127.0.0.1: an edge's session spread over several QUIC
//! connections to the library relay. Opens are spread over every lane and arrive intact,
//! a relay's lane limit is kept, a lost lane is dialed again while the others carry on,
//! and a lane presenting a key no session has is refused, its source backed off, without
//! disturbing registered edges.

#[path = "support/relay.rs"]
mod relay_fixture;
mod support;

use std::future::IntoFuture;
use std::time::Duration;

use backhaul::connector::Connector;
use backhaul::edge::{Edge, RegisterError, Router};
use backhaul::quic::lane::{join, JoinAnswer, JoinError, LaneKey, CLOSE_LANE_REFUSED, LANE_MAGIC};
use backhaul::relay::{registration_metadata, EdgeHandle, Registry, REGISTER_SERVICE};
use backhaul::stream::TunnelStream;
use backhaul::{QuinnConnection, ServiceId, SessionClient};
use relay_fixture::{current, eventually, TestRelay};
use support::{pattern, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::task::{JoinHandle, JoinSet};
use tower::{Service, ServiceExt};

const LIMIT: Duration = Duration::from_secs(60);

/// Echoes every stream.
fn echo_router() -> Router<QuinnConnection> {
    let echo = tower::service_fn(|mut stream: TunnelStream<QuinnConnection>| async move {
        let (mut reader, mut writer) = tokio::io::split(&mut stream);
        tokio::io::copy(&mut reader, &mut writer).await?;
        writer.shutdown().await
    });
    Router::new().route("echo", echo)
}

/// An edge registered as "alpha" asking for `lanes` connections, running on a task.
fn spawn_edge(relay: &TestRelay, lanes: usize) -> JoinHandle<Result<(), backhaul::Error>> {
    let register = tower::service_fn(|client: SessionClient<QuinnConnection>| async move {
        client
            .open(REGISTER_SERVICE, registration_metadata("alpha", "secret"))
            .await?;
        Ok::<_, RegisterError>(())
    });
    let edge = Edge::builder()
        .relay(relay.addr)
        .server_name("localhost")
        .trust(relay.trusted.clone())
        .lanes(lanes)
        .register(register)
        .build(echo_router())
        .expect("edge");
    tokio::spawn(edge.into_future())
}

/// A library relay (default limits) and an edge "alpha" asking for `lanes`, once its
/// session runs over all of them.
async fn laned_edge(
    lanes: usize,
) -> (
    TestRelay,
    JoinHandle<Result<(), backhaul::Error>>,
    EdgeHandle,
) {
    let relay = TestRelay::start(&["alpha=secret"], Registry::new(), |acceptor| acceptor);
    let edge_task = spawn_edge(&relay, lanes);
    let edge = current(&relay.registry, "alpha", None).await;
    connections_become(&edge, lanes).await;
    (relay, edge_task, edge)
}

/// Waits until the relay's session of `edge` runs over `connections` connections.
async fn connections_become(edge: &EdgeHandle, connections: usize) {
    let transport = edge.client().connection().clone();
    eventually(LIMIT, "the session's connections", || {
        std::future::ready(transport.connections() == connections)
    })
    .await;
}

/// An echo stream through `connector`, split; the connector waits for room among the
/// session's in-flight opens.
async fn open_echo(
    mut connector: Connector,
) -> (
    ReadHalf<TunnelStream<QuinnConnection>>,
    WriteHalf<TunnelStream<QuinnConnection>>,
) {
    let connector = ServiceExt::<ServiceId>::ready(&mut connector)
        .await
        .expect("ready");
    let stream = connector.call(ServiceId::from("echo")).await.expect("open");
    tokio::io::split(stream)
}

/// Opens `count` echo streams at once through `edge`, each with its own 64 KiB, and
/// checks every byte that comes back: none may fail.
async fn echo_many(edge: &EdgeHandle, count: usize) {
    let failed = echo_many_across_a_loss(edge, count).await;
    assert_eq!(
        failed, 0,
        "{failed} of {count} streams went with a lost lane"
    );
}

/// Whether a read or write failed because the stream's connection went: the fate of a
/// stream that was already bound on a lane when the lane was lost.
fn lost_with_its_lane(error: &std::io::Error) -> bool {
    let Some(inner) = error.get_ref() else {
        return false;
    };
    matches!(
        inner.downcast_ref::<quinn::ReadError>(),
        Some(quinn::ReadError::ConnectionLost(_))
    ) || matches!(
        inner.downcast_ref::<quinn::WriteError>(),
        Some(quinn::WriteError::ConnectionLost(_))
    )
}

/// Fails the test unless stream `index` failed because its lane was lost.
fn assert_lost_with_its_lane(index: usize, error: &std::io::Error) {
    assert!(
        lost_with_its_lane(error),
        "stream {index}: failed other than by its lane's loss: {error}"
    );
}

/// Opens `count` echo streams at once, each with its own 64 KiB. Every open must succeed;
/// a stream already bound on a lane that is then lost may fail, but only with the lane's
/// loss, never with bytes that differ. Returns how many failed that way.
async fn echo_many_across_a_loss(edge: &EdgeHandle, count: usize) -> usize {
    let mut opens = JoinSet::new();
    for index in 0..count {
        let connector = edge.connector();
        opens.spawn(async move {
            let payload = pattern(&index.to_be_bytes(), 64 * 1024);
            let (mut recv, mut send) = open_echo(connector).await;
            let reading = async {
                let mut echoed = Vec::new();
                recv.read_to_end(&mut echoed).await.map(|_| echoed)
            };
            let writing = async {
                send.write_all(&payload).await?;
                send.shutdown().await
            };
            match tokio::join!(reading, writing) {
                (Ok(echoed), Ok(())) => {
                    assert!(echoed == payload, "stream {index}: echo differs");
                    false
                }
                (Err(error), _) | (_, Err(error)) => {
                    assert_lost_with_its_lane(index, &error);
                    true
                }
            }
        });
    }
    within(LIMIT, async {
        let mut failed = 0;
        while let Some(done) = opens.join_next().await {
            failed += usize::from(done.expect("an echo"));
        }
        failed
    })
    .await
}

/// Stream frames each of the session's connections received, its own first.
fn stream_frames(edge: &EdgeHandle) -> Vec<u64> {
    let transport = edge.client().connection();
    std::iter::once(transport.inner().clone())
        .chain(transport.lanes())
        .map(|connection| connection.stats().frame_rx.stream)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_opens_at_once_are_spread_over_three_lanes_and_arrive_intact() {
    let (relay, edge_task, edge) = laned_edge(3).await;
    assert_eq!(relay.stats.snapshot().lanes_joined, 2);
    echo_many(&edge, 300).await;
    let frames = stream_frames(&edge);
    assert_eq!(frames.len(), 3);
    // Round robin: about a third of the 300 × 64 KiB each; the edge's own connection also
    // carries the control stream.
    let least = frames.iter().min().copied().unwrap_or_default();
    let most = frames.iter().max().copied().unwrap_or_default();
    assert!(least * 2 > most, "stream frames per connection: {frames:?}");
    edge_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_asking_more_lanes_than_the_relay_allows_keeps_what_it_got_unpenalised() {
    // (the relay's limit, the edge's wish): a relay allowing two, one with lanes off.
    for (max_lanes, asked) in [(2, 4), (1, 3)] {
        let relay = TestRelay::start(&["alpha=secret"], Registry::new(), |acceptor| {
            acceptor.with_max_lanes(max_lanes)
        });
        let edge_task = spawn_edge(&relay, asked);
        let edge = current(&relay.registry, "alpha", None).await;
        connections_become(&edge, max_lanes).await;
        eventually(LIMIT, "the refused lane", || {
            std::future::ready(relay.stats.snapshot().lanes_refused == 1)
        })
        .await;
        // Told "full", the edge asks no more, and no source is backed off.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let counts = relay.stats.snapshot();
        let joined = u64::try_from(max_lanes - 1).unwrap();
        assert_eq!((counts.lanes_joined, counts.lanes_refused), (joined, 1));
        assert_eq!(counts.unauthorized, 0);
        echo_many(&edge, 50).await;
        assert_eq!(edge.client().connection().connections(), max_lanes);
        if let Some(lane) = edge.client().connection().lanes().first() {
            // A lane it got and lost is replaced, and still no more is asked for.
            lane.close(0u32.into(), b"network change");
            eventually(LIMIT, "the lane replaced", || {
                std::future::ready(relay.stats.snapshot().lanes_joined == joined + 1)
            })
            .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(relay.stats.snapshot().lanes_refused, 1);
        }
        edge_task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lane_is_dialed_again_while_the_others_carry_on() {
    let (relay, edge_task, edge) = laned_edge(3).await;
    let lost = edge.client().connection().lanes()[0].clone();
    lost.close(0u32.into(), b"network change");
    // Opens meanwhile go over what is left, and none is lost.
    echo_many(&edge, 100).await;
    eventually(LIMIT, "the lane dialed again", || {
        std::future::ready(relay.stats.snapshot().lanes_joined == 3)
    })
    .await;
    connections_become(&edge, 3).await;
    assert!(edge
        .client()
        .connection()
        .lanes()
        .iter()
        .all(|lane| lane.stable_id() != lost.stable_id()));
    echo_many(&edge, 100).await;
    assert_eq!(
        edge.epoch(),
        current(&relay.registry, "alpha", None).await.epoch(),
        "the session itself was never lost"
    );
    edge_task.abort();
}

/// Opens already under way when a lane goes are not lost with it: the edge may have sent
/// their `StreamBind` over the lane before it learnt of the close, and the relay opens
/// those again instead of waiting out the bind timeout. Three rounds of 200 opens, a lane
/// closed by the relay a moment after each round starts. Every open succeeds (a lost one
/// would fail with the bind timeout); streams whose open had already completed over the
/// lost lane fail loudly with it, as in the mid-transfer test below, and the rest arrive
/// intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_under_way_when_a_lane_is_lost_all_arrive() {
    let (relay, edge_task, edge) = laned_edge(3).await;
    for round in 0..3 {
        let lost = edge.client().connection().lanes()[0].clone();
        let opens = tokio::spawn({
            let edge = edge.clone();
            async move { echo_many_across_a_loss(&edge, 200).await }
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
        lost.close(0u32.into(), b"network change");
        let failed = opens
            .await
            .unwrap_or_else(|error| panic!("round {round}: {error}"));
        // Round robin puts a third of the streams on each connection: only those on the
        // lost lane can have failed.
        assert!(
            failed <= 200 / 3 + 10,
            "round {round}: {failed} of 200 failed"
        );
        eventually(LIMIT, "the lane dialed again", || {
            std::future::ready(relay.stats.snapshot().lanes_joined == 2 + round + 1)
        })
        .await;
        connections_become(&edge, 3).await;
    }
    echo_many(&edge, 50).await;
    edge_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessed_lane_key_is_refused_and_backed_off_while_edges_are_served() {
    let (relay, edge_task, edge) = laned_edge(2).await;

    let endpoint = relay.endpoint_from("127.0.0.9");
    let guesser = endpoint
        .connect(relay.addr, "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake");
    let (mut send, mut recv) = guesser.open_bi().await.unwrap();
    let mut request = LANE_MAGIC.to_vec();
    request.extend_from_slice(&[0x5a; 32]);
    send.write_all(&request).await.unwrap();
    send.finish().unwrap();
    let mut answer = [0; 1];
    within(LIMIT, recv.read_exact(&mut answer))
        .await
        .expect("an answer");
    assert_eq!(answer[0], 1, "{:?} expected", JoinAnswer::UnknownSession);
    // Backed off: the same source's next handshake is refused.
    let again = endpoint.connect(relay.addr, "localhost").unwrap().await;
    assert!(again.is_err(), "a backed-off source is refused");
    let counts = relay.stats.snapshot();
    assert_eq!((counts.lanes_refused, counts.unauthorized), (1, 1));
    // Left open by the guesser, the connection is closed after its linger.
    assert_eq!(
        within(LIMIT, relay_fixture::close_code(&guesser)).await,
        Some(u64::from(CLOSE_LANE_REFUSED))
    );

    // A request cut short is a failed handshake, not a guess.
    let other = relay.endpoint_from("127.0.0.10");
    let cut = other
        .connect(relay.addr, "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake");
    let (mut send, _recv) = cut.open_bi().await.unwrap();
    send.write_all(&LANE_MAGIC).await.unwrap();
    send.write_all(&[1; 7]).await.unwrap();
    send.finish().unwrap();
    assert_eq!(
        within(LIMIT, relay_fixture::close_code(&cut)).await,
        Some(u64::from(CLOSE_LANE_REFUSED))
    );
    assert_eq!(relay.stats.snapshot().unauthorized, 1);

    echo_many(&edge, 50).await;
    assert_eq!(edge.client().connection().connections(), 2);
    edge_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_session_ends_its_lanes_close_and_its_key_is_forgotten() {
    let (relay, edge_task, edge) = laned_edge(3).await;
    let lanes = edge.client().connection().lanes();
    let key = LaneKey::of(edge.client().connection().inner()).expect("a key");
    edge_task.abort();
    let _ = edge_task.await;
    for lane in &lanes {
        within(LIMIT, lane.closed()).await;
    }
    eventually(LIMIT, "the edge gone", || {
        std::future::ready(relay.registry.get("alpha").is_none())
    })
    .await;
    drop(edge);
    // A late lane of the ended session finds no session to join.
    let endpoint = relay.endpoint_from("127.0.0.11");
    let late = endpoint
        .connect(relay.addr, "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake");
    let joined = within(LIMIT, join(&late, &key)).await;
    assert!(
        matches!(joined, Err(JoinError::Refused(JoinAnswer::UnknownSession))),
        "{joined:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_lost_mid_transfer_fails_its_streams_and_the_others_arrive_intact() {
    let (_relay, edge_task, edge) = laned_edge(3).await;
    const STREAMS: usize = 150;
    const HALF: usize = 128 * 1024;
    let halfway = std::sync::Arc::new(tokio::sync::Barrier::new(STREAMS + 1));
    let resume = std::sync::Arc::new(tokio::sync::Barrier::new(STREAMS + 1));
    let mut transfers = JoinSet::new();
    for index in 0..STREAMS {
        let connector = edge.connector();
        let (halfway, resume) = (halfway.clone(), resume.clone());
        transfers.spawn(async move {
            let payload = pattern(&index.to_be_bytes(), 2 * HALF);
            let (mut recv, mut send) = open_echo(connector).await;
            let reading = async {
                let mut echoed = Vec::new();
                recv.read_to_end(&mut echoed).await.map(|_| echoed)
            };
            let writing = async {
                let first = send.write_all(&payload[..HALF]).await;
                halfway.wait().await;
                resume.wait().await;
                first?;
                send.write_all(&payload[HALF..]).await?;
                send.shutdown().await
            };
            let (echoed, written) = tokio::join!(reading, writing);
            match (echoed, written) {
                (Ok(echoed), Ok(())) => {
                    assert!(
                        echoed == payload,
                        "stream {index}: a whole echo that differs"
                    );
                    true
                }
                (Err(error), _) | (_, Err(error)) => {
                    assert_lost_with_its_lane(index, &error);
                    false
                }
            }
        });
    }
    within(LIMIT, halfway.wait()).await;
    // Every stream is half way: one of the three connections goes.
    let lost = edge.client().connection().lanes()[0].clone();
    lost.close(0u32.into(), b"network change");
    within(LIMIT, resume.wait()).await;
    let mut whole = 0;
    let mut failed = 0;
    within(LIMIT, async {
        while let Some(done) = transfers.join_next().await {
            if done.expect("a transfer") {
                whole += 1;
            } else {
                failed += 1;
            }
        }
    })
    .await;
    // Round robin put about a third of the streams on the lost lane: those fail, loudly;
    // the rest arrive whole.
    assert!(failed >= STREAMS / 6, "{failed} failed, {whole} whole");
    assert!(whole >= STREAMS / 2, "{failed} failed, {whole} whole");
    // The session and the edge go on; the lane comes back.
    connections_become(&edge, 3).await;
    echo_many(&edge, 30).await;
    edge_task.abort();
}

/// On a relay on shards, an edge's lanes are placed like edges (one per shard here), are
/// counted on their shards for as long as they are open, and carry streams as anywhere.
#[test]
fn on_shards_each_lane_is_counted_on_its_shard_while_it_lives() {
    let shards = backhaul::shards::Shards::new(3).expect("shards");
    let set = shards.set();
    shards.block_on(within(LIMIT, async move {
        let placing = set.clone();
        let relay = TestRelay::start(&["alpha=secret"], Registry::new(), move |acceptor| {
            acceptor.with_shards(placing)
        });
        let edge_task = spawn_edge(&relay, 3);
        let edge = current(&relay.registry, "alpha", None).await;
        connections_become(&edge, 3).await;
        eventually(LIMIT, "a lane on every shard", || {
            std::future::ready(set.edge_counts() == vec![1, 1, 1])
        })
        .await;
        echo_many(&edge, 150).await;
        // Counted for as long as they live: still there after the streams.
        assert_eq!(set.edge_counts(), vec![1, 1, 1]);

        edge_task.abort();
        eventually(LIMIT, "no lane counted", || {
            std::future::ready(set.edge_counts() == vec![0, 0, 0])
        })
        .await;
        relay.shutdown().await;
    }));
}
