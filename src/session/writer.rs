//! The control stream's sending half, shared by everyone who sends a control message.
//!
//! An open costs a round trip on the control stream, so every task hop on the way out adds
//! straight to its latency. Here a sender may write its frame to the stream itself, in its
//! own task, when nothing is queued ahead of it and the stream takes the whole frame at
//! once. Otherwise the frame joins a bounded queue that the writer task drains in order,
//! batching frames that queued up behind one another. The session lets a sender write
//! itself only while at most one open is under way: a lone open gains a task hop, while a
//! burst of opens is better served by the queue, whose batches leave in a few packets
//! rather than one per frame.
//!
//! One lock guards the stream, the queue and the bytes of a write in progress, and is
//! held only for a non-blocking `poll_write`: frames go out in the order senders took the
//! lock, and nothing overtakes a frame that waits. Senders wait for room on a semaphore of
//! `bound` places (fair, so waiting senders go in the order they came). The queue's
//! storage is given back when it empties, so an idle session holds none; a busy one
//! rarely uses it at all.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::sync::{oneshot, Semaphore};

use super::lock;

/// Frames queued together are written with one call, up to this many bytes.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// What waits in the queue.
pub(crate) enum WriterCommand {
    /// Bytes of one or more whole frames.
    Frame(Bytes),
    /// Finish the control stream after everything queued before, then acknowledge.
    Finish(oneshot::Sender<()>),
}

/// The command could not be sent: the writer is closed, or (for `try_send`) its queue is
/// full.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NotSent;

/// What the writer task is asked to do next.
pub(crate) enum Drive<S> {
    /// Finish the stream (given back here, when it was attached), then acknowledge.
    Finish(Option<S>, oneshot::Sender<()>),
    /// Writing failed: the stream is broken.
    Broken,
}

/// The shared sending half of the control stream and its queue.
pub(crate) struct ControlWriter<S> {
    state: Mutex<WriterState<S>>,
    /// One permit per free place in the queue; closed with the writer.
    room: Semaphore,
}

struct WriterState<S> {
    /// The stream, once attached; taken out to be finished.
    send: Option<S>,
    /// Bytes of a write the stream did not take at once: the next to go out.
    unwritten: Bytes,
    /// Commands behind `unwritten`, in order.
    queued: VecDeque<WriterCommand>,
    /// A write failed: nothing more is written.
    broken: bool,
    /// Set by [`ControlWriter::close`]: whatever comes later is refused, not queued.
    closed: bool,
    /// The writer task, when it waits for work.
    task: Option<Waker>,
}

impl<S> WriterState<S> {
    /// Nothing is waiting to be written.
    fn is_idle(&self) -> bool {
        self.unwritten.is_empty() && self.queued.is_empty()
    }

    fn wake_task(&mut self) {
        if let Some(task) = self.task.take() {
            task.wake();
        }
    }
}

impl<S: AsyncWrite + Unpin> ControlWriter<S> {
    /// A writer with no stream yet, queueing at most `bound` commands.
    pub(crate) fn new(bound: usize) -> Self {
        Self {
            state: Mutex::new(WriterState {
                send: None,
                unwritten: Bytes::new(),
                queued: VecDeque::new(),
                broken: false,
                closed: false,
                task: None,
            }),
            room: Semaphore::new(bound),
        }
    }

    /// Gives the writer its stream; what was queued before goes out first.
    pub(crate) fn attach(&self, send: S) {
        let mut state = lock(&self.state);
        state.send = Some(send);
        state.wake_task();
    }

    /// Sends `frame`: written now when `direct` and nothing waits ahead of it, else
    /// queued, waiting for room while the queue is full. `Ok` means it will go out unless
    /// the stream breaks.
    pub(crate) async fn send(&self, frame: Bytes, direct: bool) -> Result<(), NotSent> {
        let Some(frame) = self.write_now(frame, direct)? else {
            return Ok(());
        };
        let permit = self.room.acquire().await.map_err(|_| NotSent)?;
        permit.forget();
        self.push(WriterCommand::Frame(frame))
    }

    /// Sends `frame` without waiting: written now (when `direct`), or queued if there is
    /// room.
    pub(crate) fn try_send(&self, frame: Bytes, direct: bool) -> Result<(), NotSent> {
        let Some(frame) = self.write_now(frame, direct)? else {
            return Ok(());
        };
        let permit = self.room.try_acquire().map_err(|_| NotSent)?;
        permit.forget();
        self.push(WriterCommand::Frame(frame))
    }

    /// Queues a finish after everything sent so far.
    pub(crate) async fn finish(&self, done: oneshot::Sender<()>) -> Result<(), NotSent> {
        let permit = self.room.acquire().await.map_err(|_| NotSent)?;
        permit.forget();
        self.push(WriterCommand::Finish(done))
    }

    /// Writes `frame` in this task if `direct` and nothing waits ahead of it. Returns the
    /// frame when it must be queued instead.
    fn write_now(&self, frame: Bytes, direct: bool) -> Result<Option<Bytes>, NotSent> {
        if self.room.is_closed() {
            return Err(NotSent);
        }
        if !direct {
            return Ok(Some(frame));
        }
        let mut state = lock(&self.state);
        if !state.is_idle() || state.broken {
            return Ok(Some(frame));
        }
        let Some(send) = state.send.as_mut() else {
            return Ok(Some(frame));
        };
        let mut rest = frame;
        // The no-op waker is never relied on: a write left over goes to the writer task,
        // whose own poll registers its waker with the stream.
        let mut cx = Context::from_waker(Waker::noop());
        while !rest.is_empty() {
            match Pin::new(&mut *send).poll_write(&mut cx, &rest) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    state.broken = true;
                    state.wake_task();
                    return Ok(None);
                }
                Poll::Ready(Ok(written)) => rest.advance(written),
                Poll::Pending => {
                    state.unwritten = rest;
                    state.wake_task();
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    /// Queues `command`, unless the writer closed since its place was taken: a command
    /// queued then would wait for ever (a finish's `done` with it, and whoever awaits it).
    fn push(&self, command: WriterCommand) -> Result<(), NotSent> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(NotSent);
        }
        state.queued.push_back(command);
        state.wake_task();
        Ok(())
    }

    /// The writer task's step: writes what waits, and resolves when the stream is to be
    /// finished or broke. Only one task may drive.
    pub(crate) fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<Drive<S>> {
        let mut state = lock(&self.state);
        let state = &mut *state;
        loop {
            if state.broken {
                return Poll::Ready(Drive::Broken);
            }
            let Some(send) = state.send.as_mut() else {
                return Self::wait(state, cx);
            };
            if state.unwritten.is_empty() {
                match self.next_batch(state) {
                    Some(WriterCommand::Frame(batch)) => state.unwritten = batch,
                    Some(WriterCommand::Finish(done)) => {
                        return Poll::Ready(Drive::Finish(state.send.take(), done));
                    }
                    None => return Self::wait(state, cx),
                }
                continue;
            }
            match Pin::new(send).poll_write(cx, &state.unwritten) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => state.broken = true,
                Poll::Ready(Ok(written)) => state.unwritten.advance(written),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn wait(state: &mut WriterState<S>, cx: &mut Context<'_>) -> Poll<Drive<S>> {
        match &state.task {
            Some(task) if task.will_wake(cx.waker()) => {}
            _ => state.task = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Takes the next command, joining frames queued behind one another into one batch.
    fn next_batch(&self, state: &mut WriterState<S>) -> Option<WriterCommand> {
        let first = state.queued.pop_front()?;
        self.room.add_permits(1);
        let WriterCommand::Frame(first) = first else {
            return Some(first);
        };
        let mut batch: Option<BytesMut> = None;
        while let Some(WriterCommand::Frame(next)) = state.queued.front() {
            let batched = batch.as_ref().map_or(first.len(), BytesMut::len);
            if batched + next.len() > WRITE_BATCH_BYTES {
                break;
            }
            let batch = batch.get_or_insert_with(|| BytesMut::from(&first[..]));
            batch.extend_from_slice(next);
            state.queued.pop_front();
            self.room.add_permits(1);
        }
        if state.queued.is_empty() && state.queued.capacity() > 0 {
            // An idle session holds no queue.
            state.queued = VecDeque::new();
        }
        Some(WriterCommand::Frame(batch.map_or(first, BytesMut::freeze)))
    }

    /// The writer is gone: senders fail from now on, waiting ones too, and what is queued
    /// is dropped.
    pub(crate) fn close(&self) {
        self.room.close();
        let mut state = lock(&self.state);
        state.closed = true;
        state.queued = VecDeque::new();
        state.unwritten = Bytes::new();
        state.task = None;
        // Dropping the stream ends it, as the writer task's end did before.
        state.send = None;
    }
}

#[cfg(test)]
mod tests;
