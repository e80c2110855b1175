//! A real browser through the tunnel: headless Chromium loads the demo page that an edge
//! serves through the relay (`http_reverse_proxy demo`, a separate process), and the page's
//! script opens a WebSocket back through the same path. The test reads the DOM back over
//! the DevTools protocol. `*.localhost` resolves to loopback inside Chromium by itself: no
//! resolver flags are passed.
//!
//! Twice: over plain HTTP, and over the relay's HTTPS listener (`demo --https-listen`)
//! with a certificate made by the test, which Chromium trusts by its public key's hash
//! (`--ignore-certificate-errors-spki-list`, honoured with a `--user-data-dir`); there the
//! page must open its WebSocket as `wss://` (a `ws://` one from an HTTPS page is blocked).
//!
//! Chromium is required in CI (`.ci/run` installs the Debian package `chromium` and sets
//! `CI`, so there a missing browser fails the test); on a developer's machine
//! without it the test says so and skips.

mod support;

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use support::proxy::{bounded, client, empty, free_tcp_addr, text, Proc, Scrape, TempDir};
use tokio_tungstenite::tungstenite::Message;

const ECHO: &str = "echo: hello through the tunnel";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_page_through_the_tunnel_and_its_websocket_echoes() {
    chromium_through_the_demo(Scheme::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_page_over_https_and_its_secure_websocket_echoes() {
    chromium_through_the_demo(Scheme::Https).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// A certificate for `*.localhost` written to `dir` as PEM files, and the base64 SHA-256
/// of its public key (SubjectPublicKeyInfo), as Chromium's SPKI list takes it.
fn localhost_certificate(dir: &Path) -> (PathBuf, PathBuf, String) {
    let names = vec!["*.localhost".to_owned(), "demo.localhost".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).expect("a certificate");
    let cert = dir.join("https-cert.pem");
    let key = dir.join("https-key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("writing the key");
    let sha256 = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("a TLS 1.3 suite")
        .common
        .hash_provider;
    let spki = sha256.hash(&certified.key_pair.public_key_der());
    (cert, key, base64(spki.as_ref()))
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let word = chunk.iter().enumerate().fold(0u32, |word, (i, byte)| {
            word | u32::from(*byte) << (16 - 8 * i)
        });
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(word >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn chromium_through_the_demo(scheme: Scheme) {
    let Some(chromium) = find_chromium() else {
        support::skip_or_fail(
            "Chromium is not installed (no `chromium` on the PATH, and $CHROMIUM unset): this \
             test needs a real browser; install it with `apt-get install -y chromium`",
        );
        return;
    };
    bounded(Duration::from_secs(120), async {
        let dir = TempDir::new(&format!("browser-{}", scheme.as_str()));
        let http = free_tcp_addr();
        let admin = free_tcp_addr();
        let mut args = vec![
            "demo".to_owned(),
            "--http-listen".to_owned(),
            http.to_string(),
            "--admin-listen".to_owned(),
            admin.to_string(),
        ];
        let mut browser_args = Vec::new();
        if scheme == Scheme::Https {
            let (cert, key, spki) = localhost_certificate(dir.path());
            args.extend([
                "--https-listen".to_owned(),
                free_tcp_addr().to_string(),
                "--tls-cert".to_owned(),
                cert.display().to_string(),
                "--tls-key".to_owned(),
                key.display().to_string(),
            ]);
            browser_args.push(format!("--ignore-certificate-errors-spki-list={spki}"));
        }
        let mut demo = Proc::spawn("demo", dir.path(), &args);
        // The demo prints its URLs once its self-check through the tunnel has run.
        let url = wait_for_url(&mut demo, scheme).await;
        let expected_start = format!("{}://demo.localhost:", scheme.as_str());
        assert!(url.starts_with(&expected_start), "{url}");

        let (browser, port) = Chromium::launch(&chromium, dir.path(), &url, &browser_args).await;
        let page = browser.page_socket(port, &url).await;
        let mut devtools = DevTools::connect(&page).await;
        let started = Instant::now();
        let dom = loop {
            let dom = devtools
                .evaluate(
                    "[location.href, document.getElementById('status').textContent, \
                     document.getElementById('echo').textContent].join('|')",
                )
                .await;
            if dom.as_deref().is_some_and(|dom| dom.ends_with(ECHO)) {
                break dom.unwrap_or_default();
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the page never showed the echo; last DOM read: {dom:?}\n{}\n{}",
                browser.logs(),
                demo.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!(
            "Chromium showed the WebSocket echo over {} {:?} after DevTools attached",
            scheme.as_str(),
            started.elapsed()
        );
        assert_eq!(dom, format!("{url}|echo received|{ECHO}"));

        // The page and the WebSocket went through the relay: it counted the upgrade.
        let metrics = client()
            .request(
                http::Request::get(format!("http://{admin}/metrics"))
                    .body(empty())
                    .expect("a request"),
            )
            .await
            .expect("GET /metrics");
        let (status, metrics) = text(metrics).await;
        assert_eq!(status, StatusCode::OK);
        let metrics = Scrape::parse(&metrics);
        assert!(metrics.get("backhaul_http_requests_total", &[("code", "101")]) >= 1.0);
        // The demo's self-check and the browser's page load.
        assert!(metrics.get("backhaul_http_requests_total", &[("code", "200")]) >= 2.0);
        if scheme == Scheme::Https {
            // The open WebSocket holds a connection on the HTTPS listener.
            let open = metrics.get("backhaul_connections_open", &[("listener", "https")]);
            assert!(open >= 1.0, "HTTPS connections open: {open}");
        }

        drop(devtools);
        drop(browser);
        demo.terminate();
        let status = demo.wait_exit(Duration::from_secs(15)).await;
        assert!(status.success(), "demo exited {status}\n{}", demo.logs());
    })
    .await;
}

/// Chromium from $CHROMIUM or the PATH.
fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Reads the demo's stdout until it prints the page's URL for `scheme`.
async fn wait_for_url(demo: &mut Proc, scheme: Scheme) -> String {
    let prefix = format!("{}://", scheme.as_str());
    let started = Instant::now();
    loop {
        let stdout = demo.stdout();
        if stdout.contains("self-check") {
            assert!(!stdout.contains("FAILED"), "{}", demo.logs());
            let url = stdout
                .lines()
                .filter_map(|line| line.trim().strip_prefix("open"))
                .map(str::trim)
                .find(|url| url.starts_with(&prefix))
                .map(str::to_owned);
            if let Some(url) = url {
                return url;
            }
        }
        assert!(
            demo.exited().is_none() && started.elapsed() < Duration::from_secs(20),
            "the demo did not print its URL\n{}",
            demo.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Headless Chromium in a process group of its own, all of which is killed on drop.
struct Chromium {
    child: Child,
    profile: PathBuf,
    log: PathBuf,
}

impl Chromium {
    /// Starts Chromium until one start writes its DevTools port, at most three times.
    ///
    /// A start that exits or stays silent (no port after 20 s) is killed and tried again on
    /// a fresh profile: a loaded CI machine has been seen to leave a first start mute. What
    /// each start did is in the panic message if none succeeds.
    async fn launch(program: &Path, dir: &Path, url: &str, extra: &[String]) -> (Self, u16) {
        let mut attempts = Vec::new();
        for attempt in 1..=3 {
            let mut browser = Self::start(program, dir, attempt, url, extra);
            match browser.devtools_port(Duration::from_secs(20)).await {
                Ok(port) => return (browser, port),
                Err(failure) => {
                    eprintln!("Chromium start {attempt}: {failure}");
                    attempts.push(format!("start {attempt}: {failure}\n{}", browser.logs()));
                }
            }
        }
        panic!(
            "Chromium wrote no DevToolsActivePort in three starts\n{}",
            attempts.join("\n")
        );
    }

    fn start(program: &Path, dir: &Path, attempt: u32, url: &str, extra: &[String]) -> Self {
        let profile = dir.join(format!("chromium-profile-{attempt}"));
        std::fs::create_dir_all(&profile).expect("creating the profile dir");
        let log = dir.join(format!("chromium-{attempt}.log"));
        let output = File::create(&log).expect("creating the Chromium log");
        let child = Command::new(program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                // Shared memory in the temp dir: /dev/shm may be small in a container.
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("log handle"))
            .stderr(output)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {}: {error}", program.display()));
        Self {
            child,
            profile,
            log,
        }
    }

    fn logs(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- chromium log (tail) ---\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// The port Chromium's DevTools listen on, once it has written it, or why not.
    async fn devtools_port(&mut self, limit: Duration) -> Result<u16, String> {
        let started = Instant::now();
        let port_file = self.profile.join("DevToolsActivePort");
        loop {
            let port = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse::<u16>().ok());
            if let Some(port) = port {
                return Ok(port);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "Chromium exited ({status}) before writing its port"
                ));
            }
            if started.elapsed() >= limit {
                let entries = std::fs::read_dir(&self.profile).map_or(0, |dir| dir.count());
                return Err(format!(
                    "no DevToolsActivePort after {limit:?}, Chromium still running, \
                     {entries} entries in its profile"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The DevTools WebSocket URL of the page showing `url`.
    async fn page_socket(&self, port: u16, url: &str) -> String {
        let started = Instant::now();
        let limit = Duration::from_secs(20);
        let http = client();
        loop {
            let request = http::Request::get(format!("http://127.0.0.1:{port}/json/list"))
                .body(empty())
                .expect("a request");
            if let Ok(Ok(response)) =
                tokio::time::timeout(Duration::from_secs(5), http.request(request)).await
            {
                let (_, targets) = text(response).await;
                // A flat array of flat objects: one per target.
                let page = targets.split('}').find(|target| {
                    json_field(target, "type").as_deref() == Some("page")
                        && json_field(target, "url").as_deref() == Some(url)
                });
                if let Some(socket) = page.and_then(|page| json_field(page, "webSocketDebuggerUrl"))
                {
                    return socket;
                }
            }
            assert!(
                started.elapsed() < limit,
                "Chromium shows no page for {url}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser and its helpers (zygote, renderer, ...) share the process group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools protocol connection to one page.
struct DevTools {
    socket: Socket,
    next_id: u64,
}

impl DevTools {
    async fn connect(url: &str) -> Self {
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|error| panic!("DevTools connection to {url}: {error}"));
        Self { socket, next_id: 1 }
    }

    /// Evaluates a JavaScript expression in the page; its string value, or `None` if it
    /// threw or is not a string.
    async fn evaluate(&mut self, expression: &str) -> Option<String> {
        let id = self.next_id;
        self.next_id += 1;
        let command = format!(
            r#"{{"id":{id},"method":"Runtime.evaluate","params":{{"expression":{},"returnByValue":true}}}}"#,
            json_string(expression)
        );
        self.socket
            .send(Message::text(command))
            .await
            .expect("sending a DevTools command");
        let prefix = format!(r#"{{"id":{id},"#);
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("a DevTools answer within 10 s")
                .expect("the DevTools connection open")
                .expect("a DevTools message");
            let Message::Text(reply) = message else {
                continue;
            };
            if !reply.starts_with(&prefix) {
                continue; // an event
            }
            if reply.contains(r#""exceptionDetails""#) {
                return None;
            }
            return json_field(&reply, "value");
        }
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The first string value of `"key"` in a JSON text (enough for DevTools' answers).
fn json_field(json: &str, key: &str) -> Option<String> {
    let pattern = format!("\"{key}\"");
    let after = &json[json.find(&pattern)? + pattern.len()..];
    let after = after.trim_start().strip_prefix(':')?.trim_start();
    let mut chars = after.strip_prefix('"')?.chars();
    let mut value = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                'r' => value.push('\r'),
                'b' => value.push('\u{8}'),
                'f' => value.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
}

#[test]
fn base64_matches_the_standard() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
}

#[test]
fn json_helpers_round_trip() {
    let quoted = json_string("a \"b\" \\ c\n");
    assert_eq!(
        json_field(&format!("{{\"value\": {quoted}}}"), "value").as_deref(),
        Some("a \"b\" \\ c\n")
    );
    assert_eq!(json_field(r#"{"type":"page"}"#, "url"), None);
}
