//! The settings of a [`RedisDirectory`](super::RedisDirectory), with their defaults.

use std::time::Duration;

use super::keys::is_valid_id;
use crate::error::Error;
use crate::relay::directory::RelayId;

/// How long an attachment or a relay's liveness lasts without a refresh, by default. A
/// relay killed without a goodbye vanishes from the directory within this bound.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

/// How long one Redis request may take before the directory counts Redis unreachable.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The key prefix, by default.
pub const DEFAULT_KEY_PREFIX: &str = "backhaul";

/// Shortest lease accepted (refreshes run every lease/3).
pub const MIN_LEASE: Duration = Duration::from_millis(300);

/// What a claim does while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhileUnreachable {
    /// Accept the edge locally and publish its claim when Redis returns; if another
    /// instance claimed the name meanwhile (the first claim Redis sees wins), the local
    /// edge is then disconnected. The default: an outage does not lock edges out.
    #[default]
    AllowLocally,
    /// Refuse the edge with [`Error::DirectoryUnavailable`] (it retries later).
    Refuse,
}

/// Settings of a [`RedisDirectory`](super::RedisDirectory).
///
/// ```
/// use std::time::Duration;
/// use backhaul::relay::cluster::ClusterConfig;
/// use backhaul::relay::RelayId;
///
/// let config = ClusterConfig::new("redis://127.0.0.1:6379/", RelayId::new("relay-1"), "10.0.0.1:7000")
///     .with_lease(Duration::from_secs(6))
///     .with_key_prefix("tunnels");
/// assert_eq!(config.lease(), Duration::from_secs(6));
/// ```
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub(super) redis_url: String,
    pub(super) relay: RelayId,
    pub(super) address: String,
    pub(super) key_prefix: String,
    pub(super) lease: Duration,
    pub(super) redis_timeout: Duration,
    pub(super) while_unreachable: WhileUnreachable,
}

impl ClusterConfig {
    /// This relay, called `relay` in the directory and reachable by its peers at
    /// `address` (stored as given; see
    /// [`RedisDirectory::relay_address`](super::RedisDirectory::relay_address)), sharing
    /// the directory in the Redis at `redis_url` (`redis://[:password@]host:port/[db]`).
    pub fn new(redis_url: impl Into<String>, relay: RelayId, address: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            relay,
            address: address.into(),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            lease: DEFAULT_LEASE,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            while_unreachable: WhileUnreachable::default(),
        }
    }

    /// The lease of attachments and liveness (default [`DEFAULT_LEASE`], at least
    /// [`MIN_LEASE`]); refreshed every lease/3.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(MIN_LEASE);
        self
    }

    /// The prefix of every key and of the channel (default [`DEFAULT_KEY_PREFIX`]): relays
    /// with the same prefix on the same Redis form one cluster.
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// How long one Redis request may take (default [`DEFAULT_REDIS_TIMEOUT`]).
    #[must_use]
    pub fn with_redis_timeout(mut self, timeout: Duration) -> Self {
        self.redis_timeout = timeout;
        self
    }

    /// What claims do while Redis is unreachable (default
    /// [`WhileUnreachable::AllowLocally`]).
    #[must_use]
    pub fn with_unreachable_policy(mut self, policy: WhileUnreachable) -> Self {
        self.while_unreachable = policy;
        self
    }

    /// The lease.
    #[must_use]
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// This relay's id.
    #[must_use]
    pub fn relay(&self) -> &RelayId {
        &self.relay
    }

    /// Checks the ids and opens (without connecting) the Redis client.
    pub(super) fn client(&self) -> Result<redis::Client, Error> {
        for (what, value) in [
            ("relay id", self.relay.as_str()),
            ("key prefix", self.key_prefix.as_str()),
        ] {
            if !is_valid_id(value) {
                return Err(Error::InvalidClusterSetting {
                    what,
                    value: format!("{value:?}"),
                });
            }
        }
        redis::Client::open(self.redis_url.as_str()).map_err(|error| Error::InvalidClusterSetting {
            what: "Redis URL",
            value: format!("(not shown: it may hold a password) {}", error.category()),
        })
    }
}
