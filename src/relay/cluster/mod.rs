//! Several relays serving as one: a directory of edges shared in Redis (feature `redis`).
//!
//! Behind one domain, an edge may be attached to any relay, and a request may arrive at
//! any other. Each relay runs a [`RedisDirectory`] over its own [`Registry`]: it publishes
//! its edges' attachments to Redis, follows everyone else's, and answers
//! [`Directory::locate`] from memory: [`Location::Local`] for its own edges (preferred
//! when an edge is attached here and elsewhere), [`Location::Elsewhere`] for an edge on
//! another live relay, [`Location::Unknown`] otherwise. A lookup costs no Redis round trip
//! in steady state ([`DirectoryCounts::round_trips`] does not move).
//!
//! # In Redis
//! Under a prefix (`backhaul` by default), with the edge's name as a hash tag:
//! - `…:edge:{name}:at:{relay}` = `instance epoch run`, one per attachment, leased (PX);
//! - `…:edge:{name}:owner` = the instance holding the name, leased: the *same* edge
//!   instance ([`EdgeInstance`], from the registration metadata) may attach to several
//!   relays, a *different* one is refused cluster-wide;
//! - `…:edge:{name}:relays`, a set hinting where the attachments are;
//! - `…:relay:{id}` = the relay's address, leased: the relay is alive;
//! - the channel `…:notices` carries `attach`, `detach`, `alive` and `gone` notices.
//!
//! Claims and releases are Lua scripts, atomic with their notice: a claim succeeds if the
//! name has no owner, the same instance, or an owner with no live attachment on another
//! relay; a release is a compare-and-delete of the exact value it wrote, so a stale
//! session (older epoch) never removes a newer attachment. Each relay refreshes every
//! lease of its own in one pipeline every lease/3.
//!
//! # Failures
//! - *A relay dies without a goodbye (SIGKILL).* It stops refreshing: its keys expire
//!   within the lease, and the others' caches drop its attachments a lease after its last
//!   `alive` notice. Nothing outlives its lease ([`ClusterConfig::with_lease`]).
//! - *Redis restarts or is unreachable.* Lookups go on from the cache, which is frozen
//!   (no relay lapses while we cannot hear it). Claims are allowed locally by default
//!   ([`WhileUnreachable`]) and published when Redis returns; releases wait in a queue.
//!   When the subscription comes back, the relay resyncs its cache (SCAN) and re-claims
//!   every live local attachment, rebuilt from the [`Registry`]; if two different edges
//!   took one name on two relays meanwhile, the first claim Redis sees wins and the other
//!   relay disconnects its edge ([`CLOSE_CLAIM_LOST`]).
//!
//! # Plugging it in
//! The directory is a [`NameClaims`]: give a clone to [`Acceptor::with_claims`] so that a
//! registration is refused ([`Error::EdgeNameTaken`], as for a name taken on this relay)
//! when another edge holds the name on another relay. Releases follow the registry's
//! events. Where to forward a request for an edge elsewhere:
//! [`relay_address`](RedisDirectory::relay_address).
//!
//! ```no_run
//! use backhaul::quic::{Identity, DEFAULT_ALPN};
//! use backhaul::relay::cluster::{ClusterConfig, RedisDirectory};
//! use backhaul::relay::{self, Acceptor, Directory, Location, Registry, RelayId, Tokens};
//!
//! # async fn run() -> Result<(), backhaul::Error> {
//! let registry = Registry::new();
//! let config = ClusterConfig::new("redis://10.0.0.9:6379/", RelayId::new("relay-1"), "10.0.0.1:7000");
//! let directory = RedisDirectory::start(config, registry.clone())?;
//!
//! let identity = Identity::self_signed(&["relay.example.com"])?;
//! let endpoint = relay::server_endpoint("0.0.0.0:4433".parse().unwrap(), identity, DEFAULT_ALPN)?;
//! let acceptor = Acceptor::new(endpoint, registry, Tokens::parse(["kiosk=s3cret"])?)
//!     .with_claims(directory.clone());
//! tokio::spawn(acceptor.serve());
//!
//! match directory.locate("kiosk").await? {
//!     Location::Local(edge) => { /* open streams through edge.connector() */ }
//!     Location::Elsewhere(relay) => println!("forward to {:?}", directory.relay_address(&relay)),
//!     _ => println!("502"),
//! }
//! directory.shutdown().await; // releases this relay's attachments
//! # Ok(()) }
//! ```
//!
//! [`Registry`]: crate::relay::Registry
//! [`Acceptor::with_claims`]: crate::relay::Acceptor::with_claims
//! [`Error::EdgeNameTaken`]: crate::error::Error::EdgeNameTaken
//! [`Directory::locate`]: crate::relay::Directory::locate

mod cache;
mod config;
mod keys;
mod maintain;
mod notice;
mod scripts;
mod state;
mod stats;
mod sync;

use std::fmt;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::task::JoinSet;
use tracing::{debug, warn};

pub use config::{
    ClusterConfig, WhileUnreachable, DEFAULT_KEY_PREFIX, DEFAULT_LEASE, DEFAULT_REDIS_TIMEOUT,
    MIN_LEASE,
};
pub use stats::{DirectoryCounts, DirectoryStats};

use self::notice::Notice;
use self::state::{ClaimOutcome, Published, State};
use self::stats::count;
use crate::error::Error;
use crate::relay::claims::{process_nonce, Claim, EdgeInstance, NameClaims};
use crate::relay::directory::{Directory, Location, RelayId};
use crate::relay::registry::Registry;
use crate::transport::Connection;
use crate::transport::QuinnConnection;

/// QUIC close code for a local edge disconnected because another edge holds its name in
/// the cluster (found when Redis came back after an outage).
pub const CLOSE_CLAIM_LOST: u32 = 0x12;

/// One attachment of an edge, as the directory lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterAttachment {
    /// The relay the edge is attached to.
    pub relay: RelayId,
    /// The edge's instance.
    pub instance: EdgeInstance,
    /// The attach's epoch on that relay (comparable only with that relay's epochs).
    pub epoch: u64,
}

/// A relay's view of the shared directory; see the [module docs](self). Cheap to clone:
/// clones share the cache and the background tasks, which stop when the last clone is
/// dropped, without releasing anything (as if the relay died: its leases run out), or at
/// [`shutdown`](Self::shutdown), which releases.
pub struct RedisDirectory<C: Connection = QuinnConnection> {
    state: Arc<State<C>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl<C: Connection> Clone for RedisDirectory<C> {
    fn clone(&self) -> Self {
        Self {
            state: Arc::clone(&self.state),
            tasks: Arc::clone(&self.tasks),
        }
    }
}

impl<C: Connection> fmt::Debug for RedisDirectory<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDirectory")
            .field("relay", &self.state.relay)
            .field("synced", &self.is_synced())
            .finish_non_exhaustive()
    }
}

impl<C: Connection> RedisDirectory<C> {
    /// Starts following the directory and publishing `registry`'s edges (in the
    /// background, on the current tokio runtime). Redis need not be reachable yet: the
    /// directory connects, and reconnects, by itself.
    ///
    /// # Errors
    /// [`Error::InvalidClusterSetting`] for a relay id or key prefix outside
    /// `A-Z a-z 0-9 . _ : -`, or a Redis URL that does not parse.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(config: ClusterConfig, registry: Registry<C>) -> Result<Self, Error> {
        static STARTS: AtomicU64 = AtomicU64::new(0);
        let run = format!(
            "{:016x}{:x}",
            process_nonce(),
            STARTS.fetch_add(1, Ordering::Relaxed)
        );
        let state = Arc::new(State::new(config, registry, run)?);
        let mut tasks = JoinSet::new();
        tasks.spawn(sync::follow(Arc::clone(&state)));
        tasks.spawn(maintain::maintain(Arc::clone(&state)));
        Ok(Self {
            state,
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }

    /// This relay's id.
    #[must_use]
    pub fn relay(&self) -> &RelayId {
        &self.state.relay
    }

    /// The registry whose edges this directory publishes.
    #[must_use]
    pub fn registry(&self) -> &Registry<C> {
        &self.state.registry
    }

    /// Every live attachment of `edge` in the cluster, this relay's included, by relay
    /// id. From the cache: no Redis round trip.
    #[must_use]
    pub fn attachments(&self, edge: &str) -> Vec<ClusterAttachment> {
        self.state.cache().attachments(edge, Instant::now())
    }

    /// The address `relay` published (to forward requests to), while it is alive. From the
    /// cache: no Redis round trip.
    #[must_use]
    pub fn relay_address(&self, relay: &RelayId) -> Option<String> {
        self.state.cache().relay_address(relay, Instant::now())
    }

    /// The relays alive now, this one included once it has published, sorted.
    #[must_use]
    pub fn live_relays(&self) -> Vec<RelayId> {
        self.state.cache().live_relays(Instant::now())
    }

    /// True while subscribed to the notices with the cache resynced since (false during a
    /// Redis outage, when lookups answer from the frozen cache).
    #[must_use]
    pub fn is_synced(&self) -> bool {
        self.state.synced.load(Ordering::Relaxed)
    }

    /// The counters (shared: read them while serving).
    #[must_use]
    pub fn stats(&self) -> DirectoryStats {
        self.state.stats.clone()
    }

    /// Stops the background tasks and releases this relay's attachments and liveness, so
    /// the other relays forget them at once rather than a lease later. If Redis is
    /// unreachable the leases run out instead.
    pub async fn shutdown(&self) {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .abort_all();
        let state = &self.state;
        let claims: Vec<_> = state.published().drain().collect();
        let pending = std::mem::take(&mut *state.pending_releases());
        let releases: Vec<_> = claims
            .iter()
            .map(|(name, claim)| (name.clone(), state.held(claim)))
            .chain(pending)
            .collect();
        let invocations: Vec<_> = releases
            .iter()
            .map(|(name, held)| state.release_invocation(name.as_str(), held))
            .collect();
        let mut pipe = redis::pipe();
        pipe.load_script(&scripts::RELEASE).ignore();
        for invocation in &invocations {
            pipe.invoke_script(invocation).ignore();
        }
        pipe.del(state.keys.relay(&state.relay)).ignore();
        pipe.publish(state.keys.channel(), Notice::gone(&state.relay))
            .ignore();
        if let Err(error) = state.pipeline::<()>(&pipe).await {
            warn!(error = %error, "could not release this relay's attachments; their leases will run out");
        }
    }
}

impl<C: Connection> Directory<C> for RedisDirectory<C> {
    type Future = Ready<Result<Location<C>, Error>>;

    /// From memory: the local registry first, then the cache. No Redis round trip.
    fn locate(&self, edge: &str) -> Self::Future {
        if let Some(local) = self.state.registry.get(edge) {
            return ready(Ok(Location::Local(local)));
        }
        let elsewhere = self
            .state
            .cache()
            .elsewhere(edge, &self.state.relay, Instant::now());
        ready(Ok(elsewhere.map_or(Location::Unknown, Location::Elsewhere)))
    }
}

/// The addresses relays publish in the directory ([`RedisDirectory::relay_address`]).
impl<C: Connection> crate::relay::peer::PeerAddresses for RedisDirectory<C> {
    fn peer_address(&self, relay: &RelayId) -> Option<String> {
        self.relay_address(relay)
    }
}

impl<C: Connection> NameClaims for RedisDirectory<C> {
    type Future = ClaimFuture;

    fn claim(&self, claim: Claim) -> ClaimFuture {
        ClaimFuture {
            inner: Box::pin(claim_name(Arc::clone(&self.state), claim)),
        }
    }
}

/// A claim in Redis, from [`RedisDirectory`]'s [`NameClaims::claim`].
#[must_use = "futures do nothing unless polled"]
pub struct ClaimFuture {
    inner: Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>,
}

impl fmt::Debug for ClaimFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimFuture").finish_non_exhaustive()
    }
}

impl Future for ClaimFuture {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// Claims in Redis; while Redis is unreachable, applies [`WhileUnreachable`].
async fn claim_name<C: Connection>(state: Arc<State<C>>, claim: Claim) -> Result<(), Error> {
    let counters = state.stats.counters();
    let published = Published {
        instance: claim.instance,
        epoch: claim.epoch,
    };
    let name = claim.name;
    let outcome = if state.is_reachable() {
        state
            .claim_once(name.as_str(), &state.held(&published))
            .await
    } else {
        Err(Error::DirectoryUnavailable(
            "Redis did not answer the last request".into(),
        ))
    };
    let taken = || Error::EdgeNameTaken {
        name: name.as_str().to_owned(),
    };
    match outcome {
        Ok(ClaimOutcome::Granted) => {
            count(&counters.claims_granted);
            remember(&state, &name, published);
            Ok(())
        }
        Ok(ClaimOutcome::Held { by }) => {
            count(&counters.claims_refused);
            debug!(edge = %name, holder = %by, "the name is held by another edge elsewhere");
            Err(taken())
        }
        Ok(ClaimOutcome::Stale) => {
            count(&counters.claims_refused);
            Err(taken())
        }
        Err(error) => match state.while_unreachable {
            WhileUnreachable::AllowLocally => {
                count(&counters.claims_deferred);
                warn!(edge = %name, error = %error, "Redis unreachable: edge accepted locally, claim published when it returns");
                remember(&state, &name, published);
                Ok(())
            }
            WhileUnreachable::Refuse => Err(error),
        },
    }
}

/// Records a claim for the refresh, unless a newer epoch's claim is already recorded.
fn remember<C: Connection>(state: &State<C>, name: &crate::relay::EdgeName, claim: Published) {
    let mut published = state.published();
    let newer = published
        .get(name)
        .is_some_and(|recorded| recorded.epoch > claim.epoch);
    if !newer {
        published.insert(name.clone(), claim);
    }
}
