//! A circuit breaker on opening connections: once the database has been
//! unreachable for a while, writes fail at once instead of each waiting out
//! its own connection attempts and retries, and one write now and then
//! checks whether it is back.
//!
//! Without it, a long outage makes every batch spend the pool's
//! `acquire_timeout` (sqlx retries a refused connection until then) on each
//! of its attempts, and batches queue behind one another: callers wait
//! longer and longer for an answer that is bound to be a failure.
//!
//! The breaker opens when connections have failed for [`OPEN_AFTER`] with
//! none opened meanwhile, or when the pool gave up opening one for its whole
//! `acquire_timeout` (a pool merely busy does not count). A blip shorter
//! than that is the retry policy's business. While open, one write per
//! [`PROBE_INTERVAL`] connects by itself (within [`PROBE_TIMEOUT`]) before
//! its attempt: if that works the breaker closes, else the write fails like
//! the others. No task runs in the background: a breaker nobody writes
//! through costs nothing, and closes at the next write once the database is
//! back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use tokio::time::Instant;

use super::retry::{ErrorClass, classify};

/// How long connections must keep failing before the breaker opens.
pub(crate) const OPEN_AFTER: Duration = Duration::from_secs(1);
/// How often, while open, a write checks whether the database is back.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// The longest such a check may take (less if the pool's `acquire_timeout`
/// is shorter).
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closed, or open since connections to the database stopped opening;
/// clones share their state.
#[derive(Debug, Clone, Default)]
pub(crate) struct CircuitBreaker {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Read without the lock by every attempt: whether writes are refused.
    open: AtomicBool,
    /// Whether `state.failing_since` is set: a connection that opens clears
    /// it, taking the lock only then.
    failing: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When connections began to fail, none opening since.
    failing_since: Option<Instant>,
    /// While open: when the next check may start.
    next_probe: Option<Instant>,
    /// While open: whether a check is running.
    probing: bool,
}

/// What a write may do now (see [`CircuitBreaker::admit`]).
pub(crate) enum Admission<'a> {
    /// The breaker is closed: go ahead.
    Closed,
    /// The breaker is open and this write is to check the database first.
    Probe(Probe<'a>),
    /// The breaker is open: fail at once.
    Refused,
}

impl CircuitBreaker {
    /// Whether a write may try the database now.
    pub(crate) fn admit(&self) -> Admission<'_> {
        if !self.shared.open.load(Ordering::Acquire) {
            return Admission::Closed;
        }
        let mut state = self.state();
        match state.next_probe {
            Some(at) if !state.probing && Instant::now() >= at => {
                state.probing = true;
                Admission::Probe(Probe { breaker: self })
            }
            _ => Admission::Refused,
        }
    }

    /// Records that the pool handed out a connection: the database is
    /// reachable.
    pub(crate) fn connection_opened(&self) {
        if self.shared.failing.load(Ordering::Acquire) {
            self.state().failing_since = None;
            self.shared.failing.store(false, Ordering::Release);
        }
    }

    /// Records that `pool` could not hand out a connection because of
    /// `error`, and returns whether the database now counts as unreachable
    /// (the breaker is open): then the write should stop retrying. A
    /// `false` leaves the error to the retry policy: an error that waiting
    /// does not mend (bad credentials, a closed pool), a pool that timed
    /// out only because all its connections were busy, or a failure too
    /// recent to call an outage.
    pub(crate) fn connection_failed(&self, pool: &PgPool, error: &sqlx::Error) -> bool {
        if classify(error) != ErrorClass::Transient {
            return false;
        }
        let timed_out = matches!(error, sqlx::Error::PoolTimedOut);
        if timed_out && pool.size() >= pool.options().get_max_connections() && pool.num_idle() == 0
        {
            return false;
        }
        let now = Instant::now();
        let mut state = self.state();
        let since = *state.failing_since.get_or_insert(now);
        self.shared.failing.store(true, Ordering::Release);
        if self.shared.open.load(Ordering::Acquire) {
            return true;
        }
        if !timed_out && now.duration_since(since) < OPEN_AFTER {
            return false;
        }
        state.next_probe = Some(now + PROBE_INTERVAL);
        self.shared.open.store(true, Ordering::Release);
        tracing::warn!(
            %error,
            "database unreachable: writes fail at once until a connection opens again"
        );
        true
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding it.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The one check, while the breaker is open, of whether the database is
/// back. Dropped unfinished (its write cancelled), it lets the next write
/// check instead.
pub(crate) struct Probe<'a> {
    breaker: &'a CircuitBreaker,
}

impl Probe<'_> {
    /// Opens one connection of `pool`'s options outside the pool: if that
    /// works, the breaker closes and the write goes ahead (true); if not,
    /// it stays open and the write fails (false).
    pub(crate) async fn database_is_back(self, pool: &PgPool) -> bool {
        let limit = PROBE_TIMEOUT.min(pool.options().get_acquire_timeout());
        let options = pool.connect_options();
        let connected = tokio::time::timeout(limit, PgConnection::connect_with(&options)).await;
        match connected {
            Ok(Ok(connection)) => {
                // A close the server sees as such, not as a lost client.
                let _ = connection.close().await;
                let shared = &self.breaker.shared;
                *self.breaker.state() = State::default();
                shared.failing.store(false, Ordering::Release);
                shared.open.store(false, Ordering::Release);
                tracing::info!("database reachable again");
                true
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "database still unreachable");
                false
            }
            Err(_) => {
                tracing::debug!(
                    timeout_ms = limit.as_millis() as u64,
                    "database still unreachable"
                );
                false
            }
        }
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        let mut state = self.breaker.state();
        state.probing = false;
        if self.breaker.shared.open.load(Ordering::Acquire) {
            state.next_probe = Some(Instant::now() + PROBE_INTERVAL);
        }
    }
}
