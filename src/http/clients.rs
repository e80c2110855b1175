//! One pooled HTTP client per edge session, so keep-alive connections reuse tunnel streams.
//!
//! A relay forwarding HTTP to edges wants a pooled client (backhaul's lean
//! [`Http1Pool`], or hyper-util's client for HTTP/2): a request reuses an idle HTTP
//! connection (a tunnel stream) instead of opening a stream per request. The pool must
//! belong to one edge *session*, though: when an edge reconnects, its old
//! session's pooled connections are dead, and a request must never be sent through them.
//! [`EdgeClients`] keeps the clients of each (name, [`Epoch`]), built on first use over
//! the session's [`Connector`], and drops them as soon as the [`Registry`] detaches that
//! epoch.
//!
//! A [`Layer`] over each session's connector ([`EdgeClientsBuilder::layer`]) adds what the
//! application needs, e.g. counting opens by outcome, or a timeout.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use hyper::body::Body;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::client::legacy::{Builder, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::task::JoinHandle;
use tower::layer::util::Identity;
use tower::Layer;

use crate::connector::Connector;
use crate::http::pool::{Http1Pool, Http1PoolBuilder, PoolConnector};
use crate::relay::{EdgeHandle, EdgeName, Epoch, Registry, RegistryEvent};
use crate::transport::{Connection, DefaultConnection};

/// How long an idle pooled connection (tunnel stream) is kept by default.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How far, by default, hyper reads a response ahead of a slow client (its own default is
/// 400 KiB per response; tunnel data waiting for a slow reader is better left in the
/// tunnel's flow control).
pub const DEFAULT_READ_AHEAD: usize = 64 * 1024;

/// Pooled HTTP clients of the edges in a [`Registry`], one per session. Cheap to clone
/// (clones share the clients).
///
/// A request through an edge's client reuses an idle HTTP connection (a tunnel stream)
/// instead of opening a stream per request. The pool belongs to one edge *session*: when
/// the edge reconnects, the old session's connections are dead, so the client is dropped
/// as soon as the [`Registry`] detaches that session's [`Epoch`], and the new session
/// gets a new one. A [`Layer`] over each session's [`Connector`]
/// ([`EdgeClientsBuilder::layer`]) adds what the application needs (counting opens…).
///
/// ```no_run
/// use backhaul::http::EdgeClients;
/// use backhaul::relay::Registry;
/// use http_body_util::Empty;
/// use hyper::body::Bytes;
///
/// # async fn demo(registry: Registry) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let clients: EdgeClients<Empty<Bytes>> = EdgeClients::new(registry.clone());
/// if let Some(edge) = registry.get("kiosk") {
///     // The same client (and pool) for every request to this session of "kiosk".
///     let response = clients.client(&edge).get("http://web/status".parse()?).await?;
///     println!("{}", response.status());
/// }
/// # Ok(()) }
/// ```
pub struct EdgeClients<B, L = Identity, C = DefaultConnection>
where
    L: Layer<Connector<C>>,
    C: Connection,
{
    shared: Arc<Shared<B, L, C>>,
}

type Table<K, B> = HashMap<(EdgeName, Epoch), SessionClients<K, B>>;

/// What one session's requests go through, each built on first use.
struct SessionClients<K, B> {
    client: Option<Client<K, B>>,
    pool: Option<Http1Pool<K, B>>,
}

impl<K, B> Default for SessionClients<K, B> {
    fn default() -> Self {
        Self {
            client: None,
            pool: None,
        }
    }
}

struct Shared<B, L: Layer<Connector<C>>, C: Connection> {
    registry: Registry<C>,
    layer: L,
    builder: Builder,
    pool_builder: Http1PoolBuilder,
    clients: Mutex<Table<L::Service, B>>,
    /// The task that drops detached sessions' clients: started on first use (so that
    /// building an `EdgeClients` needs no runtime), stopped when the last clone drops.
    follower: Mutex<Option<JoinHandle<()>>>,
}

impl<B, L: Layer<Connector<C>>, C: Connection> Drop for Shared<B, L, C> {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.follower).take() {
            task.abort();
        }
    }
}

impl<B, L: Layer<Connector<C>>, C: Connection> Clone for EdgeClients<B, L, C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B, L: Layer<Connector<C>>, C: Connection> fmt::Debug for EdgeClients<B, L, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeClients")
            .field("clients", &lock(&self.shared.clients).len())
            .finish_non_exhaustive()
    }
}

impl<B, C: Connection> EdgeClients<B, Identity, C> {
    /// Clients of `registry`'s edges over their plain connectors, with the default
    /// settings ([`DEFAULT_POOL_IDLE_TIMEOUT`], [`DEFAULT_READ_AHEAD`]).
    #[must_use]
    pub fn new(registry: Registry<C>) -> Self {
        EdgeClientsBuilder::new(registry).build()
    }
}

impl<C: Connection> EdgeClients<(), Identity, C> {
    /// Settings other than the defaults: a connector layer, hyper-util's client settings.
    /// (Like `hyper_util`'s `Client::builder`, it names no body type: [`build`] does.)
    ///
    /// [`build`]: EdgeClientsBuilder::build
    #[must_use]
    pub fn builder(registry: Registry<C>) -> EdgeClientsBuilder<Identity, C> {
        EdgeClientsBuilder::new(registry)
    }
}

impl<B, L, C> EdgeClients<B, L, C>
where
    L: Layer<Connector<C>> + Send + Sync + 'static,
    L::Service: Connect + Clone + Send + Sync + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    C: Connection,
{
    /// The pooled client of `edge`'s session, built on first use. It is kept (and shared
    /// by later calls) only while that session holds the edge's name: a client for a
    /// session already detached serves this one caller and is then dropped.
    ///
    /// # Panics
    /// Outside a Tokio runtime (the first call starts the task that follows the registry).
    pub fn client(&self, edge: &EdgeHandle<C>) -> Client<L::Service, B> {
        self.session_one(
            edge,
            |clients| &mut clients.client,
            |connector| self.shared.builder.build(connector),
        )
    }
}

impl<B, L, C> EdgeClients<B, L, C>
where
    L: Layer<Connector<C>> + Send + Sync + 'static,
    L::Service: PoolConnector,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    C: Connection,
{
    /// The [`Http1Pool`] of `edge`'s session (HTTP/1.1, leaner than hyper-util's client:
    /// see the [`pool`](crate::http::pool) module), built on first use and kept like
    /// [`client`](Self::client)'s.
    ///
    /// # Panics
    /// Outside a Tokio runtime (the first call starts the task that follows the registry).
    pub fn pool(&self, edge: &EdgeHandle<C>) -> Http1Pool<L::Service, B> {
        self.session_one(
            edge,
            |clients| &mut clients.pool,
            |connector| self.shared.pool_builder.clone().build(connector),
        )
    }
}

impl<B, L, C> EdgeClients<B, L, C>
where
    L: Layer<Connector<C>> + Send + Sync + 'static,
    L::Service: Send + Sync + 'static,
    B: Send + 'static,
    C: Connection,
{
    /// One of `edge`'s session's clients (picked by `pick`), built with `build` on first
    /// use. It is kept only while the session still holds the edge's name.
    fn session_one<T: Clone>(
        &self,
        edge: &EdgeHandle<C>,
        pick: impl Fn(&mut SessionClients<L::Service, B>) -> &mut Option<T>,
        build: impl FnOnce(L::Service) -> T,
    ) -> T {
        self.follow();
        let key = (edge.name().clone(), edge.epoch());
        let mut clients = lock(&self.shared.clients);
        if let Some(built) = clients.get_mut(&key).and_then(|kept| pick(kept).clone()) {
            return built;
        }
        let built = build(self.shared.layer.layer(edge.connector()));
        // Kept only while the session still holds the name: its `Detached` event, which
        // drops the clients, is then yet to come (the registry publishes under its lock,
        // and the follower takes `clients` before removing).
        if is_current(&self.shared.registry, &key.0, key.1) {
            *pick(clients.entry(key).or_default()) = Some(built.clone());
        }
        built
    }

    /// How many sessions have a client now.
    #[must_use]
    pub fn len(&self) -> usize {
        lock(&self.shared.clients).len()
    }

    /// True if no session has a client now.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the follower if it is not running yet.
    fn follow(&self) {
        let mut follower = lock(&self.shared.follower);
        if follower.is_none() {
            // Subscribed before any client is kept, so no detach of a kept one is missed.
            let events = self.shared.registry.subscribe();
            *follower = Some(tokio::spawn(follow(Arc::downgrade(&self.shared), events)));
        }
    }
}

/// Drops the clients of detached sessions until the [`EdgeClients`] are gone.
async fn follow<B, L, C>(
    shared: Weak<Shared<B, L, C>>,
    mut events: broadcast::Receiver<RegistryEvent>,
) where
    L: Layer<Connector<C>>,
    C: Connection,
{
    loop {
        let event = events.recv().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match event {
            Ok(RegistryEvent::Detached { name, epoch, .. }) => {
                // Dropped outside the lock: dropping a client drops its pool.
                let dropped = lock(&shared.clients).remove(&(name, epoch));
                drop(dropped);
            }
            Ok(_) => {}
            // Missed events: keep only the sessions still registered.
            Err(RecvError::Lagged(_)) => lock(&shared.clients)
                .retain(|(name, epoch), _| is_current(&shared.registry, name, *epoch)),
            Err(RecvError::Closed) => return,
        }
    }
}

fn is_current<C: Connection>(registry: &Registry<C>, name: &str, epoch: Epoch) -> bool {
    registry.get(name).is_some_and(|edge| edge.epoch() == epoch)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one map operation: a poisoned map is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Settings for [`EdgeClients`]; made by [`EdgeClients::builder`].
pub struct EdgeClientsBuilder<L = Identity, C: Connection = DefaultConnection> {
    registry: Registry<C>,
    layer: L,
    builder: Builder,
    pool_builder: Http1PoolBuilder,
}

impl<L, C: Connection> fmt::Debug for EdgeClientsBuilder<L, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeClientsBuilder")
            .field("client", &self.builder)
            .field("pool", &self.pool_builder)
            .finish_non_exhaustive()
    }
}

impl<C: Connection> EdgeClientsBuilder<Identity, C> {
    fn new(registry: Registry<C>) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(DEFAULT_POOL_IDLE_TIMEOUT)
            .http1_max_buf_size(DEFAULT_READ_AHEAD);
        Self {
            registry,
            layer: Identity::new(),
            builder,
            pool_builder: Http1PoolBuilder::default(),
        }
    }
}

impl<L, C: Connection> EdgeClientsBuilder<L, C> {
    /// Wraps each session's [`Connector`] in `layer` (e.g. to count opens).
    #[must_use]
    pub fn layer<L2>(self, layer: L2) -> EdgeClientsBuilder<L2, C> {
        EdgeClientsBuilder {
            registry: self.registry,
            layer,
            builder: self.builder,
            pool_builder: self.pool_builder,
        }
    }

    /// Replaces hyper-util's client settings (pool, HTTP/2, read-ahead…).
    #[must_use]
    pub fn client_builder(mut self, builder: Builder) -> Self {
        self.builder = builder;
        self
    }

    /// Replaces the [`Http1Pool`] settings (idle timeout, read-ahead…).
    #[must_use]
    pub fn pool_builder(mut self, builder: Http1PoolBuilder) -> Self {
        self.pool_builder = builder;
        self
    }

    /// The clients, for request bodies of type `B`.
    #[must_use]
    pub fn build<B>(self) -> EdgeClients<B, L, C>
    where
        L: Layer<Connector<C>>,
    {
        EdgeClients {
            shared: Arc::new(Shared {
                registry: self.registry,
                layer: self.layer,
                builder: self.builder,
                pool_builder: self.pool_builder,
                clients: Mutex::new(HashMap::new()),
                follower: Mutex::new(None),
            }),
        }
    }
}
