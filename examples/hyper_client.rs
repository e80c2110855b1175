//! A pooled hyper client on the relay, an axum app on the edge, one QUIC connection between.
//!
//! The edge dials the relay (as a device behind NAT would) and serves an axum app as the
//! "web" service with an edge [`Router`] and [`backhaul::http::serve`]. The relay builds
//! `hyper_util`'s pooled client on a [`Connector`]: the URI's host names the service, and
//! each pooled HTTP/1.1 connection is one tunnel stream, reused with keep-alive.
//!
//! ```text
//! cargo run --example hyper_client
//! ```

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use backhaul::connector::Connector;
use backhaul::edge::Router;
use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};
use backhaul::stream::TunnelInfo;
use backhaul::{CloseCode, Config, Error, QuinnConnection, Role, Session, SessionClient};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use tokio::sync::oneshot;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The app the edge serves as "web".
fn app() -> axum::Router {
    use axum::extract::Path;
    use axum::routing::{get, post};

    axum::Router::new()
        .route("/", get(|| async { "hello from the edge" }))
        .route(
            "/echo",
            post(|body: String| async move { format!("you sent: {body}") }),
        )
        .route(
            "/n/{n}",
            get(|Path(n): Path<u64>| async move { format!("reply {n}") }),
        )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The relay: a public QUIC listener with a self-signed certificate the edge pins.
    let identity = Identity::self_signed(&["localhost"])?;
    let trusted = identity.cert_chain.clone();
    let relay_endpoint = server_endpoint("127.0.0.1:0".parse()?, identity, DEFAULT_ALPN)?;
    let relay_addr = relay_endpoint.local_addr()?;
    println!("relay: listening on {relay_addr}");

    // The edge dials out and serves "web" until the relay closes the session.
    let (edge_ready, edge_is_ready) = oneshot::channel();
    let edge = tokio::spawn(run_edge(relay_addr, trusted, edge_ready));

    let connection = relay_endpoint
        .accept()
        .await
        .ok_or("endpoint closed")?
        .await?;
    println!("relay: edge connected from {}", connection.remote_address());
    let session = Session::new(
        QuinnConnection::new(connection),
        Role::Server,
        Config::new().with_agent("hyper-client-relay"),
    );
    let relay = SessionClient::new(session.start().await?);
    edge_is_ready.await?;
    println!("relay: session ready");

    // hyper-util's pooled client; every connection it makes is a tunnel stream.
    let http: Client<Connector<QuinnConnection>, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(Connector::new(relay.clone()));

    let started = Instant::now();
    let response = http.get("http://web/".parse()?).await?;
    let stream = tunnel_of(&response);
    let (status, body) = read(response).await?;
    println!(
        "relay: GET  http://web/      -> {status} {body:?} in {:?} (tunnel stream {stream})",
        started.elapsed()
    );

    let request = Request::post("http://web/echo")
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(b"tunnels all the way down")))?;
    let started = Instant::now();
    let response = http.request(request).await?;
    let stream = tunnel_of(&response);
    let (status, body) = read(response).await?;
    println!(
        "relay: POST http://web/echo  -> {status} {body:?} in {:?} (tunnel stream {stream})",
        started.elapsed()
    );

    // Sequential requests reuse the pooled connection: the same tunnel stream each time.
    let mut streams = Vec::new();
    for n in 1..=5 {
        let response = http.get(format!("http://web/n/{n}").parse()?).await?;
        streams.push(tunnel_of(&response));
        let (status, _) = read(response).await?;
        assert_eq!(status, StatusCode::OK);
    }
    streams.dedup();
    println!("relay: 5 more GETs went over tunnel stream(s) {streams:?} (keep-alive)");

    // Concurrent requests make the pool open more tunnel streams.
    let requests: Vec<_> = (0..8)
        .map(|n| {
            let http = http.clone();
            tokio::spawn(async move {
                let response = http.get(format!("http://web/n/{n}").parse()?).await?;
                let stream = tunnel_of(&response);
                let (_, body) = read(response).await?;
                Ok::<_, BoxError>((body, stream))
            })
        })
        .collect();
    let mut concurrent = Vec::new();
    for request in requests {
        concurrent.push(request.await??);
    }
    let mut used: Vec<u64> = concurrent.iter().map(|(_, stream)| *stream).collect();
    used.sort_unstable();
    used.dedup();
    println!(
        "relay: 8 concurrent GETs answered {:?}… over {} tunnel stream(s)",
        concurrent[0].0,
        used.len()
    );

    // A service the edge does not serve: hyper reports a connect error, and the typed
    // backhaul::Error is in its source chain.
    match http.get("http://ssh/".parse()?).await {
        Ok(response) => println!("relay: \"ssh\" unexpectedly answered {}", response.status()),
        Err(error) => {
            println!(
                "relay: GET http://ssh/ failed: {error} (is_connect: {})",
                error.is_connect()
            );
            match find_tunnel_error(&error) {
                Some(Error::StreamRejected { code, reason }) => println!(
                    "relay:   source chain holds backhaul::Error::StreamRejected \
                     {{ code: {code}, reason: {reason:?} }}"
                ),
                Some(other) => println!("relay:   source chain holds backhaul::Error {other:?}"),
                None => println!("relay:   no backhaul::Error in the source chain: {error:?}"),
            }
        }
    }

    // Done: drop the pool (its tunnel streams finish), then close the session.
    drop(http);
    println!("relay: ping rtt {:?}", relay.ping().await?);
    relay
        .close(CloseCode::Normal, Some("demo done".into()))
        .await?;
    println!("relay: session closed");
    tokio::time::timeout(Duration::from_secs(10), edge).await???;
    relay_endpoint.wait_idle().await;
    println!("relay: done");
    Ok(())
}

/// The edge: dials the relay and serves the app as "web" with an edge Router.
async fn run_edge(
    relay_addr: SocketAddr,
    trusted: Vec<CertificateDer<'static>>,
    ready: oneshot::Sender<()>,
) -> Result<(), BoxError> {
    let endpoint = client_endpoint(&trusted, DEFAULT_ALPN)?;
    let connection = QuinnConnection::new(endpoint.connect(relay_addr, "localhost")?.await?);
    let session = Session::new(
        connection,
        Role::Client,
        Config::new().with_agent("hyper-client-edge"),
    );
    let (client, events) = SessionClient::with_events(session.start().await?);
    println!("edge: connected; serving \"web\" (axum)");
    let _ = ready.send(());

    let serving = Router::new()
        .route("web", backhaul::http::serve(app()))
        .serve(client, events)
        .drain_timeout(Duration::from_secs(5))
        .into_future();
    // Ok after a graceful close; the session's end error if the connection was lost.
    serving.await?;
    println!("edge: the relay closed the session; serving ended cleanly");
    endpoint.close(0u32.into(), b"bye");
    endpoint.wait_idle().await;
    Ok(())
}

/// The logical id of the tunnel stream a response came over (the pooled client copies the
/// connection's [`TunnelInfo`] into each response's extensions).
fn tunnel_of<B>(response: &Response<B>) -> u64 {
    response
        .extensions()
        .get::<TunnelInfo>()
        .map_or(0, |info| info.logical_stream_id)
}

/// The status and the body as text.
async fn read(response: Response<Incoming>) -> Result<(StatusCode, String), BoxError> {
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The first `backhaul::Error` in an error's `source()` chain.
fn find_tunnel_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<Error>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}
