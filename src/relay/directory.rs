//! Where is edge X? The lookup callers route through, behind a trait.
//!
//! A single relay knows its edges from its own [`Registry`]. Several relays behind one
//! domain need a shared directory (Redis, say): an edge connected to another relay is
//! "elsewhere", and the caller forwards there instead of answering 502. Callers written
//! against [`Directory`] work with either, unchanged.
//!
//! The lookup is asynchronous because a shared directory is a network round trip; its
//! future is an associated type, so the in-process lookup stays a ready value with no
//! allocation. A shared directory typically wraps the local [`Registry`] (answering
//! [`Location::Local`] for its own edges) and mirrors it outwards by following
//! [`Registry::subscribe`].

use std::fmt;
use std::future::{ready, Future, Ready};

use super::registry::{EdgeHandle, Registry};
use crate::error::Error;
use crate::transport::Connection;
use crate::transport::QuinnConnection;

/// Another relay, as a shared directory names it (an address, a node id…).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId(String);

impl RelayId {
    /// A relay's id.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an edge is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Location<C: Connection = QuinnConnection> {
    /// Connected to this relay: open streams through the handle's connector.
    Local(EdgeHandle<C>),
    /// Connected to another relay.
    Elsewhere(RelayId),
    /// Not connected anywhere the directory knows of.
    Unknown,
}

impl<C: Connection> Location<C> {
    /// The local edge, if it is one.
    #[must_use]
    pub fn local(self) -> Option<EdgeHandle<C>> {
        match self {
            Self::Local(edge) => Some(edge),
            _ => None,
        }
    }
}

/// Finds edges by name; see the [module docs](self).
///
/// Code that routes to edges takes any `Directory`:
/// ```
/// use backhaul::relay::{Directory, Location};
/// use backhaul::stream::TunnelStream;
///
/// async fn open_web<D: Directory>(directory: &D, edge: &str) -> Option<TunnelStream<backhaul::QuinnConnection>> {
///     match directory.locate(edge).await.ok()? {
///         Location::Local(edge) => edge.connector().connect("web").await.ok(),
///         Location::Elsewhere(relay) => {
///             println!("forward to {relay}");
///             None
///         }
///         _ => None,
///     }
/// }
/// ```
pub trait Directory<C: Connection = QuinnConnection> {
    /// The lookup's future.
    type Future: Future<Output = Result<Location<C>, Error>> + Send;

    /// Where the edge called `edge` is.
    ///
    /// # Errors
    /// Whatever keeps the directory from answering (a shared store unreachable:
    /// [`Error::Transport`], [`Error::Timeout`]); an unknown edge is not an error.
    fn locate(&self, edge: &str) -> Self::Future;
}

/// The in-process directory: this relay's edges, nothing elsewhere.
impl<C: Connection> Directory<C> for Registry<C> {
    type Future = Ready<Result<Location<C>, Error>>;

    fn locate(&self, edge: &str) -> Self::Future {
        ready(Ok(self
            .get(edge)
            .map_or(Location::Unknown, Location::Local)))
    }
}

impl<C: Connection, D: Directory<C> + ?Sized> Directory<C> for std::sync::Arc<D> {
    type Future = D::Future;

    fn locate(&self, edge: &str) -> Self::Future {
        (**self).locate(edge)
    }
}
