//! Joining two streams byte for byte, keeping both half-closes and failures.
//!
//! `tokio::io::copy_bidirectional` would do the copying, but it ends each direction with
//! `shutdown`, and a QUIC stream that is dropped unfinished is finished too: a stream
//! that failed half-way would reach the other side as a clean end, and a truncated
//! response would pass for a complete one. Here a clean end (EOF) finishes the other
//! stream, while a failed read *resets* it and a failed write *stops* the stream being
//! read, so each side sees exactly what the other saw.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::transport::{RecvStream, SendStream};

/// The application code of resets and stops sent when the other leg failed.
pub const SPLICE_FAILED: u32 = 0x50;

/// Copy buffer per direction.
const BUFFER: usize = 64 * 1024;

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// EOF read and passed on, after this many bytes.
    Finished(u64),
    /// The read side failed; the write side was reset.
    ReadFailed,
    /// The write side failed; the read side was stopped.
    WriteFailed,
}

/// Copies `from` to `to` until EOF (then finishes `to`) or a failure (then resets or
/// stops the other end).
pub(super) async fn pipe<R: RecvStream, W: SendStream>(from: &mut R, to: &mut W) -> Ended {
    let mut buffer = vec![0u8; BUFFER];
    let mut copied = 0u64;
    loop {
        match from.read(&mut buffer).await {
            Ok(0) => {
                // `finish` queues the end after the data written; a stream that cannot be
                // finished was reset by its reader, who knows.
                return match to.finish().await {
                    Ok(()) => Ended::Finished(copied),
                    Err(_) => Ended::WriteFailed,
                };
            }
            Ok(read) => {
                if to.write_all(&buffer[..read]).await.is_err() {
                    from.stop(SPLICE_FAILED);
                    return Ended::WriteFailed;
                }
                copied += read as u64;
            }
            Err(_) => {
                to.reset(SPLICE_FAILED);
                return Ended::ReadFailed;
            }
        }
    }
}

/// Copies both ways until both directions ended.
pub(super) async fn splice<R1, W1, R2, W2>(
    (send_a, recv_a): (&mut W1, &mut R1),
    (send_b, recv_b): (&mut W2, &mut R2),
) -> (Ended, Ended)
where
    R1: RecvStream,
    W1: SendStream,
    R2: RecvStream,
    W2: SendStream,
{
    tokio::join!(pipe(recv_a, send_b), pipe(recv_b, send_a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::mem::memory_connection_pair;
    use crate::transport::Connection;

    #[tokio::test]
    async fn bytes_and_ends_pass_both_ways() {
        // left client <-> (a | splice | b) <-> right client
        let (left, a) = memory_connection_pair();
        let (b, right) = memory_connection_pair();
        let (accepted_a, opened_left) = tokio::join!(a.accept_bi(), left.open_bi());
        let (mut left_send, mut left_recv) = opened_left.unwrap();
        let (mut a_send, mut a_recv) = accepted_a.unwrap().unwrap();
        let (opened_b, accepted_right) = tokio::join!(b.open_bi(), right.accept_bi());
        let (mut b_send, mut b_recv) = opened_b.unwrap();
        let (mut right_send, mut right_recv) = accepted_right.unwrap().unwrap();

        let spliced = tokio::spawn(async move {
            splice((&mut a_send, &mut a_recv), (&mut b_send, &mut b_recv)).await
        });
        left_send.write_all(b"ping").await.unwrap();
        left_send.finish().await.unwrap();
        let mut got = Vec::new();
        right_recv.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        // The other direction is still open after one half-close.
        right_send.write_all(b"pong").await.unwrap();
        right_send.finish().await.unwrap();
        let mut back = Vec::new();
        left_recv.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        assert_eq!(
            spliced.await.unwrap(),
            (Ended::Finished(4), Ended::Finished(4))
        );
    }
}
