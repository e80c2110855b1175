//! How idle entries age: each pool keeps its idle connections or streams oldest first,
//! stamped with when they were kept, and a reaper task sweeps the expired ones while the
//! pool lives. Both pools ([`Http1Pool`](super::Http1Pool) and the express lane's
//! `StreamPool`) share this, so they expire by the same rule: an entry kept `timeout` ago
//! or earlier is gone.

use std::sync::Weak;
use std::time::{Duration, Instant};

/// An idle entry and when it was kept.
pub(crate) struct Kept<T> {
    pub(crate) value: T,
    since: Instant,
}

impl<T> Kept<T> {
    /// `value`, kept now.
    pub(crate) fn now(value: T) -> Self {
        Self {
            value,
            since: Instant::now(),
        }
    }

    /// Whether it was kept at or before `cutoff` (see [`cutoff`]).
    pub(crate) fn expired(&self, cutoff: Option<Instant>) -> bool {
        cutoff.is_some_and(|cutoff| self.since <= cutoff)
    }
}

/// The instant at or before which an entry has idled `timeout` or longer; `None` while
/// the clock has not run that long yet (then nothing is that old). One instant for a
/// whole sweep, rather than a duration computed per entry.
pub(crate) fn cutoff(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_sub(timeout)
}

/// How many of `entries` (kept oldest first) have idled `timeout` or longer.
pub(crate) fn expired_count<T>(entries: &[Kept<T>], timeout: Duration) -> usize {
    let cutoff = cutoff(timeout);
    entries.partition_point(|entry| entry.expired(cutoff))
}

/// A set of idle connections or streams that expire: what [`reap`] sweeps.
pub(crate) trait Expiring: Send + Sync + 'static {
    /// How long an entry may sit idle.
    fn idle_timeout(&self) -> Duration;
    /// Drops the entries idle longer than that.
    fn expire(&self);
}

/// Expires `set`'s idle entries every quarter of its idle timeout while it lives.
pub(crate) async fn reap<T: Expiring>(set: Weak<T>) {
    let Some(period) = set.upgrade().map(|set| set.idle_timeout() / 4) else {
        return;
    };
    let period = period.max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        let Some(set) = set.upgrade() else {
            return;
        };
        set.expire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_kept_a_timeout_ago_or_earlier_are_expired_and_newer_ones_are_not() {
        let old = Kept {
            value: 1,
            since: Instant::now() - Duration::from_secs(10),
        };
        let borderline = Kept {
            value: 2,
            since: Instant::now() - Duration::from_secs(5),
        };
        let fresh = Kept::now(3);
        let entries = [old, borderline, fresh];
        assert_eq!(expired_count(&entries, Duration::from_secs(5)), 2);
        assert_eq!(expired_count(&entries, Duration::from_secs(60)), 0);
        assert_eq!(expired_count(&entries, Duration::ZERO), 3);
    }

    #[test]
    fn nothing_has_expired_before_the_clock_has_run_the_timeout() {
        assert!(cutoff(Duration::MAX).is_none());
        assert!(!Kept::now(()).expired(None));
    }
}
