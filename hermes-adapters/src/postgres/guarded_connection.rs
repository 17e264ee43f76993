//! A pooled connection for one piece of work that may be cut short.
//!
//! sqlx returns a dropped pooled connection to its pool only after pinging
//! it, and that ping has no time limit: a connection dropped in the middle of
//! a statement (its future cancelled by a timeout or a shutdown) on a server
//! that stopped answering holds its pool slot, and the pool's `close`, for
//! as long as the server stays silent.

use std::ops::{Deref, DerefMut};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

/// A pooled connection that goes back to the pool only through
/// [`finish`](Self::finish). Dropped unfinished (its work cancelled or timed
/// out, perhaps mid-statement), it leaves the pool and its socket is closed
/// at once, and the pool opens a new one when it needs it.
pub struct GuardedConnection(Option<PoolConnection<Postgres>>);

impl GuardedConnection {
    /// Takes a connection from `pool`.
    pub async fn acquire(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self(Some(pool.acquire().await?)))
    }

    /// The work is done (successfully or with an error the server answered):
    /// the connection goes back to the pool.
    pub fn finish(mut self) {
        drop(self.0.take());
    }
}

impl Deref for GuardedConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // `Some` until `finish` or drop, which consume it.
        self.0
            .as_deref()
            .expect("a guarded connection is held until finished")
    }
}

impl DerefMut for GuardedConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0
            .as_deref_mut()
            .expect("a guarded connection is held until finished")
    }
}

impl Drop for GuardedConnection {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(conn.detach());
        }
    }
}
