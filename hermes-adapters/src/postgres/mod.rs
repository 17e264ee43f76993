//! Postgres edges: a private local cluster for the host and the tests, and a
//! batch writer that stores rows idempotently with a per-row outcome.
//!
//! - [`local`]: [`LocalPostgres`], a private cluster from the machine's server
//!   binaries, and [`local::test_database`] for tests.
//! - [`BatchWriter`]: one statement per batch (one round trip for an
//!   `INSERT` in autocommit; a `COPY` takes two: its start, then its data), per-row
//!   [`RowOutcome`] (inserted, duplicate, rejected), retries of transient
//!   errors ([`RetryPolicy`]) and isolation of poison rows, around any
//!   [`BatchStatement`].
//! - [`UnnestInsert`]: the ready-made [`BatchStatement`] for "insert into one
//!   table, unique key, tell inserted from duplicate", with an optional
//!   optimistic binary `COPY` ([`OptimisticCopy`], [`BinaryCopy`]) for
//!   batches of new rows.
//! - [`JsonText`]: JSON text bound as `jsonb` without parsing it in Rust.
//! - [`GuardedConnection`]: a pooled connection that leaves the pool when
//!   its work is cut short, instead of holding its slot until it answers.

pub mod batch_writer;
pub mod binary_copy;
mod circuit_breaker;
pub mod guarded_connection;
pub mod json_text;
pub mod local;
pub mod optimistic_copy;
pub mod retry;
pub mod statement;
pub mod unnest_insert;

pub use batch_writer::{BatchWriter, InBatchDuplicates, Rejection, RowOutcome, WriteError};
pub use binary_copy::BinaryCopy;
pub use guarded_connection::GuardedConnection;
pub use json_text::JsonText;
pub use local::{LocalPostgres, LocalPostgresConfig, LocalPostgresError};
pub use optimistic_copy::{CopyFailure, OptimisticCopy};
pub use retry::{ErrorClass, RetryPolicy};
pub use statement::{BatchStatement, Written};
pub use unnest_insert::{OnConflict, UnnestInsert, UnnestInsertBuilder, UnnestInsertError};
