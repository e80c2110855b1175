use std::sync::Arc;
use std::time::Duration;

use tokio::io::{duplex, AsyncReadExt, DuplexStream};
use tokio::time::timeout;

use super::*;

const LIMIT: Duration = Duration::from_secs(20);

/// A frame of the tests: who sent it and its place in that sender's sequence.
fn frame(sender: u64, sequence: u64) -> Bytes {
    let mut bytes = BytesMut::with_capacity(16);
    bytes.extend_from_slice(&sender.to_be_bytes());
    bytes.extend_from_slice(&sequence.to_be_bytes());
    bytes.freeze()
}

async fn read_frame(reader: &mut DuplexStream) -> (u64, u64) {
    let mut bytes = [0u8; 16];
    reader.read_exact(&mut bytes).await.expect("a whole frame");
    let sender = u64::from_be_bytes(bytes[..8].try_into().unwrap());
    let sequence = u64::from_be_bytes(bytes[8..].try_into().unwrap());
    (sender, sequence)
}

/// Runs the writer task's loop until it is asked to finish or the stream breaks.
fn spawn_driver(writer: &Arc<ControlWriter<DuplexStream>>) -> tokio::task::JoinHandle<bool> {
    let writer = Arc::clone(writer);
    tokio::spawn(async move {
        match std::future::poll_fn(|cx| writer.poll_drive(cx)).await {
            Drive::Finish(send, done) => {
                drop(send);
                let _ = done.send(());
                true
            }
            Drive::Broken => false,
        }
    })
}

fn queued(writer: &ControlWriter<DuplexStream>) -> usize {
    lock(&writer.state).queued.len()
}

#[tokio::test]
async fn a_sender_with_nothing_ahead_writes_in_its_own_task() {
    let writer = ControlWriter::new(4);
    let (send, mut reader) = duplex(1024);
    writer.attach(send);
    // No writer task runs: the frames can only have been written by the senders.
    writer.send(frame(1, 0), true).await.unwrap();
    writer.try_send(frame(1, 1), true).unwrap();
    assert_eq!(read_frame(&mut reader).await, (1, 0));
    assert_eq!(read_frame(&mut reader).await, (1, 1));
    assert_eq!(queued(&writer), 0);
}

#[tokio::test]
async fn frames_not_sent_direct_wait_for_the_writer_task_and_keep_their_place() {
    let writer = Arc::new(ControlWriter::new(8));
    let (send, mut reader) = duplex(1024);
    writer.attach(send);
    writer.send(frame(2, 0), false).await.unwrap();
    // Nothing is written without the task, even a later frame allowed to go direct.
    writer.send(frame(2, 1), true).await.unwrap();
    assert_eq!(queued(&writer), 2);
    let mut byte = [0u8; 1];
    assert!(timeout(Duration::from_millis(50), reader.read(&mut byte))
        .await
        .is_err());
    let driver = spawn_driver(&writer);
    assert_eq!(read_frame(&mut reader).await, (2, 0));
    assert_eq!(read_frame(&mut reader).await, (2, 1));
    driver.abort();
}

#[tokio::test]
async fn frames_sent_before_the_stream_is_attached_go_out_first() {
    let writer = Arc::new(ControlWriter::new(8));
    let driver = spawn_driver(&writer);
    writer.send(frame(0, 0), true).await.unwrap();
    writer.send(frame(0, 1), true).await.unwrap();
    let (send, mut reader) = duplex(1024);
    writer.attach(send);
    writer.send(frame(0, 2), true).await.unwrap();
    for sequence in 0..3 {
        assert_eq!(read_frame(&mut reader).await, (0, sequence));
    }
    let (done, finished) = tokio::sync::oneshot::channel();
    writer.finish(done).await.unwrap();
    timeout(LIMIT, finished).await.unwrap().unwrap();
    assert!(driver.await.unwrap());
    assert_eq!(reader.read(&mut [0u8; 1]).await.unwrap(), 0, "finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_senders_through_a_slow_stream_lose_and_reorder_nothing() {
    const SENDERS: u64 = 400;
    const EACH: u64 = 50;
    let writer = Arc::new(ControlWriter::new(8));
    // A stream that takes four frames at a time: most frames wait their turn in the
    // queue, whose bound of 8 makes most senders wait for room.
    let (send, mut reader) = duplex(64);
    writer.attach(send);
    let driver = spawn_driver(&writer);
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let writer = Arc::clone(&writer);
        senders.push(tokio::spawn(async move {
            for sequence in 0..EACH {
                let bytes = frame(sender, sequence);
                // Some frames may be written by their sender, the others must queue.
                let direct = sequence % 3 != 0;
                // Half of them also try without waiting, as the session does.
                if sender % 2 == 0 {
                    if writer.try_send(bytes.clone(), direct).is_err() {
                        writer.send(bytes, direct).await.unwrap();
                    }
                } else {
                    writer.send(bytes, direct).await.unwrap();
                }
                if sequence % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let received = timeout(LIMIT, async {
        let mut next = vec![0; SENDERS as usize];
        for _ in 0..SENDERS * EACH {
            let (sender, sequence) = read_frame(&mut reader).await;
            // Each sender's frames arrive whole and in the order it sent them.
            assert_eq!(sequence, next[sender as usize], "sender {sender}");
            next[sender as usize] += 1;
        }
        next
    })
    .await
    .expect("every frame received");
    assert!(received.iter().all(|n| *n == EACH));
    for sender in senders {
        sender.await.unwrap();
    }
    assert_eq!(queued(&writer), 0);
    assert_eq!(
        lock(&writer.state).queued.capacity(),
        0,
        "an empty queue holds nothing"
    );
    assert_eq!(writer.room.available_permits(), 8);
    driver.abort();
}

#[tokio::test]
async fn a_full_queue_refuses_try_send_and_makes_send_wait() {
    let writer = Arc::new(ControlWriter::new(2));
    // Room for one frame in the stream: the second stays unwritten, the next two queue,
    // the fifth finds no room.
    let (send, mut reader) = duplex(16);
    writer.attach(send);
    writer.try_send(frame(0, 0), true).unwrap();
    writer.try_send(frame(0, 1), true).unwrap();
    writer.send(frame(0, 2), true).await.unwrap();
    writer.try_send(frame(0, 3), true).unwrap();
    assert_eq!(queued(&writer), 2);
    assert_eq!(writer.try_send(frame(0, 4), true), Err(NotSent));
    assert!(
        timeout(Duration::from_millis(50), writer.send(frame(0, 4), true))
            .await
            .is_err()
    );
    let driver = spawn_driver(&writer);
    let waiting = {
        let writer = Arc::clone(&writer);
        tokio::spawn(async move { writer.send(frame(0, 4), true).await })
    };
    for sequence in 0..5 {
        assert_eq!(read_frame(&mut reader).await, (0, sequence));
    }
    assert_eq!(waiting.await.unwrap(), Ok(()));
    driver.abort();
}

#[tokio::test]
async fn a_finish_waits_for_the_frames_before_it() {
    let writer = Arc::new(ControlWriter::new(64));
    let (send, mut reader) = duplex(16);
    writer.attach(send);
    for sequence in 0..10 {
        writer.send(frame(0, sequence), true).await.unwrap();
    }
    let (done, finished) = tokio::sync::oneshot::channel();
    writer.finish(done).await.unwrap();
    let driver = spawn_driver(&writer);
    for sequence in 0..10 {
        assert_eq!(read_frame(&mut reader).await, (0, sequence));
    }
    timeout(LIMIT, finished).await.unwrap().unwrap();
    assert!(driver.await.unwrap());
    assert_eq!(reader.read(&mut [0u8; 1]).await.unwrap(), 0);
}

#[tokio::test]
async fn a_stream_whose_peer_is_gone_breaks_the_writer() {
    let writer = Arc::new(ControlWriter::new(4));
    let (send, reader) = duplex(64);
    drop(reader);
    writer.attach(send);
    let driver = spawn_driver(&writer);
    // The write fails in the sender's task, which leaves the verdict to the writer task.
    writer.send(frame(0, 0), true).await.unwrap();
    assert!(!timeout(LIMIT, driver).await.unwrap().unwrap());
    // Nothing is written after a failure.
    writer.send(frame(0, 1), true).await.unwrap();
    assert_eq!(queued(&writer), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_fails_every_waiting_sender_and_drops_the_stream() {
    let writer = Arc::new(ControlWriter::new(1));
    let (send, mut reader) = duplex(16);
    writer.attach(send);
    // Written, unwritten, queued: the queue is full and every sender below waits.
    writer.send(frame(0, 0), true).await.unwrap();
    writer.send(frame(0, 1), true).await.unwrap();
    writer.send(frame(0, 2), true).await.unwrap();
    assert_eq!(queued(&writer), 1);
    let waiting: Vec<_> = (1..=300)
        .map(|n| {
            let writer = Arc::clone(&writer);
            tokio::spawn(async move { writer.send(frame(n, 0), true).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    writer.close();
    for sender in waiting {
        let sent = timeout(LIMIT, sender).await.unwrap().unwrap();
        assert_eq!(sent, Err(NotSent));
    }
    assert_eq!(writer.try_send(frame(9, 9), true), Err(NotSent));
    assert_eq!(queued(&writer), 0);
    // The frame written before the close arrives, then the end of the dropped stream.
    assert_eq!(read_frame(&mut reader).await, (0, 0));
    assert_eq!(reader.read(&mut [0u8; 1]).await.unwrap(), 0);
}

/// A place taken just before the writer closes (the writer task ended with the session
/// while a graceful close was on its way): the command is refused, not queued where
/// nobody would take it, so the finish's `done` is dropped and its waiter wakes.
#[tokio::test]
async fn a_command_whose_place_was_taken_before_the_close_is_refused() {
    let writer = Arc::new(ControlWriter::new(4));
    let (send, _reader) = duplex(16);
    writer.attach(send);
    let permit = writer.room.acquire().await.unwrap();
    permit.forget();
    writer.close();
    let (done, finished) = tokio::sync::oneshot::channel();
    assert_eq!(writer.push(WriterCommand::Finish(done)), Err(NotSent));
    assert!(timeout(LIMIT, finished).await.unwrap().is_err());
    assert_eq!(queued(&writer), 0);
}

/// Hundreds of rounds of a close racing a finish on another thread: every finish is
/// refused or dropped by the close, so its waiter never hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_racing_the_close_never_leaves_its_waiter_hanging() {
    for _ in 0..500 {
        let writer = Arc::new(ControlWriter::new(4));
        let (send, _reader) = duplex(16);
        writer.attach(send);
        let closer = {
            let writer = Arc::clone(&writer);
            tokio::spawn(async move { writer.close() })
        };
        let (done, finished) = tokio::sync::oneshot::channel();
        let _ = writer.finish(done).await;
        closer.await.unwrap();
        // No writer task runs here: a finish that got in before the close is dropped by
        // it, one that came after is refused.
        assert!(timeout(LIMIT, finished).await.unwrap().is_err());
    }
}
