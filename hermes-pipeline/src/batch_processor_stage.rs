//! The batch processor stage: runs `handle_batch` on each batch, then acknowledges it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batch_key::BatchKey;
use crate::handler::{BatchInfo, BatchTrigger, FailedIn, Handler};
use crate::in_flight::InFlight;
use crate::message::Message;
use crate::panic_message::catch_panic;
use crate::processor_stage::DEADLINE_EXCEEDED;
use crate::telemetry::StageMetrics;
use crate::terminator::Terminator;

/// A closed batch on its way to a batch processor.
pub(crate) struct Batch<T> {
    pub(crate) messages: Vec<Message<T>>,
    pub(crate) key: BatchKey,
    pub(crate) trigger: BatchTrigger,
    pub(crate) opened: Instant,
}

/// Batches sent to a batch processor and not yet acknowledged, their
/// messages, and a signal for when a batch processor runs out of work.
#[derive(Clone, Default)]
pub(crate) struct Outstanding {
    pub(crate) count: Arc<AtomicUsize>,
    pub(crate) messages: Arc<AtomicUsize>,
    pub(crate) idle: Arc<Notify>,
}

/// A batch processor's inbox, which holds the in-flight slots of the
/// messages of its batches until they are acknowledged. Dropped as the batch
/// processor stops, it frees those of the messages it still holds: none once
/// the batcher closed it and every batch was handled, but a panic outside the
/// handlers and acknowledgers (say, in a metrics recorder) loses the batch
/// being handled and those waiting (their completions report the drop).
pub(crate) struct Inbox<T> {
    batches: mpsc::UnboundedReceiver<Batch<T>>,
    /// Messages of the batch received last, until it is acknowledged.
    holding: usize,
    in_flight: Arc<InFlight>,
}

impl<T> Inbox<T> {
    pub(crate) fn new(
        batches: mpsc::UnboundedReceiver<Batch<T>>,
        in_flight: Arc<InFlight>,
    ) -> Self {
        Self {
            batches,
            holding: 0,
            in_flight,
        }
    }

    async fn recv(&mut self) -> Option<Batch<T>> {
        let batch = self.batches.recv().await?;
        self.holding = batch.messages.len();
        Some(batch)
    }

    /// The batch received last was acknowledged, which freed its slots.
    fn acknowledged(&mut self) {
        self.holding = 0;
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        // Closed first: the batcher can then no longer send a batch, and gets
        // back (and fails) one it tries to, so each batch is counted once,
        // here or there.
        let lost = self.holding + close_and_count(&mut self.batches, |batch| batch.messages.len());
        if lost > 0 {
            tracing::error!(
                lost,
                "batch processor stopped holding messages: they are dropped"
            );
            self.in_flight.release_lost(lost);
        }
    }
}

/// Closes `inbox`, so that whoever sends to it gets back what it sends, and
/// drops what it still holds: the number of messages in there, by `count`.
pub(crate) fn close_and_count<I>(
    inbox: &mut mpsc::UnboundedReceiver<I>,
    count: impl Fn(I) -> usize,
) -> usize {
    inbox.close();
    let mut messages = 0;
    loop {
        match inbox.try_recv() {
            Ok(item) => messages += count(item),
            Err(TryRecvError::Disconnected) => return messages,
            // A send begun before the close, on another thread, has yet to
            // land.
            Err(TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
}

pub(crate) struct BatchProcessorStage<H: Handler> {
    pub(crate) index: usize,
    pub(crate) pipeline: Arc<str>,
    pub(crate) batcher: Arc<str>,
    pub(crate) inbox: Inbox<H::Data>,
    pub(crate) outstanding: Outstanding,
    /// The batcher's signal that some batch processor ran out of work.
    pub(crate) any_idle: Arc<Notify>,
    pub(crate) deadline: CancellationToken,
    pub(crate) terminator: Terminator<H>,
    pub(crate) metrics: StageMetrics,
}

impl<H: Handler> BatchProcessorStage<H> {
    pub(crate) async fn run(mut self) {
        while let Some(batch) = self.inbox.recv().await {
            let size = batch.messages.len();
            self.handle(batch).await;
            self.inbox.acknowledged();
            self.outstanding.messages.fetch_sub(size, Ordering::AcqRel);
            if self.outstanding.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.outstanding.idle.notify_waiters();
                self.any_idle.notify_one();
            }
        }
        tracing::debug!(batcher = %self.batcher, batch_processor = self.index, "batch processor stopped");
    }

    async fn handle(&self, batch: Batch<H::Data>) {
        let Batch {
            mut messages,
            key,
            trigger,
            opened,
        } = batch;
        let info = BatchInfo {
            pipeline: self.pipeline.clone(),
            batcher: self.batcher.clone(),
            batch_key: key,
            size: messages.len(),
            trigger,
            batch_processor: self.index,
            age: opened.elapsed(),
        };
        self.metrics.batch_size.record(messages.len() as f64);
        let started = Instant::now();
        let outcome = if self.deadline.is_cancelled() {
            Err(DEADLINE_EXCEEDED.to_owned())
        } else {
            let handler = &self.terminator.handler;
            let handle = catch_panic(|| handler.handle_batch(&mut messages, &info));
            tokio::select! {
                biased;
                result = handle => result.map_err(|panic| format!("handle_batch panicked: {panic}")),
                () = self.deadline.cancelled() => Err(DEADLINE_EXCEEDED.to_owned()),
            }
        };
        if let Err(reason) = outcome {
            Message::fail_all(&mut messages, reason);
        }
        self.metrics
            .duration
            .record(started.elapsed().as_secs_f64());
        self.terminator
            .acknowledge(messages, FailedIn::Batch, &self.metrics)
            .await;
    }
}
