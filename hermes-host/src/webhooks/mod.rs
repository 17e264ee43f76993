//! Webhook ingestion: sources from the configuration, signature
//! verification, normalization, the ingest pipeline and its batched
//! Postgres write.
//!
//! ```text
//! POST /webhooks/{source} -> verify -> parse -> normalize -> ingress
//!     -> processors -> batcher "postgres" -> one atomic write per batch -> ack -> 202
//! ```

pub mod endpoint;
pub mod event;
pub mod event_ids;
pub mod form_body;
pub mod ingest_function;
pub mod jsonb;
pub mod normalize;
pub mod pipeline;
pub mod raw_store;
pub mod source;
pub mod store;
pub mod subscription;

pub use event::{Fate, WebhookEvent};
pub use normalize::{Channel, NormalizeError, NormalizedMessage};
pub use pipeline::{IngestHandler, IngestPipeline, PIPELINE_NAME};
pub use source::{Source, SourceRegistry};
pub use store::WebhookBatchStatement;
