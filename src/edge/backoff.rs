//! Exponential backoff with jitter, for reconnecting.
//!
//! When a relay restarts, every edge it served loses its session at the same moment. If
//! they all retried after the same delays they would hit the new relay in waves, each as
//! large as the fleet. Each delay is therefore drawn at random from the upper half of a
//! window that doubles after every failure up to a cap ("equal jitter"): retries spread
//! over half the window, and the delay still never drops below half of it, so a relay
//! that stays down is not hammered.
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Delays between reconnection attempts: random in `[window / 2, window)`, the window
/// doubling from `base` up to `max` after each delay, and back to `base` on
/// [`reset`](Self::reset).
///
/// ```
/// use backhaul::edge::Backoff;
/// use std::time::Duration;
///
/// let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// let first = backoff.next_delay();
/// assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(100));
/// for _ in 0..10 {
///     assert!(backoff.next_delay() < Duration::from_secs(1));
/// }
/// backoff.reset();
/// assert!(backoff.next_delay() < Duration::from_millis(100));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    window: Duration,
}

/// The first window of [`Backoff::default`]: 250 ms.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(250);
/// The largest window of [`Backoff::default`]: 30 s.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Default for Backoff {
    /// 250 ms doubling up to 30 s.
    fn default() -> Self {
        Self::new(DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX)
    }
}

impl Backoff {
    /// A backoff whose first window is `base` and whose windows never exceed `max` (a
    /// `max` below `base` is raised to it; a zero `base` is taken as 1 ms, so the window
    /// can grow).
    #[must_use]
    pub fn new(base: Duration, max: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        let max = max.max(base);
        Self {
            base,
            max,
            window: base,
        }
    }

    /// The first window.
    #[must_use]
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The largest window: no delay reaches it.
    #[must_use]
    pub const fn max(&self) -> Duration {
        self.max
    }

    /// Starts over from the first window (after a session that lasted).
    pub fn reset(&mut self) {
        self.window = self.base;
    }

    /// The next delay, in `[window / 2, window)`; doubles the window for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let window = self.window;
        self.window = window.saturating_mul(2).min(self.max);
        window / 2 + (window / 2).mul_f64(random_fraction())
    }
}

/// A number in [0, 1), from the standard library's randomly keyed hasher (a fresh key per
/// process and a counter, so edges started together still draw different delays).
fn random_fraction() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let bits = std::collections::hash_map::RandomState::new().hash_one((Instant::now(), count));
    // The top 53 bits fill an f64's mantissa exactly.
    #[allow(clippy::cast_precision_loss)]
    let fraction = (bits >> 11) as f64 / (1u64 << 53) as f64;
    fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_in_their_window() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(3);
        for _ in 0..200 {
            let mut backoff = Backoff::new(base, max);
            let mut window = base;
            for _ in 0..12 {
                let delay = backoff.next_delay();
                assert!(
                    delay >= window / 2 && delay < window,
                    "{delay:?} outside [{:?}, {window:?})",
                    window / 2
                );
                assert!(delay < max);
                window = (window * 2).min(max);
            }
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..6 {
            backoff.next_delay();
        }
        assert!(backoff.next_delay() >= Duration::from_secs(3));
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread() {
        let delays: std::collections::HashSet<Duration> = (0..100)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay())
            .collect();
        assert!(delays.len() > 90, "only {} distinct delays", delays.len());
        let mean = delays.iter().sum::<Duration>() / 100;
        assert!(
            mean > Duration::from_millis(600) && mean < Duration::from_millis(900),
            "mean {mean:?}"
        );
    }

    #[test]
    fn odd_bounds_are_tamed() {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(backoff.base(), Duration::from_millis(1));
        assert_eq!(backoff.max(), Duration::from_millis(1));
        assert!(backoff.next_delay() < Duration::from_millis(1));
        let mut huge = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX);
        for _ in 0..10 {
            huge.next_delay();
        }
    }
}
