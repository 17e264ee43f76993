//! Library benchmarks: the `pipeline_noop` topology against a plain channel chain,
//! and against a sink that sleeps 1 ms per batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// Runs the three library benchmarks, median of `runs` each.
pub fn run(messages: u64, sink_messages: u64, runs: usize) -> anyhow::Result<()> {
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

/// Emits `1..=total` on demand, each message acknowledged by the shared counter.
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

/// Counts acknowledged messages and wakes the timer after the last one.
#[derive(Default)]
struct Tally {
    succeeded: AtomicUsize,
    failed: AtomicUsize,
    all_done: Notify,
    expected: AtomicUsize,
}

impl Acknowledger<u64> for Tally {
    fn ack(&self, successful: Vec<Message<u64>>, failed: Vec<Message<u64>>) -> BoxFuture<'_, ()> {
        let done = self
            .succeeded
            .fetch_add(successful.len(), Ordering::Relaxed)
            + successful.len();
        let failed = self.failed.fetch_add(failed.len(), Ordering::Relaxed) + failed.len();
        if done + failed >= self.expected.load(Ordering::Relaxed) {
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
    let tally = Arc::new(Tally::default());
    tally.expected.store(messages as usize, Ordering::Relaxed);
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
    all_done.await;
    let secs = started.elapsed().as_secs_f64();
    pipeline.join().await;

    let acked = tally.succeeded.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    if acked != messages as usize || failed != 0 {
        bail!("acked {acked} and failed {failed} of {messages} messages");
    }
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
