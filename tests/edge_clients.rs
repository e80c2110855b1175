//! `backhaul::http::EdgeClients` over real quinn on 127.0.0.1: one pooled client per edge
//! session, shared by hundreds of concurrent requests and reusing tunnel streams; a
//! replaced session's client dropped, never serving the new session's requests.

#[path = "support/relay.rs"]
mod relay_fixture;
mod support;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use backhaul::connector::Connector;
use backhaul::edge::Router;
use backhaul::http::pool::Http1Pool;
use backhaul::http::EdgeClients;
use backhaul::relay::{Registry, TakeoverPolicy};
use backhaul::QuinnConnection;
use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use tokio::task::JoinSet;
use tower::{Layer, Service};

use relay_fixture::{current, eventually, register, TestEdge, TestRelay};
use support::within;

const LIMIT: Duration = Duration::from_secs(120);

/// Counts opens, and knows when every copy of the connector of one session is dropped
/// (its client included).
#[derive(Clone, Default)]
struct Tracking {
    opens: Arc<AtomicUsize>,
    sessions: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>>,
}

struct SessionToken(Arc<AtomicBool>);

impl Drop for SessionToken {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct Tracked {
    inner: Connector<QuinnConnection>,
    opens: Arc<AtomicUsize>,
    _token: Arc<SessionToken>,
}

impl Layer<Connector<QuinnConnection>> for Tracking {
    type Service = Tracked;

    fn layer(&self, inner: Connector<QuinnConnection>) -> Tracked {
        let dropped = Arc::new(AtomicBool::new(false));
        self.sessions.lock().unwrap().push(Arc::clone(&dropped));
        Tracked {
            inner,
            opens: Arc::clone(&self.opens),
            _token: Arc::new(SessionToken(dropped)),
        }
    }
}

impl Service<Uri> for Tracked {
    type Response = <Connector<QuinnConnection> as Service<Uri>>::Response;
    type Error = <Connector<QuinnConnection> as Service<Uri>>::Error;
    type Future = <Connector<QuinnConnection> as Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Uri>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        self.opens.fetch_add(1, Ordering::SeqCst);
        self.inner.call(uri)
    }
}

/// Registers as `name` and serves `web` answering `answer` on every path.
async fn edge(relay: &TestRelay, name: &str, answer: &'static str) -> TestEdge {
    let endpoint = relay.endpoint_from("127.0.0.1");
    let TestEdge {
        connection,
        client,
        events,
    } = register(&endpoint, relay.addr, name, "s3cret")
        .await
        .expect("registered");
    let app = axum::Router::new().fallback(move || async move { answer });
    let router = Router::new().route("web", backhaul::http::serve(app));
    tokio::spawn(router.serve(client.clone(), events).into_future());
    // The router took the session's events; the edge's connection stays open.
    TestEdge {
        connection,
        client,
        events: tokio::sync::mpsc::channel(1).1,
    }
}

async fn get(
    client: &hyper_util::client::legacy::Client<Tracked, Empty<Bytes>>,
) -> (StatusCode, String) {
    let response = client
        .get("http://web/".parse().expect("a URI"))
        .await
        .expect("a response");
    status_and_text(response).await
}

/// The status and the whole body, as text.
async fn status_and_text<B>(response: http::Response<B>) -> (StatusCode, String)
where
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_requests_share_one_pooled_client_per_session() {
    within(LIMIT, async {
        let registry = Registry::new();
        let relay = TestRelay::start(&["alpha=s3cret"], registry.clone(), |acceptor| acceptor);
        let _edge = edge(&relay, "alpha", "from alpha").await;
        let handle = current(&registry, "alpha", None).await;
        let tracking = Tracking::default();
        let clients: EdgeClients<Empty<Bytes>, Tracking> = EdgeClients::builder(registry.clone())
            .layer(tracking.clone())
            .build();

        let mut requests = JoinSet::new();
        for _ in 0..300 {
            let (clients, handle) = (clients.clone(), handle.clone());
            requests.spawn(async move { get(&clients.client(&handle)).await });
        }
        while let Some(answer) = requests.join_next().await {
            let (status, body) = answer.expect("a request");
            assert_eq!((status, body.as_str()), (StatusCode::OK, "from alpha"));
        }
        assert_eq!(clients.len(), 1, "one client for the one session");
        assert_eq!(
            tracking.sessions.lock().unwrap().len(),
            1,
            "one connector layered"
        );
        // hyper-util races every checkout that misses against a connect, and a connect
        // that loses carries on in the background (waiting for an open slot first), so
        // opens can still be counted after the last answer: let them settle.
        let mut opens = tracking.opens.load(Ordering::SeqCst);
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = tracking.opens.load(Ordering::SeqCst);
            if now == opens {
                break;
            }
            opens = now;
        }
        assert!((1..=300).contains(&opens), "{opens} opens");
        // Keep-alive: sequential requests reuse the pooled tunnel streams.
        for _ in 0..20 {
            assert_eq!(get(&clients.client(&handle)).await.0, StatusCode::OK);
        }
        let reused = tracking.opens.load(Ordering::SeqCst) - opens;
        assert!(
            reused <= 1,
            "{reused} new streams for 20 sequential requests"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_session_loses_its_client_and_never_serves_the_new_one() {
    within(LIMIT, async {
        let registry = Registry::with_policy(TakeoverPolicy::ReplaceHolder);
        let relay = TestRelay::start(&["alpha=s3cret"], registry.clone(), |acceptor| acceptor);
        let tracking = Tracking::default();
        let clients: EdgeClients<Empty<Bytes>, Tracking> = EdgeClients::builder(registry.clone())
            .layer(tracking.clone())
            .build();

        let _first = edge(&relay, "alpha", "first").await;
        let old = current(&registry, "alpha", None).await;
        let old_client = clients.client(&old);
        assert_eq!(get(&old_client).await.1, "first");
        drop(old_client);

        let _second = edge(&relay, "alpha", "second").await;
        let new = current(&registry, "alpha", Some(&old)).await;
        // The old session's client (and every copy of its connector) is dropped.
        let old_dropped = Arc::clone(&tracking.sessions.lock().unwrap()[0]);
        eventually(Duration::from_secs(30), "the old client dropped", || {
            std::future::ready(old_dropped.load(Ordering::SeqCst))
        })
        .await;
        // Requests through the new session's client reach the new edge, always.
        for _ in 0..20 {
            assert_eq!(get(&clients.client(&new)).await.1, "second");
        }
        assert_eq!(clients.len(), 1);
        // A late caller holding the old handle gets a client that is not kept.
        let _late = clients.client(&old);
        assert_eq!(clients.len(), 1);
    })
    .await;
}

async fn get_pooled(pool: &Http1Pool<Tracked, Empty<Bytes>>) -> (StatusCode, String) {
    let request = http::Request::get("http://web/")
        .body(Empty::new())
        .expect("a request");
    status_and_text(pool.send(request).await.expect("a response")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_http1_pool_reuses_its_streams_and_goes_with_the_session() {
    within(LIMIT, async {
        let registry = Registry::with_policy(TakeoverPolicy::ReplaceHolder);
        let relay = TestRelay::start(&["alpha=s3cret"], registry.clone(), |acceptor| acceptor);
        let _first = edge(&relay, "alpha", "first").await;
        let old = current(&registry, "alpha", None).await;
        let tracking = Tracking::default();
        let clients: EdgeClients<Empty<Bytes>, Tracking> = EdgeClients::builder(registry.clone())
            .layer(tracking.clone())
            .build();

        // 300 at once: one stream each at most, all back in the pool afterwards.
        let mut requests = JoinSet::new();
        for _ in 0..300 {
            let (clients, old) = (clients.clone(), old.clone());
            requests.spawn(async move { get_pooled(&clients.pool(&old)).await });
        }
        while let Some(answer) = requests.join_next().await {
            let (status, body) = answer.expect("a request");
            assert_eq!((status, body.as_str()), (StatusCode::OK, "first"));
        }
        let opens = tracking.opens.load(Ordering::SeqCst);
        assert!((1..=300).contains(&opens), "{opens} opens");
        let pool = clients.pool(&old);
        assert_eq!(pool.idle(), opens, "every stream came back");
        // The next 300 at once reuse them: only requests beyond the idle streams open one
        // (round one may have needed fewer than 300, requests reusing what others gave
        // back), so the session never carries more than 300.
        let mut requests = JoinSet::new();
        for _ in 0..300 {
            let pool = pool.clone();
            requests.spawn(async move { get_pooled(&pool).await });
        }
        while let Some(answer) = requests.join_next().await {
            assert_eq!(answer.expect("a request").0, StatusCode::OK);
        }
        let opens = tracking.opens.load(Ordering::SeqCst);
        assert!(opens <= 300, "{opens} opens for 300 requests at a time");
        assert_eq!(pool.idle(), opens, "every stream came back again");
        // One after another, they open nothing at all.
        for _ in 0..50 {
            assert_eq!(get_pooled(&pool).await.0, StatusCode::OK);
        }
        assert_eq!(tracking.opens.load(Ordering::SeqCst), opens);
        assert_eq!(clients.len(), 1, "one session");
        drop(pool);

        // A new session replaces the old one: the old pool (and every copy of its
        // connector) is dropped, and the new session's pool reaches the new edge.
        let _second = edge(&relay, "alpha", "second").await;
        let new = current(&registry, "alpha", Some(&old)).await;
        let old_dropped = Arc::clone(&tracking.sessions.lock().unwrap()[0]);
        eventually(Duration::from_secs(30), "the old pool dropped", || {
            std::future::ready(old_dropped.load(Ordering::SeqCst))
        })
        .await;
        for _ in 0..20 {
            assert_eq!(get_pooled(&clients.pool(&new)).await.1, "second");
        }
        assert_eq!(clients.len(), 1);
    })
    .await;
}
