//! The idle connections of a pool, by authority: where a finished response puts its
//! connection back, and where the next request takes one.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::uri::Authority;
use hyper::client::conn::http1::SendRequest;

use super::status::{ConnStatus, UploadBody};
use super::{cutoff, expired_count, Kept};

/// A pooled connection: its request half, and what its other parts say about it.
pub(super) struct Conn<B> {
    pub(super) sender: SendRequest<UploadBody<B>>,
    pub(super) status: ConnStatus,
}

impl<B> Conn<B> {
    /// Closed, or of no more use: a peer that stopped reading closes the connection.
    fn is_closed(&self) -> bool {
        self.sender.is_closed() || self.status.refused()
    }
}

/// Idle HTTP/1 connections (their request halves), most recently used last.
pub(super) struct IdleSet<B> {
    by_authority: Mutex<HashMap<Authority, Vec<Kept<Conn<B>>>>>,
    /// How long a connection may sit idle before it is closed.
    timeout: Duration,
    /// How many idle connections an authority keeps; more are closed at once.
    max_per_authority: usize,
}

impl<B> IdleSet<B> {
    pub(super) fn new(timeout: Duration, max_per_authority: usize) -> Self {
        Self {
            by_authority: Mutex::new(HashMap::new()),
            timeout,
            max_per_authority,
        }
    }

    /// The most recently used connection to `authority` that is ready for a request now
    /// and has not idled too long. Closed and expired ones met on the way are dropped;
    /// open ones not ready yet stay (hyper is still writing out the request before, which
    /// was answered before its last bytes left): a request must not wait behind another's
    /// upload.
    pub(super) fn take(&self, authority: &Authority) -> Option<Conn<B>> {
        let mut by_authority = self.lock();
        let idle = by_authority.get_mut(authority)?;
        // Pushed in time order: the expired ones are first.
        idle.drain(..expired_count(idle, self.timeout));
        let mut found = None;
        for index in (0..idle.len()).rev() {
            let conn = &idle[index].value;
            if conn.is_closed() {
                idle.remove(index);
            } else if conn.sender.is_ready() {
                found = Some(idle.remove(index).value);
                break;
            }
        }
        if idle.is_empty() {
            by_authority.remove(authority);
        }
        found
    }

    /// Keeps `conn` for the next request to `authority`, unless it is closed, its
    /// request's body is still being sent (answered before its end: hyper would never
    /// make it ready again, see [`status`](super::status)), or the authority already
    /// keeps as many as allowed. Otherwise it is dropped, which closes it.
    pub(super) fn put(&self, authority: Authority, conn: Conn<B>) {
        if conn.is_closed() || conn.status.uploading() {
            return;
        }
        let mut by_authority = self.lock();
        let idle = by_authority.entry(authority).or_default();
        if idle.len() < self.max_per_authority {
            idle.push(Kept::now(conn));
        }
    }

    /// Drops the connections that are closed or have idled longer than the timeout.
    pub(super) fn expire(&self) {
        let cutoff = cutoff(self.timeout);
        let mut by_authority = self.lock();
        by_authority.retain(|_, idle| {
            idle.retain(|entry| !entry.value.is_closed() && !entry.expired(cutoff));
            !idle.is_empty()
        });
    }

    /// How many idle connections are kept now.
    pub(super) fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Authority, Vec<Kept<Conn<B>>>>> {
        // Every update is one map operation: a poisoned map is still consistent.
        self.by_authority
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
