//! The batch processor stage: runs `handle_batch` on each batch, then acknowledges it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batch_key::BatchKey;
use crate::handler::{BatchInfo, BatchTrigger, FailedIn, Handler};
use crate::holding_inbox::{HoldingInbox, Parcel};
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

impl<T> Parcel for Batch<T> {
    fn messages(&self) -> usize {
        self.messages.len()
    }
}

/// Batches sent to a batch processor and not yet acknowledged, their
/// messages, and a signal for when a batch processor runs out of work.
#[derive(Clone, Default)]
pub(crate) struct Outstanding {
    pub(crate) count: Arc<AtomicUsize>,
    pub(crate) messages: Arc<AtomicUsize>,
    pub(crate) idle: Arc<Notify>,
}

pub(crate) struct BatchProcessorStage<H: Handler> {
    pub(crate) index: usize,
    pub(crate) pipeline: Arc<str>,
    pub(crate) batcher: Arc<str>,
    /// Holds the slots of its batches' messages until they are acknowledged.
    pub(crate) inbox: HoldingInbox<Batch<H::Data>>,
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
            self.inbox.handed_on(size);
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
