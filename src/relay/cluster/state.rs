//! What the directory's handle and its tasks share, and every request it makes of Redis
//! (counted and time-bounded in one place).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{FromRedisValue, Pipeline, ScriptInvocation};
use tokio::sync::Notify;

use super::cache::Cache;
use super::config::{ClusterConfig, WhileUnreachable};
use super::keys::Keys;
use super::notice::Held;
use super::scripts::{CLAIM, RELEASE};
use super::stats::{count, DirectoryStats};
use crate::error::Error;
use crate::relay::claims::EdgeInstance;
use crate::relay::directory::RelayId;
use crate::relay::name::EdgeName;
use crate::relay::registry::{Epoch, Registry};
use crate::transport::Connection;

/// A local attachment this relay claimed (or will claim when Redis returns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Published {
    pub(super) instance: EdgeInstance,
    pub(super) epoch: Epoch,
}

/// What the claim script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ClaimOutcome {
    Granted,
    /// Another instance holds a live attachment on `by`.
    Held {
        by: RelayId,
    },
    /// This relay already claimed the name for a newer epoch.
    Stale,
}

pub(super) struct State<C: Connection> {
    pub(super) relay: RelayId,
    pub(super) address: String,
    pub(super) lease: Duration,
    pub(super) redis_timeout: Duration,
    pub(super) while_unreachable: WhileUnreachable,
    pub(super) keys: Keys,
    /// Random per start: see `notice`.
    pub(super) run: String,
    pub(super) client: redis::Client,
    pub(super) redis: ConnectionManager,
    pub(super) registry: Registry<C>,
    pub(super) cache: RwLock<Cache>,
    /// This relay's claims, by name: what the refresh keeps alive.
    pub(super) published: Mutex<HashMap<EdgeName, Published>>,
    /// Releases that failed (Redis unreachable), retried by the refresh.
    pub(super) pending_releases: Mutex<Vec<(EdgeName, Held)>>,
    /// The subscriber resynced: refresh now (Redis may have come back empty).
    pub(super) resynced: Notify,
    /// The subscription is up and the cache was resynced since.
    pub(super) synced: AtomicBool,
    /// The last request to Redis succeeded: claims and releases try Redis (otherwise they
    /// are deferred at once, and the refresh finds out when Redis is back).
    pub(super) reachable: AtomicBool,
    pub(super) stats: DirectoryStats,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps are consistent after every statement that can panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<C: Connection> State<C> {
    pub(super) fn new(
        config: ClusterConfig,
        registry: Registry<C>,
        run: String,
    ) -> Result<Self, Error> {
        let client = config.client()?;
        // Retries are the tasks' business (they run on a schedule); a request fails fast.
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(config.redis_timeout))
            .set_response_timeout(Some(config.redis_timeout));
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|error| Error::DirectoryUnavailable(Box::new(error)))?;
        Ok(Self {
            keys: Keys::new(&config.key_prefix),
            relay: config.relay,
            address: config.address,
            lease: config.lease,
            redis_timeout: config.redis_timeout,
            while_unreachable: config.while_unreachable,
            run,
            client,
            redis,
            registry,
            cache: RwLock::new(Cache::default()),
            published: Mutex::new(HashMap::new()),
            pending_releases: Mutex::new(Vec::new()),
            resynced: Notify::new(),
            synced: AtomicBool::new(false),
            reachable: AtomicBool::new(true),
            stats: DirectoryStats::default(),
        })
    }

    pub(super) fn cache(&self) -> RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn cache_mut(&self) -> RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn published(&self) -> MutexGuard<'_, HashMap<EdgeName, Published>> {
        lock(&self.published)
    }

    pub(super) fn pending_releases(&self) -> MutexGuard<'_, Vec<(EdgeName, Held)>> {
        lock(&self.pending_releases)
    }

    /// The stored value of this relay's attachment for a claim.
    pub(super) fn held(&self, published: &Published) -> Held {
        Held {
            instance: published.instance.clone(),
            epoch: published.epoch.get(),
            run: self.run.clone(),
        }
    }

    /// One request to Redis: counted, bounded by the Redis timeout.
    pub(super) async fn round_trip<T, F>(&self, request: F) -> Result<T, Error>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let counters = self.stats.counters();
        count(&counters.round_trips);
        let answer = tokio::time::timeout(self.redis_timeout, request).await;
        self.reachable
            .store(matches!(answer, Ok(Ok(_))), Ordering::Relaxed);
        match answer {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                count(&counters.failed_round_trips);
                Err(Error::DirectoryUnavailable(Box::new(error)))
            }
            Err(elapsed) => {
                count(&counters.failed_round_trips);
                Err(Error::DirectoryUnavailable(Box::new(elapsed)))
            }
        }
    }

    /// Sends a pipeline.
    pub(super) async fn pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, Error> {
        let mut redis = self.redis.clone();
        self.round_trip(pipe.query_async(&mut redis)).await
    }

    /// The claim script's invocation for `name`.
    pub(super) fn claim_invocation(&self, name: &str, held: &Held) -> ScriptInvocation<'static> {
        let mut invocation = CLAIM.prepare_invoke();
        invocation
            .key(self.keys.owner(name))
            .key(self.keys.attachment(name, &self.relay))
            .key(self.keys.relays_of(name))
            .arg(self.relay.as_str())
            .arg(held.instance.as_str())
            .arg(held.epoch)
            .arg(&held.run)
            .arg(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX))
            .arg(self.keys.channel())
            .arg(self.keys.attachment_prefix(name))
            .arg(name);
        invocation
    }

    /// The release script's invocation for `name`.
    pub(super) fn release_invocation(&self, name: &str, held: &Held) -> ScriptInvocation<'static> {
        let mut invocation = RELEASE.prepare_invoke();
        invocation
            .key(self.keys.owner(name))
            .key(self.keys.attachment(name, &self.relay))
            .key(self.keys.relays_of(name))
            .arg(self.relay.as_str())
            .arg(held.value())
            .arg(self.keys.channel())
            .arg(self.keys.attachment_prefix(name))
            .arg(name);
        invocation
    }

    /// Runs the claim script once.
    pub(super) async fn claim_once(&self, name: &str, held: &Held) -> Result<ClaimOutcome, Error> {
        let invocation = self.claim_invocation(name, held);
        let mut redis = self.redis.clone();
        let answer: (i64, String) = self.round_trip(invocation.invoke_async(&mut redis)).await?;
        Ok(ClaimOutcome::from_answer(answer))
    }

    /// Runs the release script once; true if it removed the attachment.
    pub(super) async fn release_once(&self, name: &str, held: &Held) -> Result<bool, Error> {
        count(&self.stats.counters().releases);
        let invocation = self.release_invocation(name, held);
        let mut redis = self.redis.clone();
        let removed: i64 = self.round_trip(invocation.invoke_async(&mut redis)).await?;
        Ok(removed == 1)
    }
}

impl<C: Connection> State<C> {
    /// True if the last request to Redis succeeded.
    pub(super) fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
}

impl ClaimOutcome {
    pub(super) fn from_answer((status, relay): (i64, String)) -> Self {
        match status {
            1 => Self::Granted,
            0 => Self::Held {
                by: RelayId::new(relay),
            },
            _ => Self::Stale,
        }
    }
}
