mod support;
use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Edge on its own multi-thread runtime (like a separate process). Returns whether Closing was seen.
fn run_edge(
    ours: bool,
    trusted: Vec<rustls::pki_types::CertificateDer<'static>>,
    relay_addr: SocketAddr,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
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
            let seen = if ours {
                use backhaul::Connection as _;
                let session = backhaul::Session::new(
                    backhaul::QuinnConnection::new(conn.clone()),
                    backhaul::Role::Client,
                    backhaul::Config::new(),
                );
                let (client, mut events) =
                    backhaul::SessionClient::with_events(session.start().await.unwrap());
                let mut seen = false;
                while let Some(ev) = events.recv().await {
                    match ev {
                        backhaul::ClientEvent::OpenRequest { request_id, .. } => {
                            let id = client.allocate_stream_id();
                            client.accept_open(request_id, id).await.unwrap();
                            let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
                            client.bind_stream(&mut send, id).await.unwrap();
                            tokio::spawn(async move {
                                let _ = tokio::io::copy(&mut recv, &mut send).await;
                                let _ = send.shutdown().await;
                            });
                        }
                        backhaul::ClientEvent::Closing { .. } => {
                            seen = true;
                            break;
                        }
                        _ => {}
                    }
                }
                let _ = client.close(backhaul::CloseCode::Normal, None).await;
                seen
            } else {
                use quic_reverse_transport::Connection as _;
                let session = quic_reverse::Session::new(
                    quic_reverse_transport::QuinnConnection::new(conn.clone()),
                    quic_reverse::Role::Client,
                    quic_reverse::Config::new(),
                );
                let (client, mut events) =
                    quic_reverse::SessionClient::with_events(session.start().await.unwrap());
                let mut seen = false;
                let mut next = 1;
                while let Some(ev) = events.recv().await {
                    match ev {
                        quic_reverse::ClientEvent::OpenRequest { request_id, .. } => {
                            let id = next;
                            next += 1;
                            client.accept_open(request_id, id).await.unwrap();
                            let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
                            client.bind_stream(&mut send, id).await.unwrap();
                            tokio::spawn(async move {
                                let _ = tokio::io::copy(&mut recv, &mut send).await;
                                let _ = send.shutdown().await;
                            });
                        }
                        quic_reverse::ClientEvent::Closing { .. } => {
                            seen = true;
                            break;
                        }
                        _ => {}
                    }
                }
                let _ = client.close(quic_reverse::CloseCode::Normal, None).await;
                seen
            };
            drop(conn);
            let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
            seen
        })
    })
}

async fn relay_flow_ours(conn: quinn::Connection) {
    let session = backhaul::Session::new(
        backhaul::QuinnConnection::new(conn),
        backhaul::Role::Server,
        backhaul::Config::new(),
    );
    let client = backhaul::SessionClient::new(session.start().await.unwrap());
    let (mut send, mut recv) = client
        .open("echo", backhaul::Metadata::Empty)
        .await
        .unwrap();
    send.write_all(b"hello").await.unwrap();
    send.shutdown().await.unwrap();
    let mut v = Vec::new();
    recv.read_to_end(&mut v).await.unwrap();
    client
        .close(backhaul::CloseCode::Normal, Some("done".into()))
        .await
        .unwrap();
}

async fn relay_flow_theirs(conn: quinn::Connection) {
    let session = quic_reverse::Session::new(
        quic_reverse_transport::QuinnConnection::new(conn),
        quic_reverse::Role::Server,
        quic_reverse::Config::new(),
    );
    let client = quic_reverse::SessionClient::new(session.start().await.unwrap());
    let (mut send, mut recv) = client
        .open("echo", quic_reverse::Metadata::Empty)
        .await
        .unwrap();
    send.write_all(b"hello").await.unwrap();
    send.shutdown().await.unwrap();
    let mut v = Vec::new();
    recv.read_to_end(&mut v).await.unwrap();
    client
        .close(quic_reverse::CloseCode::Normal, Some("done".into()))
        .await
        .unwrap();
}

async fn trial(relay_ours: bool, edge_ours: bool) -> bool {
    let identity = Identity::self_signed(&["localhost"]).unwrap();
    let trusted = identity.cert_chain.clone();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let relay_endpoint = server_endpoint(addr, identity, DEFAULT_ALPN).unwrap();
    let edge = run_edge(edge_ours, trusted, relay_endpoint.local_addr().unwrap());
    let conn = relay_endpoint.accept().await.unwrap().await.unwrap();
    let task = if relay_ours {
        tokio::spawn(relay_flow_ours(conn))
    } else {
        tokio::spawn(relay_flow_theirs(conn))
    };
    task.await.unwrap();
    let seen = tokio::task::spawn_blocking(move || edge.join().unwrap())
        .await
        .unwrap();
    drop(relay_endpoint);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch_example_flow() {
    for (relay_ours, edge_ours) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut lost = 0;
        for _ in 0..30 {
            if !trial(relay_ours, edge_ours).await {
                lost += 1;
            }
        }
        eprintln!(
            "relay={} edge={}: edge lost Closing {lost}/30",
            if relay_ours { "ours" } else { "ref" },
            if edge_ours { "ours" } else { "ref" }
        );
    }
}
