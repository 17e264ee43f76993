//! The batch writer through a database outage: a private cluster of its own,
//! stopped, then started again.

use std::time::{Duration, Instant};

use hermes_adapters::postgres::local::{
    Durability, LocalPostgres, LocalPostgresConfig, test_database,
};
use hermes_adapters::postgres::{BatchWriter, RetryPolicy, RowOutcome, UnnestInsert, WriteError};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// Rows `(id, amount)` stored by the key `id`.
fn insert_rows() -> UnnestInsert<(String, i64), String> {
    UnnestInsert::builder("rows", |row: &(String, i64)| row.0.clone())
        .key_column("id", "text", |row: &(String, i64)| row.0.clone())
        .column("amount", "bigint", |row: &(String, i64)| row.1)
        .build()
        .expect("valid statement")
}

fn rows(range: std::ops::Range<i64>) -> Vec<(String, i64)> {
    range.map(|i| (format!("row-{i}"), i)).collect()
}

/// A pool of `max_connections` on `url`, waiting `acquire_timeout` for a
/// connection, whose database has a fresh, empty table `rows`.
async fn pool_with_rows_table(
    url: &str,
    max_connections: u32,
    acquire_timeout: Duration,
) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect(url)
        .await
        .expect("connect");
    for statement in [
        "DROP TABLE IF EXISTS rows",
        "CREATE TABLE rows (id text PRIMARY KEY, amount bigint NOT NULL)",
    ] {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .expect(statement);
    }
    pool
}

#[tokio::test]
async fn writes_fail_at_once_while_the_database_is_down_and_resume_when_it_is_back() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hermes-pg-outage-test");
    let config = LocalPostgresConfig::new(&dir, "outage").durability(Durability::Relaxed);
    let pg = LocalPostgres::start_with(config.clone())
        .await
        .expect("start the cluster");
    let pool = pool_with_rows_table(&pg.url(), 4, Duration::from_secs(2)).await;
    let writer = BatchWriter::new(pool.clone(), insert_rows(), RetryPolicy::default());
    let outcomes = writer.write(&rows(0..10)).await.expect("write while up");
    assert!(outcomes.iter().all(|o| *o == RowOutcome::Inserted));

    let port = pg.port();
    pg.stop().await.expect("stop the cluster");
    // The first write retries a refused connection for about a second (a
    // blip would be over), not for the policy's 10 s...
    let started = Instant::now();
    let error = writer.write(&rows(10..20)).await.expect_err("server down");
    assert!(
        matches!(
            error,
            WriteError::Unavailable | WriteError::RetriesExhausted { .. }
        ),
        "{error}"
    );
    assert!(error.is_transient());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // ... the next one at the latest finds the outage declared...
    let error = writer.write(&rows(10..20)).await.expect_err("server down");
    assert!(matches!(error, WriteError::Unavailable), "{error}");
    // ... and later writes, concurrent ones too, fail at once without
    // waiting for a connection of their own.
    let started = Instant::now();
    let batch = rows(10..20);
    let writes = futures::future::join_all((0..20).map(|_| writer.write(&batch))).await;
    for result in writes {
        let error = result.expect_err("down");
        assert!(matches!(error, WriteError::Unavailable), "{error}");
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );

    // Started again on the same port: the same pool and writer resume.
    let pg = LocalPostgres::start_with(config)
        .await
        .expect("restart the cluster");
    assert_eq!(pg.port(), port, "a restart keeps the port while it is free");
    let deadline = Instant::now() + Duration::from_secs(15);
    let outcomes = loop {
        match writer.write(&rows(10..20)).await {
            Ok(outcomes) => break outcomes,
            Err(WriteError::Unavailable) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("no write after the restart: {error}"),
        }
    };
    assert!(outcomes.iter().all(|o| *o == RowOutcome::Inserted));
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM rows")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(stored, 20);
    pool.close().await;
    pg.stop().await.expect("stop the cluster");
}

/// A pool that times out only because its connections are all busy is not
/// an outage: the write retries per its policy, and the next one, once a
/// connection is free, goes through at once.
#[tokio::test]
async fn a_busy_pool_is_retried_not_taken_for_an_outage() {
    let pool = pool_with_rows_table(&test_database().await, 1, Duration::from_millis(300)).await;
    let retry = RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(10), 5);
    let writer = BatchWriter::new(pool.clone(), insert_rows(), retry);
    let held = pool.acquire().await.expect("the only connection");
    let error = writer
        .write(&rows(0..10))
        .await
        .expect_err("no connection free");
    assert!(
        matches!(
            error,
            WriteError::RetriesExhausted {
                attempts: 5,
                source: sqlx::Error::PoolTimedOut
            }
        ),
        "{error}"
    );
    drop(held);
    let outcomes = writer
        .write(&rows(0..10))
        .await
        .expect("a connection is free");
    assert!(outcomes.iter().all(|o| *o == RowOutcome::Inserted));
}
