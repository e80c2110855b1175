//! A thread per core, each with a runtime of its own, and each edge's work kept on one.
//!
//! A QUIC connection's state sits behind one lock that its driver task and every stream
//! operation take. On tokio's multi-thread runtime the driver, the edge's session tasks and
//! the public connections forwarding to the edge run wherever the scheduler puts them: with
//! several workers they queue on that lock and hand each other over between threads, and a
//! relay on two workers spent 1.8 × the CPU per proxied request it spent on one thread
//! (README, *Performance*). One thread is not an answer either: a relay with many edges has
//! cores to use.
//!
//! [`Shards`] runs `n` current-thread runtimes on `n` threads (the caller's thread is
//! shard 0, in [`Shards::block_on`]). The relay's building blocks place work on them so
//! that everything one edge needs runs on one thread:
//!
//! - [`Acceptor::with_shards`](crate::relay::Acceptor::with_shards) accepts each edge's
//!   QUIC connection on the shard with the fewest edges. quinn spawns a connection's driver
//!   on the runtime that accepts it, and the session spawns its tasks there too; the
//!   registry records the shard ([`EdgeHandle::shard`](crate::relay::EdgeHandle::shard)).
//! - [`Server::with_shards`](crate::http::server::Server::with_shards) serves each public
//!   connection on the shard of the edge its first request names (the `Host` of its first
//!   head, or the TLS server name), which a
//!   [`Placement`](crate::http::server::Placement) you give finds.
//! - [`TcpForward::with_shards`](crate::tcp::TcpForward::with_shards) serves each public
//!   TCP connection on its edge's shard.
//!
//! Edges spread over the shards, so the relay uses every core, while each request is
//! handled on the thread that drives its edge's connection. What does not belong to one
//! edge (the UDP socket's receive loop, the accept loops, timers of the relay's own) runs
//! on the shard that started it, shard 0 for a relay started in [`Shards::block_on`]; the
//! placement of edges does not weigh that work.
//!
//! A serving loop that runs on one shard and hands connections to others waits for them
//! all on a graceful shutdown; when its drain times out it aborts them, and an abort
//! reaches a task on another shard when that shard next runs, so the loop may return
//! while those tasks are still being dropped there.
//!
//! ```
//! use backhaul::shards::Shards;
//!
//! let shards = Shards::new(2)?;
//! let set = shards.set();
//! let answer = shards.block_on(async move {
//!     // Shard 0 is the calling thread; shard 1 has a thread of its own.
//!     assert_eq!(Shards::current().map(|shard| shard.index()), Some(0));
//!     let on_one = set.handle(1).spawn(async { Shards::current().map(|shard| shard.index()) });
//!     on_one.await.unwrap()
//! });
//! assert_eq!(answer, Some(1));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::runtime::{Handle, Runtime};
use tokio::sync::watch;

/// Tells one set of shards from another in the same process.
static NEXT_SET: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The shard this thread runs, while it runs one.
    static CURRENT: Cell<Option<Shard>> = const { Cell::new(None) };
    /// The set of that shard.
    static CURRENT_SET: RefCell<Option<ShardSet>> = const { RefCell::new(None) };
}

/// One shard of one [`Shards`]: which set, which thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    set: u64,
    index: usize,
}

impl Shard {
    /// Its place in its set, from 0.
    #[must_use]
    pub fn index(self) -> usize {
        self.index
    }
}

/// Marks the thread as running `shard` of `set` until dropped.
struct Running {
    before: Option<Shard>,
    before_set: Option<ShardSet>,
}

impl Running {
    fn enter(shard: Shard, set: ShardSet) -> Self {
        Self {
            before: CURRENT.with(|current| current.replace(Some(shard))),
            before_set: CURRENT_SET.with(|current| current.replace(Some(set))),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        CURRENT.with(|current| current.set(self.before));
        let before_set = self.before_set.take();
        CURRENT_SET.with(|current| *current.borrow_mut() = before_set);
    }
}

/// `n` current-thread runtimes on `n` threads; see the [module docs](self).
///
/// Dropping it stops the other threads' runtimes (their tasks are dropped) and joins them.
/// Drop it outside any runtime, as a tokio `Runtime`: inside async code the drop would
/// block a runtime's thread on the joins (tokio panics on dropping a runtime there).
pub struct Shards {
    first: Runtime,
    set: ShardSet,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Shards {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shards")
            .field("count", &self.set.len())
            .finish_non_exhaustive()
    }
}

impl Shards {
    /// Starts `count` shards (at least one): shard 0 runs in [`Shards::block_on`] on the
    /// calling thread, the others on threads named `shard-1`, `shard-2`….
    ///
    /// # Errors
    /// If a runtime or a thread cannot be made.
    pub fn new(count: usize) -> io::Result<Self> {
        let count = count.max(1);
        let set_id = NEXT_SET.fetch_add(1, Ordering::Relaxed);
        let build = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        };
        let first = build()?;
        let others = (1..count)
            .map(|_| build())
            .collect::<io::Result<Vec<_>>>()?;
        let handles = std::iter::once(&first)
            .chain(&others)
            .map(|runtime| runtime.handle().clone())
            .collect();
        let set = ShardSet {
            inner: Arc::new(SetInner {
                id: set_id,
                handles,
                edges: (0..count).map(|_| AtomicUsize::new(0)).collect(),
                next: AtomicUsize::new(0),
            }),
        };
        let (stop, stopped) = watch::channel(false);
        let mut threads = Vec::with_capacity(count - 1);
        for (runtime, index) in others.into_iter().zip(1..) {
            let mut stopped = stopped.clone();
            let shard = Shard { set: set_id, index };
            let set = set.clone();
            let thread = std::thread::Builder::new()
                .name(format!("shard-{index}"))
                .spawn(move || {
                    let _running = Running::enter(shard, set);
                    runtime.block_on(async move {
                        // Until `stop` says so, or the `Shards` is gone.
                        let _ = stopped.wait_for(|stop| *stop).await;
                    });
                })?;
            threads.push(thread);
        }
        Ok(Self {
            first,
            set,
            stop,
            threads,
        })
    }

    /// Runs `future` on shard 0, on the calling thread, driving shard 0's tasks meanwhile.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let shard = Shard {
            set: self.set.inner.id,
            index: 0,
        };
        let _running = Running::enter(shard, self.set.clone());
        self.first.block_on(future)
    }

    /// The handles to place work with; cheap to clone.
    #[must_use]
    pub fn set(&self) -> ShardSet {
        self.set.clone()
    }

    /// The shard the calling thread runs, if it runs one.
    #[must_use]
    pub fn current() -> Option<Shard> {
        CURRENT.with(Cell::get)
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

struct SetInner {
    id: u64,
    handles: Vec<Handle>,
    /// Edges placed on each shard and not gone yet.
    edges: Box<[AtomicUsize]>,
    /// The next shard for work no edge claims.
    next: AtomicUsize,
}

/// Where work can go: each shard's runtime handle, and how many edges each one holds.
/// Cheap to clone.
#[derive(Clone)]
pub struct ShardSet {
    inner: Arc<SetInner>,
}

impl fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardSet")
            .field("count", &self.len())
            .field("edges", &self.edge_counts())
            .finish()
    }
}

impl ShardSet {
    /// The set of the shard the calling thread runs, if it runs one: how code started
    /// on [`Shards`] finds where to place its work.
    #[must_use]
    pub fn current() -> Option<ShardSet> {
        CURRENT_SET.with(|current| current.borrow().clone())
    }

    /// How many shards.
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.handles.len()
    }

    /// Never: a set has at least one shard.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The runtime handle of shard `index`.
    ///
    /// # Panics
    /// If `index` is not below [`len`](Self::len).
    #[must_use]
    pub fn handle(&self, index: usize) -> &Handle {
        &self.inner.handles[index]
    }

    /// `shard`'s index, if it belongs to this set.
    #[must_use]
    pub fn index_of(&self, shard: Shard) -> Option<usize> {
        (shard.set == self.inner.id && shard.index < self.len()).then_some(shard.index)
    }

    /// The index in this set of the shard the calling thread runs, if it runs one of them.
    #[must_use]
    pub fn current_index(&self) -> Option<usize> {
        Shards::current().and_then(|shard| self.index_of(shard))
    }

    /// The shard after the last one this gave, in turn: for work no edge claims.
    #[must_use]
    pub fn next(&self) -> usize {
        self.inner.next.fetch_add(1, Ordering::Relaxed) % self.len()
    }

    /// The shard with the fewest edges, counted in until the returned guard drops.
    #[must_use]
    pub fn place_edge(&self) -> EdgePlace {
        let counts = &self.inner.edges;
        // Ties go round: without it, a burst would fill shard 0 before the counts move.
        let start = self.next();
        let index = (0..counts.len())
            .map(|offset| (start + offset) % counts.len())
            .min_by_key(|&index| counts[index].load(Ordering::Relaxed))
            .unwrap_or(0);
        counts[index].fetch_add(1, Ordering::Relaxed);
        EdgePlace {
            set: self.clone(),
            index,
        }
    }

    /// Edges placed on each shard now.
    #[must_use]
    pub fn edge_counts(&self) -> Vec<usize> {
        self.inner
            .edges
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect()
    }
}

/// An edge's place on a shard, from [`ShardSet::place_edge`]; counted until dropped.
#[derive(Debug)]
pub struct EdgePlace {
    set: ShardSet,
    index: usize,
}

impl EdgePlace {
    /// The shard's index.
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The shard's runtime handle.
    #[must_use]
    pub fn handle(&self) -> &Handle {
        self.set.handle(self.index)
    }
}

impl Drop for EdgePlace {
    fn drop(&mut self) {
        self.set.inner.edges[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `serve` with `tcp` on the runtime of `handle`: the socket leaves the calling
/// runtime's reactor and joins that one's, so its readiness is seen on that shard's
/// thread. The returned future ends with `serve`; dropping it aborts the task there.
#[cfg(any(feature = "http", feature = "tcp"))]
pub(crate) fn serve_tcp_on<F, Fut>(handle: &Handle, tcp: tokio::net::TcpStream, serve: F) -> Moved
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let task = match tcp.into_std() {
        Ok(socket) => handle.spawn(async move {
            match tokio::net::TcpStream::from_std(socket) {
                Ok(tcp) => serve(tcp).await,
                Err(error) => tracing::debug!(%error, "a moved connection was lost"),
            }
        }),
        Err(error) => {
            tracing::debug!(%error, "a connection could not be moved");
            handle.spawn(async {})
        }
    };
    Moved { task }
}

/// A connection served on another shard, from [`serve_tcp_on`].
#[cfg(any(feature = "http", feature = "tcp"))]
pub(crate) struct Moved {
    task: tokio::task::JoinHandle<()>,
}

#[cfg(any(feature = "http", feature = "tcp"))]
impl Future for Moved {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.task).poll(cx) {
            // A panic there is a panic here, for whoever watches this task.
            Poll::Ready(Err(error)) if error.is_panic() => {
                std::panic::resume_unwind(error.into_panic())
            }
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(any(feature = "http", feature = "tcp"))]
impl Drop for Moved {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests;
