//! Which stage tasks are alive, for [`Pipeline::stopped_stages`](crate::Pipeline::stopped_stages).
//!
//! A task is counted alive from its spawn to its end, however it ends: its
//! future returns, panics (outside the calls a stage contains), or is dropped
//! with the runtime. A [`TaskTracker`] counts it: its token is moved into
//! the task's future, so it is dropped with it.

use std::sync::{Arc, Mutex};

use tokio_util::task::TaskTracker;

use crate::lock::lock;

/// Whether one task (a producer stage, a batcher) is alive.
#[derive(Clone, Default)]
pub(crate) struct Alive(TaskTracker);

impl Alive {
    /// `task`, marked alive from now until it ends or is dropped.
    pub(crate) fn track<F: Future>(&self, task: F) -> impl Future<Output = F::Output> + use<F> {
        self.0.track_future(task)
    }

    pub(crate) fn is_alive(&self) -> bool {
        !self.0.is_empty()
    }
}

/// The processor tasks alive with each index: one, except for a moment after
/// a shrink and a regrow, when one retiring may not have ended yet as its
/// successor starts.
#[derive(Clone, Default)]
pub(crate) struct ProcessorsAlive(Arc<Mutex<Vec<Alive>>>);

impl ProcessorsAlive {
    /// `task`, processor `index`, counted alive from now until it ends or
    /// is dropped.
    pub(crate) fn track<F: Future>(
        &self,
        index: usize,
        task: F,
    ) -> impl Future<Output = F::Output> + use<F> {
        let mut alive = lock(&self.0);
        if alive.len() <= index {
            alive.resize_with(index + 1, Alive::default);
        }
        alive[index].track(task)
    }

    /// The indices below `count` that no alive processor has.
    pub(crate) fn missing(&self, count: usize) -> Vec<usize> {
        let alive = lock(&self.0);
        (0..count)
            .filter(|&index| alive.get(index).is_none_or(|tasks| !tasks.is_alive()))
            .collect()
    }
}
