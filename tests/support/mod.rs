//! A relay + edge pair over real quinn on 127.0.0.1 with self-signed TLS, in a few lines.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use backhaul::{
    ClientEvent, Config, Connection, QuinnConnection, RejectCode, Role, SendStream, Session,
    SessionClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

mod quic;
#[allow(unused_imports)]
pub use quic::{quic_pair, quic_pair_with_alpn, QuicPair};

/// Set by `.ci/run`: there, a missing optional tool (Chromium, redis-server…) fails the
/// test instead of skipping it.
pub const REQUIRE_TOOLS_VAR: &str = "CI";

/// For a test that cannot run because `what` is missing: on a developer's machine it
/// prints why and the test passes as skipped; in CI (`CI` set) it fails.
pub fn skip_or_fail(what: &str) {
    if std::env::var_os(REQUIRE_TOOLS_VAR).is_some() {
        panic!("{what} ({REQUIRE_TOOLS_VAR} is set, so this test must run)");
    }
    eprintln!("SKIPPED: {what}");
}

/// A negotiated backhaul session pair: the relay opens, the edge accepts.
pub struct SessionPair {
    pub relay: SessionClient<QuinnConnection>,
    pub edge: SessionClient<QuinnConnection>,
    pub edge_events: mpsc::Receiver<ClientEvent>,
    pub quic: QuicPair,
}

/// A session pair with default configs.
pub async fn session_pair() -> SessionPair {
    session_pair_with(Config::new(), Config::new()).await
}

/// A session pair with the given configs.
pub async fn session_pair_with(relay_config: Config, edge_config: Config) -> SessionPair {
    start_sessions(quic_pair().await, relay_config, edge_config).await
}

/// Negotiates a session pair over an existing QUIC connection.
pub async fn start_sessions(
    quic: QuicPair,
    relay_config: Config,
    edge_config: Config,
) -> SessionPair {
    let relay = Session::new(
        QuinnConnection::new(quic.relay.clone()),
        Role::Server,
        relay_config,
    );
    let edge = Session::new(
        QuinnConnection::new(quic.edge.clone()),
        Role::Client,
        edge_config,
    );
    let (relay_handle, edge_handle) = tokio::join!(relay.start(), edge.start());
    let relay = SessionClient::new(relay_handle.expect("relay negotiation"));
    let (edge, edge_events) = SessionClient::with_events(edge_handle.expect("edge negotiation"));
    SessionPair {
        relay,
        edge,
        edge_events,
        quic,
    }
}

/// Serves the edge's events: "echo" echoes, "hello" writes `hello <metadata bytes>` and
/// finishes, "payload" writes `n` KiB of a pattern seeded by the metadata bytes,
/// everything else is rejected as unsupported.
pub fn serve_test_services(
    edge: SessionClient<QuinnConnection>,
    mut events: mpsc::Receiver<ClientEvent>,
) -> tokio::task::JoinHandle<Vec<ClientEvent>> {
    tokio::spawn(async move {
        let mut other_events = Vec::new();
        while let Some(event) = events.recv().await {
            let ClientEvent::OpenRequest {
                request_id,
                service,
                metadata,
            } = event
            else {
                other_events.push(event);
                continue;
            };
            if !matches!(service.as_str(), "echo" | "hello" | "payload" | "hold") {
                let reason = format!("no service named {service}");
                let _ = edge
                    .reject_open(request_id, RejectCode::UnsupportedService, Some(reason))
                    .await;
                continue;
            }
            let edge = edge.clone();
            tokio::spawn(async move {
                let id = edge.allocate_stream_id();
                edge.accept_open(request_id, id).await.expect("accept");
                let (mut send, recv) = edge.connection().open_bi().await.expect("open_bi");
                edge.bind_stream(&mut send, id).await.expect("bind");
                run_service(service.as_str(), metadata, send, recv).await;
                let _ = edge
                    .close_stream(id, backhaul::CloseCode::Normal, None)
                    .await;
            });
        }
        other_events
    })
}

async fn run_service(
    service: &str,
    metadata: backhaul::Metadata,
    mut send: backhaul::QuinnSendStream,
    mut recv: backhaul::QuinnRecvStream,
) {
    let seed = match &metadata {
        backhaul::Metadata::Bytes(bytes) => bytes.clone(),
        _ => Vec::new(),
    };
    match service {
        "echo" => {
            let _ = tokio::io::copy(&mut recv, &mut send).await;
        }
        "hello" => {
            let mut reply = b"hello ".to_vec();
            reply.extend_from_slice(&seed);
            let _ = send.write_all(&reply).await;
        }
        "payload" => {
            let _ = send.write_all(&pattern(&seed, 8 * 1024)).await;
        }
        "hold" => {
            let mut sink = Vec::new();
            let _ = recv.read_to_end(&mut sink).await;
        }
        _ => {}
    }
    let _ = send.finish().await;
}

/// `len` bytes determined by `seed`, different for different seeds.
pub fn pattern(seed: &[u8], len: usize) -> Vec<u8> {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed {
        state = (state ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Runs `future` but fails the test if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .expect("took too long")
}

/// The next open request on an edge's events (within 10 s), skipping other events:
/// its request id, service and metadata.
pub async fn next_open_request(
    events: &mut mpsc::Receiver<ClientEvent>,
) -> (u64, backhaul::ServiceId, backhaul::Metadata) {
    within(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Some(ClientEvent::OpenRequest {
                    request_id,
                    service,
                    metadata,
                }) => return (request_id, service, metadata),
                Some(_) => {}
                None => panic!("events ended before an open request"),
            }
        }
    })
    .await
}

/// Number of tasks alive in the current runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits (up to 5 s) until at most `expected` tasks are alive; returns the last count.
pub async fn settle_tasks(expected: usize) -> usize {
    for _ in 0..100 {
        if alive_tasks() <= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alive_tasks()
}

pub mod http;
pub mod peer;
pub mod proxy;
pub mod raw;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Whether the connection is still open.
pub fn is_open(connection: &QuinnConnection) -> bool {
    connection.is_open()
}
