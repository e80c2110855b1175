//! Counters of a [`RedisDirectory`](super::RedisDirectory): how much it asks of Redis, so
//! a test or a dashboard can see that lookups cost nothing there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counters of a directory, shared with its clones; read them with
/// [`snapshot`](Self::snapshot).
#[derive(Debug, Clone, Default)]
pub struct DirectoryStats {
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) round_trips: AtomicU64,
    pub(super) failed_round_trips: AtomicU64,
    pub(super) claims_granted: AtomicU64,
    pub(super) claims_refused: AtomicU64,
    pub(super) claims_deferred: AtomicU64,
    pub(super) releases: AtomicU64,
    pub(super) refreshes: AtomicU64,
    pub(super) resyncs: AtomicU64,
    pub(super) notices: AtomicU64,
    pub(super) evictions: AtomicU64,
}

/// The counts at one moment; see [`DirectoryStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DirectoryCounts {
    /// Requests sent to Redis (a command, a script or a pipeline each count one), failed
    /// ones included. Lookups send none.
    pub round_trips: u64,
    /// Of those, the ones that failed or timed out.
    pub failed_round_trips: u64,
    /// Claims Redis granted.
    pub claims_granted: u64,
    /// Claims refused: another instance holds the name elsewhere.
    pub claims_refused: u64,
    /// Claims allowed locally while Redis was unreachable, to be published on its return.
    pub claims_deferred: u64,
    /// Attachments released (compare-and-delete sent).
    pub releases: u64,
    /// Lease refreshes (one pipeline each).
    pub refreshes: u64,
    /// Full resyncs of the cache (at every (re)subscription).
    pub resyncs: u64,
    /// Notices received.
    pub notices: u64,
    /// Local edges disconnected because their name was found held by another instance
    /// when Redis came back.
    pub evictions: u64,
}

impl DirectoryStats {
    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The counts now.
    #[must_use]
    pub fn snapshot(&self) -> DirectoryCounts {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        DirectoryCounts {
            round_trips: get(&c.round_trips),
            failed_round_trips: get(&c.failed_round_trips),
            claims_granted: get(&c.claims_granted),
            claims_refused: get(&c.claims_refused),
            claims_deferred: get(&c.claims_deferred),
            releases: get(&c.releases),
            refreshes: get(&c.refreshes),
            resyncs: get(&c.resyncs),
            notices: get(&c.notices),
            evictions: get(&c.evictions),
        }
    }
}

/// Adds one.
pub(super) fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
