//! Event ids drawn from `webhook_events`' identity sequence ahead of use, so
//! that a batch of new events can be stored by `COPY` with its ids known
//! (a `COPY` returns nothing).

use std::collections::VecDeque;
use std::sync::Mutex;

use sqlx::PgConnection;

/// Ids drawn from the sequence at a time, when the spare ones run out: one
/// extra query per this many events.
const BLOCK: usize = 1024;

/// Draws `$1` values of the sequence behind `webhook_events.id`.
const NEXT_IDS: &str = "
    SELECT nextval(q.seq)
    FROM (SELECT pg_get_serial_sequence('webhook_events', 'id')::regclass AS seq) AS q,
         generate_series(1, $1)";

/// Spare event ids, drawn from the identity sequence and not yet used.
///
/// An id taken is used at most once: by the `COPY` it was taken for, or by
/// nobody if that `COPY` fails (a gap, as sequences leave anyway). The same
/// sequence keeps numbering the events inserted without an id, so the two
/// never collide.
#[derive(Debug, Default)]
pub struct EventIds {
    spare: Mutex<VecDeque<i64>>,
}

impl EventIds {
    /// `n` unused ids, in increasing order; draws a block from the sequence
    /// on `conn` when too few are spare.
    pub async fn take(&self, conn: &mut PgConnection, n: usize) -> Result<Vec<i64>, sqlx::Error> {
        let mut ids = self.take_spare(n);
        if ids.len() < n {
            let missing = n - ids.len();
            let count = i64::try_from(missing.max(BLOCK)).unwrap_or(i64::MAX);
            let mut drawn: Vec<i64> = sqlx::query_scalar(NEXT_IDS)
                .bind(count)
                .fetch_all(&mut *conn)
                .await?;
            if drawn.len() < missing {
                return Err(sqlx::Error::Protocol(format!(
                    "the id sequence gave {} of {missing} ids",
                    drawn.len()
                )));
            }
            drawn.sort_unstable();
            let rest = drawn.split_off(missing);
            ids.extend(drawn);
            self.lock().extend(rest);
        }
        Ok(ids)
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
