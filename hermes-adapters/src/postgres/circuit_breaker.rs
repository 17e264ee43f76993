//! A circuit breaker on opening connections: once the database cannot be
//! reached, writes fail at once instead of each waiting out its own
//! connection attempts and retries, and a background probe finds when it is
//! back.
//!
//! Without it, a long outage makes every batch spend the pool's
//! `acquire_timeout` (sqlx retries a refused connection until then) on each
//! of its attempts, and batches queue behind one another: callers wait
//! longer and longer for an answer that is bound to be a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;

use super::retry::{ErrorClass, classify};

/// How long the probe waits between its attempts to open a connection.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Open (the database is unreachable) or closed; clones share their state.
#[derive(Debug, Clone, Default)]
pub struct CircuitBreaker {
    open: Arc<AtomicBool>,
}

impl CircuitBreaker {
    /// Whether the database is known to be unreachable: writes should fail
    /// at once.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Records that a connection to `pool` could not be opened because of
    /// `error`. Returns whether that opened the breaker: true for an error
    /// that may go away (a refused or timed-out connection, a server
    /// starting or shutting down), which also starts the one probe that
    /// closes the breaker again once `pool` hands out a connection. Other
    /// errors (bad credentials, a closed pool) are left to the caller.
    pub fn connection_failed(&self, pool: &PgPool, error: &sqlx::Error) -> bool {
        if classify(error) != ErrorClass::Transient {
            return false;
        }
        if !self.open.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                %error,
                "database unreachable: writes fail at once until a connection opens again"
            );
            tokio::spawn(probe(pool.clone(), self.open.clone()));
        }
        true
    }
}

/// Tries to open a connection every [`PROBE_INTERVAL`] until one opens, or
/// the attempt fails for a reason that waiting does not mend (the breaker
/// then closes too, so that writes meet that error themselves).
async fn probe(pool: PgPool, open: Arc<AtomicBool>) {
    let since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        match pool.acquire().await {
            Ok(_) => {
                tracing::info!(
                    down_ms = since.elapsed().as_millis() as u64,
                    "database reachable again"
                );
                break;
            }
            Err(error) if classify(&error) != ErrorClass::Transient => {
                tracing::warn!(%error, "database probe: an error that waiting does not mend");
                break;
            }
            Err(error) => tracing::debug!(%error, "database still unreachable"),
        }
    }
    open.store(false, Ordering::Release);
}
