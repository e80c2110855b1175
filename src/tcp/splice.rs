//! Copying bytes both ways between two connections, keeping half-close and telling a clean
//! end from a broken one.
//!
//! `tokio::io::copy_bidirectional` already half-closes, but when it fails the caller cannot
//! tell which side broke, and both connections are then simply dropped. For a tunnel that is
//! wrong twice over: dropping a QUIC stream *finishes* it, and dropping a TCP socket sends a
//! FIN, so the far end would see a truncated transfer end cleanly. [`splice`] reports which
//! side failed, and the caller aborts the other one (a TCP reset, a QUIC stream reset).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes carried by a [`splice`] that ended cleanly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes read from the first connection and written to the second.
    pub forward: u64,
    /// Bytes read from the second connection and written to the first.
    pub backward: u64,
}

/// Which connection of a [`splice`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first connection given to [`splice`].
    First,
    /// The second connection given to [`splice`].
    Second,
}

/// A [`splice`] that did not end cleanly: which side broke, how, and what had crossed.
#[derive(Debug)]
pub struct SpliceError {
    /// The side whose read or write failed.
    pub side: Side,
    /// The failure.
    pub error: io::Error,
    /// Bytes fully written before the failure.
    pub carried: Spliced,
}

impl std::fmt::Display for SpliceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = match self.side {
            Side::First => "first",
            Side::Second => "second",
        };
        write!(
            f,
            "{side} connection failed after {} + {} bytes: {}",
            self.carried.forward, self.carried.backward, self.error
        )
    }
}

impl std::error::Error for SpliceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Size of each direction's copy buffer: large enough that a bulk transfer is not
/// syscall-bound, small enough that a relay holding thousands of idle splices stays cheap
/// (the buffers are allocated when the splice starts and freed when it ends).
const BUFFER: usize = 64 * 1024;

/// Copies `first` → `second` and `second` → `first` until both directions end.
///
/// When one direction reads a clean end, the other connection's write side is shut down
/// (half-close) and the other direction goes on. When any read or write fails, the splice
/// stops at once and says which side failed; the caller should then abort the *other* side
/// rather than close it gracefully.
pub async fn splice<A, B>(first: &mut A, second: &mut B) -> Result<Spliced, SpliceError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut first_read, mut first_write) = tokio::io::split(first);
    let (mut second_read, mut second_write) = tokio::io::split(second);
    let mut carried = Spliced::default();
    let forward = copy_half(&mut first_read, &mut second_write);
    let backward = copy_half(&mut second_read, &mut first_write);
    tokio::pin!(forward, backward);
    let (mut forward_done, mut backward_done) = (false, false);
    while !(forward_done && backward_done) {
        tokio::select! {
            result = &mut forward, if !forward_done => {
                forward_done = true;
                match result {
                    Ok(bytes) => carried.forward = bytes,
                    Err((side, bytes, error)) => {
                        carried.forward = bytes;
                        let side = if side == Half::Reader { Side::First } else { Side::Second };
                        return Err(SpliceError { side, error, carried });
                    }
                }
            }
            result = &mut backward, if !backward_done => {
                backward_done = true;
                match result {
                    Ok(bytes) => carried.backward = bytes,
                    Err((side, bytes, error)) => {
                        carried.backward = bytes;
                        let side = if side == Half::Reader { Side::Second } else { Side::First };
                        return Err(SpliceError { side, error, carried });
                    }
                }
            }
        }
    }
    Ok(carried)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    Reader,
    Writer,
}

/// One direction: read until the end, write everything, then shut the writer down.
async fn copy_half<R, W>(reader: &mut R, writer: &mut W) -> Result<u64, (Half, u64, io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0; BUFFER];
    let mut total = 0u64;
    loop {
        let read = match reader.read(&mut buffer).await {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) => return Err((Half::Reader, total, error)),
        };
        if let Err(error) = writer.write_all(&buffer[..read]).await {
            return Err((Half::Writer, total, error));
        }
        total += read as u64;
    }
    writer
        .shutdown()
        .await
        .map_err(|error| (Half::Writer, total, error))?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_directions_arrive_and_half_close_is_kept() {
        // Buffers larger than the transfer: the far ends read only after writing all.
        let (mut a, mut a_far) = tokio::io::duplex(64 * 1024);
        let (mut b, mut b_far) = tokio::io::duplex(64 * 1024);
        let splice = tokio::spawn(async move { splice(&mut a, &mut b).await });
        // The far end of `a` sends and half-closes; it can still read the answer.
        a_far.write_all(&[7; 5000]).await.unwrap();
        a_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        b_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, vec![7; 5000]);
        b_far.write_all(b"answer after half-close").await.unwrap();
        b_far.shutdown().await.unwrap();
        let mut answer = Vec::new();
        a_far.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer after half-close");
        let carried = splice.await.unwrap().unwrap();
        assert_eq!(
            carried,
            Spliced {
                forward: 5000,
                backward: 23
            }
        );
    }

    /// A reader that yields some bytes, then fails.
    struct Broken(usize);

    impl AsyncRead for Broken {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let n = self.0.min(buf.remaining());
            buf.put_slice(&vec![1; n]);
            self.0 -= n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Broken {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_broken_side_is_named_and_nothing_is_called_clean() {
        let mut broken = Broken(3000);
        let (mut b, mut b_far) = tokio::io::duplex(64 * 1024);
        let error = splice(&mut broken, &mut b).await.unwrap_err();
        assert_eq!(error.side, Side::First);
        assert_eq!(error.error.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(error.carried.forward, 3000);
        // What was read before the failure was delivered; aborting is the caller's call.
        drop(b);
        let mut got = Vec::new();
        b_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 3000);
    }
}
