//! HTTPS on the reverse proxy example's public side (`relay --https-listen --tls-cert
//! --tls-key`), checked with curl as a user would: HTTP/2 and HTTP/1.1 by ALPN, the
//! certificate chosen by SNI (a wildcard), `X-Forwarded-Proto: https` at the edge's
//! service, plain HTTP redirected, and certificates reloaded on SIGHUP without dropping a
//! request in flight; and server-sent events cross the relay unbuffered.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use http::{Method, StatusCode};
use support::proxy::{bounded, self_signed_pem, Backend, PemCertificate, Relay, TempDir};

const LIMIT: Duration = Duration::from_secs(90);
const DOMAIN: &str = "tunnel.test";

/// A self-signed certificate for `*.tunnel.test` written as PEM to `<dir>/<tag>-*.pem`.
fn wildcard_cert(dir: &Path, tag: &str) -> PemCertificate {
    self_signed_pem(dir, tag, &[format!("*.{DOMAIN}")])
}

fn curl_available() -> bool {
    Command::new("curl").arg("--version").output().is_ok()
}

/// curl `https://<edge>.tunnel.test:<port><path>` trusting `ca`, with `extra` options;
/// prints the HTTP version after the body.
fn curl(port: u16, edge: &str, path: &str, ca: &Path, extra: &[&str]) -> Output {
    let host = format!("{edge}.{DOMAIN}");
    Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .args(["-w", "\n%{http_version}"])
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("running curl")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_h2_and_h1_redirects_and_reloads_on_sighup() {
    if !curl_available() {
        support::skip_or_fail("curl is not installed (apt-get install curl)");
        return;
    }
    bounded(LIMIT, async {
        let dir = TempDir::new("https");
        let tls = wildcard_cert(dir.path(), "first");
        let (cert, key) = (tls.cert.clone(), tls.key.clone());
        let (mut relay, https) = Relay::start_https(
            dir.path(),
            &[("kiosk", "kiosk-token")],
            DOMAIN,
            &tls,
            &["--redirect-http"],
        )
        .await;
        let app = Backend::start("kiosk").await;
        let _edge = relay.spawn_edge("kiosk", "kiosk-token", &[("web", app.addr)], &[]);
        relay.wait_edges(1).await;
        let port = https.port();

        // HTTP/2 and HTTP/1.1, as the client asks by ALPN.
        let h2 = tokio::task::spawn_blocking({
            let cert = cert.clone();
            move || curl(port, "kiosk", "/whoami", &cert, &["--http2"])
        })
        .await
        .unwrap();
        assert!(h2.status.success(), "curl --http2: {h2:?}");
        assert_eq!(stdout(&h2), "kiosk\n2");
        let h1 = tokio::task::spawn_blocking({
            let cert = cert.clone();
            move || curl(port, "kiosk", "/headers", &cert, &["--http1.1"])
        })
        .await
        .unwrap();
        assert!(h1.status.success(), "curl --http1.1: {h1:?}");
        let headers = stdout(&h1);
        assert!(headers.ends_with("\n1.1"), "{headers}");
        assert!(
            headers.contains("x-forwarded-proto: https"),
            "the edge's service is told the client used HTTPS: {headers}"
        );

        // Plain HTTP is redirected to the same place over HTTPS.
        let public = relay.public();
        let request = public.request(
            Method::GET,
            &public.host("kiosk"),
            "/whoami?x=1",
            support::proxy::empty(),
        );
        let response = public.send(request).await;
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        let location = response.headers()[http::header::LOCATION].to_str().unwrap();
        // The same host the client named, the HTTPS port, the same path and query.
        let expected_end = format!(":{port}/whoami?x=1");
        assert!(
            location.starts_with("https://kiosk.") && location.ends_with(&expected_end),
            "{location}"
        );

        // A request in flight while the certificates are replaced and SIGHUP arrives.
        let long = tokio::task::spawn_blocking({
            let cert = cert.clone();
            move || curl(port, "kiosk", "/hold/4000", &cert, &["--http2"])
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let PemCertificate {
            cert: new_cert,
            key: new_key,
            ..
        } = wildcard_cert(dir.path(), "second");
        let old_cert = dir.path().join("old-cert.pem");
        std::fs::copy(&cert, &old_cert).unwrap();
        std::fs::copy(&new_cert, &cert).unwrap();
        std::fs::copy(&new_key, &key).unwrap();
        let hup = Command::new("kill")
            .args(["-HUP", &relay.proc.id().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(hup.success());
        // New handshakes present the new certificate: trusted with it, refused with the old.
        let mut reloaded = false;
        for _ in 0..50 {
            let output = tokio::task::spawn_blocking({
                let new_cert = new_cert.clone();
                move || curl(port, "kiosk", "/whoami", &new_cert, &[])
            })
            .await
            .unwrap();
            if output.status.success() {
                assert_eq!(stdout(&output), "kiosk\n2");
                reloaded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(reloaded, "the new certificate was never served");
        let old =
            tokio::task::spawn_blocking(move || curl(port, "kiosk", "/whoami", &old_cert, &[]))
                .await
                .unwrap();
        assert!(
            !old.status.success(),
            "the old certificate is no longer served"
        );
        let long = long.await.unwrap();
        assert!(long.status.success(), "the request in flight: {long:?}");
        assert_eq!(stdout(&long), "held 4000 ms\n2");
        // The relay says it reloaded.
        relay
            .proc
            .wait_for_output("HTTPS certificates reloaded", |logs| {
                logs.contains("HTTPS certificates reloaded")
            })
            .await;
    })
    .await;
}

/// Server-sent events cross relay and edge unbuffered: the first event reaches the client
/// while the backend is still holding the stream open, seconds before the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_unbuffered() {
    use axum::response::sse::{Event, Sse};
    use http_body_util::BodyExt;

    bounded(LIMIT, async {
        let app = axum::Router::new().route(
            "/events",
            axum::routing::get(|| async {
                let events = futures_util::stream::unfold(0u32, |sent| async move {
                    match sent {
                        0 => Some((
                            Ok::<_, std::convert::Infallible>(Event::default().data("one")),
                            1,
                        )),
                        1 => {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            Some((Ok(Event::default().data("two")), 2))
                        }
                        _ => None,
                    }
                });
                Sse::new(events)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let dir = TempDir::new("sse");
        let mut relay = Relay::start(dir.path(), &[("feed", "feed-token")], &[]).await;
        let _edge = relay.spawn_edge("feed", "feed-token", &[("web", backend)], &[]);
        relay.wait_edges(1).await;
        let public = relay.public();
        let request = public.request(
            Method::GET,
            &public.host("feed"),
            "/events",
            support::proxy::empty(),
        );
        let asked = std::time::Instant::now();
        let response = public.send(request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut seen = String::new();
        while !seen.contains("data: one") {
            let frame = body.frame().await.expect("a frame").expect("a good frame");
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        let first = asked.elapsed();
        assert!(
            first < Duration::from_secs(2),
            "the first event took {first:?}: buffered behind the second"
        );
        assert!(!seen.contains("two"), "{seen}");
        while !seen.contains("data: two") {
            let frame = body.frame().await.expect("a frame").expect("a good frame");
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        println!(
            "first event after {first:?}, second after {:?}",
            asked.elapsed()
        );
    })
    .await;
}
