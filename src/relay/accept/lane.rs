//! Lanes joining registered edges' sessions (see [`quic::lane`](crate::quic::lane)).
//!
//! A registered edge's [`LaneKey`] enters the table when the edge registers and leaves it
//! when the session ends, so a lane can only join a session that is live on this relay. A
//! new connection whose first stream starts with [`LANE_MAGIC`] is a lane: it is
//! unregistered until it joins (it holds an admission slot and the registration
//! deadline), a key no session has backs its source off like bad credentials, and a
//! session never runs over more than the relay's lane limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use quinn::VarInt;
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use super::connection::{lock, Shared};
use super::{AcceptStats, REFUSAL_LINGER};
use crate::quic::lane::{answer, read_key, JoinAnswer, LaneKey, CLOSE_LANE_REFUSED};
use crate::relay::admission::Source;
use crate::transport::QuinnConnection;

/// The sessions lanes may join, by key.
#[derive(Debug)]
pub(super) struct LaneTable {
    sessions: Mutex<HashMap<LaneKey, QuinnConnection>>,
    /// The most connections a session may run over, its own included (1: no lanes).
    max_lanes: usize,
}

impl LaneTable {
    pub(super) fn new(max_lanes: usize) -> Self {
        Self {
            sessions: Mutex::default(),
            max_lanes: max_lanes.max(1),
        }
    }
}

/// A registered session's place in the [`LaneTable`], given up on drop.
pub(super) struct LaneEntry {
    shared: Arc<Shared>,
    key: LaneKey,
}

impl Drop for LaneEntry {
    fn drop(&mut self) {
        lock(&self.shared.lanes.sessions).remove(&self.key);
    }
}

/// Lets lanes join the session of `session` from now on (unless lanes are off).
pub(super) fn enter(shared: &Arc<Shared>, session: &QuinnConnection) -> Option<LaneEntry> {
    if shared.lanes.max_lanes < 2 {
        return None;
    }
    let key = LaneKey::of(session.inner())?;
    lock(&shared.lanes.sessions).insert(key.clone(), session.clone());
    Some(LaneEntry {
        shared: Arc::clone(shared),
        key,
    })
}

/// Handles a join request on `lane`'s first stream, whose [`LANE_MAGIC`] was read: adds
/// the connection to the session whose key it presents, or answers why not and closes it.
///
/// [`LANE_MAGIC`]: crate::quic::lane::LANE_MAGIC
pub(super) async fn join(
    shared: &Shared,
    lane: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    source: Source,
    deadline: Instant,
) {
    let counters = &shared.stats.counters;
    let Ok(key) = read_key(recv).await else {
        AcceptStats::count(&counters.handshake_failed);
        lane.close(
            VarInt::from_u32(CLOSE_LANE_REFUSED),
            b"incomplete lane request",
        );
        return;
    };
    let session = lock(&shared.lanes.sessions).get(&key).cloned();
    let refusal = match session {
        // Lanes are off here: every session is full with its own connection.
        _ if shared.lanes.max_lanes < 2 => JoinAnswer::Full,
        Some(session) => match session.add_lane(lane.clone(), shared.lanes.max_lanes) {
            Ok(()) => {
                // The session's edge proved itself when it registered.
                lane.set_receive_window(VarInt::MAX);
                AcceptStats::count(&counters.lanes_joined);
                debug!(
                    connections = session.connections(),
                    "a lane joined a session"
                );
                answer(send, JoinAnswer::Joined).await;
                return;
            }
            Err(_) => JoinAnswer::Full,
        },
        None => {
            // A key no live session has: a stale lane of an ended session, or a guess.
            shared.penalize(source, "(lane)");
            JoinAnswer::UnknownSession
        }
    };
    AcceptStats::count(&counters.lanes_refused);
    debug!(answer = ?refusal, "lane refused");
    answer(send, refusal).await;
    // Time to read the answer and close by itself, as a refused registration gets.
    let linger = (Instant::now() + REFUSAL_LINGER).min(deadline);
    let _ = timeout_at(linger, lane.closed()).await;
    lane.close(VarInt::from_u32(CLOSE_LANE_REFUSED), b"lane refused");
}
