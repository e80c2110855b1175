//! The quinn transport.
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::lanes::{Lane, Lanes, LanesFull};
use super::stream_limit::{Incoming, IncomingStreams, OpenStream, StreamLimit};
use super::{Connection, LaneLosses, RecvStream, SendStream};

/// A [`quinn::Connection`] as a session transport. Cheap to clone: clones share the
/// connection.
///
/// It also keeps the number of streams the peer may open to this side sized by need
/// (see [`StreamLimit`]): the connection should start with a small limit, as
/// [`quic::transport_config`](crate::quic::transport_config) sets it, and the limit
/// doubles whenever three quarters of it are open, up to the [`StreamLimit`]'s maximum.
/// Streams are counted by this wrapper and its clones: wrap a quinn connection once, and
/// accept its streams through the wrapper.
///
/// A session may also run over more connections to the same peer, its *lanes*
/// ([`add_lane`](Self::add_lane), see [`quic::lane`](crate::quic::lane)): streams are
/// then opened on each connection in turn and accepted from all of them, so a busy session
/// is not held to the one core that processes a connection's packets.
#[derive(Debug, Clone)]
pub struct QuinnConnection {
    inner: quinn::Connection,
    incoming: Arc<Incoming>,
    lanes: Arc<Lanes>,
}

impl QuinnConnection {
    /// Wraps a connection made with the library's transport settings: the peer was given
    /// [`INITIAL_STREAMS`](crate::quic::INITIAL_STREAMS), which grows up to
    /// [`DEFAULT_MAX_STREAMS`](crate::quic::DEFAULT_MAX_STREAMS). For other settings, say
    /// so with [`with_stream_limit`](Self::with_stream_limit).
    #[must_use]
    pub fn new(connection: quinn::Connection) -> Self {
        let limit = StreamLimit::new(
            crate::quic::INITIAL_STREAMS,
            crate::quic::DEFAULT_MAX_STREAMS,
        );
        Self {
            inner: connection,
            incoming: Arc::new(Incoming::new(limit)),
            lanes: Arc::default(),
        }
    }

    /// Gives the peer `limit.initial()` streams now (or more if more are open already),
    /// growing up to `limit.max()` from then on.
    #[must_use]
    pub fn with_stream_limit(self, limit: StreamLimit) -> Self {
        self.set_stream_limit(limit);
        self
    }

    /// Changes the stream limit of a live connection, for every clone: the peer is given
    /// `limit.initial()` streams at once (or more if more are open already), and the
    /// limit grows up to `limit.max()` from then on. A relay raises it this way once an
    /// edge has authenticated.
    pub fn set_stream_limit(&self, limit: StreamLimit) {
        set_limit(&self.incoming, &self.inner, limit);
        for lane in self.lanes.snapshot() {
            set_limit(&lane.incoming, &lane.connection, limit);
        }
    }

    /// Carries this session's streams over `connection` too, a further connection to the
    /// same peer, unless the session has `max` connections already (this one included).
    /// The peer is given this connection's stream limit on it.
    ///
    /// Only for a connection whose peer is known to be this connection's peer, with the
    /// session on both sides expecting it: [`quic::lane`](crate::quic::lane) is the
    /// handshake that proves both.
    ///
    /// # Errors
    /// [`LanesFull`] when the session has `max` connections already.
    pub fn add_lane(&self, connection: quinn::Connection, max: usize) -> Result<(), LanesFull> {
        let limit = self.incoming.stream_limit();
        let incoming = Arc::new(Incoming::new(limit));
        set_limit(&incoming, &connection, limit);
        self.lanes.add(
            Lane {
                connection,
                incoming,
            },
            max,
        )
    }

    /// Stops carrying streams over the lane on `connection` (it closed).
    pub(crate) fn forget_lane(&self, connection: &quinn::Connection) {
        self.lanes.remove(connection);
    }

    /// How many connections the session runs over: 1 plus its lanes.
    #[must_use]
    pub fn connections(&self) -> usize {
        1 + self.lanes.len()
    }

    /// The lanes' quinn connections (this one not included), for their statistics.
    #[must_use]
    pub fn lanes(&self) -> Vec<quinn::Connection> {
        self.lanes
            .snapshot()
            .into_iter()
            .map(|lane| lane.connection)
            .collect()
    }

    /// How many streams the peer has open to this side, and its limit now and at most.
    #[must_use]
    pub fn incoming_streams(&self) -> IncomingStreams {
        self.incoming.snapshot()
    }

    /// Waits for the peer's next stream on this connection or any lane. A lane that fails
    /// is dropped from the set; only this connection's end ends the wait.
    async fn accept_any(
        &self,
    ) -> Result<Option<(QuinnSendStream, QuinnRecvStream)>, quinn::ConnectionError> {
        loop {
            // Listening for changes before reading the set: a lane added in between wakes
            // this wait rather than being missed.
            let mut changed = pin!(self.lanes.changed());
            changed.as_mut().enable();
            let lanes = self.lanes.snapshot();
            let mut own = pin!(self.inner.accept_bi());
            if lanes.is_empty() {
                tokio::select! {
                    biased;
                    accepted = own => return accepted_stream(&self.incoming, &self.inner, accepted),
                    () = changed => continue,
                }
            }
            let mut accepts: Vec<_> = lanes
                .iter()
                .map(|lane| Box::pin(lane.connection.accept_bi()))
                .collect();
            // Each accept starts with the next connection (this one is 0), so no
            // connection's streams wait behind another's.
            let connections = accepts.len() + 1;
            let start = self.lanes.next_accept_turn() % connections;
            let outcome = poll_fn(|cx| {
                for turn in 0..connections {
                    let ready = match (start + turn) % connections {
                        0 => own.as_mut().poll(cx).map(|accepted| (None, accepted)),
                        lane => accepts[lane - 1]
                            .as_mut()
                            .poll(cx)
                            .map(|accepted| (Some(lane - 1), accepted)),
                    };
                    if ready.is_ready() {
                        return ready.map(Some);
                    }
                }
                changed.as_mut().poll(cx).map(|()| None)
            })
            .await;
            match outcome {
                None => {}
                Some((None, accepted)) => {
                    return accepted_stream(&self.incoming, &self.inner, accepted)
                }
                Some((Some(index), Ok(stream))) => {
                    let lane = &lanes[index];
                    return accepted_stream(&lane.incoming, &lane.connection, Ok(stream));
                }
                Some((Some(index), Err(error))) => {
                    tracing::debug!(error = ?error.to_string(), "a lane of the session ended");
                    self.lanes.remove(&lanes[index].connection);
                }
            }
        }
    }

    /// The quinn connection (for RTT, stats, addresses…).
    #[must_use]
    pub const fn inner(&self) -> &quinn::Connection {
        &self.inner
    }

    /// Unwraps the quinn connection.
    #[must_use]
    pub fn into_inner(self) -> quinn::Connection {
        self.inner
    }
}

impl From<quinn::Connection> for QuinnConnection {
    /// As [`QuinnConnection::new`].
    fn from(connection: quinn::Connection) -> Self {
        Self::new(connection)
    }
}

impl Connection for QuinnConnection {
    type SendStream = QuinnSendStream;
    type RecvStream = QuinnRecvStream;
    type OpenError = quinn::ConnectionError;
    type AcceptError = quinn::ConnectionError;

    async fn open_bi(&self) -> Result<(QuinnSendStream, QuinnRecvStream), quinn::ConnectionError> {
        if let Some(lane) = self.lanes.pick() {
            match lane.connection.open_bi().await {
                Ok((send, recv)) => {
                    return Ok((QuinnSendStream::new(send), QuinnRecvStream::new(recv)))
                }
                // The lane is gone: the session's own connection takes the stream.
                Err(error) => {
                    tracing::debug!(error = ?error.to_string(), "a lane of the session ended");
                    self.lanes.remove(&lane.connection);
                }
            }
        }
        let (send, recv) = self.inner.open_bi().await?;
        Ok((QuinnSendStream::new(send), QuinnRecvStream::new(recv)))
    }

    async fn accept_bi(
        &self,
    ) -> Result<Option<(QuinnSendStream, QuinnRecvStream)>, quinn::ConnectionError> {
        self.accept_any().await
    }

    fn close(&self, code: u32, reason: &[u8]) {
        self.inner.close(quinn::VarInt::from_u32(code), reason);
        self.lanes.close_all(code, reason);
    }

    fn lanes_lost(&self) -> Option<LaneLosses> {
        // A session whose lanes are all gone still counts: the peer may not know yet.
        let lost = self.lanes.lost();
        (self.lanes.len() > 0 || lost.count > 0).then_some(lost)
    }

    fn lane_lost_since(&self, seen: u64) -> impl Future<Output = ()> + Send {
        self.lanes.lost_since(seen)
    }

    fn is_open(&self) -> bool {
        self.inner.close_reason().is_none()
    }
}

/// Gives the peer of `connection` the streams `limit` allows now.
fn set_limit(incoming: &Incoming, connection: &quinn::Connection, limit: StreamLimit) {
    incoming.set(limit, |granted| {
        connection.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(granted));
    });
}

/// A stream the peer opened on `connection`, counted against its limit there (which grows
/// if it is filling up); a closed connection reads as the end of the streams.
fn accepted_stream(
    incoming: &Arc<Incoming>,
    connection: &quinn::Connection,
    accepted: Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>,
) -> Result<Option<(QuinnSendStream, QuinnRecvStream)>, quinn::ConnectionError> {
    match accepted {
        Ok((send, recv)) => {
            let open = Arc::new(incoming.accepted(|granted| {
                connection.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(granted));
            }));
            Ok(Some((
                QuinnSendStream {
                    inner: send,
                    _open: Some(Arc::clone(&open)),
                },
                QuinnRecvStream {
                    inner: recv,
                    _open: Some(open),
                },
            )))
        }
        Err(
            quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed,
        ) => Ok(None),
        Err(error) => Err(error),
    }
}

/// The sending half of a quinn stream.
#[derive(Debug)]
pub struct QuinnSendStream {
    inner: quinn::SendStream,
    /// Keeps an accepted stream counted against the peer's limit.
    _open: Option<Arc<OpenStream>>,
}

impl QuinnSendStream {
    /// Wraps a quinn stream.
    #[must_use]
    pub const fn new(stream: quinn::SendStream) -> Self {
        Self {
            inner: stream,
            _open: None,
        }
    }

    /// The quinn stream.
    #[must_use]
    pub const fn inner(&self) -> &quinn::SendStream {
        &self.inner
    }

    /// The quinn stream, mutably (for priority, `stopped()`…).
    pub fn inner_mut(&mut self) -> &mut quinn::SendStream {
        &mut self.inner
    }
}

impl AsyncWrite for QuinnSendStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.inner), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.inner), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.inner), cx)
    }
}

/// quinn sends higher priorities first; data streams keep the default 0.
const CONTROL_PRIORITY: i32 = 1;

impl SendStream for QuinnSendStream {
    type FinishError = quinn::ClosedStream;

    async fn finish(&mut self) -> Result<(), quinn::ClosedStream> {
        self.inner.finish()
    }

    async fn delivered(&mut self) {
        // `stopped` resolves once every byte of the finished stream was acknowledged (or the
        // peer stopped it); either way nothing more is waiting to be sent.
        let _ = self.inner.stopped().await;
    }

    fn stopped(&self) -> impl Future<Output = ()> + Send + use<> {
        let stopped = self.inner.stopped();
        async move {
            if let Ok(None) = stopped.await {
                // Read to its end: nobody stopped anything.
                std::future::pending::<()>().await;
            }
        }
    }

    fn prioritize(&mut self) {
        // Fails only on a stream that is already closed, which has nothing left to send.
        let _ = self.inner.set_priority(CONTROL_PRIORITY);
    }

    fn reset(&mut self, code: u32) {
        // Resetting an already finished or reset stream is harmless: nothing is left to drop.
        let _ = self.inner.reset(quinn::VarInt::from_u32(code));
    }
}

/// The receiving half of a quinn stream.
#[derive(Debug)]
pub struct QuinnRecvStream {
    inner: quinn::RecvStream,
    /// Keeps an accepted stream counted against the peer's limit.
    _open: Option<Arc<OpenStream>>,
}

impl QuinnRecvStream {
    /// Wraps a quinn stream.
    #[must_use]
    pub const fn new(stream: quinn::RecvStream) -> Self {
        Self {
            inner: stream,
            _open: None,
        }
    }

    /// The quinn stream.
    #[must_use]
    pub const fn inner(&self) -> &quinn::RecvStream {
        &self.inner
    }

    /// The quinn stream, mutably.
    pub fn inner_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.inner
    }
}

impl AsyncRead for QuinnRecvStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.inner), cx, buf)
    }
}

impl RecvStream for QuinnRecvStream {
    fn stop(&mut self, code: u32) {
        // Stopping a stream that already ended is harmless.
        let _ = self.inner.stop(quinn::VarInt::from_u32(code));
    }
}
