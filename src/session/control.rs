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

/// Bytes read at a time while a frame is incomplete: control frames are tens of bytes
/// (a frame larger than this grows the buffer as needed).
const READ_CHUNK: usize = 1024;
/// Room below which the buffer is grown (or its consumed front reclaimed) before a read.
const MIN_READ: usize = 256;
/// Capacity above which an empty buffer is let go before waiting for the next frame: an
/// idle session waits for its whole life, and `read_buf` gives an empty buffer only a
/// few dozen bytes to wait with.
const IDLE_CAPACITY: usize = 128;

impl<R: AsyncRead + Unpin> ControlReader<R> {
    pub(crate) fn new(recv: R) -> Self {
        Self {
            recv,
            buffer: BytesMut::new(),
        }
    }

    /// A reader of a stream of which `read` was already read.
    pub(crate) fn with_read(recv: R, read: &[u8]) -> Self {
        Self {
            recv,
            buffer: BytesMut::from(read),
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream between frames.
    pub(crate) async fn read_message(&mut self) -> Result<Option<ProtocolMessage>, Error> {
        loop {
            if let Some(message) = decode_frame(&mut self.buffer)? {
                return Ok(Some(message));
            }
            if self.buffer.is_empty() {
                if self.buffer.capacity() > IDLE_CAPACITY {
                    self.buffer = BytesMut::new();
                }
            } else if self.buffer.capacity() - self.buffer.len() < MIN_READ {
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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::protocol::Ping;

    fn ping(sequence: u64) -> ProtocolMessage {
        ProtocolMessage::Ping(Ping { sequence })
    }

    #[tokio::test]
    async fn an_idle_reader_keeps_no_read_chunk() {
        let (mut peer, recv) = tokio::io::duplex(4096);
        let mut reader = ControlReader::new(recv);
        // A burst of frames larger than a read chunk, split at an odd place.
        let mut burst = Vec::new();
        for sequence in 0..200 {
            burst.extend_from_slice(&frame(&ping(sequence)).unwrap());
        }
        peer.write_all(&burst[..777]).await.unwrap();
        let reading = tokio::spawn(async move {
            for sequence in 0..200 {
                assert_eq!(reader.read_message().await.unwrap(), Some(ping(sequence)));
            }
            reader
        });
        tokio::task::yield_now().await;
        peer.write_all(&burst[777..]).await.unwrap();
        let mut reader = reading.await.unwrap();
        assert!(reader.buffer.is_empty());

        // Waiting for the next frame, it holds only what an empty read needs.
        {
            let next = pin!(reader.read_message());
            let polled = next.poll(&mut Context::from_waker(Waker::noop()));
            assert!(matches!(polled, Poll::Pending));
        }
        assert!(reader.buffer.capacity() <= IDLE_CAPACITY);

        peer.write_all(&frame(&ping(7)).unwrap()).await.unwrap();
        drop(peer);
        assert_eq!(reader.read_message().await.unwrap(), Some(ping(7)));
        assert_eq!(reader.read_message().await.unwrap(), None);
    }
}
