//! The table of routes.
use std::collections::HashMap;
use std::fmt;

use tokio::sync::mpsc;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use super::Serve;
use crate::protocol::ServiceId;
use crate::session::ClientEvent;
use crate::session::SessionClient;
use crate::stream::TunnelStream;
use crate::transport::{Connection, DefaultConnection};

/// What a route may fail with.
pub type RouteError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) type Route<C> = BoxCloneSyncService<TunnelStream<C>, (), RouteError>;

/// Maps service names to tower services that take a bound [`TunnelStream`].
///
/// ```no_run
/// # async fn edge(client: backhaul::SessionClient<backhaul::QuinnConnection>,
/// #     events: tokio::sync::mpsc::Receiver<backhaul::ClientEvent>) -> Result<(), backhaul::Error> {
/// use backhaul::edge::Router;
/// use backhaul::stream::TunnelStream;
/// use backhaul::QuinnConnection;
/// use std::time::Duration;
/// use tower::ServiceBuilder;
///
/// let echo = tower::service_fn(|mut stream: TunnelStream<QuinnConnection>| async move {
///     let (mut reader, mut writer) = tokio::io::split(&mut stream);
///     tokio::io::copy(&mut reader, &mut writer).await
/// });
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
/// Router::new()
///     .route("echo", ServiceBuilder::new().concurrency_limit(64).service(echo))
///     .route("web", backhaul::http::serve(app))
///     .serve(client, events)
///     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
///     .with_drain_timeout(Duration::from_secs(10))
///     .await
/// # }
/// ```
pub struct Router<C: Connection = DefaultConnection> {
    pub(crate) routes: HashMap<ServiceId, Route<C>>,
    pub(crate) fallback: Option<Route<C>>,
}

impl<C: Connection> Clone for Router<C> {
    fn clone(&self) -> Self {
        Self {
            routes: self.routes.clone(),
            fallback: self.fallback.clone(),
        }
    }
}

impl<C: Connection> Default for Router<C> {
    fn default() -> Self {
        Self {
            routes: HashMap::new(),
            fallback: None,
        }
    }
}

impl<C: Connection> fmt::Debug for Router<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.routes.keys().map(ServiceId::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Router")
            .field("routes", &names)
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl<C: Connection> Router<C> {
    /// A router with no routes.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `service` with `route`. A later route for the same name replaces it.
    #[must_use]
    pub fn route<S>(mut self, service: impl Into<ServiceId>, route: S) -> Self
    where
        S: Service<TunnelStream<C>> + Clone + Send + Sync + 'static,
        S::Error: Into<RouteError>,
        S::Future: Send + 'static,
    {
        self.routes.insert(service.into(), boxed(route));
        self
    }

    /// Serves every service without a route of its own with `route` (it can read the
    /// name from [`TunnelStream::service`]). Without one, such opens are rejected with
    /// `UnsupportedService`.
    #[must_use]
    pub fn fallback<S>(mut self, route: S) -> Self
    where
        S: Service<TunnelStream<C>> + Clone + Send + Sync + 'static,
        S::Error: Into<RouteError>,
        S::Future: Send + 'static,
    {
        self.fallback = Some(boxed(route));
        self
    }

    /// True if `service` has a route of its own.
    #[must_use]
    pub fn has_route(&self, service: &str) -> bool {
        self.routes.contains_key(&ServiceId::from(service))
    }

    /// Serves the open requests of an edge session until it ends; see [`Serve`].
    pub fn serve(self, client: SessionClient<C>, events: mpsc::Receiver<ClientEvent>) -> Serve<C> {
        Serve::new(self, client, events)
    }

    pub(crate) fn find(&self, service: &ServiceId) -> Option<Route<C>> {
        self.routes.get(service).or(self.fallback.as_ref()).cloned()
    }
}

fn boxed<C, S>(route: S) -> Route<C>
where
    C: Connection,
    S: Service<TunnelStream<C>> + Clone + Send + Sync + 'static,
    S::Error: Into<RouteError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(route.map_response(|_| ()).map_err(Into::into))
}
