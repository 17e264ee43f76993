//! Logs (`tracing`, text or JSON) and metrics (a Prometheus recorder for the
//! `metrics` facade, rendered by `GET /metrics`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The log filter when `RUST_LOG` is unset: `info`, without Postgres notices
/// such as "relation already exists, skipping".
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// sqlx's warning about a connection parameter it does not know prints the
/// parameter's value, which may be a password (`sslpassword=...`): silenced
/// whatever `RUST_LOG` says.
const SILENCED: &str = "sqlx_postgres::options::parse=error";

/// Installs the global `tracing` subscriber: `RUST_LOG` filters (default
/// [`DEFAULT_LOG_FILTER`]), but never lets [`SILENCED`] through; lines go to
/// stderr. Does nothing if one is already installed.
pub fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let filter = filter.add_directive(SILENCED.parse().expect("a valid constant directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Its report of a line it could not write is an `eprintln!`, which
        // panics where the line could not be written: in whatever task logged.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Latency buckets (seconds) for every `*_duration_seconds` histogram.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets (messages) for the pipeline's batch sizes; a batch over 10,000
/// counts in `+Inf` only.
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use as the
/// global `metrics` recorder. If another recorder was installed first, the
/// handle renders an empty registry.
pub fn metrics_handle() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            // Histograms, not the exporter's default summaries: buckets
            // add up across instances, quantiles do not.
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".into()),
                    DURATION_BUCKETS,
                )
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(hermes_pipeline::telemetry::BATCH_SIZE.into()),
                        BATCH_SIZE_BUCKETS,
                    )
                })
                .expect("the bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}
