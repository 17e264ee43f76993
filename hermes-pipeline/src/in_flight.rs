//! The in-flight bound: demand is free capacity.
//!
//! A producer is only asked for messages it holds slots for, taken before it
//! is asked; each message it returns keeps its slot until it is acknowledged,
//! and the slots it did not fill are given back. So the number of messages in
//! the pipeline never exceeds `max_in_flight`, whatever the offered load.
//! Only those messages, not the slots held for asking, count as in flight.

use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::Gauge;
use tokio::sync::Semaphore;

use crate::panic_message::{catch_panic_now, log_caught};

pub(crate) struct InFlight {
    /// Free slots.
    slots: Semaphore,
    max: usize,
    /// Messages produced and not yet acknowledged.
    messages: AtomicUsize,
    peak: AtomicUsize,
    gauge: Gauge,
}

impl InFlight {
    pub(crate) fn new(max: usize, gauge: Gauge) -> Self {
        Self {
            slots: Semaphore::new(max),
            max,
            messages: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            gauge,
        }
    }

    /// Waits until at least `at_least` slots are free (capped at the bound), then
    /// takes as many as are free, up to `at_most`. Returns how many it took.
    pub(crate) async fn acquire(&self, at_least: usize, at_most: usize) -> usize {
        let at_most = at_most.clamp(1, self.max);
        let at_least = at_least.clamp(1, at_most);
        let Ok(permit) = self.slots.acquire_many(to_u32(at_least)).await else {
            return 0; // never closed
        };
        permit.forget();
        let mut taken = at_least;
        while taken < at_most {
            let free = self.slots.available_permits().min(at_most - taken);
            if free == 0 {
                break;
            }
            if let Ok(permit) = self.slots.try_acquire_many(to_u32(free)) {
                permit.forget();
                taken += free;
            }
        }
        taken
    }

    /// `n` taken slots now hold produced messages: they are in flight. The
    /// count goes first and the gauge last, and a panic of the gauge (a
    /// metrics recorder may panic) is logged, not raised: the producer stage
    /// calling this holds the messages, which would be lost with it, their
    /// slots never freed.
    pub(crate) fn admit(&self, n: usize) {
        if n > 0 {
            let now = self.messages.fetch_add(n, Ordering::AcqRel) + n;
            self.peak.fetch_max(now, Ordering::Relaxed);
            self.gauge(|gauge| gauge.increment(n as f64));
        }
    }

    /// Frees `n` taken slots that no message filled.
    pub(crate) fn give_back(&self, n: usize) {
        if n > 0 {
            self.slots.add_permits(n);
        }
    }

    /// `n` messages in flight were acknowledged: frees their slots. The gauge
    /// goes first: if it panics (a metrics recorder may), nothing is freed,
    /// and the caller, which still holds the slots, frees them with
    /// `release_lost`.
    pub(crate) fn release(&self, n: usize) {
        if n > 0 {
            self.gauge.decrement(n as f64);
            self.messages.fetch_sub(n, Ordering::AcqRel);
            self.slots.add_permits(n);
        }
    }

    /// `n` messages in flight were lost, dropped by a stage that stopped
    /// holding them (say, on a panic outside its handlers): frees their
    /// slots. This may run after such a panic, or while it unwinds, and the
    /// gauge may be what panicked: it goes last, and a panic there is logged,
    /// not raised.
    pub(crate) fn release_lost(&self, n: usize) {
        if n > 0 {
            self.messages.fetch_sub(n, Ordering::AcqRel);
            self.slots.add_permits(n);
            self.gauge(|gauge| gauge.decrement(n as f64));
        }
    }

    /// Updates the gauge with `update`, logging a panic there (a metrics
    /// recorder may panic) rather than raising it.
    fn gauge(&self, update: impl FnOnce(&Gauge)) {
        if let Err(panic) = catch_panic_now(|| update(&self.gauge)) {
            log_caught(|| tracing::error!(%panic, "the in-flight gauge panicked"));
        }
    }

    /// Messages in flight: produced and not yet acknowledged.
    pub(crate) fn current(&self) -> usize {
        self.messages.load(Ordering::Acquire)
    }

    /// The most messages ever in flight at once.
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
