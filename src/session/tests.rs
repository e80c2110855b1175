//! Session logic over the in-memory transport (the quinn end-to-end tests live in tests/).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::error::Error;
use crate::protocol::{CloseCode, Metadata};
use crate::session::{ClientEvent, Role, Session, SessionClient, State};
use crate::transport::mem::{memory_connection_pair, MemoryConnection};
use crate::transport::Connection;

async fn pair() -> (
    SessionClient<MemoryConnection>,
    SessionClient<MemoryConnection>,
    tokio::sync::mpsc::Receiver<ClientEvent>,
) {
    let (client_side, server_side) = memory_connection_pair();
    let edge = Session::new(client_side, Role::Client, Config::new().with_agent("edge"));
    let relay = Session::new(server_side, Role::Server, Config::new().with_agent("relay"));
    let (edge_handle, relay_handle) = tokio::join!(edge.start(), relay.start());
    assert_eq!(
        relay.negotiated_params().and_then(|p| p.remote_agent),
        Some("edge".to_owned())
    );
    let (edge, events) = SessionClient::with_events(edge_handle.unwrap());
    (SessionClient::new(relay_handle.unwrap()), edge, events)
}

#[tokio::test]
async fn open_accept_bind_and_echo_in_memory() {
    let (relay, edge, mut events) = pair().await;
    let serve = tokio::spawn(async move {
        let Some(ClientEvent::OpenRequest {
            request_id,
            service,
            ..
        }) = events.recv().await
        else {
            panic!("expected an open request");
        };
        assert_eq!(service.as_str(), "echo");
        let id = edge.allocate_stream_id();
        edge.accept_open(request_id, id).await.unwrap();
        let (mut send, mut recv) = edge.connection().open_bi().await.unwrap();
        edge.bind_stream(&mut send, id).await.unwrap();
        let mut buf = [0u8; 5];
        recv.read_exact(&mut buf).await.unwrap();
        send.write_all(&buf).await.unwrap();
        send.shutdown().await.unwrap();
    });
    let (mut send, mut recv) = relay.open("echo", Metadata::Empty).await.unwrap();
    send.write_all(b"hello").await.unwrap();
    let mut reply = Vec::new();
    recv.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"hello");
    serve.await.unwrap();
}

#[tokio::test]
async fn streams_reach_their_own_open_even_in_reverse_order() {
    let (relay, edge, mut events) = pair().await;
    let first = tokio::spawn({
        let relay = relay.clone();
        async move { relay.open("a", Metadata::Empty).await }
    });
    let second = tokio::spawn({
        let relay = relay.clone();
        async move { relay.open("b", Metadata::Empty).await }
    });
    let mut requests = Vec::new();
    for _ in 0..2 {
        let Some(ClientEvent::OpenRequest {
            request_id,
            service,
            ..
        }) = events.recv().await
        else {
            panic!("expected an open request");
        };
        requests.push((request_id, service));
    }
    // Accept both, then open the data streams in the opposite order.
    let mut ids = Vec::new();
    for (request_id, service) in &requests {
        let id = edge.allocate_stream_id();
        edge.accept_open(*request_id, id).await.unwrap();
        ids.push((id, service.clone()));
    }
    for (id, service) in ids.iter().rev() {
        let (mut send, _recv) = edge.connection().open_bi().await.unwrap();
        edge.bind_stream(&mut send, *id).await.unwrap();
        send.write_all(service.as_str().as_bytes()).await.unwrap();
        send.shutdown().await.unwrap();
    }
    for (open, expected) in [(first, "a"), (second, "b")] {
        let (_send, mut recv) = open.await.unwrap().unwrap();
        let mut got = String::new();
        recv.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, expected);
    }
}

#[tokio::test]
async fn close_fails_pending_opens_and_reaches_the_peer() {
    let (relay, _edge, mut events) = pair().await;
    let pending = tokio::spawn({
        let relay = relay.clone();
        async move { relay.open("never", Metadata::Empty).await }
    });
    assert!(matches!(
        events.recv().await,
        Some(ClientEvent::OpenRequest { .. })
    ));
    relay
        .close(CloseCode::Normal, Some("bye".into()))
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(result, Err(Error::SessionClosed)),
        "got {result:?}"
    );
    assert_eq!(relay.state(), State::Closed);
    let closing = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap();
    assert!(matches!(
        closing,
        Some(ClientEvent::Closing { code: CloseCode::Normal, reason: Some(reason) }) if reason == "bye"
    ));
}

#[tokio::test]
async fn start_twice_is_refused() {
    let (client_side, server_side) = memory_connection_pair();
    let edge = Session::new(client_side, Role::Client, Config::new());
    let relay = Session::new(server_side, Role::Server, Config::new());
    let (a, b) = tokio::join!(edge.start(), relay.start());
    a.unwrap();
    b.unwrap();
    assert!(matches!(edge.start().await, Err(Error::AlreadyStarted)));
}

#[tokio::test]
async fn invalid_config_is_refused_before_any_io() {
    let (client_side, _server_side) = memory_connection_pair();
    let edge = Session::new(
        client_side,
        Role::Client,
        Config::new().with_max_inflight_opens(0),
    );
    assert!(matches!(edge.start().await, Err(Error::Config(_))));
}
