//! An optimistic binary `COPY`: store a batch of rows that are probably all
//! new with `COPY … FROM STDIN (FORMAT binary)`, the fastest way into a
//! table, and let a regular statement decide when it fails.
//!
//! `COPY` has no `ON CONFLICT`: one existing key fails the whole batch, which
//! then stores nothing. [`OptimisticCopy::write`] then runs the caller's
//! regular, idempotent statement instead: after an integrity error the next
//! 1, 2, 4… up to 64 batches skip the `COPY`, so streams of redeliveries
//! do not pay twice, and so after any other error about the rows but a
//! format error (a binary format the column does not take), which switches
//! the `COPY` off for good. A transient error (a lost connection, a timeout)
//! fails the attempt, which the writer retries, `COPY` first.
//!
//! The rows are encoded and sent in chunks of [`CHUNK_BYTES`] as the
//! `COPY` runs, so the server parses and stores one chunk while the next is
//! encoded, instead of waiting for the whole batch.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use sqlx::error::BoxDynError;
use sqlx::{Connection, PgConnection};

use super::binary_copy::BinaryCopy;
use super::retry::{ErrorClass, classify};

/// The most batches in a row that skip the `COPY` after it met an existing key.
const MAX_SKIP: u32 = 64;

/// The encoded bytes sent as one `CopyData` message (a row longer than
/// this goes in a message of its own size): what the server reads from its
/// socket at a time.
const CHUNK_BYTES: usize = 64 << 10;

/// A `COPY` statement tried first for each batch, with its back-off.
#[derive(Debug)]
pub struct OptimisticCopy {
    sql: String,
    /// Set when the `COPY` failed with a format error where the regular
    /// statement succeeded: it will not work here.
    disabled: AtomicBool,
    /// Batches that skip the `COPY` before trying it again.
    skip: AtomicU32,
    /// What `skip` is set to after the next conflict (doubled each time).
    penalty: AtomicU32,
}

/// Why an optimistic `COPY` did not store the batch.
#[derive(Debug)]
pub enum CopyFailure {
    /// Nothing was stored and the connection is usable (in a transaction,
    /// rolled back to a savepoint): [`OptimisticCopy::write`] runs the
    /// regular statement instead.
    Fallback(sqlx::Error),
    /// The connection or transaction is unusable (a transient error): fail
    /// the attempt.
    Abort(sqlx::Error),
}

impl CopyFailure {
    /// What a statement of the `COPY` path failing with `error` means: a
    /// transient error leaves the connection unusable (abort the attempt);
    /// anything else the regular statement may not meet (fall back).
    pub fn of(error: sqlx::Error) -> Self {
        match classify(&error) {
            ErrorClass::Transient => CopyFailure::Abort(error),
            _ => CopyFailure::Fallback(error),
        }
    }
}

impl OptimisticCopy {
    /// A `COPY … FROM STDIN (FORMAT binary)` statement, e.g.
    /// `COPY events (id, source, payload) FROM STDIN (FORMAT binary)`.
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            disabled: AtomicBool::new(false),
            skip: AtomicU32::new(0),
            penalty: AtomicU32::new(0),
        }
    }

    /// Whether it has not been switched off.
    pub fn is_enabled(&self) -> bool {
        !self.disabled.load(Ordering::Relaxed)
    }

    /// Whether this batch should try the `COPY` (it is enabled and not
    /// backing off); counts the batch against the back-off.
    fn should_try(&self) -> bool {
        self.is_enabled()
            && self
                .skip
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_sub(1))
                .is_err()
    }

    /// Runs the `COPY` of `rows`, each written into the data by `encode`
    /// (a [`BinaryCopy::row`] and its fields), on `conn`: in a transaction
    /// inside a savepoint it rolls back to on failure, in autocommit on its
    /// own (a failed `COPY` stores nothing). On success every row is stored.
    /// If `encode` fails on a row, the `COPY` is abandoned (a `CopyFail`) and
    /// this returns [`CopyFailure::Fallback`].
    ///
    /// A `COPY` that stores fewer rows than it was given (a `BEFORE INSERT`
    /// trigger skipped some) fails with [`CopyFailure::Abort`]: which rows are
    /// missing cannot be told, so none may be reported stored.
    pub async fn run<R>(
        &self,
        conn: &mut PgConnection,
        rows: impl IntoIterator<Item = R>,
        encode: impl FnMut(R, &mut BinaryCopy) -> Result<(), BoxDynError>,
    ) -> Result<(), CopyFailure> {
        let savepoint = conn.is_in_transaction();
        if savepoint {
            sqlx::query("SAVEPOINT hermes_copy")
                .execute(&mut *conn)
                .await
                .map_err(CopyFailure::Abort)?;
        }
        let error = match stream(conn, &self.sql, rows, encode).await {
            Ok((stored, rows)) if usize::try_from(stored).is_ok_and(|stored| stored == rows) => {
                self.penalty.store(0, Ordering::Relaxed);
                return Ok(());
            }
            Ok((stored, rows)) => {
                return Err(CopyFailure::Abort(sqlx::Error::Protocol(format!(
                    "COPY stored {stored} of {rows} rows (a trigger on the table skipped \
                     some); which ones cannot be told, so the batch fails"
                ))));
            }
            Err(error) => error,
        };
        let failure = CopyFailure::of(error);
        if savepoint && matches!(failure, CopyFailure::Fallback(_)) {
            sqlx::query("ROLLBACK TO SAVEPOINT hermes_copy")
                .execute(&mut *conn)
                .await
                .map_err(CopyFailure::Abort)?;
        }
        Err(failure)
    }

    /// Stores a batch by `copy` unless the `COPY` is switched off or backing
    /// off, and by the regular statement `fallback` then, or when `copy`
    /// fails with [`CopyFailure::Fallback`] (which starts a back-off, or
    /// switches the `COPY` off; see the module docs). A
    /// [`CopyFailure::Abort`] fails the write.
    pub async fn write<T>(
        &self,
        conn: &mut PgConnection,
        copy: impl AsyncFnOnce(&mut PgConnection) -> Result<T, CopyFailure>,
        fallback: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        if !self.should_try() {
            return fallback(conn).await;
        }
        match copy(conn).await {
            Ok(stored) => Ok(stored),
            Err(CopyFailure::Abort(error)) => Err(error),
            Err(CopyFailure::Fallback(error)) => {
                let stored = fallback(conn).await?;
                self.resolved_by_fallback(&error);
                Ok(stored)
            }
        }
    }

    /// Reports that the regular statement stored the batch whose `COPY`
    /// failed with `error` (not a transient one: those abort the attempt). A
    /// format error (the binary data is not what the columns take) will fail
    /// every time: stop trying. Anything else (an existing key, a constraint
    /// the statement's conflict clause resolved) was about these rows: back
    /// off for a while.
    fn resolved_by_fallback(&self, error: &sqlx::Error) {
        if is_format_error(error) {
            if !self.disabled.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    statement = %self.sql,
                    %error,
                    "the optimistic COPY failed where the regular statement succeeded (do the \
                     Rust types have the binary format of the column types?); not trying it again"
                );
            }
            return;
        }
        let penalty = (self.penalty.load(Ordering::Relaxed) * 2).clamp(1, MAX_SKIP);
        self.penalty.store(penalty, Ordering::Relaxed);
        self.skip.store(penalty, Ordering::Relaxed);
    }
}

/// Whether `error` says a binary `COPY`'s data is not what its columns take:
/// SQLSTATE 22P03 (invalid binary representation), 42804 (datatype
/// mismatch), 08P01 (a value shorter than its type: "insufficient data left
/// in message", as an `i32` sent for a `bigint`), or XX000, which some
/// types' binary input raises for a foreign format (jsonb's, for a text
/// value: "unsupported jsonb version number").
fn is_format_error(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.code().is_some_and(|code| matches!(&*code, "22P03" | "42804" | "08P01" | "XX000")))
}

/// Runs `COPY ... FROM STDIN` of `rows`, encoded by `encode` and sent
/// chunk by chunk; returns how many rows the server stored and how many
/// were sent.
async fn stream<R>(
    conn: &mut PgConnection,
    sql: &str,
    rows: impl IntoIterator<Item = R>,
    mut encode: impl FnMut(R, &mut BinaryCopy) -> Result<(), BoxDynError>,
) -> Result<(u64, usize), sqlx::Error> {
    let mut copy = conn.copy_in_raw(sql).await?;
    let mut data = BinaryCopy::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 4);
    // A failed send means a broken connection; dropping `copy` then queues
    // a CopyFail, and the writer discards the connection with the attempt.
    for row in rows {
        if let Err(error) = encode(row, &mut data) {
            copy.abort("a row could not be encoded").await?;
            return Err(sqlx::Error::Encode(error));
        }
        if data.pending().len() >= CHUNK_BYTES {
            copy.send(data.pending()).await?;
            data.clear();
        }
    }
    data.end();
    copy.send(data.pending()).await?;
    Ok((copy.finish().await?, data.rows()))
}
