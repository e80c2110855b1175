//! Byte-for-byte compatibility with the published `quic-reverse-control` 0.1.2 crate.
//!
//! WIRE.md documents the format, but the reference implementation is the final word: every
//! message is encoded by both crates and the bytes compared, each crate decodes the other's
//! bytes, and damaged encodings must be accepted or refused by both alike.

use std::collections::HashMap;

use backhaul::protocol::*;
use bytes::BytesMut;
use proptest::prelude::*;
use quic_reverse_control::{self as reference, BincodeCodec, Codec};

#[path = "../src/protocol/strategies.rs"]
mod strategies;

use strategies::{any_bytes, any_damage, any_message, any_wire_byte};

// ---------------------------------------------------------------------------------------------
// Conversions between our types and the reference crate's.

fn features_to_reference(features: Features) -> reference::Features {
    reference::Features::from_bits_retain(features.bits())
}

fn features_from_reference(features: reference::Features) -> Features {
    Features::from_bits_retain(features.bits())
}

fn reject_code_to_reference(code: RejectCode) -> reference::RejectCode {
    match code {
        RejectCode::ServiceUnavailable => reference::RejectCode::ServiceUnavailable,
        RejectCode::UnsupportedService => reference::RejectCode::UnsupportedService,
        RejectCode::LimitExceeded => reference::RejectCode::LimitExceeded,
        RejectCode::Unauthorized => reference::RejectCode::Unauthorized,
        RejectCode::InternalError => reference::RejectCode::InternalError,
    }
}

fn reject_code_from_reference(code: reference::RejectCode) -> RejectCode {
    match code {
        reference::RejectCode::ServiceUnavailable => RejectCode::ServiceUnavailable,
        reference::RejectCode::UnsupportedService => RejectCode::UnsupportedService,
        reference::RejectCode::LimitExceeded => RejectCode::LimitExceeded,
        reference::RejectCode::Unauthorized => RejectCode::Unauthorized,
        reference::RejectCode::InternalError => RejectCode::InternalError,
    }
}

fn close_code_to_reference(code: CloseCode) -> reference::CloseCode {
    match code {
        CloseCode::Normal => reference::CloseCode::Normal,
        CloseCode::Error => reference::CloseCode::Error,
        CloseCode::Timeout => reference::CloseCode::Timeout,
        CloseCode::Reset => reference::CloseCode::Reset,
    }
}

fn close_code_from_reference(code: reference::CloseCode) -> CloseCode {
    match code {
        reference::CloseCode::Normal => CloseCode::Normal,
        reference::CloseCode::Error => CloseCode::Error,
        reference::CloseCode::Timeout => CloseCode::Timeout,
        reference::CloseCode::Reset => CloseCode::Reset,
    }
}

fn metadata_value_to_reference(value: &MetadataValue) -> reference::MetadataValue {
    match value {
        MetadataValue::String(text) => reference::MetadataValue::String(text.clone()),
        MetadataValue::Integer(number) => reference::MetadataValue::Integer(*number),
        MetadataValue::Boolean(flag) => reference::MetadataValue::Boolean(*flag),
        MetadataValue::Bytes(bytes) => reference::MetadataValue::Bytes(bytes.clone()),
    }
}

fn metadata_value_from_reference(value: reference::MetadataValue) -> MetadataValue {
    match value {
        reference::MetadataValue::String(text) => MetadataValue::String(text),
        reference::MetadataValue::Integer(number) => MetadataValue::Integer(number),
        reference::MetadataValue::Boolean(flag) => MetadataValue::Boolean(flag),
        reference::MetadataValue::Bytes(bytes) => MetadataValue::Bytes(bytes),
    }
}

fn metadata_to_reference(metadata: &Metadata) -> reference::Metadata {
    match metadata {
        Metadata::Empty => reference::Metadata::Empty,
        Metadata::Bytes(bytes) => reference::Metadata::Bytes(bytes.clone()),
        Metadata::Structured(entries) => reference::Metadata::Structured(
            entries
                .iter()
                .map(|(key, value)| (key.clone(), metadata_value_to_reference(value)))
                .collect(),
        ),
    }
}

fn metadata_from_reference(metadata: reference::Metadata) -> Metadata {
    match metadata {
        reference::Metadata::Empty => Metadata::Empty,
        reference::Metadata::Bytes(bytes) => Metadata::Bytes(bytes),
        reference::Metadata::Structured(entries) => Metadata::Structured(
            entries
                .into_iter()
                .map(|(key, value)| (key, metadata_value_from_reference(value)))
                .collect(),
        ),
    }
}

fn to_reference(message: &ProtocolMessage) -> reference::ProtocolMessage {
    match message {
        ProtocolMessage::Hello(hello) => reference::ProtocolMessage::Hello(reference::Hello {
            protocol_version: hello.protocol_version,
            features: features_to_reference(hello.features),
            agent: hello.agent.clone(),
        }),
        ProtocolMessage::HelloAck(ack) => {
            reference::ProtocolMessage::HelloAck(reference::HelloAck {
                selected_version: ack.selected_version,
                selected_features: features_to_reference(ack.selected_features),
            })
        }
        ProtocolMessage::OpenRequest(request) => {
            reference::ProtocolMessage::OpenRequest(reference::OpenRequest {
                request_id: request.request_id,
                service: reference::ServiceId::new(request.service.as_str()),
                metadata: metadata_to_reference(&request.metadata),
                flags: reference::OpenFlags::from_bits_retain(request.flags.bits()),
            })
        }
        ProtocolMessage::OpenResponse(response) => {
            reference::ProtocolMessage::OpenResponse(reference::OpenResponse {
                request_id: response.request_id,
                status: match response.status {
                    OpenStatus::Accepted => reference::OpenStatus::Accepted,
                    OpenStatus::Rejected(code) => {
                        reference::OpenStatus::Rejected(reject_code_to_reference(code))
                    }
                },
                reason: response.reason.clone(),
                logical_stream_id: response.logical_stream_id,
            })
        }
        ProtocolMessage::StreamClose(close) => {
            reference::ProtocolMessage::StreamClose(reference::StreamClose {
                logical_stream_id: close.logical_stream_id,
                code: close_code_to_reference(close.code),
                reason: close.reason.clone(),
            })
        }
        ProtocolMessage::Ping(ping) => reference::ProtocolMessage::Ping(reference::Ping {
            sequence: ping.sequence,
        }),
        ProtocolMessage::Pong(pong) => reference::ProtocolMessage::Pong(reference::Pong {
            sequence: pong.sequence,
        }),
    }
}

fn from_reference(message: reference::ProtocolMessage) -> ProtocolMessage {
    match message {
        reference::ProtocolMessage::Hello(hello) => ProtocolMessage::Hello(Hello {
            protocol_version: hello.protocol_version,
            features: features_from_reference(hello.features),
            agent: hello.agent,
        }),
        reference::ProtocolMessage::HelloAck(ack) => ProtocolMessage::HelloAck(HelloAck {
            selected_version: ack.selected_version,
            selected_features: features_from_reference(ack.selected_features),
        }),
        reference::ProtocolMessage::OpenRequest(request) => {
            ProtocolMessage::OpenRequest(OpenRequest {
                request_id: request.request_id,
                service: ServiceId(request.service.0),
                metadata: metadata_from_reference(request.metadata),
                flags: OpenFlags::from_bits_retain(request.flags.bits()),
            })
        }
        reference::ProtocolMessage::OpenResponse(response) => {
            ProtocolMessage::OpenResponse(OpenResponse {
                request_id: response.request_id,
                status: match response.status {
                    reference::OpenStatus::Accepted => OpenStatus::Accepted,
                    reference::OpenStatus::Rejected(code) => {
                        OpenStatus::Rejected(reject_code_from_reference(code))
                    }
                },
                reason: response.reason,
                logical_stream_id: response.logical_stream_id,
            })
        }
        reference::ProtocolMessage::StreamClose(close) => {
            ProtocolMessage::StreamClose(StreamClose {
                logical_stream_id: close.logical_stream_id,
                code: close_code_from_reference(close.code),
                reason: close.reason,
            })
        }
        reference::ProtocolMessage::Ping(ping) => ProtocolMessage::Ping(Ping {
            sequence: ping.sequence,
        }),
        reference::ProtocolMessage::Pong(pong) => ProtocolMessage::Pong(Pong {
            sequence: pong.sequence,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding and decoding with each crate.

fn encode_ours(message: &ProtocolMessage) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_payload(message, &mut buf);
    buf.to_vec()
}

fn encode_reference(message: &ProtocolMessage) -> Vec<u8> {
    BincodeCodec::new()
        .encode_message(&to_reference(message))
        .expect("the reference encodes every message")
}

fn decode_reference(bytes: &[u8]) -> Option<ProtocolMessage> {
    BincodeCodec::new()
        .decode_message(bytes)
        .ok()
        .map(from_reference)
}

/// Whether the encoding has a single possible byte order: a `Structured` map with two or more
/// entries is written in `HashMap` iteration order, which differs between two maps.
fn has_deterministic_encoding(message: &ProtocolMessage) -> bool {
    match message {
        ProtocolMessage::OpenRequest(OpenRequest {
            metadata: Metadata::Structured(entries),
            ..
        }) => entries.len() <= 1,
        _ => true,
    }
}

/// The cross checks every message must pass, as a description of the first failure.
fn check_compatible(message: &ProtocolMessage) -> Result<(), String> {
    let ours = encode_ours(message);
    let theirs = encode_reference(message);
    if has_deterministic_encoding(message) && ours != theirs {
        return Err(format!(
            "{message:?}\n  ours:   {ours:02x?}\n  theirs: {theirs:02x?}"
        ));
    }
    if ours.len() != theirs.len() {
        return Err(format!(
            "{message:?}: {} vs {} bytes",
            ours.len(),
            theirs.len()
        ));
    }
    let theirs_of_ours = decode_reference(&ours);
    if theirs_of_ours.as_ref() != Some(message) {
        return Err(format!(
            "reference decoded {message:?} as {theirs_of_ours:?}"
        ));
    }
    let ours_of_theirs = decode_payload(&theirs);
    if ours_of_theirs.as_ref() != Ok(message) {
        return Err(format!("we decoded {message:?} as {ours_of_theirs:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A fixed catalogue covering every variant, code, option and flag.

fn single_entry(key: &str, value: MetadataValue) -> Metadata {
    Metadata::Structured(HashMap::from([(key.to_owned(), value)]))
}

fn catalogue() -> Vec<ProtocolMessage> {
    let mut messages = Vec::new();

    let feature_sets = (0..8).map(Features::from_bits_retain).chain([
        Features::from_bits_retain(0x8000_0001),
        Features::from_bits_retain(u32::MAX),
    ]);
    for features in feature_sets {
        messages.push(ProtocolMessage::Hello(Hello::new(features)));
        messages.push(ProtocolMessage::HelloAck(HelloAck {
            selected_version: 1,
            selected_features: features,
        }));
    }
    for agent in ["", "backhaul/0.1.0", "ünïcødé ✓ 🚀"] {
        messages.push(ProtocolMessage::Hello(
            Hello::new(Features::all()).with_agent(agent),
        ));
    }
    messages.push(ProtocolMessage::Hello(Hello {
        protocol_version: u16::MAX,
        features: Features::empty(),
        agent: None,
    }));
    messages.push(ProtocolMessage::HelloAck(HelloAck {
        selected_version: 0,
        selected_features: Features::empty(),
    }));

    let metadata = [
        Metadata::Empty,
        Metadata::Bytes(Vec::new()),
        Metadata::Bytes((0..=255).collect()),
        Metadata::Structured(HashMap::new()),
        single_entry("", MetadataValue::String(String::new())),
        single_entry("tenant", MetadataValue::String("acme ✓".into())),
        single_entry("n", MetadataValue::Integer(i64::MIN)),
        single_entry("n", MetadataValue::Integer(-1)),
        single_entry("n", MetadataValue::Integer(i64::MAX)),
        single_entry("yes", MetadataValue::Boolean(true)),
        single_entry("no", MetadataValue::Boolean(false)),
        single_entry("raw", MetadataValue::Bytes(vec![0, 0xff])),
        Metadata::Structured(HashMap::from([
            ("a".to_owned(), MetadataValue::String("x".into())),
            ("b".to_owned(), MetadataValue::Integer(2)),
            ("c".to_owned(), MetadataValue::Boolean(true)),
            ("d".to_owned(), MetadataValue::Bytes(vec![4])),
        ])),
    ];
    let flag_sets = [0, 1, 2, 3, 0x80, 0xff].map(OpenFlags::from_bits_retain);
    for (index, metadata) in (0u64..).zip(metadata) {
        for flags in flag_sets {
            messages.push(ProtocolMessage::OpenRequest(
                OpenRequest::new(index, "svc")
                    .with_metadata(metadata.clone())
                    .with_flags(flags),
            ));
        }
    }
    for service in ["", "ssh", "a service with spaces and ✓"] {
        messages.push(ProtocolMessage::OpenRequest(OpenRequest::new(
            u64::MAX,
            service,
        )));
    }

    messages.push(ProtocolMessage::OpenResponse(OpenResponse::accepted(7, 3)));
    messages.push(ProtocolMessage::OpenResponse(OpenResponse {
        request_id: 7,
        status: OpenStatus::Accepted,
        reason: Some("welcome".into()),
        logical_stream_id: None,
    }));
    let reject_codes = [
        RejectCode::ServiceUnavailable,
        RejectCode::UnsupportedService,
        RejectCode::LimitExceeded,
        RejectCode::Unauthorized,
        RejectCode::InternalError,
    ];
    for code in reject_codes {
        for reason in [None, Some("no".to_owned())] {
            messages.push(ProtocolMessage::OpenResponse(OpenResponse::rejected(
                u64::MAX,
                code,
                reason.clone(),
            )));
        }
        messages.push(ProtocolMessage::OpenResponse(OpenResponse {
            request_id: 1,
            status: OpenStatus::Rejected(code),
            reason: None,
            logical_stream_id: Some(9),
        }));
    }

    for code in [
        CloseCode::Normal,
        CloseCode::Error,
        CloseCode::Timeout,
        CloseCode::Reset,
    ] {
        for (logical_stream_id, reason) in
            [(0, None), (3, Some("bye".to_owned())), (u64::MAX, None)]
        {
            messages.push(ProtocolMessage::StreamClose(StreamClose {
                logical_stream_id,
                code,
                reason,
            }));
        }
    }

    for sequence in [0, 1, 258, u64::MAX] {
        messages.push(ProtocolMessage::Ping(Ping { sequence }));
        messages.push(ProtocolMessage::Pong(Pong { sequence }));
    }
    messages
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn catalogue_is_byte_identical_and_mutually_decodable() {
    let messages = catalogue();
    let kinds: std::collections::HashSet<_> = messages.iter().map(ProtocolMessage::kind).collect();
    assert_eq!(kinds.len(), 7, "every message kind is covered");
    for message in &messages {
        if let Err(failure) = check_compatible(message) {
            panic!("{failure}");
        }
    }
}

#[test]
fn frames_are_byte_identical() {
    let mut ours = BytesMut::new();
    let mut theirs = Vec::new();
    let messages: Vec<_> = catalogue()
        .into_iter()
        .filter(has_deterministic_encoding)
        .collect();
    for message in &messages {
        encode_frame(message, &mut ours).unwrap();
        theirs.extend(reference::encode_frame(&encode_reference(message)).unwrap());
    }
    assert_eq!(ours[..], theirs[..]);

    // The reference's incremental reader splits our stream into the same payloads.
    let mut reader = reference::FrameReader::new();
    reader.extend(&ours);
    for message in &messages {
        let payload = reader.read_frame().unwrap().expect("a whole frame");
        assert_eq!(payload, encode_reference(message));
    }
    assert!(reader.is_empty());

    // And we split theirs.
    let mut buf = BytesMut::from(&theirs[..]);
    for message in &messages {
        assert_eq!(decode_frame(&mut buf).unwrap().as_ref(), Some(message));
    }
    assert!(buf.is_empty());
}

#[test]
fn frame_size_limit_is_the_same() {
    assert_eq!(MAX_FRAME_SIZE, reference::MAX_FRAME_SIZE);
    // An OpenRequest with an empty service and N bytes of metadata has a 33 + N byte payload.
    for payload_len in [MAX_FRAME_SIZE, MAX_FRAME_SIZE + 1] {
        let message = ProtocolMessage::OpenRequest(
            OpenRequest::new(1, "").with_metadata(Metadata::Bytes(vec![7; payload_len - 33])),
        );
        let payload = encode_reference(&message);
        assert_eq!(payload.len(), payload_len);
        let mut ours = BytesMut::new();
        match (
            encode_frame(&message, &mut ours),
            reference::encode_frame(&payload),
        ) {
            (Ok(()), Ok(theirs)) => assert_eq!(ours[..], theirs[..]),
            (Err(ProtocolError::FrameTooLarge { .. }), Err(_)) => assert!(ours.is_empty()),
            (ours, theirs) => panic!("{payload_len} bytes: ours {ours:?}, theirs {theirs:?}"),
        }
    }
    // Both refuse an oversized announcement from its prefix alone.
    let prefix = u32::try_from(MAX_FRAME_SIZE + 1).unwrap().to_be_bytes();
    let mut reader = reference::FrameReader::new();
    reader.extend(&prefix);
    assert!(reader.read_frame().is_err());
    assert!(matches!(
        decode_frame(&mut BytesMut::from(&prefix[..])),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
}

#[test]
fn reference_leniencies_are_matched() {
    let ping = encode_ours(&ProtocolMessage::Ping(Ping { sequence: 1 }));

    // Trailing bytes after a message are ignored by both.
    let mut padded = ping.clone();
    padded.extend_from_slice(&[0xde, 0xad]);
    assert_eq!(
        decode_reference(&padded),
        Some(ProtocolMessage::Ping(Ping { sequence: 1 }))
    );
    assert_eq!(
        decode_payload(&padded),
        Ok(ProtocolMessage::Ping(Ping { sequence: 1 }))
    );

    // Unknown flag bits are kept by both.
    let hello = [0, 0, 0, 0, 1, 0, 0xff, 0xff, 0xff, 0xff, 0];
    assert_eq!(decode_reference(&hello), decode_payload(&hello).ok());
    let Some(ProtocolMessage::Hello(hello)) = decode_reference(&hello) else {
        panic!("the reference refused unknown feature bits")
    };
    assert_eq!(hello.features.bits(), u32::MAX);

    // A repeated metadata key: the last value wins in both.
    let mut repeated = vec![2, 0, 0, 0];
    repeated.extend_from_slice(&1u64.to_le_bytes()); // request_id
    repeated.extend_from_slice(&0u64.to_le_bytes()); // service ""
    repeated.extend_from_slice(&2u32.to_le_bytes()); // Structured
    repeated.extend_from_slice(&2u64.to_le_bytes()); // two entries
    for value in [1i64, 2] {
        repeated.extend_from_slice(&1u64.to_le_bytes());
        repeated.push(b'k');
        repeated.extend_from_slice(&1u32.to_le_bytes()); // Integer
        repeated.extend_from_slice(&value.to_le_bytes());
    }
    repeated.push(0); // flags
    let expected = ProtocolMessage::OpenRequest(
        OpenRequest::new(1, "").with_metadata(single_entry("k", MetadataValue::Integer(2))),
    );
    assert_eq!(decode_reference(&repeated).as_ref(), Some(&expected));
    assert_eq!(decode_payload(&repeated), Ok(expected));
}

#[test]
fn reference_strictness_is_matched() {
    let refused: [&[u8]; 6] = [
        &[],                                // nothing
        &[7, 0, 0, 0],                      // unknown message tag
        &[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2], // option byte 2
        &[
            0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0xff,
        ], // invalid UTF-8
        &[4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0], // CloseCode 4
        &[
            0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ], // huge length
    ];
    for bytes in refused {
        assert_eq!(
            decode_reference(bytes),
            None,
            "reference accepted {bytes:02x?}"
        );
        assert!(decode_payload(bytes).is_err(), "we accepted {bytes:02x?}");
    }
    // A bool byte of 2 inside structured metadata.
    let mut bad_bool = vec![2, 0, 0, 0];
    bad_bool.extend_from_slice(&[0; 16]); // request_id, service ""
    bad_bool.extend_from_slice(&2u32.to_le_bytes());
    bad_bool.extend_from_slice(&1u64.to_le_bytes());
    bad_bool.extend_from_slice(&0u64.to_le_bytes()); // key ""
    bad_bool.extend_from_slice(&2u32.to_le_bytes()); // Boolean
    bad_bool.extend_from_slice(&[2, 0]); // the bool byte, flags
    assert_eq!(decode_reference(&bad_bool), None);
    assert_eq!(
        decode_payload(&bad_bool),
        Err(ProtocolError::InvalidByte {
            field: "MetadataValue::Boolean",
            value: 2
        })
    );
}

#[test]
fn stream_bind_is_byte_identical() {
    for id in [0, 1, 258, 0x0102_0304_0506_0708, u64::MAX] {
        let ours = StreamBind::new(id).encode();
        assert_eq!(ours, reference::StreamBind::new(id).encode());
        assert_eq!(
            reference::StreamBind::decode(&ours).map(|bind| bind.logical_stream_id),
            Some(id)
        );
    }
}

/// A valid reference encoding with one small change, to compare the two decoders' verdicts
/// on inputs close to valid ones.
fn any_damaged_reference_encoding() -> impl Strategy<Value = Vec<u8>> {
    (any_message(), any_damage()).prop_map(|(message, damage)| {
        let mut bytes = encode_reference(&message);
        damage.apply(&mut bytes);
        bytes
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_messages_are_compatible(message in any_message()) {
        if let Err(failure) = check_compatible(&message) {
            return Err(TestCaseError::fail(failure));
        }
    }

    #[test]
    fn random_frames_are_byte_identical(message in any_message()) {
        prop_assume!(has_deterministic_encoding(&message));
        let mut ours = BytesMut::new();
        encode_frame(&message, &mut ours).unwrap();
        let theirs = reference::encode_frame(&encode_reference(&message)).unwrap();
        prop_assert_eq!(&ours[..], &theirs[..]);
    }

    #[test]
    fn decoders_agree_on_damaged_encodings(bytes in any_damaged_reference_encoding(), tail in any_bytes()) {
        prop_assert_eq!(decode_payload(&bytes).ok(), decode_reference(&bytes));
        let mut padded = bytes;
        padded.extend_from_slice(&tail);
        prop_assert_eq!(decode_payload(&padded).ok(), decode_reference(&padded));
    }

    #[test]
    fn decoders_agree_on_random_bytes(bytes in prop::collection::vec(any_wire_byte(), 0..64), kind in 0u8..7) {
        // Start with a valid tag so the bytes get past the first four.
        let mut payload = vec![kind, 0, 0, 0];
        payload.extend_from_slice(&bytes);
        prop_assert_eq!(decode_payload(&payload).ok(), decode_reference(&payload));
    }

    #[test]
    fn stream_bind_decoders_agree(header in any::<[u8; StreamBind::ENCODED_SIZE]>(), id in any::<u64>()) {
        prop_assert_eq!(
            StreamBind::decode(&header).map(|bind| bind.logical_stream_id),
            reference::StreamBind::decode(&header).map(|bind| bind.logical_stream_id)
        );
        prop_assert_eq!(StreamBind::new(id).encode(), reference::StreamBind::new(id).encode());
    }
}
