//! The processors of a pipeline: spawned on one shared queue (which lets the
//! pool shrink and grow while running) or one queue per partition.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::handler::{Handler, ProcessorContext};
use crate::liveness::ProcessorsAlive;
use crate::lock::lock;
use crate::message::Message;
use crate::panic_message::catch_panic;
use crate::pipeline::ResizeError;
use crate::processor_stage::{BatcherInlet, ProcessorStage};
use crate::telemetry::StageMetrics;
use crate::terminator::Terminator;

/// A processor's input: chunks of messages.
pub(crate) type Inbox<T> = async_channel::Receiver<Vec<Message<T>>>;

/// Everything needed to start one more processor.
pub(crate) struct ProcessorSpawner<H: Handler> {
    pub(crate) pipeline: Arc<str>,
    pub(crate) batchers: Vec<BatcherInlet<H::Data>>,
    pub(crate) deadline: CancellationToken,
    pub(crate) terminator: Terminator<H>,
    pub(crate) metrics: StageMetrics,
    pub(crate) tracker: TaskTracker,
    pub(crate) alive: ProcessorsAlive,
}

/// The first pause before a processor stopped by a panic is restarted; it
/// doubles with each restart, up to [`RESTART_BACKOFF_MAX`], so a panic on
/// every message does not spin a core.
const RESTART_BACKOFF: Duration = Duration::from_millis(20);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A processor that ran this long before it panicked waits the first pause again.
const RESTART_BACKOFF_RESET: Duration = Duration::from_secs(30);

impl<H: Handler> ProcessorSpawner<H> {
    /// Starts processor `index` on `inbox`; `seat` when the pool can shrink.
    pub(crate) fn spawn(&self, index: usize, inbox: Inbox<H::Data>, seat: Option<Seat>) {
        let stage = ProcessorStage {
            context: ProcessorContext {
                pipeline: self.pipeline.clone(),
                processor: index,
            },
            inbox,
            batchers: self.batchers.clone(),
            seat,
            deadline: self.deadline.clone(),
            terminator: self.terminator.clone(),
            metrics: self.metrics.clone(),
        };
        let span = tracing::info_span!("processor", pipeline = %self.pipeline, index);
        let task = self.alive.track(index, supervise(stage, span));
        self.tracker.spawn(task);
    }
}

/// Runs `stage` until it ends, restarting it (after a back-off) when a panic
/// escapes it: with its index, on its inbox, in its seat. The messages it lost
/// were accounted for as it stopped (see [`ProcessorStage::run`]). It is not
/// restarted once the drain's deadline passed, nor when it has nothing left
/// to do; its task then ends, and the pool reports it missing.
async fn supervise<H: Handler>(mut stage: ProcessorStage<H>, span: tracing::Span) {
    let index = stage.context.processor;
    let pipeline = stage.context.pipeline.clone();
    let mut backoff = RESTART_BACKOFF;
    loop {
        let started = Instant::now();
        let run = catch_panic(|| stage.run().instrument(span.clone()));
        let Err(panic) = run.await else {
            tracing::debug!(%pipeline, processor = index, "processor stopped");
            return;
        };
        if stage.deadline.is_cancelled() || stage.finished() {
            tracing::error!(%pipeline, processor = index, %panic, "processor stopped by a panic outside its handlers: not restarted (the drain's deadline passed, or nothing is left for it)");
            return;
        }
        if started.elapsed() >= RESTART_BACKOFF_RESET {
            backoff = RESTART_BACKOFF;
        }
        tracing::error!(%pipeline, processor = index, %panic, ?backoff, "processor stopped by a panic outside its handlers: restarting it");
        tokio::select! {
            biased;
            () = stage.deadline.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
        // Retired by a shrink, or its input drained by others, meanwhile.
        if stage.finished() {
            return;
        }
    }
}

/// A processor's place in a pool that can shrink and grow while running.
pub(crate) struct Seat {
    /// The wanted processor count: processors at or above it retire.
    pub(crate) target: watch::Receiver<usize>,
    /// The indices of the running processors.
    running: Arc<Mutex<BTreeSet<usize>>>,
    /// Whether its processor gave up its index.
    retired: bool,
}

impl Seat {
    /// Whether processor `index` is to retire now; if so, it gives up its index.
    /// Decided under the same lock as a resize, so a shrink and a regrow never
    /// leave two processors with one index, nor an index without one. Once
    /// retired, it stays so (a regrow may have given its index to another).
    pub(crate) fn retire(&mut self, index: usize) -> bool {
        if !self.retired {
            let mut running = lock(&self.running);
            self.retired = index >= *self.target.borrow();
            if self.retired {
                running.remove(&index);
            }
        }
        self.retired
    }
}

/// The spawner and the shared queue, while processors may still be added.
pub(crate) type SpawnerSlot<H> =
    Arc<Mutex<Option<(ProcessorSpawner<H>, Inbox<<H as Handler>::Data>)>>>;

/// The processors of a running pipeline.
pub(crate) struct ProcessorPool<H: Handler> {
    /// The wanted processor count.
    target: watch::Sender<usize>,
    /// The indices of the running processors of a shared queue.
    running: Arc<Mutex<BTreeSet<usize>>>,
    /// Present while processors may still be added (shared queue, producers running).
    spawner: SpawnerSlot<H>,
    /// The processor tasks alive, by index.
    alive: ProcessorsAlive,
    pub(crate) partitioned: bool,
    pub(crate) max_demand: usize,
    pub(crate) min_demand: usize,
}

impl<H: Handler> ProcessorPool<H> {
    /// Starts `concurrency` processors on one queue per partition.
    pub(crate) fn partitioned(
        spawner: &ProcessorSpawner<H>,
        inboxes: Vec<Inbox<H::Data>>,
        max_demand: usize,
        min_demand: usize,
    ) -> Self {
        let concurrency = inboxes.len();
        for (index, inbox) in inboxes.into_iter().enumerate() {
            spawner.spawn(index, inbox, None);
        }
        Self {
            target: watch::Sender::new(concurrency),
            running: Arc::default(),
            spawner: Arc::new(Mutex::new(None)),
            alive: spawner.alive.clone(),
            partitioned: true,
            max_demand,
            min_demand,
        }
    }

    /// Starts `concurrency` processors on one shared queue, `inbox`.
    pub(crate) fn shared(
        spawner: ProcessorSpawner<H>,
        inbox: Inbox<H::Data>,
        concurrency: usize,
        max_demand: usize,
        min_demand: usize,
    ) -> Self {
        let pool = Self {
            target: watch::Sender::new(0),
            running: Arc::default(),
            alive: spawner.alive.clone(),
            spawner: Arc::new(Mutex::new(Some((spawner, inbox)))),
            partitioned: false,
            max_demand,
            min_demand,
        };
        // A fresh pool always takes a size.
        let _ = pool.resize(concurrency);
        pool
    }

    /// The wanted processor count.
    pub(crate) fn concurrency(&self) -> usize {
        *self.target.borrow()
    }

    /// The indices below the wanted processor count that no processor task
    /// alive has: one that ended outside a shrink (a panic it was not
    /// restarted after, the drain's deadline having passed, or the runtime
    /// shutting down), or every one once the input closed. A task waiting to
    /// restart its processor is alive. A processor retiring after a shrink
    /// is above the count, and one a grow starts is counted as it starts
    /// (read under the lock a resize holds).
    pub(crate) fn missing(&self) -> Vec<usize> {
        let _resizing = lock(&self.spawner);
        self.alive.missing(self.concurrency())
    }

    /// What closes the pool once producers are done: no processor may be added
    /// then, and dropping the spawner's queue and batcher handles lets the drain
    /// run to its end.
    pub(crate) fn closer(&self) -> impl FnOnce() + Send + 'static {
        let spawner = self.spawner.clone();
        move || {
            lock(&spawner).take();
        }
    }

    /// Changes the number of processors: starts the missing ones at once;
    /// those above the new count retire as they finish their current chunk.
    pub(crate) fn resize(&self, concurrency: usize) -> Result<(), ResizeError> {
        if concurrency == 0 {
            return Err(ResizeError::Zero);
        }
        if self.partitioned {
            return Err(ResizeError::Partitioned);
        }
        let spawner = lock(&self.spawner);
        let Some((spawner, inbox)) = spawner.as_ref() else {
            return Err(ResizeError::NotRunning);
        };
        let mut running = lock(&self.running);
        self.target.send_replace(concurrency);
        for index in 0..concurrency {
            // A processor still finishing a chunk after a shrink keeps its index.
            if running.insert(index) {
                let seat = Seat {
                    target: self.target.subscribe(),
                    running: self.running.clone(),
                    retired: false,
                };
                spawner.spawn(index, inbox.clone(), Some(seat));
            }
        }
        Ok(())
    }
}
