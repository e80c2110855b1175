//! Reading and writing frames on the control stream.
//!
//! The reader keeps one growing buffer and asks [`decode_frame`] whether a whole frame is
//! there before parsing (check, then parse), so a frame split across packets costs no copy
//! and an oversized length is refused before any of its body is read.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;
use crate::protocol::{decode_frame, encode_frame, ProtocolError, ProtocolMessage};

/// Reads control messages from the receiving half of the control stream.
#[derive(Debug)]
pub(crate) struct ControlReader<R> {
    recv: R,
    buffer: BytesMut,
}

/// Bytes read at a time: control frames are tens of bytes, and an idle session keeps this
/// buffer for its whole life (a frame larger than it grows it as needed).
const READ_CHUNK: usize = 1024;
/// Room below which the buffer is grown (or its consumed front reclaimed) before a read.
const MIN_READ: usize = 256;

impl<R: AsyncRead + Unpin> ControlReader<R> {
    pub(crate) fn new(recv: R) -> Self {
        Self {
            recv,
            buffer: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream between frames.
    pub(crate) async fn read_message(&mut self) -> Result<Option<ProtocolMessage>, Error> {
        loop {
            if let Some(message) = decode_frame(&mut self.buffer)? {
                return Ok(Some(message));
            }
            if self.buffer.capacity() - self.buffer.len() < MIN_READ {
                self.buffer.reserve(READ_CHUNK);
            }
            let read = self
                .recv
                .read_buf(&mut self.buffer)
                .await
                .map_err(|_| Error::Disconnected)?;
            if read == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtocolError::Truncated {
                        field: "frame (stream ended mid-frame)",
                        needed: 1,
                    }
                    .into())
                };
            }
        }
    }
}

/// Encodes `message` as one frame.
pub(crate) fn frame(message: &ProtocolMessage) -> Result<bytes::Bytes, Error> {
    let mut buffer = BytesMut::with_capacity(64);
    encode_frame(message, &mut buffer)?;
    Ok(buffer.freeze())
}

/// Writes one message and flushes it (used during the handshake, before the writer task).
pub(crate) async fn write_message<S: AsyncWrite + Unpin>(
    send: &mut S,
    message: &ProtocolMessage,
) -> Result<(), Error> {
    let bytes = frame(message)?;
    send.write_all(&bytes)
        .await
        .map_err(|_| Error::Disconnected)?;
    send.flush().await.map_err(|_| Error::Disconnected)?;
    Ok(())
}
