//! The in-flight bound: demand is free capacity.
//!
//! Every message holds one permit from the moment a producer is asked for it until
//! it is acknowledged. Producers are only ever asked for permits they hold, so the
//! number of messages in the pipeline never exceeds `max_in_flight`, whatever the
//! offered load.

use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::Gauge;
use tokio::sync::Semaphore;

pub(crate) struct InFlight {
    permits: Semaphore,
    max: usize,
    peak: AtomicUsize,
    gauge: Gauge,
}

impl InFlight {
    pub(crate) fn new(max: usize, gauge: Gauge) -> Self {
        Self {
            permits: Semaphore::new(max),
            max,
            peak: AtomicUsize::new(0),
            gauge,
        }
    }

    /// Waits until at least `at_least` permits are free (capped at the bound), then
    /// takes as many as are free, up to `at_most`. Returns how many it took.
    pub(crate) async fn acquire(&self, at_least: usize, at_most: usize) -> usize {
        let at_most = at_most.clamp(1, self.max);
        let at_least = at_least.clamp(1, at_most);
        let Ok(permit) = self.permits.acquire_many(to_u32(at_least)).await else {
            return 0; // never closed
        };
        permit.forget();
        let mut taken = at_least;
        while taken < at_most {
            let free = self.permits.available_permits().min(at_most - taken);
            if free == 0 {
                break;
            }
            if let Ok(permit) = self.permits.try_acquire_many(to_u32(free)) {
                permit.forget();
                taken += free;
            }
        }
        self.gauge.increment(taken as f64);
        self.peak.fetch_max(self.current(), Ordering::Relaxed);
        taken
    }

    /// Returns `n` permits: `n` messages were acknowledged, or not produced.
    pub(crate) fn release(&self, n: usize) {
        if n > 0 {
            self.gauge.decrement(n as f64);
            self.permits.add_permits(n);
        }
    }

    pub(crate) fn current(&self) -> usize {
        self.max - self.permits.available_permits()
    }

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
