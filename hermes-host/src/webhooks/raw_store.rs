//! The batched write of raw webhook events (sources with `normalize =
//! "none"`): into `webhook_events` only.
//!
//! A batch is first tried as one binary `COPY` with ids drawn ahead from the
//! table's sequence ([`EventIds`]): the fastest way into the table, and when
//! it succeeds every event is new and stored under the id it was given. A
//! `COPY` has no `ON CONFLICT`, so a batch holding a redelivery fails as a
//! whole and stores nothing; it then goes through `ingest_webhook_batch`
//! ([`ingest_function`]), which is idempotent and
//! finds the redeliveries' ids. After such a conflict the next batches skip
//! the `COPY` for a while ([`OptimisticCopy`]).
//!
//! Rows are copied in key order, so concurrent batches with common keys lock
//! them in the same order and do not deadlock.

use std::sync::Arc;

use hermes_adapters::postgres::{CopyFailure, JsonText, OptimisticCopy, Written};
use sqlx::PgConnection;

use super::event::WebhookEvent;
use super::event_ids::EventIds;
use super::ingest_function;

/// The columns of the `COPY`, in this order.
const COPY_EVENTS: &str = "COPY webhook_events (id, source, idempotency_key, body, received_at) \
                           FROM STDIN (FORMAT binary)";

/// Fields per row of [`COPY_EVENTS`].
const COPY_FIELDS: u16 = 5;

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
        let copy = async |conn: &mut PgConnection| {
            let mut sorted: Vec<&Arc<WebhookEvent>> = rows.to_vec();
            sorted.sort_by(|a, b| {
                (&*a.source, &a.idempotency_key).cmp(&(&*b.source, &b.idempotency_key))
            });
            // Say, no USAGE on the sequence: the regular statement, which
            // draws ids itself, does not need it.
            let ids = self
                .ids
                .take(conn, sorted.len())
                .await
                .map_err(CopyFailure::of)?;
            self.copy_rows(conn, &sorted, &ids).await?;
            for (row, id) in sorted.iter().zip(ids) {
                row.set_written_id(id);
            }
            Ok(vec![Written::Inserted; rows.len()])
        };
        let function = async |conn: &mut PgConnection| ingest_function::write(conn, rows).await;
        self.copy.write(conn, copy, function).await
    }

    async fn copy_rows(
        &self,
        conn: &mut PgConnection,
        sorted: &[&Arc<WebhookEvent>],
        ids: &[i64],
    ) -> Result<(), CopyFailure> {
        let rows = sorted.iter().zip(ids);
        self.copy
            .run(conn, rows, |(row, id), data| {
                data.row(COPY_FIELDS);
                data.field(id)?;
                data.field(&row.source.as_ref())?;
                data.field(&row.idempotency_key.as_str())?;
                data.field(&JsonText(row.body.as_str()))?;
                data.field(&row.received_at)
            })
            .await
    }
}
