//! The processors of a pipeline: spawned on one shared queue (which lets the
//! pool shrink and grow while running) or one queue per partition.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::handler::{Handler, ProcessorContext};
use crate::liveness::ProcessorsAlive;
use crate::lock::lock;
use crate::message::Message;
use crate::pipeline::ResizeError;
use crate::processor_stage::{BatcherInlet, ProcessorStage};
use crate::supervisor::supervise;
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
        // Restarted in its place (its index, its inbox, its seat) when a
        // panic stops it; the messages it lost were accounted for as it
        // stopped (see `ProcessorStage::run`).
        let deadline = self.deadline.clone();
        let what = format!("processor {index}");
        let task = self
            .alive
            .track(index, supervise(stage, span, deadline, what));
        self.tracker.spawn(task);
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
