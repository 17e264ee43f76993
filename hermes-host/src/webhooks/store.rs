//! The batched Postgres write of webhook events: a [`BatchStatement`] run by
//! the adapters' [`BatchWriter`](hermes_adapters::postgres::BatchWriter),
//! which adds in-batch de-duplication, retries and poison-row isolation.
//!
//! A batch of raw events only (sources with `normalize = "none"`) goes to
//! [`RawEventStore`]: an optimistic binary `COPY` (see
//! [`raw_store`](super::raw_store)). Any other batch, and a raw one the
//! `COPY` could not store, is one call of `ingest_webhook_batch` (see
//! [`ingest_function`]).
//!
//! Either way the write reports, per event in input order, its id and
//! whether it was inserted. Each write is atomic without an explicit
//! transaction (one statement that stores, after at most a failed `COPY`
//! that stores nothing), so the writer runs it in autocommit
//! ([`BatchWriter::single_statement`]), saving the `BEGIN` and `COMMIT`
//! round trips.
//!
//! [`BatchWriter::single_statement`]: hermes_adapters::postgres::BatchWriter::single_statement

use std::sync::Arc;

use futures::future::BoxFuture;
use hermes_adapters::postgres::{BatchStatement, Written};
use sqlx::PgConnection;

use super::event::WebhookEvent;
use super::ingest_function;
use super::raw_store::RawEventStore;

/// Writes batches of [`WebhookEvent`]s and what they normalize into, with one
/// statement per batch.
#[derive(Debug, Default)]
pub struct WebhookBatchStatement {
    raw: RawEventStore,
}

/// The unique key of an event: source and idempotency key.
pub type EventKey = (Arc<str>, String);

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
                ingest_function::write(conn, rows).await
            }
        })
    }
}
