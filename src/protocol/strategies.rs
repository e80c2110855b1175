//! Proptest strategies for arbitrary protocol values, shared by the unit property tests and
//! `tests/wire_compat.rs` (which includes this file with `#[path]`, so it names types only
//! through `super::*` and works in both places).

use proptest::prelude::*;

use super::*;

fn any_features() -> impl Strategy<Value = Features> {
    // Unknown bits included: the codec must carry them through untouched.
    any::<u32>().prop_map(Features::from_bits_retain)
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,24}", "[a-z]{0,8}"]
}

pub(crate) fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..48)
}

fn any_metadata_value() -> impl Strategy<Value = MetadataValue> {
    prop_oneof![
        any_text().prop_map(MetadataValue::String),
        any::<i64>().prop_map(MetadataValue::Integer),
        any::<bool>().prop_map(MetadataValue::Boolean),
        any_bytes().prop_map(MetadataValue::Bytes),
    ]
}

fn any_metadata() -> impl Strategy<Value = Metadata> {
    prop_oneof![
        Just(Metadata::Empty),
        any_bytes().prop_map(Metadata::Bytes),
        prop::collection::hash_map(any_text(), any_metadata_value(), 0..6)
            .prop_map(Metadata::Structured),
    ]
}

fn any_reject_code() -> impl Strategy<Value = RejectCode> {
    prop_oneof![
        Just(RejectCode::ServiceUnavailable),
        Just(RejectCode::UnsupportedService),
        Just(RejectCode::LimitExceeded),
        Just(RejectCode::Unauthorized),
        Just(RejectCode::InternalError),
    ]
}

fn any_close_code() -> impl Strategy<Value = CloseCode> {
    prop_oneof![
        Just(CloseCode::Normal),
        Just(CloseCode::Error),
        Just(CloseCode::Timeout),
        Just(CloseCode::Reset),
    ]
}

pub(crate) fn any_message() -> impl Strategy<Value = ProtocolMessage> {
    prop_oneof![
        (
            any::<u16>(),
            any_features(),
            proptest::option::of(any_text())
        )
            .prop_map(
                |(protocol_version, features, agent)| ProtocolMessage::Hello(Hello {
                    protocol_version,
                    features,
                    agent,
                })
            ),
        (any::<u16>(), any_features()).prop_map(|(selected_version, selected_features)| {
            ProtocolMessage::HelloAck(HelloAck {
                selected_version,
                selected_features,
            })
        }),
        (any::<u64>(), any_text(), any_metadata(), any::<u8>()).prop_map(
            |(request_id, service, metadata, flags)| ProtocolMessage::OpenRequest(OpenRequest {
                request_id,
                service: ServiceId(service),
                metadata,
                flags: OpenFlags::from_bits_retain(flags),
            })
        ),
        (
            any::<u64>(),
            proptest::option::of(any_reject_code()),
            proptest::option::of(any_text()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(request_id, rejected, reason, logical_stream_id)| {
                ProtocolMessage::OpenResponse(OpenResponse {
                    request_id,
                    status: rejected.map_or(OpenStatus::Accepted, OpenStatus::Rejected),
                    reason,
                    logical_stream_id,
                })
            }),
        (
            any::<u64>(),
            any_close_code(),
            proptest::option::of(any_text())
        )
            .prop_map(
                |(logical_stream_id, code, reason)| ProtocolMessage::StreamClose(StreamClose {
                    logical_stream_id,
                    code,
                    reason,
                })
            ),
        any::<u64>().prop_map(|sequence| ProtocolMessage::Ping(Ping { sequence })),
        any::<u64>().prop_map(|sequence| ProtocolMessage::Pong(Pong { sequence })),
    ]
}

/// Mostly small byte values: the ones that make bool, option and tag bytes valid or only just
/// out of range, which uniformly random bytes rarely are.
pub(crate) fn any_wire_byte() -> impl Strategy<Value = u8> {
    prop_oneof![3 => 0u8..=4, 1 => any::<u8>()]
}

/// One small change to a valid encoding. Damaged encodings reach the decoders' deeper error
/// paths (a bool byte of 2, a tag one past the last variant, a length one too long) that random
/// bytes rarely get past the first tag to.
#[derive(Debug, Clone)]
pub(crate) enum Damage {
    Replace(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, u8),
    Remove(prop::sample::Index),
}

impl Damage {
    pub(crate) fn apply(&self, bytes: &mut Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        match self {
            Self::Replace(at, byte) => {
                let at = at.index(bytes.len());
                bytes[at] = *byte;
            }
            Self::Truncate(at) => bytes.truncate(at.index(bytes.len())),
            Self::Insert(at, byte) => bytes.insert(at.index(bytes.len() + 1), *byte),
            Self::Remove(at) => {
                bytes.remove(at.index(bytes.len()));
            }
        }
    }
}

pub(crate) fn any_damage() -> impl Strategy<Value = Damage> {
    let at = any::<prop::sample::Index>;
    prop_oneof![
        2 => (at(), any_wire_byte()).prop_map(|(at, byte)| Damage::Replace(at, byte)),
        1 => at().prop_map(Damage::Truncate),
        1 => (at(), any_wire_byte()).prop_map(|(at, byte)| Damage::Insert(at, byte)),
        1 => at().prop_map(Damage::Remove),
    ]
}
