//! The user's callbacks: what each stage does to messages.

use std::future::Future;
use std::time::Duration;

use crate::batch_key::BatchKey;
use crate::message::Message;

/// Where a processor callback runs.
#[derive(Clone, Debug)]
pub struct ProcessorContext {
    /// The pipeline's name.
    pub pipeline: std::sync::Arc<str>,
    /// Index of the processor running the callback (`0..concurrency`).
    pub processor: usize,
}

/// What triggered a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchTrigger {
    /// The batch reached `batch_size`.
    Size,
    /// The batch reached `max_batch_bytes` (or a single message is over
    /// it), or the next message would have taken it over.
    Bytes,
    /// `batch_timeout` passed since the batch's first message arrived.
    Timeout,
    /// A batch processor was idle, no more messages were waiting, and no
    /// larger batch was being handled (`BatcherOptions::flush_when_idle`).
    Idle,
    /// The pipeline is draining: partial batches are flushed when the drain
    /// starts, and after that whenever no more messages are waiting.
    Flush,
}

/// Describes the batch given to [`Handler::handle_batch`].
#[derive(Clone, Debug)]
pub struct BatchInfo {
    /// The pipeline's name.
    pub pipeline: std::sync::Arc<str>,
    /// The batcher's name.
    pub batcher: std::sync::Arc<str>,
    /// The key every message of the batch has.
    pub batch_key: BatchKey,
    /// Number of messages in the batch.
    pub size: usize,
    /// What closed the batch.
    pub trigger: BatchTrigger,
    /// Index of the batch processor handling it.
    pub batch_processor: usize,
    /// How long from the batch's first message until its handling started
    /// (open, then queued at its batch processor).
    pub age: Duration,
}

/// Where [`Handler::handle_failed`] was called from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailedIn {
    /// The messages failed before reaching a batcher: in a producer stage
    /// (a `partition_by` panic, the drain deadline), a processor (its
    /// handlers, or the deadline while it ran them) or on their way to a
    /// batcher (an unknown batcher name).
    Processor,
    /// The messages failed in a batcher or batch processor: a `size_of`
    /// panic, `handle_batch`, or the drain deadline while they were batched.
    Batch,
}

/// A pipeline's callbacks, like a Broadway module: one implementation serves every stage.
///
/// Callbacks get `&mut` access to messages they do not own: the pipeline keeps
/// ownership, so a panic or a cancelled future can never lose a message. A panic
/// (while the callback makes its future, or while it runs) in
/// [`handle_message`](Handler::handle_message) fails that message only; one in
/// [`prepare_messages`](Handler::prepare_messages) or
/// [`handle_batch`](Handler::handle_batch) fails the messages it was given; so
/// does one in a `partition_by` or `size_of` closure, for its message. A
/// producer whose `produce` or `prepare_for_draining` panics is not asked
/// again. A panic in [`handle_failed`](Handler::handle_failed) or in an
/// [`Acknowledger`](crate::Acknowledger) is logged; the messages count as
/// acknowledged.
pub trait Handler: Send + Sync + 'static {
    /// The type of [`Message::data`] throughout the pipeline.
    type Data: Send + 'static;

    /// Optional bulk step before `handle_message`, over each chunk a processor
    /// receives (at most `max_demand` messages): one database lookup for many
    /// messages instead of one each. The default does nothing.
    fn prepare_messages(
        &self,
        messages: &mut [Message<Self::Data>],
        context: &ProcessorContext,
    ) -> impl Future<Output = ()> + Send {
        let _ = (messages, context);
        async {}
    }

    /// Handles one message in a processor. Fail it with [`Message::fail`], route it
    /// with [`Message::put_batcher`] and [`Message::put_batch_key`], or change its data.
    fn handle_message(
        &self,
        message: &mut Message<Self::Data>,
        context: &ProcessorContext,
    ) -> impl Future<Output = ()> + Send;

    /// Handles a batch; marks each message that failed with [`Message::fail`].
    /// Messages left untouched succeed. The default succeeds every message.
    fn handle_batch(
        &self,
        batch: &mut [Message<Self::Data>],
        info: &BatchInfo,
    ) -> impl Future<Output = ()> + Send {
        let _ = (batch, info);
        async {}
    }

    /// Runs on failed messages right before they are acknowledged (e.g. to log them
    /// or to record why in their metadata). The default does nothing.
    fn handle_failed(
        &self,
        messages: &mut [Message<Self::Data>],
        failed_in: FailedIn,
    ) -> impl Future<Output = ()> + Send {
        let _ = (messages, failed_in);
        async {}
    }
}
