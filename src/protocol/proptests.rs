//! Property tests: every message survives a round trip, and no input makes a decoder panic.

use bytes::BytesMut;
use proptest::prelude::*;

use super::strategies::{any_bytes, any_damage, any_message, any_wire_byte};
use super::*;

fn encode(message: &ProtocolMessage) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_payload(message, &mut buf);
    buf.to_vec()
}

/// A valid encoding with one small change.
fn any_damaged_encoding() -> impl Strategy<Value = Vec<u8>> {
    (any_message(), any_damage()).prop_map(|(message, damage)| {
        let mut bytes = encode(&message);
        damage.apply(&mut bytes);
        bytes
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn messages_round_trip(message in any_message()) {
        let bytes = encode(&message);
        prop_assert_eq!(decode_payload(&bytes), Ok(message));
    }

    #[test]
    fn messages_round_trip_with_trailing_bytes(message in any_message(), tail in any_bytes()) {
        let mut bytes = encode(&message);
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(decode_payload(&bytes), Ok(message));
    }

    #[test]
    fn strict_prefixes_never_decode(message in any_message(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&message);
        let len = cut.index(bytes.len());
        prop_assert!(decode_payload(&bytes[..len]).is_err());
    }

    #[test]
    fn frames_round_trip_in_sequence(messages in prop::collection::vec(any_message(), 0..8)) {
        let mut wire = BytesMut::new();
        for message in &messages {
            encode_frame(message, &mut wire).unwrap();
        }
        let mut decoded = Vec::new();
        while let Some(message) = decode_frame(&mut wire).unwrap() {
            decoded.push(message);
        }
        prop_assert_eq!(decoded, messages);
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn decode_payload_never_panics_on_random_bytes(bytes in prop::collection::vec(any_wire_byte(), 0..256)) {
        let _ = decode_payload(&bytes);
    }

    #[test]
    fn decode_payload_never_panics_on_damaged_encodings(bytes in any_damaged_encoding()) {
        if let Ok(message) = decode_payload(&bytes) {
            // Whatever it accepted, it must be able to say again.
            let again = encode(&message);
            prop_assert_eq!(decode_payload(&again), Ok(message));
        }
    }

    #[test]
    fn decode_frame_never_panics_and_waits_without_consuming(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        small_prefix in any::<bool>(),
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        if small_prefix && buf.len() >= 4 {
            // Keep the announced length plausible so the payload decoder gets exercised.
            buf[0] = 0;
            buf[1] = 0;
        }
        loop {
            let before = buf.clone();
            match decode_frame(&mut buf) {
                Ok(Some(_)) => prop_assert!(buf.len() < before.len()),
                Ok(None) => {
                    prop_assert_eq!(&buf, &before);
                    break;
                }
                Err(ProtocolError::FrameTooLarge { .. }) => {
                    prop_assert_eq!(&buf, &before);
                    break;
                }
                Err(_) => break,
            }
        }
    }

    #[test]
    fn stream_bind_round_trips(id in any::<u64>()) {
        prop_assert_eq!(StreamBind::parse(&StreamBind::new(id).encode()), Ok(StreamBind::new(id)));
    }

    #[test]
    fn stream_bind_parse_never_panics(header in any::<[u8; StreamBind::ENCODED_SIZE]>()) {
        let parsed = StreamBind::parse(&header);
        let valid = header[..4] == StreamBind::MAGIC && header[4] == StreamBind::VERSION;
        prop_assert_eq!(parsed.is_ok(), valid);
    }
}
