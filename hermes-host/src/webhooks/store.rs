//! The batched Postgres write of webhook events: a [`BatchStatement`] run by
//! the adapters' [`BatchWriter`](hermes_adapters::postgres::BatchWriter),
//! which adds the transaction, in-batch de-duplication, retries and
//! poison-row isolation.
//!
//! One batch, one transaction, set-based statements over `UNNEST` arrays:
//!
//! 1. the raw events, `ON CONFLICT (source, idempotency_key) DO NOTHING`,
//!    returning the ids of the new ones; the ids of the others (redeliveries)
//!    are read in a second statement, which sees rows committed by concurrent
//!    batches while the first statement waited for them;
//! 2. for the new events that were normalized: providers, channels, parties
//!    and conversations (each `INSERT … ON CONFLICT DO NOTHING` of the
//!    distinct values, in a fixed order to keep lock order stable), then the
//!    messages and their attachments, joined to those rows by natural keys.
//!
//! Each step is its own statement so that it sees what concurrent batches
//! committed while an earlier step waited on them (a single statement would
//! read one snapshot and could miss them).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use hermes_adapters::postgres::{BatchStatement, Written};
use sqlx::PgConnection;

use super::event::WebhookEvent;

/// Writes batches of [`WebhookEvent`]s and what they normalize into.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebhookBatchStatement;

/// The unique key of an event: source and idempotency key.
pub type EventKey = (Arc<str>, String);

const INSERT_EVENTS: &str = "
    INSERT INTO webhook_events (source, idempotency_key, body, received_at)
    SELECT source, idempotency_key, body::jsonb, received_at
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[])
         AS t(source, idempotency_key, body, received_at)
    ORDER BY source, idempotency_key
    ON CONFLICT (source, idempotency_key) DO NOTHING
    RETURNING id, source, idempotency_key";

const SELECT_EVENTS: &str = "
    SELECT e.id, e.source, e.idempotency_key
    FROM webhook_events e
    JOIN UNNEST($1::text[], $2::text[]) AS t(source, idempotency_key)
      ON e.source = t.source AND e.idempotency_key = t.idempotency_key";

const INSERT_PROVIDERS: &str = "
    INSERT INTO providers (name)
    SELECT DISTINCT name FROM UNNEST($1::text[]) AS t(name)
    ORDER BY name
    ON CONFLICT (name) DO NOTHING";

const INSERT_CHANNELS: &str = "
    INSERT INTO channels (provider_id, kind)
    SELECT DISTINCT p.id, t.kind
    FROM UNNEST($1::text[], $2::text[]) AS t(provider, kind)
    JOIN providers p ON p.name = t.provider
    ORDER BY 1, 2
    ON CONFLICT (provider_id, kind) DO NOTHING";

const INSERT_PARTIES: &str = "
    INSERT INTO parties (kind, address)
    SELECT DISTINCT kind, address FROM UNNEST($1::text[], $2::text[]) AS t(kind, address)
    ORDER BY kind, address
    ON CONFLICT (kind, address) DO NOTHING";

const INSERT_CONVERSATIONS: &str = "
    INSERT INTO conversations (party_low, party_high)
    SELECT DISTINCT least(f.id, r.id), greatest(f.id, r.id)
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])
         AS t(from_kind, from_address, to_kind, to_address)
    JOIN parties f ON f.kind = t.from_kind AND f.address = t.from_address
    JOIN parties r ON r.kind = t.to_kind AND r.address = t.to_address
    ORDER BY 1, 2
    ON CONFLICT (party_low, party_high) DO NOTHING";

const INSERT_MESSAGES: &str = "
    WITH input AS (
        SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::text[], $9::timestamptz[], $10::text[])
            AS t(event_id, provider, channel, from_kind, from_address, to_kind, to_address,
                 body, sent_at, provider_message_id)
    ), inserted AS (
        INSERT INTO messages (event_id, conversation_id, channel_id, sender_id, recipient_id,
                              body, sent_at, provider_message_id)
        SELECT i.event_id, c.id, ch.id, f.id, r.id, i.body, i.sent_at, i.provider_message_id
        FROM input i
        JOIN providers p ON p.name = i.provider
        JOIN channels ch ON ch.provider_id = p.id AND ch.kind = i.channel
        JOIN parties f ON f.kind = i.from_kind AND f.address = i.from_address
        JOIN parties r ON r.kind = i.to_kind AND r.address = i.to_address
        JOIN conversations c ON c.party_low = least(f.id, r.id) AND c.party_high = greatest(f.id, r.id)
        RETURNING id, event_id
    ), attached AS (
        INSERT INTO message_attachments (message_id, position, url)
        SELECT m.id, a.position, a.url
        FROM UNNEST($11::bigint[], $12::int4[], $13::text[]) AS a(event_id, position, url)
        JOIN inserted m ON m.event_id = a.event_id
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM attached)";

/// A broken invariant of the write, reported as a (fatal) database error.
fn invariant(message: String) -> sqlx::Error {
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
        Box::pin(write_batch(conn, rows))
    }
}

async fn write_batch(
    conn: &mut PgConnection,
    rows: &[&Arc<WebhookEvent>],
) -> Result<Vec<Written>, sqlx::Error> {
    let mut index: HashMap<(&str, &str), usize> = HashMap::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        index.insert((&row.source, &row.idempotency_key), i);
    }
    let sources: Vec<&str> = rows.iter().map(|r| &*r.source).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.idempotency_key.as_str()).collect();
    let bodies: Vec<&str> = rows.iter().map(|r| r.body.as_str()).collect();
    let received: Vec<DateTime<Utc>> = rows.iter().map(|r| r.received_at).collect();

    let mut written: Vec<Option<Written>> = vec![None; rows.len()];
    let inserted: Vec<(i64, String, String)> = sqlx::query_as(INSERT_EVENTS)
        .bind(&sources)
        .bind(&keys)
        .bind(&bodies)
        .bind(&received)
        .fetch_all(&mut *conn)
        .await?;
    for (id, source, key) in &inserted {
        let i = *index
            .get(&(source.as_str(), key.as_str()))
            .ok_or_else(|| invariant(format!("insert returned an unknown event {source}/{key}")))?;
        rows[i].set_written_id(*id);
        written[i] = Some(Written::Inserted);
    }

    if inserted.len() < rows.len() {
        let (dup_sources, dup_keys): (Vec<&str>, Vec<&str>) = written
            .iter()
            .zip(rows)
            .filter(|(w, _)| w.is_none())
            .map(|(_, r)| (&*r.source, r.idempotency_key.as_str()))
            .unzip();
        let existing: Vec<(i64, String, String)> = sqlx::query_as(SELECT_EVENTS)
            .bind(&dup_sources)
            .bind(&dup_keys)
            .fetch_all(&mut *conn)
            .await?;
        for (id, source, key) in &existing {
            if let Some(&i) = index.get(&(source.as_str(), key.as_str()))
                && written[i].is_none()
            {
                rows[i].set_written_id(*id);
                written[i] = Some(Written::Duplicate);
            }
        }
    }
    let written = written
        .into_iter()
        .collect::<Option<Vec<Written>>>()
        .ok_or_else(|| invariant("an event was neither inserted nor found".into()))?;

    let new_messages: Vec<&WebhookEvent> = rows
        .iter()
        .zip(&written)
        .filter(|(row, w)| **w == Written::Inserted && row.message.is_some())
        .map(|(row, _)| &***row)
        .collect();
    if !new_messages.is_empty() {
        write_messages(conn, &new_messages).await?;
    }
    Ok(written)
}

/// Resolves providers, channels, parties and conversations, and inserts the
/// messages and attachments of newly stored, normalized events.
async fn write_messages(
    conn: &mut PgConnection,
    events: &[&WebhookEvent],
) -> Result<(), sqlx::Error> {
    let n = events.len();
    let mut event_ids = Vec::with_capacity(n);
    let mut providers = Vec::with_capacity(n);
    let mut channels = Vec::with_capacity(n);
    let mut from_kinds = Vec::with_capacity(n);
    let mut from_addresses = Vec::with_capacity(n);
    let mut to_kinds = Vec::with_capacity(n);
    let mut to_addresses = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    let mut sent_at = Vec::with_capacity(n);
    let mut provider_message_ids = Vec::with_capacity(n);
    let mut attachment_events = Vec::new();
    let mut attachment_positions = Vec::new();
    let mut attachment_urls = Vec::new();
    for event in events {
        let Some(message) = &event.message else {
            continue;
        };
        let id = event
            .written_id()
            .ok_or_else(|| invariant("a stored event has no id".into()))?;
        event_ids.push(id);
        providers.push(&*event.provider);
        channels.push(message.channel.as_str());
        from_kinds.push(message.channel.party_kind());
        from_addresses.push(message.from.as_str());
        to_kinds.push(message.channel.party_kind());
        to_addresses.push(message.to.as_str());
        bodies.push(message.body.as_deref());
        sent_at.push(message.sent_at);
        provider_message_ids.push(message.provider_message_id.as_deref());
        for (position, url) in message.attachments.iter().enumerate() {
            attachment_events.push(id);
            attachment_positions.push(i32::try_from(position).unwrap_or(i32::MAX));
            attachment_urls.push(url.as_str());
        }
    }

    sqlx::query(INSERT_PROVIDERS)
        .bind(&providers)
        .execute(&mut *conn)
        .await?;
    sqlx::query(INSERT_CHANNELS)
        .bind(&providers)
        .bind(&channels)
        .execute(&mut *conn)
        .await?;
    let party_kinds: Vec<&str> = from_kinds.iter().chain(&to_kinds).copied().collect();
    let party_addresses: Vec<&str> = from_addresses
        .iter()
        .chain(&to_addresses)
        .copied()
        .collect();
    sqlx::query(INSERT_PARTIES)
        .bind(&party_kinds)
        .bind(&party_addresses)
        .execute(&mut *conn)
        .await?;
    sqlx::query(INSERT_CONVERSATIONS)
        .bind(&from_kinds)
        .bind(&from_addresses)
        .bind(&to_kinds)
        .bind(&to_addresses)
        .execute(&mut *conn)
        .await?;
    let (messages, attachments): (i64, i64) = sqlx::query_as(INSERT_MESSAGES)
        .bind(&event_ids)
        .bind(&providers)
        .bind(&channels)
        .bind(&from_kinds)
        .bind(&from_addresses)
        .bind(&to_kinds)
        .bind(&to_addresses)
        .bind(&bodies)
        .bind(&sent_at)
        .bind(&provider_message_ids)
        .bind(&attachment_events)
        .bind(&attachment_positions)
        .bind(&attachment_urls)
        .fetch_one(&mut *conn)
        .await?;
    if messages != event_ids.len() as i64 || attachments != attachment_urls.len() as i64 {
        return Err(invariant(format!(
            "stored {messages} of {} messages and {attachments} of {} attachments",
            event_ids.len(),
            attachment_urls.len()
        )));
    }
    Ok(())
}
