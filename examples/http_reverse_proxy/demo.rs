//! The all-in-one mode: a relay, one edge and a demo web app in one process on loopback,
//! so a newcomer sees the whole path work with one command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use backhaul::quic::Identity;
use backhaul::tls::CertificateFiles;
use bytes::Bytes;
use clap::Args;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tracing::info;

use crate::edge::{run_edge, EdgeConfig, Upstream};
use backhaul::http::proxy::Linger;
use backhaul::http::server::Limits;

use crate::relay::{start, EdgeLimits, HttpsSettings, PoolLimits, RelayConfig, Tokens};
use crate::{shutdown_signal, BoxError};

const EDGE_NAME: &str = "demo";

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Public HTTP listener (falls back to a free port if taken).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Admin listener (/healthz, /metrics).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin_listen: SocketAddr,
    /// Also serve HTTPS here, with --tls-cert and --tls-key (e.g. a certificate for
    /// `*.localhost`).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub https_listen: Option<SocketAddr>,
    /// The PEM certificate chain for --https-listen.
    #[arg(long, requires = "https_listen")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key for --https-listen.
    #[arg(long, requires = "https_listen")]
    pub tls_key: Option<PathBuf>,
    /// Check the path once, then exit (status 0 if it works).
    #[arg(long)]
    pub exit_after_check: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            http_listen: ([127, 0, 0, 1], 8080).into(),
            admin_listen: ([127, 0, 0, 1], 0).into(),
            https_listen: None,
            tls_cert: None,
            tls_key: None,
            exit_after_check: false,
        }
    }
}

pub async fn run(args: DemoArgs) -> Result<(), BoxError> {
    let web = TcpListener::bind("127.0.0.1:0").await?;
    let web_addr = web.local_addr()?;
    tokio::spawn(async move { axum::serve(web, demo_app()).await });

    let http_listen = match TcpListener::bind(args.http_listen).await {
        Ok(probe) => {
            drop(probe);
            args.http_listen
        }
        Err(_) => {
            info!(taken = %args.http_listen, "HTTP port taken; using a free one");
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    let identity = Identity::self_signed(&["localhost"])?;
    let trusted = identity.cert_chain.clone();
    let token = format!("{:016x}", random_u64());
    let tokens = Tokens::new().with(EDGE_NAME, token.clone())?;
    let https = match (args.https_listen, args.tls_cert, args.tls_key) {
        (Some(listen), Some(cert), Some(key)) => Some(HttpsSettings {
            listen,
            certificates: vec![CertificateFiles::new(cert, key)],
            redirect_http: false,
        }),
        _ => None,
    };
    let relay = start(RelayConfig {
        tcp: Vec::new(),
        https,
        quic_listen: ([127, 0, 0, 1], 0).into(),
        http_listen,
        admin_listen: args.admin_listen,
        domain: "localhost".to_owned(),
        default_service: "web".to_owned(),
        identity,
        tokens,
        keepalive: Duration::from_secs(5),
        open_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(60),
        shutdown_timeout: Duration::from_secs(5),
        listen_backlog: backhaul::listener::DEFAULT_BACKLOG,
        public_limits: Limits::default(),
        upstream_idle_timeout: Duration::from_secs(60),
        linger: Linger::DEFAULT,
        edge_probe_timeout: Duration::from_secs(1),
        trusted_proxies: Default::default(),
        edge_limits: EdgeLimits::default(),
        pool: PoolLimits::default(),
        list_edges: true,
        express: true,
        cluster: None,
    })
    .await?;

    let (stop_edge, edge_stopped) = tokio::sync::oneshot::channel::<()>();
    let edge = tokio::spawn(run_edge(
        EdgeConfig {
            relay: relay.quic_addr.to_string(),
            trusted,
            trusted_from: "the demo relay's certificate".to_owned(),
            server_name: "localhost".to_owned(),
            name: EDGE_NAME.to_owned(),
            token,
            services: vec![(
                "web".to_owned(),
                Upstream::Http(format!("http://{web_addr}").parse()?),
            )],
            rewrite_host: false,
            keepalive: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(5),
            upstream_idle_timeout: Duration::from_secs(60),
            pass_through_answer_timeout: backhaul::http::proxy::DEFAULT_ANSWER_TIMEOUT,
            max_streams: 1000,
            max_backoff: Duration::from_secs(5),
            lanes: 1,
            connect_timeout: Duration::from_secs(10),
            attach_all: false,
        },
        async {
            let _ = edge_stopped.await;
        },
    ));

    let port = relay.http_addr.port();
    let url = format!("http://{EDGE_NAME}.localhost:{port}/");
    let checked = self_check(relay.http_addr, &format!("{EDGE_NAME}.localhost:{port}")).await;
    println!();
    println!("  backhaul demo: relay, edge \"{EDGE_NAME}\" and a web app, all on loopback");
    println!();
    println!("  open        {url}");
    if let Some(https) = relay.https_addr {
        println!(
            "  open        https://{EDGE_NAME}.localhost:{}/",
            https.port()
        );
    }
    println!("  metrics     http://{}/metrics", relay.admin_addr);
    println!(
        "  self-check  {}",
        match &checked {
            Ok(elapsed) => format!("GET {url} through the tunnel: 200 OK in {elapsed:?}"),
            Err(error) => format!("FAILED: {error}"),
        }
    );
    println!();
    println!("  separate processes:  ... -- relay --edge-token demo=SECRET");
    println!("                       ... -- edge --name demo --token SECRET --expose web=http://127.0.0.1:3000");
    println!();
    if !args.exit_after_check {
        println!("  Ctrl-C to stop");
        shutdown_signal().await;
    }
    let _ = stop_edge.send(());
    let _ = edge.await;
    relay.shutdown().await;
    checked.map(|_| ())
}

/// Fetches the demo page through the relay until it answers (the edge may still be
/// registering), at most for 10 s.
async fn self_check(relay: SocketAddr, host: &str) -> Result<Duration, BoxError> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let started = Instant::now();
    loop {
        let request = Request::get(format!("http://{relay}/"))
            .header(http::header::HOST, host)
            .body(Empty::new())?;
        let attempt = Instant::now();
        let response = client.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if status == StatusCode::OK && body.starts_with(b"<!doctype html>") {
            return Ok(attempt.elapsed());
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "the relay answered {status}: {}",
                String::from_utf8_lossy(&body)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}

const PAGE: &str = r#"<!doctype html>
<html>
<head><meta charset="utf-8"><title>backhaul demo</title></head>
<body>
<h1>Served by an edge, through a backhaul tunnel</h1>
<p>This page came from a web app on the edge, which has no open port: the relay reached it
over the QUIC connection the edge dialed out.</p>
<p>WebSocket: <span id="status">connecting…</span></p>
<pre id="echo"></pre>
<script>
  const status = document.getElementById("status");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.onopen = () => { status.textContent = "open"; socket.send("hello through the tunnel"); };
  socket.onmessage = (event) => {
    document.getElementById("echo").textContent = event.data;
    status.textContent = "echo received";
  };
  socket.onerror = () => { status.textContent = "error"; };
</script>
</body>
</html>
"#;

/// The demo web app the edge exposes: a page whose script talks WebSocket to the edge.
pub fn demo_app() -> axum::Router {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use axum::response::Html;
    use axum::routing::get;

    axum::Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/ws",
            get(|upgrade: WebSocketUpgrade| async move {
                upgrade.on_upgrade(|mut socket| async move {
                    while let Some(Ok(message)) = socket.recv().await {
                        if let Message::Text(text) = message {
                            let reply = format!("echo: {}", text.as_str());
                            if socket.send(Message::Text(reply.into())).await.is_err() {
                                break;
                            }
                        }
                    }
                })
            }),
        )
        .route(
            "/headers",
            get(|headers: http::HeaderMap| async move {
                let mut lines: Vec<String> = headers
                    .iter()
                    .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or("?")))
                    .collect();
                lines.sort();
                lines.join("\n")
            }),
        )
}
