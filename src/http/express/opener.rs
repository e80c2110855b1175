//! What opens the streams of an [`Upstream`](super::Upstream): the session of an edge
//! attached to this relay, or a peer relay's, for an edge attached there.

use tower::ServiceExt;

use crate::connector::{Connector, OpenTarget};
use crate::error::Error;
#[cfg(feature = "quinn")]
use crate::relay::peer::PeerConnector;
use crate::stream::TunnelStream;

/// Opens an upstream's streams: a [`Connector`] over an edge's session, or a
/// [`PeerConnector`] to an edge behind another relay of a cluster (whose streams the
/// far relay splices to its edge untouched, so the lane's request reaches the edge as
/// written). Made with `From`/`Into` from either.
#[derive(Clone, Debug)]
pub struct Opener(Opens);

#[derive(Clone, Debug)]
enum Opens {
    Session(Connector),
    /// Boxed: a cluster's way is the rare one, and every upstream moves an `Opener`.
    #[cfg(feature = "quinn")]
    Peer(Box<PeerConnector>),
}

impl From<Connector> for Opener {
    fn from(connector: Connector) -> Self {
        Self(Opens::Session(connector))
    }
}

#[cfg(feature = "quinn")]
impl From<PeerConnector> for Opener {
    fn from(connector: PeerConnector) -> Self {
        Self(Opens::Peer(Box::new(connector)))
    }
}

impl Opener {
    /// Waits for a free open slot, then opens a stream to `target`.
    pub(super) async fn open(&mut self, target: OpenTarget) -> Result<TunnelStream, Error> {
        match &mut self.0 {
            Opens::Session(connector) => connector.connect(target).await,
            #[cfg(feature = "quinn")]
            Opens::Peer(connector) => PeerConnector::clone(connector).oneshot(target).await,
        }
    }
}
