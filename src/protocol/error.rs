//! Why bytes from the peer could not be understood.

/// A decoding or encoding failure of the wire protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame announced (or a message needs) more than [`MAX_FRAME_SIZE`](super::MAX_FRAME_SIZE) bytes.
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    FrameTooLarge {
        /// The announced or needed length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload ended before the message did.
    #[error("message truncated: needed {needed} more bytes for {field}")]
    Truncated {
        /// What was being read.
        field: &'static str,
        /// How many bytes were missing.
        needed: usize,
    },
    /// An enum tag (message kind, metadata kind, code…) has no meaning.
    #[error("unknown {kind} tag {tag}")]
    UnknownTag {
        /// Which enum.
        kind: &'static str,
        /// The value seen.
        tag: u32,
    },
    /// A bool or option byte was neither 0 nor 1.
    #[error("invalid {field} byte {value:#04x}")]
    InvalidByte {
        /// What was being read.
        field: &'static str,
        /// The value seen.
        value: u8,
    },
    /// A string was not UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// What was being read.
        field: &'static str,
    },
    /// A length inside the payload exceeds what remains of it.
    #[error("{field} length {len} exceeds the {remaining} bytes left in the frame")]
    LengthOutOfBounds {
        /// What was being read.
        field: &'static str,
        /// The announced length.
        len: u64,
        /// Bytes left in the payload.
        remaining: usize,
    },
    /// A flags field has bits this version does not define.
    #[error("unknown {field} bits {bits:#x}")]
    UnknownFlags {
        /// Which flags.
        field: &'static str,
        /// The raw value.
        bits: u32,
    },
    /// A data stream did not start with the `QRBV` magic.
    #[error("stream bind magic mismatch: {found:02x?}")]
    BadBindMagic {
        /// The four bytes seen.
        found: [u8; 4],
    },
    /// A data stream's bind header has an unknown version.
    #[error("unsupported stream bind version {0}")]
    UnsupportedBindVersion(u8),
}
