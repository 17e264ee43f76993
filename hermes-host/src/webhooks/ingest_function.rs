//! One call of `ingest_webhook_batch` (migration `0002_ingest_function.sql`,
//! redefined by `0004_ingest_order_bytewise.sql`)
//! with the batch as parallel arrays: the write of any batch that has
//! normalized events, and of raw batches the `COPY` could not store.
//!
//! The function runs the set-based steps as separate statements, each with a
//! fresh snapshot (so a step sees what concurrent batches committed while an
//! earlier step waited on them):
//!
//! 1. the raw events (`INSERT … ON CONFLICT (source, idempotency_key) DO
//!    NOTHING`), then the ids of the redeliveries;
//! 2. for the new events that were normalized: providers, channels, parties
//!    and conversations (each `INSERT … ON CONFLICT DO NOTHING` of the
//!    distinct values, in a fixed order to keep lock order stable), then the
//!    messages and their attachments, joined to those rows by natural keys.
//!
//! It returns, per event in input order, its id and whether it was inserted.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use hermes_adapters::postgres::Written;
use sqlx::PgConnection;

use super::event::WebhookEvent;

const INGEST_BATCH: &str = "
    SELECT idx, id, inserted
    FROM ingest_webhook_batch($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                              $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
                              $10::text[], $11::text[], $12::timestamptz[], $13::text[],
                              $14::int4[], $15::int4[], $16::text[])";

/// A broken invariant of the write, reported as a (fatal) database error.
fn invariant(message: String) -> sqlx::Error {
    sqlx::Error::Protocol(message)
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

/// Writes `rows` (distinct keys) with one call of `ingest_webhook_batch`:
/// records each one's id and returns whether it was inserted or already
/// stored.
pub async fn write(
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
