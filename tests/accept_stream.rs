//! `SessionClient::accept_stream`: the one-call accept path, over real quinn. Each stream
//! holds its `max_concurrent_streams` slot until it is dropped, however it ends.

mod support;

use std::future::IntoFuture;
use std::time::Duration;

use backhaul::stream::{reset_code, TunnelStream, ABANDONED_STREAM};
use backhaul::{
    ClientEvent, Config, Error, Metadata, RejectCode, Role, SessionClient, TimeoutKind,
};
use support::{next_open_request, pattern, quic_pair, within, QuicPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(60);

/// Starts both sessions with the one-call constructor.
async fn sessions(
    relay_config: Config,
    edge_config: Config,
) -> (
    SessionClient,
    SessionClient,
    mpsc::Receiver<ClientEvent>,
    QuicPair,
) {
    let quic = quic_pair().await;
    let (relay, edge) = tokio::join!(
        SessionClient::start(quic.relay.clone(), Role::Server, relay_config),
        SessionClient::start(quic.edge.clone(), Role::Client, edge_config),
    );
    let (relay, _) = relay.expect("relay session");
    let (edge, events) = edge.expect("edge session");
    (relay, edge, events, quic)
}

/// Waits until the edge counts `expected` streams (requests plus accepted streams).
async fn active_streams_become(edge: &SessionClient, expected: usize) {
    within(LIMIT, async {
        while edge.stats().active_streams != expected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Reads `recv` to its end, which must be a reset with [`ABANDONED_STREAM`]: a route that
/// went away without finishing its stream (it panicked, or its task was stopped).
async fn ends_abandoned(recv: &mut backhaul::QuinnRecvStream) {
    let mut rest = Vec::new();
    let error = within(LIMIT, recv.read_to_end(&mut rest))
        .await
        .expect_err("the stream must fail, not end cleanly");
    assert_eq!(reset_code(&error), Some(ABANDONED_STREAM), "{error}");
}

/// Echoes a stream after writing its metadata bytes, so the opener can check that the
/// stream carries what its own open said.
async fn serve_echo(mut stream: TunnelStream) {
    let Metadata::Bytes(seed) = stream.metadata().clone() else {
        panic!("expected byte metadata");
    };
    stream.write_all(&seed).await.expect("write seed");
    let (mut reader, mut writer) = tokio::io::split(&mut stream);
    tokio::io::copy(&mut reader, &mut writer)
        .await
        .expect("echo");
    writer.shutdown().await.expect("finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_accept_streams_each_carry_their_own_data() {
    const STREAMS: usize = 300;
    const BYTES: usize = 16 * 1024;
    let config = Config::new()
        .with_max_inflight_opens(STREAMS)
        .with_max_concurrent_streams(STREAMS);
    let (relay, edge, mut events, _quic) = sessions(config.clone(), config).await;
    let server = tokio::spawn({
        let edge = edge.clone();
        async move {
            let mut served = tokio::task::JoinSet::new();
            for _ in 0..STREAMS {
                let (request_id, ..) = next_open_request(&mut events).await;
                let edge = edge.clone();
                served.spawn(async move {
                    let stream = edge.accept_stream(request_id).await.expect("accept");
                    serve_echo(stream).await;
                });
            }
            while let Some(joined) = served.join_next().await {
                joined.expect("served");
            }
        }
    });
    let mut opens = tokio::task::JoinSet::new();
    for index in 0..STREAMS {
        let relay = relay.clone();
        opens.spawn(async move {
            let seed = format!("stream-{index}").into_bytes();
            let payload = pattern(&seed, BYTES);
            let (mut send, mut recv) = relay
                .open("echo", Metadata::Bytes(seed.clone()))
                .await
                .expect("open");
            let writer = async {
                send.write_all(&payload).await.expect("write");
                send.shutdown().await.expect("finish");
            };
            let mut reply = Vec::new();
            let reader = recv.read_to_end(&mut reply);
            let ((), read) = tokio::join!(writer, reader);
            read.expect("read");
            assert_eq!(
                &reply[..seed.len()],
                &seed[..],
                "stream {index}: wrong stream"
            );
            assert!(
                reply[seed.len()..] == payload[..],
                "stream {index}: payload checksum differs"
            );
        });
    }
    within(Duration::from_secs(120), async {
        while let Some(joined) = opens.join_next().await {
            joined.expect("open task");
        }
        server.await.expect("server");
    })
    .await;
    // Every stream was dropped after serving: every slot is free again.
    active_streams_become(&edge, 0).await;
}

#[tokio::test]
async fn a_limit_of_n_refuses_one_more_while_n_streams_live_and_accepts_once_one_drops() {
    const N: usize = 4;
    let (relay, edge, mut events, _quic) =
        sessions(Config::new(), Config::new().with_max_concurrent_streams(N)).await;
    let (held_tx, mut held) = mpsc::unbounded_channel();
    let acceptor = tokio::spawn({
        let edge = edge.clone();
        async move {
            loop {
                let (request_id, ..) = next_open_request(&mut events).await;
                let stream = edge.accept_stream(request_id).await.expect("accept");
                if held_tx.send(stream).is_err() {
                    return;
                }
            }
        }
    });
    let mut relay_halves = Vec::new();
    for _ in 0..N {
        relay_halves.push(
            within(LIMIT, relay.open("hold", Metadata::Empty))
                .await
                .expect("open"),
        );
    }
    let mut streams = Vec::new();
    for _ in 0..N {
        streams.push(within(LIMIT, held.recv()).await.expect("held stream"));
    }
    assert_eq!(edge.stats().active_streams, N);

    let refused = within(LIMIT, relay.open("hold", Metadata::Empty)).await;
    assert!(
        matches!(
            refused,
            Err(Error::StreamRejected {
                code: RejectCode::LimitExceeded,
                ..
            })
        ),
        "the {}th stream got {refused:?}",
        N + 1
    );

    drop(streams.pop());
    active_streams_become(&edge, N - 1).await;
    let reopened = within(LIMIT, relay.open("hold", Metadata::Empty)).await;
    assert!(reopened.is_ok(), "after a drop: {reopened:?}");
    streams.push(within(LIMIT, held.recv()).await.expect("held stream"));
    assert_eq!(edge.stats().active_streams, N);

    drop(streams);
    active_streams_become(&edge, 0).await;
    acceptor.abort();
}

#[tokio::test]
async fn an_accept_dropped_half_way_or_a_stream_dropped_unused_frees_its_slot() {
    let (relay, edge, mut events, _quic) = sessions(
        Config::new().with_stream_bind_timeout(Duration::from_secs(2)),
        Config::new().with_max_concurrent_streams(1),
    )
    .await;

    // An accept abandoned after its first poll: by then the answer is queued, and the data
    // stream may or may not be open yet (quinn often opens and writes without waiting).
    let first = tokio::spawn({
        let relay = relay.clone();
        async move { relay.open("a", Metadata::Empty).await }
    });
    let (request_id, ..) = next_open_request(&mut events).await;
    let finished_in_one_poll =
        match tokio::time::timeout(Duration::ZERO, edge.accept_stream(request_id)).await {
            Ok(stream) => {
                drop(stream.expect("accept"));
                true
            }
            Err(_elapsed) => false,
        };
    assert_eq!(
        edge.stats().active_streams,
        0,
        "the slot outlived the accept"
    );
    let first = within(LIMIT, first).await.expect("open task");
    if finished_in_one_poll {
        assert!(first.is_ok(), "got {first:?}");
    } else {
        // Answered, but its stream never came.
        assert!(
            matches!(first, Err(Error::Timeout(TimeoutKind::StreamBind))),
            "got {first:?}"
        );
    }

    // A stream accepted and dropped without a byte written or read.
    let second = tokio::spawn({
        let relay = relay.clone();
        async move { relay.open("b", Metadata::Empty).await }
    });
    let (request_id, ..) = next_open_request(&mut events).await;
    let stream = within(LIMIT, edge.accept_stream(request_id))
        .await
        .expect("accept");
    assert_eq!(stream.service().as_str(), "b");
    assert_eq!(edge.stats().active_streams, 1);
    drop(stream);
    assert_eq!(edge.stats().active_streams, 0);
    let (_send, mut recv) = within(LIMIT, second).await.expect("task").expect("open");
    let mut rest = Vec::new();
    let _ = within(LIMIT, recv.read_to_end(&mut rest)).await;

    // With the single slot free again, a third open is served.
    let third = tokio::spawn({
        let relay = relay.clone();
        async move { relay.open("c", Metadata::Empty).await }
    });
    let (request_id, ..) = next_open_request(&mut events).await;
    let stream = within(LIMIT, edge.accept_stream(request_id))
        .await
        .expect("accept after frees");
    within(LIMIT, third)
        .await
        .expect("task")
        .expect("third open");
    drop(stream);
}

#[tokio::test]
async fn accepting_an_unknown_request_is_a_typed_error_that_takes_no_slot() {
    let (_relay, edge, _events, _quic) = sessions(Config::new(), Config::new()).await;
    let result = edge.accept_stream(12345).await;
    assert!(
        matches!(result, Err(Error::UnknownRequest { request_id: 12345 })),
        "got {result:?}"
    );
    assert_eq!(edge.stats().active_streams, 0);
}

/// Log lines written while the test runs (on its one thread).
#[derive(Clone, Default)]
struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_route_is_logged_with_its_service_and_the_edge_keeps_serving() {
    use backhaul::edge::Router;

    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // current_thread: every task of this test runs on this thread, under this subscriber.
    let _logging = tracing::subscriber::set_default(subscriber);

    let (relay, edge, events, _quic) = sessions(Config::new(), Config::new()).await;
    // Half a response, then a panic: the relay must not take it for a whole one.
    let boom = tower::service_fn(|mut stream: TunnelStream| async move {
        stream.write_all(&pattern(b"half", 1000)).await?;
        stream.flush().await?;
        if true {
            panic!("boom in the route");
        }
        Ok::<(), std::io::Error>(())
    });
    let echo = tower::service_fn(|stream: TunnelStream| async move {
        serve_echo(stream).await;
        Ok::<(), std::io::Error>(())
    });
    let router = Router::new().route("boom", boom).route("echo", echo);
    let serving = tokio::spawn(router.serve(edge.clone(), events).into_future());

    // Depending on whether the stream's first bytes left before its reset, the open
    // fails at once as abandoned, or succeeds and its reads fail: never a clean end, and
    // never a wait for the bind timeout.
    let began = std::time::Instant::now();
    match within(LIMIT, relay.open("boom", Metadata::Empty)).await {
        Ok((_send, mut recv)) => ends_abandoned(&mut recv).await,
        Err(Error::StreamAbandoned { reason }) => {
            assert!(reason.is_some_and(|reason| reason.contains("panicked")));
        }
        Err(other) => panic!("expected an abandoned stream, got {other:?}"),
    }
    assert!(
        began.elapsed() < Config::new().stream_bind_timeout,
        "failed only after {:?}",
        began.elapsed()
    );
    within(LIMIT, async {
        while !logs.text().contains("route panicked") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let text = logs.text();
    assert!(
        text.contains("service=\"boom\"") || text.contains("service=boom"),
        "{text}"
    );
    assert!(text.contains("boom in the route"), "{text}");
    // The slot of the panicked stream is free and the edge still serves.
    active_streams_become(&edge, 0).await;
    let (mut send, mut recv) = within(
        LIMIT,
        relay.open("echo", Metadata::Bytes(b"after".to_vec())),
    )
    .await
    .expect("open after the panic");
    send.write_all(b"!").await.unwrap();
    send.shutdown().await.unwrap();
    let mut reply = Vec::new();
    within(LIMIT, recv.read_to_end(&mut reply)).await.unwrap();
    assert_eq!(reply, b"after!");
    serving.abort();
}

/// A route that holds its stream until its future is dropped, counting the futures that
/// started and those dropped.
fn holding_route(
    started: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
    dropped: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> impl tower::Service<
    TunnelStream,
    Response = (),
    Error = std::io::Error,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    use std::sync::atomic::Ordering;

    struct CountsDrop(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for CountsDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let (started, dropped) = (started.clone(), dropped.clone());
    tower::service_fn(move |stream: TunnelStream| {
        started.fetch_add(1, Ordering::SeqCst);
        let guard = CountsDrop(dropped.clone());
        async move {
            let _held = (guard, stream);
            std::future::pending::<()>().await;
            Ok::<(), std::io::Error>(())
        }
    })
}

/// Waits until `counter` reads `expected`.
async fn count_becomes(counter: &std::sync::atomic::AtomicUsize, expected: usize) {
    within(LIMIT, async {
        while counter.load(std::sync::atomic::Ordering::SeqCst) != expected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_router_s_serving_future_ends_every_stream_it_serves() {
    use backhaul::edge::Router;

    let (relay, edge, events, _quic) = sessions(Config::new(), Config::new()).await;
    let started = std::sync::Arc::default();
    let dropped = std::sync::Arc::default();
    let router = Router::new().route("hold", holding_route(&started, &dropped));
    let serving = tokio::spawn(router.serve(edge.clone(), events).into_future());
    // Two waves of 100 at once: the relay allows 100 opens in flight by default.
    let mut opened = Vec::new();
    for _ in 0..2 {
        let mut wave = Vec::new();
        for _ in 0..100 {
            let relay = relay.clone();
            wave.push(tokio::spawn(async move {
                relay.open("hold", Metadata::Empty).await.expect("open")
            }));
        }
        for stream in wave {
            opened.push(within(LIMIT, stream).await.expect("opener"));
        }
    }
    count_becomes(&started, 200).await;
    assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 0);
    serving.abort();
    let _ = serving.await;
    // Every route's future is dropped with the loop, and its stream with it.
    count_becomes(&dropped, 200).await;
    active_streams_become(&edge, 0).await;
    // Each opener sees its stream fail, not end as if the route had finished it.
    for (_send, mut recv) in opened {
        ends_abandoned(&mut recv).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_still_running_when_the_drain_times_out_are_stopped() {
    use backhaul::edge::Router;

    let (relay, edge, events, _quic) = sessions(Config::new(), Config::new()).await;
    let started = std::sync::Arc::default();
    let dropped = std::sync::Arc::default();
    let router = Router::new().route("hold", holding_route(&started, &dropped));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(
        router
            .serve(edge.clone(), events)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .with_drain_timeout(Duration::from_millis(300))
            .into_future(),
    );
    let mut opened = Vec::new();
    for _ in 0..20 {
        opened.push(
            within(LIMIT, relay.open("hold", Metadata::Empty))
                .await
                .expect("open"),
        );
    }
    count_becomes(&started, 20).await;
    let began = std::time::Instant::now();
    stop.send(()).expect("serving");
    // The loop ends by itself once the drain timed out and the streams were stopped.
    let result = within(LIMIT, serving).await.expect("serving task");
    assert!(result.is_ok(), "{result:?}");
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 20);
    active_streams_become(&edge, 0).await;
    for (_send, mut recv) in opened {
        ends_abandoned(&mut recv).await;
    }
}

/// The `Router` takes open requests straight from the session's control reader while it
/// serves (a handler the session holds); once its serving future is gone, the session
/// must hold nothing of it: dropping the last edge client then ends the session's tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_stopped_serving_leaves_its_session_free_to_end() {
    use backhaul::edge::Router;

    let (relay, edge, events, _quic) = sessions(Config::new(), Config::new()).await;
    let with_sessions = support::alive_tasks();
    let echo = tower::service_fn(|stream: TunnelStream| async move {
        serve_echo(stream).await;
        Ok::<(), std::io::Error>(())
    });
    let serving = tokio::spawn(
        Router::new()
            .route("echo", echo)
            .serve(edge.clone(), events)
            .into_future(),
    );
    // Served through the reader's handler.
    for round in 0..3u8 {
        let (mut send, mut recv) = within(LIMIT, relay.open("echo", Metadata::Bytes(vec![round])))
            .await
            .expect("open");
        send.write_all(b"!").await.unwrap();
        send.shutdown().await.unwrap();
        let mut reply = Vec::new();
        within(LIMIT, recv.read_to_end(&mut reply)).await.unwrap();
        assert_eq!(reply, [round, b'!']);
    }
    serving.abort();
    let _ = serving.await;
    active_streams_become(&edge, 0).await;
    drop(edge);
    let settled = support::settle_tasks(with_sessions - 1).await;
    assert!(
        settled < with_sessions,
        "the edge session's tasks still run: {settled} tasks, {with_sessions} with both sessions"
    );
}

/// A route that panics when asked whether it is ready.
#[derive(Clone)]
struct PanicsWhenPolled;

impl tower::Service<TunnelStream> for PanicsWhenPolled {
    type Response = ();
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<(), std::io::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::io::Error>> {
        panic!("readiness check exploded");
    }

    fn call(&mut self, _stream: TunnelStream) -> Self::Future {
        std::future::ready(Ok(()))
    }
}

/// The `Router` asks routes for readiness in the session's control reader: a route that
/// panics there gets its open refused, and the session goes on serving the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_panicking_in_poll_ready_is_refused_and_the_session_keeps_serving() {
    use backhaul::edge::Router;

    let (relay, edge, events, _quic) = sessions(Config::new(), Config::new()).await;
    let echo = tower::service_fn(|stream: TunnelStream| async move {
        serve_echo(stream).await;
        Ok::<(), std::io::Error>(())
    });
    let serving = tokio::spawn(
        Router::new()
            .route("boom", PanicsWhenPolled)
            .route("echo", echo)
            .serve(edge.clone(), events)
            .into_future(),
    );
    for _ in 0..3 {
        match within(LIMIT, relay.open("boom", Metadata::Empty)).await {
            Err(Error::StreamRejected {
                code: RejectCode::ServiceUnavailable,
                reason,
            }) => assert!(reason.is_some_and(|reason| reason.contains("boom"))),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let (mut send, mut recv) = within(LIMIT, relay.open("echo", Metadata::Bytes(vec![1])))
            .await
            .expect("the session still serves");
        send.shutdown().await.unwrap();
        let mut reply = Vec::new();
        within(LIMIT, recv.read_to_end(&mut reply)).await.unwrap();
        assert_eq!(reply, [1]);
    }
    // The edge's echo handler drops its stream after the reply has left, so
    // the count reaches zero a moment after the relay has read everything.
    active_streams_become(&edge, 0).await;
    serving.abort();
}
