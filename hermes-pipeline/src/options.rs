//! Stage options, with Broadway-like defaults.

use std::sync::Arc;
use std::time::Duration;

use crate::batcher_stage::SizeFn;
use crate::message::Message;
use crate::producer_stage::PartitionFn;

/// Processor options.
pub struct ProcessorOptions<T> {
    pub(crate) concurrency: usize,
    pub(crate) max_demand: usize,
    pub(crate) min_demand: Option<usize>,
    pub(crate) partition_by: Option<PartitionFn<T>>,
}

/// The longest `batch_timeout` or rate-limit interval: a year (Tokio's
/// timers reach about two).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Default processor `max_demand`: large enough to amortise hand-offs, small
/// enough to keep latency and memory low.
pub const DEFAULT_MAX_DEMAND: usize = 100;

impl<T> Default for ProcessorOptions<T> {
    fn default() -> Self {
        Self {
            concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_demand: DEFAULT_MAX_DEMAND,
            min_demand: None,
            partition_by: None,
        }
    }
}

impl<T> ProcessorOptions<T> {
    /// Defaults: concurrency = available CPU cores, `max_demand` = 100,
    /// `min_demand` = `max_demand / 2`, no partitioning.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of processors running `handle_message` in parallel (≥ 1).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// The most messages a producer is asked for at once, and the size of the
    /// chunks processors take (≥ 1).
    pub fn max_demand(mut self, max_demand: usize) -> Self {
        self.max_demand = max_demand;
        self
    }

    /// A producer is asked again once `max_demand - min_demand` slots are free
    /// (default `max_demand / 2`; must be below `max_demand`); while the
    /// pipeline drains, as soon as one is.
    pub fn min_demand(mut self, min_demand: usize) -> Self {
        self.min_demand = Some(min_demand);
        self
    }

    /// Partitions messages over the processors: messages with the same value
    /// (modulo the concurrency) go to the same processor, in order. A partitioned
    /// processor pool cannot be resized while running.
    pub fn partition_by(
        mut self,
        partition: impl Fn(&Message<T>) -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.partition_by = Some(Arc::new(partition));
        self
    }

    pub(crate) fn resolved_min_demand(&self) -> usize {
        self.min_demand.unwrap_or(self.max_demand / 2)
    }
}

/// Batcher options.
pub struct BatcherOptions<T> {
    pub(crate) batch_size: usize,
    pub(crate) batch_timeout: Duration,
    pub(crate) concurrency: usize,
    pub(crate) max_batch_bytes: Option<(usize, SizeFn<T>)>,
    pub(crate) flush_when_idle: bool,
}

impl<T> Default for BatcherOptions<T> {
    fn default() -> Self {
        Self {
            batch_size: 100,
            batch_timeout: Duration::from_secs(1),
            concurrency: 1,
            max_batch_bytes: None,
            flush_when_idle: false,
        }
    }
}

impl<T> BatcherOptions<T> {
    /// Defaults (Broadway's): `batch_size` 100, `batch_timeout` 1 s, concurrency 1,
    /// no byte limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most messages in one batch (≥ 1).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// How long a partial batch waits for more messages after its first one
    /// (above zero, at most [`MAX_TIMEOUT`]).
    pub fn batch_timeout(mut self, batch_timeout: Duration) -> Self {
        self.batch_timeout = batch_timeout;
        self
    }

    /// Number of batch processors running `handle_batch` in parallel (≥ 1).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Group commit: hands a partial batch to an idle batch processor as soon
    /// as no more messages are waiting, instead of holding it until
    /// `batch_timeout`, provided it is at least as large as every batch being
    /// handled. So while a batch is handled the next one keeps filling (until
    /// it matches it, is full, times out, or the handling ends): batches grow
    /// with load and each handling costs less per message, while further
    /// batch processors (`concurrency`) overlap batches of similar size.
    /// Latency stays at about one batch handling time when load is light. A
    /// batch of a key goes as soon as its own batch processor is idle. Off by
    /// default (Broadway's behaviour: a partial batch waits for its timeout).
    pub fn flush_when_idle(mut self, flush_when_idle: bool) -> Self {
        self.flush_when_idle = flush_when_idle;
        self
    }

    /// Closes a batch before the next message would take it over `max_bytes`, as
    /// measured by `size_of`, and as soon as it reaches `max_bytes` (a single
    /// larger message makes a batch of its own, which goes at once).
    pub fn max_batch_bytes(
        mut self,
        max_bytes: usize,
        size_of: impl Fn(&Message<T>) -> usize + Send + Sync + 'static,
    ) -> Self {
        self.max_batch_bytes = Some((max_bytes, Arc::new(size_of)));
        self
    }
}
