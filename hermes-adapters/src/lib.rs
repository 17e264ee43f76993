//! Real-world edges for `hermes-pipeline`:
//!
//! - [`postgres`]: the batch writer (idempotent, per-row outcomes, retries,
//!   poison-row isolation) and a private local cluster;
//! - [`webhook`]: signature verification (and signing) for the webhook
//!   schemes providers use;
//! - [`sandbox`]: stand-ins for the outside world (a webhook sender under
//!   load) for the demo, the end-to-end tests and the benchmarks.

#![warn(missing_docs)]

pub mod postgres;
pub mod sandbox;
pub mod webhook;
