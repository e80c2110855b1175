//! The ceiling for a tunnel's request rate: small HTTP/1 requests over raw quinn streams
//! between two processes, with backhaul's QUIC settings and nothing of backhaul's on top.
//!
//! A relay forwards a public request to its edge as HTTP/1 on a QUIC stream; this measures
//! that hop alone, so `scripts/compare.sh` can report how close the proxy comes to what
//! QUIC (quinn, with hyper on both ends) allows on the same machine.
//!
//! ```text
//! cargo run --release --example quic_ceiling -- server 127.0.0.1:5000 cert.pem
//! cargo run --release --example quic_ceiling -- client 127.0.0.1:5000 cert.pem 64 5
//! ```
//!
//! The server writes its self-signed certificate to the given path; the client trusts it,
//! opens one stream per concurrent worker (64 above) and sends GETs on each for the given
//! number of seconds (5 above), then prints `requests/s p50_ms p99_ms requests`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use backhaul::quic::{client_endpoint, load_certs, server_endpoint, Identity, DEFAULT_ALPN};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Runtime::new()?;
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server", addr, cert] => runtime.block_on(server(addr.parse()?, cert)),
        ["client", addr, cert, workers, seconds] => runtime.block_on(client(
            addr.parse()?,
            cert,
            workers.parse()?,
            Duration::from_secs(seconds.parse()?),
        )),
        _ => Err("usage: quic_ceiling server ADDR CERT | client ADDR CERT WORKERS SECONDS".into()),
    }
}

async fn server(addr: SocketAddr, cert_path: &str) -> Result<(), BoxError> {
    let identity = Identity::self_signed(&["localhost"])?;
    let pem = pem::encode(&pem::Pem::new(
        "CERTIFICATE",
        identity.cert_chain[0].to_vec(),
    ));
    std::fs::write(cert_path, pem)?;
    let endpoint = server_endpoint(addr, identity, DEFAULT_ALPN)?;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(async move {
                    let io = TokioIo::new(tokio::io::join(recv, send));
                    let service = hyper::service::service_fn(|_request: Request<_>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"hello from the backend\n",
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
    }
    Ok(())
}

async fn client(
    addr: SocketAddr,
    cert_path: &str,
    workers: usize,
    duration: Duration,
) -> Result<(), BoxError> {
    let endpoint = client_endpoint(&load_certs(cert_path)?, DEFAULT_ALPN)?;
    let connection = endpoint.connect(addr, "localhost")?.await?;
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let connection = connection.clone();
        tasks.spawn(async move {
            let (send, recv) = connection.open_bi().await?;
            let io = TokioIo::new(tokio::io::join(recv, send));
            let (mut sender, driver) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(driver);
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                let request = Request::get("/")
                    .header("host", "ceiling")
                    .body(Empty::<Bytes>::new())?;
                let response = sender.send_request(request).await?;
                response.into_body().collect().await?;
                latencies.push(started.elapsed());
            }
            Ok::<_, BoxError>(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result??);
    }
    latencies.sort_unstable();
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
        latencies
            .get(index)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{:.0} {:.3} {:.3} {}",
        latencies.len() as f64 / duration.as_secs_f64(),
        percentile(0.50),
        percentile(0.99),
        latencies.len()
    );
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(())
}
