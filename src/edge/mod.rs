//! The edge side: answer the relay's open requests with tower services, and stay
//! connected.
//!
//! A [`Router`] maps service names to `tower::Service<TunnelStream>`s. [`Router::serve`]
//! drives an edge session's events: for each `OpenRequest` it picks the route, checks that
//! the route is ready *without waiting* (a full concurrency limit is answered at once with
//! `LimitExceeded`, never queued), allocates a logical stream id, accepts, opens and binds
//! the data stream, and calls the route on a task of its own. Unknown services are
//! rejected with `UnsupportedService` unless a fallback route is set. While it serves, the
//! choice of route and the spawn happen in the session's control reader, as it reads the
//! request (the session holds the `Router`'s handler for that): an open then crosses one
//! task less on its way to the route.
//!
//! A stream whose route panics, or that is still running when the drain times out, is
//! reset rather than finished (see [`TunnelStream`](crate::stream::TunnelStream)), and the
//! relay is told (`StreamClose` with `Reset`), so a cut response never passes for a whole
//! one.
//!
//! Serving ends when the session ends or, with
//! [`Serve::with_graceful_shutdown`], when the signal fires: the session is closed first
//! (the relay stops routing here), in-flight streams then get up to
//! [`Serve::with_drain_timeout`] to finish (HTTP routes are told to stop keep-alive), and
//! the relay is left to close the connection.
//!
//! A session is one connection's life; an edge outlives many. [`Edge`] is the loop every
//! edge needs around them: dial a relay, negotiate, register, serve a `Router`, and on a
//! lost relay reconnect with [`Backoff`], telling the failures an operator must fix
//! (an untrusted certificate, refused credentials) from those that pass by themselves.

mod backoff;
mod lanes;
mod reconnect;
mod router;
mod serve;
mod streams;

pub use backoff::{Backoff, DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX};
pub use reconnect::{
    Edge, EdgeBuilder, EdgeFuture, EdgeState, RegisterError, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STABLE_AFTER,
};
pub use router::{RouteError, Router};
pub use serve::{Serve, ServeFuture, DEFAULT_CLOSE_TIMEOUT, DEFAULT_DRAIN_TIMEOUT};
