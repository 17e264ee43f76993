//! A read-only description of a running pipeline.

use std::fmt;
use std::time::Duration;

use crate::rate_limiter::RateLimit;

/// The shape of a pipeline and its current settings, from [`Pipeline::topology`](crate::Pipeline::topology).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// The pipeline's name.
    pub name: String,
    /// Producer names, in the order they were added (`producer_N`, `ingress_N`).
    pub producers: Vec<String>,
    /// The processor pool.
    pub processors: ProcessorsTopology,
    /// The batchers, in the order they were added.
    pub batchers: Vec<BatcherTopology>,
    /// The bound on messages in flight.
    pub max_in_flight: usize,
    /// The producer rate limit, if any.
    pub rate_limit: Option<RateLimit>,
}

/// The processor pool's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessorsTopology {
    /// Current number of processors.
    pub concurrency: usize,
    /// Most messages a producer is asked for at once.
    pub max_demand: usize,
    /// Producers are asked again once `max_demand - min_demand` slots are free.
    pub min_demand: usize,
    /// Whether messages are partitioned over the processors.
    pub partitioned: bool,
}

/// One batcher's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatcherTopology {
    /// The batcher's name.
    pub name: String,
    /// Most messages per batch.
    pub batch_size: usize,
    /// How long a partial batch waits.
    pub batch_timeout: Duration,
    /// Current number of batch processors.
    pub concurrency: usize,
    /// The byte limit per batch, if any.
    pub max_batch_bytes: Option<usize>,
    /// Whether partial batches go to idle batch processors at once.
    pub flush_when_idle: bool,
}

/// A stage task that should be running and is not, from
/// [`Pipeline::stopped_stages`](crate::Pipeline::stopped_stages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoppedStage {
    /// A producer stage that ended: its producer finished or panicked (it is
    /// not asked again), or its task panicked outside the calls it contains.
    /// An ingress finishes once every handle is dropped and its buffer is
    /// empty.
    Producer(String),
    /// The processor of this index (below the current concurrency) whose
    /// task ended: a panic after the drain's deadline passed (it is
    /// restarted otherwise), the runtime shutting down, or its input closed once
    /// every producer was done.
    Processor(usize),
    /// A batcher whose task ended: a panic outside the calls it contains
    /// (such as in a metrics recorder) after the drain's deadline passed (it
    /// is restarted otherwise), the runtime shutting down, or its input
    /// closed once every processor was done. The processors fail what they
    /// route to it.
    Batcher(String),
}

impl fmt::Display for StoppedStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoppedStage::Producer(name) => write!(f, "producer {name}"),
            StoppedStage::Processor(index) => write!(f, "processor {index}"),
            StoppedStage::Batcher(name) => write!(f, "batcher {name:?}"),
        }
    }
}
