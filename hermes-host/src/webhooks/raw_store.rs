//! The batched write of raw webhook events (sources with `normalize =
//! "none"`): into `webhook_events` only.
//!
//! A batch is first tried as one binary `COPY` with ids drawn ahead from the
//! table's sequence ([`EventIds`]): the fastest way into the table, and when
//! it succeeds every event is new and stored under the id it was given. A
//! `COPY` has no `ON CONFLICT`, so a batch holding a redelivery fails as a
//! whole and stores nothing; it then goes through the idempotent statement:
//! `INSERT … SELECT FROM unnest(…) ON CONFLICT (source, idempotency_key) DO
//! NOTHING RETURNING id, source, idempotency_key`, and the keys it did not
//! return (already stored) are looked up by a second, read-only statement,
//! which in autocommit sees what a concurrent batch committed meanwhile.
//! After such a conflict the next batches skip the `COPY` for a while
//! ([`OptimisticCopy`]).
//!
//! Rows go in key order, so concurrent batches with common keys lock them in
//! the same order and do not deadlock.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hermes_adapters::postgres::{CopyFailure, JsonText, OptimisticCopy, Written};
use sqlx::PgConnection;

use super::event::WebhookEvent;
use super::event_ids::EventIds;
use super::store::invariant;

/// The columns of the `COPY`, in this order.
const COPY_EVENTS: &str = "COPY webhook_events (id, source, idempotency_key, body, received_at) \
                           FROM STDIN (FORMAT binary)";

/// Fields per row of [`COPY_EVENTS`].
const COPY_FIELDS: u16 = 5;

/// The idempotent insert; a redelivered key is left alone.
const INSERT_EVENTS: &str = "
    INSERT INTO webhook_events (source, idempotency_key, body, received_at)
    SELECT t.source, t.idempotency_key, t.body::jsonb, t.received_at
    FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
         AS t(source, idempotency_key, body, received_at)
    ORDER BY t.source, t.idempotency_key
    ON CONFLICT (source, idempotency_key) DO NOTHING
    RETURNING id, source, idempotency_key";

/// The ids of events already stored.
const FIND_EVENTS: &str = "
    SELECT e.id, e.source, e.idempotency_key
    FROM unnest($1::text[], $2::text[]) AS t(source, idempotency_key)
    JOIN webhook_events e
      ON e.source = t.source AND e.idempotency_key = t.idempotency_key";

/// Writes batches of raw events (see the module docs).
#[derive(Debug)]
pub struct RawEventStore {
    copy: OptimisticCopy,
    ids: EventIds,
}

impl Default for RawEventStore {
    fn default() -> Self {
        Self {
            copy: OptimisticCopy::new(COPY_EVENTS),
            ids: EventIds::default(),
        }
    }
}

impl RawEventStore {
    /// Writes `rows` (distinct keys, no normalized message): records each
    /// one's id and returns whether it was inserted or already stored.
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        rows: &[&Arc<WebhookEvent>],
    ) -> Result<Vec<Written>, sqlx::Error> {
        let mut sorted: Vec<&Arc<WebhookEvent>> = rows.to_vec();
        sorted.sort_by(|a, b| {
            (&*a.source, &a.idempotency_key).cmp(&(&*b.source, &b.idempotency_key))
        });
        if !self.copy.should_try() {
            return insert(conn, rows, &sorted).await;
        }
        let ids = self.ids.take(conn, sorted.len()).await?;
        match self.copy_rows(conn, &sorted, &ids).await {
            Ok(()) => {
                for (row, id) in sorted.iter().zip(ids) {
                    row.set_written_id(id);
                }
                Ok(vec![Written::Inserted; rows.len()])
            }
            Err(CopyFailure::Abort(error)) => Err(error),
            Err(CopyFailure::Fallback(error)) => {
                let written = insert(conn, rows, &sorted).await?;
                self.copy.resolved_by_fallback(&error);
                Ok(written)
            }
        }
    }

    async fn copy_rows(
        &self,
        conn: &mut PgConnection,
        sorted: &[&Arc<WebhookEvent>],
        ids: &[i64],
    ) -> Result<(), CopyFailure> {
        let mut data = self.copy.buffer(sorted.len());
        for (row, id) in sorted.iter().zip(ids) {
            data.row(COPY_FIELDS);
            data.field(id)
                .and_then(|()| data.field(&row.source.as_ref()))
                .and_then(|()| data.field(&row.idempotency_key.as_str()))
                .and_then(|()| data.field(&JsonText(row.body.as_str())))
                .and_then(|()| data.field(&row.received_at))
                .map_err(|error| CopyFailure::Fallback(sqlx::Error::Encode(error)))?;
        }
        self.copy.run(conn, data).await
    }
}

/// The idempotent `INSERT` of `sorted` (the `rows` in key order), then the
/// lookup of the redeliveries' ids when there are any. Outcomes are in the
/// order of `rows`.
async fn insert(
    conn: &mut PgConnection,
    rows: &[&Arc<WebhookEvent>],
    sorted: &[&Arc<WebhookEvent>],
) -> Result<Vec<Written>, sqlx::Error> {
    let sources: Vec<&str> = sorted.iter().map(|row| &*row.source).collect();
    let keys: Vec<&str> = sorted
        .iter()
        .map(|row| row.idempotency_key.as_str())
        .collect();
    let bodies: Vec<&str> = sorted.iter().map(|row| row.body.as_str()).collect();
    let received: Vec<DateTime<Utc>> = sorted.iter().map(|row| row.received_at).collect();
    let inserted: Vec<(i64, String, String)> = sqlx::query_as(INSERT_EVENTS)
        .bind(&sources)
        .bind(&keys)
        .bind(&bodies)
        .bind(&received)
        .fetch_all(&mut *conn)
        .await?;

    let index: HashMap<(&str, &str), usize> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| ((&*row.source, row.idempotency_key.as_str()), i))
        .collect();
    let mut written: Vec<Option<Written>> = vec![None; rows.len()];
    record(inserted, Written::Inserted, &index, rows, &mut written)?;

    let (dup_sources, dup_keys): (Vec<&str>, Vec<&str>) = rows
        .iter()
        .zip(&written)
        .filter(|(_, outcome)| outcome.is_none())
        .map(|(row, _)| (&*row.source, row.idempotency_key.as_str()))
        .unzip();
    if !dup_keys.is_empty() {
        let found: Vec<(i64, String, String)> = sqlx::query_as(FIND_EVENTS)
            .bind(&dup_sources)
            .bind(&dup_keys)
            .fetch_all(&mut *conn)
            .await?;
        record(found, Written::Duplicate, &index, rows, &mut written)?;
    }
    written
        .into_iter()
        .map(|outcome| {
            outcome.ok_or_else(|| invariant("an event was neither inserted nor found".into()))
        })
        .collect()
}

/// Records the ids and outcome of the events a statement returned.
fn record(
    found: Vec<(i64, String, String)>,
    outcome: Written,
    index: &HashMap<(&str, &str), usize>,
    rows: &[&Arc<WebhookEvent>],
    written: &mut [Option<Written>],
) -> Result<(), sqlx::Error> {
    for (id, source, key) in found {
        let i = index
            .get(&(source.as_str(), key.as_str()))
            .copied()
            .ok_or_else(|| {
                invariant(format!(
                    "the write returned an unknown event {source}/{key}"
                ))
            })?;
        rows[i].set_written_id(id);
        written[i] = Some(outcome);
    }
    Ok(())
}
