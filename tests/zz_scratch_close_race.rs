mod support;
use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};
use std::net::SocketAddr;
use std::time::Duration;

async fn trial(ours: bool) -> (bool, String) {
    let identity = Identity::self_signed(&["localhost"]).unwrap();
    let trusted = identity.cert_chain.clone();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let relay_endpoint = server_endpoint(addr, identity, DEFAULT_ALPN).unwrap();
    let relay_addr = relay_endpoint.local_addr().unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<tokio::runtime::Handle>();
    let (result_tx, result_rx) = tokio::sync::oneshot::channel::<(bool, String)>();
    let edge_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.handle().clone();
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
                let (client, mut events) =
                    backhaul::SessionClient::with_events(session.start().await.unwrap());
                ready_tx.send(handle).unwrap();
                let mut seen = false;
                while let Ok(Some(ev)) =
                    tokio::time::timeout(Duration::from_secs(5), events.recv()).await
                {
                    if matches!(ev, backhaul::ClientEvent::Closing { .. }) {
                        seen = true;
                    }
                }
                let _ = result_tx.send((seen, format!("{:?}", client.closed().await)));
            } else {
                let session = quic_reverse::Session::new(
                    quic_reverse_transport::QuinnConnection::new(conn.clone()),
                    quic_reverse::Role::Client,
                    quic_reverse::Config::new(),
                );
                let (client, mut events) =
                    quic_reverse::SessionClient::with_events(session.start().await.unwrap());
                ready_tx.send(handle).unwrap();
                let mut seen = false;
                while let Ok(Some(ev)) =
                    tokio::time::timeout(Duration::from_secs(2), events.recv()).await
                {
                    if matches!(ev, quic_reverse::ClientEvent::Closing { .. }) {
                        seen = true;
                        break;
                    }
                }
                let _ = result_tx.send((seen, format!("{:?}", client.state())));
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
    let edge_rt = ready_rx.await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Freeze both edge workers.
    for _ in 0..2 {
        edge_rt.spawn(async {
            std::thread::sleep(Duration::from_millis(300));
        });
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    relay
        .close(quic_reverse::CloseCode::Normal, Some("bye".into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // StreamClose(0) is on the wire
    relay_conn.close(0u32.into(), b"");
    let result = result_rx.await.unwrap();
    tokio::task::spawn_blocking(move || edge_thread.join().unwrap())
        .await
        .unwrap();
    drop(relay_endpoint);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch_frozen_edge_mt() {
    for ours in [false, true] {
        let mut lost = 0;
        let mut terminals = std::collections::BTreeMap::new();
        for _ in 0..30 {
            let (seen, terminal) = trial(ours).await;
            if !seen {
                lost += 1;
            }
            *terminals.entry(terminal).or_insert(0) += 1;
        }
        eprintln!(
            "{} edge lost Closing {lost}/30; terminals {terminals:?}",
            if ours { "OUR" } else { "REFERENCE" }
        );
    }
}
