//! Building and starting a pipeline.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::batcher_stage::{BatchLimits, BatchProcessorSpawner, BatcherStage};
use crate::handler::Handler;
use crate::holding_inbox::HoldingInbox;
use crate::in_flight::InFlight;
use crate::ingress::{Ingress, MAX_INGRESS_CAPACITY};
use crate::liveness::{Alive, ProcessorsAlive};
use crate::options::{BatcherOptions, MAX_TIMEOUT, ProcessorOptions};
use crate::pipeline::{BatcherHandle, ConfigError, Pipeline, ProducerHandle, Shared};
use crate::processor_pool::{ProcessorPool, ProcessorSpawner};
use crate::processor_stage::BatcherInlet;
use crate::producer::Producer;
use crate::producer_stage::{DemandSettings, Dispatch, ProducerParts, ProducerStage};
use crate::rate_limiter::{RateLimit, RateLimiter};
use crate::telemetry::{StageKind, StageMetrics};
use crate::terminator::Terminator;

/// The largest in-flight bound: permits are taken in `u32` counts, and a
/// semaphore holds at most `MAX_PERMITS` (less than that on 32-bit targets).
const MAX_IN_FLIGHT: usize = {
    let permits = tokio::sync::Semaphore::MAX_PERMITS;
    if permits < u32::MAX as usize {
        permits
    } else {
        u32::MAX as usize
    }
};

type StartProducer<H> = Box<dyn FnOnce(ProducerParts<H>) -> BoxFuture<'static, ()> + Send>;

/// A producer or ingress added to the builder, started by `start`.
struct ProducerEntry<H: Handler> {
    name: String,
    /// The buffer capacity asked for, if this is an ingress.
    ingress_capacity: Option<usize>,
    start: StartProducer<H>,
}

/// Configures a pipeline; [`start`](PipelineBuilder::start) runs it.
///
/// ```
/// # use hermes_pipeline::*;
/// # struct H;
/// # impl Handler for H { type Data = u32;
/// #   async fn handle_message(&self, _: &mut Message<u32>, _: &ProcessorContext) {} }
/// # #[tokio::main] async fn main() -> Result<(), ConfigError> {
/// let mut builder = Pipeline::builder("example", H)
///     .processors(ProcessorOptions::new().concurrency(2))
///     .batcher("default", BatcherOptions::new().batch_size(10));
/// let ingress = builder.ingress(100);
/// let pipeline = builder.start()?;
/// assert!(ingress.test_message(7).await.is_success());
/// pipeline.drain(std::time::Duration::from_secs(1)).await;
/// # Ok(()) }
/// ```
pub struct PipelineBuilder<H: Handler> {
    name: Arc<str>,
    handler: Arc<H>,
    producers: Vec<ProducerEntry<H>>,
    processors: ProcessorOptions<H::Data>,
    batchers: Vec<(String, BatcherOptions<H::Data>)>,
    rate_limit: Option<RateLimit>,
    max_in_flight: Option<usize>,
    /// Cancelled when the pipeline starts draining; ingresses refuse pushes from then on.
    shutdown: CancellationToken,
}

impl<H: Handler> PipelineBuilder<H> {
    pub(crate) fn new(name: &str, handler: H) -> Self {
        Self {
            name: name.into(),
            handler: Arc::new(handler),
            producers: Vec::new(),
            processors: ProcessorOptions::default(),
            batchers: Vec::new(),
            rate_limit: None,
            max_in_flight: None,
            shutdown: CancellationToken::new(),
        }
    }

    /// Adds a producer. Several producers may feed one pipeline; each runs in its
    /// own task and is asked for messages as in-flight room frees up.
    pub fn producer<P: Producer<H::Data>>(mut self, producer: P) -> Self {
        let name = format!("producer_{}", self.producers.len());
        self.push_producer(name, None, producer);
        self
    }

    /// Adds a push ingress with a buffer of `capacity` messages and returns its
    /// handle. [`start`](Self::start) refuses a capacity of 0 or above
    /// [`tokio::sync::Semaphore::MAX_PERMITS`] (what a Tokio channel holds);
    /// the handle of a pipeline that did not start only reports
    /// [`PushError::Closed`](crate::PushError::Closed).
    pub fn ingress(&mut self, capacity: usize) -> Ingress<H::Data> {
        let (ingress, producer) = Ingress::new(capacity, self.shutdown.clone());
        let name = format!("ingress_{}", self.producers.len());
        self.push_producer(name, Some(capacity), producer);
        ingress
    }

    fn push_producer<P: Producer<H::Data>>(
        &mut self,
        name: String,
        ingress_capacity: Option<usize>,
        producer: P,
    ) {
        let start: StartProducer<H> = Box::new(move |parts: ProducerParts<H>| {
            Box::pin(ProducerStage { producer, parts }.run())
        });
        self.producers.push(ProducerEntry {
            name,
            ingress_capacity,
            start,
        });
    }

    /// Sets the processor options (see [`ProcessorOptions`] for defaults).
    pub fn processors(mut self, options: ProcessorOptions<H::Data>) -> Self {
        self.processors = options;
        self
    }

    /// Adds a named batcher. Messages go to the first batcher unless routed with
    /// [`Message::put_batcher`](crate::Message::put_batcher). Without batchers,
    /// messages are acknowledged right after their processor.
    pub fn batcher(mut self, name: &str, options: BatcherOptions<H::Data>) -> Self {
        self.batchers.push((name.to_owned(), options));
        self
    }

    /// Limits how many messages all producers together may hand to the
    /// processors per interval (see [`RateLimit`]). Adjustable while running
    /// with [`Pipeline::set_rate_limit`].
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Bounds the messages in flight (produced, not yet acknowledged). The default
    /// is `2 × processors × max_demand + Σ batchers (2 × concurrency + 1) × batch_size`:
    /// enough to keep every stage busy, and no more.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = Some(max_in_flight);
        self
    }

    /// The default bound, or `None` if it does not fit in a `usize`.
    fn default_max_in_flight(&self) -> Option<usize> {
        let processors = self
            .processors
            .concurrency
            .checked_mul(self.processors.max_demand)?;
        self.batchers
            .iter()
            .try_fold(processors.checked_mul(2)?, |sum, (_, b)| {
                let batcher = b
                    .concurrency
                    .checked_mul(2)?
                    .checked_add(1)?
                    .checked_mul(b.batch_size)?;
                sum.checked_add(batcher)
            })
    }

    fn validate(&self, max_in_flight: usize) -> Result<(), ConfigError> {
        let processors = &self.processors;
        if self.producers.is_empty() {
            return Err(ConfigError::NoProducer);
        }
        if processors.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "processor concurrency must be at least 1".into(),
            ));
        }
        if processors.max_demand == 0 {
            return Err(ConfigError::Invalid("max_demand must be at least 1".into()));
        }
        if processors.resolved_min_demand() >= processors.max_demand {
            return Err(ConfigError::Invalid(
                "min_demand must be below max_demand".into(),
            ));
        }
        if max_in_flight == 0 || max_in_flight > MAX_IN_FLIGHT {
            return Err(ConfigError::Invalid(format!(
                "max_in_flight must be between 1 and {MAX_IN_FLIGHT} (set it, if the default from the stage sizes is over)"
            )));
        }
        RateLimit::validate(self.rate_limit)?;
        if let Some((name, capacity)) = self
            .producers
            .iter()
            .filter_map(|entry| Some((&entry.name, entry.ingress_capacity?)))
            .find(|(_, capacity)| !(1..=MAX_INGRESS_CAPACITY).contains(capacity))
        {
            return Err(ConfigError::Invalid(format!(
                "{name} has capacity {capacity}: an ingress capacity must be between 1 and {MAX_INGRESS_CAPACITY}"
            )));
        }
        for (index, (name, batcher)) in self.batchers.iter().enumerate() {
            if self.batchers[..index]
                .iter()
                .any(|(other, _)| other == name)
            {
                return Err(ConfigError::Invalid(format!(
                    "two batchers are named {name:?}"
                )));
            }
            if batcher.concurrency == 0
                || batcher.batch_size == 0
                || batcher.batch_timeout.is_zero()
                || batcher.batch_timeout > MAX_TIMEOUT
            {
                return Err(ConfigError::Invalid(format!(
                    "batcher {name:?} needs concurrency ≥ 1, batch_size ≥ 1 and a batch_timeout above zero and at most a year"
                )));
            }
            if batcher.batch_size > max_in_flight {
                return Err(ConfigError::Invalid(format!(
                    "batcher {name:?} has batch_size {} above max_in_flight {max_in_flight}: its batches could only close on timeout",
                    batcher.batch_size
                )));
            }
        }
        Ok(())
    }

    /// Starts every stage on the current Tokio runtime and returns the handle.
    pub fn start(self) -> Result<Pipeline<H>, ConfigError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ConfigError::NoRuntime);
        }
        let max_in_flight = self
            .max_in_flight
            .or_else(|| self.default_max_in_flight())
            .unwrap_or(usize::MAX);
        self.validate(max_in_flight)?;

        let name = self.name.clone();
        let tracker = TaskTracker::new();
        let shutdown = self.shutdown;
        let deadline = CancellationToken::new();
        let in_flight = Arc::new(InFlight::new(max_in_flight, StageMetrics::in_flight(&name)));
        let terminator = Terminator {
            handler: self.handler.clone(),
            in_flight: in_flight.clone(),
        };

        // Batchers first: processors need their inlets.
        let mut inlets = Vec::new();
        let mut batcher_handles = Vec::new();
        for (batcher_name, options) in self.batchers {
            let batcher_name: Arc<str> = batcher_name.into();
            let metrics = StageMetrics::new(
                &name,
                &format!("batcher:{batcher_name}"),
                StageKind::Batcher,
            );
            let (tx, inbox) = mpsc::unbounded_channel();
            let (control_tx, control) = mpsc::unbounded_channel();
            let alive = Alive::default();
            let concurrency = Arc::new(AtomicUsize::new(options.concurrency));
            batcher_handles.push(BatcherHandle {
                name: batcher_name.to_string(),
                batch_size: options.batch_size,
                batch_timeout: options.batch_timeout,
                max_batch_bytes: options.max_batch_bytes.as_ref().map(|(max, _)| *max),
                flush_when_idle: options.flush_when_idle,
                concurrency: concurrency.clone(),
                control: control_tx,
                alive: alive.clone(),
            });
            inlets.push(BatcherInlet {
                name: batcher_name.clone(),
                tx,
                depth: metrics.queue_depth.clone(),
            });
            let stage = BatcherStage {
                limits: BatchLimits {
                    batch_size: options.batch_size,
                    batch_timeout: options.batch_timeout,
                    max_bytes: options.max_batch_bytes,
                    flush_when_idle: options.flush_when_idle,
                },
                inbox: HoldingInbox::new(inbox, in_flight.clone(), "batcher"),
                control,
                concurrency,
                shutdown: shutdown.clone(),
                spawner: BatchProcessorSpawner {
                    pipeline: name.clone(),
                    batcher: batcher_name.clone(),
                    deadline: deadline.clone(),
                    terminator: terminator.clone(),
                    metrics: metrics.clone(),
                    tracker: tracker.clone(),
                },
                metrics,
            };
            let span = tracing::info_span!("batcher", pipeline = %name, batcher = %batcher_name);
            tracker.spawn(alive.track(stage.run(span)));
        }

        // Processors: one shared queue, or one queue per partition.
        let processor_metrics = StageMetrics::new(&name, "processor", StageKind::Processor);
        let options = &self.processors;
        let concurrency = options.concurrency;
        let (max_demand, min_demand) = (options.max_demand, options.resolved_min_demand());
        let spawner = ProcessorSpawner {
            pipeline: name.clone(),
            batchers: inlets,
            deadline: deadline.clone(),
            terminator: terminator.clone(),
            metrics: processor_metrics.clone(),
            tracker: tracker.clone(),
            alive: ProcessorsAlive::default(),
        };
        let depth = processor_metrics.queue_depth.clone();
        let (dispatch, processors) = if let Some(partition_by) = options.partition_by.clone() {
            let (txs, inboxes) = (0..concurrency).map(|_| async_channel::unbounded()).unzip();
            let pool = ProcessorPool::partitioned(&spawner, inboxes, max_demand, min_demand);
            let dispatch = Dispatch::Partitioned {
                txs,
                partition_by,
                depth,
            };
            (dispatch, pool)
        } else {
            // Only a shared queue lets processors come and go while running.
            let (tx, inbox) = async_channel::unbounded();
            let pool = ProcessorPool::shared(spawner, inbox, concurrency, max_demand, min_demand);
            (Dispatch::Shared { tx, depth }, pool)
        };

        // Producers last, so nothing is produced before every stage runs.
        let rate_limiter = Arc::new(RateLimiter::new(self.rate_limit));
        let demand = DemandSettings {
            max_demand,
            refill: max_demand - min_demand,
        };
        let producer_tracker = TaskTracker::new();
        let mut producers = Vec::new();
        for entry in self.producers {
            let producer_name = entry.name;
            let parts = ProducerParts {
                dispatch: dispatch.clone(),
                demand,
                // An ingress stops accepting when the drain starts: its whole
                // backlog, at most its capacity, can be failed at the deadline.
                leftovers: entry.ingress_capacity.unwrap_or(max_in_flight),
                rate_limiter: rate_limiter.clone(),
                shutdown: shutdown.clone(),
                deadline: deadline.clone(),
                terminator: terminator.clone(),
                metrics: StageMetrics::new(&name, &producer_name, StageKind::Producer),
            };
            let span = tracing::info_span!("producer", pipeline = %name, producer = %producer_name);
            let alive = Alive::default();
            let task = alive.track((entry.start)(parts).instrument(span));
            tracker.spawn(producer_tracker.track_future(task));
            producers.push(ProducerHandle {
                name: producer_name,
                alive,
            });
        }
        drop(dispatch);
        producer_tracker.close();
        // Once every producer is done, no processor may be added.
        let close_processors = processors.closer();
        tracker.spawn(async move {
            producer_tracker.wait().await;
            close_processors();
        });
        tracker.close();

        Ok(Pipeline::from_shared(Shared {
            name,
            producers,
            processors,
            batchers: batcher_handles,
            rate_limiter,
            in_flight,
            shutdown,
            deadline,
            tracker,
        }))
    }
}
