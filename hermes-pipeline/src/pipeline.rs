//! The handle of a running pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batcher_stage::Resize;
use crate::builder::PipelineBuilder;
use crate::handler::Handler;
use crate::in_flight::InFlight;
use crate::liveness::Alive;
use crate::processor_pool::ProcessorPool;
use crate::rate_limiter::{RateLimit, RateLimiter};
use crate::topology::{BatcherTopology, ProcessorsTopology, StoppedStage, Topology};

/// A pipeline that could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `start` was called outside a Tokio runtime.
    #[error("a pipeline must be started from within a Tokio runtime")]
    NoRuntime,
    /// Neither a producer nor an ingress was added.
    #[error("a pipeline needs at least one producer or ingress")]
    NoProducer,
    /// An option is out of range; the text says which.
    #[error("invalid pipeline configuration: {0}")]
    Invalid(String),
}

/// A change of concurrency that was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    /// Concurrency must be at least 1.
    #[error("concurrency must be at least 1")]
    Zero,
    /// Partitioned processors keep per-key order by their count: it is fixed.
    #[error(
        "partitioned processors cannot be resized while running (it would break per-key order)"
    )]
    Partitioned,
    /// No batcher has that name.
    #[error("no batcher named {0:?}")]
    UnknownBatcher(String),
    /// Its producers are done (drained or finished): no processor may be
    /// added; or the batcher stopped, or a panic stopped it during the
    /// resize (it is restarted with its concurrency as before).
    #[error("the pipeline is not running")]
    NotRunning,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Whether the deadline passed and the remaining messages were acknowledged as failed.
    /// `false` means every stage finished its work before the deadline; what a
    /// producer dropped (one that panicked) is not counted:
    /// [`Pipeline::in_flight`] tells whether anything is left.
    pub forced: bool,
}

pub(crate) struct BatcherHandle {
    pub(crate) name: String,
    pub(crate) batch_size: usize,
    pub(crate) batch_timeout: Duration,
    pub(crate) max_batch_bytes: Option<usize>,
    pub(crate) flush_when_idle: bool,
    pub(crate) concurrency: Arc<AtomicUsize>,
    pub(crate) control: mpsc::UnboundedSender<Resize>,
    /// Whether the batcher's task is alive.
    pub(crate) alive: Alive,
}

pub(crate) struct ProducerHandle {
    pub(crate) name: String,
    /// Whether the producer stage's task is alive.
    pub(crate) alive: Alive,
}

pub(crate) struct Shared<H: Handler> {
    pub(crate) name: Arc<str>,
    pub(crate) producers: Vec<ProducerHandle>,
    pub(crate) processors: ProcessorPool<H>,
    pub(crate) batchers: Vec<BatcherHandle>,
    pub(crate) rate_limiter: Arc<RateLimiter>,
    pub(crate) in_flight: Arc<InFlight>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) deadline: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

/// A running pipeline. Cloning the handle is cheap; dropping every handle leaves
/// the pipeline running until its producers finish.
pub struct Pipeline<H: Handler> {
    shared: Arc<Shared<H>>,
}

impl<H: Handler> Clone for Pipeline<H> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<H: Handler> Pipeline<H> {
    /// Starts configuring a pipeline named `name` (used in metrics and traces)
    /// whose stages call `handler`.
    pub fn builder(name: &str, handler: H) -> PipelineBuilder<H> {
        PipelineBuilder::new(name, handler)
    }

    pub(crate) fn from_shared(shared: Shared<H>) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether any task of the pipeline still runs: a producer stage, a
    /// processor, a batcher, a batch processor, or the task that closes the
    /// processor pool once every producer is done. `false` once the pipeline
    /// stopped (drained, or every producer finished and it drained itself).
    ///
    /// This is not whether the pipeline works: one stage whose task died (a
    /// panic outside the calls it contains) leaves the others running, and
    /// this `true`. See [`is_healthy`](Self::is_healthy).
    pub fn is_running(&self) -> bool {
        !self.shared.tracker.is_empty()
    }

    /// The stage tasks that should be running and are not: each producer
    /// stage, each batcher, and the processors of every index below the
    /// current concurrency (see [`StoppedStage`] for why each may end). Empty
    /// while every one runs.
    ///
    /// Batch processors are not listed: one that stopped (a panic outside its
    /// handler and acknowledger) is restarted by its batcher, in its place,
    /// when the next batch goes to it, so a batcher alive can write. Nor are
    /// processors retiring after a shrink, nor a processor or batcher a
    /// panic stopped that is waiting to be restarted in its place: only one
    /// not restarted (the drain's deadline passed) is listed.
    ///
    /// A drain stops every stage: this lists them as they end (see
    /// [`is_draining`](Self::is_draining)).
    pub fn stopped_stages(&self) -> Vec<StoppedStage> {
        let shared = &self.shared;
        let producers = shared
            .producers
            .iter()
            .filter(|producer| !producer.alive.is_alive())
            .map(|producer| StoppedStage::Producer(producer.name.clone()));
        let processors = shared
            .processors
            .missing()
            .into_iter()
            .map(StoppedStage::Processor);
        let batchers = shared
            .batchers
            .iter()
            .filter(|batcher| !batcher.alive.is_alive())
            .map(|batcher| StoppedStage::Batcher(batcher.name.clone()));
        producers.chain(processors).chain(batchers).collect()
    }

    /// Whether the pipeline takes in and handles work: it is not draining,
    /// and every stage task that should be running is (none in
    /// [`stopped_stages`](Self::stopped_stages)). A producer that finished
    /// makes it unhealthy too: it takes in nothing more.
    pub fn is_healthy(&self) -> bool {
        !self.is_draining() && self.stopped_stages().is_empty()
    }

    /// Whether the pipeline was asked to drain.
    pub fn is_draining(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// Messages in flight: produced and not yet acknowledged. The slots a
    /// producer holds while it is asked (up to `max_demand`, held for as long
    /// as it waits inside `produce`; none while it waits in
    /// [`ready`](crate::Producer::ready)) count against `max_in_flight` but
    /// not here.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.current()
    }

    /// The most messages that were ever in flight at once.
    pub fn peak_in_flight(&self) -> usize {
        self.shared.in_flight.peak()
    }

    /// The pipeline's stages and their current settings.
    pub fn topology(&self) -> Topology {
        let shared = &self.shared;
        let pool = &shared.processors;
        Topology {
            name: shared.name.to_string(),
            producers: shared
                .producers
                .iter()
                .map(|producer| producer.name.clone())
                .collect(),
            processors: ProcessorsTopology {
                concurrency: pool.concurrency(),
                max_demand: pool.max_demand,
                min_demand: pool.min_demand,
                partitioned: pool.partitioned,
            },
            batchers: shared
                .batchers
                .iter()
                .map(|batcher| BatcherTopology {
                    name: batcher.name.clone(),
                    batch_size: batcher.batch_size,
                    batch_timeout: batcher.batch_timeout,
                    concurrency: batcher.concurrency.load(Ordering::Relaxed),
                    max_batch_bytes: batcher.max_batch_bytes,
                    flush_when_idle: batcher.flush_when_idle,
                })
                .collect(),
            max_in_flight: shared.in_flight.max(),
            rate_limit: shared.rate_limiter.limit(),
        }
    }

    /// Replaces the producers' rate limit (`None` lifts it). Takes effect at
    /// once, for messages already produced and waiting for room too. The
    /// window in progress goes on: what it let through counts against the new
    /// limit (see [`RateLimit`]), so setting a limit again, as a controller
    /// re-applying it on a timer would, lets nothing more through.
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) -> Result<(), ConfigError> {
        RateLimit::validate(limit)?;
        self.shared.rate_limiter.set(limit);
        Ok(())
    }

    /// Changes the number of processors. Growing starts new processors at once;
    /// shrinking retires processors as they finish their current chunk.
    pub fn set_processor_concurrency(&self, concurrency: usize) -> Result<(), ResizeError> {
        self.shared.processors.resize(concurrency)
    }

    /// Changes the number of batch processors of batcher `name`. Batches of one
    /// key stay serial: the batcher waits for its batch processors to be idle
    /// before it switches, which this call awaits.
    pub async fn set_batcher_concurrency(
        &self,
        name: &str,
        concurrency: usize,
    ) -> Result<(), ResizeError> {
        if concurrency == 0 {
            return Err(ResizeError::Zero);
        }
        let batcher = self
            .shared
            .batchers
            .iter()
            .find(|batcher| batcher.name == name)
            .ok_or_else(|| ResizeError::UnknownBatcher(name.to_owned()))?;
        let (done, resized) = oneshot::channel();
        batcher
            .control
            .send(Resize { concurrency, done })
            .map_err(|_| ResizeError::NotRunning)?;
        resized.await.map_err(|_| ResizeError::NotRunning)
    }

    /// Starts draining: producers are no longer asked (an ingress still hands over
    /// what it accepted), processors finish, partial batches are flushed, and
    /// everything is acknowledged. Returns at once; see [`join`](Self::join).
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Waits until every stage has stopped: after [`shutdown`](Self::shutdown), or
    /// once every producer has finished and the pipeline drained.
    pub async fn join(&self) {
        self.shared.tracker.wait().await;
    }

    /// Drains the pipeline and waits for it, at most `deadline`: what is still in
    /// flight then has its handlers cancelled and is acknowledged as failed (so a
    /// broker redelivers it), as is what a producer draining until finished
    /// holds ready (within a bound, see
    /// [`Draining::UntilFinished`](crate::Draining::UntilFinished)), and this
    /// returns once that is done. Those acknowledgements, and the
    /// [`Handler::handle_failed`] calls before them, are awaited without a time
    /// limit: a `handle_failed` or an acknowledger that hangs holds the drain.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        self.shutdown();
        if tokio::time::timeout(deadline, self.join()).await.is_ok() {
            return Drained { forced: false };
        }
        tracing::warn!(pipeline = %self.shared.name, in_flight = self.in_flight(), "drain deadline passed: failing what remains");
        self.shared.deadline.cancel();
        self.join().await;
        Drained { forced: true }
    }
}
