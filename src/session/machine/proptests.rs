//! Random sequences of events against the machine's invariants: no input panics, the
//! peer's streams never exceed `max_concurrent_streams`, every data stream handed in comes
//! out exactly once (or is still held), and once the session ends every waiter was
//! completed exactly once and every table is empty.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::protocol::{
    Features, Hello, Metadata, OpenFlags, OpenRequest, OpenResponse, Ping, Pong, RejectCode,
    ServiceId,
};

/// A stand-in data stream: a unique number per stream handed in.
type Stream = u32;

const LIMITS: Limits = Limits {
    max_early_streams: 3,
    bind_timeout: Duration::from_secs(10),
    max_concurrent_streams: 4,
};

/// One input, with small ids so that collisions (reuse, duplicates, unknown ids) are common.
#[derive(Debug, Clone)]
enum Event {
    Open,
    /// Our open number `index` (modulo those started) gives up.
    AbandonOpen(usize),
    /// The peer answers request `request_id`, accepting as `id` (or rejecting with `None`).
    Respond {
        request_id: u64,
        id: Option<u64>,
    },
    /// A data stream whose `StreamBind` names `id`.
    Stream {
        id: u64,
    },
    UnboundStream,
    /// Time passes.
    Advance {
        millis: u64,
    },
    Expire,
    PeerRequest {
        request_id: u64,
    },
    Accept {
        request_id: u64,
        id: u64,
    },
    AcceptAllocated {
        request_id: u64,
    },
    Reject {
        request_id: u64,
    },
    Undeliverable {
        request_id: u64,
        full: bool,
    },
    Release {
        id: u64,
    },
    CloseStream {
        id: u64,
    },
    PeerStreamClose {
        id: u64,
    },
    Ping,
    AbandonPing(usize),
    Pong {
        sequence: u64,
    },
    PeerPing {
        sequence: u64,
    },
    Close,
    PeerClose,
    Hello,
    Terminate(u8),
}

fn any_event() -> impl Strategy<Value = Event> {
    let id = 0..8u64;
    prop_oneof![
        4 => Just(Event::Open),
        1 => any::<usize>().prop_map(Event::AbandonOpen),
        4 => (1..10u64, prop::option::weighted(0.8, id.clone()))
            .prop_map(|(request_id, id)| Event::Respond { request_id, id }),
        4 => id.clone().prop_map(|id| Event::Stream { id }),
        1 => Just(Event::UnboundStream),
        2 => (0..15_000u64).prop_map(|millis| Event::Advance { millis }),
        1 => Just(Event::Expire),
        3 => (1..8u64).prop_map(|request_id| Event::PeerRequest { request_id }),
        2 => (1..8u64, id.clone()).prop_map(|(request_id, id)| Event::Accept { request_id, id }),
        2 => (1..8u64).prop_map(|request_id| Event::AcceptAllocated { request_id }),
        1 => (1..8u64).prop_map(|request_id| Event::Reject { request_id }),
        1 => (1..8u64, any::<bool>())
            .prop_map(|(request_id, full)| Event::Undeliverable { request_id, full }),
        2 => id.clone().prop_map(|id| Event::Release { id }),
        1 => id.clone().prop_map(|id| Event::CloseStream { id }),
        1 => id.prop_map(|id| Event::PeerStreamClose { id }),
        1 => Just(Event::Ping),
        1 => any::<usize>().prop_map(Event::AbandonPing),
        1 => (1..5u64).prop_map(|sequence| Event::Pong { sequence }),
        1 => (1..5u64).prop_map(|sequence| Event::PeerPing { sequence }),
        1 => Just(Event::Close),
        1 => Just(Event::PeerClose),
        1 => Just(Event::Hello),
        1 => (0..3u8).prop_map(Event::Terminate),
    ]
}

/// Where the test believes one of our opens is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Answer,
    Stream,
    Done,
    Abandoned,
}

/// The machine under test and what its actions have said so far.
struct Harness {
    machine: SessionMachine<Stream>,
    now: Instant,
    next_stream: Stream,
    opens: Vec<(u64, Waiting)>,
    pings: Vec<(u64, Waiting)>,
    /// Streams handed in and not yet handed out.
    streams_in: HashSet<Stream>,
    ended: bool,
}

impl Harness {
    fn new() -> Self {
        Self {
            machine: SessionMachine::new(LIMITS),
            now: Instant::now(),
            next_stream: 0,
            opens: Vec::new(),
            pings: Vec::new(),
            streams_in: HashSet::new(),
            ended: false,
        }
    }

    fn new_stream(&mut self) -> Stream {
        self.next_stream += 1;
        self.streams_in.insert(self.next_stream);
        self.next_stream
    }

    fn run(&mut self, event: Event) -> Result<(), TestCaseError> {
        let mut out = Actions::new();
        let m = &mut self.machine;
        match event {
            Event::Open => {
                let opened = m.open(
                    ServiceId::new("s"),
                    Metadata::Empty,
                    OpenFlags::empty(),
                    &mut out,
                );
                match opened {
                    Ok(request_id) => {
                        prop_assert!(!self.ended, "an open registered after the end");
                        self.opens.push((request_id, Waiting::Answer));
                    }
                    Err(_) => prop_assert!(out.is_empty()),
                }
            }
            Event::AbandonOpen(index) => {
                if !self.opens.is_empty() {
                    let index = index % self.opens.len();
                    let (request_id, waiting) = &mut self.opens[index];
                    m.abandon_open(*request_id);
                    if matches!(waiting, Waiting::Answer | Waiting::Stream) {
                        *waiting = Waiting::Abandoned;
                    }
                }
            }
            Event::Respond { request_id, id } => {
                let response = match id {
                    Some(id) => OpenResponse::accepted(request_id, id),
                    None => OpenResponse::rejected(request_id, RejectCode::InternalError, None),
                };
                prop_assert!(m
                    .handle_message(ProtocolMessage::OpenResponse(response), &mut out)
                    .is_ok());
            }
            Event::Stream { id } => {
                let stream = self.new_stream();
                self.machine.handle_stream(id, stream, self.now, &mut out);
            }
            Event::UnboundStream => {
                let stream = self.new_stream();
                self.machine.refuse_unbound_stream(stream, &mut out);
            }
            Event::Advance { millis } => self.now += Duration::from_millis(millis),
            Event::Expire => {
                m.handle_timeout(self.now, &mut out);
                if let Some(next) = m.next_timeout() {
                    prop_assert!(next > self.now, "an expired stream is still held");
                }
            }
            Event::PeerRequest { request_id } => {
                let request = OpenRequest::new(request_id, "s");
                prop_assert!(m
                    .handle_message(ProtocolMessage::OpenRequest(request), &mut out)
                    .is_ok());
            }
            Event::Accept { request_id, id } => {
                let _ = m.accept_open(request_id, id, &mut out);
            }
            Event::AcceptAllocated { request_id } => {
                let id = m.allocate_stream_id();
                prop_assert!(id != 0);
                let _ = m.accept_open(request_id, id, &mut out);
            }
            Event::Reject { request_id } => {
                let _ = m.reject_open(request_id, RejectCode::Unauthorized, None, &mut out);
            }
            Event::Undeliverable { request_id, full } => {
                let why = if full {
                    Undeliverable::Full
                } else {
                    Undeliverable::NoReceiver
                };
                m.request_undeliverable(request_id, why, &mut out);
            }
            Event::Release { id } => m.release_stream(id),
            Event::CloseStream { id } => m.close_stream(id, CloseCode::Normal, None, &mut out),
            Event::PeerStreamClose { id } if id != 0 => {
                let close = StreamClose {
                    logical_stream_id: id,
                    code: CloseCode::Normal,
                    reason: None,
                };
                prop_assert!(m
                    .handle_message(ProtocolMessage::StreamClose(close), &mut out)
                    .is_ok());
            }
            Event::PeerStreamClose { .. } => {}
            Event::Ping => {
                if let Ok(sequence) = m.ping(&mut out) {
                    prop_assert!(!self.ended, "a ping registered after the end");
                    self.pings.push((sequence, Waiting::Answer));
                }
            }
            Event::AbandonPing(index) => {
                if !self.pings.is_empty() {
                    let index = index % self.pings.len();
                    let (sequence, waiting) = &mut self.pings[index];
                    m.abandon_ping(*sequence);
                    if *waiting == Waiting::Answer {
                        *waiting = Waiting::Abandoned;
                    }
                }
            }
            Event::Pong { sequence } => {
                let pong = ProtocolMessage::Pong(Pong { sequence });
                prop_assert!(m.handle_message(pong, &mut out).is_ok());
            }
            Event::PeerPing { sequence } => {
                let ping = ProtocolMessage::Ping(Ping { sequence });
                prop_assert!(m.handle_message(ping, &mut out).is_ok());
            }
            Event::Close => {
                let closing = m.close(CloseCode::Normal, None, &mut out);
                prop_assert_eq!(closing, !self.ended);
            }
            Event::PeerClose => {
                let close = StreamClose {
                    logical_stream_id: 0,
                    code: CloseCode::Normal,
                    reason: None,
                };
                prop_assert!(m
                    .handle_message(ProtocolMessage::StreamClose(close), &mut out)
                    .is_ok());
            }
            Event::Hello => {
                let hello = ProtocolMessage::Hello(Hello::new(Features::empty()));
                prop_assert!(m.handle_message(hello, &mut out).is_err());
            }
            Event::Terminate(kind) => {
                let reason = match kind {
                    0 => Terminal::Closed,
                    1 => Terminal::Disconnected,
                    _ => Terminal::KeepaliveTimeout,
                };
                m.terminate(reason, &mut out);
            }
        }
        self.check(out)
    }

    /// Applies `actions` to what the test knows, and checks the invariants.
    fn check(&mut self, actions: Actions<Stream>) -> Result<(), TestCaseError> {
        let opens: HashMap<u64, usize> = self
            .opens
            .iter()
            .enumerate()
            .map(|(index, (id, _))| (*id, index))
            .collect();
        for action in actions {
            match action {
                Action::AnswerOpen { request_id, answer } => {
                    let index = opens[&request_id];
                    let waiting = &mut self.opens[index].1;
                    prop_assert_eq!(
                        *waiting,
                        Waiting::Answer,
                        "open {} answered twice",
                        request_id
                    );
                    *waiting = match answer {
                        Ok(OpenAnswer::Accepted { .. }) => Waiting::Stream,
                        Ok(OpenAnswer::Bound { stream, .. }) => {
                            prop_assert!(self.streams_in.remove(&stream));
                            Waiting::Done
                        }
                        Ok(OpenAnswer::Rejected { .. }) | Err(_) => Waiting::Done,
                    };
                }
                Action::BindOpen { request_id, stream } => {
                    let index = opens[&request_id];
                    let waiting = &mut self.opens[index].1;
                    prop_assert_eq!(
                        *waiting,
                        Waiting::Stream,
                        "open {} bound unasked",
                        request_id
                    );
                    *waiting = Waiting::Done;
                    if let Ok(stream) = stream {
                        prop_assert!(self.streams_in.remove(&stream));
                    }
                }
                Action::AnswerPing { sequence, .. } => {
                    let ping = self.pings.iter_mut().find(|(s, _)| *s == sequence);
                    let Some((_, waiting)) = ping else {
                        return Err(TestCaseError::fail(format!("unknown ping {sequence}")));
                    };
                    prop_assert_eq!(
                        *waiting,
                        Waiting::Answer,
                        "ping {} answered twice",
                        sequence
                    );
                    *waiting = Waiting::Done;
                }
                Action::Refuse { stream, .. } => {
                    prop_assert!(
                        self.streams_in.remove(&stream),
                        "stream {} out twice",
                        stream
                    );
                }
                Action::Ended(_) => {
                    prop_assert!(!self.ended, "ended twice");
                    self.ended = true;
                }
                Action::Send(_) | Action::Deliver(_) | Action::Observe(_) | Action::Closing => {}
            }
        }
        let stats = self.machine.stats();
        prop_assert!(stats.active_streams <= LIMITS.max_concurrent_streams);
        prop_assert!(stats.early_streams <= LIMITS.max_early_streams);
        prop_assert_eq!(
            stats.early_streams,
            self.streams_in.len(),
            "a stream went missing"
        );
        let waiting = self
            .opens
            .iter()
            .filter(|(_, w)| matches!(w, Waiting::Answer | Waiting::Stream))
            .count();
        prop_assert_eq!(stats.pending_opens, waiting);
        if self.ended {
            prop_assert!(self.machine.terminal().is_some());
            prop_assert_eq!(waiting, 0, "an open outlived the session");
            prop_assert!(self.pings.iter().all(|(_, w)| *w != Waiting::Answer));
            prop_assert_eq!(stats.active_streams, 0);
            prop_assert_eq!(stats.early_streams, 0);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn random_events_keep_every_invariant(events in prop::collection::vec(any_event(), 0..80)) {
        let mut harness = Harness::new();
        for event in events {
            harness.run(event)?;
        }
        // However it got here, ending the session settles every waiter and stream.
        let mut out = Actions::new();
        harness.machine.terminate(Terminal::Disconnected, &mut out);
        harness.check(out)?;
        prop_assert!(harness.ended);
        prop_assert!(harness.streams_in.is_empty());
    }
}
