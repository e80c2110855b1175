//! Session settings with documented defaults.
//!
//! The names and defaults follow the quic-reverse 0.1.2 `Config`, so code written for that
//! crate keeps its meaning here; the difference is that every limit and timer is enforced
//! (see each field).

use std::time::Duration;

use crate::protocol::{Features, PROTOCOL_VERSION};

/// Settings of one [`Session`](crate::session::Session).
#[derive(Debug, Clone)]
pub struct Config {
    /// Protocol versions offered, in preference order. Default: `[1]`.
    pub supported_versions: Vec<u16>,
    /// Features offered; the session uses the intersection with the peer's. Default: none
    /// ([`with_ping_interval`](Self::with_ping_interval) adds `PING_PONG`).
    pub features: Features,
    /// How long `open` waits for the peer's `OpenResponse`. Default: 30 s.
    pub open_timeout: Duration,
    /// How long an accepted open waits for its data stream, and how long a data stream that
    /// arrived before its `OpenResponse` is held for its open. Default: 10 s.
    pub stream_bind_timeout: Duration,
    /// Bound on the whole Hello/HelloAck handshake. Default: 30 s.
    pub negotiation_timeout: Duration,
    /// Opens of this side waiting for an answer or a data stream at once. One more fails at
    /// once with [`Error::CapacityExceeded`](crate::error::Error::CapacityExceeded); the tower
    /// connector waits for a slot instead. Default: 100.
    pub max_inflight_opens: usize,
    /// Streams the peer may have open to this side at once. A request past it is rejected
    /// with [`RejectCode::LimitExceeded`](crate::protocol::RejectCode::LimitExceeded), so a flood of
    /// requests cannot grow memory without bound. A request holds its slot from arrival;
    /// a stream from [`SessionClient::accept_stream`](crate::session::SessionClient::accept_stream)
    /// keeps it until the stream is dropped (and, under the edge
    /// [`Router`](crate::edge::Router), until its service returns), while streams bound by
    /// hand with `bind_stream` free it once bound (the session cannot see when they end).
    /// Rejecting, `close_stream` and the peer's `StreamClose` free it too. Default: 1000.
    pub max_concurrent_streams: usize,
    /// When set, a `Ping` is sent this often; a `Pong` missing for
    /// [`ping_timeout`](Self::ping_timeout) marks the session dead and closes the connection.
    /// Needs `PING_PONG` on both sides. Default: off.
    pub ping_interval: Option<Duration>,
    /// How long a ping waits for its pong. Default: 10 s.
    pub ping_timeout: Duration,
    /// Agent string sent in `Hello`, for the peer's diagnostics. Default: none.
    pub agent: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            supported_versions: vec![PROTOCOL_VERSION],
            features: Features::empty(),
            open_timeout: Duration::from_secs(30),
            stream_bind_timeout: Duration::from_secs(10),
            negotiation_timeout: Duration::from_secs(30),
            max_inflight_opens: 100,
            max_concurrent_streams: 1000,
            ping_interval: None,
            ping_timeout: Duration::from_secs(10),
            agent: None,
        }
    }
}

impl Config {
    /// The defaults.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the protocol versions offered.
    #[must_use]
    pub fn with_versions(mut self, versions: Vec<u16>) -> Self {
        self.supported_versions = versions;
        self
    }

    /// Sets the features offered.
    #[must_use]
    pub const fn with_features(mut self, features: Features) -> Self {
        self.features = features;
        self
    }

    /// Sets [`open_timeout`](Self::open_timeout).
    #[must_use]
    pub const fn with_open_timeout(mut self, timeout: Duration) -> Self {
        self.open_timeout = timeout;
        self
    }

    /// Sets [`stream_bind_timeout`](Self::stream_bind_timeout).
    #[must_use]
    pub const fn with_stream_bind_timeout(mut self, timeout: Duration) -> Self {
        self.stream_bind_timeout = timeout;
        self
    }

    /// Sets [`negotiation_timeout`](Self::negotiation_timeout).
    #[must_use]
    pub const fn with_negotiation_timeout(mut self, timeout: Duration) -> Self {
        self.negotiation_timeout = timeout;
        self
    }

    /// Sets [`max_inflight_opens`](Self::max_inflight_opens).
    #[must_use]
    pub const fn with_max_inflight_opens(mut self, max: usize) -> Self {
        self.max_inflight_opens = max;
        self
    }

    /// Sets [`max_concurrent_streams`](Self::max_concurrent_streams).
    #[must_use]
    pub const fn with_max_concurrent_streams(mut self, max: usize) -> Self {
        self.max_concurrent_streams = max;
        self
    }

    /// Turns keep-alives on (and offers `PING_PONG`).
    #[must_use]
    pub fn with_ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = Some(interval);
        self.features |= Features::PING_PONG;
        self
    }

    /// Sets [`ping_timeout`](Self::ping_timeout).
    #[must_use]
    pub const fn with_ping_timeout(mut self, timeout: Duration) -> Self {
        self.ping_timeout = timeout;
        self
    }

    /// Sets the agent string.
    #[must_use]
    pub fn with_agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }

    /// Checks that the settings can work.
    ///
    /// # Errors
    /// [`ConfigError`] names the first setting that cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.supported_versions.is_empty() {
            return Err(ConfigError::NoSupportedVersions);
        }
        if self.max_inflight_opens == 0 {
            return Err(ConfigError::InvalidLimit("max_inflight_opens must be > 0"));
        }
        if self.max_concurrent_streams == 0 {
            return Err(ConfigError::InvalidLimit(
                "max_concurrent_streams must be > 0",
            ));
        }
        if self.ping_interval == Some(Duration::ZERO) {
            return Err(ConfigError::InvalidLimit("ping_interval must be > 0"));
        }
        Ok(())
    }
}

/// A [`Config`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `supported_versions` is empty.
    #[error("at least one protocol version must be supported")]
    NoSupportedVersions,
    /// A limit is zero.
    #[error("invalid limit: {0}")]
    InvalidLimit(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_reference() {
        let config = Config::default();
        assert_eq!(config.open_timeout, Duration::from_secs(30));
        assert_eq!(config.stream_bind_timeout, Duration::from_secs(10));
        assert_eq!(config.negotiation_timeout, Duration::from_secs(30));
        assert_eq!(config.ping_timeout, Duration::from_secs(10));
        assert_eq!(config.max_inflight_opens, 100);
        assert_eq!(config.max_concurrent_streams, 1000);
        assert!(config.ping_interval.is_none());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn ping_interval_offers_ping_pong() {
        let config = Config::new().with_ping_interval(Duration::from_secs(5));
        assert!(config.features.contains(Features::PING_PONG));
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(Config::new().with_max_inflight_opens(0).validate().is_err());
        assert!(Config::new()
            .with_max_concurrent_streams(0)
            .validate()
            .is_err());
        assert_eq!(
            Config::new().with_versions(vec![]).validate(),
            Err(ConfigError::NoSupportedVersions)
        );
    }
}
