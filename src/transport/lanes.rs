//! Lanes: more QUIC connections under one session.
//!
//! quinn processes a connection's packets on one task at a time, so however many streams a
//! session multiplexes, one connection keeps about one core busy on each side: a busy
//! edge behind one connection hits that ceiling long before the machines do. A session
//! can therefore carry its data streams over several connections to the same peer, its
//! *lanes*: the control stream stays on the session's own connection (lane 0), each data
//! stream goes over the next lane in turn, and the acceptor takes streams from all of
//! them. The protocol does not care which connection carries a stream: its `StreamBind`
//! names the open it answers.
//!
//! Lanes are joined by a handshake of their own (see [`quic::lane`](crate::quic::lane));
//! this module only holds them. A lane that fails is dropped from the set, and its streams
//! fail like any stream of a lost connection; the session goes on over the others. When
//! the session's connection closes (or its last handle is dropped), every lane is closed
//! with it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::Notify;

use super::stream_limit::Incoming;
use super::LaneLosses;

/// QUIC close code of a lane closed because its session ended.
pub const CLOSE_LANE_SESSION_ENDED: u32 = 0;

/// One extra connection of a session.
#[derive(Debug, Clone)]
pub(crate) struct Lane {
    pub(crate) connection: quinn::Connection,
    /// The peer's streams open on this lane, and their limit.
    pub(crate) incoming: Arc<Incoming>,
}

/// The extra connections of one session (lane 0, the session's own, is not in the set).
#[derive(Debug, Default)]
pub(crate) struct Lanes {
    list: Mutex<Vec<Lane>>,
    /// `list.len()`, read without the lock on every open and accept.
    count: AtomicUsize,
    /// Round-robin position of the next stream opened.
    next: AtomicUsize,
    /// Round-robin position of the next accept.
    accept_turn: AtomicUsize,
    /// How many lanes have been dropped from the set because they failed or closed.
    lost: AtomicU64,
    /// When the last one was.
    last_lost: Mutex<Option<Instant>>,
    /// Woken when the set changes, so a waiting accept polls the new set.
    changed: Notify,
}

/// Why a lane was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session has its {max} lanes already")]
pub struct LanesFull {
    /// The most lanes a session may have, its own connection included.
    pub max: usize,
}

impl Lanes {
    /// Adds `lane` unless the session would then have more than `max` connections (its own
    /// included).
    pub(crate) fn add(&self, lane: Lane, max: usize) -> Result<(), LanesFull> {
        let mut list = self.lock();
        if list.len() + 1 >= max {
            return Err(LanesFull { max });
        }
        list.push(lane);
        self.count.store(list.len(), Ordering::Release);
        drop(list);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Drops the lane on `connection` from the set (it failed or closed).
    pub(crate) fn remove(&self, connection: &quinn::Connection) {
        let mut list = self.lock();
        let id = connection.stable_id();
        let before = list.len();
        list.retain(|lane| lane.connection.stable_id() != id);
        if list.len() == before {
            // Another caller saw the same failure first.
            return;
        }
        self.count.store(list.len(), Ordering::Release);
        *self
            .last_lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        self.lost.fetch_add(1, Ordering::AcqRel);
        drop(list);
        self.changed.notify_waiters();
    }

    /// How many lanes have been lost so far (closed with the session not counted), and
    /// when the last was.
    pub(crate) fn lost(&self) -> LaneLosses {
        let last = *self
            .last_lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        LaneLosses {
            count: self.lost.load(Ordering::Acquire),
            last,
        }
    }

    /// Resolves once more than `seen` lanes have been lost.
    pub(crate) async fn lost_since(&self, seen: u64) {
        loop {
            // Made before the check, so a loss between the check and the wait still wakes.
            let changed = self.changed();
            if self.lost.load(Ordering::Acquire) > seen {
                return;
            }
            changed.await;
        }
    }

    /// How many lanes the set holds (the session's own connection not counted).
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// The lane the next stream should be opened on, or `None` for the session's own
    /// connection.
    pub(crate) fn pick(&self) -> Option<Lane> {
        if self.len() == 0 {
            return None;
        }
        let list = self.lock();
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % (list.len() + 1);
        turn.checked_sub(1).map(|index| list[index].clone())
    }

    /// The lanes now.
    pub(crate) fn snapshot(&self) -> Vec<Lane> {
        if self.len() == 0 {
            return Vec::new();
        }
        self.lock().clone()
    }

    /// Where the next accept starts polling the session's connections, one further each
    /// time, so that no connection's streams wait behind another's.
    pub(crate) fn next_accept_turn(&self) -> usize {
        self.accept_turn.fetch_add(1, Ordering::Relaxed)
    }

    /// Resolves on the next change of the set (see [`Notify::notified`]).
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Closes every lane and empties the set.
    pub(crate) fn close_all(&self, code: u32, reason: &[u8]) {
        let lanes = std::mem::take(&mut *self.lock());
        self.count.store(0, Ordering::Release);
        for lane in lanes {
            lane.connection.close(quinn::VarInt::from_u32(code), reason);
        }
        self.changed.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Lane>> {
        // Every update is one operation on the list: a poisoned list is still consistent.
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        // The session's last handle is gone: its lanes carry nothing anyone can read.
        self.close_all(CLOSE_LANE_SESSION_ENDED, b"session ended");
    }
}

#[cfg(all(test, feature = "self-signed"))]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinSet;

    use super::LanesFull;
    use crate::quic::test_pair::{test_pair, TestPair};
    use crate::transport::{Connection, QuinnConnection};

    const LIMIT: Duration = Duration::from_secs(20);

    /// Two connected pairs, the second joined to the first as its lane on both sides.
    async fn laned() -> (TestPair, TestPair) {
        let session = test_pair().await;
        let lane = test_pair().await;
        session
            .dialer
            .add_lane(lane.dialer.inner().clone(), 8)
            .unwrap();
        session
            .acceptor
            .add_lane(lane.acceptor.inner().clone(), 8)
            .unwrap();
        (session, lane)
    }

    /// Accepts streams on `connection` and echoes each until it ends.
    fn echo(connection: QuinnConnection) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok(Some((mut send, mut recv))) = connection.accept_bi().await {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut recv, &mut send).await;
                    let _ = send.shutdown().await;
                });
            }
        })
    }

    async fn round_trip(connection: &QuinnConnection, payload: &[u8]) -> Vec<u8> {
        let (mut send, mut recv) = connection.open_bi().await.expect("open");
        send.write_all(payload).await.expect("write");
        send.shutdown().await.expect("finish");
        let mut echoed = Vec::new();
        recv.read_to_end(&mut echoed).await.expect("read");
        echoed
    }

    #[tokio::test]
    async fn streams_go_over_every_lane_and_are_accepted_from_all() {
        let (session, lane) = laned().await;
        let echoing = echo(session.acceptor.clone());
        let mut opens = JoinSet::new();
        for index in 0..300u32 {
            let dialer = session.dialer.clone();
            opens.spawn(async move {
                let payload = index.to_be_bytes().repeat(1000);
                assert_eq!(round_trip(&dialer, &payload).await, payload);
            });
        }
        tokio::time::timeout(LIMIT, async {
            while let Some(done) = opens.join_next().await {
                done.expect("an open");
            }
        })
        .await
        .expect("300 echoes in time");
        let own = session.acceptor.inner().stats().frame_rx.stream;
        let other = lane.acceptor.inner().stats().frame_rx.stream;
        // Round robin: half of the streams each, give or take the frames per stream.
        assert!(own > 100 && other > 100, "stream frames: {own} and {other}");
        assert_eq!(session.dialer.connections(), 2);
        echoing.abort();
    }

    #[tokio::test]
    async fn a_waiting_accept_takes_streams_from_a_lane_added_meanwhile() {
        let session = test_pair().await;
        let lane = test_pair().await;
        let acceptor = session.acceptor.clone();
        let accepting = tokio::spawn(async move { acceptor.accept_bi().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        session
            .acceptor
            .add_lane(lane.acceptor.inner().clone(), 2)
            .unwrap();
        let (mut send, _recv) = lane.dialer.inner().open_bi().await.unwrap();
        send.write_all(b"over the lane").await.unwrap();
        let (_, mut recv) = tokio::time::timeout(LIMIT, accepting)
            .await
            .expect("accepted in time")
            .unwrap()
            .unwrap()
            .expect("a stream");
        let mut read = [0; 13];
        recv.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"over the lane");
    }

    #[tokio::test]
    async fn a_closed_lane_is_dropped_and_the_session_goes_on() {
        let (session, lane) = laned().await;
        let echoing = echo(session.acceptor.clone());
        lane.dialer.inner().close(0u32.into(), b"gone");
        lane.acceptor.inner().closed().await;
        for index in 0..20u8 {
            let payload = vec![index; 5000];
            let echoed = tokio::time::timeout(LIMIT, round_trip(&session.dialer, &payload))
                .await
                .expect("echo in time");
            assert_eq!(echoed, payload);
        }
        assert_eq!(
            session.dialer.connections(),
            1,
            "the closed lane is dropped"
        );
        assert!(session.dialer.is_open());
        echoing.abort();
    }

    #[tokio::test]
    async fn closing_the_session_closes_its_lanes_and_the_lane_count_is_capped() {
        let (session, lane) = laned().await;
        let third = test_pair().await;
        assert_eq!(
            session.acceptor.add_lane(third.acceptor.inner().clone(), 2),
            Err(LanesFull { max: 2 })
        );
        session.acceptor.close(0, b"done");
        tokio::time::timeout(LIMIT, lane.dialer.inner().closed())
            .await
            .expect("the lane's peer sees it close");
        assert!(third.acceptor.inner().close_reason().is_none());
    }

    #[tokio::test]
    async fn dropping_the_last_handle_closes_the_lanes() {
        let (session, lane) = laned().await;
        let TestPair {
            dialer, acceptor, ..
        } = session;
        drop(acceptor);
        drop(dialer);
        tokio::time::timeout(LIMIT, lane.dialer.inner().closed())
            .await
            .expect("the lane closes with its session");
    }
}
