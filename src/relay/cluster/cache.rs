//! The relay's copy of the directory: every attachment in the cluster and every relay's
//! liveness, kept up to date from notices and answered from memory.
//!
//! Bookkeeping only, no I/O: the subscriber feeds it notices and snapshots, lookups read
//! it. An attachment counts while its relay is alive, i.e. until the relay's last `alive`
//! notice (or liveness key) is a lease old: a relay killed with SIGKILL publishes nothing,
//! and its attachments lapse by themselves. While this relay's own subscription is down
//! the cache is *frozen*: it cannot tell a dead relay from a silent Redis, so it keeps
//! answering with what it knew when the subscription went down, until a resync replaces
//! it. Time stands still at that moment: a relay alive then stays alive, and one whose
//! lease had already lapsed (dead, and not yet purged) stays dead rather than coming back.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::notice::{Held, Notice};
use super::ClusterAttachment;
use crate::relay::directory::RelayId;

/// A relay's liveness.
#[derive(Debug, Clone)]
struct Liveness {
    address: String,
    expires: Instant,
}

/// The directory as read at one moment (a resync).
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    /// Attachments: name, relay, value.
    pub(super) attachments: Vec<(String, RelayId, Held)>,
    /// Live relays: id, address, remaining lease.
    pub(super) relays: Vec<(RelayId, String, Duration)>,
}

/// See the [module docs](self).
#[derive(Debug, Default)]
pub(super) struct Cache {
    edges: HashMap<String, BTreeMap<RelayId, Held>>,
    relays: HashMap<RelayId, Liveness>,
    /// When the subscription went down, while it is down.
    frozen_at: Option<Instant>,
}

impl Cache {
    /// Applies a notice received at `now`.
    pub(super) fn apply(&mut self, notice: Notice, now: Instant) {
        match notice {
            Notice::Attach { name, relay, held } => {
                self.edges.entry(name).or_default().insert(relay, held);
            }
            Notice::Detach { name, relay, held } => {
                // Compare-and-delete here too: a late detach of an older epoch keeps the
                // newer attachment.
                if let Some(at) = self.edges.get_mut(&name) {
                    if at.get(&relay) == Some(&held) {
                        at.remove(&relay);
                    }
                    if at.is_empty() {
                        self.edges.remove(&name);
                    }
                }
            }
            Notice::Alive {
                relay,
                lease,
                address,
            } => {
                let expires = now + lease;
                self.relays.insert(relay, Liveness { address, expires });
            }
            Notice::Gone { relay } => self.forget_relay(&relay),
        }
    }

    /// Replaces the cache with a snapshot read at `now`. Relays the cache knew but the
    /// snapshot lacks (Redis restarted empty) get `grace` to publish again before their
    /// attachments lapse; attachments of relays in the snapshot are the snapshot's.
    pub(super) fn replace(&mut self, snapshot: Snapshot, now: Instant, grace: Duration) {
        let mut relays: HashMap<RelayId, Liveness> = snapshot
            .relays
            .into_iter()
            .map(|(relay, address, remaining)| {
                let expires = now + remaining;
                (relay, Liveness { address, expires })
            })
            .collect();
        let mut edges: HashMap<String, BTreeMap<RelayId, Held>> = HashMap::new();
        for (name, relay, held) in snapshot.attachments {
            edges.entry(name).or_default().insert(relay, held);
        }
        for (relay, liveness) in &self.relays {
            if relays.contains_key(relay) || !self.is_live_at(liveness, now) {
                continue;
            }
            let expires = liveness.expires.max(now + grace);
            let address = liveness.address.clone();
            relays.insert(relay.clone(), Liveness { address, expires });
            for (name, at) in &self.edges {
                if let Some(held) = at.get(relay) {
                    let kept = edges.entry(name.clone()).or_default();
                    kept.entry(relay.clone()).or_insert_with(|| held.clone());
                }
            }
        }
        self.edges = edges;
        self.relays = relays;
        self.thaw();
    }

    /// Stops lapsing relays as of `now`, when the subscription went down: until
    /// [`thaw`](Self::thaw), relays are judged as they stood then. Freezing again while
    /// frozen keeps the first moment.
    pub(super) fn freeze(&mut self, now: Instant) {
        self.frozen_at.get_or_insert(now);
    }

    /// Lets relays lapse again (notices flow).
    pub(super) fn thaw(&mut self) {
        self.frozen_at = None;
    }

    /// The moment liveness is judged at: `now`, or the moment the cache froze.
    fn clock(&self, now: Instant) -> Instant {
        self.frozen_at.map_or(now, |frozen| frozen.min(now))
    }

    fn is_live_at(&self, liveness: &Liveness, now: Instant) -> bool {
        liveness.expires > self.clock(now)
    }

    /// True if `relay` counts as alive at `now`.
    pub(super) fn is_live(&self, relay: &RelayId, now: Instant) -> bool {
        self.relays
            .get(relay)
            .is_some_and(|liveness| self.is_live_at(liveness, now))
    }

    /// A live relay other than `me` holding `name` (the smallest id, so every relay picks
    /// the same).
    pub(super) fn elsewhere(&self, name: &str, me: &RelayId, now: Instant) -> Option<RelayId> {
        self.edges
            .get(name)?
            .keys()
            .find(|relay| *relay != me && self.is_live(relay, now))
            .cloned()
    }

    /// Every live attachment of `name`, by relay id.
    pub(super) fn attachments(&self, name: &str, now: Instant) -> Vec<ClusterAttachment> {
        let Some(at) = self.edges.get(name) else {
            return Vec::new();
        };
        at.iter()
            .filter(|(relay, _)| self.is_live(relay, now))
            .map(|(relay, held)| ClusterAttachment {
                relay: relay.clone(),
                instance: held.instance.clone(),
                epoch: held.epoch,
            })
            .collect()
    }

    /// The address `relay` published, while it is alive.
    pub(super) fn relay_address(&self, relay: &RelayId, now: Instant) -> Option<String> {
        let liveness = self.relays.get(relay)?;
        self.is_live_at(liveness, now)
            .then(|| liveness.address.clone())
    }

    /// Live relays, sorted.
    pub(super) fn live_relays(&self, now: Instant) -> Vec<RelayId> {
        let mut relays: Vec<RelayId> = self
            .relays
            .iter()
            .filter(|(_, liveness)| self.is_live_at(liveness, now))
            .map(|(relay, _)| relay.clone())
            .collect();
        relays.sort_unstable();
        relays
    }

    /// Drops relays whose lease lapsed, with their attachments (while frozen, those that
    /// had lapsed when it froze).
    pub(super) fn purge(&mut self, now: Instant) {
        let clock = self.clock(now);
        let lapsed: Vec<RelayId> = self
            .relays
            .iter()
            .filter(|(_, liveness)| liveness.expires <= clock)
            .map(|(relay, _)| relay.clone())
            .collect();
        for relay in lapsed {
            self.forget_relay(&relay);
        }
    }

    fn forget_relay(&mut self, relay: &RelayId) {
        self.relays.remove(relay);
        self.edges.retain(|_, at| {
            at.remove(relay);
            !at.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(name: &str, relay: &str, epoch: u64) -> Notice {
        Notice::parse(&format!("attach {name} {relay} box-{relay} {epoch} run")).unwrap()
    }

    fn detach(name: &str, relay: &str, epoch: u64) -> Notice {
        Notice::parse(&format!("detach {name} {relay} box-{relay} {epoch} run")).unwrap()
    }

    fn alive(relay: &str, lease_ms: u64) -> Notice {
        Notice::parse(&format!("alive {relay} {lease_ms} addr-{relay}")).unwrap()
    }

    #[test]
    fn attachments_live_and_lapse_with_their_relay() {
        let (me, now) = (RelayId::new("a"), Instant::now());
        let mut cache = Cache::default();
        cache.apply(alive("b", 1000), now);
        cache.apply(alive("c", 1000), now);
        cache.apply(attach("kiosk", "c", 1), now);
        cache.apply(attach("kiosk", "b", 4), now);
        cache.apply(attach("kiosk", "a", 2), now);
        assert_eq!(cache.elsewhere("kiosk", &me, now), Some(RelayId::new("b")));
        assert_eq!(cache.attachments("kiosk", now).len(), 2, "a is not alive");
        assert_eq!(
            cache.relay_address(&RelayId::new("c"), now).as_deref(),
            Some("addr-c")
        );
        // A stale detach keeps the newer attachment; the right one removes it.
        cache.apply(detach("kiosk", "b", 3), now);
        assert_eq!(cache.elsewhere("kiosk", &me, now), Some(RelayId::new("b")));
        cache.apply(detach("kiosk", "b", 4), now);
        assert_eq!(cache.elsewhere("kiosk", &me, now), Some(RelayId::new("c")));
        // c lapses a lease after its last alive notice…
        let later = now + Duration::from_millis(1001);
        assert_eq!(cache.elsewhere("kiosk", &me, later), None);
        // …unless the cache froze (our subscription went down) while c was alive.
        cache.freeze(now + Duration::from_millis(500));
        cache.freeze(now + Duration::from_millis(900));
        assert_eq!(
            cache.elsewhere("kiosk", &me, later),
            Some(RelayId::new("c"))
        );
        cache.purge(later);
        assert!(cache.is_live(&RelayId::new("c"), later));
        cache.thaw();
        cache.purge(later);
        assert!(cache.attachments("kiosk", later).is_empty());
        assert!(cache.live_relays(later).is_empty());
    }

    /// A relay killed before Redis went down (its lease lapsed, its attachments not purged
    /// yet) must not come back when the cache freezes: its edges moved to other relays,
    /// and the smallest-id rule would send their requests to the dead one.
    #[test]
    fn a_relay_dead_before_the_freeze_stays_dead_while_frozen() {
        let (me, now) = (RelayId::new("r2"), Instant::now());
        let mut cache = Cache::default();
        cache.apply(alive("r1", 1000), now);
        cache.apply(attach("gamma", "r1", 1), now);
        // r1 is killed and publishes nothing more; gamma fails over to r3.
        let moved = now + Duration::from_millis(800);
        cache.apply(alive("r3", 1000), moved);
        cache.apply(attach("gamma", "r3", 1), moved);
        let lapsed = now + Duration::from_millis(1200);
        assert_eq!(
            cache.elsewhere("gamma", &me, lapsed),
            Some(RelayId::new("r3"))
        );
        // Redis goes down before the purge ran.
        cache.freeze(lapsed);
        let outage = lapsed + Duration::from_secs(30);
        assert_eq!(
            cache.elsewhere("gamma", &me, outage),
            Some(RelayId::new("r3"))
        );
        assert!(!cache.is_live(&RelayId::new("r1"), outage));
        cache.purge(outage);
        assert_eq!(
            cache.attachments("gamma", outage).len(),
            1,
            "r1's entry purged"
        );
        assert!(
            cache.is_live(&RelayId::new("r3"), outage),
            "r3 alive at the freeze"
        );
    }

    #[test]
    fn a_resync_replaces_but_gives_missing_relays_a_grace() {
        let (me, now) = (RelayId::new("a"), Instant::now());
        let mut cache = Cache::default();
        cache.apply(alive("b", 1000), now);
        cache.apply(alive("c", 1000), now);
        cache.apply(attach("old", "b", 1), now);
        cache.apply(attach("kept", "c", 1), now);
        cache.freeze(now);
        let snapshot = Snapshot {
            attachments: vec![(
                "new".into(),
                RelayId::new("b"),
                Held::parse("box-b 2 run").unwrap(),
            )],
            relays: vec![(RelayId::new("b"), "addr-b".into(), Duration::from_secs(1))],
        };
        let later = now + Duration::from_secs(5);
        cache.replace(snapshot, later, Duration::from_secs(2));
        assert_eq!(
            cache.elsewhere("old", &me, later),
            None,
            "b's own list wins"
        );
        assert_eq!(cache.elsewhere("new", &me, later), Some(RelayId::new("b")));
        // c was live when frozen: kept for the grace, then lapses.
        assert_eq!(cache.elsewhere("kept", &me, later), Some(RelayId::new("c")));
        let after_grace = later + Duration::from_millis(2001);
        assert_eq!(cache.elsewhere("kept", &me, after_grace), None);
        cache.apply(
            Notice::Gone {
                relay: RelayId::new("b"),
            },
            later,
        );
        assert_eq!(cache.elsewhere("new", &me, later), None);
    }
}
