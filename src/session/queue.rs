//! The control writer's queue: many senders, one receiver, a bound that makes senders
//! wait, and nothing allocated while it is empty.
//!
//! A tokio `mpsc` channel would do the same job, but it allocates its first block of 32
//! slots (and a cache-padded channel) when made, and keeps them until both ends are
//! dropped: about 1.5 KiB that every session, however idle, pays for its whole life.
//! Here the queue lives inline in the session, and its `VecDeque` is given back whenever
//! the writer empties it. Senders wait for room on a semaphore of `bound` permits (fair,
//! so waiting senders go in the order they came), the receiver on a [`Notify`], whose
//! stored permit means a command pushed between a check and the wait is not missed.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::{Notify, Semaphore};

use super::lock;

/// A bounded multi-producer, single-consumer queue of `T`.
pub(crate) struct CommandQueue<T> {
    commands: Mutex<VecDeque<T>>,
    /// One permit per free place; closed once the receiver is gone.
    room: Semaphore,
    /// Wakes the receiver after a push.
    pushed: Notify,
}

/// The command could not be queued: the receiver is gone, or (for `try_send`) the queue
/// is full. The command is given back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NotQueued<T>(pub(crate) T);

impl<T> CommandQueue<T> {
    /// An empty queue holding at most `bound` commands.
    pub(crate) fn new(bound: usize) -> Self {
        Self {
            commands: Mutex::new(VecDeque::new()),
            room: Semaphore::new(bound),
            pushed: Notify::new(),
        }
    }

    /// Queues `command`, waiting for room while the queue is full.
    pub(crate) async fn send(&self, command: T) -> Result<(), NotQueued<T>> {
        match self.room.acquire().await {
            Ok(permit) => {
                permit.forget();
                self.push(command);
                Ok(())
            }
            Err(_) => Err(NotQueued(command)),
        }
    }

    /// Queues `command` if there is room now.
    pub(crate) fn try_send(&self, command: T) -> Result<(), NotQueued<T>> {
        match self.room.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.push(command);
                Ok(())
            }
            Err(_) => Err(NotQueued(command)),
        }
    }

    fn push(&self, command: T) {
        lock(&self.commands).push_back(command);
        self.pushed.notify_one();
    }

    /// The next command, waiting for one. Only one task may receive.
    pub(crate) async fn recv(&self) -> T {
        loop {
            if let Some(command) = self.try_recv() {
                return command;
            }
            self.pushed.notified().await;
        }
    }

    /// The next command if one is queued.
    pub(crate) fn try_recv(&self) -> Option<T> {
        let command = {
            let mut commands = lock(&self.commands);
            let command = commands.pop_front();
            if commands.is_empty() && commands.capacity() > 0 {
                // An idle session holds no queue.
                *commands = VecDeque::new();
            }
            command
        }?;
        self.room.add_permits(1);
        Some(command)
    }

    /// The receiver is gone: senders fail from now on, waiting ones too, and what is
    /// queued is dropped.
    pub(crate) fn close(&self) {
        self.room.close();
        let dropped = std::mem::take(&mut *lock(&self.commands));
        drop(dropped);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::timeout;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(20);

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hundreds_of_senders_through_a_small_bound_lose_and_reorder_nothing() {
        const SENDERS: u64 = 400;
        const EACH: u64 = 50;
        let queue = Arc::new(CommandQueue::new(8));
        let mut senders = Vec::new();
        for sender in 0..SENDERS {
            let queue = Arc::clone(&queue);
            senders.push(tokio::spawn(async move {
                for sequence in 0..EACH {
                    let command = (sender, sequence);
                    // Half of them also try without waiting, as the session does.
                    if sender % 2 == 0 {
                        if let Err(NotQueued(command)) = queue.try_send(command) {
                            queue.send(command).await.unwrap();
                        }
                    } else {
                        queue.send(command).await.unwrap();
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
                let (sender, sequence) = queue.recv().await;
                // Each sender's commands arrive in the order it sent them.
                assert_eq!(sequence, next[sender as usize]);
                next[sender as usize] += 1;
                while let Some((sender, sequence)) = queue.try_recv() {
                    assert_eq!(sequence, next[sender as usize]);
                    next[sender as usize] += 1;
                }
                if next.iter().all(|n| *n == EACH) {
                    break;
                }
            }
            next
        })
        .await
        .expect("every command received");
        assert!(received.iter().all(|n| *n == EACH));
        for sender in senders {
            sender.await.unwrap();
        }
        assert_eq!(queue.try_recv(), None);
        assert_eq!(
            lock(&queue.commands).capacity(),
            0,
            "an empty queue holds nothing"
        );
        assert_eq!(queue.room.available_permits(), 8);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_try_send_and_makes_send_wait() {
        let queue = CommandQueue::new(2);
        queue.try_send(1).unwrap();
        queue.send(2).await.unwrap();
        assert_eq!(queue.try_send(3), Err(NotQueued(3)));
        assert!(timeout(Duration::from_millis(50), queue.send(3))
            .await
            .is_err());
        assert_eq!(queue.try_recv(), Some(1));
        queue.send(3).await.unwrap();
        assert_eq!(queue.recv().await, 2);
        assert_eq!(queue.recv().await, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn closing_fails_every_waiting_sender() {
        let queue = Arc::new(CommandQueue::new(1));
        queue.send(0).await.unwrap();
        let waiting: Vec<_> = (1..=300)
            .map(|n| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move { queue.send(n).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        queue.close();
        for sender in waiting {
            let sent = timeout(LIMIT, sender).await.unwrap().unwrap();
            assert!(matches!(sent, Err(NotQueued(n)) if n > 0));
        }
        assert_eq!(queue.try_recv(), None);
        assert_eq!(queue.try_send(9), Err(NotQueued(9)));
    }

    #[tokio::test]
    async fn the_receiver_wakes_for_a_command_pushed_while_it_waits() {
        let queue = Arc::new(CommandQueue::new(4));
        let receiver = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.recv().await })
        };
        tokio::task::yield_now().await;
        queue.send(5).await.unwrap();
        assert_eq!(timeout(LIMIT, receiver).await.unwrap().unwrap(), 5);
    }
}
