//! Following the directory: subscribe to the notice channel, resync the whole cache at
//! every (re)subscription, then apply notices as they come.
//!
//! The subscription comes first and the snapshot second, and notices arriving meanwhile
//! wait in the subscription's buffer until the snapshot is applied: a change is either in
//! the snapshot or in a notice applied after it (attach and detach are idempotent and
//! compare their values), so none is lost between the two. While the subscription is
//! down the cache is frozen (see `cache`), and the connection is pinged every lease/3 so a
//! silent Redis is noticed, not only a closed one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::{debug, info};

use super::cache::Snapshot;
use super::notice::{Held, Notice};
use super::state::State;
use super::stats::count;
use crate::error::Error;
use crate::relay::directory::RelayId;
use crate::transport::Connection;

/// First wait before subscribing again; doubles up to [`MAX_RESUBSCRIBE_DELAY`].
const MIN_RESUBSCRIBE_DELAY: Duration = Duration::from_millis(50);

/// Longest wait between attempts to subscribe while Redis is unreachable.
const MAX_RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// Keys asked for in one MGET while resyncing.
const MGET_BATCH: usize = 500;

/// Runs until aborted.
pub(super) async fn follow<C: Connection>(state: Arc<State<C>>) {
    let mut delay = MIN_RESUBSCRIBE_DELAY;
    loop {
        match subscribe_and_follow(&state).await {
            Ok(()) => delay = MIN_RESUBSCRIBE_DELAY,
            Err(error) => debug!(error = %error, "not subscribed to the edge directory"),
        }
        if state.synced.swap(false, Ordering::Relaxed) {
            info!(
                "lost the edge directory's notices; answering from the cache until Redis is back"
            );
        }
        state.cache_mut().freeze(std::time::Instant::now());
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RESUBSCRIBE_DELAY);
    }
}

/// One subscription, from connecting to its loss. `Ok` once it had resynced.
async fn subscribe_and_follow<C: Connection>(state: &State<C>) -> Result<(), Error> {
    let timeout = state.redis_timeout;
    let unavailable = |error: redis::RedisError| Error::DirectoryUnavailable(Box::new(error));
    let connecting = tokio::time::timeout(timeout, state.client.get_async_pubsub());
    let mut pubsub = connecting
        .await
        .map_err(|elapsed| Error::DirectoryUnavailable(Box::new(elapsed)))?
        .map_err(unavailable)?;
    pubsub
        .subscribe(state.keys.channel())
        .await
        .map_err(unavailable)?;
    let (mut sink, mut messages) = pubsub.split();
    let snapshot = snapshot(state).await?;
    state
        .cache_mut()
        .replace(snapshot, std::time::Instant::now(), state.lease);
    count(&state.stats.counters().resyncs);
    state.synced.store(true, Ordering::Relaxed);
    state.resynced.notify_one();
    info!("following the edge directory");
    let mut pings = tokio::time::interval_at(Instant::now() + state.lease / 3, state.lease / 3);
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return Ok(()) };
                count(&state.stats.counters().notices);
                let Ok(text) = message.get_payload::<String>() else { continue };
                match Notice::parse(&text) {
                    Some(notice) => state.cache_mut().apply(notice, std::time::Instant::now()),
                    None => debug!(notice = ?crate::relay::shown(&text), "ignoring an unknown notice"),
                }
            }
            _ = pings.tick() => {
                let ping = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                if !matches!(ping, Ok(Ok(_))) {
                    return Ok(());
                }
            }
        }
    }
}

/// Reads every attachment and every live relay.
async fn snapshot<C: Connection>(state: &State<C>) -> Result<Snapshot, Error> {
    let mut snapshot = Snapshot::default();
    let keys = scan(state, &state.keys.attachment_pattern()).await?;
    for batch in keys.chunks(MGET_BATCH) {
        let mut redis = state.redis.clone();
        let values: Vec<Option<String>> = state
            .round_trip(redis::cmd("MGET").arg(batch).query_async(&mut redis))
            .await?;
        for (key, value) in batch.iter().zip(values) {
            let parsed = state.keys.parse_attachment(key);
            let held = value.as_deref().and_then(Held::parse);
            if let (Some((name, relay)), Some(held)) = (parsed, held) {
                let relay = RelayId::new(relay);
                snapshot.attachments.push((name.to_owned(), relay, held));
            }
        }
    }
    let relay_keys = scan(state, &state.keys.relay_pattern()).await?;
    for batch in relay_keys.chunks(MGET_BATCH) {
        let mut pipe = redis::pipe();
        for key in batch {
            pipe.get(key).pttl(key);
        }
        let answers: Vec<redis::Value> = state.pipeline(&pipe).await?;
        for (key, answer) in batch.iter().zip(answers.chunks_exact(2)) {
            let address = redis::from_redis_value_ref::<Option<String>>(&answer[0]);
            let remaining_ms = redis::from_redis_value_ref::<i64>(&answer[1]);
            let (Some(relay), Ok(Some(address)), Ok(remaining_ms)) =
                (state.keys.parse_relay(key), address, remaining_ms)
            else {
                continue;
            };
            // Negative: the key expired or has no lease (not ours to trust).
            let Ok(remaining_ms) = u64::try_from(remaining_ms) else {
                continue;
            };
            let remaining = Duration::from_millis(remaining_ms);
            snapshot
                .relays
                .push((RelayId::new(relay), address, remaining));
        }
    }
    Ok(snapshot)
}

/// Every key matching `pattern` (SCAN: no blocking of Redis however many there are).
async fn scan<C: Connection>(state: &State<C>, pattern: &str) -> Result<Vec<String>, Error> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let mut redis = state.redis.clone();
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        let (next, batch): (u64, Vec<String>) =
            state.round_trip(scan.query_async(&mut redis)).await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}
