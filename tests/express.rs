//! `backhaul::http::express` end to end over real quinn + TLS on 127.0.0.1: a public
//! [`Server`] with an express route on the relay, and an edge [`Router`] whose
//! `pass_through` routes splice tunnel streams to local backends (axum apps, and a raw
//! TCP backend that writes hand-made responses).
//!
//! ```text
//! client ─TCP─▶ Server (express lane │ hyper fallback) ═QUIC═▶ edge (pass_through) ─TCP─▶ backend
//! ```
//!
//! Which path answered is always checked: every backend adds `x-answered-by: <its name>`,
//! the server's fallback service `x-answered-by: fallback`; the route counts its calls and
//! records every exchange's [`Outcome`]; the edge counts the streams each service accepted.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ::http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use ::http::request::Parts;
use ::http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use axum::extract::Path;
use backhaul::connector::Connector;
use backhaul::edge::{RouteError, Router};
use backhaul::http::authority::Authority;
use backhaul::http::express::{
    self, Express, FailureAnswer, Handover, Hooks, Outcome, RouteFuture, StreamPool, Upstream,
};
use backhaul::http::forwarded::{Proto, TrustedProxies};
use backhaul::http::proxy::{pass_through, Linger, Timeouts};
use backhaul::http::server::{ConnectionInfo, Limits, Server};
use backhaul::stream::TunnelStream;
use backhaul::{QuinnConnection, SessionClient};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use support::http::{checksum_body, Checksum, PatternBody, LIMITED_BODY};
use support::raw::RawBackend;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

/// The bound on every test: generous, the machine is shared.
const LIMIT: Duration = Duration::from_secs(120);
/// The bound on one exchange that must not hang.
const PROMPT: Duration = Duration::from_secs(20);

/// What the raw backend's `/chunked` answers: chunk extensions, a quoted one included,
/// and trailer fields.
const CHUNKED_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\nX-Answered-By: raw\r\n\r\n";
const CHUNKED_BODY: &[u8] =
    b"5;ext=1\r\nhello\r\n7;name=\"quo;ted\";flag\r\n, world\r\n0;last=yes\r\nx-checksum: 42\r\nx-other: yes\r\n\r\n";
/// What the raw backend's `/until-close` sends before closing.
const UNTIL_CLOSE_LEN: usize = 100 * 1024;
/// What the raw backend's `/stall` announces and sends before it stops.
const STALL_LENGTH: usize = 1024 * 1024;
const STALL_PREFIX: usize = 1024;
/// A request a smuggling attempt hides in a body.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: web.test\r\n\r\n";

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// Backends

/// The requests a backend received, as `METHOD target`, in order.
#[derive(Default)]
struct Seen(Mutex<Vec<String>>);

impl Seen {
    fn push(&self, method: &str, target: &str) {
        lock(&self.0).push(format!("{method} {target}"));
    }

    fn all(&self) -> Vec<String> {
        lock(&self.0).clone()
    }

    fn any_for(&self, path: &str) -> bool {
        self.all()
            .iter()
            .any(|request| request.split(' ').nth(1) == Some(path))
    }
}

/// An axum backend: `support::http::app()` plus `/headers` (the request's header lines,
/// sorted), `/whoami`, `/chunked/{len}` (a pattern body without a length, so sent
/// chunked), `/hold` (answers once released) and `/gate` (answers `passed` once given a
/// permit). Every response says who answered.
struct AxumBackend {
    addr: SocketAddr,
    seen: Arc<Seen>,
    /// Notified when `/hold` has a request.
    holding: Arc<Notify>,
    /// Lets `/hold` answer.
    release: Arc<Notify>,
    /// Holds `/gate` requests, any number at once.
    gate: Arc<Gate>,
    task: JoinHandle<()>,
}

/// Where `/gate` requests wait: each counts its arrival, then waits for a permit.
struct Gate {
    arrived: AtomicUsize,
    permits: Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            arrived: AtomicUsize::new(0),
            permits: Semaphore::new(0),
        }
    }
}

impl Gate {
    /// Waits (bounded) until `count` requests in all have arrived at the gate.
    async fn arrivals(&self, count: usize) {
        eventually(PROMPT, &format!("{count} requests at the gate"), || {
            (self.arrived.load(Ordering::SeqCst) == count).then_some(())
        })
        .await;
    }

    /// Lets `count` waiting (or coming) requests through.
    fn open(&self, count: usize) {
        self.permits.add_permits(count);
    }
}

impl Drop for AxumBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A body without a size hint: hyper sends it chunked.
struct Unsized<B>(B);

impl<B: Body + Unpin> Body for Unsized<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

async fn axum_backend(name: &'static str) -> AxumBackend {
    let seen = Arc::new(Seen::default());
    let holding = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (hold_started, hold_release) = (Arc::clone(&holding), Arc::clone(&release));
    let gate = Arc::new(Gate::default());
    let gated = Arc::clone(&gate);
    let recorder = Arc::clone(&seen);
    let app = support::http::app()
        .route(
            "/headers",
            axum::routing::get(|headers: HeaderMap| async move {
                let mut lines: Vec<String> = headers
                    .iter()
                    .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or("?")))
                    .collect();
                lines.sort();
                lines.join("\n")
            }),
        )
        .route("/whoami", axum::routing::get(move || async move { name }))
        .route(
            "/chunked/{len}",
            axum::routing::get(|Path(len): Path<u64>| async move {
                axum::body::Body::new(Unsized(PatternBody::new(len)))
            }),
        )
        .route(
            "/hold",
            axum::routing::get(move || {
                let (started, release) = (Arc::clone(&hold_started), Arc::clone(&hold_release));
                async move {
                    started.notify_one();
                    release.notified().await;
                    "released"
                }
            }),
        )
        .route(
            "/gate",
            axum::routing::get(move || {
                let gate = Arc::clone(&gated);
                async move {
                    gate.arrived.fetch_add(1, Ordering::SeqCst);
                    gate.permits
                        .acquire()
                        .await
                        .expect("the gate stays")
                        .forget();
                    "passed"
                }
            }),
        )
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                recorder.push(request.method().as_str(), &request.uri().to_string());
                async move {
                    let mut response = next.run(request).await;
                    response
                        .headers_mut()
                        .insert("x-answered-by", HeaderValue::from_static(name));
                    response
                }
            },
        ));
    // A backlog for bursts (tokio's `bind` takes 128).
    let listener = backhaul::listener::bind("127.0.0.1:0".parse().expect("an address"))
        .expect("binding a backend");
    let addr = listener.local_addr().expect("the backend's address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).into_future().await;
    });
    AxumBackend {
        addr,
        seen,
        holding,
        release,
        gate,
        task,
    }
}

/// Reads a request head byte by byte (through the blank line); `None` if the peer went
/// away first.
async fn read_head(tcp: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Reads (and drops) what the peer sends until it goes away.
async fn hold(tcp: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    while matches!(tcp.read(&mut sink).await, Ok(1..)) {}
}

/// The value of header `name` in a head (case-insensitive).
fn head_field(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

/// What the raw backend answers, by path (each connection serves requests until a path
/// ends it):
/// - `/chunked`: [`CHUNKED_HEAD`] and [`CHUNKED_BODY`];
/// - `/until-close`: a 200 without a length, [`UNTIL_CLOSE_LEN`] bytes, then a close;
/// - `/malformed`: a response head that is not HTTP, then silence;
/// - `/silent`: nothing, ever;
/// - `/stall`: [`STALL_LENGTH`] announced, [`STALL_PREFIX`] sent, then silence;
/// - `/close-after`: `ok` (a keep-alive response), then a close;
/// - `/close-soon`: `ok` (a keep-alive response), then a close 100 ms later;
/// - `/no-content`: a 204; `/not-modified`: a 304 announcing 10 bytes (sends none);
/// - `/names-length`: `ok` with `Connection: content-length`;
/// - `/coded`: a body in `Transfer-Encoding: gzip`, delimited by the close;
/// - `/early-413`: [`EARLY_413`] before reading the body, then the connection held open
///   without reading;
/// - `/early-413-open`: [`EARLY_413_OPEN`] (the same answer, keeping the connection)
///   before reading the body, then the connection held open without reading;
/// - `/deaf`: nothing read past the head, no answer, the connection held open;
/// - anything else: `ok`.
///
/// It reads a request's `Content-Length` body, and counts the connections it closed.
struct Raw {
    backend: RawBackend,
    seen: Arc<Seen>,
    closed: Arc<AtomicUsize>,
}

async fn raw_backend() -> Raw {
    let seen = Arc::new(Seen::default());
    let closed = Arc::new(AtomicUsize::new(0));
    let (recorder, closes) = (Arc::clone(&seen), Arc::clone(&closed));
    let backend = RawBackend::start(move |tcp| {
        raw_connection(tcp, Arc::clone(&recorder), Arc::clone(&closes))
    })
    .await;
    Raw {
        backend,
        seen,
        closed,
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Answered-By: raw\r\n\r\nok";
/// The body of `/coded` (bytes in a transfer coding, which the lane does not decode).
const CODED: &[u8] = b"\x1f\x8b coded bytes the client decodes";
const EARLY_413: &[u8] = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\nX-Answered-By: raw\r\n\r\ntoo large";
const EARLY_413_OPEN: &[u8] =
    b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nX-Answered-By: raw\r\n\r\ntoo large";

async fn raw_connection(mut tcp: TcpStream, seen: Arc<Seen>, closed: Arc<AtomicUsize>) {
    loop {
        let Some(head) = read_head(&mut tcp).await else {
            return;
        };
        let mut request_line = head.lines().next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_owned();
        let path = request_line.next().unwrap_or_default().to_owned();
        seen.push(&method, &path);
        match path.as_str() {
            "/early-413" | "/early-413-open" => {
                let answer = if path == "/early-413" {
                    EARLY_413
                } else {
                    EARLY_413_OPEN
                };
                let _ = tcp.write_all(answer).await;
                tokio::time::sleep(LIMIT).await;
                return;
            }
            "/deaf" => {
                tokio::time::sleep(LIMIT).await;
                return;
            }
            _ => {}
        }
        if let Some(length) = head_field(&head, "content-length") {
            let mut body = vec![0; length.parse().expect("a length")];
            if tcp.read_exact(&mut body).await.is_err() {
                return;
            }
        }
        let written = match path.as_str() {
            "/chunked" => {
                let mut response = CHUNKED_HEAD.to_vec();
                response.extend_from_slice(CHUNKED_BODY);
                tcp.write_all(&response).await
            }
            "/until-close" => {
                let mut response =
                    b"HTTP/1.1 200 OK\r\nX-Answered-By: raw\r\nContent-Type: application/octet-stream\r\n\r\n"
                        .to_vec();
                response.extend_from_slice(&pattern(b"until-close", UNTIL_CLOSE_LEN));
                let _ = tcp.write_all(&response).await;
                let _ = tcp.shutdown().await;
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            "/coded" => {
                let mut response =
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nX-Answered-By: raw\r\n\r\n"
                        .to_vec();
                response.extend_from_slice(CODED);
                let _ = tcp.write_all(&response).await;
                let _ = tcp.shutdown().await;
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            "/malformed" => {
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\nBad Header\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                hold(&mut tcp).await;
                return;
            }
            "/silent" => {
                hold(&mut tcp).await;
                return;
            }
            "/stall" => {
                let mut response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {STALL_LENGTH}\r\nX-Answered-By: raw\r\n\r\n"
                )
                .into_bytes();
                response.extend(std::iter::repeat_n(b'x', STALL_PREFIX));
                let _ = tcp.write_all(&response).await;
                hold(&mut tcp).await;
                return;
            }
            "/close-after" => {
                let _ = tcp.write_all(OK).await;
                let _ = tcp.shutdown().await;
                drop(tcp);
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            "/close-soon" => {
                let _ = tcp.write_all(OK).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = tcp.shutdown().await;
                drop(tcp);
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            "/no-content" => {
                tcp.write_all(b"HTTP/1.1 204 No Content\r\nX-Answered-By: raw\r\n\r\n")
                    .await
            }
            "/not-modified" => {
                tcp.write_all(
                    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nX-Answered-By: raw\r\n\r\n",
                )
                .await
            }
            "/names-length" => {
                tcp.write_all(
                    b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\nX-Answered-By: raw\r\n\r\nok",
                )
                .await
            }
            _ => tcp.write_all(OK).await,
        };
        if written.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The relay's express route and fallback service

/// Streams a service accepted on the edge.
#[derive(Default)]
struct Streams {
    opened: AtomicUsize,
    active: AtomicUsize,
}

/// One accepted stream, counted active until its route finished (or was dropped).
struct Active(Arc<Streams>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The express route: the Host's first label picks the edge service (`web`, `web2` as
/// `b`, `raw`, and `nope`, which the edge does not have); any other host is declined.
/// It sets `x-forwarded-for` and `x-route`, records each exchange's outcome, and gives
/// every upstream the setup's pool if it has one.
struct TestRoute {
    connector: Connector<QuinnConnection>,
    timeouts: Timeouts,
    pool: Option<StreamPool>,
    calls: AtomicUsize,
    outcomes: Mutex<Vec<(String, Outcome)>>,
    handovers: Mutex<Vec<Handover>>,
    /// Hooks in one object ([`Upstream::with_hooks`]) instead of closures.
    hooks: bool,
    linger: Linger,
}

struct Route(Arc<TestRoute>);

/// One request's hooks, for [`Setup::hooks`]: they record the outcome as the closure
/// does, and word failures themselves (`503`, `hooks: ...`).
struct RecordingHooks {
    route: Arc<TestRoute>,
    target: String,
}

impl Hooks for RecordingHooks {
    fn answer(self: Arc<Self>, failure: &express::Failure) -> FailureAnswer {
        let message = format!("hooks: {failure}");
        Box::pin(async move { (StatusCode::SERVICE_UNAVAILABLE, message) })
    }

    fn finished(&self, outcome: &Outcome) {
        lock(&self.route.outcomes).push((self.target.clone(), outcome.clone()));
    }
}

impl Express for Route {
    fn route<'a>(&'a self, head: &'a mut Parts, info: &'a ConnectionInfo) -> RouteFuture<'a> {
        RouteFuture::ready(TestRoute::upstream(&self.0, head, info))
    }

    fn handed_over(&self, reason: Handover, _info: &ConnectionInfo) {
        lock(&self.0.handovers).push(reason);
    }
}

impl TestRoute {
    fn upstream(this: &Arc<Self>, head: &mut Parts, info: &ConnectionInfo) -> Option<Upstream> {
        this.calls.fetch_add(1, Ordering::SeqCst);
        let host = head.headers.get(HOST)?.to_str().ok()?;
        let label = host.split('.').next()?.to_owned();
        let service = match label.as_str() {
            "web" | "a" | "fwd" | "fwd2" => "web",
            "b" => "web2",
            "raw" => "raw",
            "nope" => "nope",
            _ => return None,
        };
        // `fwd…` hosts have the lane set the forwarding headers; the others set one here.
        let lane_forwards = label.starts_with("fwd");
        let authority: Option<Authority> = lane_forwards.then(|| host.parse().expect("a host"));
        let peer = info.peer_addr().ip().to_string();
        let headers = &mut head.headers;
        if !lane_forwards {
            headers.insert("x-forwarded-for", peer.parse().expect("an address"));
        }
        headers.insert("x-route", label.parse().expect("a label"));
        let target = head.uri.to_string();
        let upstream = Upstream::new(label, this.connector.clone(), service)
            .with_timeouts(this.timeouts)
            .with_linger(this.linger);
        let upstream = match &authority {
            Some(authority) => upstream.with_forwarding_headers(authority, Proto::Http),
            None => upstream,
        };
        let upstream = if this.hooks {
            upstream.with_hooks(Arc::new(RecordingHooks {
                route: Arc::clone(this),
                target,
            }))
        } else {
            let recorder = Arc::clone(this);
            upstream.on_finished(move |outcome| {
                lock(&recorder.outcomes).push((target, outcome.clone()));
            })
        };
        Some(match &this.pool {
            Some(pool) => upstream.with_pool(pool.clone()),
            None => upstream,
        })
    }
}

/// The server's service for everything the lane leaves: it answers by itself, saying so,
/// with what it received (`fallback METHOD target version N bytes: body`).
async fn fallback(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().clone();
    let target = request.uri().to_string();
    let version = request.version();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => Bytes::from(format!("<body failed: {error}>")),
    };
    let status = if method == Method::CONNECT {
        StatusCode::METHOD_NOT_ALLOWED
    } else {
        StatusCode::OK
    };
    let shown = String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned();
    let text = format!(
        "fallback {method} {target} {version:?} {} bytes: {shown}",
        body.len()
    );
    Ok(Response::builder()
        .status(status)
        .header("x-answered-by", "fallback")
        .body(Full::new(Bytes::from(text)))
        .expect("a response"))
}

// ---------------------------------------------------------------------------------------
// The whole setup

/// What a test changes in the setup.
#[derive(Clone)]
struct Setup {
    timeouts: Timeouts,
    limits: Limits,
    /// The pool every upstream keeps its streams in (none: each client connection keeps
    /// its own).
    pool: Option<StreamPool>,
    /// The route's upstreams carry [`RecordingHooks`] instead of an `on_finished`
    /// closure.
    hooks: bool,
    /// The upstreams' bounds for reading on after an early answer.
    linger: Linger,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            timeouts: Timeouts::default(),
            limits: Limits {
                header_timeout: Duration::from_secs(60),
                idle_timeout: Duration::from_secs(60),
                write_timeout: Duration::from_secs(60),
                ..Limits::DEFAULT
            },
            pool: None,
            hooks: false,
            linger: Linger::DEFAULT,
        }
    }
}

/// A relay and an edge over real quinn; the relay's public [`Server`] with the express
/// route; the edge's services `web` and `web2` (axum backends) and `raw` (the raw one).
struct Lane {
    public: SocketAddr,
    route: Arc<TestRoute>,
    streams: HashMap<&'static str, Arc<Streams>>,
    web: AxumBackend,
    web2: AxumBackend,
    raw: Raw,
    edge: SessionClient<QuinnConnection>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    _relay: SessionClient<QuinnConnection>,
    _quic: QuicPair,
    _tasks: JoinSet<()>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn http_uri(addr: SocketAddr) -> ::http::Uri {
    format!("http://{addr}").parse().expect("a URI")
}

impl Lane {
    async fn start(setup: Setup) -> Self {
        let mut tasks = JoinSet::new();
        let web = axum_backend("web").await;
        let web2 = axum_backend("web2").await;
        let raw = raw_backend().await;
        let SessionPair {
            relay,
            edge,
            edge_events,
            quic,
        } = session_pair().await;

        let mut streams = HashMap::new();
        let mut router: Router<QuinnConnection> = Router::new();
        for (name, addr) in [
            ("web", web.addr),
            ("web2", web2.addr),
            ("raw", raw.backend.addr),
        ] {
            let count = Arc::new(Streams::default());
            streams.insert(name, Arc::clone(&count));
            let route = pass_through(http_uri(addr)).expect("an http upstream");
            let counted = tower::service_fn(move |stream: TunnelStream<QuinnConnection>| {
                count.opened.fetch_add(1, Ordering::SeqCst);
                count.active.fetch_add(1, Ordering::SeqCst);
                let active = Active(Arc::clone(&count));
                let forwarded = route.clone().oneshot(stream);
                async move {
                    let result: Result<(), RouteError> = forwarded.await;
                    drop(active);
                    result
                }
            });
            router = router.route(name, counted);
        }
        let serving = router.serve(edge.clone(), edge_events);
        tasks.spawn(async move {
            let _ = serving.into_future().await;
        });

        let route = Arc::new(TestRoute {
            connector: Connector::new(relay.clone()),
            timeouts: setup.timeouts,
            pool: setup.pool,
            calls: AtomicUsize::new(0),
            outcomes: Mutex::new(Vec::new()),
            handovers: Mutex::new(Vec::new()),
            hooks: setup.hooks,
            linger: setup.linger,
        });
        let server = Server::bind(([127, 0, 0, 1], 0))
            .await
            .expect("binding the public server")
            .with_limits(setup.limits)
            .with_express(Route(Arc::clone(&route)));
        let public = server.local_addr().expect("the public address");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            server
                .serve(tower::service_fn(fallback))
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .into_future(),
        );
        Lane {
            public,
            route,
            streams,
            web,
            web2,
            raw,
            edge,
            stop: Some(stop),
            server,
            _relay: relay,
            _quic: quic,
            _tasks: tasks,
        }
    }

    fn calls(&self) -> usize {
        self.route.calls.load(Ordering::SeqCst)
    }

    fn opened(&self, service: &str) -> usize {
        self.streams[service].opened.load(Ordering::SeqCst)
    }

    fn active(&self, service: &str) -> usize {
        self.streams[service].active.load(Ordering::SeqCst)
    }

    /// The setup's pool (the test must have given one).
    fn pool(&self) -> &StreamPool {
        self.route.pool.as_ref().expect("a setup with a pool")
    }

    /// Waits (bounded) until the pool holds `count` idle streams.
    async fn pool_holds(&self, count: usize) {
        eventually(PROMPT, &format!("{count} idle streams in the pool"), || {
            (self.pool().idle() == count).then_some(())
        })
        .await;
    }

    fn handovers(&self) -> Vec<Handover> {
        lock(&self.route.handovers).clone()
    }

    fn outcomes(&self) -> Vec<(String, Outcome)> {
        lock(&self.route.outcomes).clone()
    }

    /// The outcome of the exchange for `target`, waiting (bounded) for it to be reported.
    async fn outcome(&self, target: &str) -> Outcome {
        eventually(PROMPT, &format!("an outcome for {target}"), || {
            self.outcomes()
                .into_iter()
                .find(|(seen, _)| seen == target)
                .map(|(_, outcome)| outcome)
        })
        .await
    }
}

/// Polls `check` every 10 ms until it gives a value; fails the test after `limit`.
async fn eventually<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(started.elapsed() < limit, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Clients

type ClientBody = BoxBody<Bytes, Infallible>;
type Sender = hyper::client::conn::http1::SendRequest<ClientBody>;

/// A hyper HTTP/1 client connection and the task driving it.
async fn connect(addr: SocketAddr) -> (Sender, JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, task)
}

fn request(method: Method, host: &str, path: &str, body: ClientBody) -> Request<ClientBody> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, host)
        .body(body)
        .expect("a request")
}

fn empty() -> ClientBody {
    Empty::new().boxed()
}

async fn send(sender: &mut Sender, request: Request<ClientBody>) -> Response<Incoming> {
    within(PROMPT, async {
        sender.ready().await.expect("the connection is usable");
        sender.send_request(request).await.expect("a response")
    })
    .await
}

/// POSTs [`PatternBody`]`(len)` to `host` and `path`.
async fn post_pattern(sender: &mut Sender, host: &str, path: &str, len: u64) -> Response<Incoming> {
    let body = PatternBody::new(len).boxed();
    send(sender, request(Method::POST, host, path, body)).await
}

async fn get(sender: &mut Sender, host: &str, path: &str) -> Response<Incoming> {
    send(sender, request(Method::GET, host, path, empty())).await
}

async fn text(response: Response<Incoming>) -> String {
    let body = within(LIMIT, response.into_body().collect())
        .await
        .expect("a complete body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

fn answered_by(response: &Response<Incoming>) -> String {
    response
        .headers()
        .get("x-answered-by")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("<nobody>")
        .to_owned()
}

/// A response read off a raw connection: the body as it came on the wire (chunk framing
/// and trailers included).
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.body[..self.body.len().min(512)];
        write!(
            f,
            "{}[{} body bytes] {:?}",
            self.head,
            self.body.len(),
            String::from_utf8_lossy(shown)
        )
    }
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        head_field(&self.head, name)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn answered_by(&self) -> String {
        self.header("x-answered-by")
            .unwrap_or_else(|| "<nobody>".to_owned())
    }
}

/// How a raw connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// A clean close, after these bytes.
    Closed(Vec<u8>),
    /// A failed read (a reset), after these bytes.
    Failed(Vec<u8>),
}

/// A client that writes requests byte for byte and reads responses as they come.
struct RawClient {
    io: BufReader<TcpStream>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connecting");
        Self {
            io: BufReader::new(tcp),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io
            .get_mut()
            .write_all(bytes)
            .await
            .expect("sending a request");
    }

    /// Sends a POST of `len` bytes to `host` and `path`, head and body, without reading.
    async fn upload(&mut self, host: &str, path: &str, len: u64) {
        let head = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len}\r\n\r\n");
        self.send(head.as_bytes()).await;
        let chunk = [b'u'; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let take = usize::try_from(left).map_or(chunk.len(), |left| left.min(chunk.len()));
            self.send(&chunk[..take]).await;
            left -= take as u64;
        }
    }

    /// Reads one response (bounded). A response without a length is read to the close,
    /// which must be clean.
    async fn reply(&mut self) -> Reply {
        within(PROMPT, self.read_reply(false)).await
    }

    /// Reads the response to a HEAD request: a head only, whatever its fields announce.
    async fn head_reply(&mut self) -> Reply {
        within(PROMPT, self.read_reply(true)).await
    }

    async fn read_reply(&mut self, to_head: bool) -> Reply {
        let mut head = Vec::new();
        loop {
            let start = head.len();
            let read = self
                .io
                .read_until(b'\n', &mut head)
                .await
                .expect("reading a response head");
            assert!(
                read > 0,
                "the connection ended before a whole response head: {:?}",
                String::from_utf8_lossy(&head)
            );
            if &head[start..] == b"\r\n" {
                break;
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        let mut reply = Reply {
            status,
            head,
            body: Vec::new(),
        };
        if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
            return reply;
        }
        let chunked = reply
            .header("transfer-encoding")
            .is_some_and(|codings| codings.to_ascii_lowercase().ends_with("chunked"));
        if chunked {
            self.read_chunked(&mut reply.body).await;
        } else if let Some(length) = reply.header("content-length") {
            let mut body = vec![0; length.parse().expect("a length")];
            self.io.read_exact(&mut body).await.expect("the whole body");
            reply.body = body;
        } else {
            self.io
                .read_to_end(&mut reply.body)
                .await
                .expect("a body delimited by a clean close");
        }
        reply
    }

    /// Reads a chunked body as it is on the wire, through the trailer section.
    async fn read_chunked(&mut self, body: &mut Vec<u8>) {
        loop {
            let start = body.len();
            self.io.read_until(b'\n', body).await.expect("a size line");
            let line = String::from_utf8_lossy(&body[start..]).into_owned();
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .unwrap_or_else(|_| panic!("a chunk size in {line:?}"));
            if size == 0 {
                loop {
                    let start = body.len();
                    let read = self.io.read_until(b'\n', body).await.expect("trailers");
                    assert!(read > 0, "the connection ended in the trailers");
                    if &body[start..] == b"\r\n" {
                        return;
                    }
                }
            }
            let start = body.len();
            body.resize(start + size + 2, 0);
            self.io
                .read_exact(&mut body[start..])
                .await
                .expect("chunk data");
        }
    }

    /// Reads until the connection ends (bounded).
    async fn end(&mut self) -> End {
        within(PROMPT, async {
            let mut rest = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            loop {
                match self.io.read(&mut buf).await {
                    Ok(0) => return End::Closed(rest),
                    Ok(n) => rest.extend_from_slice(&buf[..n]),
                    Err(_) => return End::Failed(rest),
                }
            }
        })
        .await
    }
}

/// Sends `bytes` on a new connection and reads all that comes back until the server
/// closes it (bounded: a hang fails the test).
async fn exchange_all(addr: SocketAddr, bytes: &[u8]) -> String {
    let answer = support::raw::exchange(addr, bytes, PROMPT).await;
    assert_ne!(
        answer.ended,
        support::raw::Ended::StillOpen,
        "the connection was still open after {PROMPT:?}: {answer:?}"
    );
    format!("{}{}", answer.head, answer.body_text())
}

// ---------------------------------------------------------------------------------------
// Plain requests

/// The lane carries a plain GET: the backend sees the route's headers and none of the
/// client's hop-by-hop ones; a request the route declines goes to the fallback service,
/// which then serves the rest of the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_take_the_lane_with_the_routes_headers_and_without_hop_by_hop_ones() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(
                b"GET /headers HTTP/1.1\r\nHost: web.test\r\nConnection: keep-alive, x-drop\r\n\
                  x-drop: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
            )
            .await;
        let reply = client.reply().await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.answered_by(), "web", "{reply:?}");
        assert_eq!(lane.calls(), 1);
        let seen = reply.text();
        let lines: Vec<&str> = seen.lines().collect();
        for expected in [
            "host: web.test",
            "x-forwarded-for: 127.0.0.1",
            "x-route: web",
            "x-kept: yes",
        ] {
            assert!(lines.contains(&expected), "{expected:?} missing from\n{seen}");
        }
        for dropped in ["x-drop", "keep-alive", "connection", "6.6.6.6"] {
            assert!(!seen.contains(dropped), "{dropped:?} reached the backend:\n{seen}");
        }
        let outcome = lane.outcome("/headers").await;
        assert_eq!(outcome.status, Some(StatusCode::OK));
        assert_eq!(outcome.failure, None);
        assert_eq!(outcome.response_body_bytes, reply.body.len() as u64);

        // A host the route declines: the fallback service answers, here and for every
        // later request on the connection, which the lane no longer reads.
        client
            .send(b"GET /n/7 HTTP/1.1\r\nHost: other.test\r\n\r\n")
            .await;
        let reply = client.reply().await;
        assert_eq!(reply.answered_by(), "fallback", "{reply:?}");
        assert_eq!(reply.text(), "fallback GET /n/7 HTTP/1.1 0 bytes: ");
        assert_eq!(lane.calls(), 2);
        client
            .send(b"GET /n/8 HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await;
        let reply = client.reply().await;
        assert_eq!(reply.answered_by(), "fallback", "{reply:?}");
        assert_eq!(lane.calls(), 2, "the lane routed after handing over");
        assert_eq!(lane.web.seen.all(), ["GET /headers"]);

        // A new connection takes the lane again, with a hyper client.
        let (mut sender, _connection) = connect(lane.public).await;
        let response = get(&mut sender, "web.test", "/").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(answered_by(&response), "web");
        assert_eq!(text(response).await, "hello from the edge");
        assert_eq!(lane.calls(), 3);
    })
    .await;
}

/// The forwarding fields [`TrustedProxies::set_forwarding_headers`] sets for an untrusted
/// client `peer` of `authority` over plain HTTP, as `name: value` lines.
fn forwarding_lines_for(peer: &str, authority: &str) -> Vec<String> {
    let mut headers = HeaderMap::new();
    let authority: Authority = authority.parse().expect("an authority");
    let peer = peer.parse().expect("an address");
    TrustedProxies::none().set_forwarding_headers(&mut headers, peer, &authority, Proto::Http);
    headers
        .iter()
        .map(|(name, value)| format!("{name}: {}", value.to_str().expect("text")))
        .collect()
}

/// `Upstream::with_forwarding_headers`: the lane drops every forwarding field the client
/// sent and adds the proxy's, the same fields `set_forwarding_headers` would set, each
/// once, on every request of a kept connection, for each request's own authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lane_replaces_a_clients_forwarding_headers_with_the_proxys_on_every_request() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        // The authority changes mid-connection, and comes back: each request gets its own.
        for host in ["fwd.test", "fwd2.test:8080", "fwd.test", "fwd.test"] {
            let request = format!(
                "GET /headers HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 6.6.6.6\r\n\
                 Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nx-forwarded-host: evil\r\n\
                 X-Forwarded-Proto: https\r\nX-Forwarded-Port: 1\r\nX-Kept: yes\r\n\r\n"
            );
            client.send(request.as_bytes()).await;
            let reply = client.reply().await;
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(reply.answered_by(), "web", "{reply:?}");
            let seen = reply.text();
            let lines: Vec<&str> = seen.lines().collect();
            for expected in forwarding_lines_for("127.0.0.1", host) {
                let count = lines.iter().filter(|line| **line == expected).count();
                assert_eq!(count, 1, "{expected:?} should be there once in\n{seen}");
            }
            for kept in [format!("host: {host}"), "x-kept: yes".to_owned()] {
                assert!(
                    lines.contains(&kept.as_str()),
                    "{kept:?} missing from\n{seen}"
                );
            }
            for dropped in ["6.6.6.6", "evil", "https", "x-forwarded-port"] {
                assert!(
                    !seen.contains(dropped),
                    "{dropped:?} reached the backend:\n{seen}"
                );
            }
            let forwarding = lines
                .iter()
                .filter(|line| {
                    line.starts_with("x-forwarded-")
                        || line.starts_with("forwarded:")
                        || line.starts_with("x-real-ip:")
                })
                .count();
            assert_eq!(forwarding, 5, "five forwarding fields, no more:\n{seen}");
        }
        assert_eq!(lane.calls(), 4);
        assert!(lane.handovers().is_empty(), "{:?}", lane.handovers());
    })
    .await;
}

/// Requests after requests on one keep-alive connection go over one tunnel stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_on_one_connection_reuse_one_stream() {
    const REQUESTS: usize = 50;
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let (mut sender, _connection) = connect(lane.public).await;
        for n in 0..REQUESTS {
            let response = get(&mut sender, "web.test", &format!("/n/{n}")).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(answered_by(&response), "web");
            assert_eq!(text(response).await, format!("reply {n}"));
        }
        assert_eq!(lane.calls(), REQUESTS);
        assert_eq!(lane.opened("web"), 1, "one stream for the whole connection");
        assert_eq!(lane.web.seen.all().len(), REQUESTS);
        eventually(PROMPT, "every outcome", || {
            (lane.outcomes().len() == REQUESTS).then_some(())
        })
        .await;
        for (n, (target, outcome)) in lane.outcomes().into_iter().enumerate() {
            assert_eq!(outcome.status, Some(StatusCode::OK), "{target}");
            assert_eq!(outcome.failure, None, "{target}");
            assert_eq!(outcome.streams_opened, u32::from(n == 0), "{target}");
        }
    })
    .await;
}

/// `Connection: close` from the client: the answer says so and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asking_to_close_gets_its_answer_and_a_closed_connection() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /n/1 HTTP/1.1\r\nHost: web.test\r\n\r\nGET /n/2 HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
            .await;
        let first = client.reply().await;
        assert_eq!((first.answered_by().as_str(), first.text().as_str()), ("web", "reply 1"));
        assert_eq!(first.header("connection"), None, "{first:?}");
        let second = client.reply().await;
        assert_eq!((second.answered_by().as_str(), second.text().as_str()), ("web", "reply 2"));
        assert_eq!(second.header("connection").as_deref(), Some("close"));
        assert_eq!(client.end().await, End::Closed(Vec::new()));
        assert_eq!(lane.opened("web"), 1, "pipelined requests share the stream");
    })
    .await;
}

/// HEAD and 204 answers have no body; the connection goes on after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_answers_end_at_their_head_and_the_connection_goes_on() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"HEAD /download/100 HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await;
        let head = client.head_reply().await;
        assert_eq!(head.status, 200, "{head:?}");
        assert_eq!(head.answered_by(), "web");
        assert_eq!(head.header("content-length").as_deref(), Some("100"));
        // Had the lane waited for the 100 bytes the HEAD's answer announces, or passed
        // any on, this would not be the next answer.
        client
            .send(b"GET /n/3 HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await;
        let next = client.reply().await;
        assert_eq!(
            (next.status, next.text().as_str()),
            (200, "reply 3"),
            "{next:?}"
        );
        assert_eq!(lane.opened("web"), 1);

        let mut client = RawClient::connect(lane.public).await;
        for (path, status) in [("/no-content", 204), ("/not-modified", 304), ("/ok", 200)] {
            let request = format!("GET {path} HTTP/1.1\r\nHost: raw.test\r\n\r\n");
            client.send(request.as_bytes()).await;
            let reply = client.reply().await;
            assert_eq!(
                (reply.status, reply.answered_by().as_str()),
                (status, "raw"),
                "{reply:?}"
            );
        }
        assert_eq!(
            lane.opened("raw"),
            1,
            "the stream was kept after bodiless answers"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Bodies

/// Request bodies with a length, small and large, arrive intact; large answers, with a
/// length and chunked, arrive intact; all on one connection and one stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_each_way_arrive_intact() {
    const UPLOAD: u64 = 4 * 1024 * 1024;
    const DOWNLOAD: u64 = 8 * 1024 * 1024;
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let (mut sender, _connection) = connect(lane.public).await;

        let small = Full::new(Bytes::from_static(b"hello lane")).boxed();
        let response = send(
            &mut sender,
            request(Method::POST, "web.test", "/echo", small),
        )
        .await;
        assert_eq!(answered_by(&response), "web");
        assert_eq!(text(response).await, "you sent: hello lane");

        let large = PatternBody::new(UPLOAD).boxed();
        let response = send(
            &mut sender,
            request(Method::POST, "web.test", "/upload", large),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(answered_by(&response), "web", "the upload took the lane");
        assert_eq!(text(response).await, PatternBody::checksum(UPLOAD).header());

        let expected = PatternBody::checksum(DOWNLOAD);
        let response = get(&mut sender, "web.test", &format!("/download/{DOWNLOAD}")).await;
        assert_eq!(answered_by(&response), "web");
        assert_eq!(
            response
                .headers()
                .get(CONTENT_LENGTH)
                .map(HeaderValue::as_bytes),
            Some(DOWNLOAD.to_string().as_bytes())
        );
        let received = within(LIMIT, checksum_body(response.into_body()))
            .await
            .expect("the download");
        assert_eq!(received, expected, "the download with a length");

        let response = get(&mut sender, "web.test", &format!("/chunked/{DOWNLOAD}")).await;
        assert_eq!(answered_by(&response), "web");
        assert_eq!(
            response
                .headers()
                .get(TRANSFER_ENCODING)
                .map(HeaderValue::as_bytes),
            Some(&b"chunked"[..])
        );
        let received = within(LIMIT, checksum_body(response.into_body()))
            .await
            .expect("the chunked download");
        assert_eq!(received, expected, "the chunked download");

        assert_eq!(lane.opened("web"), 1);
        let upload = lane.outcome("/upload").await;
        assert_eq!(upload.request_body_bytes, UPLOAD);
        assert_eq!(upload.failure, None);
        let download = lane.outcome(&format!("/download/{DOWNLOAD}")).await;
        assert_eq!(download.response_body_bytes, DOWNLOAD);
        let chunked = lane.outcome(&format!("/chunked/{DOWNLOAD}")).await;
        assert!(chunked.response_body_bytes > DOWNLOAD, "{chunked:?}");
        assert_eq!(chunked.failure, None);
    })
    .await;
}

/// A body in a transfer coding other than chunked, delimited by the close, keeps its
/// `Transfer-Encoding`: the client must know to decode it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coded_body_delimited_by_the_close_keeps_its_coding() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /coded HTTP/1.1\r\nHost: raw.test\r\n\r\n")
            .await;
        let reply = client.reply().await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("transfer-encoding").as_deref(), Some("gzip"));
        assert_eq!(reply.header("connection").as_deref(), Some("close"));
        assert_eq!(reply.body, CODED, "read to a clean close");
        assert_eq!(lane.outcome("/coded").await.failure, None);
    })
    .await;
}

/// A service that answers as it reads (the body echoed back) gets the whole upload while
/// its answer flows: the lane reads the answer while it sends, so neither side waits on
/// the other. Sent first and answered after, 32 MiB would fill every buffer on the way
/// and stall both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_answering_as_it_reads_gets_the_whole_upload_and_its_answer_arrives() {
    const UPLOAD: u64 = 32 * 1024 * 1024;
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let (mut sender, _connection) = connect(lane.public).await;
        let response = post_pattern(&mut sender, "web.test", "/duplex", UPLOAD).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(answered_by(&response), "web");
        let echoed = checksum_body(response.into_body())
            .await
            .expect("the echoed body");
        assert_eq!(echoed, PatternBody::checksum(UPLOAD));
        let outcome = lane.outcome("/duplex").await;
        assert_eq!(outcome.failure, None);
        assert_eq!(outcome.request_body_bytes, UPLOAD);
        assert_eq!(outcome.response_body_bytes, UPLOAD);

        // The exchange ended in step: the connection and its stream go on.
        let response = get(&mut sender, "web.test", "/whoami").await;
        assert_eq!(text(response).await, "web");
        assert_eq!(lane.opened("web"), 1);
    })
    .await;
}

/// A service that answers before the body's end and stops reading (a 413 for an upload
/// too large): the client gets that answer, not a 502, and the connection closes, the
/// stream to the edge reset since the service was left mid-body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_uploads_end_reaches_the_client_and_the_connection_closes() {
    const UPLOAD: u64 = 16 * 1024 * 1024;
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let (mut sender, connection) = connect(lane.public).await;
        let response = post_pattern(&mut sender, "raw.test", "/early-413", UPLOAD).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(answered_by(&response), "raw");
        // The service closes its side, and the client hears that the connection closes.
        assert_eq!(
            response.headers().get(CONNECTION),
            Some(&HeaderValue::from_static("close"))
        );
        assert_eq!(text(response).await, "too large");
        within(PROMPT, connection)
            .await
            .expect("the connection's task ends");
        let outcome = lane.outcome("/early-413").await;
        assert_eq!(outcome.status, Some(StatusCode::PAYLOAD_TOO_LARGE));
        assert_eq!(outcome.failure, None);
        assert!(outcome.request_body_bytes < UPLOAD, "{outcome:?}");
        eventually(PROMPT, "the stream to the edge ended", || {
            (lane.active("raw") == 0).then_some(())
        })
        .await;

        // Another connection is served as before.
        let (mut sender, _connection) = connect(lane.public).await;
        let response = get(&mut sender, "raw.test", "/").await;
        assert_eq!(text(response).await, "ok");
    })
    .await;
}

/// A service that answers before the body's end and keeps its side of the connection
/// (no `Connection: close`): the client may send its next request on the connection as
/// soon as its body is out, so the lane reads the rest of the upload and serves that next
/// request, on a new stream (the service was left mid-body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_uploads_end_that_keeps_the_connection_serves_the_next_request() {
    const UPLOAD: u64 = 8 * 1024 * 1024;
    const ROUNDS: usize = 4;
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        // A raw client: hyper's own client never reuses a connection whose answer came
        // before its request body ended (hyperium/hyper#4176), as browsers do.
        let mut client = RawClient::connect(lane.public).await;
        for round in 0..ROUNDS {
            client.upload("raw.test", "/early-413-open", UPLOAD).await;
            let reply = client.reply().await;
            assert_eq!(reply.status, 413, "{round}");
            assert_eq!(reply.header("connection"), None, "{round}");
            assert_eq!(reply.text(), "too large");
        }
        client
            .send(b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n")
            .await;
        assert_eq!(client.reply().await.text(), "ok");
        assert_eq!(lane.opened("raw"), ROUNDS + 1);
        let outcomes = lane.outcomes();
        let early: Vec<_> = outcomes
            .iter()
            .filter(|(target, _)| target == "/early-413-open")
            .collect();
        assert_eq!(early.len(), ROUNDS);
        for (_, outcome) in early {
            assert_eq!(outcome.status, Some(StatusCode::PAYLOAD_TOO_LARGE));
            assert_eq!(outcome.failure, None);
        }
        eventually(PROMPT, "the cut streams to the edge ended", || {
            (lane.active("raw") <= 1).then_some(())
        })
        .await;
    })
    .await;
}

/// The same answer for an upload longer than the lane reads on: the lane stops reading
/// and closes while the client still sends, and the client has its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_an_upload_beyond_the_linger_bounds_closes_the_connection() {
    const UPLOAD: u64 = 32 * 1024 * 1024;
    let lane = Lane::start(Setup {
        linger: Linger {
            time: Duration::from_secs(5),
            bytes: 1024 * 1024,
        },
        ..Setup::default()
    })
    .await;
    within(LIMIT, async {
        let (mut sender, connection) = connect(lane.public).await;
        let response = post_pattern(&mut sender, "raw.test", "/early-413-open", UPLOAD).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(text(response).await, "too large");
        within(PROMPT, connection)
            .await
            .expect("the connection's task ends");
        let (mut sender, _connection) = connect(lane.public).await;
        let response = get(&mut sender, "raw.test", "/").await;
        assert_eq!(text(response).await, "ok");
    })
    .await;
}

/// A hundred and fifty uploads at once, each answered early: every client gets its 413,
/// and no stream to the edge is left behind. Half the answers close the connection; the
/// other half keep it, and those clients send a second request on it. (Each upload is
/// more than the buffers on the way hold, so the lane cuts it and resets its stream: an
/// upload that fits is sent whole, and its stream then ends only when the service, which
/// holds its connection open here, lets go.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_uploads_answered_early_at_once_each_get_their_answer() {
    const CLIENTS: usize = 150;
    const UPLOAD: u64 = 4 << 20;
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut clients = JoinSet::new();
        for client in 0..CLIENTS {
            let public = lane.public;
            clients.spawn(async move {
                if client % 2 == 1 {
                    // Kept: a raw client sends its next request on the connection (hyper's
                    // client would not reuse it, hyperium/hyper#4176).
                    let mut raw = RawClient::connect(public).await;
                    raw.upload("raw.test", "/early-413-open", UPLOAD).await;
                    let reply = raw.reply().await;
                    assert_eq!(reply.status, 413);
                    assert_eq!(reply.text(), "too large");
                    raw.send(b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n").await;
                    assert_eq!(raw.reply().await.text(), "ok");
                } else {
                    let (mut sender, _connection) = connect(public).await;
                    let response =
                        post_pattern(&mut sender, "raw.test", "/early-413", UPLOAD).await;
                    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
                    assert_eq!(text(response).await, "too large");
                }
            });
        }
        while let Some(done) = clients.join_next().await {
            done.expect("a client's task");
        }
        eventually(PROMPT, "every stream to the edge ended", || {
            (lane.active("raw") == 0).then_some(())
        })
        .await;
        assert_eq!(lane.opened("raw"), CLIENTS + CLIENTS / 2);
    })
    .await;
}

/// axum refusing an upload over its body limit (its 413 comes at once, and hyper closes
/// the connection with the rest unread): the client gets the 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_limit_answer_from_axum_reaches_the_client() {
    const UPLOAD: u64 = 8 * 1024 * 1024;
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        for _ in 0..5 {
            let (mut sender, _connection) = connect(lane.public).await;
            let response = post_pattern(&mut sender, "web.test", "/limited", UPLOAD).await;
            assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
            assert_eq!(answered_by(&response), "web");
        }
        let (mut sender, _connection) = connect(lane.public).await;
        let small = Full::new(Bytes::from(vec![b'x'; LIMITED_BODY])).boxed();
        let response = send(
            &mut sender,
            request(Method::POST, "web.test", "/limited", small),
        )
        .await;
        assert_eq!(text(response).await, LIMITED_BODY.to_string());
    })
    .await;
}

/// A service that neither reads the body nor answers: once the upload has not moved for
/// the response timeout, the lane answers 504 and closes; nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_taking_neither_the_body_nor_answering_is_a_504_after_the_response_timeout() {
    const UPLOAD: u64 = 64 * 1024 * 1024;
    let response_timeout = Duration::from_millis(500);
    let lane = Lane::start(Setup {
        timeouts: Timeouts {
            response: response_timeout,
            body_idle: Duration::from_secs(60),
        },
        ..Setup::default()
    })
    .await;
    within(LIMIT, async {
        let (mut sender, _connection) = connect(lane.public).await;
        let started = Instant::now();
        let response = post_pattern(&mut sender, "raw.test", "/deaf", UPLOAD).await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(started.elapsed() >= response_timeout);
        let outcome = lane.outcome("/deaf").await;
        assert_eq!(
            outcome.failure,
            Some(express::Failure::ResponseTimeout(response_timeout))
        );
        assert!(outcome.request_body_bytes < UPLOAD, "{outcome:?}");
    })
    .await;
}

/// A chunked answer with chunk extensions and trailers is passed on byte for byte, and a
/// hyper client reads its trailers; the next request on the connection is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_extensions_and_trailers_pass_through_and_the_connection_goes_on() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        for _ in 0..2 {
            client
                .send(b"GET /chunked HTTP/1.1\r\nHost: raw.test\r\n\r\n")
                .await;
            let reply = client.reply().await;
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(reply.answered_by(), "raw");
            assert_eq!(reply.text(), String::from_utf8_lossy(CHUNKED_BODY));
        }
        client
            .send(b"GET /ok HTTP/1.1\r\nHost: raw.test\r\n\r\n")
            .await;
        let reply = client.reply().await;
        assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
        assert_eq!(
            lane.opened("raw"),
            1,
            "the stream was kept after each answer"
        );
        assert_eq!(
            lane.raw.seen.all(),
            ["GET /chunked", "GET /chunked", "GET /ok"]
        );

        let (mut sender, _connection) = connect(lane.public).await;
        let response = get(&mut sender, "raw.test", "/chunked").await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = within(PROMPT, body.frame()).await {
            let frame = frame.expect("a frame");
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(data, b"hello, world");
        let trailers = trailers.expect("trailers");
        assert_eq!(
            trailers.get("x-checksum").map(HeaderValue::as_bytes),
            Some(&b"42"[..])
        );
        assert_eq!(
            trailers.get("x-other").map(HeaderValue::as_bytes),
            Some(&b"yes"[..])
        );
        let response = get(&mut sender, "raw.test", "/ok").await;
        assert_eq!(text(response).await, "ok");
        let outcomes = lane.outcomes();
        assert!(
            outcomes
                .iter()
                .all(|(_, outcome)| outcome.failure.is_none()),
            "{outcomes:?}"
        );
    })
    .await;
}

/// An answer delimited by the backend's close reaches the client whole, marked
/// `Connection: close`, and the client's connection then closes cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_delimited_by_close_is_passed_whole_and_closes_the_connection() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /until-close HTTP/1.1\r\nHost: raw.test\r\n\r\n")
            .await;
        let reply = client.reply().await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.answered_by(), "raw");
        assert_eq!(reply.header("connection").as_deref(), Some("close"));
        assert_eq!(reply.header("content-length"), None);
        assert_eq!(reply.header("transfer-encoding"), None);
        assert_eq!(reply.body.len(), UNTIL_CLOSE_LEN);
        assert_eq!(
            Checksum::of(&reply.body),
            Checksum::of(&pattern(b"until-close", UNTIL_CLOSE_LEN))
        );
        assert_eq!(client.end().await, End::Closed(Vec::new()));
        let outcome = lane.outcome("/until-close").await;
        assert_eq!(outcome.status, Some(StatusCode::OK));
        assert_eq!(outcome.failure, None);
        assert_eq!(outcome.response_body_bytes, UNTIL_CLOSE_LEN as u64);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// What the lane leaves to hyper

/// Each request the lane does not carry is answered by the fallback service (or by
/// hyper's own 400), promptly, and the fallback service answers the connection's next
/// request too: the lane never takes a connection back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_lane_does_not_carry_is_answered_by_hyper_for_the_rest_of_the_connection() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        // (what, request, the fallback's answer, whether the route is asked, why the lane
        // left it)
        let cases: [(&str, &[u8], &str, bool, Handover); 8] = [
            (
                "HTTP/1.0",
                b"GET /old HTTP/1.0\r\nHost: web.test\r\nConnection: keep-alive\r\n\r\n",
                "fallback GET /old HTTP/1.0 0 bytes: ",
                false,
                Handover::Version,
            ),
            (
                "a chunked request body",
                b"POST /up HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
                "fallback POST /up HTTP/1.1 11 bytes: hello world",
                false,
                Handover::Framing,
            ),
            (
                "an upgrade",
                b"GET /ws HTTP/1.1\r\nHost: web.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                "fallback GET /ws HTTP/1.1 0 bytes: ",
                false,
                Handover::Upgrade,
            ),
            (
                "the absolute form",
                b"GET http://web.test/abs HTTP/1.1\r\nHost: web.test\r\n\r\n",
                "fallback GET http://web.test/abs HTTP/1.1 0 bytes: ",
                false,
                Handover::TargetForm,
            ),
            (
                "the asterisk form",
                b"OPTIONS * HTTP/1.1\r\nHost: web.test\r\n\r\n",
                "fallback OPTIONS * HTTP/1.1 0 bytes: ",
                false,
                Handover::TargetForm,
            ),
            (
                "a host the route declines",
                b"GET /elsewhere HTTP/1.1\r\nHost: other.test\r\n\r\n",
                "fallback GET /elsewhere HTTP/1.1 0 bytes: ",
                true,
                Handover::Route,
            ),
            (
                // The head the lane took apart reaches hyper whole, with the body after it.
                "a host the route declines, with a body",
                b"POST /elsewhere?q=1 HTTP/1.1\r\nHost: other.test\r\nX-Odd: a\tb\r\n\
                  Content-Length: 11\r\n\r\nhello world",
                "fallback POST /elsewhere?q=1 HTTP/1.1 11 bytes: hello world",
                true,
                Handover::Route,
            ),
            (
                "two Host fields",
                b"GET /two-hosts HTTP/1.1\r\nHost: web.test\r\nHost: web.test\r\n\r\n",
                "fallback GET /two-hosts HTTP/1.1 0 bytes: ",
                false,
                Handover::Host,
            ),
        ];
        for (what, bytes, expected, routed, reason) in cases {
            let calls = lane.calls();
            lock(&lane.route.handovers).clear();
            let mut client = RawClient::connect(lane.public).await;
            client.send(bytes).await;
            let reply = client.reply().await;
            assert_eq!(reply.answered_by(), "fallback", "{what}: {reply:?}");
            assert_eq!(reply.text(), expected, "{what}");
            assert_eq!(lane.calls(), calls + usize::from(routed), "{what}");
            client
                .send(b"GET /second HTTP/1.1\r\nHost: web.test\r\n\r\n")
                .await;
            let second = client.reply().await;
            assert_eq!(second.answered_by(), "fallback", "{what}, then: {second:?}");
            assert_eq!(second.text(), "fallback GET /second HTTP/1.1 0 bytes: ", "{what}");
            assert_eq!(lane.calls(), calls + usize::from(routed), "{what}");
            assert_eq!(lane.handovers(), [reason], "{what}: heard once, for the first");
        }

        // Pipelined: a request the lane carries, then one it leaves, in one write; the
        // second reaches hyper whole once the first is answered.
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /n/5 HTTP/1.1\r\nHost: web.test\r\n\r\nGET /piped HTTP/1.0\r\nHost: web.test\r\n\r\n")
            .await;
        let first = client.reply().await;
        assert_eq!((first.answered_by().as_str(), first.text().as_str()), ("web", "reply 5"));
        let second = client.reply().await;
        assert_eq!(second.text(), "fallback GET /piped HTTP/1.0 0 bytes: ", "{second:?}");
        assert_eq!(lane.web.seen.all(), ["GET /n/5"]);
        lock(&lane.web.seen.0).clear();
        let carried = lane.outcomes().len();
        assert_eq!(carried, 1);
        lock(&lane.route.outcomes).clear();
        let opened = lane.opened("web");
        assert_eq!(opened, 1);

        // `Expect: 100-continue`: hyper's interim answer, then the fallback's.
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"POST /expect HTTP/1.1\r\nHost: web.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            .await;
        let interim = client.reply().await;
        assert_eq!(interim.status, 100, "{interim:?}");
        client.send(b"hello").await;
        let reply = client.reply().await;
        assert_eq!(reply.text(), "fallback POST /expect HTTP/1.1 5 bytes: hello");
        assert_eq!(lane.handovers().last(), Some(&Handover::Expect));
        client
            .send(b"GET /second HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await;
        assert_eq!(client.reply().await.answered_by(), "fallback");

        // CONNECT: the fallback's refusal.
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"CONNECT web.test:443 HTTP/1.1\r\nHost: web.test:443\r\n\r\n")
            .await;
        let reply = client.reply().await;
        assert_eq!((reply.status, reply.answered_by().as_str()), (405, "fallback"), "{reply:?}");
        assert_eq!(lane.handovers().last(), Some(&Handover::TargetForm));

        // A malformed head: hyper's own 400, and the connection closes.
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
            .await;
        let reply = client.reply().await;
        assert_eq!(reply.status, 400, "{reply:?}");
        assert!(matches!(client.end().await, End::Closed(_) | End::Failed(_)));
        assert_eq!(lane.handovers().last(), Some(&Handover::Malformed));

        // A head over the server's limit: hyper's 431.
        let mut client = RawClient::connect(lane.public).await;
        let mut huge = b"GET /huge HTTP/1.1\r\nHost: web.test\r\nX-Big: ".to_vec();
        huge.resize(huge.len() + 70 * 1024, b'x');
        huge.extend_from_slice(b"\r\n\r\n");
        client.send(&huge).await;
        let reply = client.reply().await;
        assert_eq!(reply.status, 431, "{reply:?}");
        assert_eq!(lane.handovers().last(), Some(&Handover::HeadTooLarge));

        // A head cut short by the client's close: no answer from anyone, no hang.
        lock(&lane.route.handovers).clear();
        let mut client = RawClient::connect(lane.public).await;
        client.send(b"GET /cut HTTP/1.1\r\nHost: web.").await;
        client.io.get_mut().shutdown().await.expect("half-closing");
        let end = client.end().await;
        assert!(
            matches!(&end, End::Closed(rest) | End::Failed(rest) if !String::from_utf8_lossy(rest).contains("x-answered-by")),
            "{end:?}"
        );
        eventually(PROMPT, "the cut head heard of", || {
            (lane.handovers() == [Handover::Malformed]).then_some(())
        })
        .await;

        assert_eq!(lane.web.seen.all(), Vec::<String>::new(), "nothing reached the backend");
        assert_eq!(lane.opened("web"), opened);
        assert_eq!(lane.outcomes().len(), 0, "no exchange on the lane");
    })
    .await;
}

/// HTTP/2 with prior knowledge (no TLS, no upgrade) is hyper's from its first byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge_is_served_by_hyper() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let tcp = TcpStream::connect(lane.public).await.expect("connecting");
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .expect("an HTTP/2 handshake");
        tokio::spawn(connection);
        for n in 0..3 {
            let request = Request::get(format!("http://web.test/n/{n}"))
                .body(empty())
                .expect("a request");
            let response = within(PROMPT, sender.send_request(request))
                .await
                .expect("a response");
            assert_eq!(response.version(), Version::HTTP_2);
            assert_eq!(answered_by(&response), "fallback");
            assert_eq!(
                text(response).await,
                format!("fallback GET http://web.test/n/{n} HTTP/2.0 0 bytes: ")
            );
        }
        assert_eq!(lane.calls(), 0);
        assert_eq!(lane.opened("web"), 0);
        assert_eq!(lane.handovers(), [Handover::Http2]);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Failures

/// Sends `request` on a new connection: the lane itself (not the backend) answers 502
/// with `Connection: close`, then closes the connection.
async fn lane_answers_502_and_closes(lane: &Lane, request: &[u8]) -> Reply {
    let mut client = RawClient::connect(lane.public).await;
    client.send(request).await;
    let reply = client.reply().await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(reply.header("connection").as_deref(), Some("close"));
    assert_eq!(
        reply.answered_by(),
        "<nobody>",
        "the lane answered, not the backend"
    );
    // The reply was read whole; what follows must be the connection's end.
    let rest = client.end().await;
    assert_eq!(rest, End::Closed(Vec::new()));
    reply
}

/// Hooks set as one object hear every outcome and word the failures: a refused open is
/// answered with their status and words, then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_in_one_object_word_failures_and_hear_outcomes() {
    let lane = Lane::start(Setup {
        hooks: true,
        ..Setup::default()
    })
    .await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /whoami HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await;
        let reply = client.reply().await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(lane.outcome("/whoami").await.status, Some(StatusCode::OK));

        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /nope HTTP/1.1\r\nHost: nope.test\r\n\r\n")
            .await;
        let reply = client.reply().await;
        assert_eq!(reply.status, 503, "{reply:?}");
        assert!(
            reply.text().starts_with("hooks: no stream to the edge"),
            "{reply:?}"
        );
        assert_eq!(reply.header("connection").as_deref(), Some("close"));
        assert_eq!(client.end().await, End::Closed(Vec::new()));
        let outcome = lane.outcome("/nope").await;
        assert_eq!(outcome.status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert!(
            matches!(outcome.failure, Some(express::Failure::Open(_))),
            "{outcome:?}"
        );
    })
    .await;
}

/// A response head that is not HTTP: the lane's 502, then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_response_head_is_a_502_and_a_closed_connection() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        lane_answers_502_and_closes(&lane, b"GET /malformed HTTP/1.1\r\nHost: raw.test\r\n\r\n")
            .await;
        let outcome = lane.outcome("/malformed").await;
        assert_eq!(outcome.status, Some(StatusCode::BAD_GATEWAY));
        assert!(
            matches!(outcome.failure, Some(express::Failure::BadResponse(_))),
            "{outcome:?}"
        );
    })
    .await;
}

/// A service the edge does not have: the open is refused, the lane answers 502 with
/// the session's reason, then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_open_is_a_502_and_a_closed_connection() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let reply =
            lane_answers_502_and_closes(&lane, b"GET /nope HTTP/1.1\r\nHost: nope.test\r\n\r\n")
                .await;
        assert!(reply.text().contains("no stream to the edge"), "{reply:?}");
        let outcome = lane.outcome("/nope").await;
        assert_eq!(outcome.status, Some(StatusCode::BAD_GATEWAY));
        assert_eq!(outcome.streams_opened, 0);
        match &outcome.failure {
            Some(express::Failure::Open(error)) => assert!(
                matches!(**error, backhaul::Error::StreamRejected { .. }),
                "{error:?}"
            ),
            other => panic!("expected a refused open, got {other:?}"),
        }

        // With an upload on its way, the 502 still reaches a client that only reads what
        // it is answered once it has sent (the lane reads the upload on before closing).
        for _ in 0..3 {
            let (mut sender, _connection) = connect(lane.public).await;
            let response = post_pattern(&mut sender, "nope.test", "/nope-upload", 8 << 20).await;
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
            assert!(text(response).await.contains("no stream to the edge"));
        }
        let outcome = lane.outcome("/nope-upload").await;
        assert_eq!(outcome.request_body_bytes, 0, "{outcome:?}");
    })
    .await;
}

/// Timeouts too large to add to an instant mean "never": requests are served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_of_duration_max_mean_never() {
    let lane = Lane::start(Setup {
        timeouts: Timeouts {
            response: Duration::MAX,
            body_idle: Duration::MAX,
        },
        ..Setup::default()
    })
    .await;
    within(LIMIT, async {
        let (mut sender, _connection) = connect(lane.public).await;
        let response = get(&mut sender, "web.test", "/n/7").await;
        assert_eq!(text(response).await, "reply 7");
        let response = post_pattern(&mut sender, "web.test", "/upload", 1 << 20).await;
        assert_eq!(
            text(response).await,
            PatternBody::checksum(1 << 20).header()
        );
    })
    .await;
}

/// No response head within the upstream's response timeout: the lane's 504, then the
/// connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_within_the_response_timeout_is_a_504() {
    let response_timeout = Duration::from_millis(300);
    let lane = Lane::start(Setup {
        timeouts: Timeouts {
            response: response_timeout,
            body_idle: Duration::from_secs(60),
        },
        ..Setup::default()
    })
    .await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        let started = Instant::now();
        client
            .send(b"GET /silent HTTP/1.1\r\nHost: raw.test\r\n\r\n")
            .await;
        let reply = client.reply().await;
        let elapsed = started.elapsed();
        assert_eq!(reply.status, 504, "{reply:?}");
        assert!(elapsed >= response_timeout, "answered after {elapsed:?}");
        assert_eq!(reply.header("connection").as_deref(), Some("close"));
        assert_eq!(client.end().await, End::Closed(Vec::new()));
        let outcome = lane.outcome("/silent").await;
        assert_eq!(outcome.status, Some(StatusCode::GATEWAY_TIMEOUT));
        assert_eq!(
            outcome.failure,
            Some(express::Failure::ResponseTimeout(response_timeout))
        );
    })
    .await;
}

/// A body that stalls after its first KiB: after the body idle timeout the client's
/// connection is cut, so it never takes what it got for a whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_stalled_mid_way_cuts_the_clients_connection() {
    let body_idle = Duration::from_millis(500);
    let lane = Lane::start(Setup {
        timeouts: Timeouts {
            response: Duration::from_secs(60),
            body_idle,
        },
        ..Setup::default()
    })
    .await;
    within(LIMIT, async {
        let (mut sender, connection) = connect(lane.public).await;
        let started = Instant::now();
        let response = get(&mut sender, "raw.test", "/stall").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response
                .headers()
                .get(CONTENT_LENGTH)
                .map(HeaderValue::as_bytes),
            Some(STALL_LENGTH.to_string().as_bytes())
        );
        let mut body = response.into_body();
        let mut received = 0;
        let ending = loop {
            match body.frame().await {
                Some(Ok(frame)) => received += frame.into_data().map_or(0, |data| data.len()),
                Some(Err(error)) => break Err(error),
                None => break Ok(()),
            }
        };
        assert!(
            ending.is_err(),
            "a stalled body must fail, not end ({received} bytes)"
        );
        assert_eq!(
            received, STALL_PREFIX,
            "what came before the stall got through"
        );
        assert!(started.elapsed() >= body_idle);
        connection.await.expect("the client's connection task");
        let outcome = lane.outcome("/stall").await;
        assert_eq!(outcome.status, Some(StatusCode::OK));
        assert_eq!(outcome.failure, Some(express::Failure::BodyIdle(body_idle)));
        assert_eq!(outcome.response_body_bytes, STALL_PREFIX as u64);

        // Read raw, the cut is a reset, not a close.
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /stall HTTP/1.1\r\nHost: raw.test\r\n\r\n")
            .await;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let read = client
                .io
                .read_until(b'\n', &mut head)
                .await
                .expect("a head");
            assert!(read > 0);
        }
        match client.end().await {
            End::Failed(rest) => assert_eq!(rest.len(), STALL_PREFIX),
            closed => panic!("a cut body must end in a reset: {closed:?}"),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Request smuggling

/// Requests whose framing two parsers could read differently never reach the backend
/// through the lane; the request hidden in their bodies reaches no backend at all. A body
/// that merely holds a request's text is carried as a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_never_reach_the_backend_ambiguously() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let len = SMUGGLED.len();
        let attempts = [
            format!(
                "POST /cl-te HTTP/1.1\r\nHost: web.test\r\nContent-Length: {}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}",
                5 + len
            ),
            format!(
                "POST /te-cl HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\
                 Content-Length: 5\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /cl-cl HTTP/1.1\r\nHost: web.test\r\nContent-Length: 0\r\n\
                 Content-Length: {len}\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /cl-list HTTP/1.1\r\nHost: web.test\r\nContent-Length: 0, {len}\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /cl-same HTTP/1.1\r\nHost: web.test\r\nContent-Length: {len}\r\n\
                 Content-Length: {len}\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /fold HTTP/1.1\r\nHost: web.test\r\nContent-Length: 0\r\nX-Pad: a\r\n \
                 Content-Length: {len}\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /fold-te HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\nX-Pad: a\r\n\
                 \tTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /te-space HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n\
                 Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /te-case HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n\
                 transfer-encoding: CHUNKED\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /te-list HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n\
                 Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /cl-plus HTTP/1.1\r\nHost: web.test\r\nContent-Length: +{len}\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /bare-lf HTTP/1.1\nHost: web.test\nContent-Length: 5\n\
                 Transfer-Encoding: chunked\n\n0\r\n\r\n{SMUGGLED}"
            ),
            format!(
                "POST /cl-hex HTTP/1.1\r\nHost: web.test\r\nContent-Length: 0x{len:x}\r\n\r\n{SMUGGLED}"
            ),
        ];
        for attempt in &attempts {
            // A request the fallback closes on ends every connection, whatever the
            // attempt left behind.
            let mut bytes = attempt.clone().into_bytes();
            bytes.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n");
            let answers = exchange_all(lane.public, &bytes).await;
            let name = attempt.split(' ').nth(1).unwrap_or_default();
            assert!(
                !answers.to_ascii_lowercase().contains("x-answered-by: web"),
                "{name}: the lane forwarded an ambiguous request:\n{answers}"
            );
            assert!(!lane.web.seen.any_for("/smuggled"), "{name}: {:?}", lane.web.seen.all());
        }
        assert_eq!(lane.web.seen.all(), Vec::<String>::new());

        // A request's text in a body with one plain length is a body: the backend checks
        // it whole, and answers one request.
        let body = SMUGGLED.repeat(3);
        let upload = format!(
            "POST /upload HTTP/1.1\r\nHost: web.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answers = exchange_all(lane.public, upload.as_bytes()).await;
        assert!(answers.starts_with("HTTP/1.1 200 "), "{answers}");
        assert!(answers.ends_with(&Checksum::of(body.as_bytes()).header()), "{answers}");
        assert_eq!(answers.matches("HTTP/1.1 ").count(), 1, "{answers}");
        let get_with_body = format!(
            "GET /n/1 HTTP/1.1\r\nHost: web.test\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{SMUGGLED}"
        );
        let answers = exchange_all(lane.public, get_with_body.as_bytes()).await;
        assert_eq!(answers.matches("HTTP/1.1 ").count(), 1, "{answers}");
        assert_eq!(lane.web.seen.all(), ["POST /upload", "GET /n/1"]);
        assert!(!lane.web.seen.any_for("/smuggled"));
    })
    .await;
}

/// A client's `Connection` header may name `Content-Length`: dropping the field as
/// hop-by-hop while forwarding the body by it would hand the backend a request without
/// a length followed by the body's bytes, read as a request of their own.
///
/// Fails as of d6e4bcf: `head::plain_request` reads the body's length, then
/// `strip_hop_by_hop` removes `Content-Length` because `Connection` names it, and the lane
/// forwards the body by count after a head without a length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_header_naming_content_length_smuggles_nothing() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let request = format!(
            "POST /upload HTTP/1.1\r\nHost: web.test\r\nConnection: content-length\r\n\
             Content-Length: {}\r\n\r\n{SMUGGLED}",
            SMUGGLED.len()
        );
        let mut client = RawClient::connect(lane.public).await;
        client.send(request.as_bytes()).await;
        let reply = client.reply().await;
        client
            .send(b"GET /n/2 HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
            .await;
        let _ = client.end().await;
        assert!(
            !lane.web.seen.any_for("/smuggled"),
            "the backend received the body as a request: {:?}",
            lane.web.seen.all()
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        if reply.answered_by() == "web" {
            assert_eq!(reply.text(), Checksum::of(SMUGGLED.as_bytes()).header());
        }
    })
    .await;
}

/// The same from the backend's side: a response whose `Connection` names
/// `Content-Length` must still reach the client with its framing, or the client cannot
/// tell where it ends on a connection the lane keeps open.
///
/// Fails as of d6e4bcf: `head::parse_response` frames by the length, then
/// `strip_hop_by_hop` removes it from the fields written to the client (only
/// `Transfer-Encoding` is put back), and the head is sent with no framing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_whose_connection_header_names_content_length_keeps_its_framing() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /names-length HTTP/1.1\r\nHost: raw.test\r\n\r\n")
            .await;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let read = within(PROMPT, client.io.read_until(b'\n', &mut head))
                .await
                .expect("a head");
            assert!(read > 0);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let framed = head_field(&head, "content-length").is_some()
            || head_field(&head, "transfer-encoding").is_some()
            || head_field(&head, "connection").as_deref() == Some("close");
        assert!(
            framed,
            "the client cannot tell where this response ends:\n{head}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Streams: reuse, keys, leaks

/// A request for another upstream key opens a stream of its own; switching back opens
/// another; every answer comes from the right backend and streams left behind close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_upstream_key_opens_a_new_stream() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let (mut sender, _connection) = connect(lane.public).await;
        for (host, backend) in [
            ("a.test", "web"),
            ("a.test", "web"),
            ("b.test", "web2"),
            ("b.test", "web2"),
            ("a.test", "web"),
        ] {
            let response = get(&mut sender, host, "/whoami").await;
            assert_eq!(answered_by(&response), backend, "{host}");
            assert_eq!(text(response).await, backend, "{host}");
        }
        assert_eq!(lane.opened("web"), 2, "a, then a again after b");
        assert_eq!(lane.opened("web2"), 1);
        assert_eq!(lane.web.seen.all().len(), 3);
        assert_eq!(lane.web2.seen.all().len(), 2);
        // The streams given up end on the edge; the kept one stays.
        eventually(PROMPT, "the streams given up to close", || {
            (lane.active("web") == 1 && lane.active("web2") == 0).then_some(())
        })
        .await;
    })
    .await;
}

/// A kept stream whose backend closed its connection after answering: the next request,
/// a POST that must not be sent twice, still gets the backend's answer (the lane can see
/// that stream ended before it writes to it), and so does a GET.
///
/// Fails as of d6e4bcf for the POST (a 502): the lane reuses the kept stream without
/// looking whether the edge ended it, and only a safe request is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_stream_the_backend_closed_is_not_used_for_the_next_request() {
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        for (n, next) in [
            (1, &b"GET /after HTTP/1.1\r\nHost: raw.test\r\n\r\n"[..]),
            (
                2,
                &b"POST /after HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 2\r\n\r\nhi"[..],
            ),
        ] {
            client
                .send(b"GET /close-after HTTP/1.1\r\nHost: raw.test\r\n\r\n")
                .await;
            let reply = client.reply().await;
            assert_eq!(
                (reply.status, reply.text().as_str()),
                (200, "ok"),
                "{reply:?}"
            );
            eventually(PROMPT, "the backend's close", || {
                (lane.raw.closed.load(Ordering::SeqCst) == n).then_some(())
            })
            .await;
            // Time for the close to cross the edge and the tunnel: only a lane that
            // looks at the stream before reusing it can pass, and only once it is there.
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.send(next).await;
            let reply = client.reply().await;
            let what = String::from_utf8_lossy(&next[..4]);
            assert_eq!(
                (reply.status, reply.answered_by().as_str()),
                (200, "raw"),
                "{what} after the backend closed: {reply:?}"
            );
        }
    })
    .await;
}

/// `connections` clients at once, each sending `requests` GETs on its own keep-alive
/// connection; every answer must be the backend's, and its own.
async fn burst(public: SocketAddr, connections: usize, requests: usize) {
    let mut clients = JoinSet::new();
    for c in 0..connections {
        clients.spawn(async move {
            let (mut sender, connection) = connect(public).await;
            for r in 0..requests {
                let n = c * 100 + r;
                let response = get(&mut sender, "web.test", &format!("/n/{n}")).await;
                assert_eq!(response.status(), StatusCode::OK, "{n}");
                assert_eq!(answered_by(&response), "web", "{n}");
                assert_eq!(
                    text(response).await,
                    format!("reply {n}"),
                    "{n} got another's answer"
                );
            }
            drop(sender);
            connection.await.expect("the client's connection task");
        });
    }
    while let Some(done) = clients.join_next().await {
        done.expect("a client");
    }
}

/// Hundreds of connections at once, each with a few requests on the lane: every answer
/// is right, each connection used one stream, and once the clients are gone the edge has
/// no stream left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_connections_at_once_are_answered_and_leave_no_stream_behind() {
    const CONNECTIONS: usize = 200;
    const REQUESTS: usize = 3;
    let lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        burst(lane.public, CONNECTIONS, REQUESTS).await;
        assert_eq!(lane.calls(), CONNECTIONS * REQUESTS);
        assert_eq!(lane.web.seen.all().len(), CONNECTIONS * REQUESTS);
        assert_eq!(lane.opened("web"), CONNECTIONS, "one stream per connection");
        eventually(LIMIT / 2, "the edge's streams to close", || {
            let stats = lane.edge.stats();
            (stats.active_streams == 0 && lane.active("web") == 0).then_some(())
        })
        .await;
        let outcomes = lane.outcomes();
        assert_eq!(outcomes.len(), CONNECTIONS * REQUESTS);
        assert!(outcomes.iter().all(
            |(_, outcome)| outcome.failure.is_none() && outcome.status == Some(StatusCode::OK)
        ));
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Streams: the pool

/// A setup whose upstreams keep their streams in a new pool.
fn pooled(idle_timeout: Duration, max_idle_per_key: usize) -> Setup {
    Setup {
        pool: Some(StreamPool::new(idle_timeout, max_idle_per_key)),
        ..Setup::default()
    }
}

/// One GET on a new connection, closed after the answer (a 200): who answered, and
/// the body.
async fn get_alone(addr: SocketAddr, host: &str, path: &str) -> (String, String) {
    let (mut sender, connection) = connect(addr).await;
    let response = get(&mut sender, host, path).await;
    assert_eq!(response.status(), StatusCode::OK, "{host}{path}");
    let by = answered_by(&response);
    let body = text(response).await;
    drop(sender);
    within(PROMPT, connection)
        .await
        .expect("the client's connection task");
    (by, body)
}

/// With a pool, one request per client connection, connection after connection: all
/// go over one tunnel stream, back in the pool after each exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_pool_connection_after_connection_reuses_one_stream() {
    const CONNECTIONS: usize = 10;
    let lane = Lane::start(pooled(Duration::from_secs(60), 4)).await;
    within(LIMIT, async {
        for n in 0..CONNECTIONS {
            let (by, body) = get_alone(lane.public, "web.test", &format!("/n/{n}")).await;
            assert_eq!((by.as_str(), body), ("web", format!("reply {n}")));
            // The stream went back before the answer's last bytes: the next connection,
            // made at once, finds it.
            assert_eq!(lane.pool().idle(), 1, "after /n/{n}");
        }
        assert_eq!(lane.opened("web"), 1, "one stream for all the connections");
        assert_eq!(lane.active("web"), 1);
        assert_eq!(lane.pool().idle(), 1);
        let outcomes = lane.outcomes();
        assert_eq!(outcomes.len(), CONNECTIONS);
        for (n, (target, outcome)) in outcomes.into_iter().enumerate() {
            assert_eq!(target, format!("/n/{n}"));
            assert_eq!(outcome.status, Some(StatusCode::OK), "{target}");
            assert_eq!(outcome.failure, None, "{target}");
            assert_eq!(outcome.streams_opened, u32::from(n == 0), "{target}");
        }
    })
    .await;
}

/// Requests held at the backend at once each have a stream; once answered, the pool
/// keeps `max_idle_per_key` of them and the rest are finished (they end on the edge);
/// the next burst takes the kept ones and opens only the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_keeps_at_most_its_cap_per_key_and_finishes_the_rest() {
    const AT_ONCE: usize = 8;
    const CAP: usize = 2;
    let lane = Lane::start(pooled(Duration::from_secs(60), CAP)).await;
    within(LIMIT, async {
        let gate = Arc::clone(&lane.web.gate);
        for (round, opened) in [(1, AT_ONCE), (2, AT_ONCE + AT_ONCE - CAP)] {
            let mut clients = JoinSet::new();
            for _ in 0..AT_ONCE {
                let public = lane.public;
                clients.spawn(async move { get_alone(public, "web.test", "/gate").await });
            }
            gate.arrivals(round * AT_ONCE).await;
            assert_eq!(lane.opened("web"), opened, "round {round}");
            assert_eq!(lane.active("web"), AT_ONCE, "round {round}");
            assert_eq!(
                lane.pool().idle(),
                0,
                "round {round}: every kept stream in use"
            );
            gate.open(AT_ONCE);
            while let Some(done) = clients.join_next().await {
                let (by, body) = done.expect("a client");
                assert_eq!((by.as_str(), body.as_str()), ("web", "passed"));
            }
            lane.pool_holds(CAP).await;
            eventually(
                PROMPT,
                "the streams past the cap to end on the edge",
                || (lane.active("web") == CAP).then_some(()),
            )
            .await;
            assert_eq!(lane.pool().idle(), CAP, "round {round}");
            assert_eq!(lane.opened("web"), opened, "round {round}");
        }
        // The kept ones still serve.
        let (by, _) = get_alone(lane.public, "web.test", "/n/1").await;
        assert_eq!(by, "web");
        assert_eq!(lane.opened("web"), 2 * AT_ONCE - CAP);
        let outcomes = lane.outcomes();
        let opened: u32 = outcomes
            .iter()
            .map(|(_, outcome)| outcome.streams_opened)
            .sum();
        assert_eq!(opened as usize, lane.opened("web"), "{outcomes:?}");
    })
    .await;
}

/// A stream idle in the pool for longer than its timeout is finished (it ends on the
/// edge) without a request coming for it, and the next request opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_idle_past_the_pools_timeout_is_finished() {
    // Long enough that a loaded machine still sees the stream pooled before it expires.
    let idle_timeout = Duration::from_secs(1);
    let lane = Lane::start(pooled(idle_timeout, 4)).await;
    within(LIMIT, async {
        let (by, _) = get_alone(lane.public, "web.test", "/n/1").await;
        assert_eq!(by, "web");
        lane.pool_holds(1).await;
        assert_eq!(lane.active("web"), 1);
        // The reaper looks every quarter of the timeout, with no request to take it.
        eventually(
            Duration::from_secs(5),
            "the expired stream to leave the pool",
            || (lane.pool().idle() == 0).then_some(()),
        )
        .await;
        eventually(PROMPT, "the expired stream to end on the edge", || {
            (lane.active("web") == 0).then_some(())
        })
        .await;
        let (by, body) = get_alone(lane.public, "web.test", "/n/2").await;
        assert_eq!((by.as_str(), body.as_str()), ("web", "reply 2"));
        assert_eq!(lane.opened("web"), 2);
        assert_eq!(lane.outcome("/n/2").await.streams_opened, 1);
    })
    .await;
}

/// A pooled stream whose backend closed its keep-alive connection while the stream was
/// idle: the next request, a POST the lane does not send twice, on another connection,
/// gets the backend's answer over a new stream (the ended one is skipped, and ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_stream_the_edge_ended_while_idle_is_skipped() {
    let lane = Lane::start(pooled(Duration::from_secs(60), 4)).await;
    within(LIMIT, async {
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /close-soon HTTP/1.1\r\nHost: raw.test\r\n\r\n")
            .await;
        let reply = client.reply().await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "ok"),
            "{reply:?}"
        );
        drop(client);
        lane.pool_holds(1).await;
        eventually(PROMPT, "the backend's close", || {
            (lane.raw.closed.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
        // Time for the close to cross the edge and the tunnel to the pooled stream.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            lane.pool().idle(),
            1,
            "the pool looks at a stream when taking it"
        );

        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"POST /after HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 2\r\n\r\nhi")
            .await;
        let reply = client.reply().await;
        assert_eq!(
            (
                reply.status,
                reply.answered_by().as_str(),
                reply.text().as_str()
            ),
            (200, "raw", "ok"),
            "the POST after the backend closed: {reply:?}"
        );
        let outcome = lane.outcome("/after").await;
        assert_eq!(outcome.failure, None);
        assert_eq!(outcome.streams_opened, 1);
        assert_eq!(lane.opened("raw"), 2);
        assert_eq!(lane.raw.seen.all(), ["GET /close-soon", "POST /after"]);
        lane.pool_holds(1).await;
        eventually(PROMPT, "the skipped stream to end on the edge", || {
            (lane.active("raw") == 1).then_some(())
        })
        .await;
    })
    .await;
}

/// Hundreds of connections at once through a pool, a few requests each: every answer
/// is right, and once the clients are gone the edge has exactly the pooled streams
/// left, no more than the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_connections_at_once_through_the_pool_leave_only_the_pooled_streams() {
    const CONNECTIONS: usize = 300;
    const REQUESTS: usize = 3;
    const CAP: usize = 16;
    let lane = Lane::start(pooled(Duration::from_secs(60), CAP)).await;
    within(LIMIT, async {
        burst(lane.public, CONNECTIONS, REQUESTS).await;
        assert_eq!(lane.calls(), CONNECTIONS * REQUESTS);
        assert_eq!(lane.web.seen.all().len(), CONNECTIONS * REQUESTS);
        let idle = eventually(
            LIMIT / 2,
            "the edge's streams to be the pooled ones",
            || {
                let idle = lane.pool().idle();
                let on_edge = lane.edge.stats().active_streams;
                (lane.active("web") == idle && on_edge == idle).then_some(idle)
            },
        )
        .await;
        assert!((1..=CAP).contains(&idle), "{idle} idle streams");
        let outcomes = lane.outcomes();
        assert_eq!(outcomes.len(), CONNECTIONS * REQUESTS);
        assert!(outcomes.iter().all(
            |(_, outcome)| outcome.failure.is_none() && outcome.status == Some(StatusCode::OK)
        ));
        let opened: u32 = outcomes
            .iter()
            .map(|(_, outcome)| outcome.streams_opened)
            .sum();
        assert_eq!(opened as usize, lane.opened("web"));
    })
    .await;
}

/// Upstreams with different keys do not share pooled streams: `a` and `b` each open
/// their own, and each later request gets its own key's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_keeps_streams_apart_by_key() {
    let lane = Lane::start(pooled(Duration::from_secs(60), 4)).await;
    within(LIMIT, async {
        for (n, (host, backend)) in [
            ("a.test", "web"),
            ("b.test", "web2"),
            ("a.test", "web"),
            ("b.test", "web2"),
        ]
        .into_iter()
        .enumerate()
        {
            let (by, body) = get_alone(lane.public, host, "/whoami").await;
            assert_eq!((by.as_str(), body.as_str()), (backend, backend), "{host}");
            lane.pool_holds(n.min(1) + 1).await;
        }
        assert_eq!(lane.opened("web"), 1, "a");
        assert_eq!(lane.opened("web2"), 1, "b");
        assert_eq!(lane.pool().idle(), 2);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Shutdown

/// On shutdown, idle connections (on the lane and handed to hyper) close at once, while
/// a request in flight on the lane gets its whole answer (marked `Connection: close`);
/// then the server finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_request_in_flight_finish_and_closes_idle_connections() {
    let mut lane = Lane::start(Setup::default()).await;
    within(LIMIT, async {
        let mut idle_lane = RawClient::connect(lane.public).await;
        idle_lane
            .send(b"GET /n/1 HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await;
        assert_eq!(idle_lane.reply().await.answered_by(), "web");
        let mut idle_hyper = RawClient::connect(lane.public).await;
        idle_hyper
            .send(b"GET /n/1 HTTP/1.1\r\nHost: other.test\r\n\r\n")
            .await;
        assert_eq!(idle_hyper.reply().await.answered_by(), "fallback");
        let mut fresh = RawClient::connect(lane.public).await;

        let (mut sender, _connection) = connect(lane.public).await;
        let holding = lane.web.holding.notified();
        let in_flight =
            tokio::spawn(async move { get(&mut sender, "web.test", "/hold").await });
        within(PROMPT, holding).await;

        let _ = lane.stop.take().expect("not stopped yet").send(());
        for (what, client) in [
            ("idle on the lane", &mut idle_lane),
            ("without a request yet", &mut fresh),
        ] {
            assert_eq!(client.end().await, End::Closed(Vec::new()), "{what}");
        }
        // hyper's idle connections are dropped (a reset) at shutdown, as without the lane.
        let end = idle_hyper.end().await;
        assert!(matches!(&end, End::Closed(rest) | End::Failed(rest) if rest.is_empty()), "{end:?}");
        assert!(!in_flight.is_finished(), "the request in flight was cut");

        lane.web.release.notify_one();
        let response = within(PROMPT, in_flight).await.expect("the client");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get(CONNECTION).map(HeaderValue::as_bytes),
            Some(&b"close"[..])
        );
        assert_eq!(text(response).await, "released");
        within(PROMPT, &mut lane.server).await.expect("the server task");
        assert_eq!(lane.outcome("/hold").await.failure, None);
        let refused = match TcpStream::connect(lane.public).await {
            Err(_) => true,
            Ok(tcp) => {
                let mut client = RawClient { io: BufReader::new(tcp) };
                let _ = client.io.get_mut().write_all(b"GET /n/1 HTTP/1.1\r\nHost: web.test\r\n\r\n").await;
                matches!(client.end().await, End::Closed(rest) | End::Failed(rest) if rest.is_empty())
            }
        };
        assert!(refused, "a connection was served after shutdown");
    })
    .await;
}

/// The server's limits hold on the lane: a keep-alive connection idle past the idle
/// timeout, a head that does not complete within the header timeout and a client that
/// stops reading for the write timeout are cut (reset), and the cut exchange's stream is
/// released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_timeouts_cut_lane_connections() {
    let header_timeout = Duration::from_millis(500);
    let idle_timeout = Duration::from_millis(800);
    let lane = Lane::start(Setup {
        limits: Limits {
            header_timeout,
            idle_timeout,
            write_timeout: Duration::from_millis(500),
            ..Limits::DEFAULT
        },
        ..Setup::default()
    })
    .await;
    within(LIMIT, async {
        // The server's idle time starts after its answer: counting from before the
        // request is a strict bound.
        let mut client = RawClient::connect(lane.public).await;
        let before_request = Instant::now();
        client
            .send(b"GET /n/1 HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await;
        assert_eq!(client.reply().await.answered_by(), "web");
        assert_eq!(client.end().await, End::Failed(Vec::new()), "idle");
        let elapsed = before_request.elapsed();
        assert!(elapsed >= idle_timeout, "cut {elapsed:?} after the request");

        let before_connect = Instant::now();
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /n/2 HTTP/1.1\r\nHost: web.test\r\n")
            .await;
        assert_eq!(
            client.end().await,
            End::Failed(Vec::new()),
            "a head never ended"
        );
        let elapsed = before_connect.elapsed();
        assert!(
            elapsed >= header_timeout,
            "cut {elapsed:?} after connecting"
        );

        // 64 MiB that the client never reads.
        let mut client = RawClient::connect(lane.public).await;
        client
            .send(b"GET /download/67108864 HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await;
        let outcome = lane.outcome("/download/67108864").await;
        assert_eq!(outcome.status, Some(StatusCode::OK));
        assert!(
            matches!(outcome.failure, Some(express::Failure::Client(_))),
            "{outcome:?}"
        );
        assert!(
            outcome.response_body_bytes < 64 * 1024 * 1024,
            "{outcome:?}"
        );
        eventually(PROMPT, "the cut exchange's stream to close", || {
            (lane.active("web") == 0 && lane.edge.stats().active_streams == 0).then_some(())
        })
        .await;
        assert_eq!(lane.web.seen.all().len(), 2, "{:?}", lane.web.seen.all());
    })
    .await;
}
