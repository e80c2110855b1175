//! How many streams a peer may have open to this side at once, grown on demand.
//!
//! quinn sets aside state for every stream the peer is allowed to open, whether it opens
//! it or not: at a limit of 4 096, about 330 KiB per connection, which an idle tunnel pays
//! for nothing. So a tunnel connection starts with a small limit and raises it as its
//! streams fill it: whenever three quarters are open, the limit doubles, up to a maximum.
//! quinn tells the peer the new limit at once (a `MAX_STREAMS` frame), so a peer waiting
//! in `open_bi` for room goes on one round trip later.
//!
//! The count is of streams this side accepted and still holds (either half alive): quinn
//! exposes no count of its own, and the application's handles are what keep a stream
//! open. A stream the application dropped may still take a slot in quinn for a round trip
//! or two (its last bytes unacknowledged), which is why the limit grows at three quarters
//! rather than when full. The limit never shrinks: what quinn set aside stays set aside.
//!
//! [`Incoming`] is shared by every clone of a connection and every stream it accepted:
//! opening is one atomic add and a comparison; only growing takes a lock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Bidirectional streams the peer may have open to this side at once: `initial` to begin
/// with, doubled whenever three quarters are open, up to `max`.
///
/// ```
/// use backhaul::transport::StreamLimit;
///
/// let limit = StreamLimit::new(64, 4096);
/// assert_eq!((limit.initial(), limit.max()), (64, 4096));
/// assert_eq!(StreamLimit::fixed(4).max(), 4);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimit {
    initial: u32,
    max: u32,
}

impl StreamLimit {
    /// Starts at `initial` and grows up to `max` (`initial` is lowered to `max` if above
    /// it; a limit of 0 is raised to 1).
    #[must_use]
    pub fn new(initial: u32, max: u32) -> Self {
        let max = max.max(1);
        Self {
            initial: initial.clamp(1, max),
            max,
        }
    }

    /// Stays at `limit`.
    #[must_use]
    pub fn fixed(limit: u32) -> Self {
        Self::new(limit, limit)
    }

    /// The limit to begin with.
    #[must_use]
    pub const fn initial(&self) -> u32 {
        self.initial
    }

    /// The most it grows to.
    #[must_use]
    pub const fn max(&self) -> u32 {
        self.max
    }

    /// The limit that leaves room for `open` streams: at least `granted`, doubled until
    /// under three quarters of it are open, at most `max`.
    fn needed(&self, granted: u32, open: u32) -> u32 {
        let mut limit = granted.clamp(1, self.max);
        while limit < self.max && open >= grow_at(limit) {
            limit = limit.saturating_mul(2).min(self.max);
        }
        limit
    }
}

/// Open streams at which a `limit` grows.
const fn grow_at(limit: u32) -> u32 {
    limit - limit / 4
}

/// The peer's streams to this side, as seen at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct IncomingStreams {
    /// Streams accepted and still held by the application.
    pub open: u32,
    /// The limit the peer was given.
    pub limit: u32,
    /// The most the limit grows to.
    pub max: u32,
}

/// The count of open incoming streams and the limit they are held to, shared by a
/// connection's clones and its accepted streams.
#[derive(Debug)]
pub(crate) struct Incoming {
    open: AtomicU32,
    /// `open` at which the limit must grow (`u32::MAX` once at its maximum): read on every
    /// accept without the lock.
    grow_at: AtomicU32,
    limits: Mutex<Limits>,
}

#[derive(Debug)]
struct Limits {
    limit: StreamLimit,
    /// What the peer was last given.
    granted: u32,
}

impl Incoming {
    /// A connection whose peer was given `limit.initial()` streams.
    pub(crate) fn new(limit: StreamLimit) -> Self {
        Self {
            open: AtomicU32::new(0),
            grow_at: AtomicU32::new(threshold(limit.initial, limit)),
            limits: Mutex::new(Limits {
                limit,
                granted: limit.initial,
            }),
        }
    }

    /// Counts a newly accepted stream, growing the limit through `grant` if it is now
    /// needed. The returned token uncounts the stream when dropped.
    pub(crate) fn accepted(self: &Arc<Self>, grant: impl FnOnce(u32)) -> OpenStream {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if open >= self.grow_at.load(Ordering::Acquire) {
            self.grow(grant);
        }
        OpenStream {
            incoming: Arc::clone(self),
        }
    }

    /// Replaces the limit: the peer is given `limit.initial()` (or more, if that many
    /// streams are open already) through `grant`, and growth goes up to `limit.max()`.
    pub(crate) fn set(&self, limit: StreamLimit, grant: impl FnOnce(u32)) {
        let mut limits = lock(&self.limits);
        let open = self.open.load(Ordering::Acquire);
        let granted = limit.needed(limit.initial, open);
        limits.limit = limit;
        limits.granted = granted;
        grant(granted);
        self.grow_at
            .store(threshold(granted, limit), Ordering::Release);
    }

    fn grow(&self, grant: impl FnOnce(u32)) {
        let mut limits = lock(&self.limits);
        // Counted again under the lock: of two accepts racing here, the second sees the
        // first's growth and the count both made.
        let open = self.open.load(Ordering::Acquire);
        let needed = limits.limit.needed(limits.granted, open);
        if needed > limits.granted {
            limits.granted = needed;
            grant(needed);
            self.grow_at
                .store(threshold(needed, limits.limit), Ordering::Release);
        }
    }

    /// The limit the peer is held to (as last set).
    pub(crate) fn stream_limit(&self) -> StreamLimit {
        lock(&self.limits).limit
    }

    pub(crate) fn snapshot(&self) -> IncomingStreams {
        let limits = lock(&self.limits);
        IncomingStreams {
            open: self.open.load(Ordering::Acquire),
            limit: limits.granted,
            max: limits.limit.max,
        }
    }
}

/// Locks, ignoring poisoning: no code that can panic runs while the limits are changed.
fn lock(limits: &Mutex<Limits>) -> std::sync::MutexGuard<'_, Limits> {
    limits
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `open` at which `granted` must grow.
fn threshold(granted: u32, limit: StreamLimit) -> u32 {
    if granted >= limit.max {
        u32::MAX
    } else {
        grow_at(granted)
    }
}

/// One accepted stream, counted until both its halves are dropped (each holds a clone).
#[derive(Debug)]
pub(crate) struct OpenStream {
    incoming: Arc<Incoming>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.incoming.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_doubles_at_three_quarters_up_to_its_max() {
        let limit = StreamLimit::new(64, 4096);
        assert_eq!(limit.needed(64, 0), 64);
        assert_eq!(limit.needed(64, 47), 64);
        assert_eq!(limit.needed(64, 48), 128);
        assert_eq!(limit.needed(64, 1000), 2048);
        assert_eq!(limit.needed(64, 4000), 4096);
        assert_eq!(limit.needed(4096, 4096), 4096);
        assert_eq!(StreamLimit::new(64, 100).needed(64, 60), 100);
    }

    #[test]
    fn odd_limits_are_made_usable() {
        assert_eq!(StreamLimit::new(0, 0), StreamLimit::fixed(1));
        assert_eq!(StreamLimit::new(500, 100).initial(), 100);
        assert_eq!(StreamLimit::fixed(1).needed(1, 5), 1);
    }

    #[test]
    fn growth_is_granted_once_per_step_and_the_count_returns_to_zero() {
        let incoming = Arc::new(Incoming::new(StreamLimit::new(4, 64)));
        let mut grants = Vec::new();
        let streams: Vec<OpenStream> = (0..40)
            .map(|_| incoming.accepted(|limit| grants.push(limit)))
            .collect();
        assert_eq!(grants, [8, 16, 32, 64]);
        assert_eq!(incoming.snapshot().open, 40);
        drop(streams);
        let snapshot = incoming.snapshot();
        assert_eq!((snapshot.open, snapshot.limit, snapshot.max), (0, 64, 64));
    }

    #[test]
    fn a_new_limit_is_granted_at_once_and_covers_open_streams() {
        let incoming = Arc::new(Incoming::new(StreamLimit::fixed(4)));
        let streams: Vec<OpenStream> = (0..4).map(|_| incoming.accepted(|_| {})).collect();
        let mut granted = 0;
        incoming.set(StreamLimit::new(2, 100), |limit| granted = limit);
        assert_eq!(granted, 8);
        drop(streams);
    }

    /// Hundreds of threads accepting and dropping at once: every stream is counted and
    /// uncounted exactly once, grants only ever rise, and the limit ends where the most
    /// streams open at once needed it.
    #[test]
    fn concurrent_accepts_grow_monotonically_and_count_exactly() {
        let incoming = Arc::new(Incoming::new(StreamLimit::new(2, 4096)));
        let grants = Arc::new(Mutex::new(Vec::new()));
        let barrier = Arc::new(std::sync::Barrier::new(400));
        let threads: Vec<_> = (0..400)
            .map(|_| {
                let incoming = Arc::clone(&incoming);
                let grants = Arc::clone(&grants);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let first = incoming.accepted(|limit| grants.lock().unwrap().push(limit));
                    let second = incoming.accepted(|limit| grants.lock().unwrap().push(limit));
                    barrier.wait();
                    drop(first);
                    drop(second);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let grants = grants.lock().unwrap().clone();
        assert!(
            grants.windows(2).all(|pair| pair[0] < pair[1]),
            "{grants:?}"
        );
        let snapshot = incoming.snapshot();
        assert_eq!(snapshot.open, 0);
        // 800 streams were open at once behind the barrier.
        assert_eq!(snapshot.limit, 2048);
        assert_eq!(grants.last(), Some(&2048));
    }
}
