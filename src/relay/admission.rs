//! Admission control: which peers may start a QUIC handshake at all.
//!
//! Until an edge has authenticated, everything it sends is hostile until proven otherwise,
//! and each QUIC handshake costs the relay TLS work and connection state. So before the
//! handshake, each `quinn::Incoming` passes cheap checks: a token bucket on the handshake
//! rate, a cap on connections that have not authenticated yet (overall and per source), and
//! a backoff on sources whose authentication failed. What is refused costs one packet at
//! most and leaves nothing behind but, for a failing source, one entry in a bounded table.
//!
//! Sources are IPv4 addresses and IPv6 /64 prefixes: one IPv6 host usually owns a whole
//! /64, so counting its addresses one by one would let it walk around every limit.
//!
//! [`Admission`] is a plain state machine (time is passed in), so it is tested without
//! sockets or a runtime; the [`Acceptor`](super::Acceptor) holds one behind a lock.
//! Repeated refusals are summarised in the log (`LogSummary`) so that a flood of guesses
//! cannot flood the log too.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The admission limits; the defaults suit a relay of a few thousand edges.
///
/// ```
/// use std::time::Duration;
/// use backhaul::relay::AdmissionConfig;
///
/// let config = AdmissionConfig {
///     max_unregistered: 64,
///     auth_backoff: Duration::from_millis(500),
///     ..AdmissionConfig::default()
/// };
/// assert_eq!(config.max_unregistered_per_source, 32);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// Connections that have not authenticated yet, from all sources (default 256).
    pub max_unregistered: usize,
    /// Connections that have not authenticated yet, from one source (default 32): keeps
    /// one source from taking every slot of `max_unregistered`.
    pub max_unregistered_per_source: usize,
    /// Sustained QUIC handshakes per second (token bucket; default 100). Handshakes above
    /// it are ignored: the peer's retransmission tries again.
    pub handshake_rate: f64,
    /// Handshakes allowed in a burst above the rate (default 200).
    pub handshake_burst: f64,
    /// Backoff after a source's first failed authentication; doubles with each failure
    /// (default 1 s).
    pub auth_backoff: Duration,
    /// Longest backoff (default 60 s); a source quiet for twice as long is forgiven.
    pub max_auth_backoff: Duration,
    /// Sources with failures remembered at once (default 10 000): bounds the table.
    pub max_penalized_sources: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_unregistered: 256,
            max_unregistered_per_source: 32,
            handshake_rate: 100.0,
            handshake_burst: 200.0,
            auth_backoff: Duration::from_secs(1),
            max_auth_backoff: Duration::from_secs(60),
            max_penalized_sources: 10_000,
        }
    }
}

/// Where connections come from, for per-source limits: an IPv4 address or an IPv6 /64.
///
/// ```
/// use backhaul::relay::Source;
///
/// let a = Source::of("2001:db8::1".parse()?);
/// let b = Source::of("2001:db8::ffff:2".parse()?);
/// assert_eq!(a, b);
/// assert_eq!(a.to_string(), "2001:db8::/64");
/// # Ok::<(), std::net::AddrParseError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source(IpAddr);

impl Source {
    /// The source `ip` belongs to (IPv4-mapped IPv6 addresses count as IPv4).
    #[must_use]
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Why a handshake was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// More handshakes per second than the rate allows.
    HandshakeRate,
    /// Too many connections are waiting to register.
    UnregisteredCap,
    /// The source's registrations failed recently.
    SourceBackoff,
}

impl Refusal {
    /// A short name for metrics and logs.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::HandshakeRate => "handshake_rate",
            Self::UnregisteredCap => "unregistered_cap",
            Self::SourceBackoff => "source_backoff",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// The admission state: rate bucket, unregistered counts, penalties. Time is passed in.
///
/// ```
/// use std::time::Instant;
/// use backhaul::relay::{Admission, AdmissionConfig, Refusal, Source};
///
/// let now = Instant::now();
/// let config = AdmissionConfig { max_unregistered_per_source: 1, ..AdmissionConfig::default() };
/// let mut admission = Admission::new(config, now);
/// let source = Source::of("192.0.2.1".parse()?);
/// assert_eq!(admission.admit(source, now), Ok(()));
/// assert_eq!(admission.admit(source, now), Err(Refusal::UnregisteredCap));
/// admission.release(source);
/// admission.failed(source, now);
/// assert_eq!(admission.admit(source, now), Err(Refusal::SourceBackoff));
/// # Ok::<(), std::net::AddrParseError>(())
/// ```
#[derive(Debug)]
pub struct Admission {
    config: AdmissionConfig,
    bucket: TokenBucket,
    unregistered: usize,
    unregistered_by_source: HashMap<Source, usize>,
    penalties: Penalties,
}

impl Admission {
    /// Fresh state: a full bucket, nothing unregistered, nobody penalised.
    #[must_use]
    pub fn new(config: AdmissionConfig, now: Instant) -> Self {
        Self {
            bucket: TokenBucket::new(config.handshake_rate, config.handshake_burst, now),
            unregistered: 0,
            unregistered_by_source: HashMap::new(),
            penalties: Penalties::new(
                config.auth_backoff,
                config.max_auth_backoff,
                config.max_penalized_sources,
            ),
            config,
        }
    }

    /// Decides on a new handshake from `source`; on `Ok` the caller holds one
    /// unregistered slot for it and must [`release`](Self::release) it.
    pub fn admit(&mut self, source: Source, now: Instant) -> Result<(), Refusal> {
        // Penalised sources first: their refusals must not spend the rate's tokens.
        if self.penalties.blocked(source, now) {
            return Err(Refusal::SourceBackoff);
        }
        let from_source = self
            .unregistered_by_source
            .get(&source)
            .copied()
            .unwrap_or(0);
        if self.unregistered >= self.config.max_unregistered
            || from_source >= self.config.max_unregistered_per_source
        {
            return Err(Refusal::UnregisteredCap);
        }
        if !self.bucket.take(now) {
            return Err(Refusal::HandshakeRate);
        }
        self.unregistered += 1;
        *self.unregistered_by_source.entry(source).or_insert(0) += 1;
        Ok(())
    }

    /// Gives back the slot of an admitted connection (it registered, or it is gone).
    pub fn release(&mut self, source: Source) {
        self.unregistered = self.unregistered.saturating_sub(1);
        if let Some(count) = self.unregistered_by_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.unregistered_by_source.remove(&source);
            }
        }
    }

    /// Connections holding a slot now.
    #[must_use]
    pub fn unregistered(&self) -> usize {
        self.unregistered
    }

    /// Records a failed registration from `source`; returns how long it is now refused.
    pub fn failed(&mut self, source: Source, now: Instant) -> Duration {
        self.penalties.failed(source, now)
    }

    /// Sources remembered with failures.
    #[must_use]
    pub fn penalized_sources(&self) -> usize {
        self.penalties.entries.len()
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Sources whose registrations failed: each failure doubles the time the source is
/// refused, up to `max`; a source quiet for twice `max` is forgotten. The table holds at
/// most `capacity` sources: when full, the one whose backoff ends first makes room.
#[derive(Debug)]
struct Penalties {
    base: Duration,
    max: Duration,
    capacity: usize,
    entries: HashMap<Source, Penalty>,
}

#[derive(Debug, Clone, Copy)]
struct Penalty {
    failures: u32,
    until: Instant,
    last_failure: Instant,
}

impl Penalties {
    fn new(base: Duration, max: Duration, capacity: usize) -> Self {
        Self {
            base,
            max: max.max(base),
            capacity: capacity.max(1),
            entries: HashMap::new(),
        }
    }

    fn blocked(&self, source: Source, now: Instant) -> bool {
        self.entries
            .get(&source)
            .is_some_and(|penalty| penalty.until > now)
    }

    fn failed(&mut self, source: Source, now: Instant) -> Duration {
        let forget_after = self.max * 2;
        let earlier = self
            .entries
            .get(&source)
            .filter(|penalty| now.saturating_duration_since(penalty.last_failure) < forget_after)
            .map_or(0, |penalty| penalty.failures);
        let failures = earlier.saturating_add(1);
        let backoff = self
            .base
            .saturating_mul(1u32 << (failures - 1).min(20))
            .min(self.max);
        if !self.entries.contains_key(&source) {
            self.make_room(now);
        }
        self.entries.insert(
            source,
            Penalty {
                failures,
                until: now + backoff,
                last_failure: now,
            },
        );
        backoff
    }

    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < self.capacity {
            return;
        }
        let forget_after = self.max * 2;
        self.entries.retain(|_, penalty| {
            now.saturating_duration_since(penalty.last_failure) < forget_after
        });
        while self.entries.len() >= self.capacity {
            let Some(first_free) = self
                .entries
                .iter()
                .min_by_key(|(_, penalty)| penalty.until)
                .map(|(source, _)| *source)
            else {
                break;
            };
            self.entries.remove(&first_free);
        }
    }
}

/// Summarises repeated log events: the first event of a kind is logged in full; later
/// ones are only counted, and [`flush`](Self::flush) (called once per interval) reports
/// the counts. A kind with nothing to report for a whole interval is logged in full again
/// the next time it happens.
#[derive(Debug, Default)]
pub(crate) struct LogSummary {
    kinds: BTreeMap<&'static str, Suppressing>,
}

#[derive(Debug, Default)]
struct Suppressing {
    count: u64,
    sources: std::collections::BTreeSet<Source>,
}

/// How many distinct sources a summary names at most.
const SUMMARY_SOURCES: usize = 8;

impl LogSummary {
    /// Notes one event; true if it should be logged in full.
    pub(crate) fn note(&mut self, kind: &'static str, source: Source) -> bool {
        match self.kinds.get_mut(kind) {
            None => {
                self.kinds.insert(kind, Suppressing::default());
                true
            }
            Some(suppressing) => {
                suppressing.count += 1;
                if suppressing.sources.len() < SUMMARY_SOURCES {
                    suppressing.sources.insert(source);
                }
                false
            }
        }
    }

    /// The events counted since the last flush: (kind, count, some of the sources).
    pub(crate) fn flush(&mut self) -> Vec<(&'static str, u64, Vec<Source>)> {
        let mut report = Vec::new();
        self.kinds.retain(|kind, suppressing| {
            if suppressing.count == 0 {
                return false;
            }
            let sources = std::mem::take(&mut suppressing.sources);
            report.push((*kind, suppressing.count, sources.into_iter().collect()));
            suppressing.count = 0;
            true
        });
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Source {
        Source::of(text.parse().unwrap())
    }

    fn config() -> AdmissionConfig {
        AdmissionConfig {
            max_unregistered: 3,
            max_unregistered_per_source: 2,
            handshake_rate: 10.0,
            handshake_burst: 5.0,
            auth_backoff: Duration::from_secs(1),
            max_auth_backoff: Duration::from_secs(8),
            max_penalized_sources: 2,
        }
    }

    #[test]
    fn ipv6_sources_are_prefixes() {
        assert_eq!(source("2001:db8::1"), source("2001:db8::ffff:1"));
        assert_ne!(source("2001:db8::1"), source("2001:db8:0:1::1"));
        assert_eq!(source("::ffff:10.0.0.1"), source("10.0.0.1"));
        assert_eq!(source("2001:db8::1").to_string(), "2001:db8::/64");
    }

    #[test]
    fn caps_unregistered_overall_and_per_source() {
        let now = Instant::now();
        let mut admission = Admission::new(config(), now);
        let (a, b, c) = (source("10.0.0.1"), source("10.0.0.2"), source("10.0.0.3"));
        assert_eq!(admission.admit(a, now), Ok(()));
        assert_eq!(admission.admit(a, now), Ok(()));
        assert_eq!(admission.admit(a, now), Err(Refusal::UnregisteredCap));
        assert_eq!(admission.admit(b, now), Ok(()));
        assert_eq!(admission.admit(c, now), Err(Refusal::UnregisteredCap));
        admission.release(a);
        assert_eq!(admission.admit(c, now), Ok(()));
        assert_eq!(admission.unregistered(), 3);
    }

    #[test]
    fn rate_refills_over_time() {
        let now = Instant::now();
        let mut admission = Admission::new(
            AdmissionConfig {
                max_unregistered: 100,
                max_unregistered_per_source: 100,
                ..config()
            },
            now,
        );
        let a = source("10.0.0.1");
        for _ in 0..5 {
            assert_eq!(admission.admit(a, now), Ok(()));
        }
        assert_eq!(admission.admit(a, now), Err(Refusal::HandshakeRate));
        // 10 per second: one more after 100 ms.
        let later = now + Duration::from_millis(100);
        assert_eq!(admission.admit(a, later), Ok(()));
        assert_eq!(admission.admit(a, later), Err(Refusal::HandshakeRate));
    }

    #[test]
    fn failures_back_off_doubling_to_the_cap_then_are_forgotten() {
        let now = Instant::now();
        let mut admission = Admission::new(config(), now);
        let a = source("10.0.0.1");
        let backoffs: Vec<u64> = (0..6).map(|_| admission.failed(a, now).as_secs()).collect();
        assert_eq!(backoffs, [1, 2, 4, 8, 8, 8]);
        assert_eq!(
            admission.admit(a, now + Duration::from_secs(7)),
            Err(Refusal::SourceBackoff)
        );
        assert_eq!(admission.admit(a, now + Duration::from_secs(9)), Ok(()));
        // Quiet for twice the cap: the next failure starts over.
        let much_later = now + Duration::from_secs(30);
        assert_eq!(admission.failed(a, much_later), Duration::from_secs(1));
    }

    #[test]
    fn the_penalty_table_is_bounded() {
        let now = Instant::now();
        let mut admission = Admission::new(config(), now);
        for i in 0..100u8 {
            admission.failed(source(&format!("10.0.1.{i}")), now);
        }
        assert_eq!(admission.penalized_sources(), 2);
        // The newest failing source is remembered.
        assert_eq!(
            admission.admit(source("10.0.1.99"), now),
            Err(Refusal::SourceBackoff)
        );
    }

    #[test]
    fn log_summary_logs_the_first_then_counts() {
        let mut summary = LogSummary::default();
        let a = source("10.0.0.1");
        assert!(summary.note("unauthorized", a));
        assert!(!summary.note("unauthorized", a));
        assert!(!summary.note("unauthorized", a));
        assert!(summary.note("source_backoff", a));
        assert_eq!(summary.flush(), vec![("unauthorized", 2, vec![a])]);
        // Still suppressing for one more interval…
        assert!(!summary.note("unauthorized", a));
        assert_eq!(summary.flush(), vec![("unauthorized", 1, vec![a])]);
        // …and after a quiet interval, logged in full again.
        assert_eq!(summary.flush(), vec![]);
        assert!(summary.note("unauthorized", a));
    }
}
