//! Which stage tasks are alive, for [`Pipeline::stopped_stages`](crate::Pipeline::stopped_stages).
//!
//! A task is counted alive from its spawn to its end, however it ends: its
//! future returns, panics (outside the calls a stage contains), or is dropped
//! with the runtime. The mark is a guard moved into the task's future, so it
//! is dropped with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::lock::lock;

/// Whether one task (a producer stage, a batcher) is alive.
#[derive(Clone, Default)]
pub(crate) struct Alive(Arc<AtomicBool>);

impl Alive {
    /// `task`, marked alive from now until it ends or is dropped.
    pub(crate) fn track<F: Future>(&self, task: F) -> impl Future<Output = F::Output> + use<F> {
        self.0.store(true, Ordering::Release);
        let guard = AliveGuard(self.0.clone());
        async move {
            let _guard = guard;
            task.await
        }
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// How many processor tasks are alive with each index: one, except for a
/// moment after a shrink and a regrow, when one retiring may not have ended
/// yet as its successor starts.
#[derive(Clone, Default)]
pub(crate) struct ProcessorsAlive(Arc<Mutex<Vec<usize>>>);

impl ProcessorsAlive {
    /// `task`, processor `index`, counted alive from now until it ends or
    /// is dropped.
    pub(crate) fn track<F: Future>(
        &self,
        index: usize,
        task: F,
    ) -> impl Future<Output = F::Output> + use<F> {
        {
            let mut alive = lock(&self.0);
            if alive.len() <= index {
                alive.resize(index + 1, 0);
            }
            alive[index] += 1;
        }
        let guard = ProcessorGuard {
            alive: self.clone(),
            index,
        };
        async move {
            let _guard = guard;
            task.await
        }
    }

    /// The indices below `count` that no alive processor has.
    pub(crate) fn missing(&self, count: usize) -> Vec<usize> {
        let alive = lock(&self.0);
        (0..count)
            .filter(|&index| alive.get(index).is_none_or(|&n| n == 0))
            .collect()
    }
}

struct ProcessorGuard {
    alive: ProcessorsAlive,
    index: usize,
}

impl Drop for ProcessorGuard {
    fn drop(&mut self) {
        let mut alive = lock(&self.alive.0);
        alive[self.index] -= 1;
    }
}
