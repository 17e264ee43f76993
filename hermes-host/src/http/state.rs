//! What every HTTP handler shares.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::webhooks::{IngestPipeline, SourceRegistry};

/// The shared state of the HTTP handlers. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    sources: Arc<SourceRegistry>,
    ingest: IngestPipeline,
    pool: PgPool,
    metrics: PrometheusHandle,
    retry_after_secs: u64,
    read_timeout: Duration,
}

impl AppState {
    /// State over the webhook sources, the ingest pipeline, the database pool
    /// and the metrics recorder's handle, answering 503s with
    /// `retry_after_secs` and 408 to a body not read within `read_timeout`.
    pub fn new(
        sources: Arc<SourceRegistry>,
        ingest: IngestPipeline,
        pool: PgPool,
        metrics: PrometheusHandle,
        retry_after_secs: u64,
        read_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                sources,
                ingest,
                pool,
                metrics,
                retry_after_secs,
                read_timeout,
            }),
        }
    }

    /// The webhook sources.
    pub fn sources(&self) -> &SourceRegistry {
        &self.inner.sources
    }

    /// The ingest pipeline.
    pub fn ingest(&self) -> &IngestPipeline {
        &self.inner.ingest
    }

    /// The database pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The Prometheus recorder's handle.
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    /// `Retry-After` of a 503, in seconds.
    pub fn retry_after_secs(&self) -> u64 {
        self.inner.retry_after_secs
    }

    /// How long a request's body may take to arrive.
    pub fn read_timeout(&self) -> Duration {
        self.inner.read_timeout
    }
}
