//! The ingest topology: HTTP ingress → processors → one batcher → the batched
//! Postgres write → acknowledgement (the waiting HTTP request answers 202).
//!
//! Verification, parsing and normalization happen in the HTTP handler, before
//! a message is enqueued, so nothing invalid takes room in the pipeline. The
//! batch handler writes each batch with one atomic statement and records each
//! event's [`Fate`] before the pipeline acknowledges it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use hermes_adapters::postgres::{BatchWriter, RetryPolicy, RowOutcome, WriteError};
use hermes_pipeline::{
    BatchInfo, BatcherOptions, ConfigError, Handler, Ingress, Message, Pipeline, ProcessorContext,
    ProcessorOptions,
};
use sqlx::PgPool;

use super::event::{Fate, WebhookEvent};
use super::store::{EventKey, WebhookBatchStatement};
use crate::config::WebhooksConfig;

/// The pipeline's name, in metrics and traces.
pub const PIPELINE_NAME: &str = "webhooks";

/// The message data of the ingest pipeline.
pub type EventData = Arc<WebhookEvent>;

/// The ingest pipeline's callbacks.
pub struct IngestHandler {
    writer: BatchWriter<WebhookBatchStatement>,
}

impl IngestHandler {
    /// A handler writing batches to `pool`, retrying per `retry`.
    pub fn new(pool: PgPool, retry: RetryPolicy) -> Self {
        Self {
            writer: BatchWriter::new(pool, WebhookBatchStatement::default(), retry)
                // Each batch is one storing statement: atomic without BEGIN/COMMIT.
                .single_statement(true),
        }
    }
}

impl Handler for IngestHandler {
    type Data = EventData;

    async fn handle_message(&self, _message: &mut Message<EventData>, _context: &ProcessorContext) {
        // Verified, parsed and normalized before it was enqueued.
    }

    async fn handle_batch(&self, batch: &mut [Message<EventData>], info: &BatchInfo) {
        let rows: Vec<EventData> = batch.iter().map(|m| m.data.clone()).collect();
        match self.writer.write(&rows).await {
            Ok(outcomes) => record_outcomes(batch, &outcomes),
            Err(error) => {
                let transient = error.is_transient();
                // The client learns what to do, the log why: the database's
                // error text is the operator's business. A failed write may
                // still have committed (its connection lost at the commit):
                // a redelivery then gets its 202 as a duplicate.
                let reason = match &error {
                    WriteError::Unavailable => {
                        // Logged once, when the database became unreachable.
                        tracing::debug!(batch = info.size, %error, "webhook batch not written");
                        "the database is unavailable; retry later (a redelivery is stored once)"
                    }
                    _ => {
                        tracing::error!(batch = info.size, %error, "webhook batch not written");
                        if transient {
                            "the event could not be stored now; retry later (a redelivery is stored once)"
                        } else {
                            "the event could not be stored because of a database error"
                        }
                    }
                };
                for message in batch.iter_mut() {
                    message.data.set_fate(Fate::Failed {
                        transient,
                        reason: reason.into(),
                    });
                    message.fail(reason);
                }
            }
        }
    }
}

/// Records each message's fate from the writer's outcomes, and fails the
/// rejected ones.
fn record_outcomes(batch: &mut [Message<EventData>], outcomes: &[RowOutcome]) {
    // Ids of the stored keys; in-batch duplicates were not executed and find
    // their id through the row that was.
    let mut ids: HashMap<EventKey, i64> = HashMap::new();
    for (message, outcome) in batch.iter().zip(outcomes) {
        if outcome.is_stored()
            && let Some(id) = message.data.written_id()
        {
            ids.insert(
                (
                    message.data.source.clone(),
                    message.data.idempotency_key.clone(),
                ),
                id,
            );
        }
    }
    for (message, outcome) in batch.iter_mut().zip(outcomes) {
        let event = message.data.clone();
        match outcome {
            RowOutcome::Inserted | RowOutcome::Duplicate => {
                let key = (event.source.clone(), event.idempotency_key.clone());
                match ids.get(&key) {
                    Some(&id) => event.set_fate(Fate::Stored {
                        id,
                        duplicate: *outcome == RowOutcome::Duplicate,
                    }),
                    None => {
                        let reason = "stored, but its id is unknown (a bug)";
                        event.set_fate(Fate::Failed {
                            transient: false,
                            reason: reason.into(),
                        });
                        message.fail(reason);
                    }
                }
            }
            RowOutcome::Rejected(rejection) => {
                let reason = format!("the database rejected the event: {}", rejection.message);
                event.set_fate(Fate::Rejected(reason.clone()));
                message.fail(reason);
            }
        }
    }
}

impl fmt::Debug for IngestPipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngestPipeline")
            .field("in_flight", &self.pipeline().in_flight())
            .field("running", &self.not_running().is_none())
            .finish()
    }
}

/// The running ingest pipeline and its ingress.
#[derive(Clone)]
pub struct IngestPipeline {
    pipeline: Pipeline<IngestHandler>,
    ingress: Ingress<EventData>,
}

impl IngestPipeline {
    /// Starts the pipeline sized by `config`, writing to `pool` and retrying
    /// transient database errors per `retry`.
    pub fn start(
        config: &WebhooksConfig,
        pool: PgPool,
        retry: RetryPolicy,
    ) -> Result<Self, ConfigError> {
        let mut builder = Pipeline::builder(PIPELINE_NAME, IngestHandler::new(pool, retry))
            .processors(
                ProcessorOptions::new()
                    .concurrency(config.processors)
                    .max_demand(config.max_demand),
            )
            .batcher(
                "postgres",
                BatcherOptions::new()
                    .batch_size(config.batch_size)
                    .batch_timeout(config.batch_timeout())
                    .concurrency(config.batch_concurrency)
                    // Group commit: a request waits for one batch write, not for
                    // batch_timeout, whenever a batch processor is free.
                    .flush_when_idle(true),
            );
        if let Some(max) = config.max_in_flight {
            builder = builder.max_in_flight(max);
        }
        let ingress = builder.ingress(config.ingest_capacity);
        let pipeline = builder.start()?;
        Ok(Self { pipeline, ingress })
    }

    /// The pipeline handle (state, drain).
    pub fn pipeline(&self) -> &Pipeline<IngestHandler> {
        &self.pipeline
    }

    /// The ingress the HTTP handler pushes into.
    pub fn ingress(&self) -> &Ingress<EventData> {
        &self.ingress
    }

    /// What keeps the pipeline from accepting and storing events, if
    /// anything: that it is draining, or which stages stopped (a batcher
    /// that died leaves the processors taking events it never writes).
    /// `None` exactly when [`Pipeline::is_healthy`]: the pipeline is not
    /// draining and every stage that should run does (the ingress's
    /// producer, each processor, the batcher).
    pub fn not_running(&self) -> Option<String> {
        if self.pipeline.is_draining() {
            return Some("it is draining".to_owned());
        }
        let stopped = self.pipeline.stopped_stages();
        if stopped.is_empty() {
            return None;
        }
        let stopped: Vec<String> = stopped.iter().map(ToString::to_string).collect();
        Some(format!("stopped: {}", stopped.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::postgres::PgPoolOptions;

    use super::IngestPipeline;
    use crate::Config;

    /// Every size at the most the configuration takes: the pipeline starts
    /// (its derived bounds within its own limits), so nothing that passes
    /// validation fails after the migrations ran.
    #[tokio::test]
    async fn the_largest_valid_sizes_start_the_pipeline() {
        let mut config = Config::default();
        let w = &mut config.webhooks;
        (w.ingest_capacity, w.max_demand, w.batch_size) = (1 << 20, 1 << 20, 1 << 20);
        (w.processors, w.batch_concurrency) = (256, 256);
        w.batch_timeout_ms = 3_600_000;
        config.validate().expect("valid");
        let pool = PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool");
        let pipeline = IngestPipeline::start(
            &config.webhooks,
            pool,
            hermes_adapters::postgres::RetryPolicy::default(),
        )
        .expect("starts");
        pipeline.pipeline().drain(Duration::from_secs(5)).await;
    }
}
