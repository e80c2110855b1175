//! The 13-byte header every data stream starts with.
//!
//! An accepted `OpenRequest` is answered on the control stream, but its data travels on a new
//! QUIC stream that the acceptor opens. QUIC gives that stream no name the opener could match
//! to its request, so the acceptor writes this header first: `"QRBV"`, version `1`, then the
//! logical stream id from the `OpenResponse` as a **big-endian** `u64` (unlike the
//! little-endian control payloads). A bad header spoils that one stream only; the caller resets
//! it and the session carries on.

use super::ProtocolError;

/// Binds a data stream to the logical stream id an `OpenResponse` announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamBind {
    /// The logical stream id.
    pub logical_stream_id: u64,
}

impl StreamBind {
    /// `"QRBV"`.
    pub const MAGIC: [u8; 4] = *b"QRBV";
    /// The header version.
    pub const VERSION: u8 = 1;
    /// Header length in bytes.
    pub const ENCODED_SIZE: usize = 13;

    /// A header for `logical_stream_id`.
    #[must_use]
    pub const fn new(logical_stream_id: u64) -> Self {
        Self { logical_stream_id }
    }

    /// The header's bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use backhaul::protocol::StreamBind;
    ///
    /// assert_eq!(StreamBind::new(258).encode(), *b"QRBV\x01\0\0\0\0\0\0\x01\x02");
    /// ```
    #[must_use]
    pub fn encode(&self) -> [u8; Self::ENCODED_SIZE] {
        let mut header = [0; Self::ENCODED_SIZE];
        header[..4].copy_from_slice(&Self::MAGIC);
        header[4] = Self::VERSION;
        header[5..].copy_from_slice(&self.logical_stream_id.to_be_bytes());
        header
    }

    /// Parses a header, saying what is wrong with a bad one.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::BadBindMagic`] if the stream does not start with `"QRBV"` (checked
    /// first), else [`ProtocolError::UnsupportedBindVersion`] if the version is not 1.
    ///
    /// # Examples
    ///
    /// ```
    /// use backhaul::protocol::{ProtocolError, StreamBind};
    ///
    /// let header = StreamBind::new(7).encode();
    /// assert_eq!(StreamBind::parse(&header)?.logical_stream_id, 7);
    ///
    /// let mut newer = header;
    /// newer[4] = 2;
    /// assert_eq!(StreamBind::parse(&newer), Err(ProtocolError::UnsupportedBindVersion(2)));
    /// # Ok::<(), ProtocolError>(())
    /// ```
    pub fn parse(bytes: &[u8; Self::ENCODED_SIZE]) -> Result<Self, ProtocolError> {
        let [m0, m1, m2, m3, version, id @ ..] = *bytes;
        let magic = [m0, m1, m2, m3];
        if magic != Self::MAGIC {
            return Err(ProtocolError::BadBindMagic { found: magic });
        }
        if version != Self::VERSION {
            return Err(ProtocolError::UnsupportedBindVersion(version));
        }
        Ok(Self::new(u64::from_be_bytes(id)))
    }

    /// Parses a header; `None` if it is not a valid one (the reference crate's signature).
    #[must_use]
    pub fn decode(bytes: &[u8; Self::ENCODED_SIZE]) -> Option<Self> {
        Self::parse(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_wire_example() {
        let header = [0x51, 0x52, 0x42, 0x56, 0x01, 0, 0, 0, 0, 0, 0, 0x01, 0x02];
        assert_eq!(StreamBind::new(258).encode(), header);
        assert_eq!(StreamBind::parse(&header), Ok(StreamBind::new(258)));
        assert_eq!(StreamBind::decode(&header), Some(StreamBind::new(258)));
    }

    #[test]
    fn id_is_big_endian() {
        let header = StreamBind::new(0x0102_0304_0506_0708).encode();
        assert_eq!(header[5..], [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn wrong_magic_is_reported_before_wrong_version() {
        let mut header = StreamBind::new(1).encode();
        header[..4].copy_from_slice(b"QRBX");
        header[4] = 9;
        assert_eq!(
            StreamBind::parse(&header),
            Err(ProtocolError::BadBindMagic { found: *b"QRBX" })
        );
        assert_eq!(StreamBind::decode(&header), None);
    }

    #[test]
    fn other_versions_are_refused() {
        for version in [0, 2, 0xff] {
            let mut header = StreamBind::new(1).encode();
            header[4] = version;
            assert_eq!(
                StreamBind::parse(&header),
                Err(ProtocolError::UnsupportedBindVersion(version))
            );
        }
    }
}
