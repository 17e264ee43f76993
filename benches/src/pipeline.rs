//! Library benchmarks: the `pipeline_noop` topology against a plain channel chain,
//! and against a sink that sleeps 1 ms per batch.
//!
//! A pipeline run's timer stops once every message is acknowledged; a run
//! whose acknowledgements stall (or that does not stop after them) fails
//! after a generous bound instead of hanging. Once the pipeline has stopped,
//! outside the timer, the run fails unless each message was acknowledged
//! successfully exactly once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::future::BoxFuture;
use hermes_pipeline::{
    Acknowledger, BatchInfo, BatcherOptions, Handler, Message, Pipeline, ProcessorContext,
    ProcessorOptions, Produced, Producer,
};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

use crate::report::{emit, median_by, peak_rss_mb, reset_peak_rss_of, round3};

const PROCESSORS: usize = 2;
const BATCH_SIZE: usize = 100;
const BATCH_CONCURRENCY: usize = 2;
const BATCH_TIMEOUT: Duration = Duration::from_millis(50);

/// How long a pipeline run may wait for its acknowledgements beyond
/// [`ACK_FLOOR_PER_SEC`]'s allowance, and for the pipeline to stop after them:
/// past that it counts as hung.
const STUCK_AFTER: Duration = Duration::from_secs(60);

/// The slowest rate, in messages per second, a pipeline run is allowed
/// before it counts as hung (with [`STUCK_AFTER`] on top).
const ACK_FLOOR_PER_SEC: f64 = 10_000.0;

/// Runs the three library benchmarks, median of `runs` each.
pub fn run(messages: u64, sink_messages: u64, runs: usize) -> anyhow::Result<()> {
    if messages == 0 || sink_messages == 0 {
        bail!("--messages and --sink-messages must each be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Each benchmark's peak memory is its own: reset before it runs.
        let me = std::process::id();
        reset_peak_rss_of(me);
        let noop = median(runs, || pipeline_run(messages, None)).await?;
        let noop_peak = peak_rss_mb();
        reset_peak_rss_of(me);
        let chain = median(runs, || channel_chain(messages)).await?;
        let ratio = noop.per_sec() / chain.per_sec();
        emit(&json!({
            "bench": "pipeline_noop", "messages": messages, "secs": round3(noop.secs),
            "per_sec": noop.per_sec().round(), "max_in_flight": noop.max_in_flight,
            "peak_rss_mb": round3(noop_peak), "vs_channel_chain": round3(ratio),
        }));
        emit(&json!({
            "bench": "channel_chain", "messages": messages, "secs": round3(chain.secs),
            "per_sec": chain.per_sec().round(), "peak_rss_mb": round3(peak_rss_mb()),
        }));
        reset_peak_rss_of(me);
        let sink = median(runs, || {
            pipeline_run(sink_messages, Some(Duration::from_millis(1)))
        })
        .await?;
        let mean_sleep = sink
            .mean_sleep
            .unwrap_or(Duration::from_millis(1))
            .as_secs_f64();
        let limit = (BATCH_CONCURRENCY * BATCH_SIZE) as f64 / mean_sleep;
        emit(&json!({
            "bench": "pipeline_sink_1ms", "messages": sink_messages, "secs": round3(sink.secs),
            "per_sec": sink.per_sec().round(), "max_in_flight": sink.max_in_flight,
            "mean_sleep_ms": round3(mean_sleep * 1000.0), "limit_per_sec": limit.round(),
            "ratio": round3(sink.per_sec() / limit), "peak_rss_mb": round3(peak_rss_mb()),
        }));
        Ok(())
    })
}

/// One timed run.
struct Run {
    messages: u64,
    secs: f64,
    max_in_flight: usize,
    mean_sleep: Option<Duration>,
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.messages as f64 / self.secs
    }
}

async fn median<F, Fut>(runs: usize, mut run: F) -> anyhow::Result<Run>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Run>>,
{
    let mut results = Vec::new();
    for _ in 0..runs.max(1) {
        results.push(run().await?);
    }
    median_by(results, |run| run.secs).context("no run")
}

/// Emits `1..=total` on demand, each message acknowledged by the shared [`Tally`].
struct Counter {
    next: u64,
    total: u64,
    acknowledger: Arc<dyn Acknowledger<u64>>,
}

impl Producer<u64> for Counter {
    async fn produce(&mut self, demand: usize) -> Produced<u64> {
        if self.next > self.total {
            return Produced::Finished;
        }
        let end = (self.next + demand as u64 - 1).min(self.total);
        let messages = (self.next..=end)
            .map(|n| Message::new(n).with_acknowledger(self.acknowledger.clone()))
            .collect();
        self.next = end + 1;
        Produced::Messages(messages)
    }
}

/// Records each acknowledgement and wakes the timer once every message has
/// its fate.
struct Tally {
    acks: Mutex<Acks>,
    all_done: Notify,
}

/// What the acknowledgements said: one lock per call (a batch), a bit per
/// message.
struct Acks {
    messages: u64,
    /// Bit `n - 1` is set once message `n` is acknowledged successfully.
    seen: Vec<u64>,
    /// Messages acknowledged successfully for the first time.
    first: u64,
    /// Successful acknowledgements that were not a message's first, or
    /// named no message sent.
    extra: u64,
    failed: u64,
}

impl Tally {
    fn new(messages: u64) -> anyhow::Result<Self> {
        let words = usize::try_from(messages.div_ceil(64)).context("too many messages")?;
        Ok(Self {
            acks: Mutex::new(Acks {
                messages,
                seen: vec![0; words],
                first: 0,
                extra: 0,
                failed: 0,
            }),
            all_done: Notify::new(),
        })
    }

    fn acks(&self) -> std::sync::MutexGuard<'_, Acks> {
        // Counters stay consistent whatever a panicking holder did.
        self.acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Acks {
    /// Records a successful acknowledgement of message `n`.
    fn mark(&mut self, n: u64) {
        let Some(index) = n.checked_sub(1).filter(|index| *index < self.messages) else {
            self.extra += 1;
            return;
        };
        let (word, bit) = ((index / 64) as usize, 1 << (index % 64));
        if self.seen[word] & bit == 0 {
            self.seen[word] |= bit;
            self.first += 1;
        } else {
            self.extra += 1;
        }
    }

    /// Every message has its fate (some may be failed).
    fn all_done(&self) -> bool {
        self.first + self.failed >= self.messages
    }

    /// An error unless each message was acknowledged successfully exactly
    /// once.
    fn check(&self) -> anyhow::Result<()> {
        if self.first != self.messages || self.extra != 0 || self.failed != 0 {
            bail!(
                "of {} messages, {} acknowledged, {} failed; {} more acknowledgements \
                 repeated a message or named none sent",
                self.messages,
                self.first,
                self.failed,
                self.extra
            );
        }
        Ok(())
    }
}

impl Acknowledger<u64> for Tally {
    fn ack(&self, successful: Vec<Message<u64>>, failed: Vec<Message<u64>>) -> BoxFuture<'_, ()> {
        let mut acks = self.acks();
        let was_done = acks.all_done();
        // The processors doubled each message's number.
        for message in &successful {
            if message.data % 2 == 0 {
                acks.mark(message.data / 2);
            } else {
                acks.extra += 1;
            }
        }
        acks.failed += failed.len() as u64;
        if !was_done && acks.all_done() {
            self.all_done.notify_one();
        }
        Box::pin(async {})
    }
}

/// What the batch handler saw.
#[derive(Default)]
struct Sums {
    sum: AtomicU64,
    slept_nanos: AtomicU64,
    sleeps: AtomicU64,
}

/// Doubles in processors, sums in batches, optionally sleeping per batch.
struct SumDoubled {
    sums: Arc<Sums>,
    sleep: Option<Duration>,
}

impl Handler for SumDoubled {
    type Data = u64;

    async fn handle_message(&self, message: &mut Message<u64>, _: &ProcessorContext) {
        message.data *= 2;
    }

    async fn handle_batch(&self, batch: &mut [Message<u64>], _: &BatchInfo) {
        let sum: u64 = batch.iter().map(|message| message.data).sum();
        self.sums.sum.fetch_add(sum, Ordering::Relaxed);
        if let Some(sleep) = self.sleep {
            let started = Instant::now();
            tokio::time::sleep(sleep).await;
            let slept = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.sums.slept_nanos.fetch_add(slept, Ordering::Relaxed);
            self.sums.sleeps.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn pipeline_run(messages: u64, sleep: Option<Duration>) -> anyhow::Result<Run> {
    let tally = Arc::new(Tally::new(messages)?);
    let sums = Arc::new(Sums::default());
    let all_done = tally.all_done.notified();
    let started = Instant::now();
    let pipeline = Pipeline::builder(
        "bench",
        SumDoubled {
            sums: sums.clone(),
            sleep,
        },
    )
    .producer(Counter {
        next: 1,
        total: messages,
        acknowledger: tally.clone(),
    })
    .processors(ProcessorOptions::new().concurrency(PROCESSORS))
    .batcher(
        "sum",
        BatcherOptions::new()
            .batch_size(BATCH_SIZE)
            .batch_timeout(BATCH_TIMEOUT)
            .concurrency(BATCH_CONCURRENCY),
    )
    .start()?;
    let ack_wait = STUCK_AFTER + Duration::from_secs_f64(messages as f64 / ACK_FLOOR_PER_SEC);
    if tokio::time::timeout(ack_wait, all_done).await.is_err() {
        let acks = tally.acks();
        bail!(
            "only {} of {messages} messages acknowledged ({} failed) after {} s",
            acks.first,
            acks.failed,
            ack_wait.as_secs()
        );
    }
    let secs = started.elapsed().as_secs_f64();
    if tokio::time::timeout(STUCK_AFTER, pipeline.join())
        .await
        .is_err()
    {
        bail!(
            "the pipeline did not stop within {} s of its last acknowledgement",
            STUCK_AFTER.as_secs()
        );
    }

    // After the pipeline stopped, so a late repeat counts.
    tally.acks().check()?;
    let sum = sums.sum.load(Ordering::Relaxed);
    if sum != messages * (messages + 1) {
        bail!(
            "the batches summed to {sum}, expected {}",
            messages * (messages + 1)
        );
    }
    let sleeps = sums.sleeps.load(Ordering::Relaxed);
    let mean_sleep = (sleeps > 0)
        .then(|| Duration::from_nanos(sums.slept_nanos.load(Ordering::Relaxed) / sleeps));
    Ok(Run {
        messages,
        secs,
        max_in_flight: pipeline.peak_in_flight(),
        mean_sleep,
    })
}

/// The same shape from tokio bounded channels and tasks, one message per send.
async fn channel_chain(messages: u64) -> anyhow::Result<Run> {
    let started = Instant::now();
    let (batcher_tx, mut batcher_rx) = mpsc::channel::<u64>(BATCH_SIZE);
    let mut processor_txs = Vec::new();
    for _ in 0..PROCESSORS {
        let (tx, mut rx) = mpsc::channel::<u64>(BATCH_SIZE);
        processor_txs.push(tx);
        let batcher_tx = batcher_tx.clone();
        tokio::spawn(async move {
            while let Some(n) = rx.recv().await {
                if batcher_tx.send(n * 2).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(batcher_tx);
    let (done_tx, mut done_rx) = mpsc::channel::<(u64, u64)>(BATCH_CONCURRENCY);
    let mut batch_txs = Vec::new();
    for _ in 0..BATCH_CONCURRENCY {
        let (tx, mut rx) = mpsc::channel::<Vec<u64>>(2);
        batch_txs.push(tx);
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let (mut count, mut sum) = (0, 0);
            while let Some(batch) = rx.recv().await {
                count += batch.len() as u64;
                sum += batch.iter().sum::<u64>();
            }
            let _ = done_tx.send((count, sum)).await;
        });
    }
    drop(done_tx);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH_SIZE);
        let mut next = 0;
        while let Some(n) = batcher_rx.recv().await {
            batch.push(n);
            if batch.len() == BATCH_SIZE {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_SIZE));
                if batch_txs[next].send(full).await.is_err() {
                    return;
                }
                next = (next + 1) % BATCH_CONCURRENCY;
            }
        }
        if !batch.is_empty() {
            let _ = batch_txs[next].send(batch).await;
        }
    });
    tokio::spawn(async move {
        for n in 1..=messages {
            let target = (n % PROCESSORS as u64) as usize;
            if processor_txs[target].send(n).await.is_err() {
                return;
            }
        }
    });
    let (mut count, mut sum) = (0, 0);
    while let Some((c, s)) = done_rx.recv().await {
        count += c;
        sum += s;
    }
    let secs = started.elapsed().as_secs_f64();
    if count != messages || sum != messages * (messages + 1) {
        bail!("channel chain delivered {count} messages summing {sum}");
    }
    Ok(Run {
        messages,
        secs,
        max_in_flight: 0,
        mean_sleep: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(messages: u64) -> Acks {
        Tally::new(messages).unwrap().acks.into_inner().unwrap()
    }

    #[test]
    fn each_message_acknowledged_once_passes() {
        let mut acks = fresh(130);
        for n in (1..=130).rev() {
            assert!(!acks.all_done());
            acks.mark(n);
        }
        assert!(acks.all_done());
        acks.check().unwrap();
    }

    #[test]
    fn a_repeat_in_place_of_a_missing_message_fails() {
        let mut acks = fresh(3);
        for n in [1, 2, 2] {
            acks.mark(n);
        }
        assert!(!acks.all_done());
        assert_eq!((acks.first, acks.extra), (2, 1));
        assert!(acks.check().is_err());
        acks.mark(3);
        assert!(acks.all_done());
        assert!(acks.check().is_err());
    }

    #[test]
    fn numbers_never_sent_and_failures_fail() {
        let mut acks = fresh(2);
        for n in [0, 1, 2, 3] {
            acks.mark(n);
        }
        assert_eq!((acks.first, acks.extra), (2, 2));
        assert!(acks.check().is_err());
        let mut acks = fresh(1);
        acks.failed = 1;
        assert!(acks.all_done());
        assert!(acks.check().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pipeline_run_acknowledges_every_message_once() {
        let run = pipeline_run(1_000, None).await.unwrap();
        assert_eq!(run.messages, 1_000);
    }

    #[test]
    fn no_messages_is_refused() {
        assert!(run(0, 10, 1).is_err());
        assert!(run(10, 0, 1).is_err());
    }
}
