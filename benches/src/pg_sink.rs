//! `pg_sink`: rows per second of the Postgres batch writer against a raw
//! `COPY` of the same rows, on a private PostgreSQL started under the cargo
//! target directory.
//!
//! Each run writes `rows` rows (unique text key, ~1 KB jsonb payload) into
//! fresh, identical tables (`key text PRIMARY KEY, payload jsonb`) by:
//!
//! - `copy`: raw `COPY ... FROM STDIN` in text format, one statement per
//!   slice of [`SLICE_ROWS`] rows. The ceiling: no per-row outcome, no
//!   idempotency, one commit per slice.
//! - `copy_per_batch`: the same, one statement per [`BATCH_SIZE`] rows, as
//!   the writer commits: what Postgres itself charges for a statement and
//!   commit per batch, apart from the writer's own cost.
//! - writer `optimistic_copy`: [`BatchWriter`] with the ready-made
//!   [`UnnestInsert`] and [`UnnestInsertBuilder::optimistic_copy`], in
//!   batches of [`BATCH_SIZE`], in autocommit (each attempt is one atomic
//!   statement, durably committed): per-row outcomes, idempotent by key. New
//!   rows go in by one binary `COPY`; a batch holding an existing key falls
//!   back to the `INSERT`.
//! - writer `unnest`: the same without the optimistic COPY: one
//!   `INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO NOTHING RETURNING`
//!   with binary array binds per batch.
//!
//! Each writer runs with 1 batch in flight (sequential) and with 2 (as a
//! batcher with `concurrency: 2` would, so one batch's commit overlaps the
//! next batch's write). All methods include encoding the rows on the client.
//! The server is durable (`fsync` on) and a `CHECKPOINT` precedes every run.
//! The methods are interleaved slice by slice, in a rotating order, so they
//! share the machine's load alike. Per writer and concurrency, one JSON line,
//! each under its own `bench` name: `pg_sink` (the headline:
//! `optimistic_copy`, 1 in flight), `pg_sink_unnest`, `pg_sink_x2`
//! (`optimistic_copy`, 2 in flight) and `pg_sink_unnest_x2`:
//!
//! ```text
//! {"bench":"pg_sink","writer":"optimistic_copy","concurrency":1,"rows":200000,
//!  "batch_size":1000,"writer_rows_per_sec":...,"copy_rows_per_sec":...,"ratio":...,
//!  "copy_per_batch_rows_per_sec":...,"ratio_per_batch":...}
//! ```
//!
//! The rates printed are medians of [`RUNS`] runs. `ratio` (writer ÷ copy)
//! and `ratio_per_batch` (writer ÷ copy_per_batch) are not the ratios of
//! those printed medians: each is the median of the per-run ratios (each
//! run's methods ran interleaved, so its ratio is a like-for-like
//! comparison), so it can differ from dividing the printed rates.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, stream};
#[cfg(doc)]
use hermes_adapters::postgres::UnnestInsertBuilder;
use hermes_adapters::postgres::local::Durability;
use hermes_adapters::postgres::{BatchWriter, JsonText, RetryPolicy, RowOutcome, UnnestInsert};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::bench_cluster;
use crate::copy_text::push_field;
use crate::report::{emit, median_by, round3};

/// Rows per batch given to the writer.
pub const BATCH_SIZE: usize = 1000;

/// Runs per measurement; the median is reported.
pub const RUNS: usize = 5;

/// Rows per slice: each run alternates the methods slice by slice.
pub const SLICE_ROWS: usize = 20_000;

/// Approximate size of each row's jsonb payload, in bytes.
const PAYLOAD_BYTES: usize = 1024;

/// One benchmark row: what a webhook event looks like to the sink.
struct Row {
    key: String,
    payload: JsonText,
}

/// Runs the benchmark with `rows` rows and prints its JSON lines.
pub async fn run(rows: usize) -> anyhow::Result<()> {
    if rows == 0 {
        bail!("pg-sink needs at least one row");
    }
    let pg = bench_cluster::start(Durability::Durable, "hermes_bench").await?;
    eprintln!(
        "pg-sink: PostgreSQL in {} on port {}; {rows} rows of ~{PAYLOAD_BYTES} B, batches of {BATCH_SIZE}, {RUNS} runs",
        pg.data_dir().display(),
        pg.port()
    );
    let pool = PgPoolOptions::new()
        .max_connections(4)
        // The writer retries a dead pooled connection itself; no ping per batch.
        .test_before_acquire(false)
        .connect(&pg.url())
        .await
        .context("connecting to the benchmark database")?;
    let data = generate(rows);

    let mut rates: Vec<Vec<f64>> = vec![Vec::with_capacity(RUNS); METHODS.len()];
    for run in 0..RUNS {
        let run_rates = measure_run(&pool, &data).await?;
        let summary: Vec<String> = METHODS
            .iter()
            .zip(&run_rates)
            .map(|(method, rate)| format!("{} {rate:.0}", method.label()))
            .collect();
        eprintln!("pg-sink run {}: rows/s {}", run + 1, summary.join(", "));
        for (all, rate) in rates.iter_mut().zip(run_rates) {
            all.push(rate);
        }
    }
    let median = |rates: &[f64]| median_by(rates.to_vec(), |r| *r).unwrap_or(0.0);
    // Median of the per-run ratios of `rates` to `baseline`.
    let ratio = |rates: &[f64], baseline: &[f64]| {
        let ratios: Vec<f64> = rates
            .iter()
            .zip(baseline)
            .map(|(w, c)| if *c > 0.0 { w / c } else { 0.0 })
            .collect();
        round3(median(&ratios))
    };
    let (copy_rates, per_batch_rates) = (&rates[0], &rates[1]);
    for (method, writer_rates) in METHODS.iter().zip(&rates) {
        let Method::Writer {
            bench,
            name,
            concurrency,
            ..
        } = method
        else {
            continue;
        };
        emit(&json!({
            "bench": bench,
            "writer": name,
            "concurrency": concurrency,
            "rows": rows,
            "batch_size": BATCH_SIZE,
            "payload_bytes": PAYLOAD_BYTES,
            "runs": RUNS,
            "writer_rows_per_sec": median(writer_rates).round(),
            "copy_rows_per_sec": median(copy_rates).round(),
            "ratio": ratio(writer_rates, copy_rates),
            "copy_per_batch_rows_per_sec": median(per_batch_rates).round(),
            "ratio_per_batch": ratio(writer_rates, per_batch_rates),
        }));
    }
    pool.close().await;
    Ok(())
}

/// One way of storing the rows.
#[derive(Debug, Clone, Copy)]
enum Method {
    /// Raw `COPY`, one statement per `rows_per_statement` rows.
    Copy {
        name: &'static str,
        rows_per_statement: usize,
    },
    /// The batch writer; `bench` names its JSON line.
    Writer {
        bench: &'static str,
        name: &'static str,
        optimistic_copy: bool,
        concurrency: usize,
    },
}

impl Method {
    fn label(&self) -> String {
        match self {
            Method::Copy { name, .. } => (*name).to_owned(),
            Method::Writer {
                name, concurrency, ..
            } => format!("{name}x{concurrency}"),
        }
    }

    fn table(&self) -> String {
        format!("pg_sink_{}", self.label())
    }
}

/// The methods measured; `copy` and `copy_per_batch` first.
const METHODS: [Method; 6] = [
    Method::Copy {
        name: "copy",
        rows_per_statement: SLICE_ROWS,
    },
    Method::Copy {
        name: "copy_per_batch",
        rows_per_statement: BATCH_SIZE,
    },
    Method::Writer {
        bench: "pg_sink",
        name: "optimistic_copy",
        optimistic_copy: true,
        concurrency: 1,
    },
    Method::Writer {
        bench: "pg_sink_unnest",
        name: "unnest",
        optimistic_copy: false,
        concurrency: 1,
    },
    Method::Writer {
        bench: "pg_sink_x2",
        name: "optimistic_copy",
        optimistic_copy: true,
        concurrency: 2,
    },
    Method::Writer {
        bench: "pg_sink_unnest_x2",
        name: "unnest",
        optimistic_copy: false,
        concurrency: 2,
    },
];

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

type Writer = BatchWriter<UnnestInsert<Row, String>>;

/// A batch writer into `table`, with or without the optimistic COPY.
fn writer(pool: &PgPool, table: &str, optimistic_copy: bool) -> anyhow::Result<Writer> {
    let statement = UnnestInsert::builder(table, |r: &Row| r.key.clone())
        .key_column("key", "text", |r: &Row| r.key.clone())
        .column("payload", "jsonb", |r: &Row| r.payload.clone())
        .optimistic_copy(optimistic_copy)
        .build()?;
    // Each attempt is atomic on its own (a failed COPY stores nothing), so
    // autocommit saves the BEGIN and COMMIT round trips.
    Ok(BatchWriter::new(pool.clone(), statement, RetryPolicy::default()).single_statement(true))
}

/// A method ready to store slices.
enum Runner {
    Copy {
        rows_per_statement: usize,
    },
    Writer {
        writer: Box<Writer>,
        concurrency: usize,
    },
}

/// One run: rows per second of each of [`METHODS`], interleaved slice by
/// slice in a rotating order.
async fn measure_run(pool: &PgPool, data: &[Row]) -> anyhow::Result<Vec<f64>> {
    let tables: Vec<String> = METHODS.iter().map(Method::table).collect();
    for table in &tables {
        fresh_table(pool, table).await?;
    }
    sqlx::query("CHECKPOINT").execute(pool).await?;
    let mut runners: Vec<Runner> = Vec::with_capacity(METHODS.len());
    for (method, table) in METHODS.iter().zip(&tables) {
        runners.push(match *method {
            Method::Copy {
                rows_per_statement, ..
            } => Runner::Copy { rows_per_statement },
            Method::Writer {
                optimistic_copy,
                concurrency,
                ..
            } => Runner::Writer {
                writer: Box::new(writer(pool, table, optimistic_copy)?),
                concurrency,
            },
        });
    }
    let mut elapsed = vec![Duration::ZERO; METHODS.len()];
    for (index, slice) in data.chunks(SLICE_ROWS).enumerate() {
        for step in 0..METHODS.len() {
            let method = (index + step) % METHODS.len();
            let started = Instant::now();
            match &runners[method] {
                Runner::Copy { rows_per_statement } => {
                    copy_slice(pool, &tables[method], slice, *rows_per_statement).await?
                }
                Runner::Writer {
                    writer,
                    concurrency,
                } => write_slice(writer, *concurrency, slice).await?,
            }
            elapsed[method] += started.elapsed();
        }
    }
    for (method, runner) in METHODS.iter().zip(&runners) {
        if let (
            Method::Writer {
                optimistic_copy, ..
            },
            Runner::Writer { writer, .. },
        ) = (method, runner)
            && writer.statement().copy_enabled() != *optimistic_copy
        {
            bail!("the optimistic COPY switched itself off; see the log");
        }
    }
    for table in &tables {
        finish_table(pool, table, data.len()).await?;
    }
    Ok(elapsed
        .iter()
        .map(|time| data.len() as f64 / time.as_secs_f64().max(f64::MIN_POSITIVE))
        .collect())
}

/// Writes `rows` in batches of [`BATCH_SIZE`], `concurrency` batches in
/// flight; every row must be new.
async fn write_slice(writer: &Writer, concurrency: usize, rows: &[Row]) -> anyhow::Result<()> {
    let mut results = stream::iter(rows.chunks(BATCH_SIZE))
        .map(|batch| writer.write(batch))
        .buffer_unordered(concurrency.max(1));
    while let Some(outcomes) = results.next().await {
        if let Some(bad) = outcomes?.iter().find(|o| **o != RowOutcome::Inserted) {
            bail!("writer reported {bad:?} for a fresh row");
        }
    }
    Ok(())
}

/// `COPY ... FROM STDIN` (text format) of `rows`, one statement (and
/// commit) per `rows_per_statement`, each streamed in chunks of
/// [`BATCH_SIZE`] rows.
async fn copy_slice(
    pool: &PgPool,
    table: &str,
    rows: &[Row],
    rows_per_statement: usize,
) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let sql = format!("COPY {table} (key, payload) FROM STDIN");
    let mut buf = Vec::with_capacity(BATCH_SIZE * (PAYLOAD_BYTES + 32));
    for statement in rows.chunks(rows_per_statement) {
        let mut copy = conn.copy_in_raw(&sql).await?;
        for chunk in statement.chunks(BATCH_SIZE) {
            buf.clear();
            for row in chunk {
                push_field(&mut buf, row.key.as_bytes());
                buf.push(b'\t');
                push_field(&mut buf, row.payload.0.as_bytes());
                buf.push(b'\n');
            }
            copy.send(buf.as_slice()).await?;
        }
        copy.finish().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_writer_line_has_its_own_name_the_headline_sequential_optimistic_copy() {
        let lines: Vec<_> = METHODS
            .iter()
            .filter_map(|method| match *method {
                Method::Writer {
                    bench,
                    name,
                    concurrency,
                    ..
                } => Some((bench, name, concurrency)),
                Method::Copy { .. } => None,
            })
            .collect();
        assert!(lines.contains(&("pg_sink", "optimistic_copy", 1)));
        let mut names: Vec<_> = lines.iter().map(|(bench, ..)| *bench).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), lines.len());
    }

    #[test]
    fn payloads_are_json_of_about_the_target_size() {
        for row in generate(3) {
            let payload = &row.payload.0;
            let value: serde_json::Value = serde_json::from_str(payload).expect("json");
            assert!(value["body"].is_string());
            assert!(payload.len() > PAYLOAD_BYTES - 64 && payload.len() <= PAYLOAD_BYTES);
        }
    }
}
