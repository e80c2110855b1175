//! Relays sharing a directory of edges in a real redis-server (started by each test on a
//! free loopback port), with edges on real quinn sessions over 127.0.0.1.
//!
//! What they prove: relays see each other's edges promptly; an edge on two relays is
//! listed twice and found locally first; two edges racing for one name end with one
//! owner; a relay that dies without a goodbye vanishes within its lease; Redis SIGKILLed
//! and restarted loses nothing (lookups go on meanwhile, the directory is rebuilt, a name
//! taken twice meanwhile ends with one holder); a stale release never removes a newer
//! attachment; lookups cost no Redis request; and the Acceptor refuses an edge whose name
//! another edge holds on another relay.
#![cfg(feature = "redis")]

#[path = "support/redis.rs"]
mod redis_fixture;
#[path = "support/relay.rs"]
mod relay_fixture;
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backhaul::relay::auth::{EDGE_FIELD, TOKEN_FIELD};
use backhaul::relay::cluster::{ClusterConfig, RedisDirectory, CLOSE_CLAIM_LOST};
use backhaul::relay::{
    Attachment, Claim, Directory, EdgeInstance, EdgeName, Location, NameClaims, Registry, RelayId,
    TakeoverPolicy, INSTANCE_FIELD, REGISTER_SERVICE,
};
use backhaul::{Error, Metadata, MetadataValue, QuinnConnection, SessionClient};
use redis::Commands;
use tokio::task::JoinSet;

use redis_fixture::RedisServer;
use relay_fixture::{close_code, eventually, TestRelay};
use support::{session_pair, within, SessionPair};

/// Upper bound on any one test (a loaded 2-core machine runs these beside other builds).
const LIMIT: Duration = Duration::from_secs(240);
/// The lease the tests configure: short, so expiry is quick to see.
const LEASE: Duration = Duration::from_millis(1500);
/// Generous bound on a change reaching the other relays (measured: about a millisecond).
const PROPAGATION: Duration = Duration::from_secs(5);
/// Slack on top of the lease for an expiry to be seen (scheduling on a loaded machine).
const SLACK: Duration = Duration::from_millis(1500);

/// One relay: its registry and its view of the directory.
struct Node {
    id: RelayId,
    registry: Registry,
    directory: RedisDirectory,
}

fn address_of(id: &RelayId) -> String {
    format!("{id}.relays.test:7000")
}

fn node(redis: &RedisServer, id: &str, lease: Duration) -> Node {
    node_with(redis, id, lease, Registry::new())
}

fn node_with(redis: &RedisServer, id: &str, lease: Duration, registry: Registry) -> Node {
    let id = RelayId::new(id);
    let config = ClusterConfig::new(redis.url(), id.clone(), address_of(&id)).with_lease(lease);
    let directory = RedisDirectory::start(config, registry.clone()).expect("directory");
    Node {
        id,
        registry,
        directory,
    }
}

/// Waits until every node follows the directory and sees every node alive.
async fn all_synced(nodes: &[&Node]) {
    let ids: Vec<RelayId> = nodes.iter().map(|node| node.id.clone()).collect();
    for node in nodes {
        eventually(PROPAGATION, "a relay follows the directory", || async {
            let live = node.directory.live_relays();
            node.directory.is_synced() && ids.iter().all(|id| live.contains(id))
        })
        .await;
    }
}

fn name(text: &str) -> EdgeName {
    EdgeName::new(text).expect("a valid name")
}

/// Attaches `client` as `edge` on `node` and claims the name cluster-wide for `instance`,
/// as the Acceptor does; the local attach is undone if the claim is refused.
async fn attach(
    node: &Node,
    edge: &str,
    instance: &str,
    client: &SessionClient<QuinnConnection>,
) -> Result<Attachment, Error> {
    let attachment = node.registry.attach(name(edge), client.clone()).await?;
    let claim = Claim {
        name: attachment.name().clone(),
        instance: EdgeInstance::parse(instance).expect("a valid instance"),
        epoch: attachment.epoch(),
    };
    node.directory.claim(claim).await?;
    Ok(attachment)
}

/// Where `node` locates `edge`: "local", a relay id, or "unknown".
async fn located(node: &Node, edge: &str) -> String {
    match node.directory.locate(edge).await.expect("locate") {
        Location::Local(handle) => {
            assert_eq!(handle.name().as_str(), edge);
            "local".to_owned()
        }
        Location::Elsewhere(relay) => relay.to_string(),
        _ => "unknown".to_owned(),
    }
}

/// Polls `check` every millisecond until it holds; how long that took.
async fn time_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn attachment_keys(redis: &RedisServer, relay: &RelayId) -> Vec<String> {
    let mut connection = redis.connection();
    let mut keys: Vec<String> = connection
        .keys(format!("backhaul:edge:*:at:{relay}"))
        .expect("KEYS");
    keys.sort();
    keys
}

fn owner_of(redis: &RedisServer, edge: &str) -> Option<String> {
    let mut connection = redis.connection();
    connection
        .get(format!("backhaul:edge:{{{edge}}}:owner"))
        .expect("GET")
}

fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[(sorted.len() * pct / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_see_each_others_edges_within_a_bound() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    within(LIMIT, async {
        let nodes = [
            node(&redis, "relay-a", LEASE),
            node(&redis, "relay-b", LEASE),
            node(&redis, "relay-c", LEASE),
        ];
        all_synced(&nodes.iter().collect::<Vec<_>>()).await;
        let pair = session_pair().await;
        let mut attachments = Vec::new();
        let mut reach = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            for j in 0..10 {
                let edge = format!("edge-{i}-{j}");
                let claimed = Instant::now();
                let attachment = attach(node, &edge, &format!("box-{i}-{j}"), &pair.relay)
                    .await
                    .expect("an unclaimed name is granted");
                attachments.push(attachment);
                for other in nodes.iter().filter(|other| other.id != node.id) {
                    time_until(PROPAGATION, "another relay sees the edge", || async {
                        located(other, &edge).await == node.id.as_str()
                    })
                    .await;
                }
                reach.push(claimed.elapsed());
                assert_eq!(located(node, &edge).await, "local");
            }
        }
        reach.sort();
        eprintln!(
            "claim + reaching both other relays: p50 {:?}, max {:?}",
            percentile(&reach, 50),
            reach[reach.len() - 1]
        );
        for node in &nodes {
            assert_eq!(node.directory.live_relays().len(), 3);
            for other in &nodes {
                assert_eq!(
                    node.directory.relay_address(&other.id),
                    Some(address_of(&other.id))
                );
            }
            assert_eq!(attachment_keys(&redis, &node.id).len(), 10);
            assert_eq!(located(node, "nobody").await, "unknown");
        }
        // A detach reaches the others too, and removes the keys.
        let gone = attachments.remove(0);
        let edge = gone.name().to_string();
        drop(gone);
        for other in &nodes[1..] {
            time_until(PROPAGATION, "another relay forgets the edge", || async {
                located(other, &edge).await == "unknown"
            })
            .await;
        }
        assert_eq!(attachment_keys(&redis, &nodes[0].id).len(), 9);
        assert_eq!(owner_of(&redis, &edge), None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_on_two_relays_is_listed_twice_and_found_locally_first() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    within(LIMIT, async {
        let (a, b, c) = (
            node(&redis, "relay-a", LEASE),
            node(&redis, "relay-b", LEASE),
            node(&redis, "relay-c", LEASE),
        );
        all_synced(&[&a, &b, &c]).await;
        let (to_a, to_b, to_c) = (
            session_pair().await,
            session_pair().await,
            session_pair().await,
        );
        let on_a = attach(&a, "kiosk", "kiosk-box", &to_a.relay)
            .await
            .expect("a");
        let on_b = attach(&b, "kiosk", "kiosk-box", &to_b.relay)
            .await
            .expect("the same instance may attach to a second relay");
        eventually(PROPAGATION, "c lists both attachments", || async {
            c.directory.attachments("kiosk").len() == 2
        })
        .await;
        let listed = c.directory.attachments("kiosk");
        assert_eq!(listed[0].relay, a.id);
        assert_eq!(listed[1].relay, b.id);
        assert!(listed.iter().all(|at| at.instance.as_str() == "kiosk-box"));
        assert_eq!(located(&a, "kiosk").await, "local");
        assert_eq!(located(&b, "kiosk").await, "local");
        assert_eq!(located(&c, "kiosk").await, "relay-a");

        // A different edge is refused everywhere, and nothing of it stays.
        for node in [&a, &b, &c] {
            let refused = attach(node, "kiosk", "impostor", &to_c.relay).await;
            assert!(
                matches!(refused, Err(Error::EdgeNameTaken { .. })),
                "{refused:?}"
            );
        }
        assert!(c.registry.get("kiosk").is_none());
        assert_eq!(owner_of(&redis, "kiosk").as_deref(), Some("kiosk-box"));

        // One attachment left: still owned, still refused to others.
        drop(on_a);
        eventually(PROPAGATION, "c finds the edge on b", || async {
            located(&c, "kiosk").await == "relay-b"
        })
        .await;
        assert!(attach(&c, "kiosk", "impostor", &to_c.relay).await.is_err());
        // None left: the name is free.
        drop(on_b);
        eventually(PROPAGATION, "the owner is removed", || async {
            owner_of(&redis, "kiosk").is_none()
        })
        .await;
        let _on_c = attach(&c, "kiosk", "impostor", &to_c.relay)
            .await
            .expect("a free name is granted");
        eventually(PROPAGATION, "a finds the new holder", || async {
            located(&a, "kiosk").await == "relay-c"
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_racing_for_one_name_on_two_relays_end_with_one_owner() {
    const NAMES: usize = 300;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    within(LIMIT, async {
        let a = Arc::new(node(&redis, "relay-a", LEASE));
        let b = Arc::new(node(&redis, "relay-b", LEASE));
        all_synced(&[&a, &b]).await;
        let (to_a, to_b) = (session_pair().await, session_pair().await);
        // 600 claims at once: every name claimed by a different edge on each relay.
        let mut racing = JoinSet::new();
        for i in 0..NAMES {
            for (node, client, side) in [(&a, &to_a.relay, "a"), (&b, &to_b.relay, "b")] {
                let (node, client) = (Arc::clone(node), client.clone());
                racing.spawn(async move {
                    let edge = format!("race-{i}");
                    let won = attach(&node, &edge, &format!("{side}-{i}"), &client).await;
                    (i, side, won)
                });
            }
        }
        let mut winners: HashMap<usize, &str> = HashMap::new();
        let mut held = Vec::new();
        while let Some(joined) = racing.join_next().await {
            let (i, side, won) = joined.expect("a racer");
            match won {
                Ok(attachment) => {
                    assert!(winners.insert(i, side).is_none(), "race-{i} won twice");
                    held.push(attachment);
                }
                Err(Error::EdgeNameTaken { .. }) => {}
                Err(other) => panic!("race-{i} on {side}: {other:?}"),
            }
        }
        assert_eq!(winners.len(), NAMES, "every name has exactly one winner");
        let (won_a, won_b) = (
            winners.values().filter(|side| **side == "a").count(),
            winners.values().filter(|side| **side == "b").count(),
        );
        eprintln!("race winners: relay-a {won_a}, relay-b {won_b}");
        for (i, side) in &winners {
            let edge = format!("race-{i}");
            assert_eq!(owner_of(&redis, &edge), Some(format!("{side}-{i}")));
            let (winner, loser) = if *side == "a" { (&a, &b) } else { (&b, &a) };
            assert!(winner.registry.contains(&edge));
            assert!(
                !loser.registry.contains(&edge),
                "the loser's attach is undone"
            );
        }
        for (i, side) in &winners {
            let edge = format!("race-{i}");
            let (winner, loser) = if *side == "a" { (&a, &b) } else { (&b, &a) };
            assert_eq!(located(winner, &edge).await, "local");
            eventually(
                PROPAGATION,
                "the loser's relay finds the winner",
                || async { located(loser, &edge).await == winner.id.as_str() },
            )
            .await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_without_a_goodbye_vanishes_within_its_lease() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    within(LIMIT, async {
        let a = node(&redis, "relay-a", LEASE);
        let b = node(&redis, "relay-b", LEASE);
        all_synced(&[&a, &b]).await;
        let pair = session_pair().await;
        let mut attachments = Vec::new();
        for i in 0..20 {
            let edge = format!("doomed-{i}");
            attachments.push(attach(&a, &edge, &format!("box-{i}"), &pair.relay).await.expect("claim"));
        }
        eventually(PROPAGATION, "b sees a's edges", || async {
            located(&b, "doomed-19").await == "relay-a"
        })
        .await;
        // Several refreshes pass: the leases are kept alive meanwhile.
        tokio::time::sleep(LEASE * 2).await;
        assert_eq!(located(&b, "doomed-0").await, "relay-a");
        assert_eq!(attachment_keys(&redis, &a.id).len(), 20);

        // "SIGKILL": a's directory tasks stop without releasing anything, while its
        // registry (and so its sessions) would still be there.
        let Node {
            directory: killed, ..
        } = a;
        drop(killed);
        let killed_at = Instant::now();
        let forgotten = time_until(LEASE + SLACK, "b forgets the dead relay's edges", || async {
            let mut all_unknown = true;
            for i in 0..20 {
                all_unknown &= located(&b, &format!("doomed-{i}")).await == "unknown";
            }
            all_unknown && !b.directory.live_relays().contains(&RelayId::new("relay-a"))
        })
        .await;
        time_until(LEASE + SLACK, "a's keys expire in Redis", || async {
            let mut connection = redis.connection();
            let relay_key: bool = connection.exists("backhaul:relay:relay-a").expect("EXISTS");
            !relay_key && attachment_keys(&redis, &RelayId::new("relay-a")).is_empty()
        })
        .await;
        let expired = killed_at.elapsed();
        eprintln!("lease {LEASE:?}: b forgot the killed relay after {forgotten:?}, its keys expired after {expired:?}");
        // Not before the lease could have run out: the last refresh was at most lease/3
        // before the kill.
        assert!(forgotten >= LEASE / 2, "forgotten too early: {forgotten:?}");
        for i in 0..20 {
            assert_eq!(owner_of(&redis, &format!("doomed-{i}")), None);
        }
        drop(attachments);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_loses_nothing_and_a_name_taken_twice_meanwhile_ends_with_one_holder(
) {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    within(LIMIT, async {
        let a = node(&redis, "relay-a", LEASE);
        let b = node(&redis, "relay-b", LEASE);
        all_synced(&[&a, &b]).await;
        let pair = session_pair().await;
        let _steady = attach(&a, "steady", "steady-box", &pair.relay).await.expect("claim");
        eventually(PROPAGATION, "b sees the steady edge", || async {
            located(&b, "steady").await == "relay-a"
        })
        .await;

        redis.kill();
        eventually(PROPAGATION, "both relays notice the outage", || async {
            !a.directory.is_synced() && !b.directory.is_synced()
        })
        .await;
        // Longer than a lease: lookups still answer from the cache.
        tokio::time::sleep(LEASE * 2).await;
        assert_eq!(located(&b, "steady").await, "relay-a");
        assert_eq!(located(&a, "steady").await, "local");
        // Edges arriving meanwhile are accepted locally; two different edges take one
        // name on the two relays.
        let _during = attach(&a, "during", "during-box", &pair.relay)
            .await
            .expect("accepted locally while Redis is down");
        let (split_a, split_b) = (session_pair().await, session_pair().await);
        let held_a = attach(&a, "split", "split-a", &split_a.relay).await.expect("a");
        let held_b = attach(&b, "split", "split-b", &split_b.relay).await.expect("b");
        let deferred = a.directory.stats().snapshot().claims_deferred
            + b.directory.stats().snapshot().claims_deferred;
        assert_eq!(deferred, 3);

        let restarted = Instant::now();
        redis.restart();
        all_synced(&[&a, &b]).await;
        let rebuilt = time_until(PROPAGATION, "the directory is rebuilt", || async {
            attachment_keys(&redis, &a.id).len() + attachment_keys(&redis, &b.id).len() == 3
        })
        .await;
        eprintln!("directory rebuilt {rebuilt:?} after its Redis answered again ({:?} after the restart began)", restarted.elapsed());
        assert_eq!(owner_of(&redis, "steady").as_deref(), Some("steady-box"));
        assert_eq!(owner_of(&redis, "during").as_deref(), Some("during-box"));
        eventually(PROPAGATION, "b sees the edge that came during the outage", || async {
            located(&b, "during").await == "relay-a"
        })
        .await;
        // Exactly one "split" survives; the other relay disconnected its edge.
        let owner = owner_of(&redis, "split").expect("split has an owner");
        let (survivor, evicted, evicted_pair) = if owner == "split-a" {
            (&a, &b, &split_b)
        } else {
            assert_eq!(owner, "split-b");
            (&b, &a, &split_a)
        };
        eventually(PROPAGATION, "the losing relay drops its edge", || async {
            !evicted.registry.contains("split")
        })
        .await;
        assert!(survivor.registry.contains("split"));
        assert_eq!(
            close_code(&evicted_pair.quic.edge).await,
            Some(u64::from(CLOSE_CLAIM_LOST))
        );
        assert_eq!(
            a.directory.stats().snapshot().evictions + b.directory.stats().snapshot().evictions,
            1
        );
        eventually(PROPAGATION, "the losing relay finds the survivor", || async {
            located(evicted, "split").await == survivor.id.as_str()
        })
        .await;
        drop((held_a, held_b));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_release_or_claim_never_undoes_a_newer_attachment() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    within(LIMIT, async {
        let b = node(&redis, "relay-b", LEASE);
        // Relay a, and the same relay restarted while its old process still ends its
        // sessions (same id, a new run).
        let old = node(&redis, "relay-a", LEASE);
        all_synced(&[&old, &b]).await;
        let (first, second) = (session_pair().await, session_pair().await);
        let stale = attach(&old, "kiosk", "kiosk-box", &first.relay)
            .await
            .expect("old");
        let restarted = node(&redis, "relay-a", LEASE);
        all_synced(&[&restarted, &b]).await;
        let newer = attach(&restarted, "kiosk", "kiosk-box", &second.relay)
            .await
            .expect("the restarted relay claims again");
        let key = "backhaul:edge:{kiosk}:at:relay-a";
        let value: String = redis.connection().get(key).expect("GET");
        // The old process's session ends: its release must not remove the new value.
        drop(stale);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after: Option<String> = redis.connection().get(key).expect("GET");
        assert_eq!(
            after,
            Some(value),
            "a stale release removed a newer attachment"
        );
        assert_eq!(owner_of(&redis, "kiosk").as_deref(), Some("kiosk-box"));
        assert_eq!(located(&b, "kiosk").await, "relay-a");
        drop(old);

        // Within one run: a newer epoch claimed first, then the older one's claim.
        let replacing = node_with(
            &redis,
            "relay-c",
            LEASE,
            Registry::with_policy(TakeoverPolicy::ReplaceHolder),
        );
        all_synced(&[&replacing]).await;
        let (third, fourth) = (session_pair().await, session_pair().await);
        let older = replacing
            .registry
            .attach(name("panel"), third.relay.clone())
            .await
            .expect("attach");
        let older_epoch = older.epoch();
        let newest = attach(&replacing, "panel", "panel-box", &fourth.relay)
            .await
            .expect("newer");
        let late = replacing
            .directory
            .claim(Claim {
                name: name("panel"),
                instance: EdgeInstance::parse("panel-box").unwrap(),
                epoch: older_epoch,
            })
            .await;
        assert!(matches!(late, Err(Error::EdgeNameTaken { .. })), "{late:?}");
        let value: String = redis
            .connection()
            .get("backhaul:edge:{panel}:at:relay-c")
            .expect("GET");
        assert!(
            value.starts_with(&format!("panel-box {} ", newest.epoch())),
            "{value}"
        );
        drop((newer, older, newest));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_lookups_send_nothing_to_redis() {
    const LOOKUPS: usize = 20_000;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    within(LIMIT, async {
        // A long lease: no refresh falls inside the measurement.
        let lease = Duration::from_secs(90);
        let a = Arc::new(node(&redis, "relay-a", lease));
        let b = node(&redis, "relay-b", lease);
        all_synced(&[&a, &b]).await;
        let pair = session_pair().await;
        let _here = attach(&a, "here", "here-box", &pair.relay)
            .await
            .expect("here");
        let _there = attach(&b, "there", "there-box", &pair.relay)
            .await
            .expect("there");
        eventually(PROPAGATION, "a sees b's edge", || async {
            located(&a, "there").await == "relay-b"
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let commands = |redis: &RedisServer| -> u64 {
            let info: String = redis::cmd("INFO")
                .arg("stats")
                .query(&mut redis.connection())
                .expect("INFO");
            info.lines()
                .find_map(|line| line.strip_prefix("total_commands_processed:"))
                .and_then(|count| count.trim().parse().ok())
                .expect("total_commands_processed")
        };
        let round_trips = a.directory.stats().snapshot().round_trips;
        let before = commands(&redis);
        let started = Instant::now();
        let mut lookups = JoinSet::new();
        for task in 0..200 {
            let a = Arc::clone(&a);
            lookups.spawn(async move {
                for i in 0..LOOKUPS / 200 {
                    let edge = ["here", "there", "nowhere"][(task + i) % 3];
                    let location = a.directory.locate(edge).await.expect("locate");
                    let expected = match location {
                        Location::Local(_) => "here",
                        Location::Elsewhere(relay) => {
                            assert_eq!(relay.as_str(), "relay-b");
                            "there"
                        }
                        _ => "nowhere",
                    };
                    assert_eq!(edge, expected);
                }
            });
        }
        while let Some(joined) = lookups.join_next().await {
            joined.expect("lookups");
        }
        let took = started.elapsed();
        let after = commands(&redis);
        eprintln!("{LOOKUPS} lookups by 200 tasks in {took:?}");
        assert_eq!(a.directory.stats().snapshot().round_trips, round_trips);
        // The INFO that read `before` is the one command in between.
        assert_eq!(after - before, 1, "Redis saw commands during the lookups");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_claims_and_lookups_on_three_relays() {
    const PER_RELAY: usize = 100;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    within(LIMIT, async {
        let nodes: Vec<Arc<Node>> = ["relay-a", "relay-b", "relay-c"]
            .into_iter()
            .map(|id| Arc::new(node(&redis, id, LEASE)))
            .collect();
        all_synced(&nodes.iter().map(AsRef::as_ref).collect::<Vec<_>>()).await;
        let pairs: Vec<SessionPair> = vec![
            session_pair().await,
            session_pair().await,
            session_pair().await,
        ];
        let mut tasks = JoinSet::new();
        for (n, node) in nodes.iter().enumerate() {
            for i in 0..PER_RELAY {
                let (node, client) = (Arc::clone(node), pairs[n].relay.clone());
                tasks.spawn(async move {
                    let edge = format!("many-{n}-{i}");
                    let started = Instant::now();
                    let attachment = attach(&node, &edge, &format!("box-{n}-{i}"), &client)
                        .await
                        .expect("a distinct name is granted");
                    (started.elapsed(), Some(attachment))
                });
                // Lookups running meanwhile, on every relay.
                let node = Arc::clone(&nodes[(n + i) % nodes.len()]);
                tasks.spawn(async move {
                    for round in 0..20 {
                        let edge = format!("many-{}-{}", round % 3, i);
                        node.directory.locate(&edge).await.expect("locate");
                        tokio::task::yield_now().await;
                    }
                    (Duration::ZERO, None)
                });
            }
        }
        let mut latencies = Vec::new();
        let mut held = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (latency, attachment) = joined.expect("a task");
            if let Some(attachment) = attachment {
                latencies.push(latency);
                held.push(attachment);
            }
        }
        latencies.sort();
        eprintln!(
            "{} concurrent claims: p50 {:?}, p99 {:?}",
            latencies.len(),
            percentile(&latencies, 50),
            percentile(&latencies, 99)
        );
        for (n, node) in nodes.iter().enumerate() {
            assert_eq!(attachment_keys(&redis, &node.id).len(), PER_RELAY);
            for viewer in &nodes {
                eventually(PROPAGATION, "every relay sees every edge", || async {
                    let mut all = true;
                    for i in 0..PER_RELAY {
                        let at = located(viewer, &format!("many-{n}-{i}")).await;
                        all &= if viewer.id == node.id {
                            at == "local"
                        } else {
                            at == node.id.as_str()
                        };
                    }
                    all
                })
                .await;
            }
        }
        drop(held);
    })
    .await;
}

/// Registration metadata naming the edge's instance.
fn registration(edge: &str, token: &str, instance: &str) -> Metadata {
    let mut fields = HashMap::new();
    for (key, value) in [
        (EDGE_FIELD, edge),
        (TOKEN_FIELD, token),
        (INSTANCE_FIELD, instance),
    ] {
        fields.insert(key.to_owned(), MetadataValue::String(value.to_owned()));
    }
    Metadata::Structured(fields)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acceptor_refuses_an_edge_whose_name_another_edge_holds_on_another_relay() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    within(LIMIT, async {
        let start = |id: &str| {
            let registry = Registry::new();
            let node = node_with(&redis, id, LEASE, registry.clone());
            let claims = node.directory.clone();
            let relay = TestRelay::start(&["kiosk=s3cret"], registry, move |acceptor| {
                acceptor.with_claims(claims)
            });
            (node, relay)
        };
        let (a, relay_a) = start("relay-a");
        let (b, relay_b) = start("relay-b");
        all_synced(&[&a, &b]).await;
        let register = |relay: &TestRelay, instance: &str| {
            let endpoint = relay.endpoint_from("127.0.0.1");
            let (addr, metadata) = (relay.addr, registration("kiosk", "s3cret", instance));
            async move {
                let edge = relay_fixture::connect(&endpoint, addr)
                    .await
                    .expect("connect");
                let opened = edge.client.open(REGISTER_SERVICE, metadata).await;
                (opened, edge, endpoint)
            }
        };
        let (opened, _edge_a, _endpoint_a) = register(&relay_a, "kiosk-1").await;
        opened.expect("the first edge registers on relay a");
        eventually(PROPAGATION, "b sees the edge on a", || async {
            located(&b, "kiosk").await == "relay-a"
        })
        .await;
        // Another edge with the same name and token, on relay b: refused, as on one relay.
        let (opened, _impostor, _endpoint_i) = register(&relay_b, "kiosk-2").await;
        match opened {
            Err(Error::StreamRejected { reason, .. }) => {
                assert!(reason.unwrap_or_default().contains("already connected"));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(relay_b.stats.snapshot().name_taken, 1);
        assert!(b.registry.get("kiosk").is_none());
        // The same edge instance on relay b as well: accepted, found locally on b.
        let (opened, _edge_b, _endpoint_b) = register(&relay_b, "kiosk-1").await;
        opened.expect("the same instance registers on a second relay");
        assert_eq!(located(&b, "kiosk").await, "local");
        eventually(PROPAGATION, "a lists both", || async {
            a.directory.attachments("kiosk").len() == 2
        })
        .await;
        relay_a.shutdown().await;
        relay_b.shutdown().await;
    })
    .await;
}
