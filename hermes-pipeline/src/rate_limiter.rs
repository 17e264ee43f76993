//! Producer rate limiting: at most `allowed` messages per `interval`, shared by
//! every producer of a pipeline, adjustable while running.
//!
//! This follows Broadway's semantics (a fixed window of `allowed_messages` per
//! `interval`, granting part of a demand when only part is left), which
//! all-or-nothing cell limiters such as GCRA's `check_n` do not offer.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lock::lock;
use crate::options::MAX_TIMEOUT;
use crate::pipeline::ConfigError;

/// A producer rate limit: at most `allowed` messages per `interval`.
///
/// Windows are fixed: one starts when a message is asked for or handed on
/// after the previous one ended. Messages count in the window in which they
/// are handed to the processors. A producer is only asked for what the
/// current window has room for; what it returns beyond the room left when it
/// answers (several producers asked at once, or one answering in a later
/// window) waits for the following windows, and is acknowledged as failed if
/// the drain deadline passes first.
///
/// A limit set while running ([`Pipeline::set_rate_limit`]) keeps the window
/// in progress: what it let through counts against the new limit, and it ends
/// when it would have, or one new interval after the change if that is
/// sooner. So no window lets through more than the largest limit in force
/// during it allows, however often a limit is set (re-applying the same one
/// changes nothing). Lifting the limit ends the window: one set later starts
/// afresh.
///
/// [`Pipeline::set_rate_limit`]: crate::Pipeline::set_rate_limit
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Messages allowed per interval (at least 1).
    pub allowed: usize,
    /// The interval (longer than zero, at most [`MAX_TIMEOUT`]).
    pub interval: Duration,
}

impl RateLimit {
    /// `allowed` messages per `interval`.
    pub fn new(allowed: usize, interval: Duration) -> Self {
        Self { allowed, interval }
    }

    /// Refuses a limit that would let nothing through.
    pub(crate) fn validate(limit: Option<Self>) -> Result<(), ConfigError> {
        match limit {
            Some(limit)
                if limit.allowed == 0
                    || limit.interval.is_zero()
                    || limit.interval > MAX_TIMEOUT =>
            {
                Err(ConfigError::Invalid(
                    "a rate limit needs allowed ≥ 1 and an interval above zero and at most a year"
                        .into(),
                ))
            }
            _ => Ok(()),
        }
    }
}

struct Window {
    limit: Option<RateLimit>,
    ends: Instant,
    /// What the current window let through so far.
    admitted: usize,
}

/// The shared fixed-window limiter. Messages are charged to the window in
/// which they are handed to the processors, so no window lets more than
/// `allowed` through, however long a producer took to answer.
pub(crate) struct RateLimiter {
    window: Mutex<Window>,
    changed: Notify,
}

impl RateLimiter {
    /// A limiter; `None` lets everything through at once, until a limit is set.
    pub(crate) fn new(limit: Option<RateLimit>) -> Self {
        Self {
            window: Mutex::new(Window {
                limit,
                ends: Instant::now(),
                admitted: 0,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        lock(&self.window)
    }

    /// Waits until the current window has room, then returns how much of
    /// `want` it has room for (at least 1 if `want` is), without charging it:
    /// what a producer may be asked for.
    pub(crate) async fn room(&self, want: usize) -> usize {
        self.take(want, false).await
    }

    /// Waits until the current window has room, then charges it with as much
    /// of `want` as fits (at least 1 if `want` is) and returns that: what may
    /// be handed to the processors now.
    pub(crate) async fn admit(&self, want: usize) -> usize {
        self.take(want, true).await
    }

    async fn take(&self, want: usize, charge: bool) -> usize {
        if want == 0 {
            return 0;
        }
        loop {
            let changed = self.changed.notified();
            let wait_until = {
                let mut window = self.lock();
                let Some(limit) = window.limit else {
                    return want;
                };
                let now = Instant::now();
                if now >= window.ends {
                    window.ends = now + limit.interval;
                    window.admitted = 0;
                }
                let room = limit.allowed.saturating_sub(window.admitted);
                if room > 0 {
                    let taken = want.min(room);
                    if charge {
                        window.admitted += taken;
                    }
                    return taken;
                }
                window.ends
            };
            tokio::select! {
                () = tokio::time::sleep_until(wait_until) => {}
                () = changed => {}
            }
        }
    }

    /// Replaces the limit (`None` lifts it), for messages already produced
    /// and not yet admitted too. The window in progress keeps what it
    /// admitted, which the new limit's `allowed` is charged with, and ends no
    /// later than before, nor than one new interval from now: it admits at
    /// most the larger of the two limits' `allowed`. Lifting the limit ends
    /// it (nothing is counted while there is none).
    pub(crate) fn set(&self, limit: Option<RateLimit>) {
        {
            let mut window = self.lock();
            let now = Instant::now();
            window.ends = match limit {
                Some(limit) => window.ends.min(now + limit.interval),
                None => now,
            };
            window.limit = limit;
        }
        self.changed.notify_waiters();
    }

    pub(crate) fn limit(&self) -> Option<RateLimit> {
        self.lock().limit
    }
}
