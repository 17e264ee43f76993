//! What every HTTP handler shares.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::webhooks::{IngestPipeline, SourceRegistry};

/// The shared state of the HTTP handlers: its [`Shared`] parts, which it
/// derefs to. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What the HTTP handlers share.
pub struct Shared {
    /// The webhook sources.
    pub sources: Arc<SourceRegistry>,
    /// The ingest pipeline.
    pub ingest: IngestPipeline,
    /// The database pool.
    pub pool: PgPool,
    /// The Prometheus recorder's handle.
    pub metrics: PrometheusHandle,
    /// `Retry-After` of a 503, in seconds.
    pub retry_after_secs: u64,
    /// How long a request's body may take to arrive before a 408.
    pub read_timeout: Duration,
}

impl AppState {
    /// State over `shared`.
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
