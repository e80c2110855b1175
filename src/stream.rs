//! [`TunnelStream`]: one bound data stream, usable by tokio code and by hyper alike.
//!
//! Both sides end up with the same thing: the relay gets one from the
//! [`Connector`](crate::connector::Connector), the edge's [`Router`](crate::edge::Router)
//! hands one to each route. It carries what the open said (service, metadata, logical
//! stream id) so services and logs can use it, and it implements tokio's `AsyncRead`/
//! `AsyncWrite` and hyper's `rt::Read`/`rt::Write`, so it goes straight into
//! `hyper::client::conn::http1::handshake` or a hyper server.
//!
//! Like a quinn stream or a TCP socket, a `TunnelStream` that is dropped is finished: the
//! peer reads a clean end. Not so when its writer *abandoned* it: dropped during a panic,
//! or stopped by the [`Router`](crate::edge::Router) serving it when a drain timed out or
//! its serving loop was dropped. Then it is reset with [`ABANDONED_STREAM`], so a
//! truncated transfer never passes for a complete one.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::protocol::{Metadata, ServiceId};
use crate::session::{AcceptedSlot, SessionClient};
use crate::transport::reset_on_drop::{Abandoned, ResetOnDrop};
use crate::transport::{Connection, DefaultConnection};

/// The application code of the reset a peer sees when a [`TunnelStream`]'s writer
/// abandoned it mid-transfer (it panicked, or was stopped): what arrived may be partial.
/// [`reset_code`] reads it from a failed read.
pub const ABANDONED_STREAM: u32 = 0x5152_0004;

/// The application code of the reset behind a failed read of a quinn stream (such as
/// [`ABANDONED_STREAM`], or `tcp::CONNECTION_BROKEN` from a TCP tunnel); `None` if the
/// read failed for another reason.
#[cfg(feature = "quinn")]
#[must_use]
pub fn reset_code(error: &io::Error) -> Option<u32> {
    match error.get_ref()?.downcast_ref::<quinn::ReadError>()? {
        quinn::ReadError::Reset(code) => u32::try_from(code.into_inner()).ok(),
        _ => None,
    }
}

/// What an open said about a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelInfo {
    /// The service the stream reaches.
    pub service: ServiceId,
    /// The opener's metadata.
    pub metadata: Metadata,
    /// The logical stream id the acceptor announced.
    pub logical_stream_id: u64,
}

/// The two halves of a data stream as one duplex byte stream.
pub(crate) struct Duplex<C: Connection> {
    send: ResetOnDrop<C::SendStream>,
    recv: C::RecvStream,
}

impl<C: Connection> AsyncRead for Duplex<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl<C: Connection> AsyncWrite for Duplex<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.send.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

/// With the `http` feature the stream sits in hyper-util's `TokioIo`, which gives it
/// hyper's I/O traits as well as tokio's; without it, the bare duplex.
#[cfg(feature = "http")]
type Io<C> = hyper_util::rt::TokioIo<Duplex<C>>;
#[cfg(not(feature = "http"))]
type Io<C> = Duplex<C>;

#[cfg(feature = "http")]
fn wrap<C: Connection>(duplex: Duplex<C>) -> Io<C> {
    hyper_util::rt::TokioIo::new(duplex)
}

#[cfg(not(feature = "http"))]
fn wrap<C: Connection>(duplex: Duplex<C>) -> Io<C> {
    duplex
}

#[cfg(feature = "http")]
fn unwrap<C: Connection>(io: Io<C>) -> Duplex<C> {
    io.into_inner()
}

#[cfg(not(feature = "http"))]
fn unwrap<C: Connection>(io: Io<C>) -> Duplex<C> {
    io
}

#[cfg(feature = "http")]
fn duplex_mut<C: Connection>(io: &mut Io<C>) -> &mut Duplex<C> {
    io.inner_mut()
}

#[cfg(not(feature = "http"))]
fn duplex_mut<C: Connection>(io: &mut Io<C>) -> &mut Duplex<C> {
    io
}

#[cfg(feature = "http")]
fn duplex_ref<C: Connection>(io: &Io<C>) -> &Duplex<C> {
    io.inner()
}

#[cfg(not(feature = "http"))]
fn duplex_ref<C: Connection>(io: &Io<C>) -> &Duplex<C> {
    io
}

/// A bound data stream with what its open said.
///
/// Shutting down the write side finishes the QUIC stream (the peer reads EOF); dropping
/// the stream finishes it too, unless it was abandoned: dropped during a panic, or
/// stopped by the [`Router`](crate::edge::Router) serving it. Then it is *reset* with
/// [`ABANDONED_STREAM`], so the peer's reads fail instead of seeing a clean end.
///
/// Streams made by the [`Connector`](crate::connector::Connector) and the
/// [`Router`](crate::edge::Router) keep their session running while they live, so dropping
/// the last `SessionClient` does not cut them off.
pub struct TunnelStream<C: Connection = DefaultConnection> {
    io: Io<C>,
    info: TunnelInfo,
    draining: Option<watch::Receiver<bool>>,
    /// Keeps the session running and, for accepted streams, holds the stream's slot
    /// (shared with whoever else must keep it, such as the Router until its route returns).
    session: Option<Arc<AcceptedSlot<C>>>,
}

impl<C: Connection> fmt::Debug for TunnelStream<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelStream")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl<C: Connection> TunnelStream<C> {
    /// Joins the halves of a bound stream.
    pub fn new(send: C::SendStream, recv: C::RecvStream, info: TunnelInfo) -> Self {
        Self {
            io: wrap(Duplex {
                send: ResetOnDrop::new(send, Abandoned::OnPanic),
                recv,
            }),
            info,
            draining: None,
            session: None,
        }
    }

    /// Keeps `session` running as long as this stream lives.
    pub(crate) fn holding_session(mut self, session: SessionClient<C>) -> Self {
        self.session = Some(Arc::new(AcceptedSlot::session_only(session)));
        self
    }

    /// Holds an accepted stream's slot (and its session) as long as this stream lives.
    pub(crate) fn holding_slot(mut self, slot: AcceptedSlot<C>) -> Self {
        self.session = Some(Arc::new(slot));
        self
    }

    /// Another hold on this stream's slot and session: the slot is freed once the stream
    /// and every such hold are dropped.
    pub(crate) fn session_hold(&self) -> Option<Arc<AcceptedSlot<C>>> {
        self.session.clone()
    }

    pub(crate) fn with_draining(mut self, draining: watch::Receiver<bool>) -> Self {
        self.draining = Some(draining);
        self
    }

    /// What the open said.
    #[must_use]
    pub fn info(&self) -> &TunnelInfo {
        &self.info
    }

    /// The service this stream reaches.
    #[must_use]
    pub fn service(&self) -> &ServiceId {
        &self.info.service
    }

    /// The opener's metadata.
    #[must_use]
    pub fn metadata(&self) -> &Metadata {
        &self.info.metadata
    }

    /// The logical stream id.
    #[must_use]
    pub fn logical_stream_id(&self) -> u64 {
        self.info.logical_stream_id
    }

    /// Splits into the transport's halves (for priorities, resets, stop codes…). A stream
    /// from [`SessionClient::accept_stream`] frees its `max_concurrent_streams` slot here.
    ///
    /// The halves keep their transport's own drop behaviour: a quinn `SendStream` dropped
    /// unfinished is finished, not reset.
    #[must_use]
    pub fn into_parts(self) -> (C::SendStream, C::RecvStream, TunnelInfo) {
        let Duplex { send, recv } = unwrap(self.io);
        (send.into_inner(), recv, self.info)
    }

    /// As [`TunnelStream::into_parts`], with the send half reset if it is ever dropped
    /// unfinished: for a splice, which only lets go of a stream early when it failed or
    /// its task was aborted.
    pub(crate) fn into_guarded_parts(self) -> (ResetOnDrop<C::SendStream>, C::RecvStream) {
        let Duplex { send, recv } = unwrap(self.abandoned(Abandoned::Always).io);
        (send, recv)
    }

    /// Says when the stream counts as abandoned, and is then reset rather than finished if
    /// dropped unfinished: `Always` for an owner that finishes or resets it on every path
    /// but an abort (a splice), `Stopped` once its serving loop stopped it.
    pub(crate) fn abandoned(mut self, when: Abandoned) -> Self {
        duplex_mut(&mut self.io).send.set_abandoned(when);
        self
    }

    /// Abandons the stream both ways with an application error `code`: the peer's reads
    /// fail with that code instead of seeing a clean end, and its writes are stopped.
    ///
    /// Use it when the data cannot be delivered whole (the other side of a splice broke):
    /// dropping the stream instead would finish it, and a truncated transfer would look
    /// complete.
    pub fn reset(&mut self, code: u32) {
        let duplex = duplex_mut(&mut self.io);
        crate::transport::SendStream::reset(&mut duplex.send, code);
        crate::transport::RecvStream::stop(&mut duplex.recv, code);
    }

    /// Stops reading with an application error `code`: the peer's writes fail with it.
    /// What this side wrote, and its finish, are still delivered.
    ///
    /// Use it when the peer's bytes can no longer go anywhere but what came the other way
    /// is whole (a splice whose far side stopped reading after it answered).
    pub fn stop(&mut self, code: u32) {
        crate::transport::RecvStream::stop(&mut duplex_mut(&mut self.io).recv, code);
    }

    /// Resolves once the peer stopped reading this stream (or the connection was lost):
    /// whatever is written from then on reaches no one. The future borrows nothing, so it
    /// can be awaited beside the stream's own reads and writes (a splice that should end
    /// when its far end is gone, rather than when its near end next writes).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        crate::transport::SendStream::stopped(&duplex_ref(&self.io).send)
    }

    /// Resolves when the edge that serves this stream begins a graceful shutdown, so a
    /// long-lived service (an HTTP connection with keep-alive) can wind down. Never
    /// resolves for streams not served by a [`Router`](crate::edge::Router).
    pub async fn draining(&self) {
        match self.draining.clone() {
            Some(draining) => wait_draining(draining).await,
            None => std::future::pending().await,
        }
    }

    #[cfg(feature = "http")]
    pub(crate) fn draining_signal(&self) -> Option<watch::Receiver<bool>> {
        self.draining.clone()
    }

    fn duplex(&mut self) -> Pin<&mut Duplex<C>> {
        Pin::new(duplex_mut(&mut self.io))
    }
}

impl<C: Connection> AsyncRead for TunnelStream<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().duplex().poll_read(cx, buf)
    }
}

impl<C: Connection> AsyncWrite for TunnelStream<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().duplex().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().duplex().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        duplex_ref(&self.io).is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().duplex().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().duplex().poll_shutdown(cx)
    }
}

#[cfg(feature = "http")]
impl<C: Connection> hyper::rt::Read for TunnelStream<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

#[cfg(feature = "http")]
impl<C: Connection> hyper::rt::Write for TunnelStream<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        hyper::rt::Write::poll_write(Pin::new(&mut self.get_mut().io), cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        hyper::rt::Write::poll_write_vectored(Pin::new(&mut self.get_mut().io), cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.io)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        hyper::rt::Write::poll_flush(Pin::new(&mut self.get_mut().io), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        hyper::rt::Write::poll_shutdown(Pin::new(&mut self.get_mut().io), cx)
    }
}

#[cfg(feature = "http")]
impl<C: Connection> hyper_util::client::legacy::connect::Connection for TunnelStream<C> {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new().extra(self.info.clone())
    }
}

/// Resolves once `draining` turns true; never if its sender goes away first.
pub(crate) async fn wait_draining(mut draining: watch::Receiver<bool>) {
    let started = draining.wait_for(|draining| *draining).await.is_ok();
    if !started {
        std::future::pending::<()>().await;
    }
}
