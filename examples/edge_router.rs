//! An edge `Router` with several kinds of routes, served with graceful shutdown.
//!
//! Routes:
//! - "echo": a raw `tower::service_fn` that echoes bytes, behind `concurrency_limit(2)` and
//!   `timeout(1 s)` layers (a full limit is answered at once with `LimitExceeded`);
//! - "web": an axum app via [`backhaul::http::serve`];
//! - "time": a one-shot service that writes the time and finishes;
//! - a fallback that answers any other name, on the first of two edge sessions. The second
//!   session serves the same routes without a fallback, so unknown names are rejected.
//!
//! The relay and the edges run in one process on loopback. Serving stops gracefully on
//! Ctrl-C or when the demo finishes: new opens are refused with `ServiceUnavailable` while
//! in-flight requests complete.
//!
//! ```text
//! cargo run --example edge_router
//! ```

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backhaul::connector::Connector;
use backhaul::edge::Router;
use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};
use backhaul::stream::TunnelStream;
use backhaul::{CloseCode, Config, Error, QuinnConnection, Role, Session, SessionClient};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tower::ServiceBuilder;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Stream = TunnelStream<QuinnConnection>;

/// How many "echo" streams may run at once.
const ECHO_LIMIT: usize = 2;
/// How long one "echo" stream may last.
const ECHO_TIMEOUT: Duration = Duration::from_secs(1);

/// The routes both edge sessions serve.
fn routes() -> Router<QuinnConnection> {
    let echo = tower::service_fn(|mut stream: Stream| async move {
        let (mut reader, mut writer) = tokio::io::split(&mut stream);
        let copied = tokio::io::copy(&mut reader, &mut writer).await?;
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(copied)
    });
    let time = tower::service_fn(|mut stream: Stream| async move {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let answer = format!("unix time {}.{:03}", now.as_secs(), now.subsec_millis());
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    });
    let web = axum::Router::new()
        .route("/", axum::routing::get(|| async { "hello from axum" }))
        .route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "slow but finished"
            }),
        );
    Router::new()
        .route(
            "echo",
            ServiceBuilder::new()
                .concurrency_limit(ECHO_LIMIT)
                .timeout(ECHO_TIMEOUT)
                .service(echo),
        )
        .route("web", backhaul::http::serve(web))
        .route("time", time)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Graceful shutdown begins on Ctrl-C or when the demo is done, whichever comes first.
    let (shutdown, shutdown_signal) = watch::channel(false);
    let (interrupt, mut interrupted) = watch::channel(false);
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                println!("^C: beginning graceful shutdown");
                let _ = interrupt.send(true);
                let _ = shutdown.send(true);
            }
        }
    });

    let identity = Identity::self_signed(&["localhost"])?;
    let trusted = identity.cert_chain.clone();
    let relay_endpoint = server_endpoint("127.0.0.1:0".parse()?, identity, DEFAULT_ALPN)?;
    let relay_addr = relay_endpoint.local_addr()?;
    println!("relay: listening on {relay_addr}");

    // Two edge sessions (two QUIC connections): the same routes, with and without fallback.
    let mut edges = Vec::new();
    let mut relays = Vec::new();
    for (name, router) in [
        (
            "edge-with-fallback",
            routes().fallback(tower::service_fn(fallback)),
        ),
        ("edge-without-fallback", routes()),
    ] {
        println!("{name}: serving {router:?}");
        edges.push(tokio::spawn(run_edge(
            name,
            relay_addr,
            trusted.clone(),
            router,
            shutdown_signal.clone(),
        )));
        relays.push(accept_edge(&relay_endpoint).await?);
    }
    let (with_fallback, without_fallback) = (&relays[0], &relays[1]);

    let demo = async {
        demo_routes(with_fallback, without_fallback).await?;
        demo_graceful_shutdown(with_fallback, &shutdown).await
    };
    tokio::select! {
        result = demo => result?,
        _ = interrupted.wait_for(|stop| *stop) => println!("relay: demo interrupted"),
    }
    let _ = shutdown.send(true);

    // Each edge closes its session once drained; then the relay hangs up.
    for relay in &relays {
        let ended = tokio::time::timeout(Duration::from_secs(10), relay.closed()).await?;
        println!("relay: a session ended: {ended}");
    }
    relay_endpoint.close(0u32.into(), b"bye");
    for edge in edges {
        tokio::time::timeout(Duration::from_secs(10), edge).await???;
    }
    relay_endpoint.wait_idle().await;
    println!("relay: done");
    Ok(())
}

/// Answers every name without a route of its own.
async fn fallback(mut stream: Stream) -> std::io::Result<()> {
    let answer = format!(
        "fallback here: no route named {:?}",
        stream.service().as_str()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}

/// Accepts one edge connection and starts the relay's side of its session.
async fn accept_edge(
    endpoint: &quinn::Endpoint,
) -> Result<SessionClient<QuinnConnection>, BoxError> {
    let connection = endpoint.accept().await.ok_or("endpoint closed")?.await?;
    let session = Session::new(
        QuinnConnection::new(connection),
        Role::Server,
        Config::new().with_agent("router-relay"),
    );
    let relay = SessionClient::new(session.start().await?);
    let agent = session.negotiated_params().and_then(|p| p.remote_agent);
    println!(
        "relay: session with {} ready",
        agent.as_deref().unwrap_or("?")
    );
    Ok(relay)
}

/// Opens a raw stream to `service`, writes `input` (if any), finishes, reads the answer.
async fn exchange(
    relay: &SessionClient<QuinnConnection>,
    service: &str,
    input: &[u8],
) -> Result<String, BoxError> {
    let mut stream = Connector::new(relay.clone()).connect(service).await?;
    if !input.is_empty() {
        stream.write_all(input).await?;
    }
    stream.shutdown().await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

async fn demo_routes(
    with_fallback: &SessionClient<QuinnConnection>,
    without_fallback: &SessionClient<QuinnConnection>,
) -> Result<(), BoxError> {
    // "echo": a raw tower service.
    let answer = exchange(with_fallback, "echo", b"ping through the tunnel").await?;
    println!("relay: echo  answered {answer:?}");

    // "time": one-shot.
    let answer = exchange(with_fallback, "time", b"").await?;
    println!("relay: time  answered {answer:?}");

    // "web": axum, through hyper-util's pooled client.
    let http: Client<_, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(Connector::new(with_fallback.clone()));
    let response = http.get("http://web/".parse()?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "relay: web   answered {status} {:?}",
        String::from_utf8_lossy(&body)
    );

    // An unknown name: the fallback answers on one edge; the other rejects it.
    let answer = exchange(with_fallback, "metrics", b"").await?;
    println!("relay: metrics (edge with fallback) answered {answer:?}");
    match Connector::new(without_fallback.clone())
        .connect("metrics")
        .await
    {
        Err(Error::StreamRejected { code, reason }) => println!(
            "relay: metrics (edge without fallback) rejected: {code} ({})",
            reason.unwrap_or_default()
        ),
        Err(other) => println!("relay: metrics (edge without fallback): unexpected {other}"),
        Ok(_) => println!("relay: metrics (edge without fallback): unexpectedly accepted"),
    }

    // "echo" takes ECHO_LIMIT streams at once: hold that many open, one more is refused at
    // once with LimitExceeded (never queued), and the timeout layer ends the held ones.
    let mut connector = Connector::new(with_fallback.clone());
    let mut held = Vec::new();
    for _ in 0..ECHO_LIMIT {
        let mut stream = connector.connect("echo").await?;
        stream.write_all(b"holding").await?;
        held.push(stream);
    }
    let started = Instant::now();
    match connector.connect("echo").await {
        Err(error @ Error::StreamRejected { .. }) => println!(
            "relay: echo #{} while {ECHO_LIMIT} are held: {error} (retryable: {})",
            ECHO_LIMIT + 1,
            error.is_retryable()
        ),
        Err(other) => println!("relay: echo #{}: unexpected {other}", ECHO_LIMIT + 1),
        Ok(_) => println!("relay: echo #{}: unexpectedly accepted", ECHO_LIMIT + 1),
    }
    for mut stream in held {
        let mut echoed = Vec::new();
        // The edge's side ends when the timeout layer drops the service's future.
        let _ = stream.read_to_end(&mut echoed).await;
        println!(
            "relay: held echo stream {} ended after {:.1?} (timeout {ECHO_TIMEOUT:?}), \
             echoed {:?}",
            stream.logical_stream_id(),
            started.elapsed(),
            String::from_utf8_lossy(&echoed)
        );
    }
    // Its slots are free again.
    let answer = exchange(with_fallback, "echo", b"free again").await?;
    println!("relay: echo  answered {answer:?} once the limit had room");
    Ok(())
}

/// Begins a graceful shutdown while a slow request is in flight: new opens are refused,
/// the in-flight request still completes.
async fn demo_graceful_shutdown(
    relay: &SessionClient<QuinnConnection>,
    shutdown: &watch::Sender<bool>,
) -> Result<(), BoxError> {
    let http: Client<_, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(Connector::new(relay.clone()));
    let in_flight = tokio::spawn(async move {
        let response = http.get("http://web/slow".parse()?).await?;
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, BoxError>(String::from_utf8_lossy(&body).into_owned())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    println!("relay: demo done, asking the edges to shut down gracefully");
    let _ = shutdown.send(true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    match exchange(relay, "time", b"").await {
        Err(error) => println!("relay: time during the drain: {error}"),
        Ok(answer) => println!("relay: time during the drain answered {answer:?}"),
    }
    println!(
        "relay: in-flight GET /slow finished: {:?}",
        in_flight.await??
    );
    Ok(())
}

/// An edge: dials the relay and serves `router` until shutdown.
async fn run_edge(
    name: &'static str,
    relay_addr: SocketAddr,
    trusted: Vec<CertificateDer<'static>>,
    router: Router<QuinnConnection>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BoxError> {
    let endpoint = client_endpoint(&trusted, DEFAULT_ALPN)?;
    let connection = endpoint.connect(relay_addr, "localhost")?.await?;
    let session = Session::new(
        QuinnConnection::new(connection.clone()),
        Role::Client,
        Config::new().with_agent(name),
    );
    let (client, events) = SessionClient::with_events(session.start().await?);
    let started = Instant::now();
    router
        .serve(client.clone(), events)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .drain_timeout(Duration::from_secs(5))
        .into_future()
        .await?;
    println!(
        "{name}: drained and stopped serving after {:.1?}",
        started.elapsed()
    );
    client
        .close(CloseCode::Normal, Some("edge shutting down".into()))
        .await?;
    // The relay hangs up once it has seen the close.
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
    endpoint.wait_idle().await;
    Ok(())
}
