//! The HTTP reverse proxy example (`examples/http_reverse_proxy`) run as separate processes:
//! a relay and edges on loopback ports picked free, logs in a temp dir, children killed on
//! drop; a backend app for edges to expose; a public client that sets Host; the relay's
//! admin endpoints (/healthz, /metrics) read and parsed.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The request body type of every client here.
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<HttpConnector, Body>;

const EXAMPLE: &str = "http_reverse_proxy";

/// The example binary, built once per test process (`cargo build --example`, a no-op when
/// it is up to date) and found next to the test executable: target/<profile>/examples/.
pub fn binary() -> &'static Path {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PATH.get_or_init(build_binary) {
        Ok(path) => path,
        Err(error) => panic!("{error}"),
    }
}

fn build_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the test executable's path: {e}"))?;
    // <target>/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("the test executable is not in <target>/<profile>/deps")?
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    // `cargo test` runs tests with the package's CARGO_* variables set; a nested build
    // that inherits them changes build-script fingerprints (ring's watches
    // CARGO_MANIFEST_DIR) and recompiles half the dependency tree.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name == "CARGO_MANIFEST_DIR"
            || name == "CARGO_MANIFEST_PATH"
            || name.starts_with("CARGO_PKG_")
            || name == "CARGO_CRATE_NAME"
            || name == "CARGO_PRIMARY_PACKAGE"
            || name == "CARGO_TARGET_TMPDIR"
            || name == "CARGO_RUSTC_CURRENT_DIR"
            || name.starts_with("CARGO_BIN_")
            || name == "OUT_DIR"
        {
            build.env_remove(name.as_ref());
        }
    }
    build
        .args(["build", "--quiet", "--example", EXAMPLE, "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
    if profile_dir
        .file_name()
        .is_some_and(|name| name == "release")
    {
        build.arg("--release");
    }
    let status = build
        .status()
        .map_err(|e| format!("running cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --example {EXAMPLE} failed: {status}"));
    }
    let path = profile_dir
        .join("examples")
        .join(format!("{EXAMPLE}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        return Err(format!("the example binary is not at {}", path.display()));
    }
    Ok(path)
}

/// Ports handed out in this process, so two tests never get the same one.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(Default::default)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A self-signed certificate written as PEM files, and a root store trusting it.
pub struct PemCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub roots: rustls::RootCertStore,
}

/// A self-signed certificate for `names` (wildcards welcome), written to
/// `<dir>/<tag>-cert.pem` and `<dir>/<tag>-key.pem`.
pub fn self_signed_pem(dir: &Path, tag: &str, names: &[String]) -> PemCertificate {
    let certified =
        rcgen::generate_simple_self_signed(names.to_vec()).expect("generating a certificate");
    let cert = dir.join(format!("{tag}-cert.pem"));
    let key = dir.join(format!("{tag}-key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("writing the key");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(certified.cert.der().clone())
        .expect("a root certificate");
    PemCertificate { cert, key, roots }
}

/// A loopback TCP address that was free a moment ago (bound to port 0, then released).
pub fn free_tcp_addr() -> SocketAddr {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a TCP port");
        let addr = listener.local_addr().expect("local address");
        if lock(handed_out()).insert(addr.port()) {
            return addr;
        }
    }
}

/// A loopback UDP address that was free a moment ago.
pub fn free_udp_addr() -> SocketAddr {
    loop {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("binding a UDP port");
        let addr = socket.local_addr().expect("local address");
        if lock(handed_out()).insert(addr.port()) {
            return addr;
        }
    }
}

/// A fresh directory under the system temp dir, removed on drop (kept if the test
/// panicked, so its logs can be read).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "backhaul-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed (and reaped) on drop, with stdout and stderr in log files; if
/// the test is panicking, the tail of both is printed.
pub struct Proc {
    pub name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    /// Runs the example binary with `args`, logging to `<dir>/<name>.{stdout,stderr}`
    /// (appending, so a restarted process keeps one log).
    pub fn spawn(name: &str, dir: &Path, args: &[String]) -> Self {
        Self::spawn_program(name, dir, binary().as_os_str(), args)
    }

    pub fn spawn_program(
        name: &str,
        dir: &Path,
        program: &std::ffi::OsStr,
        args: &[String],
    ) -> Self {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let open = |path: &Path| {
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .expect("opening a log file")
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(open(&stdout))
            .stderr(open(&stderr))
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BACKHAUL_") {
                command.env_remove(key);
            }
        }
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("starting {name} ({program:?}): {error}"));
        Self {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("polling a child process")
    }

    /// Sends SIGTERM (the graceful stop).
    pub fn terminate(&mut self) {
        assert!(
            self.exited().is_none(),
            "{} already exited\n{}",
            self.name,
            self.logs()
        );
        let status = Command::new("kill")
            .args(["-TERM", &self.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {} failed", self.id());
    }

    /// Kills the process outright (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "{} did not exit within {limit:?}\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until `check` accepts the process's stdout, where its log goes, and returns
    /// it. The example writes its log from a thread of its own, so a line can land in the
    /// file a few milliseconds after the event it describes (after the response a test has
    /// just read, say): a test that looks for a line waits for it, polling every 20 ms for
    /// at most 10 s. Panics naming `what`, with the logs, if it never shows.
    pub async fn wait_for_log(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        self.wait_for(what, "stdout", Self::stdout, check).await
    }

    /// Like [`wait_for_log`](Self::wait_for_log), for stderr (where the example prints the
    /// error it exits with).
    pub async fn wait_for_stderr(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        self.wait_for(what, "stderr", Self::stderr, check).await
    }

    /// Like [`wait_for_log`](Self::wait_for_log), for stdout and stderr together (stdout,
    /// a newline, then stderr).
    pub async fn wait_for_output(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let both = |proc: &Self| format!("{}\n{}", proc.stdout(), proc.stderr());
        self.wait_for(what, "stdout or stderr", both, check).await
    }

    async fn wait_for(
        &self,
        what: &str,
        stream: &str,
        read: impl Fn(&Self) -> String,
        check: impl Fn(&str) -> bool,
    ) -> String {
        const LIMIT: Duration = Duration::from_secs(10);
        let started = Instant::now();
        loop {
            let text = read(self);
            if check(&text) {
                return text;
            }
            assert!(
                started.elapsed() < LIMIT,
                "{}: {what} not in its {stream} within {LIMIT:?}\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of both logs, for failure messages.
    pub fn logs(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "--- {} stdout (tail) ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.name,
            tail(self.stdout()),
            self.name,
            tail(self.stderr())
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// A pooled HTTP/1 client for the tests.
pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Converts any body into a [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Reads a (small) body to a string.
pub async fn text(response: Response<Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("reading a response body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The relay's public HTTP side, as a client sees it.
#[derive(Clone)]
pub struct Public {
    pub addr: SocketAddr,
    pub client: HttpClient,
}

impl Public {
    /// The Host for `label` (`""` is the bare domain): `<label>.localhost:<port>`.
    pub fn host(&self, label: &str) -> String {
        if label.is_empty() {
            format!("localhost:{}", self.addr.port())
        } else {
            format!("{label}.localhost:{}", self.addr.port())
        }
    }

    /// A request to the relay with Host `host`.
    pub fn request(&self, method: Method, host: &str, path: &str, body: Body) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header(http::header::HOST, host)
            .body(body)
            .expect("a valid request")
    }

    pub async fn send(&self, request: Request<Body>) -> Response<Incoming> {
        let what = format!("{} {} (Host {:?})", request.method(), request.uri(), {
            request.headers().get(http::header::HOST).cloned()
        });
        match tokio::time::timeout(Duration::from_secs(30), self.client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => panic!("{what}: {error:?}"),
            Err(_) => panic!("{what}: no response within 30 s"),
        }
    }

    /// GET `path` on `<label>.localhost`; status and body text.
    pub async fn get(&self, label: &str, path: &str) -> (StatusCode, String) {
        self.get_host(&self.host(label), path).await
    }

    /// GET `path` on `<label>.localhost`; status and body bytes.
    pub async fn get_bytes(&self, label: &str, path: &str) -> (StatusCode, Bytes) {
        let request = self.request(Method::GET, &self.host(label), path, empty());
        let response = self.send(request).await;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("reading a response body")
            .to_bytes();
        (status, body)
    }

    /// GET `path` with an arbitrary Host.
    pub async fn get_host(&self, host: &str, path: &str) -> (StatusCode, String) {
        text(
            self.send(self.request(Method::GET, host, path, empty()))
                .await,
        )
        .await
    }

    /// Like [`get`](Self::get) but an error (relay down) is `None`, not a panic.
    pub async fn try_get(&self, label: &str, path: &str) -> Option<(StatusCode, String)> {
        let request = self.request(Method::GET, &self.host(label), path, empty());
        let response = tokio::time::timeout(Duration::from_secs(5), self.client.request(request))
            .await
            .ok()?
            .ok()?;
        let status = response.status();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// How to start a relay; kept so it can be started again on the same ports.
#[derive(Clone)]
pub struct RelaySpec {
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub args: Vec<String>,
    /// The open-file limit to run the relay under, if not the test's own.
    pub open_files: Option<u64>,
}

/// A relay process.
pub struct Relay {
    pub proc: Proc,
    pub spec: RelaySpec,
    pub dir: PathBuf,
    /// The certificate edges trust (--relay-cert).
    pub cert: PathBuf,
    admin_client: HttpClient,
    edges_started: AtomicUsize,
}

impl Relay {
    /// Starts a relay with a self-signed certificate written to `<dir>/relay-cert.pem`,
    /// accepting `tokens` (name, token); `extra` args are appended.
    pub async fn start(dir: &Path, tokens: &[(&str, &str)], extra: &[&str]) -> Self {
        let cert = dir.join("relay-cert.pem");
        let mut args = vec!["--cert-out".to_owned(), path_arg(&cert)];
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        Self::start_with(dir, tokens, cert, args, None).await
    }

    /// Like [`Relay::start`], with the process's open-file limit (soft and hard) set to
    /// `open_files` by `prlimit`.
    pub async fn start_with_open_files(
        dir: &Path,
        tokens: &[(&str, &str)],
        extra: &[&str],
        open_files: u64,
    ) -> Self {
        let cert = dir.join("relay-cert.pem");
        let mut args = vec!["--cert-out".to_owned(), path_arg(&cert)];
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        Self::start_with(dir, tokens, cert, args, Some(open_files)).await
    }

    /// Starts a relay for `domain` with an HTTPS listener on a free port serving `tls`
    /// (besides its plain one); returns it with the HTTPS address.
    pub async fn start_https(
        dir: &Path,
        tokens: &[(&str, &str)],
        domain: &str,
        tls: &PemCertificate,
        extra: &[&str],
    ) -> (Self, SocketAddr) {
        let https = free_tcp_addr();
        let mut args = vec![
            "--domain".to_owned(),
            domain.to_owned(),
            "--https-listen".to_owned(),
            https.to_string(),
            "--tls-cert".to_owned(),
            path_arg(&tls.cert),
            "--tls-key".to_owned(),
            path_arg(&tls.key),
        ];
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (Self::start(dir, tokens, &args).await, https)
    }

    /// Starts a relay with a given certificate and key (PEM files).
    pub async fn start_with_cert(
        dir: &Path,
        tokens: &[(&str, &str)],
        cert: &Path,
        key: &Path,
        extra: &[&str],
    ) -> Self {
        let mut args = vec![
            "--cert".to_owned(),
            path_arg(cert),
            "--key".to_owned(),
            path_arg(key),
        ];
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        Self::start_with(dir, tokens, cert.to_path_buf(), args, None).await
    }

    async fn start_with(
        dir: &Path,
        tokens: &[(&str, &str)],
        cert: PathBuf,
        mut args: Vec<String>,
        open_files: Option<u64>,
    ) -> Self {
        for (name, token) in tokens {
            args.push("--edge-token".to_owned());
            args.push(format!("{name}={token}"));
        }
        let admin_client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(HttpConnector::new());
        // A port picked free can be taken by someone else before the relay binds it:
        // then try other ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let spec = RelaySpec {
                quic: free_udp_addr(),
                http: free_tcp_addr(),
                admin: free_tcp_addr(),
                args: args.clone(),
                open_files,
            };
            let mut relay = Self {
                proc: spec.spawn(&format!("relay-{attempt}"), dir),
                spec,
                dir: dir.to_path_buf(),
                cert: cert.clone(),
                admin_client: admin_client.clone(),
                edges_started: AtomicUsize::new(0),
            };
            match relay.wait_ready().await {
                Ok(()) => return relay,
                Err(logs) if attempt < 3 && logs.contains("binding") => continue,
                Err(logs) => panic!("the relay did not start\n{logs}"),
            }
        }
    }

    /// Starts the relay again on the same ports with the same arguments (after it was
    /// killed or stopped).
    pub async fn restart(&mut self) {
        let status = self.proc.exited();
        assert!(status.is_some(), "restart needs the old relay gone");
        let name = self.proc.name.clone();
        self.proc = self.spec.spawn(&name, &self.dir);
        if let Err(logs) = self.wait_ready().await {
            panic!("the relay did not restart\n{logs}");
        }
    }

    /// Polls /healthz until the relay answers; `Err(logs)` if the process exits first or
    /// it does not answer within 15 s.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if self.healthz().await.is_some() {
                return Ok(());
            }
            if self.proc.exited().is_some() || started.elapsed() > Duration::from_secs(15) {
                return Err(self.proc.logs());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Public side.
    pub fn public(&self) -> Public {
        Public {
            addr: self.spec.http,
            client: client(),
        }
    }

    pub fn host(&self, label: &str) -> String {
        format!("{label}.localhost:{}", self.spec.http.port())
    }

    async fn admin_get(&self, path: &str) -> Option<(StatusCode, String)> {
        let request = Request::get(format!("http://{}{path}", self.spec.admin))
            .body(empty())
            .expect("a valid request");
        let response =
            tokio::time::timeout(Duration::from_secs(5), self.admin_client.request(request))
                .await
                .ok()?
                .ok()?;
        let status = response.status();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// The /healthz text, if the relay answers 200.
    pub async fn healthz(&self) -> Option<String> {
        match self.admin_get("/healthz").await {
            Some((StatusCode::OK, body)) => Some(body),
            _ => None,
        }
    }

    /// The number of connected edges per /healthz (`edges N`).
    pub async fn edges(&self) -> Option<u64> {
        let body = self.healthz().await?;
        body.lines()
            .find_map(|line| line.strip_prefix("edges "))
            .and_then(|count| count.trim().parse().ok())
    }

    /// Polls /healthz until it reports `count` edges (at most 15 s).
    pub async fn wait_edges(&mut self, count: u64) {
        let started = Instant::now();
        loop {
            let now = self.edges().await;
            if now == Some(count) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the relay reports {now:?} edges, not {count}, after 15 s\n{}",
                self.proc.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Scrapes and parses /metrics.
    pub async fn metrics(&self) -> Scrape {
        match self.admin_get("/metrics").await {
            Some((StatusCode::OK, body)) => Scrape::parse(&body),
            other => panic!("GET /metrics: {other:?}"),
        }
    }

    /// Starts an edge called `name` against this relay, exposing `services` (service
    /// name, local address); `extra` args are appended.
    pub fn spawn_edge(
        &self,
        name: &str,
        token: &str,
        services: &[(&str, SocketAddr)],
        extra: &[&str],
    ) -> Proc {
        self.spawn_edge_with_fallbacks(&[], name, token, services, extra)
    }

    /// Like [`spawn_edge`](Self::spawn_edge), with the relays at `fallbacks` (QUIC
    /// addresses) after this one in `--relay`: the edge fails over to them in order.
    pub fn spawn_edge_with_fallbacks(
        &self,
        fallbacks: &[SocketAddr],
        name: &str,
        token: &str,
        services: &[(&str, SocketAddr)],
        extra: &[&str],
    ) -> Proc {
        let n = self.edges_started.fetch_add(1, Ordering::Relaxed);
        let relays: Vec<String> = std::iter::once(self.spec.quic)
            .chain(fallbacks.iter().copied())
            .map(|addr| addr.to_string())
            .collect();
        let mut args: Vec<String> = vec![
            "edge".into(),
            "--relay".into(),
            relays.join(","),
            "--relay-cert".into(),
            path_arg(&self.cert),
            "--name".into(),
            name.into(),
            "--token".into(),
            token.into(),
        ];
        for (service, addr) in services {
            args.push("--expose".into());
            args.push(format!("{service}=http://{addr}"));
        }
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        Proc::spawn(&format!("edge-{name}-{n}"), &self.dir, &args)
    }
}

impl RelaySpec {
    fn spawn(&self, name: &str, dir: &Path) -> Proc {
        let Some(open_files) = self.open_files else {
            return Proc::spawn(name, dir, &self.command());
        };
        let mut args = vec![
            format!("--nofile={open_files}:{open_files}"),
            path_arg(binary()),
        ];
        args.extend(self.command());
        Proc::spawn_program(name, dir, "prlimit".as_ref(), &args)
    }

    fn command(&self) -> Vec<String> {
        let mut command = vec![
            "relay".to_owned(),
            "--quic-listen".to_owned(),
            self.quic.to_string(),
            "--http-listen".to_owned(),
            self.http.to_string(),
            "--admin-listen".to_owned(),
            self.admin.to_string(),
        ];
        command.extend(self.args.iter().cloned());
        command
    }
}

fn path_arg(path: &Path) -> String {
    path.to_str().expect("a UTF-8 path").to_owned()
}

/// A parsed Prometheus text exposition: `name{label="value",...}` (labels sorted) → value.
#[derive(Debug, Default)]
pub struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad metrics line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad metrics value in {line:?}"));
            let key = match series.split_once('{') {
                None => series.to_owned(),
                Some((name, labels)) => {
                    let labels = labels.trim_end_matches('}');
                    let mut pairs: Vec<(String, String)> = labels
                        .split(',')
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair
                                .split_once('=')
                                .unwrap_or_else(|| panic!("bad label in {line:?}"));
                            (key.to_owned(), value.trim_matches('"').to_owned())
                        })
                        .collect();
                    pairs.sort();
                    series_key(
                        name,
                        &pairs
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect::<Vec<_>>(),
                    )
                }
            };
            samples.insert(key, value);
        }
        Self(samples)
    }

    /// The sample's value, or `None` if the series is absent.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut labels = labels.to_vec();
        labels.sort();
        self.0.get(&series_key(name, &labels)).copied()
    }

    /// The sample's value, 0 if absent (a counter never incremented is not exported).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sample(name, labels).unwrap_or(0.0)
    }
}

fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// A backend web app in the test process for edges to expose: the routes of
/// [`super::http::app`] plus `/whoami` (its name), `/headers` (the request headers, one
/// per line) and `/hold/{millis}` (a slow answer that counts how many have started).
pub struct Backend {
    pub addr: SocketAddr,
    /// How many `/hold` requests have reached the backend.
    pub holds: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &'static str) -> Self {
        use axum::extract::Path as UrlPath;
        use axum::routing::get;

        let holds = Arc::new(AtomicUsize::new(0));
        let app = super::http::app()
            .route("/whoami", get(move || async move { name }))
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
            .route(
                "/hold/{millis}",
                get({
                    let holds = Arc::clone(&holds);
                    move |UrlPath(millis): UrlPath<u64>| async move {
                        holds.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(millis)).await;
                        format!("held {millis} ms")
                    }
                }),
            );
        // A backlog for bursts: tokio's `bind` takes 128.
        let listener =
            backhaul::listener::bind("127.0.0.1:0".parse().unwrap()).expect("binding the backend");
        let addr = listener.local_addr().expect("backend address");
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("serving the backend");
        });
        Self { addr, holds, task }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A certificate and key for `localhost` (PEM files in `dir`), as an operator would give
/// the relay with --cert/--key.
pub fn write_cert_and_key(dir: &Path) -> (PathBuf, PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("generating a certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("writing cert.pem");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("writing key.pem");
    (cert, key)
}

/// Runs a test body, failing it after `limit`, once the example binary is built (cargo may
/// wait for the build directory's lock; that wait does not count). On timeout the panic
/// happens while the test's processes and temp dir are still alive, so their logs are
/// printed and kept.
pub async fn bounded(limit: Duration, test: impl std::future::Future<Output = ()>) {
    binary();
    let test = std::pin::pin!(test);
    tokio::select! {
        () = test => {}
        () = tokio::time::sleep(limit) => panic!("the test took longer than {limit:?}"),
    }
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident memory of a process, in KiB (VmRSS in /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// CPU time a process has used so far (user + system, from /proc/<pid>/stat).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may hold spaces) start at its closing ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("a stat line") + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// An echo backend; with `proxy_protocol`, it first reads a PROXY v2 header and writes
/// back the client address it names, then echoes.
pub async fn echo_backend(proxy_protocol: bool) -> SocketAddr {
    let listener = backhaul::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if proxy_protocol {
                    let mut header = Vec::new();
                    let parsed = loop {
                        let mut byte = [0; 1];
                        if stream.read_exact(&mut byte).await.is_err() {
                            return;
                        }
                        header.push(byte[0]);
                        if let Some(parsed) =
                            backhaul::tcp::ProxyHeader::parse(&header).expect("PROXY v2")
                        {
                            break parsed.0;
                        }
                    };
                    let backhaul::tcp::ProxyHeader::Proxy { source, .. } = parsed else {
                        panic!("expected a proxied connection, got {parsed:?}");
                    };
                    let line = format!("{source}\n");
                    stream.write_all(line.as_bytes()).await.unwrap();
                }
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    address
}

/// Sends `data` to a relay's TCP port reaching an echo service, half-closes, and reads
/// the echo to its end.
pub async fn echo_round(public: SocketAddr, data: &[u8]) -> Vec<u8> {
    let client = tokio::net::TcpStream::connect(public)
        .await
        .expect("connect");
    echo_through(client, data).await
}

/// [`echo_round`] on a connection already made (whose address the caller may need).
pub async fn echo_through(client: tokio::net::TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut reader, mut writer) = client.into_split();
    let write = async {
        writer.write_all(data).await.expect("write");
        writer.shutdown().await.expect("half-close");
    };
    let mut echoed = Vec::new();
    let (_, read) = tokio::join!(write, reader.read_to_end(&mut echoed));
    read.expect("read");
    echoed
}
