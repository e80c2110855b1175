//! Copying bytes both ways between two connections, keeping half-close and telling a clean
//! end from a broken one.
//!
//! `tokio::io::copy_bidirectional` already half-closes, but when it fails the caller cannot
//! tell which side broke, and both connections are then simply dropped. For a tunnel that is
//! wrong twice over: dropping a QUIC stream *finishes* it, and dropping a TCP socket sends a
//! FIN, so the far end would see a truncated transfer end cleanly. [`splice`] reports which
//! side failed, and the caller aborts the other one (a TCP reset, a QUIC stream reset).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// The direction *from* the failed side ended cleanly (all of it written, then the
    /// other side's writer shut down): only what was sent *to* the failed side was lost.
    /// The caller should then stop reading the other side rather than abort it, or the
    /// answer it was just given could be discarded.
    pub answer_delivered: bool,
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
/// (half-close) and the other direction goes on. When a read fails, the splice stops at
/// once and says which side failed; the caller should then abort the *other* side rather
/// than close it gracefully.
///
/// When a write fails, the side written to stopped taking bytes: a service that answered
/// early (a `413` before the upload's end) and closed. Its answer is still on its way
/// back, so only that direction stops; the other goes on to its end, and then the splice
/// reports the failure, with [`SpliceError::answer_delivered`] telling whether the answer
/// got through whole. A connection reset read from a side that left bytes unread is that
/// side's close (the kernel resets a socket closed with unread input): its direction ends
/// cleanly, after everything the side sent before it.
pub async fn splice<A, B>(first: &mut A, second: &mut B) -> Result<Spliced, SpliceError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    splice_until_stopped(
        first,
        second,
        std::future::pending(),
        std::future::pending(),
    )
    .await
}

/// [`splice`], where a side may say that its peer stopped reading (`first_stopped`,
/// `second_stopped`: a QUIC stream's [`stopped`](crate::stream::TunnelStream::stopped)).
/// The direction toward that side then ends at once, without waiting for its next write
/// to fail: a tunnel stream whose far end is done no longer holds the connection on the
/// other side open until that one sends again or closes.
pub async fn splice_until_stopped<A, B>(
    first: &mut A,
    second: &mut B,
    first_stopped: impl Future<Output = ()>,
    second_stopped: impl Future<Output = ()>,
) -> Result<Spliced, SpliceError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut first_read, mut first_write) = tokio::io::split(first);
    let (mut second_read, mut second_write) = tokio::io::split(second);
    // Set while a direction holds bytes its writer has not taken (or never will). Both
    // directions run in this task: atomics only to keep the future `Send`.
    let (to_second, to_first) = (AtomicBool::new(false), AtomicBool::new(false));
    // Bytes each direction has written so far.
    let (forward_bytes, backward_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let forward = copy_half(
        &mut first_read,
        &mut second_write,
        (&to_second, &to_first),
        &forward_bytes,
    );
    let backward = copy_half(
        &mut second_read,
        &mut first_write,
        (&to_first, &to_second),
        &backward_bytes,
    );
    tokio::pin!(forward, backward, first_stopped, second_stopped);
    let (mut forward_done, mut backward_done) = (false, false);
    let carried = || Spliced {
        forward: forward_bytes.load(Ordering::Relaxed),
        backward: backward_bytes.load(Ordering::Relaxed),
    };
    // A failed write, reported once the other direction ended: (side, error, the other
    // direction's result).
    let mut refused: Option<(Side, io::Error)> = None;
    while !(forward_done && backward_done) {
        let (direction, result) = tokio::select! {
            result = &mut forward, if !forward_done => {
                forward_done = true;
                (Direction::Forward, result)
            }
            result = &mut backward, if !backward_done => {
                backward_done = true;
                (Direction::Backward, result)
            }
            () = &mut first_stopped, if !backward_done => {
                // Nothing written to the first side is read any more.
                backward_done = true;
                continue;
            }
            () = &mut second_stopped, if !forward_done => {
                forward_done = true;
                continue;
            }
        };
        match result {
            Ok(()) => {}
            Err((half, error)) => {
                let side = direction.side(half);
                if half == Half::Writer && refused.is_none() {
                    refused = Some((side, error));
                    continue;
                }
                return Err(SpliceError {
                    side,
                    error,
                    carried: carried(),
                    answer_delivered: false,
                });
            }
        }
    }
    match refused {
        None => Ok(carried()),
        Some((side, error)) => Err(SpliceError {
            side,
            error,
            carried: carried(),
            answer_delivered: true,
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// First → second.
    Forward,
    /// Second → first.
    Backward,
}

impl Direction {
    /// The side whose `half` failed in this direction.
    fn side(self, half: Half) -> Side {
        match (self, half) {
            (Self::Forward, Half::Reader) | (Self::Backward, Half::Writer) => Side::First,
            (Self::Forward, Half::Writer) | (Self::Backward, Half::Reader) => Side::Second,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    Reader,
    Writer,
}

/// One direction: read until the end, write everything, then shut the writer down,
/// counting what was written in `written`. `holding` is set while this direction has
/// bytes its writer has not taken; `unread` is the other direction's, which holds bytes
/// for this direction's reader.
async fn copy_half<R, W>(
    reader: &mut R,
    writer: &mut W,
    (holding, unread): (&AtomicBool, &AtomicBool),
    written: &AtomicU64,
) -> Result<(), (Half, io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0; BUFFER];
    loop {
        let read = match reader.read(&mut buffer).await {
            Ok(0) => break,
            Ok(read) => read,
            // The reader's side closed with our bytes unread: everything it sent came
            // before the reset.
            Err(error)
                if error.kind() == io::ErrorKind::ConnectionReset
                    && unread.load(Ordering::Relaxed) =>
            {
                break
            }
            Err(error) => return Err((Half::Reader, error)),
        };
        holding.store(true, Ordering::Relaxed);
        if let Err(error) = writer.write_all(&buffer[..read]).await {
            return Err((Half::Writer, error));
        }
        holding.store(false, Ordering::Relaxed);
        written.fetch_add(read as u64, Ordering::Relaxed);
    }
    writer
        .shutdown()
        .await
        .map_err(|error| (Half::Writer, error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    #[tokio::test]
    async fn a_side_that_stopped_reading_ends_the_direction_toward_it() {
        let (mut a, mut a_far) = tokio::io::duplex(64 * 1024);
        let (mut b, mut b_far) = tokio::io::duplex(64 * 1024);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let splice = tokio::spawn(async move {
            let stopped = async move {
                let _ = stopped.await;
            };
            splice_until_stopped(&mut a, &mut b, std::future::pending(), stopped).await
        });
        // `b`'s far end answers and closes; `a`'s far end neither sends nor closes.
        b_far.write_all(b"answer").await.unwrap();
        b_far.shutdown().await.unwrap();
        let mut answer = [0u8; 6];
        a_far.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!splice.is_finished(), "the first side may still send");
        // `b` says its peer stopped reading: nothing `a` sends could go anywhere.
        stop.send(()).unwrap();
        let carried = tokio::time::timeout(Duration::from_secs(5), splice)
            .await
            .expect("the splice ended")
            .unwrap()
            .unwrap();
        assert_eq!(
            carried,
            Spliced {
                forward: 0,
                backward: 6
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

    /// A TCP service that answers at once and closes with its input unread (the kernel
    /// then resets the connection): the answer reaches the other side whole and ends
    /// cleanly, and the splice reports the refused input.
    #[tokio::test]
    async fn an_answer_before_the_input_ends_is_delivered_whole() {
        const ANSWER: &[u8] = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n";
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let service_addr = listener.local_addr().unwrap();
        let service = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = tcp.read(&mut head).await.unwrap();
            tcp.write_all(ANSWER).await.unwrap();
            // Closed with the upload unread: a reset, not a FIN.
            drop(tcp);
        });
        let mut service_side = tokio::net::TcpStream::connect(service_addr).await.unwrap();
        let (mut client_side, mut client) = tokio::io::duplex(64 * 1024);
        let splice = tokio::spawn(async move { splice(&mut client_side, &mut service_side).await });
        // The client uploads far more than the kernel buffers hold, and reads meanwhile.
        let upload = tokio::spawn(async move {
            let (mut reading, mut writing) = tokio::io::split(&mut client);
            let sending = async {
                let chunk = vec![5u8; 64 * 1024];
                for _ in 0..1024 {
                    if writing.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            };
            let mut answer = Vec::new();
            let receiving = reading.read_to_end(&mut answer);
            let ((), received) = tokio::join!(sending, receiving);
            (received, answer)
        });
        service.await.unwrap();
        let error = splice.await.unwrap().unwrap_err();
        assert_eq!(error.side, Side::Second);
        assert!(error.answer_delivered, "{error}");
        assert_eq!(error.carried.backward, ANSWER.len() as u64);
        // What the client sees here, the far end of the splice would see: the answer
        // and a clean end. (The upload side: the caller stops it.)
        drop(error);
        let (received, answer) = upload.await.unwrap();
        received.expect("a clean end after the answer");
        assert_eq!(answer, ANSWER);
    }

    /// A reset from a side that had taken everything sent to it is no close: the splice
    /// fails at once, naming that side.
    #[tokio::test]
    async fn a_reset_with_nothing_unread_is_a_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let service_addr = listener.local_addr().unwrap();
        let service = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // SO_LINGER 0: close sends a reset.
            tcp.set_zero_linger().unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            drop(tcp);
        });
        let mut service_side = tokio::net::TcpStream::connect(service_addr).await.unwrap();
        let (mut client_side, _client) = tokio::io::duplex(64 * 1024);
        let error = splice(&mut client_side, &mut service_side)
            .await
            .unwrap_err();
        service.await.unwrap();
        assert_eq!(error.side, Side::Second);
        assert_eq!(error.error.kind(), io::ErrorKind::ConnectionReset);
        assert!(!error.answer_delivered);
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
