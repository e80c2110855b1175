//! Keeping this relay's part of the directory true: refresh leases, release what the
//! registry detached, and repair after an outage.
//!
//! The local [`Registry`](crate::relay::Registry) is the truth, Redis a lease-bound copy:
//! - every lease/3 (and at once after each resync) one pipeline re-runs the claim script
//!   for every local attachment, which refreshes its lease, re-creates it if Redis lost
//!   it (restarted empty, or the relay was paused past its lease) and publishes `attach`
//!   only then; the relay's liveness key and `alive` notice come last, so a relay seen
//!   alive has its attachments written;
//! - a `Detached` registry event releases its epoch at once (compare-and-delete); a
//!   release that cannot reach Redis is kept and retried by the next refresh;
//! - before each refresh, claims whose epoch is no longer the registry's current one are
//!   released (a session that ended while its claim was in flight, missed events);
//! - a re-claim that Redis refuses (another instance claimed the name while this relay
//!   could not reach Redis: the first claim Redis sees wins) disconnects the local edge
//!   with [`CLOSE_CLAIM_LOST`](super::CLOSE_CLAIM_LOST).

use std::sync::Arc;

use redis::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::MissedTickBehavior;
use tracing::{debug, warn};

use super::notice::{Held, Notice};
use super::scripts::{CLAIM, RELEASE};
use super::state::{ClaimOutcome, Published, State};
use super::stats::count;
use super::CLOSE_CLAIM_LOST;
use crate::relay::directory::RelayId;
use crate::relay::name::EdgeName;
use crate::relay::registry::{Epoch, RegistryEvent};
use crate::transport::Connection;

/// Runs until aborted.
pub(super) async fn maintain<C: Connection>(state: Arc<State<C>>) {
    let mut events = state.registry.subscribe();
    let mut refreshes = tokio::time::interval(state.lease / 3);
    refreshes.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = refreshes.tick() => refresh(&state).await,
            () = state.resynced.notified() => refresh(&state).await,
            event = events.recv() => match event {
                Ok(RegistryEvent::Detached { name, epoch, .. }) => {
                    release_detached(&state, &name, epoch).await;
                }
                Ok(_) => {}
                // Missed events: the refresh reconciles with the registry.
                Err(RecvError::Lagged(_)) => refresh(&state).await,
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Releases `name` if this relay's claim is for `epoch`.
async fn release_detached<C: Connection>(state: &State<C>, name: &EdgeName, epoch: Epoch) {
    let released = {
        let mut published = state.published();
        match published.get(name) {
            Some(claim) if claim.epoch == epoch => published.remove(name),
            _ => None,
        }
    };
    let Some(claim) = released else { return };
    let held = state.held(&claim);
    if !state.is_reachable() || state.release_once(name.as_str(), &held).await.is_err() {
        state.pending_releases().push((name.clone(), held));
    }
}

/// One refresh; see the [module docs](self).
pub(super) async fn refresh<C: Connection>(state: &State<C>) {
    count(&state.stats.counters().refreshes);
    reconcile(state);
    release_pending(state).await;
    let claims: Vec<(EdgeName, Published)> = state
        .published()
        .iter()
        .map(|(name, claim)| (name.clone(), claim.clone()))
        .collect();
    let mut pipe = redis::pipe();
    pipe.load_script(&CLAIM).ignore();
    let invocations: Vec<_> = claims
        .iter()
        .map(|(name, claim)| state.claim_invocation(name.as_str(), &state.held(claim)))
        .collect();
    for invocation in &invocations {
        pipe.invoke_script(invocation);
    }
    let lease_ms = u64::try_from(state.lease.as_millis()).unwrap_or(u64::MAX);
    pipe.cmd("SET")
        .arg(state.keys.relay(&state.relay))
        .arg(&state.address)
        .arg("PX")
        .arg(lease_ms)
        .ignore();
    pipe.publish(
        state.keys.channel(),
        Notice::alive(&state.relay, state.lease, &state.address),
    )
    .ignore();
    let answers: Vec<Value> = match state.pipeline(&pipe).await {
        Ok(answers) => answers,
        Err(error) => {
            debug!(error = %error, "lease refresh failed; retrying at the next one");
            return;
        }
    };
    for ((name, claim), answer) in claims.iter().zip(answers) {
        match redis::from_redis_value::<(i64, String)>(answer).map(ClaimOutcome::from_answer) {
            Ok(ClaimOutcome::Held { by }) => evict(state, name, claim, &by),
            Ok(ClaimOutcome::Granted | ClaimOutcome::Stale) => {}
            Err(error) => debug!(edge = %name, error = %error, "unexpected claim answer"),
        }
    }
    state.cache_mut().purge(std::time::Instant::now());
}

/// Moves claims whose epoch the registry no longer holds to the pending releases.
fn reconcile<C: Connection>(state: &State<C>) {
    let mut stale: Vec<(EdgeName, Held)> = Vec::new();
    state.published().retain(|name, claim| {
        let current = state
            .registry
            .get(name.as_str())
            .is_some_and(|edge| edge.epoch() == claim.epoch);
        if !current {
            stale.push((name.clone(), state.held(claim)));
        }
        current
    });
    if !stale.is_empty() {
        state.pending_releases().extend(stale);
    }
}

/// Sends the pending releases in one pipeline; keeps them if it fails.
async fn release_pending<C: Connection>(state: &State<C>) {
    let pending = std::mem::take(&mut *state.pending_releases());
    if pending.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    pipe.load_script(&RELEASE).ignore();
    let invocations: Vec<_> = pending
        .iter()
        .map(|(name, held)| state.release_invocation(name.as_str(), held))
        .collect();
    for invocation in &invocations {
        pipe.invoke_script(invocation).ignore();
    }
    for _ in &pending {
        count(&state.stats.counters().releases);
    }
    if state.pipeline::<()>(&pipe).await.is_err() {
        state.pending_releases().extend(pending);
    }
}

/// Disconnects the local edge of `claim`: another instance holds its name on `holder`.
fn evict<C: Connection>(state: &State<C>, name: &EdgeName, claim: &Published, holder: &RelayId) {
    {
        let mut published = state.published();
        if published.get(name) == Some(claim) {
            published.remove(name);
        }
    }
    let Some(edge) = state.registry.get(name.as_str()) else {
        return;
    };
    if edge.epoch() != claim.epoch {
        return;
    }
    count(&state.stats.counters().evictions);
    warn!(
        edge = %name,
        %holder,
        "another edge claimed this name elsewhere while Redis was unreachable; disconnecting ours"
    );
    edge.client().connection().close(
        CLOSE_CLAIM_LOST,
        b"edge name held by another edge in the cluster",
    );
    state.registry.detach(name.as_str(), claim.epoch);
}
