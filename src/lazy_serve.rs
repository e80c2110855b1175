//! The future behind every `serve()` that takes an optional graceful-shutdown signal
//! (`ServeEdges`, `ServePeers`, `ServeTcp`): nothing runs until the first poll, so
//! `with_graceful_shutdown` can still be chained on the value `serve()` returned.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A graceful-shutdown signal, boxed.
pub(crate) type Signal = Pin<Box<dyn Future<Output = ()> + Send>>;
type Running = Pin<Box<dyn Future<Output = ()> + Send>>;
type Start = Box<dyn FnOnce(Signal) -> Running + Send>;

/// A serving loop started on first poll with the signal set by then (or one that never
/// fires).
pub(crate) struct LazyServe {
    start: Option<Start>,
    shutdown: Option<Signal>,
    running: Option<Running>,
}

impl LazyServe {
    /// `start` builds the loop from its shutdown signal.
    pub(crate) fn new<F, Fut>(start: F) -> Self
    where
        F: FnOnce(Signal) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            start: Some(Box::new(move |signal| Box::pin(start(signal)))),
            shutdown: None,
            running: None,
        }
    }

    /// Sets the shutdown signal; effective if set before the first poll.
    pub(crate) fn set_shutdown<F>(&mut self, signal: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shutdown = Some(Box::pin(signal));
    }

    /// Whether the loop has started.
    pub(crate) fn is_started(&self) -> bool {
        self.running.is_some()
    }

    /// Starts the loop if needed and polls it.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(start) = self.start.take() {
            let shutdown = self
                .shutdown
                .take()
                .unwrap_or_else(|| Box::pin(std::future::pending()));
            self.running = Some(start(shutdown));
        }
        match &mut self.running {
            Some(running) => running.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}
