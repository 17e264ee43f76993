//! Which database errors are worth retrying, and how long to wait between tries.

use std::time::Duration;

use rand::Rng;

/// Retry schedule for transient errors: jittered exponential back-off.
///
/// The wait before retry `n` (1-based) is drawn uniformly from
/// `[d/2, d]` where `d = min(max, base * 2^(n-1))`, so concurrent writers that
/// failed together do not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the first retry (before jitter).
    pub base: Duration,
    /// Upper bound of any single wait.
    pub max: Duration,
    /// Total attempts, the first one included (`1` means no retry).
    pub attempts: u32,
    /// No retry starts once this much time has passed since the batch's
    /// first attempt began, or would pass during the wait before it (also
    /// while its rows are split to isolate a rejected one): bounds how long a
    /// batch's callers wait when every attempt is slow to fail (say, on a
    /// stalled database, each waiting for a connection).
    pub give_up_after: Duration,
    /// An attempt still running after this long fails as a transient error,
    /// and its connection is closed instead of going back to the pool. A
    /// server-side `statement_timeout` cannot end a wait on a server that
    /// stopped answering (a frozen process or host, a network dropping
    /// packets); this can. Set it above the longest statement and commit
    /// expected, such as `statement_timeout` plus a margin: a commit cut
    /// short may still have happened, and the retry then reports its rows
    /// [`Duplicate`](super::RowOutcome::Duplicate). `None` (the default):
    /// no client-side limit.
    pub attempt_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    /// 6 attempts, waits from 50 ms doubling up to 5 s (about 1.5 s in total
    /// before jitter), no retry starting after 10 s, no attempt timeout.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(50),
            max: Duration::from_secs(5),
            attempts: 6,
            give_up_after: Duration::from_secs(10),
            attempt_timeout: None,
        }
    }
}

impl RetryPolicy {
    /// A policy with the given base wait, maximum wait and total attempts,
    /// and the default [`give_up_after`](Self::give_up_after).
    pub fn new(base: Duration, max: Duration, attempts: u32) -> Self {
        Self {
            base,
            max,
            attempts,
            ..Self::default()
        }
    }

    /// A policy that tries once and never retries.
    pub fn never() -> Self {
        Self::new(Duration::ZERO, Duration::ZERO, 1)
    }

    /// The same policy, with no retry starting after `limit` (see
    /// [`give_up_after`](Self::give_up_after)).
    pub fn give_up_after(self, limit: Duration) -> Self {
        Self {
            give_up_after: limit,
            ..self
        }
    }

    /// The same policy, failing an attempt that runs longer than `limit` (see
    /// [`attempt_timeout`](Self::attempt_timeout)).
    pub fn attempt_timeout(self, limit: Duration) -> Self {
        Self {
            attempt_timeout: Some(limit),
            ..self
        }
    }

    /// The jittered wait before retry number `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(31);
        let ceiling = self
            .base
            .saturating_mul(1u32 << exponent)
            .min(self.max.max(self.base));
        let half = ceiling / 2;
        let spread = (ceiling - half).as_nanos().min(u128::from(u64::MAX)) as u64;
        let jitter = if spread == 0 {
            0
        } else {
            rand::thread_rng().gen_range(0..=spread)
        };
        half + Duration::from_nanos(jitter)
    }
}

/// What an error says about the batch that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Nothing wrong with the rows or the statement: a lost connection, a
    /// server restart, a pool timeout, a serialization failure or a deadlock.
    /// The same batch may succeed if tried again.
    Transient,
    /// The data of some row violates a type or a constraint (SQLSTATE class
    /// 22 or 23, `21000` cardinality violation, class 54 program limits such
    /// as an index row too large or a JSON value nested deeper than the
    /// server's stack allows, class P0 a trigger's `RAISE`), or the client
    /// could not encode some value.
    /// Retrying the same rows fails again; smaller batches tell which rows
    /// are at fault.
    Row,
    /// Anything else: a broken statement, a missing table, missing
    /// privileges, a closed pool. No retry will help.
    Fatal,
}

/// Classifies an error of a batch write.
///
/// Transient: I/O errors, pool timeouts, a crashed connection worker, and the
/// SQLSTATEs `40001` serialization_failure, `40P01` deadlock_detected, class
/// `08` (connection exceptions) but `08P01` protocol_violation, `57P01`
/// admin_shutdown, `57P02` crash_shutdown, `57P03` cannot_connect_now,
/// `57P05` idle_session_timeout, `25P03` idle_in_transaction_session_timeout
/// (a pooled connection the server ended), `53300` too_many_connections, `53200` out_of_memory,
/// `53100` disk_full (space may be freed), `57014`
/// query_canceled (a statement timeout), `55P03` lock_not_available and
/// `25006` read_only_sql_transaction (a replica, until failover completes).
pub fn classify(error: &sqlx::Error) -> ErrorClass {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => {
            ErrorClass::Transient
        }
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => classify_sqlstate(&code),
            None => ErrorClass::Fatal,
        },
        sqlx::Error::Encode(_) => ErrorClass::Row,
        _ => ErrorClass::Fatal,
    }
}

/// Classifies a SQLSTATE code (see [`classify`]).
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    match code {
        // Serialization failure, deadlock, shutdowns, a session or a
        // transaction ended for idling (idle_session_timeout,
        // idle_in_transaction_session_timeout, met by a pooled connection),
        // too many connections, out of memory or disk space, a statement
        // timeout or cancel,
        // a lock timeout, and a read-only server (a replica, until failover
        // completes).
        "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "57P05" | "25P03" | "53300" | "53200"
        | "53100" | "57014" | "55P03" | "25006" => ErrorClass::Transient,
        // Connection exceptions, but a protocol violation repeats itself.
        "08P01" => ErrorClass::Fatal,
        c if c.starts_with("08") => ErrorClass::Transient,
        "21000" => ErrorClass::Row,
        // Class P0: a PL/pgSQL RAISE, as a trigger that refuses a row does.
        c if ["22", "23", "54", "P0"]
            .iter()
            .any(|class| c.starts_with(class)) =>
        {
            ErrorClass::Row
        }
        _ => ErrorClass::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        for code in [
            "40001", "40P01", "08006", "08003", "57P01", "57P02", "57P03", "57P05", "25P03",
            "57014", "55P03", "25006", "53300", "53200", "53100",
        ] {
            assert_eq!(classify_sqlstate(code), ErrorClass::Transient, "{code}");
        }
        for code in [
            "22001", "22P02", "23505", "23514", "23502", "21000", "54000", "54001", "P0001",
        ] {
            assert_eq!(classify_sqlstate(code), ErrorClass::Row, "{code}");
        }
        for code in ["42P01", "42601", "42501", "XX000", "08P01"] {
            assert_eq!(classify_sqlstate(code), ErrorClass::Fatal, "{code}");
        }
    }

    #[test]
    fn io_and_pool_timeouts_are_transient() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&io), ErrorClass::Transient);
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), ErrorClass::Transient);
        assert_eq!(classify(&sqlx::Error::PoolClosed), ErrorClass::Fatal);
        assert_eq!(
            classify(&sqlx::Error::Encode("bad".into())),
            ErrorClass::Row
        );
    }

    #[test]
    fn delays_grow_exponentially_within_jitter_and_cap() {
        let policy = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(1), 10);
        for _ in 0..100 {
            let first = policy.delay(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = policy.delay(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let capped = policy.delay(30);
            assert!(capped >= Duration::from_millis(500) && capped <= Duration::from_secs(1));
        }
        assert_eq!(RetryPolicy::never().delay(1), Duration::ZERO);
    }
}
