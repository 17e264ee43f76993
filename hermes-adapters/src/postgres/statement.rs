//! The contract between a row type and the [`BatchWriter`](super::BatchWriter):
//! how to write a batch of rows in one statement and tell, per row, whether it
//! was new.

use std::hash::Hash;

use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::error::DatabaseError;

/// What one statement execution did with one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Written {
    /// The row was new and is now stored.
    Inserted,
    /// A row with the same unique key was already stored. Under an upsert
    /// (`ON CONFLICT ... DO UPDATE`) the stored row may have been updated.
    Duplicate,
}

/// A statement that writes a whole batch of rows in one round trip,
/// idempotently by a unique key, and reports per row whether it was inserted
/// or already present.
///
/// Implement it for a row type (or use the ready-made
/// [`UnnestInsert`](super::UnnestInsert)); the [`BatchWriter`](super::BatchWriter)
/// adds in-batch de-duplication, transactions, retries of transient errors and
/// isolation of rows the database rejects.
pub trait BatchStatement: Send + Sync {
    /// The rows this statement writes.
    type Row: Send + Sync;
    /// The unique key of a row; two rows with equal keys are the same row.
    /// It must agree with the unique constraint the statement relies on.
    type Key: Eq + Hash + Send;

    /// The unique key of `row`.
    fn key(&self, row: &Self::Row) -> Self::Key;

    /// Writes `rows` (non-empty, with pairwise distinct keys) on `conn`, which
    /// is inside a transaction the writer commits afterwards (in autocommit
    /// instead when the writer was told it is a
    /// [single statement](super::BatchWriter::single_statement)), and returns
    /// one [`Written`] per row, in the order of `rows`.
    ///
    /// A key that already exists must not be an error (use `ON CONFLICT`),
    /// unless [`BatchStatement::is_conflict`] recognises that error.
    fn execute<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        rows: &'c [&'c Self::Row],
    ) -> BoxFuture<'c, Result<Vec<Written>, sqlx::Error>>;

    /// Whether `error`, raised by a single row, means "this key is already
    /// stored" rather than "this row is invalid". The default (`false`) suits
    /// statements that handle conflicts with `ON CONFLICT`; a statement
    /// without it can recognise its unique constraint here, and the writer
    /// then reports such a row [`Duplicate`](super::RowOutcome::Duplicate).
    fn is_conflict(&self, error: &dyn DatabaseError) -> bool {
        let _ = error;
        false
    }
}
