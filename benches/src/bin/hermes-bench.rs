//! `hermes-bench`: runs Hermes benchmarks and prints one JSON line per result.

use clap::{Parser, Subcommand};
use hermes_benches::webhook;

#[derive(Parser)]
#[command(about = "Hermes benchmarks: one JSON line per result")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Library benchmarks: pipeline_noop, channel_chain and pipeline_sink_1ms.
    Pipeline {
        /// Messages for pipeline_noop and channel_chain.
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        /// Messages for pipeline_sink_1ms.
        #[arg(long, default_value_t = 200_000)]
        sink_messages: u64,
        /// Runs per benchmark; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The host end to end: signed 1 KB webhooks over many connections
    /// (closed loop) against the standalone Postgres limit for the same
    /// rows, then the latency at half the measured capacity (open loop) and
    /// the HTTP layer alone (404s).
    WebhookE2e {
        /// Measured seconds of each load phase.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Connections of the closed loop.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Requests in flight per connection: 1 speaks HTTP/1.1; more
        /// multiplexes HTTP/2 streams over each connection.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[command(flatten)]
        host: HostArgs,
    },
    /// The Postgres batch writer against a raw COPY of the same 1 KB jsonb
    /// rows, in the same run.
    PgSink {
        /// Rows per measured method.
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
    },
    /// Twice the host's capacity offered open loop to a small ingest
    /// buffer: the 503 share, the host's peak RSS and lost 202s.
    WebhookOverload {
        /// Measured seconds of overload.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Base connections: the overload (open loop) uses 16x, at least 512;
        /// capacity is measured closed loop over ingest_capacity + max_in_flight.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// The host's `[webhooks] ingest_capacity`.
        #[arg(long, default_value_t = 64)]
        ingest_capacity: usize,
        /// The host's `[webhooks] max_in_flight` (events waiting in the
        /// pipeline for their commit).
        #[arg(long, default_value_t = 256)]
        max_in_flight: usize,
        #[command(flatten)]
        host: HostArgs,
    },
}

/// Where the host under test comes from and what it runs on.
#[derive(clap::Args)]
struct HostArgs {
    /// The `hermes` binary (default: `hermes` next to this executable, e.g.
    /// target/release/hermes from `cargo build --release -p hermes-host`).
    #[arg(long)]
    hermes_bin: Option<std::path::PathBuf>,
    /// Run the benchmark's Postgres without fsync (not crash-safe).
    #[arg(long)]
    relaxed: bool,
    /// Extra `[webhooks]` settings for the host, TOML lines such as
    /// "batch_timeout_ms = 2" (repeatable).
    #[arg(long = "webhooks")]
    webhooks: Vec<String>,
}

fn webhook_options(
    secs: u64,
    connections: usize,
    streams: usize,
    host: HostArgs,
) -> webhook::Options {
    webhook::Options {
        secs,
        connections,
        streams,
        hermes_bin: host.hermes_bin,
        relaxed: host.relaxed,
        webhooks: host.webhooks,
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Pipeline {
            messages,
            sink_messages,
            runs,
        } => hermes_benches::pipeline::run(messages, sink_messages, runs),
        Bench::WebhookE2e {
            secs,
            connections,
            streams,
            host,
        } => webhook::run_e2e(&webhook_options(secs, connections, streams, host)),
        Bench::PgSink { rows } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(hermes_benches::pg_sink::run(rows)),
        Bench::WebhookOverload {
            secs,
            connections,
            ingest_capacity,
            max_in_flight,
            host,
        } => webhook::run_overload(
            &webhook_options(secs, connections, 1, host),
            ingest_capacity,
            max_in_flight,
        ),
    }
}
