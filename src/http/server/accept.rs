//! Accepting that backs off instead of spinning when the process runs out of resources.
//!
//! `accept` fails at once, again and again, while the process is out of file descriptors
//! or memory; retrying in a loop would burn a core and starve the connections that could
//! free them. So the wait doubles from 10 ms up to 1 s, and resets on success.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::Observer;

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A listener with the backoff of the [module docs](self).
pub(super) struct Acceptor {
    listener: TcpListener,
    backoff: Duration,
}

impl Acceptor {
    pub(super) fn new(listener: TcpListener) -> Self {
        Self {
            listener,
            backoff: FIRST_BACKOFF,
        }
    }

    pub(super) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection; errors are waited out, never returned.
    pub(super) async fn accept(&mut self, observer: &Arc<dyn Observer>) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = FIRST_BACKOFF;
                    return accepted;
                }
                Err(error) if is_exhaustion(&error) => {
                    if self.backoff == FIRST_BACKOFF {
                        warn!(%error, "cannot accept connections; backing off");
                    }
                    observer.accept_failed(&error, self.backoff);
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
                // The connection failed before we took it (reset, aborted): nothing to wait for.
                Err(error) => debug!(%error, "accept failed"),
            }
        }
    }
}

/// Out of file descriptors, buffers or memory: retrying at once would fail the same way.
fn is_exhaustion(error: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(
        error.raw_os_error(),
        Some(EMFILE | ENFILE | ENOBUFS | ENOMEM)
    )
}
