//! Shared test pieces: an acknowledger that records every acknowledgement, a
//! producer that emits numbered messages on demand, records what it is asked for,
//! and checks it is never asked for more than the pipeline has room for, the
//! batcher options most tests start from, a paused runtime with a
//! metrics recorder of the test's own, a bounded wait, and pushing into and
//! checking outcomes of an ingress.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use hermes_pipeline::{
    Acknowledger, BatcherOptions, Completion, Ingress, Message, Outcome, Produced, Producer, Status,
};

/// Batcher options that close a batch at `batch_size` messages, or
/// `batch_timeout` after its first one; every other option is the default,
/// and further ones (concurrency, a byte limit) chain on as usual.
pub fn batches_of<T>(batch_size: usize, batch_timeout: Duration) -> BatcherOptions<T> {
    BatcherOptions::new()
        .batch_size(batch_size)
        .batch_timeout(batch_timeout)
}

/// Runs `test` to its end on a current-thread runtime with paused time,
/// with `recorder` as the metrics recorder: a local recorder is the current
/// thread's, so the pipeline must run on this thread only.
pub fn with_recorder_paused<F: std::future::Future>(
    recorder: &dyn metrics::Recorder,
    test: F,
) -> F::Output {
    metrics::with_local_recorder(recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime")
            .block_on(test)
    })
}

/// Awaits `future` for at most ten seconds (of the runtime's clock, which
/// a paused runtime advances at once when idle): a pipeline that hangs fails
/// the test, with `expectation`, instead of hanging it.
pub async fn within_10s<F: std::future::Future>(future: F, expectation: &str) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect(expectation)
}

/// Pushes `ids` into `ingress`, which must have room for them all at once,
/// and returns their completions, in order.
pub fn push_tracked(ingress: &Ingress<u64>, ids: impl IntoIterator<Item = u64>) -> Vec<Completion> {
    ids.into_iter()
        .map(|id| ingress.try_push_tracked(id).expect("room in the ingress"))
        .collect()
}

/// Asserts that `outcome` is a failure whose reason contains `text`.
#[track_caller]
pub fn assert_failed_with(outcome: &Outcome, text: &str) {
    assert!(
        matches!(outcome, Outcome::Failed(reason) if reason.contains(text)),
        "{outcome:?}: expected a failure containing {text:?}"
    );
}

/// Something with an id, so acknowledgements can be counted per message.
pub trait Identified {
    fn id(&self) -> u64;
}

impl Identified for u64 {
    fn id(&self) -> u64 {
        *self
    }
}

/// Records how often, and how, each message was acknowledged.
#[derive(Default)]
pub struct Recorder {
    acks: Mutex<HashMap<u64, Vec<Status>>>,
    pub calls: AtomicUsize,
    pub acked: AtomicUsize,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Every id acknowledged, with its statuses (one, if exactly once).
    pub fn acks(&self) -> HashMap<u64, Vec<Status>> {
        self.acks.lock().unwrap().clone()
    }

    /// Every id acknowledged, with its statuses, by id.
    pub fn sorted_acks(&self) -> Vec<(u64, Vec<Status>)> {
        let mut acks: Vec<_> = self.acks().into_iter().collect();
        acks.sort_unstable_by_key(|(id, _)| *id);
        acks
    }

    /// Makes message `id`, acknowledged to this recorder.
    pub fn tracking(self: &Arc<Self>) -> impl Fn(u64) -> Message<u64> + use<> {
        let acknowledger: Arc<dyn Acknowledger<u64>> = self.clone();
        move |id| Message::new(id).with_acknowledger(acknowledger.clone())
    }

    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// Ids acknowledged as failed, with the reasons.
    pub fn failed(&self) -> HashMap<u64, String> {
        self.acks()
            .into_iter()
            .filter_map(|(id, statuses)| match statuses.first() {
                Some(Status::Failed(reason)) => Some((id, reason.to_string())),
                _ => None,
            })
            .collect()
    }

    /// Asserts every id in `0..n` was acknowledged exactly once.
    pub fn assert_exactly_once(&self, n: u64) {
        let acks = self.acks();
        for id in 0..n {
            let count = acks.get(&id).map_or(0, Vec::len);
            assert_eq!(count, 1, "message {id} acknowledged {count} times");
        }
        assert_eq!(acks.len() as u64, n, "unknown messages acknowledged");
    }
}

impl<T: Identified + Send + 'static> Acknowledger<T> for Recorder {
    fn ack(&self, successful: Vec<Message<T>>, failed: Vec<Message<T>>) -> BoxFuture<'_, ()> {
        assert!(
            !(successful.is_empty() && failed.is_empty()),
            "empty acknowledgement"
        );
        assert!(
            successful.iter().all(|m| !m.is_failed()),
            "a failed message in the successful list"
        );
        assert!(
            failed.iter().all(Message::is_failed),
            "a successful message in the failed list"
        );
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut acks = self.acks.lock().unwrap();
        for message in successful.iter().chain(failed.iter()) {
            acks.entry(message.data.id())
                .or_default()
                .push(message.status().clone());
        }
        self.acked
            .fetch_add(successful.len() + failed.len(), Ordering::SeqCst);
        Box::pin(async {})
    }
}

/// Emits `make(0..total)` on demand, acknowledged by `recorder`, and checks that
/// every ask fits the in-flight bound: produced − acknowledged + demand ≤ bound.
pub struct Numbered<T> {
    pub next: u64,
    pub total: u64,
    pub max_in_flight: usize,
    pub recorder: Arc<Recorder>,
    pub make: Box<dyn Fn(u64) -> T + Send>,
    /// Every demand `produce` was called with, in order.
    pub asks: Arc<Mutex<Vec<usize>>>,
    /// The most messages ever produced but not yet acknowledged, measured as each
    /// `produce` returns (the only time that count grows).
    pub peak_outstanding: Arc<AtomicUsize>,
    pub violations: Arc<Mutex<Vec<String>>>,
}

impl<T: Identified + Send + 'static> Numbered<T> {
    pub fn new(
        total: u64,
        max_in_flight: usize,
        recorder: Arc<Recorder>,
        make: impl Fn(u64) -> T + Send + 'static,
    ) -> Self {
        Self {
            next: 0,
            total,
            max_in_flight,
            recorder,
            make: Box::new(make),
            asks: Arc::default(),
            peak_outstanding: Arc::default(),
            violations: Arc::default(),
        }
    }
}

impl<T: Identified + Send + 'static> Producer<T> for Numbered<T> {
    async fn produce(&mut self, demand: usize) -> Produced<T> {
        self.asks.lock().unwrap().push(demand);
        let outstanding = self.next as usize - self.recorder.acked();
        if demand == 0 || outstanding + demand > self.max_in_flight {
            self.violations.lock().unwrap().push(format!(
                "asked for {demand} with {outstanding} outstanding and a bound of {}",
                self.max_in_flight
            ));
        }
        if self.next >= self.total {
            return Produced::Finished;
        }
        let end = (self.next + demand as u64).min(self.total);
        let acknowledger: Arc<dyn Acknowledger<T>> = self.recorder.clone();
        let messages = (self.next..end)
            .map(|id| Message::new((self.make)(id)).with_acknowledger(acknowledger.clone()))
            .collect();
        self.next = end;
        let outstanding = end as usize - self.recorder.acked();
        self.peak_outstanding
            .fetch_max(outstanding, Ordering::SeqCst);
        Produced::Messages(messages)
    }
}
