//! The batcher stage: groups a named batcher's messages into batches by key, size,
//! bytes and time, and hands each batch to a batch processor.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::Instrument;

use crate::batch_key::BatchKey;
use crate::batch_processor_stage::{Batch, BatchProcessorStage, Outstanding};
use crate::handler::{BatchTrigger, FailedIn, Handler};
use crate::holding_inbox::HoldingInbox;
use crate::message::Message;
use crate::panic_message::{catch_panic_now, log_caught};
use crate::supervisor::{Supervised, supervise};
use crate::telemetry::StageMetrics;
use crate::terminator::Terminator;

/// Measures a message for `max_batch_bytes`.
pub type SizeFn<T> = Arc<dyn Fn(&Message<T>) -> usize + Send + Sync>;

/// A batcher's limits.
pub(crate) struct BatchLimits<T> {
    pub(crate) batch_size: usize,
    pub(crate) batch_timeout: Duration,
    pub(crate) max_bytes: Option<(usize, SizeFn<T>)>,
    pub(crate) flush_when_idle: bool,
}

/// A request to change the number of batch processors.
pub(crate) struct Resize {
    pub(crate) concurrency: usize,
    pub(crate) done: oneshot::Sender<()>,
}

/// Everything needed to start a batch processor of this batcher.
pub(crate) struct BatchProcessorSpawner<H: Handler> {
    pub(crate) pipeline: Arc<str>,
    pub(crate) batcher: Arc<str>,
    pub(crate) deadline: CancellationToken,
    pub(crate) terminator: Terminator<H>,
    pub(crate) metrics: StageMetrics,
    pub(crate) tracker: TaskTracker,
}

impl<H: Handler> BatchProcessorSpawner<H> {
    fn spawn(
        &self,
        index: usize,
        outstanding: &Outstanding,
        any_idle: &Arc<Notify>,
    ) -> mpsc::UnboundedSender<Batch<H::Data>> {
        let (tx, inbox) = mpsc::unbounded_channel();
        let stage = BatchProcessorStage {
            index,
            pipeline: self.pipeline.clone(),
            batcher: self.batcher.clone(),
            inbox: HoldingInbox::new(inbox, self.terminator.in_flight.clone(), "batch processor"),
            outstanding: outstanding.clone(),
            any_idle: any_idle.clone(),
            deadline: self.deadline.clone(),
            terminator: self.terminator.clone(),
            metrics: self.metrics.clone(),
        };
        let span = tracing::info_span!("batch_processor", pipeline = %self.pipeline, batcher = %self.batcher, index);
        self.tracker.spawn(stage.run().instrument(span));
        tx
    }
}

/// A batch being filled.
struct OpenBatch<T> {
    messages: Vec<Message<T>>,
    bytes: usize,
    opened: Instant,
    timer: delay_queue::Key,
}

pub(crate) struct BatcherStage<H: Handler> {
    pub(crate) limits: BatchLimits<H::Data>,
    /// Holds the slots of the messages received until they are handed to a
    /// batch processor or acknowledged.
    pub(crate) inbox: HoldingInbox<Vec<Message<H::Data>>>,
    pub(crate) control: mpsc::UnboundedReceiver<Resize>,
    pub(crate) concurrency: Arc<AtomicUsize>,
    /// Cancelled when the pipeline starts draining.
    pub(crate) shutdown: CancellationToken,
    pub(crate) spawner: BatchProcessorSpawner<H>,
    pub(crate) metrics: StageMetrics,
}

/// The batcher's running state.
struct Batching<H: Handler> {
    stage: BatcherStage<H>,
    default: Option<OpenBatch<H::Data>>,
    keyed: HashMap<BatchKey, OpenBatch<H::Data>>,
    timers: DelayQueue<BatchKey>,
    processors: Vec<mpsc::UnboundedSender<Batch<H::Data>>>,
    outstanding: Vec<Outstanding>,
    /// Signalled when any batch processor runs out of work.
    any_idle: Arc<Notify>,
    next: usize,
    /// The messages of the open batches a panic stopped it with, failed, to
    /// acknowledge (see `recover`, `settle`).
    stopped_with: Vec<Message<H::Data>>,
}

/// Why the messages of a batcher's open batches fail when a panic stops it.
const STOPPED_BY_A_PANIC: &str = "the batcher stopped by a panic before its batch was handled";

impl<H: Handler> BatcherStage<H> {
    /// Runs this batcher in `span`, restarted in its place (same name, inbox
    /// and batch processors) when a panic outside the calls it contains stops
    /// it; see `Batching::recover` for what it loses then.
    pub(crate) async fn run(self, span: tracing::Span) {
        let deadline = self.spawner.deadline.clone();
        let what = format!("batcher {:?}", self.spawner.batcher);
        let batching = Batching {
            stage: self,
            default: None,
            keyed: HashMap::new(),
            timers: DelayQueue::new(),
            processors: Vec::new(),
            outstanding: Vec::new(),
            any_idle: Arc::new(Notify::new()),
            next: 0,
            stopped_with: Vec::new(),
        };
        supervise(batching, span, deadline, what).await;
    }
}

impl<H: Handler> Supervised for Batching<H> {
    async fn run(&mut self) {
        // Its batch processors: started on the first run; on a restart,
        // those a resize the panic interrupted did not start.
        let concurrency = self.stage.concurrency.load(Ordering::Relaxed);
        self.grow_to(concurrency);
        // One registration with `any_idle`, renewed when it fires, instead of
        // a new one (and its removal) every time round the loop.
        let any_idle = self.any_idle.clone();
        let mut idle = std::pin::pin!(any_idle.notified());
        let shutdown = self.stage.shutdown.clone();
        let mut drain_starts = std::pin::pin!(shutdown.cancelled());
        // While draining, no batch waits for more messages: the producers
        // may need the slots its messages hold to learn that they are done.
        let mut draining = false;
        loop {
            // Timers and resizes before the inbox: under sustained inflow it is
            // never empty, and they would never run.
            tokio::select! {
                biased;
                () = drain_starts.as_mut(), if !draining => {
                    draining = true;
                    let failed = self.flush_all();
                    self.acknowledge(failed).await;
                }
                Some(expired) = self.timers.next(), if !self.timers.is_empty() => {
                    let key = expired.into_inner();
                    if let Some(batch) = self.take(&key) {
                        let failed = self.dispatch(key, batch, BatchTrigger::Timeout);
                        self.acknowledge(failed).await;
                    }
                }
                Some(resize) = self.stage.control.recv() => self.resize(resize).await,
                chunk = self.stage.inbox.recv() => match chunk {
                    Some(chunk) => {
                        let mut failed = self.add(chunk);
                        if self.stage.inbox.is_empty() {
                            failed.extend(if draining {
                                self.flush_all()
                            } else {
                                self.flush_idle()
                            });
                        }
                        self.acknowledge(failed).await;
                    }
                    None => break,
                },
                () = idle.as_mut(), if self.holds_idle_flushable() => {
                    idle.set(any_idle.notified());
                    let failed = self.flush_idle();
                    self.acknowledge(failed).await;
                }
            }
        }
        // Input closed: the pipeline is draining. Flush every partial batch.
        let failed = self.flush_all();
        self.acknowledge(failed).await;
    }

    /// A panic may stop the batcher anywhere: with a chunk half added to its
    /// open batches, a batch closed and not yet sent, a resize half done. So
    /// its batching state is reset rather than repaired: the messages of its
    /// open batches are failed and kept, for `settle` to acknowledge (once;
    /// that frees their slots); those it had in hand were dropped as the
    /// panic unwound: their slots are freed here, once (the inbox counts
    /// them), and their completions report the drop. The open batches'
    /// timers are discarded; the batch processors are cut back to the
    /// concurrency last set (those of an interrupted grow have no batch yet;
    /// the next run starts those of an interrupted shrink again), and an
    /// interrupted resize's caller gets [`ResizeError::NotRunning`]. What
    /// waits in the inbox and the batch processors' batches are not lost.
    ///
    /// [`ResizeError::NotRunning`]: crate::ResizeError::NotRunning
    fn recover(&mut self) {
        let open = self
            .default
            .take()
            .into_iter()
            .chain(self.keyed.drain().map(|(_, batch)| batch));
        // Empty before: `settle` takes what the last recovery kept.
        self.stopped_with
            .extend(open.flat_map(|batch| batch.messages));
        Message::fail_all(&mut self.stopped_with, STOPPED_BY_A_PANIC);
        self.timers.clear();
        let lost = self.stage.inbox.release_held(self.stopped_with.len());
        let concurrency = self.stage.concurrency.load(Ordering::Relaxed);
        self.cut_to(concurrency);
        let failed = self.stopped_with.len();
        log_caught(|| {
            tracing::error!(
                batcher = %self.stage.spawner.batcher,
                lost,
                failed,
                "batcher stopped by a panic: the messages it had in hand are dropped, those of its open batches fail"
            );
        });
    }

    /// Acknowledges, as failed, the messages of the open batches a panic
    /// stopped the batcher with. They are taken first: if the
    /// acknowledgement panics (outside the acknowledgers and `handle_failed`,
    /// which it contains), they are dropped with it, and the next `recover`
    /// frees their slots; none is acknowledged twice.
    async fn settle(&mut self) {
        let stopped_with = std::mem::take(&mut self.stopped_with);
        self.acknowledge(stopped_with).await;
    }

    fn finished(&mut self) -> bool {
        self.stage.inbox.is_closed() && self.stage.inbox.is_empty()
    }
}

impl<H: Handler> Batching<H> {
    /// Acknowledges messages that failed in the batcher, freeing their slots.
    async fn acknowledge(&mut self, failed: Vec<Message<H::Data>>) {
        let count = failed.len();
        let spawner = &self.stage.spawner;
        spawner
            .terminator
            .acknowledge(failed, FailedIn::Batch, &spawner.metrics)
            .await;
        self.stage.inbox.handed_on(count);
    }

    /// Closes every open batch (the pipeline is draining) and dispatches it;
    /// gives back, failed, the messages of batches no batch processor could take.
    fn flush_all(&mut self) -> Vec<Message<H::Data>> {
        let mut failed = self.close(BatchKey::Default, BatchTrigger::Flush);
        let keys: Vec<BatchKey> = self.keyed.keys().cloned().collect();
        for key in keys {
            failed.extend(self.close(key, BatchTrigger::Flush));
        }
        failed
    }

    /// Adds a chunk to its open batches; gives back, failed, the messages
    /// `size_of` panicked on and those of batches no batch processor could take.
    fn add(&mut self, chunk: Vec<Message<H::Data>>) -> Vec<Message<H::Data>> {
        self.stage.metrics.queue_depth.decrement(chunk.len() as f64);
        self.stage.metrics.received.increment(chunk.len() as u64);
        let mut failed = Vec::new();
        for mut message in chunk {
            let key = message.batch_key().clone();
            let size = match &self.stage.limits.max_bytes {
                Some((max, size_of)) => match catch_panic_now(|| size_of(&message)) {
                    Ok(size) => Some((*max, size)),
                    Err(panic) => {
                        message.fail(format!("size_of panicked: {panic}"));
                        failed.push(message);
                        continue;
                    }
                },
                None => None,
            };
            if let Some((max, size)) = size
                && self
                    .open_batch(&key)
                    .is_some_and(|open| open.bytes.saturating_add(size) > max)
            {
                failed.extend(self.close(key.clone(), BatchTrigger::Bytes));
            }
            let batch = self.open_or_create(&key);
            batch.bytes = batch.bytes.saturating_add(size.map_or(0, |(_, size)| size));
            batch.messages.push(message);
            let (len, bytes) = (batch.messages.len(), batch.bytes);
            if len >= self.stage.limits.batch_size {
                failed.extend(self.close(key, BatchTrigger::Size));
            } else if let Some((max, _)) = size
                && bytes >= max
            {
                // Full, or a single message over the limit: no message
                // (bar an empty one) could join it.
                failed.extend(self.close(key, BatchTrigger::Bytes));
            }
        }
        failed
    }

    fn holds_idle_flushable(&self) -> bool {
        self.stage.limits.flush_when_idle && (self.default.is_some() || !self.keyed.is_empty())
    }

    /// With `flush_when_idle`, hands partial batches to idle batch processors:
    /// a key's batch when its processor is idle; the default-key batch when a
    /// processor is idle and the batch is at least as large as any batch
    /// being handled, so that it keeps filling while a larger one is (see
    /// `BatcherOptions::flush_when_idle`). Gives back, failed, the messages of
    /// batches no batch processor could take.
    fn flush_idle(&mut self) -> Vec<Message<H::Data>> {
        let mut failed = Vec::new();
        if !self.holds_idle_flushable() {
            return failed;
        }
        if let Some(batch) = &self.default
            && self.any_processor_idle()
            && batch.messages.len() >= self.largest_outstanding()
        {
            failed.extend(self.close(BatchKey::Default, BatchTrigger::Idle));
        }
        let idle_keys: Vec<BatchKey> = self
            .keyed
            .keys()
            .filter(|key| self.is_idle(self.route(key)))
            .cloned()
            .collect();
        for key in idle_keys {
            failed.extend(self.close(key, BatchTrigger::Idle));
        }
        failed
    }

    fn is_idle(&self, index: usize) -> bool {
        self.outstanding[index].count.load(Ordering::Acquire) == 0
    }

    fn any_processor_idle(&self) -> bool {
        (0..self.processors.len()).any(|index| self.is_idle(index))
    }

    /// The most messages any batch processor holds (0 when all are idle).
    fn largest_outstanding(&self) -> usize {
        self.outstanding
            .iter()
            .map(|outstanding| outstanding.messages.load(Ordering::Acquire))
            .max()
            .unwrap_or(0)
    }

    /// Closes the open batch of `key` before its timeout (cancelling the
    /// timer) and dispatches it; gives back what could not be dispatched, failed.
    fn close(&mut self, key: BatchKey, trigger: BatchTrigger) -> Vec<Message<H::Data>> {
        match self.take(&key) {
            Some(batch) => {
                self.timers.remove(&batch.timer);
                self.dispatch(key, batch, trigger)
            }
            None => Vec::new(),
        }
    }

    fn open_batch(&self, key: &BatchKey) -> Option<&OpenBatch<H::Data>> {
        if key.is_default() {
            self.default.as_ref()
        } else {
            self.keyed.get(key)
        }
    }

    fn open_or_create(&mut self, key: &BatchKey) -> &mut OpenBatch<H::Data> {
        let timers = &mut self.timers;
        let timeout = self.stage.limits.batch_timeout;
        let capacity = self.stage.limits.batch_size.min(1024);
        let create = || OpenBatch {
            messages: Vec::with_capacity(capacity),
            bytes: 0,
            opened: Instant::now(),
            timer: timers.insert(key.clone(), timeout),
        };
        if key.is_default() {
            self.default.get_or_insert_with(create)
        } else {
            self.keyed.entry(key.clone()).or_insert_with(create)
        }
    }

    fn take(&mut self, key: &BatchKey) -> Option<OpenBatch<H::Data>> {
        if key.is_default() {
            self.default.take()
        } else {
            self.keyed.remove(key)
        }
    }

    /// Sends a closed batch to a batch processor: the same one for every batch of a
    /// key, so a key is handled serially; the least busy one for the default key.
    /// A batch processor found stopped is restarted first; gives back the
    /// batch's messages, failed, if the restarted one refuses it too.
    fn dispatch(
        &mut self,
        key: BatchKey,
        batch: OpenBatch<H::Data>,
        trigger: BatchTrigger,
    ) -> Vec<Message<H::Data>> {
        let index = if key.is_default() {
            self.least_busy()
        } else {
            self.route(&key)
        };
        let batch = Batch {
            messages: batch.messages,
            key,
            trigger,
            opened: batch.opened,
        };
        // Batch processors contain handler and acknowledger panics, and stop
        // when their sender is dropped, which this batcher does only after
        // waiting for them to be idle. One that stopped anyway (a panic
        // elsewhere, such as in a metrics recorder) took its batches with it,
        // and freed their slots; its outstanding counts never return to zero:
        // a new one with fresh counts takes its place, in the same slot so
        // keys keep their batch processor.
        let Err(batch) = self.send(index, batch) else {
            return Vec::new();
        };
        tracing::error!(
            batch_processor = index,
            "batch processor stopped early: restarting it"
        );
        (self.processors[index], self.outstanding[index]) = self.start(index);
        let Err(batch) = self.send(index, batch) else {
            return Vec::new();
        };
        let mut messages = batch.messages;
        tracing::error!(
            batch_processor = index,
            failed = messages.len(),
            "restarted batch processor stopped at once"
        );
        let reason = format!(
            "batch processor {index} of batcher {:?} is not running",
            self.stage.spawner.batcher
        );
        Message::fail_all(&mut messages, reason);
        messages
    }

    /// Sends a batch to batch processor `index`, counting it as outstanding
    /// there (and no longer held here); gives it back if that batch processor
    /// stopped.
    fn send(&mut self, index: usize, batch: Batch<H::Data>) -> Result<(), Batch<H::Data>> {
        let outstanding = &self.outstanding[index];
        let size = batch.messages.len();
        outstanding.count.fetch_add(1, Ordering::AcqRel);
        outstanding.messages.fetch_add(size, Ordering::AcqRel);
        self.processors[index]
            .send(batch)
            .map_err(|mpsc::error::SendError(batch)| {
                outstanding.count.fetch_sub(1, Ordering::AcqRel);
                outstanding.messages.fetch_sub(size, Ordering::AcqRel);
                batch
            })?;
        self.stage.inbox.handed_on(size);
        Ok(())
    }

    /// The batch processor of a non-default key.
    fn route(&self, key: &BatchKey) -> usize {
        // The remainder is below the processor count, itself a usize.
        (key.route_hash() % self.processors.len() as u64) as usize
    }

    fn least_busy(&mut self) -> usize {
        let count = self.processors.len();
        let start = self.next;
        self.next = (self.next + 1) % count;
        (0..count)
            .map(|offset| (start + offset) % count)
            .min_by_key(|&index| self.outstanding[index].count.load(Ordering::Acquire))
            .unwrap_or(0)
    }

    fn grow_to(&mut self, concurrency: usize) {
        while self.processors.len() < concurrency {
            let (tx, outstanding) = self.start(self.processors.len());
            self.processors.push(tx);
            self.outstanding.push(outstanding);
        }
    }

    /// Keeps the first `concurrency` batch processors (and their outstanding
    /// counts), dropping the others' senders, and starts the round robin
    /// again from the first.
    fn cut_to(&mut self, concurrency: usize) {
        self.processors.truncate(concurrency);
        self.outstanding.truncate(concurrency);
        self.next = 0;
    }

    /// Starts batch processor `index`, with its own outstanding counts.
    fn start(&self, index: usize) -> (mpsc::UnboundedSender<Batch<H::Data>>, Outstanding) {
        let outstanding = Outstanding::default();
        let tx = self
            .stage
            .spawner
            .spawn(index, &outstanding, &self.any_idle);
        (tx, outstanding)
    }

    /// Changes the number of batch processors. Keyed batches are routed by the
    /// processor count, so first wait until every batch processor is idle: no
    /// batch of a key can then overtake an earlier one. One that stopped (see
    /// `dispatch`) is never idle again, and its batches went with it: it is
    /// not waited for.
    async fn resize(&mut self, resize: Resize) {
        for (outstanding, processor) in self.outstanding.iter().zip(&self.processors) {
            loop {
                let idle = outstanding.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if outstanding.count.load(Ordering::Acquire) == 0 {
                    break;
                }
                tokio::select! {
                    () = idle => {}
                    () = processor.closed() => break,
                }
            }
        }
        self.cut_to(resize.concurrency);
        self.grow_to(resize.concurrency);
        self.stage
            .concurrency
            .store(resize.concurrency, Ordering::Relaxed);
        let _ = resize.done.send(());
    }
}
