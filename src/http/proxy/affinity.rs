//! Connection affinity: a downstream HTTP/1 connection keeps one upstream connection of
//! its own, so its requests skip the pool.
//!
//! hyper-util's pooled client pays for sharing on every request: a lock on the pool, a
//! checkout that races a new connect against every miss, and the bookkeeping to return
//! the connection when the body ends. A downstream HTTP/1 connection needs none of it: it
//! sends its requests one after another, so one upstream connection always suffices, and
//! it can hold that connection for as long as it lives. The [server](crate::http::server)
//! gives each downstream connection a [`ConnectionCache`]; [`ReverseProxy`] keeps the
//! upstream connection there when given an [`Affinity`]
//! ([`ReverseProxy::with_affinity`]). On a relay this took about a fifth off the CPU
//! time per forwarded request (README, "Performance").
//!
//! The cached connection is reused only by a request for the same [`Affinity::key`]
//! (an edge session, say) and URI authority (a service); anything else replaces it. It is
//! closed with the downstream connection. A request that finds the cached connection
//! closed by the upstream in the meantime (idle timeout) is sent on a new one, as
//! hyper-util retries a request that never left on a pooled connection.
//!
//! [`ReverseProxy`]: super::ReverseProxy
//! [`ReverseProxy::with_affinity`]: super::ReverseProxy::with_affinity

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, HOST};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tower::{Service, ServiceExt};
use tracing::debug;

use super::{BoxError, ProxyBody};
use crate::http::clients::DEFAULT_READ_AHEAD;
use crate::http::server::ConnectionCache;

type OpenFuture = Pin<Box<dyn Future<Output = Result<SendRequest<ProxyBody>, BoxError>> + Send>>;
type Open = Arc<dyn Fn(Uri) -> OpenFuture + Send + Sync>;

/// How long a cached connection may take to be ready for the next request (it finishes
/// reading the previous response first) before a new one is opened instead.
const READY_WAIT: Duration = Duration::from_secs(1);

/// Which upstream connections a downstream connection may keep, and how to open one; see
/// the [module docs](self).
#[derive(Clone)]
pub struct Affinity {
    key: u64,
    open: Open,
}

impl fmt::Debug for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Affinity")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Affinity {
    /// Connections opened with `connector` (any `Service<Uri>` whose connection hyper can
    /// drive: backhaul's [`Connector`](crate::connector::Connector), hyper-util's
    /// `HttpConnector`…) and reused for requests with the same `key`: whatever tells
    /// upstreams apart beyond the URI's authority, such as an edge session's
    /// [`Epoch`](crate::relay::Epoch). HTTP/1.1, reading at most
    /// [`DEFAULT_READ_AHEAD`](crate::http::DEFAULT_READ_AHEAD) of a response ahead of
    /// the downstream.
    pub fn new<S>(key: u64, connector: S) -> Self
    where
        S: Service<Uri> + Clone + Send + Sync + 'static,
        S::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        let open = move |uri: Uri| -> OpenFuture {
            let connector = connector.clone();
            Box::pin(async move {
                let io = connector.oneshot(uri).await.map_err(Into::into)?;
                let (sender, connection) = http1::Builder::new()
                    .max_buf_size(DEFAULT_READ_AHEAD)
                    .handshake(io)
                    .await?;
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        debug!(%error, "upstream connection ended");
                    }
                });
                Ok(sender)
            })
        };
        Self {
            key,
            open: Arc::new(open),
        }
    }

    /// What requests must share to share a connection, besides their URI's authority.
    #[must_use]
    pub fn key(&self) -> u64 {
        self.key
    }

    /// Sends `request` (absolute URI) on the connection kept in `cache`, or on a new one
    /// then kept there.
    pub(super) async fn send(
        self,
        cache: ConnectionCache,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let (mut request, upstream) = to_origin_form(request)?;
        let mut sender = self.cached(&cache, &upstream).await;
        let mut reused = sender.is_some();
        loop {
            let mut current = match sender.take() {
                Some(sender) => sender,
                None => (self.open)(upstream.clone()).await?,
            };
            match current.try_send_request(request).await {
                Ok(response) => {
                    cache.put(Kept {
                        key: self.key,
                        upstream,
                        sender: current,
                    });
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    // Closed before the request left: once more on a new connection.
                    Some(unsent) if reused => {
                        debug!(error = %error.error(), "kept connection closed: opening another");
                        request = unsent;
                        reused = false;
                    }
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }

    /// The connection kept in `cache` if it is for this key and `upstream`, and ready.
    async fn cached(
        &self,
        cache: &ConnectionCache,
        upstream: &Uri,
    ) -> Option<SendRequest<ProxyBody>> {
        let mut kept = cache.take::<Kept>()?;
        if kept.key != self.key || kept.upstream != *upstream {
            return None;
        }
        match tokio::time::timeout(READY_WAIT, kept.sender.ready()).await {
            Ok(Ok(())) => Some(kept.sender),
            _ => None,
        }
    }
}

/// The connection a downstream connection keeps.
struct Kept {
    key: u64,
    /// Scheme and authority, as the connector is called with.
    upstream: Uri,
    sender: SendRequest<ProxyBody>,
}

/// The request as an HTTP/1.1 connection sends it (path and query only, Host from the
/// URI unless it has one), and its upstream as hyper-util calls a connector: scheme and
/// authority only.
fn to_origin_form(mut request: Request<ProxyBody>) -> Result<(Request<ProxyBody>, Uri), BoxError> {
    let uri = request.uri();
    let authority = uri
        .authority()
        .cloned()
        .ok_or("the request's URI names no upstream (it must be absolute)")?;
    let upstream = Uri::builder()
        .scheme(uri.scheme().cloned().unwrap_or(Scheme::HTTP))
        .authority(authority.clone())
        .path_and_query("/")
        .build()?;
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if !request.headers().contains_key(HOST) {
        let host = HeaderValue::from_str(authority.as_str())?;
        request.headers_mut().insert(HOST, host);
    }
    *request.uri_mut() = Uri::from(path);
    Ok((request, upstream))
}
