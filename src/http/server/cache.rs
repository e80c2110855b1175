//! [`ConnectionCache`]: state that lives as long as one client connection.
//!
//! A handler sees requests, not connections; what it would like to keep from one request
//! to the next on the same keep-alive connection (a relay: the upstream connection its
//! last request went out on, so the next one skips the pool) has nowhere to go. The
//! server puts one cache per connection in every request's extensions; a handler takes
//! its value out while it uses it and puts it back when done, so two requests in flight
//! at once (HTTP/2, pipelining) never share a value: the second simply finds none.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

/// One value of any type kept for the lifetime of a client connection, shared by the
/// requests on it; in every request's extensions
/// (`request.extensions().get::<ConnectionCache>()`). Dropped with the connection's last
/// request.
///
/// ```
/// use backhaul::http::server::ConnectionCache;
///
/// let cache = ConnectionCache::default();
/// cache.put(7_u32);
/// assert_eq!(cache.take::<u32>(), Some(7));
/// // Taken: the next request finds nothing until it is put back.
/// assert_eq!(cache.take::<u32>(), None);
/// ```
#[derive(Clone, Default)]
pub struct ConnectionCache {
    slot: Arc<Mutex<Option<Box<dyn Any + Send>>>>,
}

impl ConnectionCache {
    /// Takes the value out if it is a `T`; a value of another type stays.
    #[must_use]
    pub fn take<T: Any + Send>(&self) -> Option<T> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if !slot.as_ref().is_some_and(|value| value.is::<T>()) {
            return None;
        }
        slot.take()
            .and_then(|value| value.downcast::<T>().ok())
            .map(|value| *value)
    }

    /// Keeps `value`, dropping what was there.
    pub fn put<T: Any + Send>(&self, value: T) {
        let old = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(Box::new(value));
        // Dropped outside the lock: a value's drop may do real work (close a connection).
        drop(old);
    }
}

impl fmt::Debug for ConnectionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        f.debug_struct("ConnectionCache")
            .field("full", &full)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A value taken by one request is never seen by another until it is put back, however
    /// many requests (threads here) race for it.
    #[test]
    fn a_value_is_held_by_one_taker_at_a_time() {
        let cache = ConnectionCache::default();
        cache.put(0_u64);
        let held = Arc::new(AtomicBool::new(false));
        let misses = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..400)
            .map(|_| {
                let (cache, held, misses) = (cache.clone(), Arc::clone(&held), Arc::clone(&misses));
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        match cache.take::<u64>() {
                            Some(count) => {
                                assert!(!held.swap(true, Ordering::SeqCst), "taken twice");
                                held.store(false, Ordering::SeqCst);
                                cache.put(count + 1);
                            }
                            None => {
                                misses.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no panic");
        }
        let count = cache.take::<u64>().expect("put back by the last taker");
        let misses = misses.load(Ordering::Relaxed) as u64;
        assert_eq!(
            count + misses,
            400 * 200,
            "every take either got the value or none"
        );
    }

    #[test]
    fn a_value_of_another_type_stays() {
        let cache = ConnectionCache::default();
        cache.put("kept");
        assert_eq!(cache.take::<u32>(), None);
        assert_eq!(cache.take::<&str>(), Some("kept"));
    }
}
