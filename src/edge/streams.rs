//! The tasks serving an edge's streams, as its serving loop keeps track of them. They are
//! started through a [`StreamSpawner`], by the session's control reader as it reads each
//! request (or by the loop, for requests it got through the events channel).
//!
//! The loop needs three things from them: to wait until they all ended (the graceful
//! shutdown's drain), to stop those left when the drain times out or the loop itself is
//! dropped, and a log line naming the service when a route panics. A `JoinSet` gives all
//! three, but it wakes the loop's task every time a stream ends, to hand over the result.
//! On an edge answering one request at a time that is a thread woken for nothing after
//! every stream (about one sleep per open in the open bench: 4.3–4.6 against 3.3–3.6
//! with plain spawns). Here a stream task counts itself in and out of a counter that
//! wakes no one until someone waits for the last; it ends early when the set's token is
//! cancelled; and it logs its own panic, since no one joins it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::error;

use crate::protocol::ServiceId;

/// The stream tasks of one serving loop. Dropping it stops those still running.
pub(super) struct StreamTasks {
    tasks: StreamSpawner,
    /// Cancels the tasks' token when the set goes: a serving loop dropped mid-way (an edge
    /// reconnecting) takes its streams with it.
    _stop_on_drop: DropGuard,
}

impl StreamTasks {
    pub(super) fn new() -> Self {
        let stop = CancellationToken::new();
        Self {
            _stop_on_drop: stop.clone().drop_guard(),
            tasks: StreamSpawner {
                running: Arc::default(),
                stop,
            },
        }
    }

    /// A handle that starts stream tasks counted in this set, for another task.
    pub(super) fn spawner(&self) -> StreamSpawner {
        self.tasks.clone()
    }

    /// How many streams are being served.
    pub(super) fn len(&self) -> usize {
        self.tasks.running.count.load(Ordering::SeqCst)
    }

    /// Resolves once every stream task ended; from then on, the last task to end wakes
    /// whoever waits here.
    pub(super) async fn drained(&self) {
        let running = &self.tasks.running;
        running.waited.store(true, Ordering::SeqCst);
        loop {
            let mut ended = pin!(running.ended.notified());
            // Registered before the count is read: an end in between is not missed.
            ended.as_mut().enable();
            if self.len() == 0 {
                return;
            }
            ended.await;
        }
    }

    /// Stops the streams still running (they end at their next step).
    pub(super) fn stop(&self) {
        self.tasks.stop.cancel();
    }
}

/// Drops the future it points to if dropped itself while a panic unwinds: the future's
/// streams then see `std::thread::panicking()` and count as abandoned.
struct DropOnUnwind<'a, F>(Pin<&'a mut Option<F>>);

impl<F> Drop for DropOnUnwind<'_, F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.set(None);
        }
    }
}

/// Starts stream tasks counted in a [`StreamTasks`] set, from wherever the set's owner
/// lets it (the session's control reader, for an open it takes straight away).
#[derive(Clone)]
pub(super) struct StreamSpawner {
    running: Arc<Running>,
    stop: CancellationToken,
}

impl StreamSpawner {
    /// Runs the future `make` returns on a task of its own, for `service`. `make` gets the
    /// token that stops the task, for the stream to know when it was abandoned. The future
    /// is made inside the task, so the task holds it once. If it panics, it is dropped
    /// while the panic unwinds, so that its streams see the panic and are reset rather
    /// than finished.
    pub(super) fn spawn<F, Fut>(&self, service: ServiceId, make: F)
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        let counted = Running::enter(&self.running);
        tokio::spawn(async move {
            let _counted = counted;
            let mut serving = pin!(Some(make(stop.clone())));
            let caught = std::future::poll_fn(|cx| {
                let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let mut unwinding = DropOnUnwind(serving.as_mut());
                    match unwinding.0.as_mut().as_pin_mut() {
                        Some(future) => future.poll(cx),
                        None => Poll::Ready(()),
                    }
                }));
                match polled {
                    Ok(Poll::Ready(())) => Poll::Ready(Ok(())),
                    Ok(Poll::Pending) => Poll::Pending,
                    Err(payload) => Poll::Ready(Err(payload)),
                }
            });
            let outcome = tokio::select! {
                biased;
                () = stop.cancelled() => Ok(()),
                outcome = caught => outcome,
            };
            if let Err(payload) = outcome {
                error!(
                    service = service.as_str(),
                    panic = %panic_message(payload.as_ref()),
                    "route panicked"
                );
            }
        });
    }
}

/// The stream tasks running, counted in and out.
#[derive(Default)]
struct Running {
    count: AtomicUsize,
    /// Someone waits (or waited) for the count to reach 0: only then does the last task
    /// to end wake anyone.
    waited: AtomicBool,
    ended: Notify,
}

impl Running {
    /// Counts a task in; the count goes down when the returned guard drops.
    fn enter(running: &Arc<Self>) -> Counted {
        running.count.fetch_add(1, Ordering::SeqCst);
        Counted(Arc::clone(running))
    }
}

/// One running task, counted out when dropped (also when its task is aborted or panics).
struct Counted(Arc<Running>);

impl Drop for Counted {
    fn drop(&mut self) {
        // Sequentially consistent with `drained`'s store and load: one of the two sides
        // always sees the other's write, so the last end is never missed.
        let left = self.0.count.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 && self.0.waited.load(Ordering::SeqCst) {
            self.0.ended.notify_waiters();
        }
    }
}

/// The message a panic was raised with, when it is a string.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|message| (*message).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
