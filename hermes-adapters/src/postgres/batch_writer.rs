//! Writes batches of rows to Postgres in one round trip each, idempotently,
//! with a per-row outcome, retries of transient errors and isolation of the
//! rows the database rejects.

use std::collections::HashMap;
use std::fmt;

use sqlx::error::DatabaseError;
use sqlx::{Connection, PgConnection, PgPool};

use super::circuit_breaker::{Admission, CircuitBreaker};
use super::guarded_connection::GuardedConnection;
use super::retry::{ErrorClass, RetryPolicy, classify};
use super::statement::{BatchStatement, Written};

/// The fate of one row given to [`BatchWriter::write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOutcome {
    /// The row was new and is now stored (committed).
    Inserted,
    /// The row's key was already stored, by an earlier write or by an earlier
    /// row of the same batch; nothing new was stored for it (under an upsert,
    /// the stored row may have been updated).
    Duplicate,
    /// The database refused the row (a type or constraint violation), or the
    /// client could not encode one of its values; it is not stored, and
    /// writing it again will fail again.
    Rejected(Rejection),
}

impl RowOutcome {
    /// Whether the row is stored now (inserted, or already present).
    pub fn is_stored(&self) -> bool {
        matches!(self, RowOutcome::Inserted | RowOutcome::Duplicate)
    }
}

/// Why a row was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The SQLSTATE code, e.g. `23514` for a CHECK violation; empty when the
    /// client could not encode the row (see `message`).
    pub code: String,
    /// The database's message, e.g. `new row for relation "t" violates check
    /// constraint "t_amount_check"`.
    pub message: String,
    /// The violated constraint, when the database names one.
    pub constraint: Option<String>,
    /// The database's detail line, when it gives one. It may contain the
    /// row's values.
    pub detail: Option<String>,
}

impl Rejection {
    fn from_database_error(error: &dyn DatabaseError) -> Self {
        let (code, detail) = match error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
            Some(pg) => (pg.code().to_owned(), pg.detail().map(str::to_owned)),
            None => (
                error.code().map(|c| c.into_owned()).unwrap_or_default(),
                None,
            ),
        };
        Rejection {
            code,
            message: error.message().to_owned(),
            constraint: error.constraint().map(str::to_owned),
            detail,
        }
    }
}

impl Rejection {
    fn from_client_error(error: &sqlx::Error) -> Self {
        Rejection {
            code: String::new(),
            message: error.to_string(),
            constraint: None,
            detail: None,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.code.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{} (SQLSTATE {})", self.message, self.code)
        }
    }
}

/// Why a whole batch could not be written. Some sub-batches may have been
/// committed before the error (see [`BatchWriter::write`]); writing the same
/// rows again is safe, they then come back as [`RowOutcome::Duplicate`].
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A transient error (lost connection, deadlock, ...) persisted through
    /// every attempt the retry policy allows (by count, or by time). Worth
    /// trying again later.
    #[error("transient database error persisted after {attempts} attempts: {source}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        source: sqlx::Error,
    },
    /// The database is unreachable: connections to it (refused, timed out,
    /// the server starting or shutting down) have kept failing, for this
    /// write or for others of the same writer, and none has opened since.
    /// The write stopped retrying, or did not try at all. Worth trying again
    /// later.
    #[error("the database is unreachable")]
    Unavailable,
    /// An error no retry will fix and that no row in particular caused: a
    /// broken statement, a missing table or privilege, a closed pool.
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// The statement returned a different number of outcomes than rows.
    #[error("the batch statement reported {got} outcomes for {expected} rows")]
    OutcomeCount {
        /// Rows given to the statement.
        expected: usize,
        /// Outcomes it returned.
        got: usize,
    },
}

impl WriteError {
    /// Whether trying the same batch again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            WriteError::RetriesExhausted { .. } | WriteError::Unavailable
        )
    }
}

/// Which row of several with the same key in one batch is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InBatchDuplicates {
    /// The first is written, the later ones are reported
    /// [`Duplicate`](RowOutcome::Duplicate). Right for insert-only events.
    #[default]
    KeepFirst,
    /// The last is written, the earlier ones are reported
    /// [`Duplicate`](RowOutcome::Duplicate). Right for upserts of snapshots
    /// where the latest version wins.
    KeepLast,
}

/// Writes batches of rows with a [`BatchStatement`], adding:
///
/// - **de-duplication inside the batch** by [`BatchStatement::key`], before
///   anything is sent (a statement cannot insert one key twice, and
///   `ON CONFLICT DO UPDATE` refuses to touch a row twice);
/// - **one transaction per attempt**, committed before outcomes are reported
///   (or, for a statement that is one atomic SQL statement, autocommit: see
///   [`BatchWriter::single_statement`]);
/// - **retries of transient errors** with the [`RetryPolicy`]'s jittered
///   exponential back-off;
/// - **failing fast while the database is unreachable**: once connections
///   have failed for a second, or for the pool's whole `acquire_timeout`,
///   writes (of this writer and its clones) fail at once with
///   [`WriteError::Unavailable`] instead of waiting out connection attempts,
///   and one write every 0.5 s first checks whether the database is back;
/// - **poison-row isolation**: when the database rejects the batch for a data
///   or constraint error, the batch is split in halves, each written in its
///   own transaction, recursively, until the offending rows are alone; those
///   are reported [`Rejected`](RowOutcome::Rejected) and the others stored.
///   `k` bad rows in `n` cost about `2k·log2(n)` extra statements.
#[derive(Debug, Clone)]
pub struct BatchWriter<S> {
    pool: PgPool,
    statement: S,
    retry: RetryPolicy,
    duplicates: InBatchDuplicates,
    single_statement: bool,
    breaker: CircuitBreaker,
}

/// Why one attempt failed.
enum AttemptError {
    Sql(sqlx::Error),
    /// No connection could be opened: the circuit breaker is open.
    Unreachable,
    OutcomeCount {
        expected: usize,
        got: usize,
    },
}

/// `written` if the statement returned one outcome per row of `rows`.
fn one_outcome_per_row<R>(written: Vec<Written>, rows: &[R]) -> Result<Vec<Written>, AttemptError> {
    if written.len() == rows.len() {
        Ok(written)
    } else {
        Err(AttemptError::OutcomeCount {
            expected: rows.len(),
            got: written.len(),
        })
    }
}

impl From<sqlx::Error> for AttemptError {
    fn from(error: sqlx::Error) -> Self {
        AttemptError::Sql(error)
    }
}

/// Why a range of rows could not be written as a whole.
enum RangeError {
    /// Some row of the range is bad: split it.
    Row(sqlx::Error),
    /// Give up on the whole batch.
    Fail(WriteError),
}

impl<S: BatchStatement> BatchWriter<S> {
    /// A writer of `statement` on `pool`, retrying transient errors per `retry`.
    pub fn new(pool: PgPool, statement: S, retry: RetryPolicy) -> Self {
        Self {
            pool,
            statement,
            retry,
            duplicates: InBatchDuplicates::KeepFirst,
            single_statement: false,
            breaker: CircuitBreaker::default(),
        }
    }

    /// Chooses which of several rows with one key in a batch is written
    /// (default: [`InBatchDuplicates::KeepFirst`]).
    pub fn in_batch_duplicates(mut self, policy: InBatchDuplicates) -> Self {
        self.duplicates = policy;
        self
    }

    /// Declares that the statement's [`execute`](BatchStatement::execute)
    /// sends exactly one SQL statement (e.g. a call of a function that does
    /// the whole write), which Postgres runs atomically by itself. The writer
    /// then runs it in autocommit on a plain pooled connection, without
    /// `BEGIN` and `COMMIT`: one round trip per attempt instead of three.
    /// De-duplication, retries and poison-row isolation are unchanged; the
    /// outcomes are committed when the statement returns.
    ///
    /// Only for single statements: a statement that sends several would have
    /// each committed on its own, and a failure could leave part of a batch
    /// stored. (One exception is safe: a statement whose first attempt stores
    /// nothing when it fails, followed by one that decides, as
    /// [`UnnestInsert`](super::UnnestInsert)'s optimistic COPY and its
    /// fallback INSERT.) Default: `false` (one transaction per attempt).
    pub fn single_statement(mut self, single: bool) -> Self {
        self.single_statement = single;
        self
    }

    /// The statement this writer executes.
    pub fn statement(&self) -> &S {
        &self.statement
    }

    /// The pool this writer uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The retry policy of this writer.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Writes `rows` and returns one outcome per row, in input order.
    ///
    /// A row with the same key as another row of the batch shares the fate of
    /// the row that is written (see [`InBatchDuplicates`]): it is
    /// [`Duplicate`](RowOutcome::Duplicate) if that row is stored now, and
    /// [`Rejected`](RowOutcome::Rejected) with the same reason if it was
    /// rejected.
    ///
    /// Every `Inserted` or `Duplicate` outcome is committed when this returns
    /// `Ok`. On `Err`, the batch should be treated as failed and written again
    /// later: sub-batches committed before the error (during isolation) then
    /// come back as `Duplicate`. For the same reason, a connection lost during
    /// `COMMIT` can turn an `Inserted` into a `Duplicate` on the retry; the
    /// row is stored exactly once either way.
    pub async fn write(&self, rows: &[S::Row]) -> Result<Vec<RowOutcome>, WriteError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // For each input row, the first row of the batch with its key...
        let mut by_key: HashMap<S::Key, usize> = HashMap::with_capacity(rows.len());
        let first_of: Vec<usize> = rows
            .iter()
            .enumerate()
            .map(|(index, row)| *by_key.entry(self.statement.key(row)).or_insert(index))
            .collect();
        drop(by_key);
        // ... and the row written for that key.
        let written_for: Vec<usize> = match self.duplicates {
            InBatchDuplicates::KeepFirst => first_of,
            InBatchDuplicates::KeepLast => {
                let mut last_of: Vec<usize> = (0..rows.len()).collect();
                for (index, &first) in first_of.iter().enumerate() {
                    last_of[first] = index;
                }
                first_of.iter().map(|&first| last_of[first]).collect()
            }
        };

        let unique: Vec<usize> = (0..rows.len())
            .filter(|&index| written_for[index] == index)
            .collect();
        let unique_rows: Vec<&S::Row> = unique.iter().map(|&index| &rows[index]).collect();
        let unique_outcomes = self.write_unique(&unique_rows, &unique).await?;

        let mut outcome_of: Vec<Option<RowOutcome>> = vec![None; rows.len()];
        for (&index, outcome) in unique.iter().zip(unique_outcomes) {
            outcome_of[index] = Some(outcome);
        }
        let mut outcomes = Vec::with_capacity(rows.len());
        for (index, &target) in written_for.iter().enumerate() {
            let outcome = if target == index {
                outcome_of[index].clone()
            } else {
                outcome_of[target].as_ref().map(|o| match o {
                    RowOutcome::Rejected(reason) => RowOutcome::Rejected(reason.clone()),
                    RowOutcome::Inserted | RowOutcome::Duplicate => RowOutcome::Duplicate,
                })
            };
            // Every written row got an outcome from write_unique.
            outcomes.push(outcome.unwrap_or(RowOutcome::Duplicate));
        }
        Ok(outcomes)
    }

    /// Writes rows with distinct keys (`positions`: each one's position in
    /// the caller's batch), isolating rejected rows by bisection. The retry
    /// policy's time limit counts from the first attempt of the whole batch.
    async fn write_unique(
        &self,
        rows: &[&S::Row],
        positions: &[usize],
    ) -> Result<Vec<RowOutcome>, WriteError> {
        let started = tokio::time::Instant::now();
        let mut outcomes: Vec<RowOutcome> = vec![RowOutcome::Duplicate; rows.len()];
        // Ranges still to write, the next one last; left halves go first.
        let mut pending: Vec<(usize, usize)> = vec![(0, rows.len())];
        while let Some((start, end)) = pending.pop() {
            match self.write_range(&rows[start..end], started).await {
                Ok(written) => {
                    for (slot, w) in outcomes[start..end].iter_mut().zip(written) {
                        *slot = match w {
                            Written::Inserted => RowOutcome::Inserted,
                            Written::Duplicate => RowOutcome::Duplicate,
                        };
                    }
                }
                Err(RangeError::Row(error)) if end - start == 1 => {
                    let rejection = match error.as_database_error() {
                        Some(db) if self.statement.is_conflict(db) => {
                            outcomes[start] = RowOutcome::Duplicate;
                            continue;
                        }
                        Some(db) => Rejection::from_database_error(db),
                        None => Rejection::from_client_error(&error),
                    };
                    let row = positions.get(start).copied().unwrap_or(start);
                    tracing::warn!(row, reason = %rejection, "row rejected");
                    outcomes[start] = RowOutcome::Rejected(rejection);
                }
                Err(RangeError::Row(error)) => {
                    tracing::debug!(
                        rows = end - start,
                        error = %error,
                        "batch rejected by the database; splitting it to isolate the bad rows"
                    );
                    let mid = start + (end - start) / 2;
                    pending.push((mid, end));
                    pending.push((start, mid));
                }
                Err(RangeError::Fail(error)) => return Err(error),
            }
        }
        Ok(outcomes)
    }

    /// Writes `rows` in one transaction, retrying transient errors until the
    /// policy's attempts are spent or its time limit, counted from `started`
    /// (the batch's first attempt), would pass.
    async fn write_range(
        &self,
        rows: &[&S::Row],
        started: tokio::time::Instant,
    ) -> Result<Vec<Written>, RangeError> {
        let mut attempt = 1;
        loop {
            match self.breaker.admit() {
                Admission::Closed => {}
                Admission::Probe(probe) => {
                    if !probe.database_is_back(&self.pool).await {
                        return Err(RangeError::Fail(WriteError::Unavailable));
                    }
                }
                Admission::Refused => return Err(RangeError::Fail(WriteError::Unavailable)),
            }
            let error = match self.attempt(rows).await {
                Ok(written) => return Ok(written),
                Err(AttemptError::Unreachable) => {
                    return Err(RangeError::Fail(WriteError::Unavailable));
                }
                Err(AttemptError::OutcomeCount { expected, got }) => {
                    return Err(RangeError::Fail(WriteError::OutcomeCount { expected, got }));
                }
                Err(AttemptError::Sql(error)) => error,
            };
            let class = match &error {
                sqlx::Error::Database(db)
                    if rows.len() == 1 && self.statement.is_conflict(&**db) =>
                {
                    ErrorClass::Row
                }
                other => classify(other),
            };
            match class {
                ErrorClass::Row => return Err(RangeError::Row(error)),
                ErrorClass::Fatal => return Err(RangeError::Fail(WriteError::Database(error))),
                ErrorClass::Transient => {
                    let delay = self.retry.delay(attempt);
                    if attempt >= self.retry.attempts
                        || started.elapsed() + delay > self.retry.give_up_after
                    {
                        return Err(RangeError::Fail(WriteError::RetriesExhausted {
                            attempts: attempt,
                            source: error,
                        }));
                    }
                    tracing::warn!(
                        attempt,
                        rows = rows.len(),
                        error = %error,
                        delay_ms = delay.as_millis() as u64,
                        "transient database error; retrying the batch"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One attempt on a pooled connection, within the policy's
    /// [`attempt_timeout`](RetryPolicy::attempt_timeout) if it has one. A
    /// connection whose attempt ran out of time, or was cancelled (the
    /// caller's future dropped, say at a drain deadline), may be stuck on a
    /// server that no longer answers: it leaves the pool (see
    /// [`GuardedConnection`]).
    async fn attempt(&self, rows: &[&S::Row]) -> Result<Vec<Written>, AttemptError> {
        let mut conn = match GuardedConnection::acquire(&self.pool).await {
            Ok(conn) => {
                self.breaker.connection_opened();
                conn
            }
            Err(error) if self.breaker.connection_failed(&self.pool, &error) => {
                return Err(AttemptError::Unreachable);
            }
            Err(error) => return Err(error.into()),
        };
        let run = self.run(&mut conn, rows);
        let result = match self.retry.attempt_timeout {
            None => run.await,
            // Dropped unfinished on a time-out: out of the pool.
            Some(limit) => tokio::time::timeout(limit, run)
                .await
                .map_err(|_| attempt_timed_out(limit))?,
        };
        conn.finish();
        result
    }

    /// Begin, execute, check, commit; or, for a
    /// [single statement](Self::single_statement), execute (autocommit) and
    /// check.
    async fn run(
        &self,
        conn: &mut PgConnection,
        rows: &[&S::Row],
    ) -> Result<Vec<Written>, AttemptError> {
        if self.single_statement {
            // Already committed: a wrong count fails the batch, and writing
            // it again reports its rows as duplicates.
            return one_outcome_per_row(self.statement.execute(conn, rows).await?, rows);
        }
        let mut tx = conn.begin().await?;
        let written = one_outcome_per_row(self.statement.execute(&mut tx, rows).await?, rows)?;
        tx.commit().await?;
        Ok(written)
    }
}

/// The error of an attempt that ran out of `limit`.
fn attempt_timed_out(limit: std::time::Duration) -> AttemptError {
    AttemptError::Sql(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the batch statement did not finish within {} ms",
            limit.as_millis()
        ),
    )))
}
