//! What the requests on one connection are doing, shared by its socket and its service.
//!
//! hyper parses requests but does not say which stage a connection is in, and each stage
//! has its own deadline (see [`Limits`](super::Limits)). The service side marks requests
//! in flight (until their response body is sent) and upgrades; the socket side
//! ([`WatchedIo`](super::watched_io::WatchedIo)) marks the first byte of a head and asks
//! which deadline a pending read is held to.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::watched_io::Cut;
use super::Limits;

/// The stage of one connection; see the [module docs](self).
#[derive(Debug)]
pub(super) struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    /// When the connection last had no request in flight (or was accepted).
    idle_since: Instant,
    /// When the first byte of a next request head arrived, while idle.
    head_started: Option<Instant>,
    /// No request arrived yet: the header timeout runs from accept.
    fresh: bool,
    /// HTTP/2 sends frames (pings, settings) without requests: bytes do not start a head.
    multiplexed: bool,
    /// Switched protocols: no request heads any more.
    upgraded: bool,
    /// The socket's reader, woken when the deadline it waits for changes.
    reader: Option<Waker>,
    /// Why the server cut the connection, if it did.
    cut: Option<Cut>,
}

impl Activity {
    /// A connection accepted at `accepted_at`: its first head is due a header timeout
    /// after that.
    pub(super) fn new(accepted_at: Instant) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                idle_since: accepted_at,
                head_started: None,
                fresh: true,
                multiplexed: false,
                upgraded: false,
                reader: None,
                cut: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ActivityState> {
        // Every update is a single assignment: a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request arrived; it is in flight until the guard (kept with its response body)
    /// drops.
    pub(super) fn request_started(self: &Arc<Self>, version: http::Version) -> InFlight {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_started = None;
        state.fresh = false;
        if version == http::Version::HTTP_2 {
            state.multiplexed = true;
        }
        InFlight(Arc::clone(self))
    }

    /// The connection switched protocols (WebSocket): request deadlines no longer apply.
    pub(super) fn upgraded(&self) {
        self.lock().upgraded = true;
    }

    /// True if no request is in flight.
    pub(super) fn is_idle(&self) -> bool {
        self.lock().in_flight == 0
    }

    /// Why the server cut the connection, if it did. (hyper reports a cut while idle as a
    /// clean close, so the connection's result cannot tell.)
    pub(super) fn cut(&self) -> Option<Cut> {
        self.lock().cut
    }

    pub(super) fn record_cut(&self, reason: Cut) {
        self.lock().cut = Some(reason);
    }

    /// Bytes arrived: while idle on HTTP/1 they start a request head.
    pub(super) fn bytes_read(&self) {
        let mut state = self.lock();
        if state.in_flight == 0 && !state.multiplexed && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
        }
    }

    /// The deadline a reader waiting for bytes is held to, and what passing it means;
    /// `None` while a request is in flight (the reader is woken when it ends).
    pub(super) fn read_deadline(&self, limits: &Limits, waker: &Waker) -> Option<(Instant, Cut)> {
        let mut state = self.lock();
        if state.in_flight > 0 || state.upgraded {
            state.reader = Some(waker.clone());
            return None;
        }
        state.reader = None;
        let deadline = match state.head_started {
            Some(started) => (started + limits.header_timeout, Cut::Header),
            None if state.fresh => (state.idle_since + limits.header_timeout, Cut::Header),
            None => (state.idle_since + limits.idle_timeout, Cut::Idle),
        };
        Some(deadline)
    }
}

/// One request in flight on a connection.
#[derive(Debug)]
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let reader = {
            let mut state = self.0.lock();
            state.in_flight -= 1;
            if state.in_flight > 0 {
                return;
            }
            state.idle_since = Instant::now();
            state.reader.take()
        };
        // The reader parked without a deadline while the request ran; now it needs one.
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until it is sent.
    pub(super) struct InFlightBody<B> {
        #[pin]
        body: B,
        _in_flight: InFlight,
    }
}

impl<B> InFlightBody<B> {
    pub(super) fn new(body: B, in_flight: InFlight) -> Self {
        Self {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
