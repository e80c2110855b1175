//! The control stream's framing: a u32 big-endian payload length, then the payload.
//!
//! The control stream is a byte stream, so messages need boundaries; quic-reverse 0.1.2 puts a
//! 4-byte big-endian length in front of each payload and refuses payloads over
//! [`MAX_FRAME_SIZE`]. The limit is what makes buffering a peer's frame safe: a reader never
//! holds more than 64 KiB + 4 bytes for one message, and an oversized announcement is refused
//! as soon as its 4 prefix bytes arrive, before any of its body is awaited or buffered.
//!
//! Decoding follows mini-redis's *check, then parse*: [`decode_frame`] first looks at the
//! buffer without consuming it and returns `Ok(None)` until a whole frame is there, so the
//! caller can simply read more bytes into the same buffer and call it again. Callers that read
//! the prefix themselves (for example with `read_exact`) can validate it with [`payload_len`].

use bytes::BytesMut;

use super::{decode_payload, encode_payload, ProtocolError, ProtocolMessage};

/// Largest payload a frame may carry (64 KiB), as in quic-reverse 0.1.2.
pub const MAX_FRAME_SIZE: usize = 65_536;

/// Size of the big-endian length prefix in front of every payload.
pub const LENGTH_PREFIX_SIZE: usize = 4;

/// Appends `message` to `dst` as one length-prefixed frame.
///
/// The payload is encoded straight into `dst` behind a placeholder prefix, which is then
/// patched with the real length, so no intermediate buffer is allocated.
///
/// # Errors
///
/// [`ProtocolError::FrameTooLarge`] if the payload would exceed [`MAX_FRAME_SIZE`]; `dst` is
/// then left as it was.
///
/// # Examples
///
/// ```
/// use backhaul::protocol::{encode_frame, Ping, ProtocolMessage};
/// use bytes::BytesMut;
///
/// let mut buf = BytesMut::new();
/// encode_frame(&ProtocolMessage::Ping(Ping { sequence: 1 }), &mut buf)?;
/// assert_eq!(&buf[..4], &[0, 0, 0, 12]);
/// assert_eq!(buf.len(), 4 + 12);
/// # Ok::<(), backhaul::protocol::ProtocolError>(())
/// ```
pub fn encode_frame(message: &ProtocolMessage, dst: &mut BytesMut) -> Result<(), ProtocolError> {
    let start = dst.len();
    dst.extend_from_slice(&[0; LENGTH_PREFIX_SIZE]);
    encode_payload(message, dst);
    let payload_len = dst.len() - start - LENGTH_PREFIX_SIZE;
    match u32::try_from(payload_len) {
        Ok(prefix) if payload_len <= MAX_FRAME_SIZE => {
            dst[start..start + LENGTH_PREFIX_SIZE].copy_from_slice(&prefix.to_be_bytes());
            Ok(())
        }
        _ => {
            dst.truncate(start);
            Err(ProtocolError::FrameTooLarge {
                len: payload_len,
                max: MAX_FRAME_SIZE,
            })
        }
    }
}

/// Validates a length prefix and returns the payload length it announces.
///
/// # Errors
///
/// [`ProtocolError::FrameTooLarge`] if the length exceeds [`MAX_FRAME_SIZE`].
///
/// # Examples
///
/// ```
/// use backhaul::protocol::frame::payload_len;
///
/// assert_eq!(payload_len([0, 0, 0, 12]), Ok(12));
/// assert!(payload_len([0, 1, 0, 1]).is_err()); // 65 537 bytes
/// ```
pub fn payload_len(prefix: [u8; LENGTH_PREFIX_SIZE]) -> Result<usize, ProtocolError> {
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len > MAX_FRAME_SIZE {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_FRAME_SIZE,
        });
    }
    Ok(len)
}

/// Takes one whole frame off the front of `src` and decodes it; `Ok(None)` if `src` holds
/// only part of a frame (nothing is consumed then).
///
/// When only part of a frame is buffered, `src` is given enough capacity for the rest.
///
/// # Errors
///
/// - [`ProtocolError::FrameTooLarge`] as soon as the prefix announces more than
///   [`MAX_FRAME_SIZE`]; nothing is consumed.
/// - Any payload error of [`decode_payload`]; the malformed frame has then been consumed.
///
/// Either way the stream cannot be trusted any further and the session should end.
///
/// # Examples
///
/// ```
/// use backhaul::protocol::{decode_frame, Ping, ProtocolMessage};
/// use bytes::BytesMut;
///
/// let mut buf = BytesMut::from(&[0, 0, 0, 12, 5, 0, 0, 0][..]);
/// assert_eq!(decode_frame(&mut buf)?, None); // half a frame: wait for more
/// assert_eq!(buf.len(), 8);
///
/// buf.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
/// assert_eq!(decode_frame(&mut buf)?, Some(ProtocolMessage::Ping(Ping { sequence: 1 })));
/// assert!(buf.is_empty());
/// # Ok::<(), backhaul::protocol::ProtocolError>(())
/// ```
pub fn decode_frame(src: &mut BytesMut) -> Result<Option<ProtocolMessage>, ProtocolError> {
    let Some(prefix) = src.first_chunk::<LENGTH_PREFIX_SIZE>() else {
        return Ok(None);
    };
    let frame_len = LENGTH_PREFIX_SIZE + payload_len(*prefix)?;
    if src.len() < frame_len {
        src.reserve(frame_len - src.len());
        return Ok(None);
    }
    let frame = src.split_to(frame_len);
    decode_payload(&frame[LENGTH_PREFIX_SIZE..]).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Metadata, OpenRequest, Ping, Pong};

    const PING_FRAME: [u8; 16] = [0, 0, 0, 12, 5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

    fn ping(sequence: u64) -> ProtocolMessage {
        ProtocolMessage::Ping(Ping { sequence })
    }

    /// An `OpenRequest` whose payload is exactly `payload_len` bytes (at least 33).
    fn request_with_payload_len(payload_len: usize) -> ProtocolMessage {
        const OVERHEAD: usize = 4 + 8 + 8 + 4 + 8 + 1;
        ProtocolMessage::OpenRequest(
            OpenRequest::new(1, "").with_metadata(Metadata::Bytes(vec![0; payload_len - OVERHEAD])),
        )
    }

    #[test]
    fn ping_frame_matches_wire_example() {
        let mut buf = BytesMut::new();
        encode_frame(&ping(1), &mut buf).unwrap();
        assert_eq!(&buf[..], PING_FRAME);
        assert_eq!(decode_frame(&mut buf), Ok(Some(ping(1))));
        assert!(buf.is_empty());
    }

    #[test]
    fn encode_appends_after_existing_bytes() {
        let mut buf = BytesMut::from(&b"xy"[..]);
        encode_frame(&ping(1), &mut buf).unwrap();
        assert_eq!(&buf[..2], b"xy");
        assert_eq!(&buf[2..], PING_FRAME);
    }

    #[test]
    fn largest_frame_round_trips() {
        let message = request_with_payload_len(MAX_FRAME_SIZE);
        let mut buf = BytesMut::new();
        encode_frame(&message, &mut buf).unwrap();
        assert_eq!(buf.len(), LENGTH_PREFIX_SIZE + MAX_FRAME_SIZE);
        assert_eq!(&buf[..4], &[0, 1, 0, 0]);
        assert_eq!(decode_frame(&mut buf), Ok(Some(message)));
    }

    #[test]
    fn oversized_payload_is_refused_and_leaves_dst_unchanged() {
        let mut buf = BytesMut::from(&b"xy"[..]);
        assert_eq!(
            encode_frame(&request_with_payload_len(MAX_FRAME_SIZE + 1), &mut buf),
            Err(ProtocolError::FrameTooLarge {
                len: MAX_FRAME_SIZE + 1,
                max: MAX_FRAME_SIZE
            })
        );
        assert_eq!(&buf[..], b"xy");
    }

    #[test]
    fn oversized_announcement_is_refused_before_the_body_arrives() {
        for prefix in [[0, 1, 0, 1], [0xff; 4]] {
            let mut buf = BytesMut::from(&prefix[..]);
            assert!(matches!(
                decode_frame(&mut buf),
                Err(ProtocolError::FrameTooLarge {
                    max: MAX_FRAME_SIZE,
                    ..
                })
            ));
            assert_eq!(&buf[..], prefix, "nothing consumed");
        }
        assert_eq!(
            payload_len([0, 1, 0, 1]),
            Err(ProtocolError::FrameTooLarge {
                len: MAX_FRAME_SIZE + 1,
                max: MAX_FRAME_SIZE
            })
        );
        assert_eq!(payload_len([0, 1, 0, 0]), Ok(MAX_FRAME_SIZE));
    }

    #[test]
    fn partial_frames_wait_without_consuming() {
        for len in 0..PING_FRAME.len() {
            let mut buf = BytesMut::from(&PING_FRAME[..len]);
            assert_eq!(decode_frame(&mut buf), Ok(None), "{len} bytes buffered");
            assert_eq!(&buf[..], &PING_FRAME[..len]);
        }
    }

    #[test]
    fn partial_frame_reserves_room_for_the_rest() {
        let mut buf = BytesMut::from(&[0, 0, 0x10, 0][..]);
        assert_eq!(decode_frame(&mut buf), Ok(None));
        assert!(buf.capacity() >= LENGTH_PREFIX_SIZE + 0x1000);
    }

    #[test]
    fn byte_at_a_time_delivery_yields_each_frame_once() {
        let mut wire = BytesMut::new();
        encode_frame(&ping(1), &mut wire).unwrap();
        encode_frame(&ProtocolMessage::Pong(Pong { sequence: 2 }), &mut wire).unwrap();

        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for &byte in &wire {
            buf.extend_from_slice(&[byte]);
            if let Some(message) = decode_frame(&mut buf).unwrap() {
                decoded.push(message);
            }
        }
        assert_eq!(
            decoded,
            [ping(1), ProtocolMessage::Pong(Pong { sequence: 2 })]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_payload_is_an_error_and_consumes_its_frame() {
        let mut buf = BytesMut::from(&[0, 0, 0, 4, 9, 0, 0, 0, 0xaa][..]);
        assert_eq!(
            decode_frame(&mut buf),
            Err(ProtocolError::UnknownTag {
                kind: "ProtocolMessage",
                tag: 9
            })
        );
        assert_eq!(&buf[..], &[0xaa]);
    }

    #[test]
    fn empty_and_short_payloads_are_truncated_messages() {
        let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
        assert!(matches!(
            decode_frame(&mut buf),
            Err(ProtocolError::Truncated { .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_ignored() {
        let mut buf =
            BytesMut::from(&[0, 0, 0, 14, 5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xee, 0xee][..]);
        assert_eq!(decode_frame(&mut buf), Ok(Some(ping(1))));
        assert!(buf.is_empty());
    }
}
