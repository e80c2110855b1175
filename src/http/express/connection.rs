//! One client connection on the express lane: request after request until the client
//! closes, a request needs hyper, or an exchange fails.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderValue, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::chunked::ChunkedScanner;
use super::head::{self, Framing, HeadRoom, PlainRequest, RequestHead, ResponseHead};
use super::prefixed::Prefixed;
use super::{Express, Failure, Handover, Outcome, Upstream};
use crate::http::forwarded::{self, Proto};
use crate::http::proxy::Linger;
use crate::http::server::ConnectionInfo;
use crate::stream::{TunnelStream, ABANDONED_STREAM};

/// Room kept free in a buffer before reading into it.
const READ_ROOM: usize = 8 * 1024;
/// What a timeout too large to add to an instant means: about thirty years.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);
/// The largest response head the lane reads from an edge.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How the lane left a connection.
pub(crate) enum Handoff<I> {
    /// Closed (or cut, or the client left): nothing more to do.
    Done,
    /// hyper serves the rest, starting with the bytes the lane read and did not use.
    Hyper(Prefixed<I>),
}

/// What the lane needs from the server around it.
pub(crate) struct LaneContext<'a, G> {
    pub(crate) express: &'a dyn Express,
    pub(crate) info: ConnectionInfo,
    pub(crate) max_head_bytes: usize,
    /// Cancelled when the server shuts down.
    pub(crate) stop: &'a CancellationToken,
    /// Set when the server shuts down, just before `stop` is cancelled.
    pub(crate) stopping: &'a AtomicBool,
    /// Marks a request in flight until the guard drops (the server's deadlines depend on
    /// it).
    pub(crate) request_started: &'a (dyn Fn() -> G + Send + Sync),
}

/// The stream to the edge the connection's last request used.
struct Kept {
    key: String,
    stream: Box<TunnelStream>,
}

/// Serves `client` on the express lane; see the [module docs](super).
pub(crate) async fn serve<I, G>(mut client: I, cx: LaneContext<'_, G>) -> Handoff<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut lane = Lane {
        buf: BytesMut::with_capacity(READ_ROOM),
        response: BytesMut::new(),
        out: BytesMut::new(),
        upload: Upload::default(),
        fields: BytesMut::new(),
        kept: None,
        head_room: HeadRoom::default(),
        stall: Box::pin(tokio::time::sleep_until(Instant::now() + FAR_FUTURE)),
        forwarding: None,
    };
    // Made once: a new wait per request would join and leave the token's waiter list,
    // under its lock, each time.
    let mut stopped = std::pin::pin!(cx.stop.cancelled());
    loop {
        let request = match lane.read_head(&mut client, &cx, stopped.as_mut()).await {
            Head::Plain(request) => request,
            Head::Closed => {
                let _ = client.shutdown().await;
                return Handoff::Done;
            }
            Head::Failed => return Handoff::Done,
            Head::Decline(reason) => return lane.hand_over(client, reason, &cx),
        };
        let in_flight = (cx.request_started)();
        let started = Instant::now();
        let PlainRequest {
            mut parts,
            head,
            body_len,
            close,
        } = request;
        let Some(mut upstream) = cx.express.route(&mut parts, &cx.info).await else {
            drop(in_flight);
            // hyper reads the head again, from where it was.
            head::unread(&mut lane.buf, &head);
            return lane.hand_over(client, Handover::Route, &cx);
        };
        drop(head);
        let forwarding = upstream.forwarding.take().map(|(authority, proto)| {
            forwarded::drop_client_forwarding_headers(&mut parts.headers);
            lane.forwarding_lines(cx.info.peer_addr().ip(), authority, proto)
        });
        lane.start_upload(
            &parts,
            forwarding.as_deref().unwrap_or_default(),
            body_len,
            started,
        );
        let mut exchange = Exchange {
            method: parts.method.clone(),
            status: None,
            response_body_bytes: 0,
            streams_opened: 0,
        };
        let mut stream = None;
        let ended = match lane.stream_for(&mut upstream).await {
            Err(error) => Err(Failure::Open(Arc::new(error))),
            Ok((opened, reused)) => {
                exchange.streams_opened = u32::from(!reused);
                let stream = stream.insert(opened);
                let sent = Sent {
                    method: &parts.method,
                    close,
                };
                lane.exchange(
                    &mut client,
                    (stream, reused),
                    &mut upstream,
                    &mut exchange,
                    sent,
                    cx.stopping,
                )
                .await
            }
        };
        // The exchange with the edge is over: a kept stream is released before the
        // client's last bytes go out, so the client's next request (or another client's)
        // finds it.
        let ended = match ended {
            Ok(next) => {
                if let Next::Continue { reusable: true } = next {
                    if let Some(stream) = stream.take() {
                        lane.keep(&mut upstream, stream);
                    }
                }
                write_out(&mut client, &mut lane.out).await.map(|()| next)
            }
            Err(failure) => Err(failure),
        };
        // Before any response head, a failure is answered (unless the client is gone);
        // mid-body the connection is dropped as it is (a reset), so the client sees a
        // failure, not a short body.
        let answer = match &ended {
            Err(failure) if exchange.status.is_none() && !matches!(failure, Failure::Client(_)) => {
                Some(match (upstream.answer_failure.take(), &upstream.hooks) {
                    (Some(answer), _) => answer(failure).await,
                    (None, Some(hooks)) => Arc::clone(hooks).answer(failure).await,
                    (None, None) => (failure.status(), failure.to_string()),
                })
            }
            _ => None,
        };
        let outcome = Outcome {
            status: exchange
                .status
                .or(answer.as_ref().map(|(status, _)| *status)),
            elapsed: started.elapsed(),
            request_body_bytes: lane.upload.body_sent,
            response_body_bytes: exchange.response_body_bytes,
            streams_opened: exchange.streams_opened,
            failure: ended.as_ref().err().cloned(),
        };
        if let Some(finished) = upstream.finished.take() {
            finished(&outcome);
        }
        if let Some(hooks) = &upstream.hooks {
            hooks.finished(&outcome);
        }
        drop(in_flight);
        match (ended, stream) {
            (Ok(Next::Continue { .. }), _) => lane.head_room.recycle(parts.headers),
            (Ok(Next::Discard), stream) => {
                // The service behind the edge is left mid-body: a reset, not an end.
                abandon(stream);
                if lane.discard_upload(&mut client, upstream.linger).await {
                    lane.head_room.recycle(parts.headers);
                    continue;
                }
                // Cut while the client still sends its body: it will not take the
                // connection for its next request.
                let _ = client.shutdown().await;
                return Handoff::Done;
            }
            (Ok(Next::Close { cut_upload }), stream) => {
                if cut_upload {
                    // The service behind the edge is left mid-body: a reset, not an end.
                    abandon(stream);
                }
                let _ = client.shutdown().await;
                if cut_upload {
                    linger(&mut client, upstream.linger).await;
                }
                return Handoff::Done;
            }
            (Err(_), stream) => {
                abandon(stream);
                if let Some((status, message)) = answer {
                    lane.answer_failure(&mut client, status, &message).await;
                    if lane.upload.remaining > 0 {
                        // The client may still be sending: it should read the answer.
                        linger(&mut client, upstream.linger).await;
                    }
                }
                return Handoff::Done;
            }
        }
    }
}

// Made once per request and taken apart at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Head {
    Plain(PlainRequest),
    Decline(Handover),
    /// The client closed (or the server stops) between requests.
    Closed,
    /// Reading failed: cut by a server deadline, or the connection broke.
    Failed,
}

enum Next {
    Continue {
        reusable: bool,
    },
    /// The response ended before the request body did, and its head did not say the
    /// connection closes: the rest of the body is read and dropped, and the connection
    /// goes on.
    Discard,
    /// The client's connection closes; `cut_upload`: the response ended before the
    /// request body did.
    Close {
        cut_upload: bool,
    },
}

/// The request, for [`Lane::exchange`] (its head and body are in [`Lane::upload`]).
struct Sent<'a> {
    method: &'a Method,
    close: bool,
}

/// What one exchange did, for its [`Outcome`].
struct Exchange {
    method: Method,
    status: Option<StatusCode>,
    response_body_bytes: u64,
    streams_opened: u32,
}

struct Lane {
    /// Bytes from the client not yet used.
    buf: BytesMut,
    /// Bytes from the edge not yet used.
    response: BytesMut,
    /// What is written next (a head and the first body bytes, in one write).
    out: BytesMut,
    /// The request on its way to the edge.
    upload: Upload,
    /// The response's field lines as the client receives them.
    fields: BytesMut,
    kept: Option<Kept>,
    /// What reading the next request head reuses.
    head_room: HeadRoom,
    /// The deadline of the wait for the edge (see [`Lane::read_edge`]). One timer for the
    /// connection's life, armed no later than the current wait's end: a wait moves it
    /// only to an earlier deadline, and it is moved on when it fires early, where a new
    /// timer per wait would take the lock of tokio's timer wheel twice.
    stall: Pin<Box<Sleep>>,
    /// The forwarding fields the connection's last request got.
    forwarding: Option<ForwardingLines>,
}

/// Forwarding fields serialized for one authority and scheme (the client is the
/// connection's).
struct ForwardingLines {
    authority: HeaderValue,
    proto: Proto,
    lines: Bytes,
}

impl Lane {
    async fn read_head<I, G>(
        &mut self,
        client: &mut I,
        cx: &LaneContext<'_, G>,
        mut stopped: Pin<&mut WaitForCancellationFuture<'_>>,
    ) -> Head
    where
        I: AsyncRead + Unpin,
    {
        loop {
            if !self.buf.is_empty() {
                match head::parse_request(&mut self.buf, &mut self.head_room) {
                    RequestHead::Partial => {}
                    RequestHead::Plain(request) => return Head::Plain(request),
                    RequestHead::Decline(reason) => return Head::Decline(reason),
                }
                if self.buf.len() >= cx.max_head_bytes {
                    // hyper answers 431 (or 414) and counts it.
                    return Head::Decline(Handover::HeadTooLarge);
                }
            }
            self.buf.reserve(READ_ROOM);
            // On shutdown a connection between requests closes at once, with a head
            // half-sent or none. Bytes already there are read first: a request that
            // came with the shutdown is answered, and its answer closes the connection.
            let read = tokio::select! {
                biased;
                read = client.read_buf(&mut self.buf) => read,
                () = stopped.as_mut() => return Head::Closed,
            };
            match read {
                Ok(0) if self.buf.is_empty() => return Head::Closed,
                // A head cut short: hyper reports it as it would.
                Ok(0) => return Head::Decline(Handover::Malformed),
                Ok(_) => {}
                Err(_) => return Head::Failed,
            }
        }
    }

    /// Starts the request's upload: its head as the edge is to receive it, and the body
    /// bytes read along with it, taken from `buf`.
    fn start_upload(&mut self, parts: &Parts, more: &[u8], body_len: u64, now: Instant) {
        let after_head = self.buf.len();
        let buffered = usize::try_from(body_len).map_or(after_head, |len| len.min(after_head));
        self.upload
            .start((parts, more), &self.buf[..buffered], body_len, now);
        self.buf.advance(buffered);
    }

    /// Keeps `stream` for the next request with `upstream`'s key: in its pool, or with
    /// this connection.
    fn keep(&mut self, upstream: &mut Upstream, stream: Box<TunnelStream>) {
        let key = std::mem::take(&mut upstream.key);
        match &upstream.pool {
            Some(pool) => pool.put(key, stream),
            None => self.kept = Some(Kept { key, stream }),
        }
    }

    /// The forwarding fields for a request from `peer` to `authority` over `proto`
    /// ([`Upstream::with_forwarding_headers`]): the connection's last ones if they are for
    /// the same authority and scheme (the peer does not change), else new ones, kept.
    fn forwarding_lines(&mut self, peer: IpAddr, authority: HeaderValue, proto: Proto) -> Bytes {
        match &self.forwarding {
            Some(kept) if kept.proto == proto && kept.authority == authority => kept.lines.clone(),
            _ => {
                let text = authority.to_str().unwrap_or_default();
                let lines = forwarded::untrusted_forwarding_lines(peer, text, proto);
                self.forwarding = Some(ForwardingLines {
                    authority,
                    proto,
                    lines: lines.clone(),
                });
                lines
            }
        }
    }

    fn hand_over<I, G>(self, client: I, reason: Handover, cx: &LaneContext<'_, G>) -> Handoff<I> {
        cx.express.handed_over(reason, &cx.info);
        Handoff::Hyper(Prefixed::new(self.buf.freeze(), client))
    }

    /// The connection's kept stream if `upstream` has its key, else one from the pool,
    /// else a new one; a stream the edge ended while idle is dropped on the way. The second member tells whether the stream is a kept one.
    async fn stream_for(
        &mut self,
        upstream: &mut Upstream,
    ) -> Result<(Box<TunnelStream>, bool), crate::Error> {
        if let Some(mut kept) = self.kept.take() {
            if kept.key == upstream.key && still_open(&mut kept.stream).await {
                return Ok((kept.stream, true));
            }
        }
        if let Some(pool) = &upstream.pool {
            while let Some(mut stream) = pool.take(&upstream.key) {
                if still_open(&mut stream).await {
                    return Ok((stream, true));
                }
            }
        }
        // Boxed once for its life: it moves between the pool, the connection and each
        // exchange, and a stream is over 200 bytes.
        let stream = Box::new(upstream.opener.open(upstream.target.clone()).await?);
        Ok((stream, false))
    }

    async fn exchange<I>(
        &mut self,
        client: &mut I,
        (stream, reused): (&mut TunnelStream, bool),
        upstream: &mut Upstream,
        exchange: &mut Exchange,
        sent: Sent<'_>,
        stopping: &AtomicBool,
    ) -> Result<Next, Failure>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let Sent { method, close } = sent;
        // A kept stream the edge closed meanwhile fails before any answer: a safe request
        // sent whole from memory is sent again on a new stream, once.
        let mut may_retry = reused && self.upload.remaining == 0 && is_safe(method);
        let head = loop {
            match self
                .read_response_head(client, stream, upstream.timeouts.response, exchange)
                .await
            {
                Ok(head) => break head,
                Err(Failure::Upstream(_)) if may_retry && self.response.is_empty() => {
                    may_retry = false;
                    stream.reset(ABANDONED_STREAM);
                    *stream = upstream
                        .opener
                        .open(upstream.target.clone())
                        .await
                        .map_err(|error| Failure::Open(Arc::new(error)))?;
                    exchange.streams_opened += 1;
                    self.upload.send_again();
                }
                Err(failure) => return Err(failure),
            }
        };
        // An answer before the request's end from a service that closes its side (a 413
        // from a body limit, say) tells the client the connection closes, so that the
        // client sends nothing more on it.
        let refusing = self.upload.state != UploadState::Sent && !head.reusable;
        let closing = close
            || head.framing == Framing::UntilClose
            || stopping.load(Ordering::Acquire)
            || refusing;
        self.out.clear();
        head::write_response(&head, &self.fields, closing, &mut self.out);
        self.response.advance(head.head_len);
        exchange.status = Some(head.status);
        let idle = upstream.timeouts.body_idle;
        match head.framing {
            // The head alone, written by the caller once the stream is released.
            Framing::Empty => {}
            Framing::Length(length) => {
                self.copy_length(client, stream, length, idle, exchange)
                    .await?;
            }
            Framing::Chunked => self.copy_chunked(client, stream, idle, exchange).await?,
            Framing::UntilClose => {
                self.copy_until_close(client, stream, idle, exchange)
                    .await?;
            }
        }
        // An answer that came before the request's end (a 413, say): the edge's side of
        // the stream no longer knows where it stands. The client's connection closes if
        // its head said so; otherwise the client may send its next request on it once
        // its body is out, so the lane reads that body to its end.
        if self.upload.state != UploadState::Sent {
            if closing {
                return Ok(Next::Close { cut_upload: true });
            }
            return Ok(Next::Discard);
        }
        if closing {
            return Ok(Next::Close { cut_upload: false });
        }
        // Bytes past the response's end: the edge is out of step, its stream is not kept.
        let reusable = head.reusable && self.response.is_empty();
        self.response.clear();
        Ok(Next::Continue { reusable })
    }

    /// Reads the response head, passing informational (1xx) heads on to the client,
    /// while the request goes out; no head within `limit` after the edge took the
    /// request's last byte is a [`Failure::ResponseTimeout`].
    async fn read_response_head<I>(
        &mut self,
        client: &mut I,
        stream: &mut TunnelStream,
        limit: Duration,
        exchange: &Exchange,
    ) -> Result<ResponseHead, Failure>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let wait = Wait {
            since: Instant::now(),
            limit,
            stalled: Failure::ResponseTimeout,
        };
        loop {
            if !self.response.is_empty() {
                self.fields.clear();
                match head::parse_response(&self.response, &exchange.method, &mut self.fields) {
                    Ok(Some(head)) if head.status.is_informational() => {
                        self.out.clear();
                        head::write_response(&head, &self.fields, false, &mut self.out);
                        self.response.advance(head.head_len);
                        write_out(client, &mut self.out).await?;
                        continue;
                    }
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(bad) => return Err(Failure::BadResponse(bad.to_string())),
                }
                if self.response.len() >= MAX_RESPONSE_HEAD {
                    return Err(Failure::BadResponse(
                        "the response head is too large".into(),
                    ));
                }
            }
            if self.read_edge(client, stream, &wait).await? == 0 {
                return Err(Failure::Upstream(
                    "the stream ended before a response head".into(),
                ));
            }
        }
    }

    async fn copy_length<I>(
        &mut self,
        client: &mut I,
        stream: &mut TunnelStream,
        length: u64,
        idle: Duration,
        exchange: &mut Exchange,
    ) -> Result<(), Failure>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let mut remaining = length;
        loop {
            let take = usize::try_from(remaining)
                .map_or(self.response.len(), |rest| rest.min(self.response.len()));
            self.out.extend_from_slice(&self.response[..take]);
            self.response.advance(take);
            remaining -= take as u64;
            exchange.response_body_bytes += take as u64;
            if remaining == 0 {
                // The last piece is written by the caller once the stream is released.
                return Ok(());
            }
            write_out(client, &mut self.out).await?;
            if self.read_body(client, stream, idle).await? == 0 {
                return Err(Failure::Upstream(format!(
                    "the stream ended {remaining} bytes before the response body's end"
                )));
            }
        }
    }

    async fn copy_chunked<I>(
        &mut self,
        client: &mut I,
        stream: &mut TunnelStream,
        idle: Duration,
        exchange: &mut Exchange,
    ) -> Result<(), Failure>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let mut scanner = ChunkedScanner::new();
        loop {
            let take = scanner
                .scan(&self.response)
                .map_err(|error| Failure::BadResponse(error.to_string()))?;
            self.out.extend_from_slice(&self.response[..take]);
            self.response.advance(take);
            exchange.response_body_bytes += take as u64;
            if scanner.is_done() {
                // The last piece is written by the caller once the stream is released.
                return Ok(());
            }
            write_out(client, &mut self.out).await?;
            if self.read_body(client, stream, idle).await? == 0 {
                return Err(Failure::Upstream(
                    "the stream ended inside a chunked response body".into(),
                ));
            }
        }
    }

    async fn copy_until_close<I>(
        &mut self,
        client: &mut I,
        stream: &mut TunnelStream,
        idle: Duration,
        exchange: &mut Exchange,
    ) -> Result<(), Failure>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            exchange.response_body_bytes += self.response.len() as u64;
            self.out.extend_from_slice(&self.response);
            self.response.clear();
            write_out(client, &mut self.out).await?;
            if self.read_body(client, stream, idle).await? == 0 {
                return Ok(());
            }
        }
    }

    /// Reads more of the response body, or fails after `idle` without a byte from the
    /// edge or a move of the upload.
    async fn read_body<I>(
        &mut self,
        client: &mut I,
        stream: &mut TunnelStream,
        idle: Duration,
    ) -> Result<usize, Failure>
    where
        I: AsyncRead + Unpin,
    {
        let wait = Wait {
            since: Instant::now(),
            limit: idle,
            stalled: Failure::BodyIdle,
        };
        self.read_edge(client, stream, &wait).await
    }

    /// Waits for the edge's next bytes (appended to `response`; 0 at the stream's end)
    /// while moving the upload on. Fails with `wait.stalled` once `wait.limit` has passed
    /// both since `wait.since` and since the upload last moved, with no byte from the
    /// edge.
    async fn read_edge<I>(
        &mut self,
        client: &mut I,
        stream: &mut TunnelStream,
        wait: &Wait,
    ) -> Result<usize, Failure>
    where
        I: AsyncRead + Unpin,
    {
        let Lane {
            buf,
            response,
            upload,
            stall,
            ..
        } = self;
        response.reserve(READ_ROOM);
        let quiet_until = |upload: &Upload| {
            let base = wait.since.max(upload.last_progress);
            // A limit too large to add ("never") waits as long as tokio's timers go.
            base.checked_add(wait.limit)
                .unwrap_or_else(|| base + FAR_FUTURE)
        };
        // The timer only has to fire no later than the wait's end. Mostly it is armed
        // earlier already (the last wait's end, or less): then it is left alone, and the
        // loop below moves it on when it fires, once per `limit` at most, where a reset
        // here would cost every wait a trip through tokio's timer code.
        let until = quiet_until(upload);
        if stall.deadline() > until {
            stall.as_mut().reset(until);
        }
        std::future::poll_fn(|cx| {
            upload.poll_progress(cx, client, buf, stream)?;
            if let Poll::Ready(read) = poll_read_buf(Pin::new(&mut *stream), cx, response) {
                return Poll::Ready(read.map_err(upstream_failure));
            }
            while stall.as_mut().poll(cx).is_ready() {
                let until = quiet_until(upload);
                if until <= Instant::now() {
                    return Poll::Ready(Err((wait.stalled)(wait.limit)));
                }
                stall.as_mut().reset(until);
            }
            Poll::Pending
        })
        .await
    }

    /// Reads and drops the rest of an upload whose answer came before its end, within
    /// `bounds`; false if the bounds ran out first, or the client closed or failed.
    async fn discard_upload<I>(&mut self, client: &mut I, bounds: Linger) -> bool
    where
        I: AsyncRead + Unpin,
    {
        let mut read = 0u64;
        let discard = async {
            loop {
                let take = usize::try_from(self.upload.remaining)
                    .map_or(self.buf.len(), |rest| rest.min(self.buf.len()));
                self.buf.advance(take);
                self.upload.remaining -= take as u64;
                if self.upload.remaining == 0 {
                    return true;
                }
                if read >= bounds.bytes {
                    return false;
                }
                self.buf.reserve(READ_ROOM);
                match client.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(got) => read += got as u64,
                }
            }
        };
        tokio::time::timeout(bounds.time, discard)
            .await
            .unwrap_or(false)
    }

    /// Answers a failed exchange before any response head went out, and closes.
    async fn answer_failure<I>(&mut self, client: &mut I, status: StatusCode, message: &str)
    where
        I: AsyncWrite + Unpin,
    {
        self.out.clear();
        head::write_failure(status, message, &mut self.out);
        if write_out(client, &mut self.out).await.is_ok() {
            let _ = client.shutdown().await;
        }
    }
}

/// The request on its way to the edge: the head (with the body bytes read along with
/// it), then the rest of the body as the client sends it.
///
/// It moves on whenever the lane waits for the edge, response head and body alike, so a
/// service that answers before the body's end (a 413) or answers as it reads (a stream
/// echoed back) is served as over a direct connection.
struct Upload {
    /// The head and the first body bytes, kept until the answer comes in case the
    /// request must be sent again.
    request: BytesMut,
    /// How much of `request` the edge took.
    written: usize,
    /// Body bytes still to come from the client.
    remaining: u64,
    /// Body bytes the edge took.
    body_sent: u64,
    /// Body bytes in `request`.
    buffered: u64,
    state: UploadState,
    /// When the edge last took bytes of the request: the response's timeouts count from
    /// there.
    last_progress: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UploadState {
    Sending,
    Sent,
    /// The edge stopped taking the request; its answer may still come.
    Refused,
}

impl Default for Upload {
    fn default() -> Self {
        Self {
            request: BytesMut::new(),
            written: 0,
            remaining: 0,
            body_sent: 0,
            buffered: 0,
            state: UploadState::Sent,
            last_progress: Instant::now(),
        }
    }
}

impl Upload {
    /// Starts a request at `now`: its head written out again, `body` the body bytes read
    /// with it, `body_len` the whole body's length.
    fn start(&mut self, (parts, more): (&Parts, &[u8]), body: &[u8], body_len: u64, now: Instant) {
        self.request.clear();
        head::write_request(parts, more, &mut self.request);
        self.request.extend_from_slice(body);
        self.buffered = body.len() as u64;
        self.remaining = body_len - self.buffered;
        self.rewind(now);
    }

    /// Sends the request from its start, on a new stream (only a request held whole in
    /// `request` can be).
    fn send_again(&mut self) {
        debug_assert_eq!(self.remaining, 0);
        self.rewind(Instant::now());
    }

    fn rewind(&mut self, now: Instant) {
        self.written = 0;
        self.body_sent = 0;
        self.state = UploadState::Sending;
        self.last_progress = now;
    }

    /// Moves the upload on as far as it goes without waiting. Only the client's failure
    /// is an error: an edge that stops taking the request may still answer it.
    fn poll_progress<I>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut I,
        from_client: &mut BytesMut,
        stream: &mut TunnelStream,
    ) -> Result<(), Failure>
    where
        I: AsyncRead + Unpin,
    {
        if self.state == UploadState::Sending {
            match self.poll_send(cx, client, from_client, stream) {
                Poll::Ready(Ok(())) => self.state = UploadState::Sent,
                Poll::Ready(Err(Failure::Client(why))) => return Err(Failure::Client(why)),
                Poll::Ready(Err(_)) => self.state = UploadState::Refused,
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    fn poll_send<I>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut I,
        from_client: &mut BytesMut,
        stream: &mut TunnelStream,
    ) -> Poll<Result<(), Failure>>
    where
        I: AsyncRead + Unpin,
    {
        loop {
            let written = if self.written < self.request.len() {
                let written =
                    ready!(Pin::new(&mut *stream).poll_write(cx, &self.request[self.written..]))
                        .map_err(upstream_failure)?;
                let head_left =
                    (self.request.len() as u64 - self.buffered).saturating_sub(self.written as u64);
                self.body_sent += (written as u64).saturating_sub(head_left);
                self.written += written;
                written
            } else if self.remaining == 0 {
                ready!(Pin::new(&mut *stream).poll_flush(cx)).map_err(upstream_failure)?;
                return Poll::Ready(Ok(()));
            } else {
                if from_client.is_empty() {
                    from_client.reserve(READ_ROOM);
                    match ready!(poll_read_buf(Pin::new(&mut *client), cx, from_client)) {
                        Ok(0) => {
                            return Poll::Ready(Err(Failure::Client("it closed mid-body".into())))
                        }
                        Ok(_) => {}
                        Err(error) => return Poll::Ready(Err(Failure::Client(error.to_string()))),
                    }
                }
                let take = usize::try_from(self.remaining)
                    .map_or(from_client.len(), |rest| rest.min(from_client.len()));
                let written = ready!(Pin::new(&mut *stream).poll_write(cx, &from_client[..take]))
                    .map_err(upstream_failure)?;
                from_client.advance(written);
                self.remaining -= written as u64;
                self.body_sent += written as u64;
                written
            };
            if written == 0 {
                return Poll::Ready(Err(Failure::Upstream(
                    "the stream took no more bytes".into(),
                )));
            }
            self.last_progress = Instant::now();
        }
    }
}

/// How long the lane waits for the edge: `limit` from `since` or from the upload's last
/// move, whichever is later; then `stalled`.
struct Wait {
    since: Instant,
    limit: Duration,
    stalled: fn(Duration) -> Failure,
}

/// Reads and drops what the client still sends, for a while, after an answer that came
/// before the request's end: a client still sending when the connection closes would get
/// a reset instead of the answer.
async fn linger<I: AsyncRead + Unpin>(client: &mut I, bounds: Linger) {
    if bounds.reads_nothing() {
        return;
    }
    let mut sink = [0u8; 8 * 1024];
    let mut dropped = 0u64;
    let _ = tokio::time::timeout(bounds.time, async {
        while dropped < bounds.bytes {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(read) => dropped += read as u64,
            }
        }
    })
    .await;
}

/// Resets the exchange's stream, if it has one: its service was left mid-exchange.
fn abandon(stream: Option<Box<TunnelStream>>) {
    if let Some(mut stream) = stream {
        stream.reset(ABANDONED_STREAM);
    }
}

/// False if the edge ended (or reset, or wrote on) a kept stream while it was idle: a
/// service that closes idle keep-alive connections does so through its stream. A close
/// still on its way is met by the retry of safe requests.
async fn still_open(stream: &mut TunnelStream) -> bool {
    std::future::poll_fn(|cx| {
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        Poll::Ready(
            Pin::new(&mut *stream)
                .poll_read(cx, &mut probe)
                .is_pending(),
        )
    })
    .await
}

/// Writes and empties `out`.
async fn write_out<I>(client: &mut I, out: &mut BytesMut) -> Result<(), Failure>
where
    I: AsyncWrite + Unpin,
{
    if out.is_empty() {
        return Ok(());
    }
    let written = client.write_all(out).await;
    out.clear();
    written.map_err(|error| Failure::Client(error.to_string()))?;
    // TLS holds records until flushed.
    client
        .flush()
        .await
        .map_err(|error| Failure::Client(error.to_string()))
}

/// Safe methods (RFC 9110 §9.2.1): sending one twice changes nothing.
fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

fn upstream_failure(error: std::io::Error) -> Failure {
    Failure::Upstream(error.to_string())
}
