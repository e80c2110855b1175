//! The relay's registry of edges over real quinn on 127.0.0.1: hundreds of edges attaching,
//! replacing and detaching at once; epochs; the takeover policy; lookup through the
//! `Directory` trait; and a quic-reverse 0.1.2 edge registering.
//!
//! Every change the registry publishes is replayed into a model, which must agree with
//! the registry: every epoch attached once and detached once, never two holders of a name.

#[path = "support/relay.rs"]
mod relay_fixture;
mod support;

use std::collections::{BTreeSet, HashMap};
use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::Duration;

use backhaul::quic::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};
use backhaul::relay::{
    DetachReason, Directory, EdgeName, Epoch, Location, Registry, RegistryEvent, RelayId,
    TakeoverPolicy, CLOSE_REPLACED, REGISTER_SERVICE,
};
use backhaul::{
    ClientEvent, Config, Error, Metadata, QuinnConnection, RejectCode, Role, Session, SessionClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;

use relay_fixture::{close_code, eventually, register, Blackhole, Registration, TestRelay};
use support::{serve_test_services, within};

/// Upper bound on any one test (a loaded 2-core machine runs these beside other builds).
const LIMIT: Duration = Duration::from_secs(180);
/// Upper bound on any one wait inside a test.
const WAIT: Duration = Duration::from_secs(60);

fn name(text: &str) -> EdgeName {
    EdgeName::new(text).expect("a valid name")
}

/// Collects a registry's events on a task until the registry has been quiet for a while.
fn collect_events(
    mut events: broadcast::Receiver<RegistryEvent>,
) -> tokio::task::JoinHandle<Vec<RegistryEvent>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            match events.recv().await {
                Ok(event) => seen.push(event),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    panic!("the event collector missed {missed} events")
                }
                Err(broadcast::error::RecvError::Closed) => return seen,
            }
        }
    })
}

/// Replays `events` into a model of the table, checking each step: an attach names the
/// holder it replaced, a detach removes the current holder, epochs only grow. Returns
/// the final table and how many epochs attached.
fn replay(events: &[RegistryEvent]) -> (HashMap<EdgeName, Epoch>, usize) {
    let mut table: HashMap<EdgeName, Epoch> = HashMap::new();
    let mut last_epoch = None;
    let mut attached = 0;
    let mut detached = BTreeSet::new();
    for event in events {
        match event {
            RegistryEvent::Attached {
                name,
                epoch,
                replaced,
            } => {
                assert!(Some(*epoch) > last_epoch, "epochs grow: {event:?}");
                last_epoch = Some(*epoch);
                assert!(
                    !table.contains_key(name),
                    "attached over a holder not detached first: {event:?}"
                );
                if let Some(old) = replaced {
                    assert!(detached.contains(old), "{event:?}");
                }
                table.insert(name.clone(), *epoch);
                attached += 1;
            }
            RegistryEvent::Detached {
                name,
                epoch,
                reason,
            } => {
                assert_eq!(table.remove(name), Some(*epoch), "{event:?}");
                assert!(detached.insert(*epoch), "detached twice: {event:?}");
                if let DetachReason::Replaced { by } = reason {
                    assert!(by > epoch, "{event:?}");
                }
            }
            _ => {}
        }
    }
    (table, attached)
}

/// The registry's table as the model holds it.
fn table_of(registry: &Registry) -> HashMap<EdgeName, Epoch> {
    registry
        .edges()
        .into_iter()
        .map(|edge| (edge.name().clone(), edge.epoch()))
        .collect()
}

/// Relay-side session clients over `n` real QUIC connections (one endpoint pair), with
/// the edge sides kept alive and answering pings.
struct Sessions {
    relay_sides: Vec<SessionClient<QuinnConnection>>,
    edge_sides: Vec<(SessionClient<QuinnConnection>, mpsc::Receiver<ClientEvent>)>,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

async fn sessions(n: usize) -> Sessions {
    let identity = Identity::self_signed(&["localhost"]).expect("certificate");
    let trusted = identity.cert_chain.clone();
    let relay = server_endpoint("127.0.0.1:0".parse().unwrap(), identity, DEFAULT_ALPN)
        .expect("relay endpoint");
    let addr = relay.local_addr().unwrap();
    let edge = client_endpoint(&trusted, DEFAULT_ALPN).expect("edge endpoint");
    let mut relay_sides = Vec::new();
    let mut edge_sides = Vec::new();
    for _ in 0..n {
        let connecting = edge.connect(addr, "localhost").expect("connect");
        let accepting = async { relay.accept().await.expect("incoming").await };
        let (edge_connection, relay_connection) = tokio::join!(connecting, accepting);
        let relay_session = Session::new(
            QuinnConnection::new(relay_connection.expect("relay side")),
            Role::Server,
            Config::new(),
        );
        let edge_session = Session::new(
            QuinnConnection::new(edge_connection.expect("edge side")),
            Role::Client,
            Config::new(),
        );
        let (relay_handle, edge_handle) = tokio::join!(relay_session.start(), edge_session.start());
        relay_sides.push(SessionClient::new(relay_handle.expect("relay session")));
        edge_sides.push(SessionClient::with_events(
            edge_handle.expect("edge session"),
        ));
    }
    Sessions {
        relay_sides,
        edge_sides,
        _endpoints: (relay, edge),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_edges_attach_replace_and_detach_concurrently() {
    const EDGES: usize = 300;
    within(LIMIT, async {
        let entries: Vec<String> = (0..EDGES).map(|i| format!("edge-{i}=token-{i}")).collect();
        let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
        let registry = Registry::with_policy(TakeoverPolicy::ReplaceHolder);
        let collector = collect_events(registry.subscribe());
        let relay = TestRelay::start(&entries, registry.clone(), |acceptor| acceptor);
        let endpoints: Vec<quinn::Endpoint> = (1..=4)
            .map(|i| relay.endpoint_from(&format!("127.0.0.{i}")))
            .collect();

        // Every edge registers at once.
        let started = std::time::Instant::now();
        let mut registering = JoinSet::new();
        for i in 0..EDGES {
            let endpoint = endpoints[i % endpoints.len()].clone();
            let addr = relay.addr;
            registering.spawn(async move {
                let edge = register(&endpoint, addr, &format!("edge-{i}"), &format!("token-{i}"))
                    .await
                    .expect("registers");
                (i, edge)
            });
        }
        let mut first = registering.join_all().await;
        first.sort_by_key(|(i, _)| *i);
        eprintln!(
            "{EDGES} edges registered at once in {:?}",
            started.elapsed()
        );
        assert_eq!(registry.len(), EDGES);
        let expected: BTreeSet<String> = (0..EDGES).map(|i| format!("edge-{i}")).collect();
        let names: BTreeSet<String> = registry
            .names()
            .into_iter()
            .map(EdgeName::into_string)
            .collect();
        assert_eq!(names, expected);
        let first_epochs = table_of(&registry);

        // At once: even edges leave, odd edges reconnect (a new session replaces the old).
        let started = std::time::Instant::now();
        let mut churn = JoinSet::new();
        for (i, edge) in first {
            let endpoint = endpoints[(i + 1) % endpoints.len()].clone();
            let addr = relay.addr;
            churn.spawn(async move {
                if i % 2 == 0 {
                    edge.connection.close(0u32.into(), b"bye");
                    (i, edge, None)
                } else {
                    let again =
                        register(&endpoint, addr, &format!("edge-{i}"), &format!("token-{i}"))
                            .await
                            .expect("registers again");
                    (i, edge, Some(again))
                }
            });
        }
        let churned = churn.join_all().await;
        let mut second = Vec::new();
        for (i, old, new) in churned {
            if let Some(new) = new {
                // The old session was closed as replaced; its detach came after the new
                // attach and removed nothing.
                let code = within(WAIT, close_code(&old.connection)).await;
                assert_eq!(code, Some(u64::from(CLOSE_REPLACED)), "edge-{i}");
                second.push((i, new));
            }
        }
        eventually(WAIT, "the even edges detached", || {
            let registry = registry.clone();
            async move { registry.len() == EDGES / 2 }
        })
        .await;
        eprintln!("{EDGES} edges churned in {:?}", started.elapsed());
        let table = table_of(&registry);
        for (i, _) in &second {
            let edge = name(&format!("edge-{i}"));
            assert!(
                table[&edge] > first_epochs[&edge],
                "edge-{i} has its new epoch"
            );
            let handle = registry.get(&edge).expect("attached");
            assert!(
                handle.client().is_ready(),
                "edge-{i}'s session is the live one"
            );
        }

        // Everyone leaves.
        for (_, edge) in &second {
            edge.connection.close(0u32.into(), b"bye");
        }
        eventually(WAIT, "every edge detached", || {
            let registry = registry.clone();
            async move { registry.is_empty() }
        })
        .await;
        eventually(WAIT, "no connection holds an admission slot", || {
            let stats = relay.stats.clone();
            async move { stats.snapshot().unregistered == 0 }
        })
        .await;
        let counts = relay.stats.snapshot();
        assert_eq!(counts.registered, (EDGES + EDGES / 2) as u64, "{counts:?}");

        relay.shutdown().await;
        drop(registry);
        let events = within(WAIT, collector).await.expect("collector");
        let (table, attached) = replay(&events);
        assert!(table.is_empty(), "the model ends empty too: {table:?}");
        assert_eq!(attached, EDGES + EDGES / 2);
        let replaced = events
            .iter()
            .filter(|event| {
                matches!(
                    event,
                    RegistryEvent::Detached {
                        reason: DetachReason::Replaced { .. },
                        ..
                    }
                )
            })
            .count();
        assert_eq!(replaced, EDGES / 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attaches_and_drops_on_few_names_keep_the_registry_consistent() {
    const SESSIONS: usize = 200;
    const NAMES: usize = 10;
    within(LIMIT, async {
        let sessions = sessions(SESSIONS).await;
        let registry = Registry::with_policy(TakeoverPolicy::ReplaceHolder);
        let collector = collect_events(registry.subscribe());
        let mut tasks = JoinSet::new();
        for (i, client) in sessions.relay_sides.iter().cloned().enumerate() {
            let registry = registry.clone();
            tasks.spawn(async move {
                tokio::time::sleep(Duration::from_millis((i * 7 % 23) as u64)).await;
                let edge = name(&format!("edge-{}", i % NAMES));
                match registry.attach(edge, client).await {
                    Ok(attachment) => {
                        tokio::time::sleep(Duration::from_millis((i * 13 % 31) as u64)).await;
                        let current = attachment.is_current();
                        // Dropped: detaches with its epoch (a no-op if it was replaced).
                        let held = attachment.detach();
                        // A replaced attachment stays replaced, so its detach removes
                        // nothing. (Another session may replace it between the two calls,
                        // so being current does not promise the detach still holds.)
                        assert!(current || !held, "a replaced attachment removed an entry");
                        true
                    }
                    // Replaced (so closed) before it got to attach: not possible here,
                    // every session attaches once.
                    Err(error) => panic!("attach failed: {error}"),
                }
            });
        }
        let attached = tasks.join_all().await.into_iter().filter(|ok| *ok).count();
        assert_eq!(attached, SESSIONS);
        assert!(registry.is_empty(), "{:?}", registry.names());
        drop(registry);
        let events = within(WAIT, collector).await.expect("collector");
        let (table, attached) = replay(&events);
        assert!(table.is_empty());
        assert_eq!(attached, SESSIONS);
        drop(sessions);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_newcomers_for_one_live_name_leave_exactly_one_holder() {
    const SESSIONS: usize = 100;
    within(LIMIT, async {
        let sessions = sessions(SESSIONS).await;
        let registry = Registry::with_policy(TakeoverPolicy::KeepLiveHolder {
            ping_timeout: Duration::from_secs(10),
        });
        let mut tasks = JoinSet::new();
        for client in sessions.relay_sides.iter().cloned() {
            let registry = registry.clone();
            tasks.spawn(async move { registry.attach(name("alpha"), client).await });
        }
        let results = tasks.join_all().await;
        let mut holders = Vec::new();
        for result in results {
            match result {
                Ok(attachment) => holders.push(attachment),
                Err(Error::EdgeNameTaken { name }) => assert_eq!(name, "alpha"),
                Err(error) => panic!("unexpected: {error}"),
            }
        }
        assert_eq!(holders.len(), 1, "every holder answered its ping: one wins");
        assert_eq!(
            registry.get("alpha").map(|e| e.epoch()),
            Some(holders[0].epoch())
        );
        assert!(
            sessions.relay_sides.iter().all(SessionClient::is_ready),
            "nobody was replaced"
        );
        drop(holders);
        assert!(registry.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_detach_never_removes_a_newer_session() {
    within(LIMIT, async {
        let sessions = sessions(2).await;
        let (old_client, new_client) = (
            sessions.relay_sides[0].clone(),
            sessions.relay_sides[1].clone(),
        );
        let registry = Registry::with_policy(TakeoverPolicy::ReplaceHolder);
        let mut events = registry.subscribe();
        let old = registry
            .attach(name("alpha"), old_client.clone())
            .await
            .expect("attach");
        let new = registry
            .attach(name("alpha"), new_client)
            .await
            .expect("replace");
        assert!(new.epoch() > old.epoch());
        assert!(!old.is_current());
        assert!(new.is_current());

        // The old session's detach arrives after the new attach: nothing happens.
        assert!(!registry.detach("alpha", old.epoch()));
        drop(old);
        assert_eq!(registry.get("alpha").map(|e| e.epoch()), Some(new.epoch()));
        // The replaced session's connection was closed with CLOSE_REPLACED.
        let edge_side = sessions.edge_sides[0].0.connection().inner().clone();
        assert_eq!(
            within(WAIT, close_code(&edge_side)).await,
            Some(u64::from(CLOSE_REPLACED))
        );

        let mut seen = Vec::new();
        while let Ok(event) = events.try_recv() {
            seen.push(event);
        }
        let (table, _) = replay(&seen);
        assert_eq!(table, table_of(&registry));
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(matches!(
            &seen[2],
            RegistryEvent::Attached { replaced: Some(epoch), .. } if *epoch < new.epoch()
        ));
        let new_epoch = new.epoch();
        assert!(new.detach());
        assert!(registry.is_empty());
        assert!(!registry.detach("alpha", new_epoch), "detached once only");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_holder_keeps_its_name_and_a_silent_one_is_replaced() {
    support::init_tracing();
    within(LIMIT, async {
        let registry = Registry::with_policy(TakeoverPolicy::KeepLiveHolder {
            ping_timeout: Duration::from_secs(2),
        });
        // No session keep-alive: only the takeover ping can tell the holder went silent.
        let relay = TestRelay::start(&["alpha=secret"], registry.clone(), |acceptor| acceptor);
        let network = Blackhole::start(relay.addr).await;
        let endpoint = relay.endpoint_from("127.0.0.1");

        let first = register(&endpoint, network.addr, "alpha", "secret")
            .await
            .expect("the first edge registers");
        let first_epoch = registry.get("alpha").expect("attached").epoch();

        // Same name and token while the first answers: refused, and it keeps the name.
        match register(&endpoint, relay.addr, "alpha", "secret").await {
            Err(Registration::Refused(
                Error::StreamRejected {
                    code: RejectCode::ServiceUnavailable,
                    reason,
                },
                second,
            )) => {
                let reason = reason.unwrap_or_default();
                assert!(reason.contains("already connected"), "{reason}");
                let code = within(WAIT, close_code(&second.connection)).await;
                assert_eq!(code, Some(0x10), "the refused connection is closed");
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        assert_eq!(registry.get("alpha").map(|e| e.epoch()), Some(first_epoch));
        assert!(first.client.is_ready());
        assert_eq!(relay.stats.snapshot().name_taken, 1);

        // The first edge's network drops without a goodbye: the next one takes over.
        network.go_silent();
        let started = std::time::Instant::now();
        let third = register(&endpoint, relay.addr, "alpha", "secret")
            .await
            .expect("a silent holder is replaced");
        eprintln!("took over from a silent holder in {:?}", started.elapsed());
        let holder = registry.get("alpha").expect("attached");
        assert!(holder.epoch() > first_epoch);
        assert!(third.client.is_ready());
        relay.shutdown().await;
    })
    .await;
}

/// Opens "echo" on the edge called `edge`, wherever the directory says it is.
async fn echo_through<D: Directory>(directory: &D, edge: &str) -> Result<Vec<u8>, String> {
    match directory.locate(edge).await.map_err(|e| e.to_string())? {
        Location::Local(edge) => {
            let mut stream = edge
                .connector()
                .connect("echo")
                .await
                .map_err(|e| e.to_string())?;
            stream
                .write_all(b"hello")
                .await
                .map_err(|e| e.to_string())?;
            stream.shutdown().await.map_err(|e| e.to_string())?;
            let mut echoed = Vec::new();
            stream
                .read_to_end(&mut echoed)
                .await
                .map_err(|e| e.to_string())?;
            Ok(echoed)
        }
        Location::Elsewhere(relay) => Err(format!("elsewhere: {relay}")),
        Location::Unknown => Err("unknown".to_owned()),
        _ => Err("unexpected location".to_owned()),
    }
}

/// A directory shared by two relays, as a cluster would have: this relay's registry,
/// and names known to be on another relay.
struct SharedDirectory {
    local: Registry,
    remote: HashMap<String, RelayId>,
}

impl Directory for SharedDirectory {
    type Future = Ready<Result<Location, Error>>;

    fn locate(&self, edge: &str) -> Self::Future {
        let location = match (self.local.get(edge), self.remote.get(edge)) {
            (Some(local), _) => Location::Local(local),
            (None, Some(relay)) => Location::Elsewhere(relay.clone()),
            (None, None) => Location::Unknown,
        };
        ready(Ok(location))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_go_through_the_directory_trait() {
    within(LIMIT, async {
        let registry = Registry::new();
        let relay = TestRelay::start(&["alpha=secret"], registry.clone(), |acceptor| acceptor);
        let endpoint = relay.endpoint_from("127.0.0.1");
        let edge = register(&endpoint, relay.addr, "alpha", "secret")
            .await
            .expect("registers");
        let served = serve_test_services(edge.client.clone(), edge.events);

        // The in-process directory: the registry itself, also behind an Arc.
        assert_eq!(
            echo_through(&registry, "alpha").await,
            Ok(b"hello".to_vec())
        );
        assert_eq!(
            echo_through(&Arc::new(registry.clone()), "alpha").await,
            Ok(b"hello".to_vec())
        );
        assert_eq!(
            echo_through(&registry, "beta").await,
            Err("unknown".to_owned())
        );

        // A shared directory plugs in without changing the caller.
        let shared = SharedDirectory {
            local: registry.clone(),
            remote: HashMap::from([("beta".to_owned(), RelayId::new("relay-b:4433"))]),
        };
        assert_eq!(echo_through(&shared, "alpha").await, Ok(b"hello".to_vec()));
        assert_eq!(
            echo_through(&shared, "beta").await,
            Err("elsewhere: relay-b:4433".to_owned())
        );

        // The relay serves nothing to edges: an edge's own opens are refused, every one
        // of waves as large as the edge's in-flight limit, with the relay's reason.
        for _wave in 0..3 {
            let opens = (0..Config::new().max_inflight_opens).map(|_| {
                let client = edge.client.clone();
                tokio::spawn(async move { client.open("anything", Metadata::Empty).await })
            });
            for open in opens.collect::<Vec<_>>() {
                let refused = open.await.expect("open task");
                assert!(
                    matches!(
                        &refused,
                        Err(Error::StreamRejected {
                            code: RejectCode::UnsupportedService,
                            reason: Some(reason),
                        }) if reason == "the relay offers no services to edges"
                    ),
                    "{refused:?}"
                );
            }
        }
        assert_eq!(
            echo_through(&registry, "alpha").await,
            Ok(b"hello".to_vec())
        );
        relay.shutdown().await;
        served.abort();
    })
    .await;
}

type TheirConnection = quic_reverse_transport::QuinnConnection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_reverse_0_1_2_edge_registers_and_is_reachable() {
    use quic_reverse_control::MetadataValue as TheirValue;
    use quic_reverse_transport::Connection as _;

    within(LIMIT, async {
        let registry = Registry::new();
        let relay = TestRelay::start(&["legacy=secret"], registry.clone(), |acceptor| acceptor);
        let endpoint = relay.endpoint_from("127.0.0.1");
        let connection = endpoint
            .connect(relay.addr, "localhost")
            .expect("connect")
            .await
            .expect("QUIC handshake");
        let session = quic_reverse::Session::new(
            TheirConnection::new(connection.clone()),
            quic_reverse::Role::Client,
            quic_reverse::Config::default(),
        );
        let handle = session
            .start()
            .await
            .expect("their session negotiates with ours");
        let (edge, mut events) = quic_reverse::SessionClient::with_events(handle);
        let credentials = quic_reverse::Metadata::Structured(HashMap::from([
            ("edge".to_owned(), TheirValue::String("legacy".to_owned())),
            ("token".to_owned(), TheirValue::String("secret".to_owned())),
        ]));
        edge.open(REGISTER_SERVICE, credentials)
            .await
            .expect("the reference edge registers");
        assert!(registry.contains("legacy"));

        // It serves "echo" by hand, the 0.1.2 way; the relay reaches it by name.
        let serving = tokio::spawn(async move {
            let mut next_stream_id = 1;
            while let Some(event) = events.recv().await {
                if let quic_reverse::ClientEvent::OpenRequest { request_id, .. } = event {
                    let stream_id = next_stream_id;
                    next_stream_id += 1;
                    edge.accept_open(request_id, stream_id)
                        .await
                        .expect("accept");
                    let (mut send, mut recv) = edge.connection().open_bi().await.expect("open_bi");
                    edge.bind_stream(&mut send, stream_id).await.expect("bind");
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut recv, &mut send).await;
                        let _ = send.shutdown().await;
                    });
                }
            }
        });
        assert_eq!(
            echo_through(&registry, "legacy").await,
            Ok(b"hello".to_vec())
        );

        // Wrong credentials from the reference edge: refused as Unauthorized.
        let other = relay.endpoint_from("127.0.0.2");
        let connection = other
            .connect(relay.addr, "localhost")
            .expect("connect")
            .await
            .expect("QUIC");
        let session = quic_reverse::Session::new(
            TheirConnection::new(connection.clone()),
            quic_reverse::Role::Client,
            quic_reverse::Config::default(),
        );
        let intruder = quic_reverse::SessionClient::new(session.start().await.expect("session"));
        let wrong = quic_reverse::Metadata::Structured(HashMap::from([
            ("edge".to_owned(), TheirValue::String("legacy".to_owned())),
            ("token".to_owned(), TheirValue::String("guess".to_owned())),
        ]));
        match intruder.open(REGISTER_SERVICE, wrong).await {
            Err(quic_reverse::Error::StreamRejected { code, .. }) => {
                assert_eq!(code, quic_reverse::RejectCode::Unauthorized);
            }
            other => panic!("expected Unauthorized, got {:?}", other.map(|_| ())),
        }
        relay.shutdown().await;
        serving.abort();
    })
    .await;
}
