//! [`StreamPool`]: the express lane's idle tunnel streams, shared by all client
//! connections.
//!
//! A stream that carried a whole exchange can carry the next request to the same edge
//! and service. Kept by the client connection that used it, every idle keep-alive
//! client would hold a stream (and, behind a pass-through edge, a connection to the
//! service) for as long as the client stays connected. The pool bounds that as the
//! full path's pool does: at most so many idle streams per edge and service, each
//! closed after an idle timeout. The most recently used stream is taken first, so a
//! client sending request after request keeps meeting the same stream.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use crate::http::pool::{expired_count, reap, Expiring, Kept};
use crate::stream::TunnelStream;

/// Idle tunnel streams by [`Upstream`](super::Upstream) key, shared by all client
/// connections; cheap to clone (one shared set).
///
/// Without it, each idle keep-alive client would hold a stream to the edge (and, behind a
/// pass-through edge, a connection to the service) for as long as it stays connected.
/// The pool bounds that as the full path's pool does: at most `max_idle_per_key` idle
/// streams per edge and service, each finished after `idle_timeout`.
#[derive(Clone)]
pub struct StreamPool {
    shared: Arc<Shared>,
}

struct Shared {
    idle: Mutex<foldhash::HashMap<String, Vec<IdleStream>>>,
    timeout: Duration,
    max_per_key: usize,
    /// Closes expired streams while the pool lives; started with the first stream kept.
    reaper: OnceLock<tokio::task::JoinHandle<()>>,
}

type IdleStream = Kept<Box<TunnelStream>>;

impl std::fmt::Debug for StreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPool")
            .field("idle", &self.idle())
            .field("timeout", &self.shared.timeout)
            .field("max_per_key", &self.shared.max_per_key)
            .finish()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(reaper) = self.reaper.get() {
            reaper.abort();
        }
    }
}

impl StreamPool {
    /// A pool keeping up to `max_idle_per_key` idle streams per edge and service, each
    /// for up to `idle_timeout`.
    #[must_use]
    pub fn new(idle_timeout: Duration, max_idle_per_key: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                idle: Mutex::new(foldhash::HashMap::default()),
                timeout: idle_timeout,
                max_per_key: max_idle_per_key,
                reaper: OnceLock::new(),
            }),
        }
    }

    /// How many idle streams the pool holds now.
    #[must_use]
    pub fn idle(&self) -> usize {
        self.shared.lock().values().map(Vec::len).sum()
    }

    /// The most recently kept stream for `key` that has not idled too long.
    pub(super) fn take(&self, key: &str) -> Option<Box<TunnelStream>> {
        let mut idle = self.shared.lock();
        let streams = idle.get_mut(key)?;
        // Pushed in time order: the expired ones are first.
        let expired = expired_count(streams, self.shared.timeout);
        let stale: Vec<IdleStream> = streams.drain(..expired).collect();
        let found = streams.pop().map(|entry| entry.value);
        // An emptied key stays (its stream is likely back soon, and the entry's key and
        // list need not be made again for it); the reaper drops keys left empty.
        // Dropping a stream finishes it, which takes the QUIC connection's lock: not
        // under the pool's.
        drop(idle);
        drop(stale);
        found
    }

    /// Keeps `stream` for the next request with `key`, unless `key` has as many idle
    /// streams as allowed (then it is dropped, which finishes it).
    pub(super) fn put(&self, key: String, stream: Box<TunnelStream>) {
        if self.shared.max_per_key == 0 {
            return;
        }
        self.shared
            .reaper
            .get_or_init(|| tokio::spawn(reap(Arc::downgrade(&self.shared))));
        let mut idle = self.shared.lock();
        let streams = match idle.get_mut(&key) {
            Some(streams) => streams,
            None => idle.entry(key).or_default(),
        };
        if streams.len() < self.shared.max_per_key {
            streams.push(Kept::now(stream));
            return;
        }
        drop(idle);
        drop(stream);
    }
}

impl Expiring for Shared {
    fn idle_timeout(&self) -> Duration {
        self.timeout
    }

    /// Drops the streams that have idled longer than the timeout.
    fn expire(&self) {
        let mut stale = Vec::new();
        let mut idle = self.lock();
        idle.retain(|_, streams| {
            let expired = expired_count(streams, self.timeout);
            stale.extend(streams.drain(..expired));
            !streams.is_empty()
        });
        drop(idle);
        drop(stale);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, foldhash::HashMap<String, Vec<IdleStream>>> {
        // Every update is one map operation: a poisoned map is still consistent.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
