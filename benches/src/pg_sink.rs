//! `pg_sink`: rows per second of the Postgres batch writer against a raw
//! `COPY` of the same rows, on a private PostgreSQL started under the cargo
//! target directory.
//!
//! Each run writes `rows` rows (unique text key, ~1 KB jsonb payload) into
//! fresh, identical tables (`key text PRIMARY KEY, payload jsonb`):
//!
//! - `copy`: one `COPY ... FROM STDIN` of all rows, streamed in text format.
//!   The ceiling: one transaction, no per-row outcome, no idempotency.
//! - writer `optimistic_copy`: [`BatchWriter`] with the ready-made
//!   [`UnnestInsert`] and [`UnnestInsertBuilder::optimistic_copy`], in
//!   batches of [`BATCH_SIZE`]: one transaction per batch, per-row outcomes,
//!   idempotent by key. New rows go in by binary `COPY` in a savepoint.
//! - writer `unnest`: the same without the optimistic COPY: one
//!   `INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO NOTHING RETURNING`
//!   with binary array binds per batch.
//!
//! All include encoding the rows on the client. The server is durable
//! (`fsync` on) and a `CHECKPOINT` precedes every timed section; the three are
//! interleaved in every run. For each writer, the median of [`RUNS`] runs is
//! printed as one JSON line:
//!
//! ```text
//! {"bench":"pg_sink","writer":"optimistic_copy","rows":200000,"batch_size":1000,
//!  "writer_rows_per_sec":...,"copy_rows_per_sec":...,"ratio":...}
//! ```
//!
//! `ratio` is writer ÷ copy (medians).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
#[cfg(doc)]
use hermes_adapters::postgres::UnnestInsertBuilder;
use hermes_adapters::postgres::{
    BatchWriter, JsonText, LocalPostgres, LocalPostgresConfig, RetryPolicy, RowOutcome,
    UnnestInsert,
};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::report::{emit, median_by, round3};

/// Rows per batch given to the writer.
pub const BATCH_SIZE: usize = 1000;

/// Runs per measurement; the median is reported.
pub const RUNS: usize = 3;

/// Approximate size of each row's jsonb payload, in bytes.
const PAYLOAD_BYTES: usize = 1024;

/// One benchmark row: what a webhook event looks like to the sink.
struct Row {
    key: String,
    payload: JsonText,
}

/// Runs the benchmark with `rows` rows and prints its JSON line.
pub async fn run(rows: usize) -> anyhow::Result<()> {
    if rows == 0 {
        bail!("pg-sink needs at least one row");
    }
    let dir = bench_cluster_dir();
    let pg = LocalPostgres::start_with(LocalPostgresConfig::new(&dir, "hermes_bench"))
        .await
        .with_context(|| format!("starting PostgreSQL in {}", dir.display()))?;
    eprintln!(
        "pg-sink: PostgreSQL in {} on port {}; {rows} rows of ~{PAYLOAD_BYTES} B, batches of {BATCH_SIZE}, {RUNS} runs",
        dir.display(),
        pg.port()
    );
    let pool = PgPoolOptions::new()
        .max_connections(2)
        // The writer retries a dead pooled connection itself; no ping per batch.
        .test_before_acquire(false)
        .connect(&pg.url())
        .await
        .context("connecting to the benchmark database")?;
    let data = generate(rows);

    let mut copy_rates = Vec::with_capacity(RUNS);
    let mut optimistic_rates = Vec::with_capacity(RUNS);
    let mut unnest_rates = Vec::with_capacity(RUNS);
    for run in 0..RUNS {
        let copy = measure_copy(&pool, &data, run).await?;
        let optimistic = measure_writer(&pool, &data, run, true).await?;
        let unnest = measure_writer(&pool, &data, run, false).await?;
        eprintln!(
            "pg-sink run {}: copy {copy:.0} rows/s, writer optimistic_copy {optimistic:.0} rows/s, \
             writer unnest {unnest:.0} rows/s",
            run + 1,
        );
        copy_rates.push(copy);
        optimistic_rates.push(optimistic);
        unnest_rates.push(unnest);
    }
    let copy = median_by(copy_rates, |r| *r).unwrap_or(0.0);
    for (writer, rates) in [
        ("optimistic_copy", optimistic_rates),
        ("unnest", unnest_rates),
    ] {
        let rate = median_by(rates, |r| *r).unwrap_or(0.0);
        emit(&json!({
            "bench": "pg_sink",
            "writer": writer,
            "rows": rows,
            "batch_size": BATCH_SIZE,
            "payload_bytes": PAYLOAD_BYTES,
            "runs": RUNS,
            "writer_rows_per_sec": rate.round(),
            "copy_rows_per_sec": copy.round(),
            "ratio": round3(if copy > 0.0 { rate / copy } else { 0.0 }),
        }));
    }
    pool.close().await;
    Ok(())
}

/// `<cargo target dir>/tmp/hermes-bench-pg` (the target dir is found from the
/// running executable; `./target` if that fails).
fn bench_cluster_dir() -> PathBuf {
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|dir| dir.join("CACHEDIR.TAG").is_file())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("tmp").join("hermes-bench-pg")
}

/// `rows` rows with keys `key-000000001`... and ~1 KB JSON payloads that
/// differ per row.
fn generate(rows: usize) -> Vec<Row> {
    let filler: String = "lorem ipsum dolor sit amet ".repeat(PAYLOAD_BYTES / 27 + 1);
    (0..rows)
        .map(|i| {
            let head = json!({
                "id": i,
                "source": "bench",
                "type": "order.updated",
                "attempt": i % 7,
            })
            .to_string();
            let room = PAYLOAD_BYTES.saturating_sub(head.len() + 12);
            let payload = format!(
                "{},\"body\":\"{}\"}}",
                head.trim_end_matches('}'),
                &filler[..room.min(filler.len())]
            );
            Row {
                key: format!("key-{i:09}"),
                payload: JsonText(payload),
            }
        })
        .collect()
}

async fn fresh_table(pool: &PgPool, name: &str) -> anyhow::Result<()> {
    sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
        .execute(pool)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE {name} (key text PRIMARY KEY, payload jsonb NOT NULL)"
    ))
    .execute(pool)
    .await?;
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}

async fn finish_table(pool: &PgPool, name: &str, expected: usize) -> anyhow::Result<()> {
    let stored: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {name}"))
        .fetch_one(pool)
        .await?;
    if usize::try_from(stored).ok() != Some(expected) {
        bail!("{name} holds {stored} rows, expected {expected}");
    }
    sqlx::query(&format!("DROP TABLE {name}"))
        .execute(pool)
        .await?;
    Ok(())
}

/// Rows per second of the batch writer with `UnnestInsert`, with or without
/// the optimistic COPY.
async fn measure_writer(
    pool: &PgPool,
    data: &[Row],
    run: usize,
    optimistic_copy: bool,
) -> anyhow::Result<f64> {
    let table = format!("pg_sink_writer_{run}");
    fresh_table(pool, &table).await?;
    let statement = UnnestInsert::builder(table.clone(), |r: &Row| r.key.clone())
        .key_column("key", "text", |r: &Row| r.key.clone())
        .column("payload", "jsonb", |r: &Row| r.payload.clone())
        .optimistic_copy(optimistic_copy)
        .build()?;
    let writer = BatchWriter::new(pool.clone(), statement, RetryPolicy::default());
    let started = Instant::now();
    for batch in data.chunks(BATCH_SIZE) {
        let outcomes = writer.write(batch).await?;
        if let Some(bad) = outcomes.iter().find(|o| **o != RowOutcome::Inserted) {
            bail!("writer reported {bad:?} for a fresh row");
        }
    }
    let rate = data.len() as f64 / started.elapsed().as_secs_f64();
    if writer.statement().copy_enabled() != optimistic_copy {
        bail!("the optimistic COPY switched itself off; see the log");
    }
    finish_table(pool, &table, data.len()).await?;
    Ok(rate)
}

/// Rows per second of one `COPY ... FROM STDIN` (text format) of all rows.
async fn measure_copy(pool: &PgPool, data: &[Row], run: usize) -> anyhow::Result<f64> {
    let table = format!("pg_sink_copy_{run}");
    fresh_table(pool, &table).await?;
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!("COPY {table} (key, payload) FROM STDIN"))
        .await?;
    let mut buf = Vec::with_capacity(BATCH_SIZE * (PAYLOAD_BYTES + 32));
    for chunk in data.chunks(BATCH_SIZE) {
        buf.clear();
        for row in chunk {
            copy_text_field(&mut buf, &row.key);
            buf.push(b'\t');
            copy_text_field(&mut buf, &row.payload.0);
            buf.push(b'\n');
        }
        copy.send(buf.as_slice()).await?;
    }
    copy.finish().await?;
    let rate = data.len() as f64 / started.elapsed().as_secs_f64();
    drop(conn);
    finish_table(pool, &table, data.len()).await?;
    Ok(rate)
}

/// Appends `value` escaped for COPY's text format.
fn copy_text_field(buf: &mut Vec<u8>, value: &str) {
    for &byte in value.as_bytes() {
        match byte {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            other => buf.push(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_json_of_about_the_target_size() {
        for row in generate(3) {
            let payload = &row.payload.0;
            let value: serde_json::Value = serde_json::from_str(payload).expect("json");
            assert!(value["body"].is_string());
            assert!(payload.len() > PAYLOAD_BYTES - 64 && payload.len() <= PAYLOAD_BYTES);
        }
    }

    #[test]
    fn copy_text_escapes_specials() {
        let mut buf = Vec::new();
        copy_text_field(&mut buf, "a\\b\tc\nd");
        assert_eq!(buf, b"a\\\\b\\tc\\nd");
    }
}
