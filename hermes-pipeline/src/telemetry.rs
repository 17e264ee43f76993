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

/// The metric handles of one stage, labelled by pipeline and stage.
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
    pub(crate) fn new(pipeline: &str, stage: &str) -> Self {
        let labels = [
            ("pipeline", pipeline.to_owned()),
            ("stage", stage.to_owned()),
        ];
        Self {
            received: counter!(RECEIVED, &labels),
            succeeded: counter!(SUCCEEDED, &labels),
            failed: counter!(FAILED, &labels),
            duration: histogram!(HANDLER_DURATION, &labels),
            queue_depth: gauge!(QUEUE_DEPTH, &labels),
            batch_size: histogram!(BATCH_SIZE, &labels),
        }
    }

    pub(crate) fn in_flight(pipeline: &str) -> Gauge {
        gauge!(IN_FLIGHT, "pipeline" => pipeline.to_owned())
    }
}
