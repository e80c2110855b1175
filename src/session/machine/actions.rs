//! What the machine asks its driver to do: [`Action`]s, collected in [`Actions`].
//!
//! Nearly every input yields one to three actions, so a [`Batch`] keeps the first few
//! inline and only a session's end or an expiry sweep (one action per waiter or held
//! stream) spills to the heap: feeding the machine costs no allocation on the open path.

use crate::error::Error;
use crate::protocol::{ProtocolMessage, RejectCode};
use crate::session::events::{ClientEvent, ControlEvent};

use super::Terminal;

/// Actions kept without allocating.
const INLINE_ACTIONS: usize = 4;

/// One thing the driver must do, in the order the machine pushed it.
///
/// `S` is the driver's data stream; the machine only stores and hands it back.
#[derive(Debug)]
pub(crate) enum Action<S> {
    /// Write this message on the control stream.
    Send(ProtocolMessage),
    /// Complete open `request_id`'s wait for its `OpenResponse`.
    AnswerOpen {
        request_id: u64,
        answer: Result<OpenAnswer<S>, Error>,
    },
    /// Complete open `request_id`'s wait for its data stream (it was answered
    /// [`OpenAnswer::Accepted`] before).
    BindOpen {
        request_id: u64,
        stream: Result<S, Error>,
    },
    /// Complete ping `sequence`.
    AnswerPing {
        sequence: u64,
        result: Result<(), Error>,
    },
    /// Reset this data stream: nobody will use it.
    Refuse {
        stream: S,
        logical_stream_id: Option<u64>,
        why: Refusal,
    },
    /// Hand this event to the application's receiver. An undeliverable
    /// [`ClientEvent::OpenRequest`] must be reported with
    /// [`request_undeliverable`](super::SessionMachine::request_undeliverable).
    Deliver(ClientEvent),
    /// Tell observers of the control stream.
    Observe(ControlEvent),
    /// A graceful close started: no new opens.
    Closing,
    /// The session ended; pushed once, before the waiters it fails.
    Ended(Terminal),
}

/// The peer's answer to one of our opens.
#[derive(Debug)]
pub(crate) enum OpenAnswer<S> {
    /// Accepted, and the data stream had already arrived.
    Bound { logical_stream_id: u64, stream: S },
    /// Accepted; a [`Action::BindOpen`] for the same request follows.
    Accepted { logical_stream_id: u64 },
    /// Refused.
    Rejected {
        code: RejectCode,
        reason: Option<String>,
    },
}

/// Why a data stream is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its `StreamBind` header was missing, malformed or too slow.
    BadHeader,
    /// Its id was bound or abandoned before.
    Retired,
    /// Another held stream claims the same id.
    Duplicate,
    /// Too many streams wait for their `OpenResponse` already.
    HoldFull,
    /// No open claimed it within the bind timeout.
    Expired,
    /// Its open was abandoned before its `OpenResponse` came.
    Abandoned,
    /// Its open gave up just as the stream was handed over.
    Undeliverable,
    /// The session ended.
    SessionEnded,
}

impl Refusal {
    /// For logs.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::BadHeader => "no valid StreamBind",
            Self::Retired => "logical stream id already bound or abandoned",
            Self::Duplicate => "two data streams claim one logical stream id",
            Self::HoldFull => "too many data streams waiting for their OpenResponse",
            Self::Expired => "no open claimed this data stream in time",
            Self::Abandoned => "its open was abandoned",
            Self::Undeliverable => "its open gave up",
            Self::SessionEnded => "the session ended",
        }
    }

    /// Whether the peer did something worth a warning. The others are ordinary races or
    /// the session's end, and a bad header is logged with its cause where it was read.
    pub(crate) const fn warrants_warning(self) -> bool {
        matches!(
            self,
            Self::Retired | Self::Duplicate | Self::HoldFull | Self::Expired
        )
    }
}

/// The actions of one or more inputs, in order.
pub(crate) type Actions<S> = Batch<Action<S>>;

/// A few items in order, kept inline until there are more than a few.
pub(crate) struct Batch<T> {
    inline: [Option<T>; INLINE_ACTIONS],
    len: usize,
    spilled: Vec<T>,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Batch<T> {
    /// Empty.
    pub(crate) const fn new() -> Self {
        Self {
            inline: [const { None }; INLINE_ACTIONS],
            len: 0,
            spilled: Vec::new(),
        }
    }

    /// Appends `item`.
    pub(crate) fn push(&mut self, item: T) {
        if self.len < INLINE_ACTIONS {
            self.inline[self.len] = Some(item);
        } else {
            self.spilled.push(item);
        }
        self.len += 1;
    }

    /// True without items.
    pub(crate) const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> IntoIterator for Batch<T> {
    type Item = T;
    type IntoIter = IntoIter<T>;

    fn into_iter(self) -> IntoIter<T> {
        IntoIter {
            inline: self.inline,
            next: 0,
            spilled: self.spilled.into_iter(),
        }
    }
}

/// The items of a [`Batch`], first pushed first.
pub(crate) struct IntoIter<T> {
    inline: [Option<T>; INLINE_ACTIONS],
    next: usize,
    spilled: std::vec::IntoIter<T>,
}

impl<T> Iterator for IntoIter<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        while self.next < INLINE_ACTIONS {
            let slot = self.inline[self.next].take();
            self.next += 1;
            if slot.is_some() {
                return slot;
            }
        }
        self.spilled.next()
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Batch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.inline.iter().flatten())
            .entries(&self.spilled)
            .finish()
    }
}
