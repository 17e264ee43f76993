//! `hermes-bench`: runs Hermes benchmarks and prints one JSON line per result.

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Pipeline {
            messages,
            sink_messages,
            runs,
        } => hermes_benches::pipeline::run(messages, sink_messages, runs),
    }
}
