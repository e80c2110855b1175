//! tower/hyper integration over real quinn: an axum app behind an edge Router, reached
//! with hyper clients through the relay's Connector.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::http::{Request, StatusCode};
use backhaul::connector::{Connector, OpenTarget};
use backhaul::edge::Router;
use backhaul::stream::TunnelStream;
use backhaul::{ControlEvent, Error, Metadata, QuinnConnection, RejectCode, ServiceId};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::IntoFuture;
use support::http::{app, checksum_body, PatternBody};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tower::{Service, ServiceBuilder, ServiceExt};

const LIMIT: Duration = Duration::from_secs(60);

/// The relay's client, the edge's client, the connection, and the edge's serving task.
type Served = (
    backhaul::SessionClient<QuinnConnection>,
    backhaul::SessionClient<QuinnConnection>,
    QuicPair,
    tokio::task::JoinHandle<Result<(), Error>>,
);

/// A session pair whose edge serves `router`.
fn serve_router(pair: SessionPair, router: Router<QuinnConnection>) -> Served {
    let SessionPair {
        relay,
        edge,
        edge_events,
        quic,
    } = pair;
    let serving = tokio::spawn(router.serve(edge.clone(), edge_events).into_future());
    (relay, edge, quic, serving)
}

fn web_router() -> Router<QuinnConnection> {
    Router::new().route("web", backhaul::http::serve(app()))
}

async fn web_pair() -> Served {
    serve_router(session_pair().await, web_router())
}

fn pooled<B>(
    relay: &backhaul::SessionClient<QuinnConnection>,
) -> Client<Connector<QuinnConnection>, B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new()).build(Connector::new(relay.clone()))
}

async fn text(response: ::http::Response<hyper::body::Incoming>) -> String {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn get_and_post_through_the_pooled_client() {
    let (relay, _edge, _quic, _serving) = web_pair().await;
    let client = pooled::<Full<Bytes>>(&relay);
    let response = within(LIMIT, client.get("http://web/".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, "hello from the edge");
    let request = Request::post("http://web/echo")
        .body(Full::new(Bytes::from_static(b"tunnels")))
        .unwrap();
    let response = within(LIMIT, client.request(request)).await.unwrap();
    assert_eq!(text(response).await, "you sent: tunnels");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_streams_up_and_down_intact() {
    const LEN: u64 = 64 * 1024 * 1024;
    let (relay, _edge, _quic, _serving) = web_pair().await;
    let expected = PatternBody::checksum(LEN);

    let upload = pooled::<PatternBody>(&relay);
    let request = Request::post("http://web/upload")
        .body(PatternBody::new(LEN))
        .unwrap();
    let response = within(LIMIT, upload.request(request)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        text(response).await,
        expected.header(),
        "upload arrived intact"
    );

    let download = pooled::<Empty<Bytes>>(&relay);
    let uri = format!("http://web/download/{LEN}").parse().unwrap();
    let response = within(LIMIT, download.get(uri)).await.unwrap();
    let received = within(LIMIT, checksum_body(response.into_body()))
        .await
        .unwrap();
    assert_eq!(received, expected, "download arrived intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_requests_all_answered() {
    let (relay, _edge, _quic, _serving) = web_pair().await;
    let client = pooled::<Empty<Bytes>>(&relay);
    let requests: Vec<_> = (0..500)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                let uri = format!("http://web/n/{n}").parse().unwrap();
                let response = client
                    .get(uri)
                    .await
                    .unwrap_or_else(|e| panic!("request {n}: {e:?}"));
                assert_eq!(response.status(), StatusCode::OK);
                assert_eq!(text(response).await, format!("reply {n}"));
            })
        })
        .collect();
    within(LIMIT, async {
        for request in requests {
            request.await.expect("request task");
        }
    })
    .await;
}

#[tokio::test]
async fn keep_alive_reuses_tunnel_streams() {
    let (relay, edge, _quic, _serving) = web_pair().await;
    let mut observed = edge.control_events();
    let client = pooled::<Empty<Bytes>>(&relay);
    for n in 0..50 {
        let uri = format!("http://web/n/{n}").parse().unwrap();
        let response = within(LIMIT, client.get(uri)).await.unwrap();
        assert_eq!(text(response).await, format!("reply {n}"));
    }
    let mut opens = 0;
    while let Ok(event) = observed.try_recv() {
        if matches!(event, ControlEvent::OpenRequest { .. }) {
            opens += 1;
        }
    }
    assert!(
        (1..=2).contains(&opens),
        "50 sequential requests used {opens} tunnel streams"
    );
}

#[tokio::test]
async fn http2_over_a_tunnel_stream() {
    let (relay, _edge, _quic, _serving) = web_pair().await;
    let mut connector = Connector::new(relay.clone());
    let stream: TunnelStream<QuinnConnection> = connector.connect("web").await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), stream)
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut answers = Vec::new();
    for n in 0..10 {
        let request = Request::get(format!("http://web/n/{n}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        answers.push(sender.send_request(request));
    }
    for (n, answer) in answers.into_iter().enumerate() {
        let response = within(LIMIT, answer).await.unwrap();
        assert_eq!(response.version(), ::http::Version::HTTP_2);
        assert_eq!(text(response).await, format!("reply {n}"));
    }
}

#[tokio::test]
async fn http1_handshake_on_a_connector_stream_with_metadata() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let router = Router::new().route(
        "meta",
        tower::service_fn({
            let seen = Arc::clone(&seen);
            move |mut stream: TunnelStream<QuinnConnection>| {
                let seen = Arc::clone(&seen);
                async move {
                    *seen.lock().unwrap() = Some(stream.metadata().clone());
                    stream.write_all(b"ok").await?;
                    stream.shutdown().await
                }
            }
        }),
    );
    let (relay, _edge, _quic, _serving) = serve_router(session_pair().await, router);
    let mut connector = Connector::new(relay);
    let target = OpenTarget::new("meta").with_metadata(Metadata::Bytes(b"req-42".to_vec()));
    let mut stream = ServiceExt::<OpenTarget>::ready(&mut connector)
        .await
        .unwrap()
        .call(target)
        .await
        .unwrap();
    assert_eq!(stream.service().as_str(), "meta");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"ok");
    assert_eq!(
        *seen.lock().unwrap(),
        Some(Metadata::Bytes(b"req-42".to_vec()))
    );
}

#[tokio::test]
async fn websocket_upgrade_echoes_messages() {
    let (relay, _edge, _quic, _serving) = web_pair().await;
    let mut connector = Connector::new(relay);
    let stream = connector.connect(ServiceId::from("web")).await.unwrap();
    let (mut socket, response) = within(
        LIMIT,
        tokio_tungstenite::client_async("ws://web/ws", stream),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for word in ["one", "two", "three"] {
        socket
            .send(tokio_tungstenite::tungstenite::Message::text(word))
            .await
            .unwrap();
        let reply = within(LIMIT, socket.next()).await.unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("echo: {word}"));
    }
    socket.close(None).await.unwrap();
}

/// Finds a `backhaul::Error` in an error's `source()` chain.
fn tunnel_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<Error>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

#[tokio::test]
async fn unknown_service_surfaces_typed_through_hypers_error() {
    let (relay, _edge, _quic, _serving) = web_pair().await;
    let client = pooled::<Empty<Bytes>>(&relay);
    let error = within(LIMIT, client.get("http://nope/".parse().unwrap()))
        .await
        .expect_err("no such service");
    match tunnel_error(&error) {
        Some(Error::StreamRejected { code, reason }) => {
            assert_eq!(*code, RejectCode::UnsupportedService);
            assert_eq!(reason.as_deref(), Some("no service named nope"));
        }
        other => panic!("expected a typed rejection in the chain, got {other:?} from {error:?}"),
    }
}

#[tokio::test]
async fn closed_session_makes_poll_ready_fail() {
    let (relay, _edge, _quic, _serving) = web_pair().await;
    relay
        .close(backhaul::CloseCode::Normal, None)
        .await
        .unwrap();
    let mut connector = Connector::new(relay);
    let ready = within(LIMIT, ServiceExt::<ServiceId>::ready(&mut connector)).await;
    assert!(matches!(ready, Err(Error::SessionClosed)), "got {ready:?}");
}

#[tokio::test]
async fn poll_ready_waits_for_a_free_open_slot() {
    let relay_config = backhaul::Config::new().with_max_inflight_opens(1);
    let pair = session_pair_with(relay_config, backhaul::Config::new()).await;
    let _never_answered = pair.edge_events;
    let mut first = Connector::new(pair.relay.clone());
    ServiceExt::<ServiceId>::ready(&mut first).await.unwrap();
    let pending_open = first.call(ServiceId::from("x"));
    let mut second = first.clone();
    let waited = tokio::time::timeout(
        Duration::from_millis(200),
        ServiceExt::<ServiceId>::ready(&mut second),
    )
    .await;
    assert!(
        waited.is_err(),
        "no slot is free, so poll_ready must stay pending"
    );
    drop(pending_open);
    within(LIMIT, ServiceExt::<ServiceId>::ready(&mut second))
        .await
        .unwrap();
}

#[tokio::test]
async fn full_concurrency_limit_rejects_at_once_without_hanging() {
    let (release, released) = tokio::sync::watch::channel(false);
    let held = tower::service_fn(move |_stream: TunnelStream<QuinnConnection>| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|go| *go).await;
            Ok::<_, std::io::Error>(())
        }
    });
    let router = Router::new().route(
        "busy",
        ServiceBuilder::new().concurrency_limit(2).service(held),
    );
    let (relay, _edge, _quic, _serving) = serve_router(session_pair().await, router);
    let opens: Vec<_> = (0..20)
        .map(|_| {
            let relay = relay.clone();
            tokio::spawn(async move { relay.open("busy", Metadata::Empty).await })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut limited = 0;
    for open in opens {
        match within(LIMIT, open).await.unwrap() {
            Ok(stream) => accepted.push(stream),
            Err(Error::StreamRejected {
                code: RejectCode::LimitExceeded,
                ..
            }) => limited += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(accepted.len(), 2);
    assert_eq!(limited, 18);
    release.send(true).unwrap();
}

#[tokio::test]
async fn timeout_layer_on_a_route_ends_slow_streams() {
    let slow = tower::service_fn(|_stream: TunnelStream<QuinnConnection>| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, std::io::Error>(())
    });
    let router = Router::new().route(
        "slow",
        ServiceBuilder::new()
            .timeout(Duration::from_millis(200))
            .service(slow),
    );
    let (relay, _edge, _quic, _serving) = serve_router(session_pair().await, router);
    let mut observed = relay.control_events();
    let (_send, mut recv) = within(LIMIT, relay.open("slow", Metadata::Empty))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = within(LIMIT, recv.read_to_end(&mut rest)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout ended the stream"
    );
    let closed = within(LIMIT, async {
        loop {
            if let Ok(ControlEvent::StreamClose { code, .. }) = observed.recv().await {
                return code;
            }
        }
    })
    .await;
    assert_eq!(closed, backhaul::CloseCode::Error);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_and_rejects_new_opens() {
    let pair = session_pair().await;
    let SessionPair {
        relay,
        edge,
        edge_events,
        quic: _quic,
    } = pair;
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(
        web_router()
            .serve(edge.clone(), edge_events)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .drain_timeout(Duration::from_secs(10))
            .into_future(),
    );
    let client = pooled::<Empty<Bytes>>(&relay);
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.get("http://web/slow/600".parse().unwrap()).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The edge closed the session before draining: the relay routes nothing more to it.
    let refused = within(LIMIT, relay.open("web", Metadata::Empty)).await;
    assert!(
        matches!(refused, Err(Error::SessionClosed)),
        "got {refused:?}"
    );
    let response = within(LIMIT, in_flight)
        .await
        .unwrap()
        .expect("in-flight request finished");
    assert_eq!(text(response).await, "done");
    within(LIMIT, serving)
        .await
        .unwrap()
        .expect("serving ended cleanly");
}

#[tokio::test]
async fn serving_ends_with_the_reason_when_the_session_is_lost() {
    let (_relay, _edge, quic, serving) = web_pair().await;
    quic.relay.close(0u32.into(), b"gone");
    let result = within(LIMIT, serving).await.unwrap();
    assert!(matches!(result, Err(Error::Disconnected)), "got {result:?}");
}

#[tokio::test]
async fn fallback_serves_unrouted_names() {
    let count = Arc::new(AtomicUsize::new(0));
    let router = Router::new().fallback(tower::service_fn({
        let count = Arc::clone(&count);
        move |mut stream: TunnelStream<QuinnConnection>| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                let name = stream.service().to_string();
                stream.write_all(name.as_bytes()).await?;
                stream.shutdown().await
            }
        }
    }));
    let (relay, _edge, _quic, _serving) = serve_router(session_pair().await, router);
    let (_send, mut recv) = within(LIMIT, relay.open("anything", Metadata::Empty))
        .await
        .unwrap();
    let mut name = String::new();
    recv.read_to_string(&mut name).await.unwrap();
    assert_eq!(name, "anything");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn router_streams_hold_their_session_slot_until_the_service_returns() {
    let (release, released) = tokio::sync::watch::channel(false);
    let held = tower::service_fn(move |_stream: TunnelStream<QuinnConnection>| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|go| *go).await;
            Ok::<_, std::io::Error>(())
        }
    });
    let pair = session_pair_with(
        backhaul::Config::new(),
        backhaul::Config::new().with_max_concurrent_streams(2),
    )
    .await;
    let (relay, edge, _quic, _serving) = serve_router(pair, Router::new().route("held", held));
    let first = within(LIMIT, relay.open("held", Metadata::Empty))
        .await
        .unwrap();
    let second = within(LIMIT, relay.open("held", Metadata::Empty))
        .await
        .unwrap();
    let third = within(LIMIT, relay.open("held", Metadata::Empty)).await;
    assert!(
        matches!(
            third,
            Err(Error::StreamRejected {
                code: RejectCode::LimitExceeded,
                ..
            })
        ),
        "got {third:?}"
    );
    release.send(true).unwrap();
    within(LIMIT, async {
        while edge.stats().active_streams > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within(LIMIT, relay.open("held", Metadata::Empty))
        .await
        .expect("slots were freed");
    drop((first, second));
}

#[tokio::test]
async fn a_tunnel_stream_keeps_its_session_running() {
    let (relay, _edge, _quic, _serving) = web_pair().await;
    let mut connector = Connector::new(relay);
    let stream = within(LIMIT, connector.connect("web")).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    // The connector held the relay's last SessionClient; the stream must keep the session
    // (and so the edge's keep-alive connection) going.
    drop(connector);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in 0..3 {
        within(LIMIT, sender.ready())
            .await
            .expect("connection still open");
        let request = Request::get(format!("http://web/n/{n}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = within(LIMIT, sender.send_request(request)).await.unwrap();
        assert_eq!(text(response).await, format!("reply {n}"));
    }
}
