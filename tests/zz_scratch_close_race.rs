mod support;
use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};
use std::net::SocketAddr;
use std::time::Duration;

/// Runs the edge on its own current-thread runtime so it can be frozen.
/// Returns (saw_closing, description of terminal)
async fn trial(ours: bool) -> (bool, String) {
    let identity = Identity::self_signed(&["localhost"]).unwrap();
    let trusted = identity.cert_chain.clone();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let relay_endpoint = server_endpoint(addr, identity, DEFAULT_ALPN).unwrap();
    let relay_addr = relay_endpoint.local_addr().unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let (freeze_tx, freeze_rx) = tokio::sync::oneshot::channel::<()>();
    let edge_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let endpoint = client_endpoint(&trusted, DEFAULT_ALPN).unwrap();
            let conn = endpoint
                .connect(relay_addr, "localhost")
                .unwrap()
                .await
                .unwrap();
            if ours {
                let session = backhaul::Session::new(
                    backhaul::QuinnConnection::new(conn.clone()),
                    backhaul::Role::Client,
                    backhaul::Config::new(),
                );
                let handle = session.start().await.unwrap();
                let (client, mut events) = backhaul::SessionClient::with_events(handle);
                ready_tx.send(()).unwrap();
                freeze_rx.await.unwrap();
                std::thread::sleep(Duration::from_millis(400));
                let mut seen = false;
                while let Ok(Some(ev)) =
                    tokio::time::timeout(Duration::from_secs(5), events.recv()).await
                {
                    if matches!(ev, backhaul::ClientEvent::Closing { .. }) {
                        seen = true;
                    }
                }
                (seen, format!("{:?}", client.closed().await))
            } else {
                let session = quic_reverse::Session::new(
                    quic_reverse_transport::QuinnConnection::new(conn.clone()),
                    quic_reverse::Role::Client,
                    quic_reverse::Config::new(),
                );
                let handle = session.start().await.unwrap();
                let (client, mut events) = quic_reverse::SessionClient::with_events(handle);
                ready_tx.send(()).unwrap();
                freeze_rx.await.unwrap();
                std::thread::sleep(Duration::from_millis(400));
                let mut seen = false;
                while let Ok(Some(ev)) =
                    tokio::time::timeout(Duration::from_secs(2), events.recv()).await
                {
                    if matches!(ev, quic_reverse::ClientEvent::Closing { .. }) {
                        seen = true;
                        break;
                    }
                }
                (seen, format!("{:?}", client.state()))
            }
        })
    });
    let relay_conn = relay_endpoint.accept().await.unwrap().await.unwrap();
    let relay_session = quic_reverse::Session::new(
        quic_reverse_transport::QuinnConnection::new(relay_conn.clone()),
        quic_reverse::Role::Server,
        quic_reverse::Config::new(),
    );
    let relay = quic_reverse::SessionClient::new(relay_session.start().await.unwrap());
    ready_rx.await.unwrap();
    freeze_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await; // edge is frozen now
    relay
        .close(quic_reverse::CloseCode::Normal, Some("bye".into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // the StreamClose(0) goes on the wire
    relay_conn.close(0u32.into(), b"");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let result = tokio::task::spawn_blocking(move || edge_thread.join().unwrap())
        .await
        .unwrap();
    drop(relay_endpoint);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch_frozen_edge() {
    for ours in [false, true] {
        let mut lost = 0;
        let mut terminals = std::collections::BTreeMap::new();
        for _ in 0..20 {
            let (seen, terminal) = trial(ours).await;
            if !seen {
                lost += 1;
            }
            *terminals.entry(terminal).or_insert(0) += 1;
        }
        eprintln!(
            "{} edge lost Closing {lost}/20; terminals {terminals:?}",
            if ours { "OUR" } else { "REFERENCE" }
        );
    }
}
