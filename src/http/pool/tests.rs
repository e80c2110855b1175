//! The pool against real HTTP/1 servers on loopback TCP (through hyper-util's
//! `HttpConnector`); over tunnel streams it is exercised by `tests/http_proxy.rs`, whose
//! `ReverseProxy` sends through it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::*;

type TestPool = Http1Pool<HttpConnector, Empty<Bytes>>;

/// A body of `len` bytes that depends on `seed`, so a mixed-up body shows.
fn pattern(seed: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// An HTTP/1 server answering `/<seed>/<len>` with [`pattern`]`(seed, len)` and echoing
/// the Host header it got; counts the connections it accepted.
async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(answer);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // The whole request first, as most services read it.
    let (request, body) = request.into_parts();
    let _ = body.collect().await;
    let request = Request::from_parts(request, ());
    let mut parts = request.uri().path().trim_start_matches('/').split('/');
    let seed = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let len = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let host = request
        .headers()
        .get(HOST)
        .cloned()
        .unwrap_or(HeaderValue::from_static("-"));
    let mut response = Response::new(Full::new(pattern(seed, len)));
    response.headers_mut().insert("x-host", host);
    Ok(response)
}

fn pool() -> TestPool {
    Http1Pool::new(HttpConnector::new())
}

fn get(addr: SocketAddr, seed: u64, len: usize) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{addr}/{seed}/{len}"))
        .body(Empty::new())
        .expect("request")
}

/// The whole body of `response`.
async fn body_of(response: Response<PooledBody<impl hyper::body::Body>>) -> Bytes {
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
}

/// Sends a GET and checks its whole body against the pattern.
async fn fetch(pool: &TestPool, addr: SocketAddr, seed: u64, len: usize) {
    let response = pool.send(get(addr, seed, len)).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let body = body_of(response).await;
    assert_eq!(body, pattern(seed, len), "body of request {seed}");
}

#[test]
fn requests_go_out_in_origin_form_and_connect_in_authority_form() {
    let mut request = Request::get("http://web:8080/a/b?c=d")
        .body(())
        .expect("request");
    let authority = to_origin_form(&mut request).expect("an authority");
    assert_eq!(authority, "web:8080");
    assert_eq!(request.uri(), "/a/b?c=d");
    assert_eq!(request.headers()[HOST], "web:8080");
    let mut request = Request::get("http://user:secret@web")
        .body(())
        .expect("request");
    to_origin_form(&mut request).expect("an authority");
    assert_eq!(request.uri(), "/");
    assert_eq!(
        request.headers()[HOST],
        "web",
        "no user information in Host"
    );
    let mut request = Request::connect("http://db.internal:5432")
        .header(HOST, "kept.example")
        .body(())
        .expect("request");
    to_origin_form(&mut request).expect("an authority");
    assert_eq!(request.uri(), "db.internal:5432");
    assert_eq!(request.headers()[HOST], "kept.example");
}

#[tokio::test]
async fn sequential_requests_reuse_one_connection() {
    let (addr, accepted) = server().await;
    let pool = pool();
    for seed in 0..20 {
        fetch(&pool, addr, seed, 1000).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.idle(), 1);
}

#[tokio::test]
async fn the_host_header_comes_from_the_uri_unless_set() {
    let (addr, _) = server().await;
    let pool = pool();
    let response = pool.send(get(addr, 1, 1)).await.expect("response");
    assert_eq!(response.headers()["x-host"], addr.to_string().as_str());
    let request = Request::get(format!("http://{addr}/1/1"))
        .header(HOST, "kiosk.example")
        .body(Empty::new())
        .expect("request");
    let response = pool.send(request).await.expect("response");
    assert_eq!(response.headers()["x-host"], "kiosk.example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_requests_get_their_own_bodies_and_connections_come_back() {
    let (addr, accepted) = server().await;
    let pool = pool();
    for round in 0..2u64 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..300u64 {
            let pool = pool.clone();
            let seed = round * 1000 + i;
            tasks.spawn(async move { fetch(&pool, addr, seed, 20_000 + i as usize).await });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("request task");
        }
    }
    let opened = accepted.load(Ordering::SeqCst);
    assert!(opened <= 300, "{opened} connections for 300 at a time");
    // Every connection came back and stays reusable.
    assert_eq!(pool.idle(), opened);
    for seed in 0..opened as u64 {
        fetch(&pool, addr, seed, 10).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), opened);
}

#[tokio::test]
async fn a_body_dropped_before_its_end_closes_its_connection() {
    let (addr, accepted) = server().await;
    let pool = pool();
    let response = pool.send(get(addr, 7, 4 << 20)).await.expect("response");
    let mut body = response.into_body();
    body.frame().await.expect("a frame").expect("data");
    drop(body);
    assert_eq!(pool.idle(), 0);
    fetch(&pool, addr, 8, 100).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_empty_body_returns_its_connection_at_once() {
    let (addr, accepted) = server().await;
    let pool = pool();
    let response = pool.send(get(addr, 1, 0)).await.expect("response");
    // Not read at all: the body had ended with the head.
    drop(response);
    fetch(&pool, addr, 2, 10).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// What a [`raw_server`] does once it has answered a connection's first request.
#[derive(Clone, Copy)]
enum Then {
    /// Hangs up without having said so (no `Connection: close`): the client finds out
    /// only when it reuses the connection.
    HangUp,
    /// Keeps the connection open and discards whatever else comes (the rest of an
    /// upload).
    Discard,
    /// Closes at once with whatever else came unread, which makes the kernel reset the
    /// connection (a service refusing an upload).
    Close,
}

/// A server on bare TCP that answers each connection's first request with `answer` at
/// once (without reading any body), then does `then`; counts the connections it accepted.
async fn raw_server(answer: &'static [u8], then: Then) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if stream.write_all(answer).await.is_err() {
                    return;
                }
                match then {
                    Then::HangUp => {
                        let _ = stream.shutdown().await;
                    }
                    Then::Discard => {
                        while let Ok(1..) =
                            tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await
                        {
                        }
                    }
                    Then::Close => drop(stream),
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_connection_closed_while_idle_is_replaced_and_the_request_still_sent() {
    let (addr, accepted) = raw_server(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        Then::HangUp,
    )
    .await;
    let pool = pool();
    for _ in 0..10 {
        let response = pool.send(get(addr, 0, 0)).await.expect("response");
        let body = body_of(response).await;
        assert_eq!(&body[..], b"ok");
        // Let the hang-up arrive, or not: either way the next request must succeed.
        tokio::task::yield_now().await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let (addr, _) = server().await;
    let pool: TestPool = Http1Pool::builder()
        .idle_timeout(Duration::from_millis(100))
        .build(HttpConnector::new());
    fetch(&pool, addr, 1, 10).await;
    assert_eq!(pool.idle(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.idle(), 0);
}

#[tokio::test]
async fn idle_connections_beyond_the_limit_are_closed() {
    let (addr, accepted) = server().await;
    let pool: TestPool = Http1Pool::builder()
        .max_idle_per_authority(2)
        .build(HttpConnector::new());
    let responses =
        futures_util::future::join_all((0..5).map(|seed| pool.send(get(addr, seed, 10)))).await;
    for response in responses {
        let body = response.expect("response").into_body().collect().await;
        body.expect("body");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
    assert_eq!(pool.idle(), 2);
}

#[tokio::test]
async fn failures_are_typed() {
    let pool = pool();
    let relative = Request::get("/no/authority")
        .body(Empty::new())
        .expect("request");
    assert!(matches!(
        pool.send(relative).await,
        Err(PoolError::NoAuthority(_))
    ));
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    assert!(matches!(
        pool.send(get(addr, 0, 0)).await,
        Err(PoolError::Connect(_))
    ));
    // A server that hangs up without answering.
    let mute = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = mute.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = mute.accept().await {
            drop(stream);
        }
    });
    let error = pool.send(get(addr, 0, 0)).await.expect_err("no answer");
    assert!(matches!(error, PoolError::Send(_)), "{error:?}");
}

/// A request body: empty, or one chunk and then never an end.
struct Upload {
    endless: bool,
    first: Option<Bytes>,
}

impl hyper::body::Body for Upload {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.first.take() {
            Some(chunk) => Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk)))),
            None if self.endless => Poll::Pending,
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.endless && self.first.is_none()
    }
}

#[tokio::test]
async fn a_request_never_waits_behind_another_requests_unfinished_upload() {
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
    let (addr, accepted) = raw_server(answer, Then::Discard).await;
    let pool: Http1Pool<HttpConnector, Upload> = Http1Pool::new(HttpConnector::new());
    // An upload that never ends; the server answers without reading it.
    let upload = Upload {
        endless: true,
        first: Some(Bytes::from_static(b"first part")),
    };
    let request = Request::post(format!("http://{addr}/1/5"))
        .body(upload)
        .expect("request");
    let response = pool.send(request).await.expect("the early answer");
    let body = body_of(response).await;
    assert_eq!(&body[..], b"hello");
    // The connection still carries the upload: the next request takes another.
    let empty = Upload {
        endless: false,
        first: None,
    };
    let request = Request::get(format!("http://{addr}/2/5"))
        .body(empty)
        .expect("request");
    let second = tokio::time::timeout(Duration::from_secs(5), pool.send(request))
        .await
        .expect("not queued behind the upload")
        .expect("a response");
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// A service answering before the upload's end and closing with the rest unread (the
/// kernel resets the connection): the pool returns that answer, not the failed write,
/// and never sends on that connection again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_uploads_end_is_returned_and_its_connection_not_reused() {
    let answer = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\n\r\ntoo large";
    let (addr, accepted) = raw_server(answer, Then::Close).await;
    let pool: Http1Pool<HttpConnector, Full<Bytes>> = Http1Pool::new(HttpConnector::new());
    // Far more than the kernel's buffers on both sides hold: a write surely fails. (An
    // upload that fits in them is written whole, and the connection is given back before
    // its close is seen, like any connection a server closes without saying so.)
    let upload = Bytes::from(vec![7u8; 64 << 20]);
    for round in 1..=5 {
        let upload = Full::new(upload.clone());
        let request = Request::post(format!("http://{addr}/1/5"))
            .body(upload)
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(10), pool.send(request))
            .await
            .expect("an answer in time")
            .expect("the early answer, not the write's failure");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(&body_of(response).await[..], b"too large");
        // Each round on a new connection: the refused one is never taken again (it may
        // sit in the idle set until then, given back before its refusal was seen).
        assert_eq!(accepted.load(Ordering::SeqCst), round);
    }
}

/// Two hundred uploads at once, each answered early by a service that then closes with
/// the rest unread: every one gets its answer, each on a connection of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_uploads_answered_early_at_once_each_get_their_answer() {
    let answer = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\n\r\ntoo large";
    let (addr, accepted) = raw_server(answer, Then::Close).await;
    let pool: Http1Pool<HttpConnector, Full<Bytes>> = Http1Pool::new(HttpConnector::new());
    let upload = Bytes::from(vec![7u8; 1 << 20]);
    let mut uploads = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (pool, upload) = (pool.clone(), upload.clone());
        uploads.spawn(async move {
            let request = Request::post(format!("http://{addr}/1/5"))
                .body(Full::new(upload))
                .expect("request");
            let response = pool.send(request).await.expect("the early answer");
            assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
            assert_eq!(&body_of(response).await[..], b"too large");
        });
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(done) = uploads.join_next().await {
            done.expect("an upload's task");
        }
    })
    .await
    .expect("all answered in time");
    assert_eq!(accepted.load(Ordering::SeqCst), 200);
}

/// A request body of some chunks, then an end when `end` fires (at once without one).
struct Staged {
    chunks: std::collections::VecDeque<Bytes>,
    end: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Staged {
    fn new(chunks: usize, end: Option<tokio::sync::oneshot::Receiver<()>>) -> Self {
        let chunks = (0..chunks).map(|seed| pattern(seed as u64, 4096)).collect();
        Self { chunks, end }
    }
}

impl hyper::body::Body for Staged {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))));
        }
        if let Some(end) = &mut self.end {
            // Fired or dropped: either way the upload ends.
            let _ = std::task::ready!(Pin::new(end).poll(cx));
            self.end = None;
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.end.is_none()
    }
}

fn post(addr: SocketAddr, body: Staged) -> Request<Staged> {
    Request::post(format!("http://{addr}/3/5"))
        .body(body)
        .expect("request")
}

/// An answer that comes before the upload's end, from a service that keeps the
/// connection open: once the answer is read, the connection is not kept idle (hyper would
/// never make it ready again, hyperium/hyper#4176, and it would hold its stream until the
/// idle timeout), and the next request goes out at once on a new one.
#[tokio::test]
async fn a_connection_answered_before_its_uploads_end_is_not_kept_idle() {
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
    let (addr, accepted) = raw_server(answer, Then::Discard).await;
    let pool: Http1Pool<HttpConnector, Staged> = Http1Pool::new(HttpConnector::new());
    let (end_upload, end) = tokio::sync::oneshot::channel();
    let response = pool
        .send(post(addr, Staged::new(3, Some(end))))
        .await
        .expect("the early answer");
    assert_eq!(&body_of(response).await[..], b"hello");
    assert_eq!(pool.idle(), 0, "kept while its upload goes on");
    // The upload ends after its answer: the connection still is not one to reuse.
    let _ = end_upload.send(());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(pool.idle(), 0);
    let second = tokio::time::timeout(
        Duration::from_secs(5),
        pool.send(post(addr, Staged::new(0, None))),
    )
    .await
    .expect("not held up")
    .expect("a response");
    assert_eq!(&body_of(second).await[..], b"hello");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// Uploads whose bodies end before their answers (in chunks, or empty) come back to the
/// pool: a hundred of them, one after another, on one connection.
#[tokio::test]
async fn uploads_that_end_before_their_answers_keep_their_connection() {
    let (addr, accepted) = server().await;
    let pool: Http1Pool<HttpConnector, Staged> = Http1Pool::new(HttpConnector::new());
    for round in 0..100 {
        let (end_upload, end) = tokio::sync::oneshot::channel();
        // Some rounds end their bodies from outside, as a forwarded upload does.
        let end = (round % 2 == 0).then_some(end);
        let request = post(addr, Staged::new(round % 4, end));
        let sending = tokio::spawn({
            let pool = pool.clone();
            async move { pool.send(request).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let _ = end_upload.send(());
        let response = sending.await.expect("task").expect("response");
        assert_eq!(body_of(response).await, pattern(3, 5));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.idle(), 1);
}

/// Two hundred uploads at once, each read to its end by the service before it answers:
/// every connection comes back to the pool, none taken for one still uploading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_uploads_at_once_all_give_their_connections_back() {
    let (addr, accepted) = server().await;
    let pool: Http1Pool<HttpConnector, Staged> = Http1Pool::new(HttpConnector::new());
    let mut uploads = tokio::task::JoinSet::new();
    for round in 0..200 {
        let pool = pool.clone();
        uploads.spawn(async move {
            let response = pool
                .send(post(addr, Staged::new(1 + round % 3, None)))
                .await
                .expect("response");
            assert_eq!(body_of(response).await, pattern(3, 5));
        });
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(done) = uploads.join_next().await {
            done.expect("an upload's task");
        }
    })
    .await
    .expect("all answered in time");
    let opened = accepted.load(Ordering::SeqCst);
    assert!((1..=200).contains(&opened), "{opened} connections");
    assert_eq!(pool.idle(), opened);
}
