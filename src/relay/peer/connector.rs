//! [`PeerConnector`]: an edge's services through the relay it is attached to.

use std::fmt;
use std::net::SocketAddr;
#[cfg(feature = "http")]
use std::sync::Arc;
use std::task::{Context, Poll};

#[cfg(feature = "http")]
use http::Uri;
use tower::Service;

use super::pool::PeerPool;
use super::wire::{forward_metadata, refusal_error};
use crate::connector::{ConnectFuture, Connector, OpenTarget};
use crate::error::{Error, TimeoutKind};
use crate::protocol::{Metadata, ServiceId};
use crate::relay::name::EdgeName;
use crate::session::SessionClient;
use crate::stream::TunnelStream;
use crate::transport::QuinnConnection;

#[cfg(feature = "http")]
type Resolver = Arc<dyn Fn(&Uri) -> Option<ServiceId> + Send + Sync>;

/// Opens streams to one edge's services through the peer relay it is attached to; made
/// by [`PeerPool::connector`]. The streams are [`TunnelStream`]s, as an edge's own
/// [`Connector`] gives, so hyper and hyper-util's pooled client use them unchanged.
///
/// `poll_ready` tells the truth: with a live session to the peer it reserves one of the
/// session's `max_inflight_opens` slots (waiting while none is free), as a
/// [`Connector`] does; without one it is ready, and the call dials. It never fails: a
/// peer that cannot be reached fails the call, not the service.
///
/// Errors a relay can turn into precise answers: [`Error::PeerUnreachable`] and
/// [`Error::PeerRefused`] (the relays are cut off from each other: 502),
/// [`Error::EdgeNotAttached`] (the directory was stale: look again, or 502),
/// [`Error::StreamRejected`] (the edge's own refusal, as for a local edge),
/// [`Error::Timeout`] (the open was not answered in time: 504).
pub struct PeerConnector {
    pool: PeerPool,
    relay: SocketAddr,
    edge: EdgeName,
    metadata: Metadata,
    #[cfg(feature = "http")]
    resolver: Resolver,
    /// A connector over the live session, holding the slot `poll_ready` reserved.
    ready: Option<Connector<QuinnConnection>>,
}

impl Clone for PeerConnector {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            relay: self.relay,
            edge: self.edge.clone(),
            metadata: self.metadata.clone(),
            #[cfg(feature = "http")]
            resolver: Arc::clone(&self.resolver),
            // A reserved slot belongs to the clone that reserved it.
            ready: None,
        }
    }
}

impl fmt::Debug for PeerConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConnector")
            .field("relay", &self.relay)
            .field("edge", &self.edge)
            .finish_non_exhaustive()
    }
}

impl PeerConnector {
    pub(super) fn new(pool: PeerPool, relay: SocketAddr, edge: EdgeName) -> Self {
        Self {
            pool,
            relay,
            edge,
            metadata: Metadata::Empty,
            #[cfg(feature = "http")]
            resolver: Arc::new(|uri: &Uri| uri.host().map(ServiceId::from)),
            ready: None,
        }
    }

    /// Maps URIs to the edge's services with `resolver` (default: the host names the
    /// service); `None` fails the connect with [`Error::UnroutableUri`].
    #[cfg(feature = "http")]
    #[must_use]
    pub fn with_resolver<F>(mut self, resolver: F) -> Self
    where
        F: Fn(&Uri) -> Option<ServiceId> + Send + Sync + 'static,
    {
        self.resolver = Arc::new(resolver);
        self
    }

    /// Metadata for the edge, sent with opens made through `Service<ServiceId>` and
    /// `Service<Uri>`.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The peer relay's address.
    #[must_use]
    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// The edge.
    #[must_use]
    pub fn edge(&self) -> &EdgeName {
        &self.edge
    }

    /// Waits until ready, then opens a stream to `target`.
    ///
    /// # Errors
    /// See [`PeerConnector`].
    pub async fn connect(
        &mut self,
        target: impl Into<OpenTarget>,
    ) -> Result<TunnelStream<QuinnConnection>, Error> {
        std::future::poll_fn(|cx| self.poll_open_slot(cx)).await?;
        self.open(target.into()).await
    }

    fn poll_open_slot(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self
            .ready
            .as_ref()
            .is_some_and(|connector| !connector.client().is_ready())
        {
            self.ready = None;
        }
        if self.ready.is_none() {
            self.ready = self.pool.live_session(self.relay).map(Connector::new);
        }
        if let Some(connector) = &mut self.ready {
            match Service::<OpenTarget>::poll_ready(connector, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
                // The session ended meanwhile: the call dials again.
                Poll::Ready(Err(_)) => self.ready = None,
            }
        }
        Poll::Ready(Ok(()))
    }

    fn open(&mut self, target: OpenTarget) -> ConnectFuture<QuinnConnection> {
        let OpenTarget { service, metadata } = target;
        let target =
            OpenTarget::new(service).with_metadata(forward_metadata(&self.edge, 1, metadata));
        let relay = self.relay;
        let edge = self.edge.clone();
        // With a slot reserved on the live session, open at once; else dial first.
        let opening = self.ready.as_mut().map(|connector| {
            let opening = Service::<OpenTarget>::call(connector, target.clone());
            (connector.client().clone(), opening)
        });
        let pool = self.pool.clone();
        ConnectFuture::new(async move {
            let (client, opened) = match opening {
                Some((client, opening)) => match opening.await {
                    // The pooled session was lost before the open completed (often before
                    // its loss was noticed). No byte of the caller's went anywhere, so
                    // one more open, on a new session, is safe.
                    Err(Error::Disconnected | Error::SessionClosed) => {
                        dial_and_open(&pool, relay, target).await?
                    }
                    opened => (client, opened),
                },
                None => dial_and_open(&pool, relay, target).await?,
            };
            opened.map_err(|error| forwarded_error(error, &client, relay, &edge))
        })
    }
}

/// The session with `relay` (dialed if need be) and an open on it.
async fn dial_and_open(
    pool: &PeerPool,
    relay: SocketAddr,
    target: OpenTarget,
) -> Result<
    (
        SessionClient<QuinnConnection>,
        Result<TunnelStream<QuinnConnection>, Error>,
    ),
    Error,
> {
    let client = pool.session(relay).await?;
    let opened = Connector::new(client.clone()).connect(target).await;
    Ok((client, opened))
}

/// What an open through `relay` failed with, in the terms of the module.
fn forwarded_error(
    error: Error,
    client: &SessionClient<QuinnConnection>,
    relay: SocketAddr,
    edge: &EdgeName,
) -> Error {
    match error {
        Error::StreamRejected { code, reason } => refusal_error(code, reason, relay, edge),
        Error::Timeout(TimeoutKind::OpenRequest | TimeoutKind::StreamBind) if client.is_ready() => {
            error
        }
        Error::Timeout(_)
        | Error::Disconnected
        | Error::SessionClosed
        | Error::Transport(_)
        | Error::Protocol(_)
        | Error::ProtocolViolation(_) => Error::PeerUnreachable {
            relay,
            source: Box::new(error),
        },
        other => other,
    }
}

impl Service<OpenTarget> for PeerConnector {
    type Response = TunnelStream<QuinnConnection>;
    type Error = Error;
    type Future = ConnectFuture<QuinnConnection>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_open_slot(cx)
    }

    fn call(&mut self, target: OpenTarget) -> Self::Future {
        self.open(target)
    }
}

impl Service<ServiceId> for PeerConnector {
    type Response = TunnelStream<QuinnConnection>;
    type Error = Error;
    type Future = ConnectFuture<QuinnConnection>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_open_slot(cx)
    }

    fn call(&mut self, service: ServiceId) -> Self::Future {
        let target = OpenTarget::new(service).with_metadata(self.metadata.clone());
        self.open(target)
    }
}

#[cfg(feature = "http")]
impl Service<Uri> for PeerConnector {
    type Response = TunnelStream<QuinnConnection>;
    type Error = Error;
    type Future = ConnectFuture<QuinnConnection>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_open_slot(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match (self.resolver)(&uri) {
            Some(service) => {
                let target = OpenTarget::new(service).with_metadata(self.metadata.clone());
                self.open(target)
            }
            None => {
                // Give the reserved slot back.
                self.ready = None;
                ConnectFuture::failed(Error::UnroutableUri(uri))
            }
        }
    }
}
