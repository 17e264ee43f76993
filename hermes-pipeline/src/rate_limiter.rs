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
    /// What the current window still lets through.
    remaining: usize,
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
                remaining: 0,
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
                    window.remaining = limit.allowed;
                }
                if window.remaining > 0 {
                    let taken = want.min(window.remaining);
                    if charge {
                        window.remaining -= taken;
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

    /// Replaces the limit (`None` lifts it); a new window starts now, which
    /// also charges messages already produced and not yet admitted.
    pub(crate) fn set(&self, limit: Option<RateLimit>) {
        {
            let mut window = self.lock();
            window.limit = limit;
            window.ends = Instant::now() + limit.map_or(Duration::ZERO, |limit| limit.interval);
            window.remaining = limit.map_or(0, |limit| limit.allowed);
        }
        self.changed.notify_waiters();
    }

    pub(crate) fn limit(&self) -> Option<RateLimit> {
        self.lock().limit
    }
}
