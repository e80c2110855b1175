//! The relay side as tower services: open a tunnel stream the way hyper opens a TCP
//! connection.
//!
//! [`Connector`] implements three `tower::Service`s over one session:
//! - `Service<ServiceId>`: open a stream to a named service;
//! - `Service<OpenTarget>`: the same with per-call [`Metadata`] (request id, tenant…);
//! - `Service<http::Uri>`: the connector of `hyper_util::client::legacy::Client`, which
//!   then pools and reuses tunneled connections. The URI's host names the service unless
//!   [`Connector::with_resolver`] says otherwise. hyper shuts a connection down when it
//!   ends cleanly, so a stream opened this way that is dropped unfinished (a request or an
//!   upgraded connection cut short) is reset, not finished: the edge never mistakes a
//!   cut for a complete exchange.
//!
//! `poll_ready` tells the truth: it fails once the session has ended, and it waits
//! (returns `Pending`, then wakes the task) while `max_inflight_opens` opens are under way,
//! so a burst of requests queues in the caller instead of growing without bound here.
//! A slot taken in `poll_ready` belongs to that clone of the connector and is not copied
//! by `Clone`, as in `tower::limit::ConcurrencyLimit`.

mod future;

use std::fmt;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

#[cfg(feature = "http")]
use http::Uri;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::PollSemaphore;
use tower::Service;

pub use future::ConnectFuture;

use crate::error::Error;
use crate::protocol::{Metadata, ServiceId};
use crate::session::SessionClient;
use crate::stream::{TunnelInfo, TunnelStream};
use crate::transport::reset_on_drop::Abandoned;
use crate::transport::{Connection, DefaultConnection};

/// Where to open a stream, with the metadata to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTarget {
    /// The service.
    pub service: ServiceId,
    /// Metadata for the edge.
    pub metadata: Metadata,
}

impl OpenTarget {
    /// A target with no metadata.
    pub fn new(service: impl Into<ServiceId>) -> Self {
        Self {
            service: service.into(),
            metadata: Metadata::Empty,
        }
    }

    /// Sets the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

impl From<ServiceId> for OpenTarget {
    fn from(service: ServiceId) -> Self {
        Self::new(service)
    }
}

impl From<&str> for OpenTarget {
    fn from(service: &str) -> Self {
        Self::new(service)
    }
}

#[cfg(feature = "http")]
type Resolver = Arc<dyn Fn(&Uri) -> Option<ServiceId> + Send + Sync>;

/// Opens tunnel streams over one session; see the [module docs](self).
///
/// ```no_run
/// # async fn demo(client: backhaul::SessionClient<backhaul::QuinnConnection>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use backhaul::connector::Connector;
/// use http_body_util::Empty;
/// use hyper::body::Bytes;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
///
/// let http = Client::builder(TokioExecutor::new())
///     .build::<_, Empty<Bytes>>(Connector::new(client));
/// // "web" is the service name on the edge.
/// let response = http.get("http://web/status".parse()?).await?;
/// println!("{}", response.status());
/// # Ok(()) }
/// ```
pub struct Connector<C: Connection = DefaultConnection> {
    shared: Arc<Shared<C>>,
    /// Made by the first `poll_ready` of this clone: hyper-util's client clones its
    /// connector for every request, and most of those clones never open anything.
    slots: Option<PollSemaphore>,
    slot: Option<OwnedSemaphorePermit>,
}

/// What every clone of a connector shares.
struct Shared<C: Connection> {
    client: SessionClient<C>,
    #[cfg(feature = "http")]
    resolver: Resolver,
    metadata: Metadata,
}

impl<C: Connection> Clone for Shared<C> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            #[cfg(feature = "http")]
            resolver: Arc::clone(&self.resolver),
            metadata: self.metadata.clone(),
        }
    }
}

impl<C: Connection> Clone for Connector<C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            slots: None,
            // A reserved slot belongs to the clone that reserved it.
            slot: None,
        }
    }
}

impl<C: Connection> fmt::Debug for Connector<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("client", &self.shared.client)
            .field("slot_reserved", &self.slot.is_some())
            .finish_non_exhaustive()
    }
}

impl<C: Connection> Connector<C> {
    /// A connector over `client`'s session; URIs map to services by host.
    pub fn new(client: SessionClient<C>) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                #[cfg(feature = "http")]
                resolver: Arc::new(|uri: &Uri| uri.host().map(ServiceId::from)),
                metadata: Metadata::Empty,
            }),
            slots: None,
            slot: None,
        }
    }

    /// Maps URIs to services with `resolver`; `None` fails the connect with
    /// [`Error::UnroutableUri`].
    #[cfg(feature = "http")]
    #[must_use]
    pub fn with_resolver<F>(mut self, resolver: F) -> Self
    where
        F: Fn(&Uri) -> Option<ServiceId> + Send + Sync + 'static,
    {
        Arc::make_mut(&mut self.shared).resolver = Arc::new(resolver);
        self
    }

    /// Metadata sent with opens made through `Service<ServiceId>` and `Service<Uri>`.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        Arc::make_mut(&mut self.shared).metadata = metadata;
        self
    }

    /// Waits for a free open slot, then opens a stream to `target`: `ready` + `call`
    /// without naming which of the `Service` impls is meant.
    ///
    /// # Errors
    /// As [`SessionClient::open`], except that a full `max_inflight_opens` waits.
    pub async fn connect(
        &mut self,
        target: impl Into<OpenTarget>,
    ) -> Result<TunnelStream<C>, Error> {
        std::future::poll_fn(|cx| self.poll_slot(cx)).await?;
        self.open(target.into(), Abandoned::OnPanic).await
    }

    /// The session client.
    #[must_use]
    pub fn client(&self) -> &SessionClient<C> {
        &self.shared.client
    }

    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let client = &self.shared.client;
        if let Err(error) = client.ensure_ready() {
            self.slot = None;
            return Poll::Ready(Err(error));
        }
        if self.slot.is_none() {
            let slots = self
                .slots
                .get_or_insert_with(|| PollSemaphore::new(client.open_slots()));
            match ready!(slots.poll_acquire(cx)) {
                Some(slot) => self.slot = Some(slot),
                None => return Poll::Ready(Err(Error::SessionClosed)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Opens `target`; the stream is reset rather than finished if dropped unfinished
    /// while `abandoned` says so.
    fn open(&mut self, target: OpenTarget, abandoned: Abandoned) -> ConnectFuture<C> {
        let client = self.shared.client.clone();
        let slot = self
            .slot
            .take()
            .or_else(|| client.open_slots().try_acquire_owned().ok());
        let limit = client.max_inflight_opens();
        ConnectFuture::new(async move {
            let slot = slot.ok_or(Error::CapacityExceeded {
                what: "in-flight opens",
                limit,
            })?;
            let OpenTarget { service, metadata } = target;
            let ((send, recv), logical_stream_id) = client
                .open_reserved(service.clone(), metadata.clone(), slot)
                .await?;
            let info = TunnelInfo {
                service,
                metadata,
                logical_stream_id,
            };
            Ok(TunnelStream::new(send, recv, info)
                .abandoned(abandoned)
                .holding_session(client))
        })
    }
}

impl<C: Connection> Service<OpenTarget> for Connector<C> {
    type Response = TunnelStream<C>;
    type Error = Error;
    type Future = ConnectFuture<C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_slot(cx)
    }

    fn call(&mut self, target: OpenTarget) -> Self::Future {
        self.open(target, Abandoned::OnPanic)
    }
}

impl<C: Connection> Service<ServiceId> for Connector<C> {
    type Response = TunnelStream<C>;
    type Error = Error;
    type Future = ConnectFuture<C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_slot(cx)
    }

    fn call(&mut self, service: ServiceId) -> Self::Future {
        let target = OpenTarget::new(service).with_metadata(self.shared.metadata.clone());
        self.open(target, Abandoned::OnPanic)
    }
}

#[cfg(feature = "http")]
impl<C: Connection> Service<Uri> for Connector<C> {
    type Response = TunnelStream<C>;
    type Error = Error;
    type Future = ConnectFuture<C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_slot(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match (self.shared.resolver)(&uri) {
            Some(service) => {
                let target = OpenTarget::new(service).with_metadata(self.shared.metadata.clone());
                // hyper shuts a connection's I/O down when the connection ends cleanly; one
                // it drops (a request or an upgraded connection cut short, a connection
                // given up) is reset, so a cut transfer never reads as complete.
                self.open(target, Abandoned::Always)
            }
            None => {
                self.slot = None;
                ConnectFuture::failed(Error::UnroutableUri(uri))
            }
        }
    }
}
