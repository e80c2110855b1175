//! Pings: ours waiting for their pong, and the peer's, answered at once.

use super::{Action, Actions, SessionMachine};
use crate::error::Error;
use crate::protocol::{Ping, Pong, ProtocolMessage};
use crate::session::events::{ClientEvent, ControlEvent};

impl<S> SessionMachine<S> {
    /// Registers a ping and pushes it. The driver waits for [`Action::AnswerPing`] with
    /// the returned sequence (and times the round trip itself).
    ///
    /// # Errors
    /// The session's end error once it ended, [`Error::SessionClosed`] while closing.
    pub(crate) fn ping(&mut self, out: &mut Actions<S>) -> Result<u64, Error> {
        self.ensure_open()?;
        let sequence = self.next_ping_sequence;
        self.next_ping_sequence += 1;
        self.pending_pings.insert(sequence);
        out.push(Action::Send(ProtocolMessage::Ping(Ping { sequence })));
        Ok(sequence)
    }

    /// Forgets ping `sequence`, which gave up: no action for it follows.
    pub(crate) fn abandon_ping(&mut self, sequence: u64) {
        self.pending_pings.remove(&sequence);
    }

    /// Answers the peer's ping.
    pub(super) fn on_ping(&mut self, ping: Ping, out: &mut Actions<S>) {
        out.push(Action::Observe(ControlEvent::Ping {
            sequence: ping.sequence,
        }));
        out.push(Action::Send(ProtocolMessage::Pong(Pong {
            sequence: ping.sequence,
        })));
        out.push(Action::Deliver(ClientEvent::PingReceived {
            sequence: ping.sequence,
        }));
    }

    /// Completes the ping the peer answered; a pong for no pending ping is ignored.
    pub(super) fn on_pong(&mut self, pong: Pong, out: &mut Actions<S>) {
        out.push(Action::Observe(ControlEvent::Pong {
            sequence: pong.sequence,
        }));
        if self.pending_pings.remove(&pong.sequence) {
            out.push(Action::AnswerPing {
                sequence: pong.sequence,
                result: Ok(()),
            });
        }
    }
}
