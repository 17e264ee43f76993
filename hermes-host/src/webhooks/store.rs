//! The batched Postgres write of webhook events: a [`BatchStatement`] run by
//! the adapters' [`BatchWriter`](hermes_adapters::postgres::BatchWriter),
//! which adds in-batch de-duplication, retries and poison-row isolation.
//!
//! A batch of raw events only (sources with `normalize = "none"`) goes to
//! [`RawEventStore`]: an optimistic binary `COPY`, else an idempotent
//! `INSERT` (see [`raw_store`](super::raw_store)).
//!
//! A batch with normalized events is one statement too, one round trip:
//! `SELECT … FROM ingest_webhook_batch(…)` (migration
//! `0002_ingest_function.sql`). The function runs the set-based steps as
//! separate statements, each with a fresh snapshot (so a step sees what
//! concurrent batches committed while an earlier step waited on them):
//!
//! 1. the raw events (`INSERT … ON CONFLICT (source, idempotency_key) DO
//!    NOTHING`), then the ids of the redeliveries;
//! 2. for the new events that were normalized: providers, channels, parties
//!    and conversations (each `INSERT … ON CONFLICT DO NOTHING` of the
//!    distinct values, in a fixed order to keep lock order stable), then the
//!    messages and their attachments, joined to those rows by natural keys.
//!
//! Either way the write reports, per event in input order, its id and
//! whether it was inserted. Each write is atomic without an explicit
//! transaction (one statement that stores, before or after at most a read
//! or a failed `COPY` that stores nothing), so the writer runs it
//! in autocommit ([`BatchWriter::single_statement`]), saving the `BEGIN` and
//! `COMMIT` round trips.
//!
//! [`BatchWriter::single_statement`]: hermes_adapters::postgres::BatchWriter::single_statement

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use hermes_adapters::postgres::{BatchStatement, Written};
use sqlx::PgConnection;

use super::event::WebhookEvent;
use super::raw_store::RawEventStore;

/// Writes batches of [`WebhookEvent`]s and what they normalize into, with one
/// statement per batch.
#[derive(Debug, Default)]
pub struct WebhookBatchStatement {
    raw: RawEventStore,
}

/// The unique key of an event: source and idempotency key.
pub type EventKey = (Arc<str>, String);

const INGEST_BATCH: &str = "
    SELECT idx, id, inserted
    FROM ingest_webhook_batch($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                              $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
                              $10::text[], $11::text[], $12::timestamptz[], $13::text[],
                              $14::int4[], $15::int4[], $16::text[])";

/// A broken invariant of the write, reported as a (fatal) database error.
pub(super) fn invariant(message: String) -> sqlx::Error {
    sqlx::Error::Protocol(message)
}

impl BatchStatement for WebhookBatchStatement {
    type Row = Arc<WebhookEvent>;
    type Key = EventKey;

    fn key(&self, row: &Self::Row) -> Self::Key {
        (row.source.clone(), row.idempotency_key.clone())
    }

    fn execute<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        rows: &'c [&'c Self::Row],
    ) -> BoxFuture<'c, Result<Vec<Written>, sqlx::Error>> {
        Box::pin(async move {
            if rows.iter().all(|row| row.message.is_none()) {
                self.raw.write(conn, rows).await
            } else {
                write_normalized_batch(conn, rows).await
            }
        })
    }
}

/// The batch as the function's parallel arrays.
#[derive(Default)]
struct Arrays<'a> {
    sources: Vec<&'a str>,
    keys: Vec<&'a str>,
    bodies: Vec<&'a str>,
    received: Vec<DateTime<Utc>>,
    providers: Vec<Option<&'a str>>,
    channels: Vec<Option<&'a str>>,
    from_kinds: Vec<Option<&'a str>>,
    from_addresses: Vec<Option<&'a str>>,
    to_kinds: Vec<Option<&'a str>>,
    to_addresses: Vec<Option<&'a str>>,
    message_bodies: Vec<Option<&'a str>>,
    sent_at: Vec<Option<DateTime<Utc>>>,
    provider_message_ids: Vec<Option<&'a str>>,
    attachment_indexes: Vec<i32>,
    attachment_positions: Vec<i32>,
    attachment_urls: Vec<&'a str>,
}

impl<'a> Arrays<'a> {
    fn new(rows: &[&'a Arc<WebhookEvent>]) -> Result<Self, sqlx::Error> {
        let n = rows.len();
        let mut a = Arrays {
            sources: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            bodies: Vec::with_capacity(n),
            received: Vec::with_capacity(n),
            providers: Vec::with_capacity(n),
            channels: Vec::with_capacity(n),
            from_kinds: Vec::with_capacity(n),
            from_addresses: Vec::with_capacity(n),
            to_kinds: Vec::with_capacity(n),
            to_addresses: Vec::with_capacity(n),
            message_bodies: Vec::with_capacity(n),
            sent_at: Vec::with_capacity(n),
            provider_message_ids: Vec::with_capacity(n),
            ..Arrays::default()
        };
        for (i, row) in rows.iter().enumerate() {
            a.sources.push(&row.source);
            a.keys.push(&row.idempotency_key);
            a.bodies.push(&row.body);
            a.received.push(row.received_at);
            let Some(message) = &row.message else {
                a.providers.push(None);
                a.channels.push(None);
                a.from_kinds.push(None);
                a.from_addresses.push(None);
                a.to_kinds.push(None);
                a.to_addresses.push(None);
                a.message_bodies.push(None);
                a.sent_at.push(None);
                a.provider_message_ids.push(None);
                continue;
            };
            a.providers.push(Some(&row.provider));
            a.channels.push(Some(message.channel.as_str()));
            a.from_kinds.push(Some(message.channel.party_kind()));
            a.from_addresses.push(Some(&message.from));
            a.to_kinds.push(Some(message.channel.party_kind()));
            a.to_addresses.push(Some(&message.to));
            a.message_bodies.push(message.body.as_deref());
            a.sent_at.push(Some(message.sent_at));
            a.provider_message_ids
                .push(message.provider_message_id.as_deref());
            // The function's indexes are 1-based.
            let index = i32::try_from(i + 1)
                .map_err(|_| invariant(format!("a batch of {n} events is too large")))?;
            for (position, url) in message.attachments.iter().enumerate() {
                a.attachment_indexes.push(index);
                a.attachment_positions
                    .push(i32::try_from(position).unwrap_or(i32::MAX));
                a.attachment_urls.push(url);
            }
        }
        Ok(a)
    }
}

/// Writes a batch with normalized messages: one call of `ingest_webhook_batch`.
async fn write_normalized_batch(
    conn: &mut PgConnection,
    rows: &[&Arc<WebhookEvent>],
) -> Result<Vec<Written>, sqlx::Error> {
    let a = Arrays::new(rows)?;
    let results: Vec<(i32, i64, bool)> = sqlx::query_as(INGEST_BATCH)
        .bind(&a.sources)
        .bind(&a.keys)
        .bind(&a.bodies)
        .bind(&a.received)
        .bind(&a.providers)
        .bind(&a.channels)
        .bind(&a.from_kinds)
        .bind(&a.from_addresses)
        .bind(&a.to_kinds)
        .bind(&a.to_addresses)
        .bind(&a.message_bodies)
        .bind(&a.sent_at)
        .bind(&a.provider_message_ids)
        .bind(&a.attachment_indexes)
        .bind(&a.attachment_positions)
        .bind(&a.attachment_urls)
        .fetch_all(&mut *conn)
        .await?;
    if results.len() != rows.len() {
        return Err(invariant(format!(
            "ingest_webhook_batch returned {} results for {} events",
            results.len(),
            rows.len()
        )));
    }
    let mut written = Vec::with_capacity(rows.len());
    for (expected, (idx, id, inserted)) in results.into_iter().enumerate() {
        // One row per event, ordered by its 1-based index.
        if usize::try_from(idx).ok() != Some(expected + 1) {
            return Err(invariant(format!(
                "ingest_webhook_batch returned event {idx} where {} was expected",
                expected + 1
            )));
        }
        rows[expected].set_written_id(id);
        written.push(if inserted {
            Written::Inserted
        } else {
            Written::Duplicate
        });
    }
    Ok(written)
}
