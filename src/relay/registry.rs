//! The registry of connected edges by name.
//!
//! One relay holds each name at most once. Sessions come and go concurrently (an edge
//! reconnects before the relay noticed its old connection died; two machines share a
//! token), so every attach gets an [`Epoch`], larger than any before it, and a detach
//! names the epoch it undoes: a stale session's detach, arriving after a newer session
//! took the name, removes nothing. The [`Attachment`] a session holds detaches with its
//! epoch when dropped, so a session task that ends, fails or is aborted cannot leak or
//! remove the wrong entry.
//!
//! When a name is already held, a [`TakeoverPolicy`] decides. The default pings the
//! holder: a holder that answers keeps its name (two live edges under one name would
//! replace each other back and forth, cutting each other's responses) and the newcomer is
//! refused with [`Error::EdgeNameTaken`]; a silent holder (its network dropped without a
//! goodbye) is replaced at once and its connection closed with [`CLOSE_REPLACED`].
//!
//! The decision and the commit are optimistic: the policy runs without the lock (a ping
//! takes a round trip), then the entry is committed only if the holder is still the one
//! the policy judged, and judged again otherwise.
//!
//! Every change is published as a [`RegistryEvent`] in table order, and every attached
//! epoch is eventually detached exactly once, so an observer (metrics, a shared directory)
//! can mirror the table.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tracing::{debug, warn};

use super::name::EdgeName;
use crate::connector::Connector;
use crate::error::Error;
use crate::session::SessionClient;
use crate::shards::{Shard, Shards};
use crate::transport::Connection;
use crate::transport::QuinnConnection;

/// QUIC close code for an edge replaced by a newer connection under the same name.
pub const CLOSE_REPLACED: u32 = 0x11;

/// Registry events kept for a slow subscriber before it starts missing some.
const EVENT_CAPACITY: usize = 1024;

/// How long a holder may take to answer the takeover ping, by default.
pub const DEFAULT_TAKEOVER_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The order of attaches: each attach gets a larger epoch than every attach before it in
/// the same registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(u64);

impl Epoch {
    /// The number.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What to do when an edge attaches under a name another session holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TakeoverPolicy {
    /// Ping the holder: if it answers within `ping_timeout`, refuse the newcomer; if not,
    /// replace the holder. The default, with [`DEFAULT_TAKEOVER_PING_TIMEOUT`].
    KeepLiveHolder {
        /// How long the holder has to answer.
        ping_timeout: Duration,
    },
    /// Always replace the holder: the newest connection wins.
    ReplaceHolder,
    /// Refuse the newcomer while the holder's session is up, without asking it.
    KeepHolder,
}

impl Default for TakeoverPolicy {
    fn default() -> Self {
        Self::KeepLiveHolder {
            ping_timeout: DEFAULT_TAKEOVER_PING_TIMEOUT,
        }
    }
}

/// Why an epoch left the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DetachReason {
    /// A newer session took the name.
    Replaced {
        /// The newer session's epoch.
        by: Epoch,
    },
    /// The session's [`Attachment`] was dropped or detached, or
    /// [`Registry::detach`] named its epoch (usually: the session ended).
    Detached,
}

/// A change in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryEvent {
    /// `name` is now served by the session of `epoch`.
    Attached {
        /// The name.
        name: EdgeName,
        /// The new session's epoch.
        epoch: Epoch,
        /// The epoch it replaced, if the name was held (a `Detached` event with
        /// [`DetachReason::Replaced`] for it comes first).
        replaced: Option<Epoch>,
    },
    /// The session of `epoch` no longer serves `name`.
    Detached {
        /// The name.
        name: EdgeName,
        /// The epoch that left.
        epoch: Epoch,
        /// Why.
        reason: DetachReason,
    },
}

/// A connected edge: its session, a [`Connector`] to open streams to it, and when it came.
/// Cheap to clone.
pub struct EdgeHandle<C: Connection = QuinnConnection> {
    name: EdgeName,
    epoch: Epoch,
    client: SessionClient<C>,
    connector: Connector<C>,
    attached_at: Instant,
    shard: Option<Shard>,
}

impl<C: Connection> Clone for EdgeHandle<C> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            epoch: self.epoch,
            client: self.client.clone(),
            connector: self.connector.clone(),
            attached_at: self.attached_at,
            shard: self.shard,
        }
    }
}

impl<C: Connection> fmt::Debug for EdgeHandle<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeHandle")
            .field("name", &self.name)
            .field("epoch", &self.epoch)
            .field("state", &self.client.state())
            .finish_non_exhaustive()
    }
}

impl<C: Connection> EdgeHandle<C> {
    /// The edge's name.
    #[must_use]
    pub fn name(&self) -> &EdgeName {
        &self.name
    }

    /// The epoch of this session's attach.
    #[must_use]
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The edge's session.
    #[must_use]
    pub fn client(&self) -> &SessionClient<C> {
        &self.client
    }

    /// A connector opening streams to the edge (a `tower::Service` of service names and
    /// URIs; the connector of a hyper-util pooled client). Each clone reserves its own
    /// open slot in `poll_ready`.
    #[must_use]
    pub fn connector(&self) -> Connector<C> {
        self.connector.clone()
    }

    /// When the edge attached.
    #[must_use]
    pub fn attached_at(&self) -> Instant {
        self.attached_at
    }

    /// The shard whose thread attached the edge, on a relay run on
    /// [`Shards`]: with
    /// [`Acceptor::with_shards`](super::Acceptor::with_shards), the one that drives the
    /// edge's connection and session, where work for the edge is cheapest.
    #[must_use]
    pub fn shard(&self) -> Option<Shard> {
        self.shard
    }
}

/// The edges connected to this relay, by name; see the [module docs](self). Cheap to
/// clone: clones share the table.
///
/// ```
/// use backhaul::relay::{Registry, RegistryEvent};
/// # async fn demo(client: backhaul::SessionClient<backhaul::QuinnConnection>) -> Result<(), backhaul::Error> {
/// let registry = Registry::new();
/// let mut events = registry.subscribe();
/// let attachment = registry.attach("edge-1".try_into()?, client).await?;
/// assert!(matches!(events.recv().await, Ok(RegistryEvent::Attached { .. })));
///
/// let edge = registry.get("edge-1").expect("attached");
/// let mut connector = edge.connector();
/// let stream = connector.connect("web").await?;
/// # drop(stream);
/// drop(attachment); // the session ended: detached
/// assert!(registry.get("edge-1").is_none());
/// # Ok(()) }
/// ```
pub struct Registry<C: Connection = QuinnConnection> {
    shared: Arc<Shared<C>>,
}

struct Shared<C: Connection> {
    table: Mutex<Table<C>>,
    policy: TakeoverPolicy,
    events: broadcast::Sender<RegistryEvent>,
}

struct Table<C: Connection> {
    edges: foldhash::HashMap<EdgeName, EdgeHandle<C>>,
    last_epoch: u64,
}

impl<C: Connection> Clone for Registry<C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C: Connection> Default for Registry<C> {
    fn default() -> Self {
        Self::with_policy(TakeoverPolicy::default())
    }
}

impl<C: Connection> fmt::Debug for Registry<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("edges", &self.len())
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl<C: Connection> Registry<C> {
    /// An empty registry with the default [`TakeoverPolicy`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry deciding takeovers by `policy`.
    #[must_use]
    pub fn with_policy(policy: TakeoverPolicy) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            shared: Arc::new(Shared {
                table: Mutex::new(Table {
                    edges: foldhash::HashMap::default(),
                    last_epoch: 0,
                }),
                policy,
                events,
            }),
        }
    }

    /// The takeover policy.
    #[must_use]
    pub fn policy(&self) -> TakeoverPolicy {
        self.shared.policy
    }

    /// Makes `client`'s session the edge called `name`, unless the policy keeps a holder.
    /// A replaced holder's connection is closed with [`CLOSE_REPLACED`]. The edge stays
    /// attached until the returned [`Attachment`] is dropped (or detached).
    ///
    /// With [`TakeoverPolicy::KeepLiveHolder`] this waits for the holder's ping, up to its
    /// timeout.
    ///
    /// # Errors
    /// [`Error::EdgeNameTaken`] if the policy keeps the holder;
    /// the session's end error if `client`'s session has already ended.
    pub async fn attach(
        &self,
        name: EdgeName,
        client: SessionClient<C>,
    ) -> Result<Attachment<C>, Error> {
        loop {
            let judged = self.get(&name);
            if let Some(holder) = &judged {
                if self.keeps(holder).await {
                    return Err(Error::EdgeNameTaken {
                        name: name.into_string(),
                    });
                }
            }
            let judged = judged.map(|holder| holder.epoch);
            match self.commit(&name, &client, judged)? {
                Some(attachment) => return Ok(attachment),
                // Another session attached or detached meanwhile: judge its holder.
                None => debug!(edge = %name, "holder changed while deciding; deciding again"),
            }
        }
    }

    /// True if the policy keeps `holder` against a newcomer.
    async fn keeps(&self, holder: &EdgeHandle<C>) -> bool {
        match self.shared.policy {
            TakeoverPolicy::ReplaceHolder => false,
            TakeoverPolicy::KeepHolder => holder.client.is_ready(),
            TakeoverPolicy::KeepLiveHolder { ping_timeout } => {
                let ping = tokio::time::timeout(ping_timeout, holder.client.ping()).await;
                matches!(ping, Ok(Ok(_)))
            }
        }
    }

    /// Inserts `client` under `name` if the holder is still the one judged (`None` if the
    /// holder changed since).
    fn commit(
        &self,
        name: &EdgeName,
        client: &SessionClient<C>,
        judged: Option<Epoch>,
    ) -> Result<Option<Attachment<C>>, Error> {
        let mut table = self.lock();
        let holder = table.edges.get(name).map(|holder| holder.epoch);
        if holder != judged {
            return Ok(None);
        }
        // Checked under the lock: a session that ended is never attached, so its
        // attachment's detach cannot be missed.
        if !client.is_ready() {
            return Err(Error::SessionClosed);
        }
        table.last_epoch += 1;
        let epoch = Epoch(table.last_epoch);
        let handle = EdgeHandle {
            name: name.clone(),
            epoch,
            client: client.clone(),
            connector: Connector::new(client.clone()),
            attached_at: Instant::now(),
            shard: Shards::current(),
        };
        let replaced = table.edges.insert(name.clone(), handle.clone());
        if let Some(old) = &replaced {
            warn!(edge = %name, old = %old.epoch, new = %epoch, "a newer session replaces the edge's session");
            old.client
                .connection()
                .close(CLOSE_REPLACED, b"replaced by a newer connection");
            self.publish(RegistryEvent::Detached {
                name: name.clone(),
                epoch: old.epoch,
                reason: DetachReason::Replaced { by: epoch },
            });
        }
        self.publish(RegistryEvent::Attached {
            name: name.clone(),
            epoch,
            replaced: replaced.map(|old| old.epoch),
        });
        drop(table);
        Ok(Some(Attachment {
            registry: self.clone(),
            handle,
            detached: false,
        }))
    }

    /// Removes `name` if its session is the one of `epoch`; true if it was. A stale
    /// session's detach (an older epoch) removes nothing.
    pub fn detach(&self, name: &str, epoch: Epoch) -> bool {
        let mut table = self.lock();
        let current = table
            .edges
            .get(name)
            .is_some_and(|edge| edge.epoch == epoch);
        if current {
            if let Some((name, _)) = table.edges.remove_entry(name) {
                self.publish(RegistryEvent::Detached {
                    name,
                    epoch,
                    reason: DetachReason::Detached,
                });
            }
        }
        current
    }

    /// The edge called `name`, if connected.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<EdgeHandle<C>> {
        self.lock().edges.get(name).cloned()
    }

    /// True if an edge called `name` is connected.
    #[must_use]
    pub fn contains(&self, name: &str) -> bool {
        self.lock().edges.contains_key(name)
    }

    /// The connected edges' names, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<EdgeName> {
        let mut names: Vec<EdgeName> = self.lock().edges.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    /// Every connected edge, sorted by name.
    #[must_use]
    pub fn edges(&self) -> Vec<EdgeHandle<C>> {
        let mut edges: Vec<EdgeHandle<C>> = self.lock().edges.values().cloned().collect();
        edges.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        edges
    }

    /// Connected edges.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().edges.len()
    }

    /// True if no edge is connected.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.lock().edges.is_empty()
    }

    /// Every change from now on, in the order the table changed. A subscriber more than
    /// 1024 events behind misses the oldest (`RecvError::Lagged`) and should resync from
    /// [`edges`](Self::edges).
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.shared.events.subscribe()
    }

    fn publish(&self, event: RegistryEvent) {
        // No subscriber is fine.
        let _ = self.shared.events.send(event);
    }

    fn lock(&self) -> MutexGuard<'_, Table<C>> {
        // The table is consistent after every statement that can panic, so a poisoned
        // lock holds a usable table.
        self.shared
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A session's hold on its name: detaches (with its epoch) when dropped.
#[must_use = "the edge is detached when the Attachment is dropped"]
pub struct Attachment<C: Connection = QuinnConnection> {
    registry: Registry<C>,
    handle: EdgeHandle<C>,
    detached: bool,
}

impl<C: Connection> fmt::Debug for Attachment<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("edge", &self.handle)
            .field("detached", &self.detached)
            .finish()
    }
}

impl<C: Connection> Attachment<C> {
    /// The attached edge.
    #[must_use]
    pub fn handle(&self) -> &EdgeHandle<C> {
        &self.handle
    }

    /// The name.
    #[must_use]
    pub fn name(&self) -> &EdgeName {
        &self.handle.name
    }

    /// The epoch.
    #[must_use]
    pub fn epoch(&self) -> Epoch {
        self.handle.epoch
    }

    /// True while this session still holds the name (not replaced, not detached).
    #[must_use]
    pub fn is_current(&self) -> bool {
        !self.detached
            && self
                .registry
                .get(&self.handle.name)
                .is_some_and(|edge| edge.epoch == self.handle.epoch)
    }

    /// Detaches now; true if this session still held the name.
    pub fn detach(mut self) -> bool {
        self.detach_once()
    }

    fn detach_once(&mut self) -> bool {
        if std::mem::replace(&mut self.detached, true) {
            return false;
        }
        self.registry.detach(&self.handle.name, self.handle.epoch)
    }
}

impl<C: Connection> Drop for Attachment<C> {
    fn drop(&mut self) {
        self.detach_once();
    }
}
