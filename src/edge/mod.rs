//! The edge side: answer the relay's open requests with tower services.
//!
//! A [`Router`] maps service names to `tower::Service<TunnelStream>`s. [`Router::serve`]
//! drives an edge session's events: for each `OpenRequest` it picks the route, checks that
//! the route is ready *without waiting* (a full concurrency limit is answered at once with
//! `LimitExceeded`, never queued), allocates a logical stream id, accepts, opens and binds
//! the data stream, and calls the route on a task of its own. Unknown services are
//! rejected with `UnsupportedService` unless a fallback route is set.
//!
//! Serving ends when the session ends or, with
//! [`Serve::with_graceful_shutdown`], when the signal fires: new requests are then
//! rejected with `ServiceUnavailable` while in-flight streams get up to
//! [`Serve::with_drain_timeout`] to finish (HTTP routes are told to stop keep-alive).

mod router;
mod serve;

pub use router::{RouteError, Router};
pub use serve::{Serve, ServeFuture, DEFAULT_DRAIN_TIMEOUT};
