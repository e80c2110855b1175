//! The machine's rules, one per test: events in, actions out, no runtime and no clock.
//! Data streams are plain numbers here, standing for the driver's stream halves.

use std::time::{Duration, Instant};

use super::*;
use crate::protocol::{
    Features, Hello, Metadata, OpenFlags, OpenRequest, OpenResponse, OpenStatus, Ping, Pong,
    RejectCode, ServiceId,
};

/// A stand-in data stream.
type Stream = u32;

const BIND_TIMEOUT: Duration = Duration::from_secs(10);

fn limits() -> Limits {
    Limits {
        max_early_streams: 4,
        bind_timeout: BIND_TIMEOUT,
        max_concurrent_streams: 3,
    }
}

fn machine() -> SessionMachine<Stream> {
    SessionMachine::new(limits())
}

/// Runs `input` and returns what it pushed.
fn step<R>(
    machine: &mut SessionMachine<Stream>,
    input: impl FnOnce(&mut SessionMachine<Stream>, &mut Actions<Stream>) -> R,
) -> (R, Vec<Action<Stream>>) {
    let mut out = Actions::new();
    let result = input(machine, &mut out);
    (result, out.into_iter().collect())
}

fn open(machine: &mut SessionMachine<Stream>) -> u64 {
    let (request_id, actions) = step(machine, |m, out| {
        m.open(
            ServiceId::new("web"),
            Metadata::Empty,
            OpenFlags::empty(),
            out,
        )
    });
    let request_id = request_id.expect("open on a live session");
    assert!(matches!(
        actions.as_slice(),
        [Action::Send(ProtocolMessage::OpenRequest(r))] if r.request_id == request_id
    ));
    request_id
}

fn message(machine: &mut SessionMachine<Stream>, message: ProtocolMessage) -> Vec<Action<Stream>> {
    let (handled, actions) = step(machine, |m, out| m.handle_message(message, out));
    assert!(handled.is_ok());
    actions
}

/// The actions of a peer's answer, without the observer's copy.
fn respond(machine: &mut SessionMachine<Stream>, response: OpenResponse) -> Vec<Action<Stream>> {
    let mut actions = message(machine, ProtocolMessage::OpenResponse(response));
    assert!(matches!(
        actions.remove(0),
        Action::Observe(ControlEvent::OpenResponseReceived { .. })
    ));
    actions
}

fn stream(
    machine: &mut SessionMachine<Stream>,
    logical_stream_id: u64,
    stream: Stream,
    now: Instant,
) -> Vec<Action<Stream>> {
    step(machine, |m, out| {
        m.handle_stream(logical_stream_id, stream, now, out);
    })
    .1
}

fn refused(actions: &[Action<Stream>]) -> Vec<(Stream, Refusal)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Refuse { stream, why, .. } => Some((*stream, *why)),
            _ => None,
        })
        .collect()
}

/// The peer's request `request_id`, with the observer's copy checked and removed.
fn request(machine: &mut SessionMachine<Stream>, request_id: u64) -> Vec<Action<Stream>> {
    let request = OpenRequest::new(request_id, "echo");
    let mut actions = message(machine, ProtocolMessage::OpenRequest(request));
    assert!(matches!(
        actions.remove(0),
        Action::Observe(ControlEvent::OpenRequest { .. })
    ));
    actions
}

fn rejection(actions: &[Action<Stream>]) -> Option<(u64, RejectCode)> {
    actions.iter().find_map(|action| match action {
        Action::Send(ProtocolMessage::OpenResponse(OpenResponse {
            request_id,
            status: OpenStatus::Rejected(code),
            ..
        })) => Some((*request_id, *code)),
        _ => None,
    })
}

// ----- opener side ---------------------------------------------------------------------

#[test]
fn accepted_open_then_its_stream_completes_both_waits() {
    let mut m = machine();
    let now = Instant::now();
    let request_id = open(&mut m);
    assert_eq!(m.stats().pending_opens, 1);
    let actions = respond(&mut m, OpenResponse::accepted(request_id, 7));
    assert!(matches!(
        actions.as_slice(),
        [Action::AnswerOpen { request_id: r, answer: Ok(OpenAnswer::Accepted { logical_stream_id: 7 }) }]
            if *r == request_id
    ));
    let actions = stream(&mut m, 7, 70, now);
    assert!(matches!(
        actions.as_slice(),
        [Action::BindOpen { request_id: r, stream: Ok(70) }] if *r == request_id
    ));
    assert_eq!(m.stats(), SessionStats::default());
}

#[test]
fn a_stream_that_overtakes_its_response_is_held_then_handed_to_its_open() {
    let mut m = machine();
    let request_id = open(&mut m);
    assert!(stream(&mut m, 7, 70, Instant::now()).is_empty());
    assert_eq!(m.stats().early_streams, 1);
    let actions = respond(&mut m, OpenResponse::accepted(request_id, 7));
    assert!(matches!(
        actions.as_slice(),
        [Action::AnswerOpen {
            answer: Ok(OpenAnswer::Bound {
                logical_stream_id: 7,
                stream: 70
            }),
            ..
        }]
    ));
    assert_eq!(m.stats(), SessionStats::default());
}

#[test]
fn streams_reach_their_own_open_even_in_reverse_order() {
    let mut m = machine();
    let now = Instant::now();
    let first = open(&mut m);
    let second = open(&mut m);
    respond(&mut m, OpenResponse::accepted(first, 1));
    respond(&mut m, OpenResponse::accepted(second, 2));
    let to_second = stream(&mut m, 2, 20, now);
    let to_first = stream(&mut m, 1, 10, now);
    assert!(matches!(
        to_second.as_slice(),
        [Action::BindOpen { request_id, stream: Ok(20) }] if *request_id == second
    ));
    assert!(matches!(
        to_first.as_slice(),
        [Action::BindOpen { request_id, stream: Ok(10) }] if *request_id == first
    ));
}

#[test]
fn a_rejection_reaches_its_open_with_code_and_reason() {
    let mut m = machine();
    let request_id = open(&mut m);
    let response = OpenResponse::rejected(
        request_id,
        RejectCode::UnsupportedService,
        Some("no".into()),
    );
    let actions = respond(&mut m, response);
    assert!(matches!(
        actions.as_slice(),
        [Action::AnswerOpen {
            answer: Ok(OpenAnswer::Rejected { code: RejectCode::UnsupportedService, reason: Some(reason) }),
            ..
        }] if reason == "no"
    ));
    assert_eq!(m.stats().pending_opens, 0);
}

#[test]
fn an_acceptance_without_a_usable_id_fails_that_open_only() {
    for id in [None, Some(0)] {
        let mut m = machine();
        let request_id = open(&mut m);
        let response = OpenResponse {
            request_id,
            status: OpenStatus::Accepted,
            reason: None,
            logical_stream_id: id,
        };
        let actions = respond(&mut m, response);
        assert!(matches!(
            actions.as_slice(),
            [Action::AnswerOpen {
                answer: Err(Error::ProtocolViolation(_)),
                ..
            }]
        ));
        assert!(m.terminal().is_none(), "the session goes on");
        assert_eq!(m.stats().pending_opens, 0);
    }
}

#[test]
fn an_acceptance_reusing_a_waiting_or_bound_id_is_a_violation() {
    let mut m = machine();
    let now = Instant::now();
    let waiting = open(&mut m);
    respond(&mut m, OpenResponse::accepted(waiting, 5));
    let reusing_waiting = open(&mut m);
    let actions = respond(&mut m, OpenResponse::accepted(reusing_waiting, 5));
    assert!(matches!(
        actions.as_slice(),
        [Action::AnswerOpen {
            answer: Err(Error::ProtocolViolation(_)),
            ..
        }]
    ));
    stream(&mut m, 5, 50, now);
    let reusing_bound = open(&mut m);
    let actions = respond(&mut m, OpenResponse::accepted(reusing_bound, 5));
    assert!(matches!(
        actions.as_slice(),
        [Action::AnswerOpen {
            answer: Err(Error::ProtocolViolation(_)),
            ..
        }]
    ));
}

#[test]
fn a_second_stream_for_a_bound_id_is_refused_and_counted() {
    let mut m = machine();
    let now = Instant::now();
    let request_id = open(&mut m);
    respond(&mut m, OpenResponse::accepted(request_id, 3));
    stream(&mut m, 3, 30, now);
    let actions = stream(&mut m, 3, 31, now);
    assert_eq!(refused(&actions), [(31, Refusal::Retired)]);
    assert_eq!(m.stats().refused_streams, 1);
}

#[test]
fn two_held_streams_cannot_claim_one_id() {
    let mut m = machine();
    let now = Instant::now();
    assert!(stream(&mut m, 3, 30, now).is_empty());
    assert_eq!(
        refused(&stream(&mut m, 3, 31, now)),
        [(31, Refusal::Duplicate)]
    );
    assert_eq!(m.stats().early_streams, 1);
}

#[test]
fn the_hold_is_bounded_by_max_inflight_opens() {
    let mut m = machine();
    let now = Instant::now();
    for id in 1..=4 {
        assert!(stream(&mut m, id, id as Stream, now).is_empty());
    }
    assert_eq!(
        refused(&stream(&mut m, 5, 5, now)),
        [(5, Refusal::HoldFull)]
    );
    assert_eq!(m.stats().early_streams, 4);
    assert_eq!(m.stats().refused_streams, 1);
}

#[test]
fn held_streams_expire_after_the_bind_timeout_and_their_id_is_retired() {
    let mut m = machine();
    let start = Instant::now();
    stream(&mut m, 1, 10, start);
    stream(&mut m, 2, 20, start + Duration::from_secs(5));
    assert_eq!(m.next_timeout(), Some(start + BIND_TIMEOUT));

    let (_, actions) = step(&mut m, |m, out| {
        m.handle_timeout(start + BIND_TIMEOUT - Duration::from_millis(1), out);
    });
    assert!(actions.is_empty(), "nothing expires early");
    let (_, actions) = step(&mut m, |m, out| m.handle_timeout(start + BIND_TIMEOUT, out));
    assert_eq!(refused(&actions), [(10, Refusal::Expired)]);
    assert_eq!(m.next_timeout(), Some(start + Duration::from_secs(15)));

    // The expired id's open cannot bind any more.
    let request_id = open(&mut m);
    let actions = respond(&mut m, OpenResponse::accepted(request_id, 1));
    assert!(matches!(
        actions.as_slice(),
        [Action::AnswerOpen {
            answer: Err(Error::ProtocolViolation(_)),
            ..
        }]
    ));
}

#[test]
fn the_answer_to_an_abandoned_open_refuses_its_stream_before_and_after() {
    let mut m = machine();
    let now = Instant::now();
    let first = open(&mut m);
    let second = open(&mut m);
    stream(&mut m, 8, 80, now);
    m.abandon_open(first);
    m.abandon_open(second);
    assert_eq!(m.stats().pending_opens, 0);
    let actions = respond(&mut m, OpenResponse::accepted(first, 8));
    assert_eq!(refused(&actions), [(80, Refusal::Abandoned)]);
    assert!(respond(&mut m, OpenResponse::accepted(second, 9)).is_empty());
    assert_eq!(
        refused(&stream(&mut m, 9, 90, now)),
        [(90, Refusal::Retired)]
    );
}

#[test]
fn an_open_abandoned_while_waiting_for_its_stream_refuses_the_stream() {
    let mut m = machine();
    let request_id = open(&mut m);
    respond(&mut m, OpenResponse::accepted(request_id, 4));
    m.abandon_open(request_id);
    assert_eq!(m.stats().pending_opens, 0);
    assert_eq!(
        refused(&stream(&mut m, 4, 40, Instant::now())),
        [(40, Refusal::Retired)]
    );
}

/// The peer's `StreamClose` for `logical_stream_id` with `code`.
fn stream_close(logical_stream_id: u64, code: CloseCode) -> ProtocolMessage {
    ProtocolMessage::StreamClose(StreamClose {
        logical_stream_id,
        code,
        reason: Some("gone".into()),
    })
}

#[test]
fn a_reset_before_the_stream_bound_fails_its_open_at_once_and_retires_the_id() {
    let mut m = machine();
    let request_id = open(&mut m);
    respond(&mut m, OpenResponse::accepted(request_id, 5));
    let actions = message(&mut m, stream_close(5, CloseCode::Reset));
    assert!(
        actions.iter().any(|action| matches!(
            action,
            Action::BindOpen { request_id: r, stream: Err(Error::StreamAbandoned { reason: Some(reason) }) }
                if *r == request_id && reason == "gone"
        )),
        "{actions:?}"
    );
    assert_eq!(m.stats().pending_opens, 0);
    // Should the stream come after all, it is refused.
    assert_eq!(
        refused(&stream(&mut m, 5, 50, Instant::now())),
        [(50, Refusal::Retired)]
    );
}

#[test]
fn other_closes_before_the_stream_bound_leave_its_open_waiting() {
    // The peer finished the stream (or failed after writing): its bytes, the StreamBind
    // first, are on their way, and may come after the close on the control stream.
    for code in [CloseCode::Normal, CloseCode::Error, CloseCode::Timeout] {
        let mut m = machine();
        let request_id = open(&mut m);
        respond(&mut m, OpenResponse::accepted(request_id, 6));
        let actions = message(&mut m, stream_close(6, code));
        assert!(
            !actions
                .iter()
                .any(|action| matches!(action, Action::BindOpen { .. })),
            "{code:?}: {actions:?}"
        );
        assert!(matches!(
            stream(&mut m, 6, 60, Instant::now()).as_slice(),
            [Action::BindOpen { request_id: r, stream: Ok(60) }] if *r == request_id
        ));
    }
}

#[test]
fn a_reset_of_an_already_bound_stream_fails_nothing() {
    let mut m = machine();
    let request_id = open(&mut m);
    respond(&mut m, OpenResponse::accepted(request_id, 8));
    stream(&mut m, 8, 80, Instant::now());
    let actions = message(&mut m, stream_close(8, CloseCode::Reset));
    assert!(
        !actions
            .iter()
            .any(|action| matches!(action, Action::BindOpen { .. })),
        "{actions:?}"
    );
}

#[test]
fn a_stream_its_open_could_not_take_is_refused_and_counted() {
    let mut m = machine();
    let (_, actions) = step(&mut m, |m, out| m.stream_undeliverable(1, Some(3), out));
    assert_eq!(refused(&actions), [(1, Refusal::Undeliverable)]);
    let (_, actions) = step(&mut m, |m, out| m.refuse_unbound_stream(2, out));
    assert_eq!(refused(&actions), [(2, Refusal::BadHeader)]);
    assert_eq!(m.stats().refused_streams, 2);
}

// ----- the session's end ---------------------------------------------------------------

#[test]
fn ending_fails_every_waiter_once_refuses_held_streams_and_drains_every_table() {
    let mut m = machine();
    let now = Instant::now();
    let answering = open(&mut m);
    let binding = open(&mut m);
    respond(&mut m, OpenResponse::accepted(binding, 2));
    stream(&mut m, 9, 90, now);
    let (sequence, _) = step(&mut m, |m, out| m.ping(out));
    let sequence = sequence.unwrap();
    request(&mut m, 1);
    let (_, actions) = step(&mut m, |m, out| m.terminate(Terminal::Disconnected, out));

    assert!(matches!(actions[0], Action::Ended(Terminal::Disconnected)));
    let mut answered = Vec::new();
    let mut bound = Vec::new();
    let mut pinged = Vec::new();
    for action in &actions[1..] {
        match action {
            Action::AnswerOpen {
                request_id,
                answer: Err(Error::Disconnected),
            } => {
                answered.push(*request_id);
            }
            Action::BindOpen {
                request_id,
                stream: Err(Error::Disconnected),
            } => {
                bound.push(*request_id);
            }
            Action::AnswerPing {
                sequence,
                result: Err(Error::Disconnected),
            } => {
                pinged.push(*sequence);
            }
            Action::Refuse {
                why: Refusal::SessionEnded,
                ..
            } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (answered, bound, pinged),
        (vec![answering], vec![binding], vec![sequence])
    );
    assert_eq!(refused(&actions), [(90, Refusal::SessionEnded)]);
    assert_eq!(
        m.stats(),
        SessionStats::default(),
        "ending refusals are not counted"
    );

    // The first reason wins; nothing is registered afterwards.
    assert!(step(&mut m, |m, out| m.terminate(Terminal::Closed, out))
        .1
        .is_empty());
    let (opened, actions) = step(&mut m, |m, out| {
        m.open("web".into(), Metadata::Empty, OpenFlags::empty(), out)
    });
    assert!(matches!(opened, Err(Error::Disconnected)) && actions.is_empty());
    assert!(matches!(
        step(&mut m, |m, out| m.ping(out)).0,
        Err(Error::Disconnected)
    ));
    assert_eq!(
        refused(&stream(&mut m, 11, 110, now)),
        [(110, Refusal::SessionEnded)]
    );
    assert_eq!(m.stats().refused_streams, 0);
}

#[test]
fn each_end_reason_has_its_state_and_error() {
    let cases = [
        (Terminal::Closed, State::Closed),
        (Terminal::Disconnected, State::Disconnected),
        (Terminal::KeepaliveTimeout, State::Disconnected),
        (Terminal::Violation("x"), State::Closed),
    ];
    for (terminal, state) in cases {
        assert_eq!(terminal.state(), state);
    }
    assert!(matches!(
        Terminal::KeepaliveTimeout.error(),
        Error::Timeout(TimeoutKind::Ping)
    ));
    assert!(matches!(Terminal::Closed.error(), Error::SessionClosed));
}

#[test]
fn closing_stops_new_opens_and_pings_but_still_answers_requests() {
    let mut m = machine();
    request(&mut m, 1);
    let (closing, actions) = step(&mut m, |m, out| m.close(CloseCode::Normal, None, out));
    assert!(closing);
    assert!(matches!(
        actions.as_slice(),
        [
            Action::Closing,
            Action::Send(ProtocolMessage::StreamClose(StreamClose {
                logical_stream_id: 0,
                ..
            }))
        ]
    ));
    let (opened, _) = step(&mut m, |m, out| {
        m.open("web".into(), Metadata::Empty, OpenFlags::empty(), out)
    });
    assert!(matches!(opened, Err(Error::SessionClosed)));
    assert!(matches!(
        step(&mut m, |m, out| m.ping(out)).0,
        Err(Error::SessionClosed)
    ));
    assert!(step(&mut m, |m, out| m.accept_open(1, 1, out)).0.is_ok());

    step(&mut m, |m, out| m.terminate(Terminal::Closed, out));
    let (closing, actions) = step(&mut m, |m, out| m.close(CloseCode::Normal, None, out));
    assert!(
        !closing && actions.is_empty(),
        "closing an ended session does nothing"
    );
}

#[test]
fn the_peers_close_ends_the_session_and_is_delivered() {
    let mut m = machine();
    let request_id = open(&mut m);
    let close = StreamClose {
        logical_stream_id: 0,
        code: CloseCode::Normal,
        reason: Some("bye".into()),
    };
    let actions = message(&mut m, ProtocolMessage::StreamClose(close));
    assert!(matches!(
        actions.as_slice(),
        [
            Action::Observe(ControlEvent::CloseReceived { .. }),
            Action::Closing,
            Action::Ended(Terminal::Closed),
            Action::AnswerOpen { request_id: r, answer: Err(Error::SessionClosed) },
            Action::Deliver(ClientEvent::Closing { code: CloseCode::Normal, reason: Some(reason) }),
        ] if *r == request_id && reason == "bye"
    ));
}

#[test]
fn a_handshake_message_after_negotiation_ends_the_session() {
    let mut m = machine();
    let (handled, actions) = step(&mut m, |m, out| {
        m.handle_message(ProtocolMessage::Hello(Hello::new(Features::empty())), out)
    });
    assert!(matches!(handled, Err(Terminal::Violation(_))));
    assert!(matches!(
        actions.as_slice(),
        [Action::Ended(Terminal::Violation(_))]
    ));
}

// ----- acceptor side -------------------------------------------------------------------

#[test]
fn requests_are_delivered_until_the_limit_then_rejected() {
    let mut m = machine();
    for request_id in 1..=3 {
        let actions = request(&mut m, request_id);
        assert!(matches!(
            actions.as_slice(),
            [Action::Deliver(ClientEvent::OpenRequest { request_id: r, .. })] if *r == request_id
        ));
    }
    assert_eq!(
        rejection(&request(&mut m, 4)),
        Some((4, RejectCode::LimitExceeded))
    );
    assert_eq!(m.stats().active_streams, 3);
    assert_eq!(m.stats().refused_requests, 1);
}

#[test]
fn a_duplicate_request_id_is_rejected() {
    let mut m = machine();
    request(&mut m, 1);
    assert_eq!(
        rejection(&request(&mut m, 1)),
        Some((1, RejectCode::InternalError))
    );
    assert_eq!(m.stats().active_streams, 1);
}

#[test]
fn requests_after_the_end_are_rejected_as_unavailable() {
    let mut m = machine();
    step(&mut m, |m, out| m.terminate(Terminal::Closed, out));
    assert_eq!(
        rejection(&request(&mut m, 1)),
        Some((1, RejectCode::ServiceUnavailable))
    );
}

#[test]
fn an_undeliverable_request_frees_its_slot_and_is_rejected() {
    for (why, code) in [
        (Undeliverable::Full, RejectCode::LimitExceeded),
        (Undeliverable::NoReceiver, RejectCode::ServiceUnavailable),
    ] {
        let mut m = machine();
        request(&mut m, 1);
        let (_, actions) = step(&mut m, |m, out| m.request_undeliverable(1, why, out));
        assert_eq!(rejection(&actions), Some((1, code)));
        assert_eq!(m.stats().active_streams, 0);
        assert_eq!(m.stats().refused_requests, 1);
        let (_, again) = step(&mut m, |m, out| m.request_undeliverable(1, why, out));
        assert!(
            again.is_empty(),
            "an answered request is not rejected twice"
        );
    }
}

#[test]
fn accepting_refuses_unknown_requests_and_reserved_or_used_ids_without_taking_a_slot() {
    let mut m = machine();
    request(&mut m, 1);
    request(&mut m, 2);
    let accept = |m: &mut SessionMachine<Stream>, request_id, id| {
        step(m, |m, out| m.accept_open(request_id, id, out))
    };
    let (unknown, actions) = accept(&mut m, 9, 1);
    assert!(matches!(unknown, Err(Error::UnknownRequest { request_id: 9 })) && actions.is_empty());
    assert!(matches!(
        accept(&mut m, 1, 0).0,
        Err(Error::InvalidStreamId(0))
    ));
    let (accepted, actions) = accept(&mut m, 1, 5);
    assert_eq!(accepted.unwrap().service.as_str(), "echo");
    assert!(matches!(
        actions.as_slice(),
        [Action::Send(ProtocolMessage::OpenResponse(OpenResponse {
            request_id: 1,
            status: OpenStatus::Accepted,
            logical_stream_id: Some(5),
            ..
        }))]
    ));
    assert!(matches!(
        accept(&mut m, 2, 5).0,
        Err(Error::InvalidStreamId(5))
    ));
    assert!(matches!(
        accept(&mut m, 1, 6).0,
        Err(Error::UnknownRequest { .. })
    ));
    assert_eq!(m.stats().active_streams, 2);
}

#[test]
fn a_slot_is_held_until_released_and_freed_once() {
    let mut m = machine();
    for request_id in 1..=3 {
        request(&mut m, request_id);
        step(&mut m, |m, out| m.accept_open(request_id, request_id, out))
            .0
            .unwrap();
    }
    assert_eq!(
        rejection(&request(&mut m, 4)),
        Some((4, RejectCode::LimitExceeded))
    );
    m.release_stream(1);
    m.release_stream(1);
    assert_eq!(
        m.stats().active_streams,
        2,
        "a second release frees nothing"
    );
    assert!(rejection(&request(&mut m, 5)).is_none());
    assert_eq!(
        rejection(&request(&mut m, 6)),
        Some((6, RejectCode::LimitExceeded))
    );
}

#[test]
fn rejecting_closing_and_the_peers_stream_close_free_slots() {
    let mut m = machine();
    request(&mut m, 1);
    request(&mut m, 2);
    request(&mut m, 3);
    let (rejected, actions) = step(&mut m, |m, out| {
        m.reject_open(1, RejectCode::UnsupportedService, None, out)
    });
    rejected.unwrap();
    assert_eq!(
        rejection(&actions),
        Some((1, RejectCode::UnsupportedService))
    );
    assert!(matches!(
        step(&mut m, |m, out| m.reject_open(
            1,
            RejectCode::UnsupportedService,
            None,
            out
        ))
        .0,
        Err(Error::UnknownRequest { request_id: 1 })
    ));
    step(&mut m, |m, out| m.accept_open(2, 20, out)).0.unwrap();
    step(&mut m, |m, out| m.accept_open(3, 30, out)).0.unwrap();
    let (_, actions) = step(&mut m, |m, out| {
        m.close_stream(20, CloseCode::Normal, None, out)
    });
    assert!(matches!(
        actions.as_slice(),
        [Action::Send(ProtocolMessage::StreamClose(StreamClose {
            logical_stream_id: 20,
            ..
        }))]
    ));
    let close = StreamClose {
        logical_stream_id: 30,
        code: CloseCode::Normal,
        reason: None,
    };
    let actions = message(&mut m, ProtocolMessage::StreamClose(close));
    assert!(matches!(
        actions.as_slice(),
        [
            Action::Observe(ControlEvent::StreamClose {
                logical_stream_id: 30,
                ..
            }),
            Action::Deliver(ClientEvent::StreamClosed {
                logical_stream_id: 30,
                ..
            }),
        ]
    ));
    assert_eq!(m.stats().active_streams, 0);
}

#[test]
fn allocated_ids_start_at_one_and_skip_ids_in_use() {
    let mut m = machine();
    request(&mut m, 1);
    step(&mut m, |m, out| m.accept_open(1, 2, out)).0.unwrap();
    assert_eq!(m.allocate_stream_id(), 1);
    assert_eq!(m.allocate_stream_id(), 3, "2 is in use");
}

// ----- pings ---------------------------------------------------------------------------

#[test]
fn a_pong_completes_its_ping_and_stray_pongs_are_ignored() {
    let mut m = machine();
    let (sequence, actions) = step(&mut m, |m, out| m.ping(out));
    let sequence = sequence.unwrap();
    assert!(matches!(
        actions.as_slice(),
        [Action::Send(ProtocolMessage::Ping(Ping { sequence: s }))] if *s == sequence
    ));
    let actions = message(&mut m, ProtocolMessage::Pong(Pong { sequence }));
    assert!(matches!(
        actions.as_slice(),
        [Action::Observe(_), Action::AnswerPing { sequence: s, result: Ok(()) }] if *s == sequence
    ));
    let actions = message(&mut m, ProtocolMessage::Pong(Pong { sequence }));
    assert!(matches!(actions.as_slice(), [Action::Observe(_)]));

    let (abandoned, _) = step(&mut m, |m, out| m.ping(out));
    m.abandon_ping(abandoned.unwrap());
    let actions = step(&mut m, |m, out| m.terminate(Terminal::Closed, out)).1;
    assert!(
        matches!(actions.as_slice(), [Action::Ended(_)]),
        "no abandoned ping is failed"
    );
}

#[test]
fn the_peers_ping_is_answered_and_delivered() {
    let mut m = machine();
    let actions = message(&mut m, ProtocolMessage::Ping(Ping { sequence: 42 }));
    assert!(matches!(
        actions.as_slice(),
        [
            Action::Observe(ControlEvent::Ping { sequence: 42 }),
            Action::Send(ProtocolMessage::Pong(Pong { sequence: 42 })),
            Action::Deliver(ClientEvent::PingReceived { sequence: 42 }),
        ]
    ));
}

#[test]
fn actions_keep_their_order_past_the_inline_ones() {
    let mut actions = Actions::<Stream>::new();
    for stream in 0..10 {
        actions.push(Action::Refuse {
            stream,
            logical_stream_id: None,
            why: Refusal::Expired,
        });
    }
    let order: Vec<Stream> = refused(&actions.into_iter().collect::<Vec<_>>())
        .into_iter()
        .map(|(stream, _)| stream)
        .collect();
    assert_eq!(order, (0..10).collect::<Vec<_>>());
}
