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
    remaining: usize,
}

/// A grant of messages in one window; unused messages can be given back.
pub(crate) struct Grant {
    pub(crate) granted: usize,
    window_ends: Instant,
}

/// The shared fixed-window limiter.
pub(crate) struct RateLimiter {
    window: Mutex<Window>,
    changed: Notify,
}

impl RateLimiter {
    /// A limiter; `None` grants every demand at once, until a limit is set.
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

    /// Waits until the window has room, then grants between 1 and `want` messages.
    pub(crate) async fn acquire(&self, want: usize) -> Grant {
        loop {
            let changed = self.changed.notified();
            let wait_until = {
                let mut window = self.lock();
                let Some(limit) = window.limit else {
                    return Grant {
                        granted: want,
                        window_ends: window.ends,
                    };
                };
                let now = Instant::now();
                if now >= window.ends {
                    window.ends = now + limit.interval;
                    window.remaining = limit.allowed;
                }
                if window.remaining > 0 {
                    let granted = want.min(window.remaining);
                    window.remaining -= granted;
                    return Grant {
                        granted,
                        window_ends: window.ends,
                    };
                }
                window.ends
            };
            tokio::select! {
                () = tokio::time::sleep_until(wait_until) => {}
                () = changed => {}
            }
        }
    }

    /// Gives back the unused part of a grant, if its window is still current.
    pub(crate) fn refund(&self, grant: &Grant, used: usize) {
        let unused = grant.granted.saturating_sub(used);
        if unused == 0 {
            return;
        }
        let mut window = self.lock();
        if let Some(limit) = window.limit
            && window.ends == grant.window_ends
        {
            window.remaining = (window.remaining + unused).min(limit.allowed);
        }
    }

    /// Replaces the limit (`None` lifts it); a new window starts now.
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
