//! Benchmarks for Hermes. Each benchmark prints one JSON line per result, so runs
//! can be compared by machine; see the README's benchmark section.

pub mod bare_webhook;
mod bench_cluster;
mod copy_text;
pub mod pg_sink;
pub mod pipeline;
pub mod report;
pub mod webhook;
