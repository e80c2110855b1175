//! The reconnecting edge over real quinn on 127.0.0.1: it connects and serves, comes back
//! by itself when the relay restarts, stops at once on the errors retrying cannot fix,
//! retries the ones that pass, and shuts down in the order the relay needs.

mod support;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backhaul::edge::{Backoff, Edge, EdgeBuilder, EdgeState, RegisterError, Router};
use backhaul::quic::{server_endpoint, Identity, DEFAULT_ALPN};
use backhaul::stream::TunnelStream;
use backhaul::{
    ClientEvent, Config, Error, Metadata, QuinnConnection, RejectCode, Role, Session, SessionClient,
};
use rustls::pki_types::CertificateDer;
use support::{alive_tasks, settle_tasks, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

const LIMIT: Duration = Duration::from_secs(60);
const REGISTER: &str = "_register";

/// How the test relay answers an edge's registration open.
#[derive(Clone, Copy)]
enum Policy {
    Accept,
    Unauthorized,
    /// `ServiceUnavailable` for the first n registrations, then accept.
    BusyFirst(usize),
}

/// What the relay saw when a session ended.
#[derive(Debug)]
struct SessionEnd {
    /// Why the session ended, as the relay's client says.
    why: Error,
    /// Whether the QUIC connection was still open at that moment.
    connection_open: bool,
}

/// A relay that accepts edges, answers `_register` by its policy, hands each session to
/// the test, and closes a connection once its session ended (as a real relay does).
struct TestRelay {
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    sessions: mpsc::UnboundedReceiver<SessionClient<QuinnConnection>>,
    ends: mpsc::UnboundedReceiver<SessionEnd>,
    registrations: Arc<AtomicUsize>,
    /// QUIC connections dialed to it.
    dialed: Arc<AtomicUsize>,
    /// While false, a connection whose session ended is left open (a relay still reading
    /// the last responses); true by default.
    hang_up: watch::Sender<bool>,
    accept_loop: JoinHandle<()>,
}

impl TestRelay {
    async fn start(addr: SocketAddr, identity: Identity, policy: Policy) -> Self {
        let endpoint = bind_retrying(addr, identity).await;
        let addr = endpoint.local_addr().unwrap();
        let (session_tx, sessions) = mpsc::unbounded_channel();
        let (end_tx, ends) = mpsc::unbounded_channel();
        let registrations = Arc::new(AtomicUsize::new(0));
        let dialed = Arc::new(AtomicUsize::new(0));
        let (hang_up, may_hang_up) = watch::channel(true);
        let accept_loop = tokio::spawn({
            let endpoint = endpoint.clone();
            let registrations = Arc::clone(&registrations);
            let dialed = Arc::clone(&dialed);
            async move {
                let mut connections = JoinSet::new();
                while let Some(incoming) = endpoint.accept().await {
                    dialed.fetch_add(1, Ordering::SeqCst);
                    let peer = Peer {
                        sessions: session_tx.clone(),
                        ends: end_tx.clone(),
                        registrations: Arc::clone(&registrations),
                        policy,
                        may_hang_up: may_hang_up.clone(),
                    };
                    connections.spawn(peer.serve(incoming));
                    while connections.try_join_next().is_some() {}
                }
            }
        });
        Self {
            addr,
            endpoint,
            sessions,
            ends,
            registrations,
            dialed,
            hang_up,
            accept_loop,
        }
    }

    /// Goes away like a crashed or restarted relay: every connection closed, the port freed.
    async fn stop(self) -> SocketAddr {
        self.endpoint.close(0u32.into(), b"relay restarting");
        self.accept_loop.abort();
        let _ = self.accept_loop.await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle()).await;
        self.addr
    }

    async fn next_session(&mut self) -> SessionClient<QuinnConnection> {
        within(LIMIT, self.sessions.recv())
            .await
            .expect("a session")
    }
}

/// Binds the relay, retrying while the previous endpoint on `addr` lets go of the port.
async fn bind_retrying(addr: SocketAddr, identity: Identity) -> quinn::Endpoint {
    let started = Instant::now();
    loop {
        match server_endpoint(addr, identity.clone(), DEFAULT_ALPN) {
            Ok(endpoint) => return endpoint,
            Err(error) if started.elapsed() < Duration::from_secs(20) => {
                eprintln!("rebinding {addr}: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("cannot bind {addr}: {error}"),
        }
    }
}

/// One edge connection on the test relay.
struct Peer {
    sessions: mpsc::UnboundedSender<SessionClient<QuinnConnection>>,
    ends: mpsc::UnboundedSender<SessionEnd>,
    registrations: Arc<AtomicUsize>,
    policy: Policy,
    may_hang_up: watch::Receiver<bool>,
}

impl Peer {
    async fn serve(mut self, incoming: quinn::Incoming) {
        let Ok(Ok(connection)) = tokio::time::timeout(LIMIT, incoming).await else {
            return;
        };
        let session = Session::new(
            QuinnConnection::new(connection.clone()),
            Role::Server,
            Config::new(),
        );
        let Ok(handle) = session.start().await else {
            return;
        };
        let (client, mut events) = SessionClient::with_events(handle);
        let _ = self.sessions.send(client.clone());
        while let Some(event) = events.recv().await {
            if let ClientEvent::OpenRequest {
                request_id,
                service,
                ..
            } = event
            {
                if service.as_str() == REGISTER {
                    self.register(&client, request_id).await;
                }
            }
        }
        let why = client.closed().await;
        let connection_open = connection.close_reason().is_none();
        let _ = self.ends.send(SessionEnd {
            why,
            connection_open,
        });
        let _ = self.may_hang_up.wait_for(|may| *may).await;
        connection.close(0u32.into(), b"session ended");
    }

    async fn register(&self, client: &SessionClient<QuinnConnection>, request_id: u64) {
        let seen = self.registrations.fetch_add(1, Ordering::SeqCst);
        let refusal = match self.policy {
            Policy::Accept => None,
            Policy::Unauthorized => Some(RejectCode::Unauthorized),
            Policy::BusyFirst(n) if seen < n => Some(RejectCode::ServiceUnavailable),
            Policy::BusyFirst(_) => None,
        };
        if let Some(code) = refusal {
            let reason = Some(format!("refused ({code})"));
            let _ = client.reject_open(request_id, code, reason).await;
            return;
        }
        let id = client.allocate_stream_id();
        if client.accept_open(request_id, id).await.is_err() {
            return;
        }
        if let Ok((mut send, _recv)) = client.connection().inner().open_bi().await {
            if client.bind_stream(&mut send, id).await.is_ok() {
                let _ = send.finish();
            }
        }
    }
}

/// A certificate valid for "localhost" and 127.0.0.1, and the trust in it.
fn identity() -> (Identity, Vec<CertificateDer<'static>>) {
    let identity = Identity::self_signed(&["localhost", "127.0.0.1"]).expect("certificate");
    let trusted = identity.cert_chain.clone();
    (identity, trusted)
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// "echo" echoes; "slow" reads the request, waits 3 s, and answers "done".
fn router() -> Router<QuinnConnection> {
    let echo = tower::service_fn(|mut stream: TunnelStream<QuinnConnection>| async move {
        let (mut reader, mut writer) = tokio::io::split(&mut stream);
        tokio::io::copy(&mut reader, &mut writer).await?;
        writer.shutdown().await
    });
    let slow = tower::service_fn(|mut stream: TunnelStream<QuinnConnection>| async move {
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        stream.write_all(b"done").await?;
        stream.shutdown().await
    });
    Router::new().route("echo", echo).route("slow", slow)
}

/// An edge for `relay` with quick backoff and timeouts.
fn edge_to(relay: SocketAddr, trusted: &[CertificateDer<'static>]) -> EdgeBuilder {
    Edge::builder()
        .relay(relay)
        .trust(trusted.to_vec())
        .backoff(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
        .connect_timeout(Duration::from_secs(2))
}

/// A registration step opening the relay's `_register` service.
fn register_step(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    SessionClient<QuinnConnection>,
    Response = (),
    Error = RegisterError,
    Future = impl Send,
> + Send {
    tower::service_fn(move |client: SessionClient<QuinnConnection>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            client.open(REGISTER, Metadata::Empty).await?;
            Ok::<_, RegisterError>(())
        }
    })
}

/// A running edge: its state, its stop switch, and its task.
struct RunningEdge {
    state: watch::Receiver<EdgeState>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), Error>>,
}

fn spawn_edge(edge: Edge) -> RunningEdge {
    let state = edge.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        edge.with_graceful_shutdown(async move {
            let _ = stopped.await;
        })
        .into_future(),
    );
    RunningEdge { state, stop, task }
}

impl RunningEdge {
    async fn connected(&mut self) {
        within(LIMIT, self.state.wait_for(EdgeState::is_connected))
            .await
            .expect("the edge is running");
    }

    async fn shut_down(self) -> Result<(), Error> {
        let _ = self.stop.send(());
        within(LIMIT, self.task).await.expect("the edge task")
    }
}

/// The steps an edge went through, as a watcher sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Connecting(u32),
    Connected,
    /// The attempt, and when the next one may start.
    Backoff(u32, Instant),
    Stopped,
}

/// Records every state the watch shows until the edge stops, each with when it was seen
/// (a watcher may see a state late, never early).
fn record_steps(mut state: watch::Receiver<EdgeState>) -> JoinHandle<Vec<(Step, Instant)>> {
    tokio::spawn(async move {
        let mut steps = Vec::new();
        loop {
            let step = match &*state.borrow_and_update() {
                EdgeState::Connecting { attempt } => Step::Connecting(*attempt),
                EdgeState::Connected { .. } => Step::Connected,
                EdgeState::Backoff { attempt, until, .. } => Step::Backoff(*attempt, *until),
                _ => Step::Stopped,
            };
            let stopped = step == Step::Stopped;
            steps.push((step, Instant::now()));
            if stopped || state.changed().await.is_err() {
                return steps;
            }
        }
    })
}

/// Sends `payload` to the edge's "echo" through `relay` and returns what came back.
async fn echo(relay: &SessionClient<QuinnConnection>, payload: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = within(LIMIT, relay.open("echo", Metadata::Empty))
        .await
        .expect("open echo");
    send.write_all(payload).await.unwrap();
    send.shutdown().await.unwrap();
    let mut reply = Vec::new();
    within(LIMIT, recv.read_to_end(&mut reply)).await.unwrap();
    reply
}

#[tokio::test]
async fn edge_connects_serves_and_stops_on_the_signal() {
    let (identity, trusted) = identity();
    let mut relay = TestRelay::start(loopback(), identity, Policy::Accept).await;
    let baseline = alive_tasks();
    let mut edge = spawn_edge(edge_to(relay.addr, &trusted).build(router()).unwrap());
    edge.connected().await;
    let EdgeState::Connected {
        relay: dialed,
        since,
    } = edge.state.borrow().clone()
    else {
        panic!("not connected");
    };
    assert_eq!(dialed, relay.addr);
    assert!(since.elapsed() < LIMIT);
    let session = relay.next_session().await;
    assert_eq!(
        echo(&session, b"hello through the edge").await,
        b"hello through the edge"
    );
    let mut state = edge.state.clone();
    edge.shut_down().await.expect("a graceful stop");
    assert!(state.borrow_and_update().is_stopped());
    let end = within(LIMIT, relay.ends.recv()).await.unwrap();
    assert!(matches!(end.why, Error::SessionClosed), "{:?}", end.why);
    drop(session);
    assert!(
        settle_tasks(baseline).await <= baseline,
        "tasks outlived the edge"
    );
}

#[tokio::test]
async fn lanes_asked_of_a_relay_that_does_not_know_them_leave_the_edge_on_one_connection() {
    // This relay runs a plain session on every connection, as relays before lanes (and
    // the quic-reverse crate) do: a lane's join is not a session handshake, so it fails.
    let (identity, trusted) = identity();
    let mut relay = TestRelay::start(loopback(), identity, Policy::Accept).await;
    let edge_builder = edge_to(relay.addr, &trusted).lanes(3);
    let mut edge = spawn_edge(edge_builder.build(router()).unwrap());
    edge.connected().await;
    let session = relay.next_session().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // One lane tried, then no more: the relay said, by failing it, that it takes none.
    assert_eq!(relay.dialed.load(Ordering::SeqCst), 2);
    assert!(edge.state.borrow().is_connected(), "the session was kept");
    assert_eq!(echo(&session, b"one connection").await, b"one connection");
    edge.shut_down().await.expect("a graceful stop");
}

#[tokio::test]
async fn dropping_the_edge_stops_everything_it_started() {
    let (identity, trusted) = identity();
    let mut relay = TestRelay::start(loopback(), identity, Policy::Accept).await;
    let baseline = alive_tasks();
    let mut edge = spawn_edge(edge_to(relay.addr, &trusted).build(router()).unwrap());
    edge.connected().await;
    let session = relay.next_session().await;
    edge.task.abort();
    let _ = edge.task.await;
    assert!(edge.state.borrow_and_update().is_stopped());
    // The connection goes with the edge: the relay's session ends.
    let why = within(LIMIT, session.closed()).await;
    assert!(!matches!(why, Error::SessionClosed), "{why:?}");
    drop(session);
    assert!(
        settle_tasks(baseline).await <= baseline,
        "tasks outlived the edge"
    );
}

#[tokio::test]
async fn edge_comes_back_by_itself_when_the_relay_restarts() {
    let (identity, trusted) = identity();
    let mut relay = TestRelay::start(loopback(), identity.clone(), Policy::Accept).await;
    let mut edge = spawn_edge(edge_to(relay.addr, &trusted).build(router()).unwrap());
    edge.connected().await;
    let session = relay.next_session().await;
    assert_eq!(echo(&session, b"before").await, b"before");
    let steps = record_steps(edge.state.clone());

    // The relay goes away; the edge keeps trying while it is down, waiting longer each
    // time, and is back once the relay is.
    let down_at = Instant::now();
    let addr = relay.stop().await;
    drop(session);
    within(
        LIMIT,
        edge.state
            .wait_for(|state| matches!(state, EdgeState::Backoff { attempt, .. } if *attempt >= 3)),
    )
    .await
    .unwrap();
    let EdgeState::Backoff { last_error, .. } = edge.state.borrow().clone() else {
        unreachable!()
    };
    eprintln!("while the relay is down: {last_error}");
    assert!(
        last_error.is_retryable() || matches!(*last_error, Error::Transport(_)),
        "{last_error}"
    );
    let mut relay = TestRelay::start(addr, identity, Policy::Accept).await;
    edge.connected().await;
    let back_after = down_at.elapsed();
    let session = relay.next_session().await;
    assert_eq!(echo(&session, b"after").await, b"after");
    edge.shut_down().await.expect("a graceful stop");

    let steps: Vec<(Step, Instant)> = within(LIMIT, steps).await.unwrap();
    let names: Vec<&Step> = steps.iter().map(|(step, _)| step).collect();
    eprintln!("back after {back_after:?}; steps: {names:?}");
    assert_eq!(names.first(), Some(&&Step::Connected));
    assert_eq!(names.last(), Some(&&Step::Stopped));
    let backoffs: Vec<u32> = names
        .iter()
        .filter_map(|step| match step {
            Step::Backoff(attempt, _) => Some(*attempt),
            _ => None,
        })
        .collect();
    assert!(backoffs.len() >= 3, "{names:?}");
    assert_eq!(backoffs[0], 1, "{names:?}");
    assert!(
        backoffs.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "{backoffs:?}"
    );
    let connected = names
        .iter()
        .filter(|step| ***step == Step::Connected)
        .count();
    assert_eq!(connected, 2, "{names:?}");
    // No attempt started before its backoff was over.
    for pair in steps.windows(2) {
        if let (Step::Backoff(_, until), (_, seen)) = (&pair[0].0, &pair[1]) {
            assert!(seen >= until, "{names:?}");
        }
    }
}

#[tokio::test]
async fn the_next_relay_is_tried_when_one_does_not_answer() {
    let (identity, trusted) = identity();
    let mut relay = TestRelay::start(loopback(), identity, Policy::Accept).await;
    // A UDP socket that never answers: the handshake with it times out.
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let edge = Edge::builder()
        .relays([silent_addr, relay.addr])
        .trust(trusted)
        .connect_timeout(Duration::from_millis(500))
        .build(router())
        .unwrap();
    let steps = record_steps(edge.state());
    let mut edge = spawn_edge(edge);
    edge.connected().await;
    let EdgeState::Connected { relay: dialed, .. } = edge.state.borrow().clone() else {
        panic!("not connected");
    };
    assert_eq!(dialed, relay.addr);
    let session = relay.next_session().await;
    assert_eq!(echo(&session, b"second relay").await, b"second relay");
    edge.shut_down().await.expect("a graceful stop");
    let steps: Vec<Step> = within(LIMIT, steps)
        .await
        .unwrap()
        .into_iter()
        .map(|(step, _)| step)
        .collect();
    assert_eq!(
        steps,
        [Step::Connecting(1), Step::Connected, Step::Stopped],
        "one attempt, no backoff"
    );
}

#[tokio::test]
async fn untrusted_certificate_stops_the_edge_at_once() {
    let (identity, _) = identity();
    let (_, other_trust) = self::identity();
    let relay = TestRelay::start(loopback(), identity, Policy::Accept).await;
    let edge = edge_to(relay.addr, &other_trust).build(router()).unwrap();
    let steps = record_steps(edge.state());
    let started = Instant::now();
    let result = within(LIMIT, edge.into_future()).await;
    let Err(Error::UntrustedCertificate {
        relay: dialed,
        server_name,
        reason,
    }) = result
    else {
        panic!("expected an untrusted certificate, got {result:?}");
    };
    eprintln!("stopped after {:?}: {reason}", started.elapsed());
    assert_eq!(dialed, relay.addr);
    assert_eq!(server_name, "127.0.0.1");
    assert!(reason.contains("certificate"), "{reason}");
    let steps: Vec<Step> = within(LIMIT, steps)
        .await
        .unwrap()
        .into_iter()
        .map(|(step, _)| step)
        .collect();
    assert_eq!(steps, [Step::Connecting(1), Step::Stopped], "no retry");
    assert_eq!(relay.registrations.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn refused_registration_stops_the_edge() {
    let (identity, trusted) = identity();
    let relay = TestRelay::start(loopback(), identity, Policy::Unauthorized).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let edge = edge_to(relay.addr, &trusted)
        .register(register_step(Arc::clone(&calls)))
        .build(router())
        .unwrap();
    let result = within(LIMIT, edge.into_future()).await;
    let Err(Error::RegistrationRefused(source)) = result else {
        panic!("expected a refused registration, got {result:?}");
    };
    let cause = source.downcast_ref::<Error>().expect("the session's error");
    assert!(
        matches!(
            cause,
            Error::StreamRejected {
                code: RejectCode::Unauthorized,
                ..
            }
        ),
        "{cause:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no retry");
    assert_eq!(relay.registrations.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn failed_registration_is_retried_until_it_passes() {
    let (identity, trusted) = identity();
    let mut relay = TestRelay::start(loopback(), identity, Policy::BusyFirst(2)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let edge = edge_to(relay.addr, &trusted)
        .register(register_step(Arc::clone(&calls)))
        .build(router())
        .unwrap();
    let mut edge = spawn_edge(edge);
    let errors = tokio::spawn({
        let mut state = edge.state.clone();
        async move {
            let mut errors = Vec::new();
            while state.changed().await.is_ok() {
                match &*state.borrow_and_update() {
                    EdgeState::Backoff { last_error, .. } => errors.push(last_error.to_string()),
                    EdgeState::Connected { .. } => return errors,
                    _ => {}
                }
            }
            errors
        }
    });
    edge.connected().await;
    let errors = within(LIMIT, errors).await.unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|error| error.starts_with("registration failed")),
        "{errors:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(relay.registrations.load(Ordering::SeqCst), 3);
    // The sessions of the failed attempts, then the one that serves.
    let mut session = relay.next_session().await;
    for _ in 0..2 {
        session = relay.next_session().await;
    }
    assert_eq!(echo(&session, b"registered").await, b"registered");
    edge.shut_down().await.expect("a graceful stop");
}

#[tokio::test]
async fn graceful_shutdown_closes_the_session_first_and_finishes_the_request() {
    let (identity, trusted) = identity();
    let mut relay = TestRelay::start(loopback(), identity, Policy::Accept).await;
    let mut edge = spawn_edge(
        edge_to(relay.addr, &trusted)
            // Long enough that only the relay's own close can end the wait in time.
            .close_timeout(Duration::from_secs(30))
            .build(router())
            .unwrap(),
    );
    edge.connected().await;
    relay.hang_up.send_replace(false);
    let session = relay.next_session().await;
    let (mut send, mut recv) = within(LIMIT, session.open("slow", Metadata::Empty))
        .await
        .unwrap();
    send.write_all(b"request").await.unwrap();
    send.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stopping = Instant::now();
    let mut state = edge.state.clone();
    let RunningEdge { stop, task, .. } = edge;
    stop.send(()).unwrap();
    // The relay learns of the shutdown at once, while the request is still running…
    let end = within(LIMIT, relay.ends.recv())
        .await
        .expect("the session end");
    assert!(matches!(end.why, Error::SessionClosed), "{:?}", end.why);
    assert!(
        end.connection_open,
        "the session close came before the connection's end"
    );
    assert!(
        stopping.elapsed() < Duration::from_millis(1200),
        "{:?}",
        stopping.elapsed()
    );
    let refused = session.open("echo", Metadata::Empty).await;
    assert!(matches!(refused, Err(Error::SessionClosed)), "{refused:?}");
    // …and the request still completes.
    let mut reply = Vec::new();
    within(LIMIT, recv.read_to_end(&mut reply)).await.unwrap();
    assert_eq!(reply, b"done");
    // The relay has read everything and hangs up: the edge is done.
    let hung_up = Instant::now();
    relay.hang_up.send_replace(true);
    within(LIMIT, task).await.unwrap().expect("a graceful stop");
    eprintln!(
        "shutdown took {:?}, {:?} after the relay hung up",
        stopping.elapsed(),
        hung_up.elapsed()
    );
    assert!(
        hung_up.elapsed() < Duration::from_secs(10),
        "the edge waited out its close timeout: {:?}",
        hung_up.elapsed()
    );
    assert!(state.borrow_and_update().is_stopped());
}

#[tokio::test]
async fn hundreds_of_edges_come_back_after_a_relay_restart() {
    const EDGES: usize = 200;
    let (identity, trusted) = identity();
    let mut relay = TestRelay::start(loopback(), identity.clone(), Policy::Accept).await;
    let mut edges: Vec<RunningEdge> = (0..EDGES)
        .map(|_| spawn_edge(edge_to(relay.addr, &trusted).build(router()).unwrap()))
        .collect();
    let started = Instant::now();
    for edge in &mut edges {
        edge.connected().await;
    }
    eprintln!("{EDGES} edges connected in {:?}", started.elapsed());
    for _ in 0..EDGES {
        relay.next_session().await;
    }

    let addr = relay.stop().await;
    for edge in &mut edges {
        within(LIMIT, edge.state.wait_for(|state| !state.is_connected()))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = Instant::now();
    let mut relay = TestRelay::start(addr, identity, Policy::Accept).await;
    for edge in &mut edges {
        edge.connected().await;
    }
    eprintln!(
        "{EDGES} edges back {:?} after the restart",
        restarted.elapsed()
    );
    let mut sessions = Vec::new();
    for _ in 0..EDGES {
        sessions.push(relay.next_session().await);
    }
    let mut echoes = JoinSet::new();
    for (n, session) in sessions.into_iter().enumerate() {
        echoes.spawn(async move {
            let payload = format!("edge {n}");
            assert_eq!(echo(&session, payload.as_bytes()).await, payload.as_bytes());
        });
    }
    while let Some(done) = within(LIMIT, echoes.join_next()).await {
        done.unwrap();
    }
    let mut stops = JoinSet::new();
    for edge in edges {
        stops.spawn(edge.shut_down());
    }
    while let Some(stopped) = within(LIMIT, stops.join_next()).await {
        stopped.unwrap().expect("a graceful stop");
    }
}
