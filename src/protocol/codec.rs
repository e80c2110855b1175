//! Byte encoding of control messages.
//!
//! quic-reverse 0.1.2 encodes its messages with `bincode` 1.x (`bincode::serialize`, default
//! options) over serde derives, so the v1 wire format *is* bincode's default layout:
//!
//! - integers fixed-width little-endian (`u16`, `u32`, `u64`, `i64`);
//! - enum variants as a `u32` index, then the variant's fields;
//! - strings, byte vectors and maps as a `u64` length (element count for maps), then the items;
//! - `Option` as one byte `00` (None) or `01` (Some) then the value; `bool` as `00` or `01`;
//! - [`Features`] and [`OpenFlags`] as their raw bits (`u32` and `u8`).
//!
//! We write that layout by hand instead of depending on serde and bincode because the decoder
//! faces untrusted bytes and we want guarantees bincode does not state: it never panics, never
//! allocates more than the input could justify (every length is checked against the bytes that
//! remain before anything is reserved), and every error names the field that was wrong.
//!
//! Where the reference decoder is lenient we are lenient in the same way, so that anything one
//! implementation accepts the other accepts too:
//!
//! - bytes after the end of a message are ignored (`bincode::deserialize` allows trailing bytes);
//! - unknown bits in [`Features`] and [`OpenFlags`] are kept, not rejected (bitflags' serde
//!   support uses `from_bits_retain` for binary formats);
//! - a key repeated in [`Metadata::Structured`] is not an error: the last value wins, as when
//!   serde fills a `HashMap`.

use std::collections::HashMap;

use bytes::{BufMut, BytesMut};

use super::{
    CloseCode, Features, Hello, HelloAck, Metadata, MetadataValue, OpenFlags, OpenRequest,
    OpenResponse, OpenStatus, Ping, Pong, ProtocolError, ProtocolMessage, RejectCode, ServiceId,
    StreamClose,
};

/// Variant indexes of [`ProtocolMessage`], in declaration order as serde numbers them.
mod message_tag {
    pub(super) const HELLO: u32 = 0;
    pub(super) const HELLO_ACK: u32 = 1;
    pub(super) const OPEN_REQUEST: u32 = 2;
    pub(super) const OPEN_RESPONSE: u32 = 3;
    pub(super) const STREAM_CLOSE: u32 = 4;
    pub(super) const PING: u32 = 5;
    pub(super) const PONG: u32 = 6;
}

/// The fewest bytes one [`Metadata::Structured`] entry can take: an empty key (its `u64`
/// length), the value's `u32` tag and a one-byte `Boolean`. Bounds the entry count a payload
/// can honestly announce.
const MIN_METADATA_ENTRY_SIZE: usize = 8 + 4 + 1;

/// Appends the payload encoding of `message` to `dst`.
///
/// Encoding cannot fail; the frame size limit is enforced by [`encode_frame`](super::encode_frame).
///
/// # Examples
///
/// ```
/// use backhaul::protocol::{encode_payload, Ping, ProtocolMessage};
/// use bytes::BytesMut;
///
/// let mut buf = BytesMut::new();
/// encode_payload(&ProtocolMessage::Ping(Ping { sequence: 1 }), &mut buf);
/// assert_eq!(&buf[..], &[5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
/// ```
pub fn encode_payload(message: &ProtocolMessage, dst: &mut BytesMut) {
    match message {
        ProtocolMessage::Hello(hello) => {
            dst.put_u32_le(message_tag::HELLO);
            dst.put_u16_le(hello.protocol_version);
            dst.put_u32_le(hello.features.bits());
            put_optional_string(dst, hello.agent.as_deref());
        }
        ProtocolMessage::HelloAck(ack) => {
            dst.put_u32_le(message_tag::HELLO_ACK);
            dst.put_u16_le(ack.selected_version);
            dst.put_u32_le(ack.selected_features.bits());
        }
        ProtocolMessage::OpenRequest(request) => {
            dst.put_u32_le(message_tag::OPEN_REQUEST);
            dst.put_u64_le(request.request_id);
            put_bytes(dst, request.service.as_str().as_bytes());
            put_metadata(dst, &request.metadata);
            dst.put_u8(request.flags.bits());
        }
        ProtocolMessage::OpenResponse(response) => {
            dst.put_u32_le(message_tag::OPEN_RESPONSE);
            dst.put_u64_le(response.request_id);
            match response.status {
                OpenStatus::Accepted => dst.put_u32_le(0),
                OpenStatus::Rejected(code) => {
                    dst.put_u32_le(1);
                    dst.put_u32_le(reject_code_tag(code));
                }
            }
            put_optional_string(dst, response.reason.as_deref());
            match response.logical_stream_id {
                None => dst.put_u8(0),
                Some(id) => {
                    dst.put_u8(1);
                    dst.put_u64_le(id);
                }
            }
        }
        ProtocolMessage::StreamClose(close) => {
            dst.put_u32_le(message_tag::STREAM_CLOSE);
            dst.put_u64_le(close.logical_stream_id);
            dst.put_u32_le(u32::from(close.code.as_u8()));
            put_optional_string(dst, close.reason.as_deref());
        }
        ProtocolMessage::Ping(ping) => {
            dst.put_u32_le(message_tag::PING);
            dst.put_u64_le(ping.sequence);
        }
        ProtocolMessage::Pong(pong) => {
            dst.put_u32_le(message_tag::PONG);
            dst.put_u64_le(pong.sequence);
        }
    }
}

/// Decodes one message from a whole payload. Trailing bytes are tolerated.
///
/// # Errors
///
/// Any [`ProtocolError`] describing the first malformed field: the payload ends early, a tag,
/// bool or option byte is out of range, a length exceeds the bytes left, or a string is not
/// UTF-8.
///
/// # Examples
///
/// ```
/// use backhaul::protocol::{decode_payload, Pong, ProtocolMessage};
///
/// let payload = [6, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0];
/// assert_eq!(
///     decode_payload(&payload)?,
///     ProtocolMessage::Pong(Pong { sequence: 258 })
/// );
/// # Ok::<(), backhaul::protocol::ProtocolError>(())
/// ```
pub fn decode_payload(payload: &[u8]) -> Result<ProtocolMessage, ProtocolError> {
    let mut reader = Reader::new(payload);
    let message = match reader.tag("ProtocolMessage")? {
        message_tag::HELLO => ProtocolMessage::Hello(Hello {
            protocol_version: reader.u16("Hello.protocol_version")?,
            features: Features::from_bits_retain(reader.u32("Hello.features")?),
            agent: reader.optional_string("Hello.agent")?,
        }),
        message_tag::HELLO_ACK => ProtocolMessage::HelloAck(HelloAck {
            selected_version: reader.u16("HelloAck.selected_version")?,
            selected_features: Features::from_bits_retain(
                reader.u32("HelloAck.selected_features")?,
            ),
        }),
        message_tag::OPEN_REQUEST => ProtocolMessage::OpenRequest(OpenRequest {
            request_id: reader.u64("OpenRequest.request_id")?,
            service: ServiceId(reader.string("OpenRequest.service")?),
            metadata: reader.metadata()?,
            flags: OpenFlags::from_bits_retain(reader.u8("OpenRequest.flags")?),
        }),
        message_tag::OPEN_RESPONSE => ProtocolMessage::OpenResponse(OpenResponse {
            request_id: reader.u64("OpenResponse.request_id")?,
            status: reader.open_status()?,
            reason: reader.optional_string("OpenResponse.reason")?,
            logical_stream_id: if reader.option_marker("OpenResponse.logical_stream_id")? {
                Some(reader.u64("OpenResponse.logical_stream_id")?)
            } else {
                None
            },
        }),
        message_tag::STREAM_CLOSE => ProtocolMessage::StreamClose(StreamClose {
            logical_stream_id: reader.u64("StreamClose.logical_stream_id")?,
            code: reader.close_code()?,
            reason: reader.optional_string("StreamClose.reason")?,
        }),
        message_tag::PING => ProtocolMessage::Ping(Ping {
            sequence: reader.u64("Ping.sequence")?,
        }),
        message_tag::PONG => ProtocolMessage::Pong(Pong {
            sequence: reader.u64("Pong.sequence")?,
        }),
        tag => {
            return Err(ProtocolError::UnknownTag {
                kind: "ProtocolMessage",
                tag,
            })
        }
    };
    Ok(message)
}

/// Writes a `u64` length and the bytes (bincode's layout for `String` and `Vec<u8>`).
fn put_bytes(dst: &mut BytesMut, bytes: &[u8]) {
    dst.put_u64_le(bytes.len() as u64);
    dst.put_slice(bytes);
}

fn put_optional_string(dst: &mut BytesMut, value: Option<&str>) {
    match value {
        None => dst.put_u8(0),
        Some(text) => {
            dst.put_u8(1);
            put_bytes(dst, text.as_bytes());
        }
    }
}

fn put_metadata(dst: &mut BytesMut, metadata: &Metadata) {
    match metadata {
        Metadata::Empty => dst.put_u32_le(0),
        Metadata::Bytes(bytes) => {
            dst.put_u32_le(1);
            put_bytes(dst, bytes);
        }
        Metadata::Structured(entries) => {
            dst.put_u32_le(2);
            dst.put_u64_le(entries.len() as u64);
            for (key, value) in entries {
                put_bytes(dst, key.as_bytes());
                put_metadata_value(dst, value);
            }
        }
    }
}

fn put_metadata_value(dst: &mut BytesMut, value: &MetadataValue) {
    match value {
        MetadataValue::String(text) => {
            dst.put_u32_le(0);
            put_bytes(dst, text.as_bytes());
        }
        MetadataValue::Integer(number) => {
            dst.put_u32_le(1);
            dst.put_i64_le(*number);
        }
        MetadataValue::Boolean(flag) => {
            dst.put_u32_le(2);
            dst.put_u8(u8::from(*flag));
        }
        MetadataValue::Bytes(bytes) => {
            dst.put_u32_le(3);
            put_bytes(dst, bytes);
        }
    }
}

const fn reject_code_tag(code: RejectCode) -> u32 {
    match code {
        RejectCode::ServiceUnavailable => 0,
        RejectCode::UnsupportedService => 1,
        RejectCode::LimitExceeded => 2,
        RejectCode::Unauthorized => 3,
        RejectCode::InternalError => 4,
    }
}

/// A cursor over an untrusted payload.
///
/// Every read checks that the bytes it needs are there before taking them, so a malformed
/// payload yields an error rather than a panic, and lengths read from the payload are checked
/// against what remains before they size any allocation.
struct Reader<'a> {
    remaining: &'a [u8],
}

impl<'a> Reader<'a> {
    const fn new(payload: &'a [u8]) -> Self {
        Self { remaining: payload }
    }

    /// Takes the next `count` bytes, or fails without consuming anything.
    fn take(&mut self, count: usize, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        match self.remaining.split_at_checked(count) {
            Some((taken, rest)) => {
                self.remaining = rest;
                Ok(taken)
            }
            None => Err(ProtocolError::Truncated {
                field,
                needed: count - self.remaining.len(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ProtocolError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N, field)?);
        Ok(array)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ProtocolError> {
        let [byte] = self.array(field)?;
        Ok(byte)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, ProtocolError> {
        self.array(field).map(i64::from_le_bytes)
    }

    /// An enum's variant index.
    fn tag(&mut self, kind: &'static str) -> Result<u32, ProtocolError> {
        self.u32(kind)
    }

    /// A `bool`: bincode rejects any byte but 0 and 1.
    fn bool(&mut self, field: &'static str) -> Result<bool, ProtocolError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(ProtocolError::InvalidByte { field, value }),
        }
    }

    /// The byte in front of an `Option`'s value: whether a value follows.
    fn option_marker(&mut self, field: &'static str) -> Result<bool, ProtocolError> {
        self.bool(field)
    }

    /// A `u64` count of items at least `min_item_size` bytes each, checked against the bytes
    /// left so that it can safely size an allocation. A count that cannot fit would fail later
    /// anyway, so refusing it here changes only which error a malformed payload gets.
    fn count(&mut self, field: &'static str, min_item_size: usize) -> Result<usize, ProtocolError> {
        let announced = self.u64(field)?;
        let fits = self.remaining.len() / min_item_size;
        match usize::try_from(announced) {
            Ok(count) if count <= fits => Ok(count),
            _ => Err(ProtocolError::LengthOutOfBounds {
                field,
                len: announced,
                remaining: self.remaining.len(),
            }),
        }
    }

    /// A `u64` length, then that many bytes.
    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        let len = self.count(field, 1)?;
        self.take(len, field)
    }

    fn string(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let bytes = self.bytes(field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ProtocolError::InvalidUtf8 { field })
    }

    fn optional_string(&mut self, field: &'static str) -> Result<Option<String>, ProtocolError> {
        if self.option_marker(field)? {
            self.string(field).map(Some)
        } else {
            Ok(None)
        }
    }

    fn metadata(&mut self) -> Result<Metadata, ProtocolError> {
        match self.tag("Metadata")? {
            0 => Ok(Metadata::Empty),
            1 => Ok(Metadata::Bytes(self.bytes("Metadata::Bytes")?.to_vec())),
            2 => {
                let count = self.count("Metadata::Structured", MIN_METADATA_ENTRY_SIZE)?;
                let mut entries = HashMap::with_capacity(count);
                for _ in 0..count {
                    let key = self.string("Metadata::Structured key")?;
                    let value = self.metadata_value()?;
                    // A repeated key overwrites, as serde's `HashMap` visitor does.
                    entries.insert(key, value);
                }
                Ok(Metadata::Structured(entries))
            }
            tag => Err(ProtocolError::UnknownTag {
                kind: "Metadata",
                tag,
            }),
        }
    }

    fn metadata_value(&mut self) -> Result<MetadataValue, ProtocolError> {
        match self.tag("MetadataValue")? {
            0 => Ok(MetadataValue::String(self.string("MetadataValue::String")?)),
            1 => Ok(MetadataValue::Integer(self.i64("MetadataValue::Integer")?)),
            2 => Ok(MetadataValue::Boolean(self.bool("MetadataValue::Boolean")?)),
            3 => Ok(MetadataValue::Bytes(
                self.bytes("MetadataValue::Bytes")?.to_vec(),
            )),
            tag => Err(ProtocolError::UnknownTag {
                kind: "MetadataValue",
                tag,
            }),
        }
    }

    fn open_status(&mut self) -> Result<OpenStatus, ProtocolError> {
        match self.tag("OpenStatus")? {
            0 => Ok(OpenStatus::Accepted),
            1 => {
                let code = match self.tag("RejectCode")? {
                    0 => RejectCode::ServiceUnavailable,
                    1 => RejectCode::UnsupportedService,
                    2 => RejectCode::LimitExceeded,
                    3 => RejectCode::Unauthorized,
                    4 => RejectCode::InternalError,
                    tag => {
                        return Err(ProtocolError::UnknownTag {
                            kind: "RejectCode",
                            tag,
                        })
                    }
                };
                Ok(OpenStatus::Rejected(code))
            }
            tag => Err(ProtocolError::UnknownTag {
                kind: "OpenStatus",
                tag,
            }),
        }
    }

    fn close_code(&mut self) -> Result<CloseCode, ProtocolError> {
        match self.tag("CloseCode")? {
            0 => Ok(CloseCode::Normal),
            1 => Ok(CloseCode::Error),
            2 => Ok(CloseCode::Timeout),
            3 => Ok(CloseCode::Reset),
            tag => Err(ProtocolError::UnknownTag {
                kind: "CloseCode",
                tag,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses the spaced hex of WIRE.md.
    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn encode(message: &ProtocolMessage) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode_payload(message, &mut buf);
        buf.to_vec()
    }

    /// Checks that `message` encodes to exactly `expected` and that those bytes decode back.
    #[track_caller]
    fn assert_wire(message: ProtocolMessage, expected: &str) {
        let expected = hex(expected);
        assert_eq!(encode(&message), expected, "encoding of {message:?}");
        assert_eq!(decode_payload(&expected), Ok(message));
    }

    fn open_request(
        id: u64,
        service: &str,
        metadata: Metadata,
        flags: OpenFlags,
    ) -> ProtocolMessage {
        ProtocolMessage::OpenRequest(
            OpenRequest::new(id, service)
                .with_metadata(metadata)
                .with_flags(flags),
        )
    }

    fn structured(key: &str, value: MetadataValue) -> Metadata {
        Metadata::Structured(HashMap::from([(key.to_owned(), value)]))
    }

    #[test]
    fn hello_matches_wire_examples() {
        assert_wire(
            ProtocolMessage::Hello(Hello::new(
                Features::STRUCTURED_METADATA | Features::PING_PONG,
            )),
            "00000000 0100 03000000 00",
        );
        assert_wire(
            ProtocolMessage::Hello(Hello::new(Features::PING_PONG).with_agent("ab")),
            "00000000 0100 02000000 01 0200000000000000 6162",
        );
    }

    #[test]
    fn hello_ack_matches_wire_example() {
        assert_wire(
            ProtocolMessage::HelloAck(HelloAck {
                selected_version: 1,
                selected_features: Features::PING_PONG,
            }),
            "01000000 0100 02000000",
        );
    }

    #[test]
    fn open_request_matches_wire_examples() {
        assert_wire(
            open_request(7, "ssh", Metadata::Empty, OpenFlags::empty()),
            "02000000 0700000000000000 0300000000000000 737368 00000000 00",
        );
        assert_wire(
            open_request(
                8,
                "h",
                Metadata::Bytes(vec![1, 2]),
                OpenFlags::HIGH_PRIORITY,
            ),
            "02000000 0800000000000000 0100000000000000 68
             01000000 0200000000000000 0102 02",
        );
    }

    #[test]
    fn structured_metadata_matches_wire_examples() {
        let prefix = "02000000 0900000000000000 0100000000000000 68
                      02000000 0100000000000000 0100000000000000 6b";
        let cases = [
            (MetadataValue::Integer(5), "01000000 0500000000000000"),
            (
                MetadataValue::String("v".into()),
                "00000000 0100000000000000 76",
            ),
            (MetadataValue::Boolean(true), "02000000 01"),
            (
                MetadataValue::Bytes(vec![0xff]),
                "03000000 0100000000000000 ff",
            ),
        ];
        for (value, value_hex) in cases {
            assert_wire(
                open_request(9, "h", structured("k", value), OpenFlags::empty()),
                &format!("{prefix} {value_hex} 00"),
            );
        }
    }

    #[test]
    fn open_response_matches_wire_examples() {
        assert_wire(
            ProtocolMessage::OpenResponse(OpenResponse::accepted(7, 3)),
            "03000000 0700000000000000 00000000 00 01 0300000000000000",
        );
        assert_wire(
            ProtocolMessage::OpenResponse(OpenResponse::rejected(
                7,
                RejectCode::LimitExceeded,
                Some("no".into()),
            )),
            "03000000 0700000000000000 01000000 02000000 01 0200000000000000 6e6f 00",
        );
        assert_wire(
            ProtocolMessage::OpenResponse(OpenResponse::rejected(
                7,
                RejectCode::InternalError,
                None,
            )),
            "03000000 0700000000000000 01000000 04000000 00 00",
        );
    }

    #[test]
    fn stream_close_matches_wire_examples() {
        let close = |logical_stream_id, code, reason: Option<&str>| {
            ProtocolMessage::StreamClose(StreamClose {
                logical_stream_id,
                code,
                reason: reason.map(str::to_owned),
            })
        };
        assert_wire(
            close(3, CloseCode::Normal, None),
            "04000000 0300000000000000 00000000 00",
        );
        assert_wire(
            close(0, CloseCode::Error, Some("x")),
            "04000000 0000000000000000 01000000 01 0100000000000000 78",
        );
        assert_wire(
            close(3, CloseCode::Reset, None),
            "04000000 0300000000000000 03000000 00",
        );
    }

    #[test]
    fn ping_and_pong_match_wire_examples() {
        assert_wire(
            ProtocolMessage::Ping(Ping { sequence: 1 }),
            "05000000 0100000000000000",
        );
        assert_wire(
            ProtocolMessage::Pong(Pong { sequence: 258 }),
            "06000000 0201000000000000",
        );
    }

    #[test]
    fn every_reject_and_close_code_has_its_declaration_index() {
        let reject_codes = [
            RejectCode::ServiceUnavailable,
            RejectCode::UnsupportedService,
            RejectCode::LimitExceeded,
            RejectCode::Unauthorized,
            RejectCode::InternalError,
        ];
        for (index, code) in (0u32..).zip(reject_codes) {
            let bytes = encode(&ProtocolMessage::OpenResponse(OpenResponse::rejected(
                1, code, None,
            )));
            assert_eq!(bytes[16..20], index.to_le_bytes());
            assert_eq!(
                decode_payload(&bytes),
                Ok(ProtocolMessage::OpenResponse(OpenResponse::rejected(
                    1, code, None
                )))
            );
        }
        let close_codes = [
            CloseCode::Normal,
            CloseCode::Error,
            CloseCode::Timeout,
            CloseCode::Reset,
        ];
        for (index, code) in (0u32..).zip(close_codes) {
            let message = ProtocolMessage::StreamClose(StreamClose {
                logical_stream_id: 1,
                code,
                reason: None,
            });
            let bytes = encode(&message);
            assert_eq!(bytes[12..16], index.to_le_bytes());
            assert_eq!(decode_payload(&bytes), Ok(message));
        }
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let mut bytes = hex("05000000 0100000000000000");
        bytes.extend_from_slice(b"junk");
        assert_eq!(
            decode_payload(&bytes),
            Ok(ProtocolMessage::Ping(Ping { sequence: 1 }))
        );
    }

    #[test]
    fn unknown_flag_bits_are_kept() {
        let hello = decode_payload(&hex("00000000 0100 ffffffff 00")).unwrap();
        let ProtocolMessage::Hello(hello) = hello else {
            panic!("expected Hello, got {hello:?}")
        };
        assert_eq!(hello.features.bits(), u32::MAX);

        let request = decode_payload(&hex(
            "02000000 0700000000000000 0000000000000000 00000000 f1",
        ))
        .unwrap();
        let ProtocolMessage::OpenRequest(request) = request else {
            panic!("expected OpenRequest, got {request:?}")
        };
        assert_eq!(request.flags.bits(), 0xf1);
        assert_eq!(encode(&ProtocolMessage::OpenRequest(request))[24], 0xf1);
    }

    #[test]
    fn repeated_metadata_key_keeps_the_last_value() {
        let bytes = hex("02000000 0100000000000000 0000000000000000
             02000000 0200000000000000
             0100000000000000 6b 01000000 0100000000000000
             0100000000000000 6b 01000000 0200000000000000
             00");
        assert_eq!(
            decode_payload(&bytes),
            Ok(open_request(
                1,
                "",
                structured("k", MetadataValue::Integer(2)),
                OpenFlags::empty()
            ))
        );
    }

    #[test]
    fn entry_count_bound_admits_the_smallest_entries() {
        // Three entries of exactly MIN_METADATA_ENTRY_SIZE bytes (empty key, Boolean), so the
        // count check must not demand even one byte more per entry.
        let mut bytes = hex("02000000 0100000000000000 0000000000000000 02000000 0300000000000000");
        for value in ["00", "01", "00"] {
            bytes.extend(hex(&format!("0000000000000000 02000000 {value}")));
        }
        bytes.push(0); // flags
        assert_eq!(
            decode_payload(&bytes),
            Ok(open_request(
                1,
                "",
                structured("", MetadataValue::Boolean(false)),
                OpenFlags::empty()
            ))
        );
    }

    #[test]
    fn every_strict_prefix_is_truncated() {
        let message = open_request(
            9,
            "svc",
            structured("k", MetadataValue::String("value".into())),
            OpenFlags::UNIDIRECTIONAL,
        );
        let bytes = encode(&message);
        for len in 0..bytes.len() {
            match decode_payload(&bytes[..len]) {
                Err(ProtocolError::Truncated { .. } | ProtocolError::LengthOutOfBounds { .. }) => {}
                other => panic!("prefix of {len} bytes gave {other:?}"),
            }
        }
    }

    #[test]
    fn truncation_reports_the_field_and_missing_bytes() {
        assert_eq!(
            decode_payload(&hex("05000000 010000")),
            Err(ProtocolError::Truncated {
                field: "Ping.sequence",
                needed: 5
            })
        );
        assert_eq!(
            decode_payload(&[]),
            Err(ProtocolError::Truncated {
                field: "ProtocolMessage",
                needed: 4
            })
        );
    }

    #[test]
    fn unknown_tags_are_rejected() {
        let cases = [
            ("07000000", "ProtocolMessage", 7),
            ("ffffffff", "ProtocolMessage", u32::MAX),
            (
                "02000000 0100000000000000 0000000000000000 03000000 00",
                "Metadata",
                3,
            ),
            (
                "02000000 0100000000000000 0000000000000000
                 02000000 0100000000000000 0000000000000000 04000000 00",
                "MetadataValue",
                4,
            ),
            ("03000000 0100000000000000 02000000 00 00", "OpenStatus", 2),
            (
                "03000000 0100000000000000 01000000 05000000 00 00",
                "RejectCode",
                5,
            ),
            ("04000000 0100000000000000 04000000 00", "CloseCode", 4),
        ];
        for (bytes, kind, tag) in cases {
            assert_eq!(
                decode_payload(&hex(bytes)),
                Err(ProtocolError::UnknownTag { kind, tag }),
                "{bytes}"
            );
        }
    }

    #[test]
    fn bool_and_option_bytes_other_than_0_and_1_are_rejected() {
        let cases = [
            ("00000000 0100 00000000 02", "Hello.agent", 2),
            (
                "03000000 0100000000000000 00000000 ff",
                "OpenResponse.reason",
                0xff,
            ),
            (
                "03000000 0100000000000000 00000000 00 02",
                "OpenResponse.logical_stream_id",
                2,
            ),
            (
                "04000000 0100000000000000 00000000 80",
                "StreamClose.reason",
                0x80,
            ),
            (
                "02000000 0100000000000000 0000000000000000
                 02000000 0100000000000000 0000000000000000 02000000 02 00",
                "MetadataValue::Boolean",
                2,
            ),
        ];
        for (bytes, field, value) in cases {
            assert_eq!(
                decode_payload(&hex(bytes)),
                Err(ProtocolError::InvalidByte { field, value }),
                "{bytes}"
            );
        }
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        assert_eq!(
            decode_payload(&hex("00000000 0100 00000000 01 0200000000000000 c328")),
            Err(ProtocolError::InvalidUtf8 {
                field: "Hello.agent"
            })
        );
        assert_eq!(
            decode_payload(&hex(
                "02000000 0100000000000000 0100000000000000 ff 00000000 00"
            )),
            Err(ProtocolError::InvalidUtf8 {
                field: "OpenRequest.service"
            })
        );
    }

    #[test]
    fn huge_lengths_are_rejected_before_allocating() {
        assert_eq!(
            decode_payload(&hex("00000000 0100 00000000 01 ffffffffffffffff 6162")),
            Err(ProtocolError::LengthOutOfBounds {
                field: "Hello.agent",
                len: u64::MAX,
                remaining: 2
            })
        );
        assert_eq!(
            decode_payload(&hex(
                "02000000 0100000000000000 0000000000000000 01000000 0300000000000000 0102"
            )),
            Err(ProtocolError::LengthOutOfBounds {
                field: "Metadata::Bytes",
                len: 3,
                remaining: 2
            })
        );
        // A map count is bounded by the smallest possible entry, not just by one byte each.
        let mut entries =
            hex("02000000 0100000000000000 0000000000000000 02000000 0200000000000000");
        entries.extend_from_slice(&[0; 2 * MIN_METADATA_ENTRY_SIZE - 1]);
        assert!(matches!(
            decode_payload(&entries),
            Err(ProtocolError::LengthOutOfBounds {
                field: "Metadata::Structured",
                len: 2,
                ..
            })
        ));
        assert!(matches!(
            decode_payload(&hex(
                "02000000 0100000000000000 0000000000000000 02000000 ffffffffffffffff"
            )),
            Err(ProtocolError::LengthOutOfBounds { len: u64::MAX, .. })
        ));
    }
}
