//! Event ids drawn from `webhook_events`' identity sequence ahead of use, so
//! that a batch of new events can be stored by `COPY` with its ids known
//! (a `COPY` returns nothing).

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use sqlx::PgConnection;

/// Ids drawn from the sequence at a time, when the spare ones run out: one
/// extra query per this many events (each `nextval` costs the server about
/// a microsecond, so a block takes a fraction of a millisecond).
const BLOCK: usize = 256;

/// The sequence behind `webhook_events.id`.
const SEQUENCE: &str = "SELECT pg_get_serial_sequence('webhook_events', 'id')";

/// Draws `$2` values of the sequence named `$1`. (With the name looked up in
/// the same statement, Postgres would look it up again for every value.)
const NEXT_IDS: &str = "SELECT nextval($1::regclass) FROM generate_series(1, $2)";

/// Spare event ids, drawn from the identity sequence and not yet used.
///
/// An id taken is used at most once: by the `COPY` it was taken for, or by
/// nobody if that `COPY` fails (a gap, as sequences leave anyway). The same
/// sequence keeps numbering the events inserted without an id, so the two
/// never collide.
#[derive(Debug, Default)]
pub struct EventIds {
    sequence: OnceLock<String>,
    spare: Mutex<VecDeque<i64>>,
}

impl EventIds {
    /// `n` unused ids; draws a block from the sequence on `conn` when too few
    /// are spare.
    pub async fn take(&self, conn: &mut PgConnection, n: usize) -> Result<Vec<i64>, sqlx::Error> {
        let mut ids = self.take_spare(n);
        if ids.len() < n {
            let missing = n - ids.len();
            let count = i64::try_from(missing.max(BLOCK)).unwrap_or(i64::MAX);
            let sequence = self.sequence(conn).await?;
            let mut drawn: Vec<i64> = sqlx::query_scalar(NEXT_IDS)
                .bind(sequence)
                .bind(count)
                .fetch_all(&mut *conn)
                .await?;
            if drawn.len() < missing {
                return Err(sqlx::Error::Protocol(format!(
                    "the id sequence gave {} of {missing} ids",
                    drawn.len()
                )));
            }
            let rest = drawn.split_off(missing);
            ids.extend(drawn);
            self.lock().extend(rest);
        }
        Ok(ids)
    }

    /// The sequence's name, looked up once.
    async fn sequence(&self, conn: &mut PgConnection) -> Result<&str, sqlx::Error> {
        if let Some(name) = self.sequence.get() {
            return Ok(name);
        }
        let name: Option<String> = sqlx::query_scalar(SEQUENCE).fetch_one(&mut *conn).await?;
        let name = name.ok_or_else(|| {
            sqlx::Error::Protocol("webhook_events.id has no sequence (migrations missing?)".into())
        })?;
        Ok(self.sequence.get_or_init(|| name))
    }

    fn take_spare(&self, n: usize) -> Vec<i64> {
        let mut spare = self.lock();
        let k = n.min(spare.len());
        spare.drain(..k).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<i64>> {
        // The queue stays consistent even if a holder panicked.
        self.spare
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
