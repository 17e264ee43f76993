//! Postgres edges: a private local cluster for the host and the tests, and a
//! batch writer that stores rows idempotently with a per-row outcome.

pub mod local;
