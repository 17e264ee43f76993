//! The Postgres batch writer against a real, private PostgreSQL (one fresh
//! database per test, from `local::test_database`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use hermes_adapters::postgres::local::test_database;
use hermes_adapters::postgres::{
    BatchStatement, BatchWriter, InBatchDuplicates, JsonText, RetryPolicy, RowOutcome,
    UnnestInsert, UnnestInsertBuilder, WriteError, Written,
};
use rand::seq::SliceRandom;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};

#[derive(Debug, Clone)]
struct Event {
    id: String,
    amount: i64,
    payload: String,
}

fn event(id: impl Into<String>, amount: i64) -> Event {
    let id = id.into();
    Event {
        payload: format!(r#"{{"id":"{id}","amount":{amount}}}"#),
        id,
        amount,
    }
}

fn events(range: std::ops::Range<usize>) -> Vec<Event> {
    range.map(|i| event(format!("evt-{i:05}"), 1)).collect()
}

/// How the events statement writes: the plain UNNEST insert, or an
/// optimistic binary COPY first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unnest,
    Copy,
}

/// Runs an `async fn(Mode)` test body once per mode.
macro_rules! in_both_modes {
    ($($(#[$attr:meta])* $body:ident => $unnest:ident, $copy:ident;)*) => {$(
        $(#[$attr])*
        async fn $unnest() {
            $body(Mode::Unnest).await
        }
        $(#[$attr])*
        async fn $copy() {
            $body(Mode::Copy).await
        }
    )*};
}

fn events_columns(mode: Mode) -> UnnestInsertBuilder<Event, String> {
    let builder = UnnestInsert::builder("events", |e: &Event| e.id.clone())
        .key_column("id", "text", |e: &Event| e.id.clone())
        .column("amount", "bigint", |e: &Event| e.amount);
    match mode {
        // A String cast to jsonb by the statement.
        Mode::Unnest => builder.column("payload", "jsonb", |e: &Event| e.payload.clone()),
        // Binary COPY needs jsonb's own binary format.
        Mode::Copy => builder
            .column("payload", "jsonb", |e: &Event| JsonText(e.payload.clone()))
            .optimistic_copy(true),
    }
}

fn insert_events(mode: Mode) -> UnnestInsert<Event, String> {
    events_columns(mode).build().expect("valid statement")
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy::new(Duration::from_millis(5), Duration::from_millis(50), 5)
}

async fn setup() -> PgPool {
    let url = test_database().await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("connect to the test database");
    sqlx::query(
        "CREATE TABLE events (
            id text PRIMARY KEY,
            amount bigint NOT NULL CHECK (amount >= 0),
            payload jsonb NOT NULL
        )",
    )
    .execute(&pool)
    .await
    .expect("create table");
    pool
}

async fn truncate(pool: &PgPool) {
    sqlx::query("TRUNCATE events")
        .execute(pool)
        .await
        .expect("truncate");
}

async fn count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Every stored `(id, amount)`, by id.
async fn stored(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT id, amount FROM events ORDER BY id")
        .fetch_all(pool)
        .await
        .expect("rows")
}

/// The stored payload of event `id`.
async fn stored_payload(pool: &PgPool, id: &str) -> serde_json::Value {
    sqlx::query_scalar("SELECT payload FROM events WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("stored payload")
}

/// Asserts that every outcome is `expected`.
#[track_caller]
fn assert_all(outcomes: &[RowOutcome], expected: RowOutcome) {
    assert!(
        outcomes.iter().all(|o| *o == expected),
        "not all {expected:?}: {outcomes:?}"
    );
}

/// Asserts that the rows with an id below `first_new` were duplicates and
/// the others inserted.
#[track_caller]
fn assert_new_from(rows: &[Event], outcomes: &[RowOutcome], first_new: &str) {
    for (row, outcome) in rows.iter().zip(outcomes) {
        let expected = if row.id.as_str() < first_new {
            RowOutcome::Duplicate
        } else {
            RowOutcome::Inserted
        };
        assert_eq!(*outcome, expected, "{}", row.id);
    }
}

async fn a_batch_is_inserted_and_its_redelivery_is_duplicate(mode: Mode) {
    let pool = setup().await;
    let writer = BatchWriter::new(pool.clone(), insert_events(mode), fast_retries());
    let rows = events(0..1000);

    let outcomes = writer.write(&rows).await.expect("write");
    assert_eq!(outcomes.len(), 1000);
    assert_all(&outcomes, RowOutcome::Inserted);
    assert_eq!(count(&pool).await, 1000);
    assert_eq!(stored_payload(&pool, "evt-00042").await["id"], "evt-00042");

    // Redelivery of the whole batch, and a batch mixing old and new rows.
    let again = writer.write(&rows).await.expect("rewrite");
    assert_all(&again, RowOutcome::Duplicate);
    let mixed = events(990..1010);
    let outcomes = writer.write(&mixed).await.expect("write mixed");
    assert_new_from(&mixed, &outcomes, "evt-01000");
    assert_eq!(count(&pool).await, 1010);
    assert_eq!(writer.write(&[]).await.expect("empty"), vec![]);
}

async fn duplicates_inside_one_batch_are_written_once(mode: Mode) {
    let pool = setup().await;
    let writer = BatchWriter::new(pool.clone(), insert_events(mode), fast_retries());
    let rows = vec![
        event("a", 1),
        event("b", 2),
        event("a", 3),
        event("c", 4),
        event("b", 5),
        event("a", 6),
    ];
    let outcomes = writer.write(&rows).await.expect("write");
    use RowOutcome::{Duplicate, Inserted};
    assert_eq!(
        outcomes,
        vec![
            Inserted, Inserted, Duplicate, Inserted, Duplicate, Duplicate
        ]
    );
    assert_eq!(
        stored(&pool).await,
        vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 4)]
    );
}

async fn upserts_keep_the_last_version_and_tell_new_from_updated(mode: Mode) {
    let pool = setup().await;
    let upsert = events_columns(mode)
        .on_conflict_update(&["amount", "payload"])
        .build()
        .expect("valid statement");
    let writer = BatchWriter::new(pool.clone(), upsert, fast_retries())
        .in_batch_duplicates(InBatchDuplicates::KeepLast);

    writer.write(&[event("a", 1)]).await.expect("seed");
    let outcomes = writer
        .write(&[event("a", 2), event("b", 1), event("b", 7), event("a", 9)])
        .await
        .expect("upsert");
    use RowOutcome::{Duplicate, Inserted};
    assert_eq!(outcomes, vec![Duplicate, Duplicate, Inserted, Duplicate]);
    assert_eq!(stored(&pool).await, vec![("a".into(), 9), ("b".into(), 7)]);
}

async fn concurrent_writers_of_overlapping_keys_store_each_key_once(mode: Mode) {
    let pool = setup().await;
    let writer = Arc::new(BatchWriter::new(
        pool.clone(),
        insert_events(mode),
        fast_retries(),
    ));
    let mut tasks = Vec::new();
    for w in 0..6 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            // Writer w covers keys [w*50, w*50 + 300): heavy overlap.
            let mut rows = events(w * 50..w * 50 + 300);
            rows.shuffle(&mut rand::thread_rng());
            let mut results = Vec::new();
            for chunk in rows.chunks(100) {
                let outcomes = writer.write(chunk).await.expect("write");
                results.extend(chunk.iter().map(|r| r.id.clone()).zip(outcomes));
            }
            results
        }));
    }
    let mut inserted: HashMap<String, u32> = HashMap::new();
    let mut seen = HashSet::new();
    for task in tasks {
        for (id, outcome) in task.await.expect("writer task") {
            seen.insert(id.clone());
            match outcome {
                RowOutcome::Inserted => *inserted.entry(id).or_default() += 1,
                RowOutcome::Duplicate => {}
                other => panic!("unexpected outcome {other:?} for {id}"),
            }
        }
    }
    assert_eq!(seen.len(), 550);
    assert_eq!(inserted.len(), 550, "every key reported inserted once");
    assert!(inserted.values().all(|&n| n == 1));
    assert_eq!(count(&pool).await, 550);
}

async fn a_poison_row_is_rejected_and_the_rest_stored(mode: Mode) {
    let pool = setup().await;
    let writer = BatchWriter::new(pool.clone(), insert_events(mode), fast_retries());
    let mut rows = events(0..100);
    rows[37].amount = -1; // violates CHECK (amount >= 0)
    rows.push(event("evt-00037", 5)); // in-batch duplicate of the bad row

    let outcomes = writer.write(&rows).await.expect("write");
    for (i, outcome) in outcomes.iter().enumerate().take(100) {
        if i == 37 {
            let RowOutcome::Rejected(reason) = outcome else {
                panic!("row 37 should be rejected, got {outcome:?}");
            };
            assert_eq!(reason.code, "23514");
            assert_eq!(reason.constraint.as_deref(), Some("events_amount_check"));
            assert!(reason.message.contains("events_amount_check"), "{reason}");
        } else {
            assert_eq!(*outcome, RowOutcome::Inserted, "row {i}");
        }
    }
    assert_eq!(
        outcomes[100], outcomes[37],
        "a duplicate shares the fate of its first"
    );
    assert_eq!(count(&pool).await, 99);
}

async fn several_bad_rows_of_different_kinds_are_isolated(mode: Mode) {
    let pool = setup().await;
    // A trigger that refuses a row: P0001 raise_exception.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_42() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.amount = 42 THEN RAISE EXCEPTION 'no 42'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_42 BEFORE INSERT ON events
             FOR EACH ROW EXECUTE FUNCTION refuse_42();",
    )
    .execute(&pool)
    .await
    .expect("create the trigger");
    let writer = BatchWriter::new(pool.clone(), insert_events(mode), fast_retries());
    let mut rows = events(0..64);
    rows[50].amount = 42;
    rows[0].amount = -5;
    rows[20].payload = "{not json".into(); // 22P02 when cast to jsonb
    // Deeper than Postgres's JSON parser recurses: 54001 statement_too_complex.
    rows[40].payload = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    rows[63].amount = -1;
    let outcomes = writer.write(&rows).await.expect("write");
    let rejected: Vec<(usize, String)> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match o {
            RowOutcome::Rejected(r) => Some((i, r.code.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        rejected,
        vec![
            (0, "23514".to_owned()),
            (20, "22P02".to_owned()),
            (40, "54001".to_owned()),
            (50, "P0001".to_owned()),
            (63, "23514".to_owned())
        ]
    );
    assert_eq!(count(&pool).await, 59);
}

/// Wraps the events insert; in its first `times` executions it does
/// something besides: most break the attempt, one only observes it.
struct Interfering {
    inner: UnnestInsert<Event, String>,
    admin: PgPool,
    interference: Interference,
    times: u32,
    executions: AtomicU32,
    /// Backends stopped by [`Interference::FreezeBackend`].
    frozen: std::sync::Mutex<Vec<i32>>,
    /// Per execution under [`Interference::ProbeTransaction`]: whether it
    /// ran inside a transaction block.
    in_transaction: std::sync::Mutex<Vec<bool>>,
}

/// What [`Interfering`] does in an execution besides inserting.
#[derive(Clone, Copy)]
enum Interference {
    /// Terminate this connection's backend from another connection.
    TerminateBackend,
    /// Raise SQLSTATE 40001 serialization_failure.
    SerializationFailure,
    /// Insert, then drop the last row's outcome (breaking the statement's
    /// one-outcome-per-row contract).
    DropAnOutcome,
    /// Stop this connection's backend process (SIGSTOP), as a frozen server
    /// would be, then insert: the statement is never answered.
    FreezeBackend,
    /// Record whether the execution runs inside a transaction block, then
    /// insert.
    ProbeTransaction,
}

impl Interfering {
    /// How many times the statement was executed.
    fn executions(&self) -> u32 {
        self.executions.load(Ordering::SeqCst)
    }
}

impl Drop for Interfering {
    /// Wakes the frozen backends, which then find their client gone and exit
    /// (also when a test failed).
    fn drop(&mut self) {
        for pid in self.frozen.lock().unwrap().drain(..) {
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

impl BatchStatement for Interfering {
    type Row = Event;
    type Key = String;

    fn key(&self, row: &Event) -> String {
        self.inner.key(row)
    }

    fn execute<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        rows: &'c [&'c Event],
    ) -> BoxFuture<'c, Result<Vec<Written>, sqlx::Error>> {
        Box::pin(async move {
            let n = self.executions.fetch_add(1, Ordering::SeqCst);
            if n < self.times {
                match self.interference {
                    Interference::TerminateBackend => {
                        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                            .fetch_one(&mut *conn)
                            .await?;
                        let terminated: bool =
                            sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                                .bind(pid)
                                .fetch_one(&self.admin)
                                .await?;
                        assert!(terminated);
                        // Wait until the backend is gone, so the insert below
                        // certainly meets a dead connection.
                        for _ in 0..500 {
                            let alive: i64 = sqlx::query_scalar(
                                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                            )
                            .bind(pid)
                            .fetch_one(&self.admin)
                            .await?;
                            if alive == 0 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    Interference::SerializationFailure => {
                        sqlx::query(
                            "DO $$ BEGIN RAISE EXCEPTION 'simulated conflict' \
                             USING ERRCODE = 'serialization_failure'; END $$",
                        )
                        .execute(&mut *conn)
                        .await?;
                    }
                    Interference::FreezeBackend => {
                        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                            .fetch_one(&mut *conn)
                            .await?;
                        // SAFETY: kill(2) with a pid and a signal number.
                        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
                        self.frozen.lock().unwrap().push(pid);
                    }
                    Interference::DropAnOutcome => {
                        let mut written = self.inner.execute(conn, rows).await?;
                        written.pop();
                        return Ok(written);
                    }
                    Interference::ProbeTransaction => {
                        // A transaction-local setting survives into the next
                        // statement only inside a transaction block.
                        sqlx::query("SELECT set_config('hermes.probe', 'set', true)")
                            .execute(&mut *conn)
                            .await?;
                        let value: Option<String> =
                            sqlx::query_scalar("SELECT current_setting('hermes.probe', true)")
                                .fetch_one(&mut *conn)
                                .await?;
                        self.in_transaction
                            .lock()
                            .expect("probe lock")
                            .push(value.as_deref() == Some("set"));
                    }
                }
            }
            self.inner.execute(conn, rows).await
        })
    }
}

fn interfering_writer(
    pool: &PgPool,
    insert: Mode,
    interference: Interference,
    times: u32,
    retry: RetryPolicy,
) -> BatchWriter<Interfering> {
    let statement = Interfering {
        inner: insert_events(insert),
        admin: pool.clone(),
        interference,
        times,
        executions: AtomicU32::new(0),
        frozen: Default::default(),
        in_transaction: Default::default(),
    };
    BatchWriter::new(pool.clone(), statement, retry)
}

async fn a_terminated_connection_is_retried(mode: Mode) {
    let pool = setup().await;
    let writer = interfering_writer(
        &pool,
        mode,
        Interference::TerminateBackend,
        2,
        fast_retries(),
    );
    let rows = events(0..200);
    let outcomes = writer.write(&rows).await.expect("write after retries");
    assert_all(&outcomes, RowOutcome::Inserted);
    assert_eq!(writer.statement().executions(), 3);
    assert_eq!(count(&pool).await, 200);
}

async fn a_serialization_failure_is_retried(mode: Mode) {
    let pool = setup().await;
    let writer = interfering_writer(
        &pool,
        mode,
        Interference::SerializationFailure,
        1,
        fast_retries(),
    );
    let outcomes = writer.write(&events(0..10)).await.expect("write");
    assert_all(&outcomes, RowOutcome::Inserted);
    assert_eq!(writer.statement().executions(), 2);
}

async fn a_frozen_server_times_the_attempt_out_and_closes_its_connection(mode: Mode) {
    let pool = setup().await;
    let retry = fast_retries().attempt_timeout(Duration::from_millis(500));
    let writer = interfering_writer(&pool, mode, Interference::FreezeBackend, 1, retry);
    let rows = events(0..100);
    // Without the attempt timeout, the write waits for the frozen backend forever.
    let outcomes = tokio::time::timeout(Duration::from_secs(20), writer.write(&rows))
        .await
        .expect("the attempt on the frozen backend must time out")
        .expect("write on a fresh connection");
    assert_all(&outcomes, RowOutcome::Inserted);
    assert_eq!(writer.statement().executions(), 2);
    assert_eq!(count(&pool).await, 100);
    // The frozen connection is closed, not held by the pool's ping of a
    // returned connection (which the frozen backend would never answer).
    assert_pool_settles(&pool).await;
}

/// Waits until every connection of `pool` is idle: none is checked out or
/// held by the pool's ping of a returned one (which a frozen backend never
/// answers).
async fn assert_pool_settles(pool: &PgPool) {
    for _ in 0..200 {
        if pool.size() as usize == pool.num_idle() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("a connection is still checked out or being returned");
}

/// A write cancelled while its statement waits on a frozen server (its
/// future dropped, as at a drain deadline) does not leave its connection
/// held by the pool's ping: the connection leaves the pool.
async fn a_write_cancelled_on_a_frozen_server_frees_its_connection(mode: Mode) {
    let pool = setup().await;
    let writer = interfering_writer(&pool, mode, Interference::FreezeBackend, 1, fast_retries());
    let rows = events(0..10);
    let cut = tokio::time::timeout(Duration::from_millis(500), writer.write(&rows)).await;
    assert!(
        cut.is_err(),
        "the write on the frozen backend cannot finish"
    );
    assert_pool_settles(&pool).await;
}

/// The default policy: 6 attempts, with jittered waits of
/// 25–50, 50–100, 100–200, 200–400 and 400–800 ms between them.
#[tokio::test]
async fn a_persistent_transient_error_exhausts_the_default_retries() {
    let pool = setup().await;
    let writer = interfering_writer(
        &pool,
        Mode::Unnest,
        Interference::SerializationFailure,
        u32::MAX,
        RetryPolicy::default(),
    );
    let started = std::time::Instant::now();
    let error = writer.write(&events(0..10)).await.expect_err("must fail");
    let elapsed = started.elapsed();
    assert!(error.is_transient());
    assert!(
        matches!(error, WriteError::RetriesExhausted { attempts: 6, .. }),
        "{error}"
    );
    assert_eq!(writer.statement().executions(), 6);
    assert!(elapsed >= Duration::from_millis(775), "{elapsed:?}");
    assert_eq!(count(&pool).await, 0);
}

#[tokio::test]
async fn retries_stop_at_the_policy_time_limit_whatever_the_count() {
    let pool = setup().await;
    let retry = RetryPolicy::new(Duration::from_millis(50), Duration::from_millis(50), 1_000)
        .give_up_after(Duration::from_millis(300));
    let writer = interfering_writer(
        &pool,
        Mode::Unnest,
        Interference::SerializationFailure,
        u32::MAX,
        retry,
    );
    let started = std::time::Instant::now();
    let error = writer.write(&events(0..10)).await.expect_err("must fail");
    assert!(
        matches!(error, WriteError::RetriesExhausted { .. }),
        "{error}"
    );
    // Waits of 25-50 ms within 300 ms: a handful of attempts, not 1,000.
    let executions = writer.statement().executions();
    assert!((2..=13).contains(&executions), "{executions} attempts");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_broken_statement_fails_the_batch_without_retries() {
    let pool = setup().await;
    let missing = UnnestInsert::builder("no_such_table", |e: &Event| e.id.clone())
        .key_column("id", "text", |e: &Event| e.id.clone())
        .build()
        .expect("valid declaration");
    let writer = BatchWriter::new(pool.clone(), missing, fast_retries());
    let error = writer.write(&events(0..10)).await.expect_err("must fail");
    assert!(!error.is_transient());
    let WriteError::Database(sqlx::Error::Database(db)) = &error else {
        panic!("unexpected error {error:?}");
    };
    assert_eq!(db.code().as_deref(), Some("42P01"));
}

#[tokio::test]
async fn the_optimistic_copy_stores_new_batches_and_stays_on() {
    let pool = setup().await;
    let writer = BatchWriter::new(pool.clone(), insert_events(Mode::Copy), fast_retries());
    for batch in 0..5 {
        let outcomes = writer
            .write(&events(batch * 100..batch * 100 + 100))
            .await
            .expect("write");
        assert_all(&outcomes, RowOutcome::Inserted);
    }
    // A redelivery falls back to the INSERT; the COPY stays available.
    let again = writer.write(&events(0..100)).await.expect("rewrite");
    assert_all(&again, RowOutcome::Duplicate);
    assert!(writer.statement().copy_enabled());
    assert_eq!(count(&pool).await, 500);
    assert_eq!(stored_payload(&pool, "evt-00123").await["amount"], 1);
}

#[tokio::test]
async fn an_optimistic_copy_of_mismatched_types_switches_itself_off() {
    let pool = setup().await;
    // A String is not jsonb's binary format: the COPY fails, the INSERT
    // (which casts text to jsonb) succeeds, and the COPY is switched off.
    let statement = UnnestInsert::builder("events", |e: &Event| e.id.clone())
        .key_column("id", "text", |e: &Event| e.id.clone())
        .column("amount", "bigint", |e: &Event| e.amount)
        .column("payload", "jsonb", |e: &Event| e.payload.clone())
        .optimistic_copy(true)
        .build()
        .expect("valid statement");
    assert!(statement.copy_enabled());
    let writer = BatchWriter::new(pool.clone(), statement, fast_retries());
    let outcomes = writer.write(&events(0..50)).await.expect("write");
    assert_all(&outcomes, RowOutcome::Inserted);
    assert!(!writer.statement().copy_enabled());
    let outcomes = writer.write(&events(25..75)).await.expect("write");
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == RowOutcome::Inserted)
            .count(),
        25
    );
    assert_eq!(count(&pool).await, 75);
}

/// A `bigint` the client refuses to encode when negative.
#[derive(Debug, Clone, Copy)]
struct Picky(i64);

impl sqlx::Type<sqlx::Postgres> for Picky {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <i64 as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl sqlx::postgres::PgHasArrayType for Picky {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        <i64 as sqlx::postgres::PgHasArrayType>::array_type_info()
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for Picky {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        if self.0 < 0 {
            return Err(format!("refusing to encode {}", self.0).into());
        }
        <i64 as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.0, buf)
    }
}

/// In both a transaction and autocommit; the rows are large enough that the
/// COPY has sent some before it meets the bad one.
async fn a_row_the_client_cannot_encode_is_rejected(mode: Mode) {
    const BAD: usize = 150;
    let pool = setup().await;
    for single in [false, true] {
        truncate(&pool).await;
        let statement = UnnestInsert::builder("events", |e: &Event| e.id.clone())
            .key_column("id", "text", |e: &Event| e.id.clone())
            .column("amount", "bigint", |e: &Event| Picky(e.amount))
            .column("payload", "jsonb", |e: &Event| JsonText(e.payload.clone()))
            .optimistic_copy(mode == Mode::Copy)
            .build()
            .expect("valid statement");
        let writer =
            BatchWriter::new(pool.clone(), statement, fast_retries()).single_statement(single);
        let filler = "x".repeat(1000);
        let mut rows = events(0..200);
        for row in &mut rows {
            row.payload = format!(r#"{{"id":"{}","filler":"{filler}"}}"#, row.id);
        }
        rows[BAD].amount = -3;
        let outcomes = writer.write(&rows).await.expect("write");
        for (i, outcome) in outcomes.iter().enumerate() {
            match outcome {
                RowOutcome::Rejected(reason) if i == BAD => {
                    assert!(reason.code.is_empty());
                    assert!(reason.message.contains("refusing to encode -3"), "{reason}");
                }
                RowOutcome::Inserted if i != BAD => {}
                other => panic!("single_statement({single}), row {i}: unexpected {other:?}"),
            }
        }
        assert_eq!(count(&pool).await, 199);
    }
}

in_both_modes! {
    #[tokio::test]
    a_row_the_client_cannot_encode_is_rejected => a_row_the_client_cannot_encode_is_rejected_unnest, a_row_the_client_cannot_encode_is_rejected_copy;
    #[tokio::test]
    a_batch_is_inserted_and_its_redelivery_is_duplicate => a_batch_is_inserted_and_its_redelivery_is_duplicate_unnest, a_batch_is_inserted_and_its_redelivery_is_duplicate_copy;
    #[tokio::test]
    duplicates_inside_one_batch_are_written_once => duplicates_inside_one_batch_are_written_once_unnest, duplicates_inside_one_batch_are_written_once_copy;
    #[tokio::test]
    upserts_keep_the_last_version_and_tell_new_from_updated => upserts_keep_the_last_version_and_tell_new_from_updated_unnest, upserts_keep_the_last_version_and_tell_new_from_updated_copy;
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    concurrent_writers_of_overlapping_keys_store_each_key_once => concurrent_writers_of_overlapping_keys_store_each_key_once_unnest, concurrent_writers_of_overlapping_keys_store_each_key_once_copy;
    #[tokio::test]
    a_poison_row_is_rejected_and_the_rest_stored => a_poison_row_is_rejected_and_the_rest_stored_unnest, a_poison_row_is_rejected_and_the_rest_stored_copy;
    #[tokio::test]
    several_bad_rows_of_different_kinds_are_isolated => several_bad_rows_of_different_kinds_are_isolated_unnest, several_bad_rows_of_different_kinds_are_isolated_copy;
    #[tokio::test]
    a_terminated_connection_is_retried => a_terminated_connection_is_retried_unnest, a_terminated_connection_is_retried_copy;
    #[tokio::test]
    a_serialization_failure_is_retried => a_serialization_failure_is_retried_unnest, a_serialization_failure_is_retried_copy;
    #[tokio::test]
    a_frozen_server_times_the_attempt_out_and_closes_its_connection => a_frozen_server_times_the_attempt_out_and_closes_its_connection_unnest, a_frozen_server_times_the_attempt_out_and_closes_its_connection_copy;
    #[tokio::test]
    a_write_cancelled_on_a_frozen_server_frees_its_connection => a_write_cancelled_on_a_frozen_server_frees_its_connection_unnest, a_write_cancelled_on_a_frozen_server_frees_its_connection_copy;
}

#[tokio::test]
async fn a_single_statement_runs_in_autocommit_and_keeps_the_guarantees() {
    let pool = setup().await;
    for single in [false, true] {
        truncate(&pool).await;
        let writer = interfering_writer(
            &pool,
            Mode::Unnest,
            Interference::ProbeTransaction,
            u32::MAX,
            fast_retries(),
        )
        .single_statement(single);
        let mut rows = events(0..50);
        rows[20].amount = -1; // violates CHECK (amount >= 0)
        rows.push(event("evt-00003", 9)); // in-batch duplicate

        let outcomes = writer.write(&rows).await.expect("write");
        for (i, outcome) in outcomes.iter().enumerate() {
            match i {
                20 => assert!(matches!(outcome, RowOutcome::Rejected(_)), "{outcome:?}"),
                50 => assert_eq!(*outcome, RowOutcome::Duplicate),
                _ => assert_eq!(*outcome, RowOutcome::Inserted, "row {i}"),
            }
        }
        assert_eq!(count(&pool).await, 49);
        let again = writer.write(&rows[..20]).await.expect("redelivery");
        assert_all(&again, RowOutcome::Duplicate);

        let seen = writer
            .statement()
            .in_transaction
            .lock()
            .expect("probe lock")
            .clone();
        assert!(seen.len() > 2, "bisection ran several attempts: {seen:?}");
        assert!(
            seen.iter().all(|&in_tx| in_tx != single),
            "single_statement({single}): in a transaction block: {seen:?}"
        );
    }
}

#[tokio::test]
async fn a_single_statement_is_retried_on_a_terminated_connection() {
    let pool = setup().await;
    let writer = interfering_writer(
        &pool,
        Mode::Unnest,
        Interference::TerminateBackend,
        2,
        fast_retries(),
    )
    .single_statement(true);
    let outcomes = writer
        .write(&events(0..100))
        .await
        .expect("write after retries");
    assert_all(&outcomes, RowOutcome::Inserted);
    assert_eq!(writer.statement().executions(), 3);
    assert_eq!(count(&pool).await, 100);
}

#[tokio::test]
async fn the_optimistic_copy_in_autocommit_keeps_every_outcome() {
    let pool = setup().await;
    let writer = BatchWriter::new(pool.clone(), insert_events(Mode::Copy), fast_retries())
        .single_statement(true);

    // New rows: the COPY alone stores them.
    let outcomes = writer.write(&events(0..200)).await.expect("write");
    assert_all(&outcomes, RowOutcome::Inserted);
    assert_eq!(count(&pool).await, 200);

    // Old and new mixed: the COPY fails and stores nothing, the INSERT decides.
    let mixed = events(150..250);
    let outcomes = writer.write(&mixed).await.expect("write mixed");
    assert_new_from(&mixed, &outcomes, "evt-00200");
    assert_eq!(count(&pool).await, 250);

    // A poison row: rejected alone, the rest stored.
    let mut poisoned = events(300..340);
    poisoned[7].amount = -1;
    let outcomes = writer.write(&poisoned).await.expect("write poisoned");
    let rejected: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, RowOutcome::Rejected(_)))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(rejected, vec![7]);
    assert_eq!(count(&pool).await, 250 + 39);
}

#[tokio::test]
async fn a_wrong_outcome_count_fails_the_batch_and_rolls_back_its_transaction() {
    let pool = setup().await;
    for single in [false, true] {
        truncate(&pool).await;
        let writer = interfering_writer(
            &pool,
            Mode::Unnest,
            Interference::DropAnOutcome,
            u32::MAX,
            fast_retries(),
        )
        .single_statement(single);

        let error = writer
            .write(&events(0..10))
            .await
            .expect_err("a short count");
        assert!(
            matches!(
                error,
                WriteError::OutcomeCount {
                    expected: 10,
                    got: 9
                }
            ),
            "single_statement({single}): {error:?}"
        );
        // In a transaction nothing is committed; a single statement has
        // committed already.
        assert_eq!(count(&pool).await, if single { 10 } else { 0 });
    }
}

/// A trigger that skips rows (returns NULL) makes the `COPY` store fewer
/// rows than it was given: the batch fails rather than report the skipped
/// rows stored. In a transaction nothing of it is kept.
#[tokio::test]
async fn a_copy_that_stores_fewer_rows_than_given_fails_the_batch() {
    for single in [false, true] {
        let pool = setup().await;
        sqlx::raw_sql(
            "CREATE FUNCTION skip_7() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.amount = 7 THEN RETURN NULL; END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER skip_7 BEFORE INSERT ON events
                 FOR EACH ROW EXECUTE FUNCTION skip_7();",
        )
        .execute(&pool)
        .await
        .expect("create the trigger");
        let writer = BatchWriter::new(pool.clone(), insert_events(Mode::Copy), fast_retries())
            .single_statement(single);
        let mut rows = events(0..10);
        rows[3].amount = 7;
        let error = writer
            .write(&rows)
            .await
            .expect_err("a skipped row must not be reported stored");
        assert!(matches!(error, WriteError::Database(_)), "{error}");
        assert!(error.to_string().contains("stored 9 of 10 rows"), "{error}");
        // Autocommit: the COPY's rows are committed; in a transaction, rolled back.
        assert_eq!(count(&pool).await, if single { 9 } else { 0 });
    }
}
