//! Metric names and per-stage handles. Handles are registered once per stage, so
//! the hot path only touches atomics (or nothing, without a recorder).

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// Messages received by a stage (counter).
pub const RECEIVED: &str = "hermes_pipeline_received_total";
/// Messages that left a stage successfully (counter).
pub const SUCCEEDED: &str = "hermes_pipeline_succeeded_total";
/// Messages that failed in a stage (counter).
pub const FAILED: &str = "hermes_pipeline_failed_total";
/// Size of each batch handed to a batch handler (histogram).
pub const BATCH_SIZE: &str = "hermes_pipeline_batch_size";
/// Seconds spent in a handler: per chunk for processors, per batch for batchers (histogram).
pub const HANDLER_DURATION: &str = "hermes_pipeline_handler_duration_seconds";
/// Messages in flight, produced but not yet acknowledged (gauge, per pipeline).
pub const IN_FLIGHT: &str = "hermes_pipeline_in_flight";
/// Messages waiting in a stage's input queue (gauge).
pub const QUEUE_DEPTH: &str = "hermes_pipeline_queue_depth";

/// What a stage does, which decides the series it records.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum StageKind {
    /// Counts what it produced, what it handed to the processors, and what
    /// failed before reaching one.
    Producer,
    /// Counts and times its handler, and has an input queue.
    Processor,
    /// All of a processor's series, and the size of each batch.
    Batcher,
}

/// The metric handles of one stage, labelled by pipeline and stage. A series
/// the stage's kind never records is a no-op handle, so it is not exported.
#[derive(Clone)]
pub(crate) struct StageMetrics {
    pub(crate) received: Counter,
    pub(crate) succeeded: Counter,
    pub(crate) failed: Counter,
    pub(crate) duration: Histogram,
    pub(crate) queue_depth: Gauge,
    pub(crate) batch_size: Histogram,
}

impl StageMetrics {
    pub(crate) fn new(pipeline: &str, stage: &str, kind: StageKind) -> Self {
        let labels = [
            ("pipeline", pipeline.to_owned()),
            ("stage", stage.to_owned()),
        ];
        let handles = kind != StageKind::Producer;
        Self {
            received: counter!(RECEIVED, &labels),
            succeeded: counter!(SUCCEEDED, &labels),
            failed: counter!(FAILED, &labels),
            duration: if handles {
                histogram!(HANDLER_DURATION, &labels)
            } else {
                Histogram::noop()
            },
            queue_depth: if handles {
                gauge!(QUEUE_DEPTH, &labels)
            } else {
                Gauge::noop()
            },
            batch_size: if kind == StageKind::Batcher {
                histogram!(BATCH_SIZE, &labels)
            } else {
                Histogram::noop()
            },
        }
    }

    pub(crate) fn in_flight(pipeline: &str) -> Gauge {
        gauge!(IN_FLIGHT, "pipeline" => pipeline.to_owned())
    }
}
