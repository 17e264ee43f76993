//! Behaviour tests: batching by time, size, bytes and batcher; draining and its
//! deadline; the push ingress; rate limiting; resizing; failures; telemetry.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream;
use hermes_pipeline::*;
use support::{
    Numbered, Recorder, assert_failed_with, batches_of, push_tracked, with_recorder_paused,
    within_10s,
};
use tokio::time::Instant;

/// One handled batch: batcher, key, trigger, ids.
type SeenBatch = (String, BatchKey, BatchTrigger, Vec<u64>);

/// Records batches; optionally holds batches until released.
#[derive(Default)]
struct Batches {
    seen: Mutex<Vec<SeenBatch>>,
    failed_hook: AtomicUsize,
}

impl Batches {
    /// The trigger and ids of every batch handled so far, in order.
    fn triggers_and_ids(&self) -> Vec<(BatchTrigger, Vec<u64>)> {
        (self.seen.lock().unwrap().iter())
            .map(|batch| (batch.2, batch.3.clone()))
            .collect()
    }
}

struct Collect {
    batches: Arc<Batches>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// How long `handle_failed` takes.
    failing_takes: Duration,
}

impl Collect {
    fn new() -> (Self, Arc<Batches>) {
        let batches = Arc::new(Batches::default());
        (
            Self {
                batches: batches.clone(),
                gate: None,
                failing_takes: Duration::ZERO,
            },
            batches,
        )
    }

    /// A handler whose batches each wait for a permit of the returned gate.
    fn gated() -> (Self, Arc<Batches>, Arc<tokio::sync::Semaphore>) {
        let (mut handler, batches) = Self::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        handler.gate = Some(gate.clone());
        (handler, batches, gate)
    }
}

impl Handler for Collect {
    type Data = u64;

    async fn handle_message(&self, message: &mut Message<u64>, _: &ProcessorContext) {
        match message.data {
            13 => message.fail("thirteen"),
            666 => panic!("the beast"),
            n if n >= 1000 => message.put_batcher("big"),
            _ => {}
        }
    }

    async fn handle_batch(&self, batch: &mut [Message<u64>], info: &BatchInfo) {
        if let Some(gate) = &self.gate {
            let _permit = gate.acquire().await;
        }
        let ids = batch.iter().map(|message| message.data).collect();
        self.batches.seen.lock().unwrap().push((
            info.batcher.to_string(),
            info.batch_key.clone(),
            info.trigger,
            ids,
        ));
    }

    async fn handle_failed(&self, messages: &mut [Message<u64>], _: FailedIn) {
        tokio::time::sleep(self.failing_takes).await;
        self.batches
            .failed_hook
            .fetch_add(messages.len(), Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_partial_batch_flushes_at_batch_timeout() {
    let (handler, batches) = Collect::new();
    let mut builder = Pipeline::builder("timeout", handler)
        .processors(ProcessorOptions::new().concurrency(1))
        .batcher("default", batches_of(10, Duration::from_millis(200)));
    let ingress = builder.ingress(10);
    let _pipeline = builder.start().unwrap();

    let started = Instant::now();
    let outcomes = ingress.test_batch([1u64, 2, 3]).await;
    assert!(outcomes.iter().all(Outcome::is_success));
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(200),
        "flushed exactly at the timeout"
    );
    assert_eq!(
        batches.triggers_and_ids(),
        vec![(BatchTrigger::Timeout, vec![1, 2, 3])]
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_goes_at_once_and_named_batchers_get_their_messages() {
    let (handler, batches) = Collect::new();
    let mut builder = Pipeline::builder("size", handler)
        .processors(ProcessorOptions::new().concurrency(1))
        .batcher("default", batches_of(2, Duration::from_secs(60)))
        .batcher("big", batches_of(1, Duration::from_secs(60)));
    let ingress = builder.ingress(10);
    let _pipeline = builder.start().unwrap();

    let started = Instant::now();
    let outcomes = ingress.test_batch([1u64, 2, 1000]).await;
    assert!(outcomes.iter().all(Outcome::is_success));
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "no batch waited for its timeout"
    );
    let mut seen = batches.seen.lock().unwrap().clone();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen[0].0, "big");
    assert_eq!(seen[0].3, vec![1000]);
    assert_eq!(seen[1].0, "default");
    assert_eq!(
        (seen[1].2, seen[1].3.clone()),
        (BatchTrigger::Size, vec![1, 2])
    );
}

#[tokio::test(start_paused = true)]
async fn batches_close_before_exceeding_max_batch_bytes() {
    let (handler, batches) = Collect::new();
    let mut builder = Pipeline::builder("bytes", handler)
        .processors(ProcessorOptions::new().concurrency(1))
        .batcher(
            "default",
            batches_of(100, Duration::from_millis(10))
                .max_batch_bytes(10, |message: &Message<u64>| message.data as usize),
        );
    let ingress = builder.ingress(10);
    let _pipeline = builder.start().unwrap();

    ingress.test_batch([4u64, 4, 4, 20, 1]).await;
    assert_eq!(
        batches.triggers_and_ids(),
        vec![
            (BatchTrigger::Bytes, vec![4, 4]),
            (BatchTrigger::Bytes, vec![4]),
            (BatchTrigger::Bytes, vec![20]),
            (BatchTrigger::Timeout, vec![1])
        ]
    );
    // One that reaches the limit exactly goes at once.
    let started = Instant::now();
    assert!(ingress.test_message(10u64).await.is_success());
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(
        batches.triggers_and_ids().last(),
        Some(&(BatchTrigger::Bytes, vec![10]))
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_timeout_goes_before_messages_waiting_in_the_batcher() {
    let (mut handler, batches) = Collect::new();
    // The batcher itself waits for handle_failed on what size_of panics on.
    handler.failing_takes = Duration::from_millis(20);
    let mut builder = Pipeline::builder("timeout-first", handler)
        .processors(ProcessorOptions::new().concurrency(1))
        .batcher(
            "default",
            batches_of(10, Duration::from_millis(10)).max_batch_bytes(
                100,
                |message: &Message<u64>| {
                    assert_ne!(message.data, 7, "no size for 7");
                    1
                },
            ),
        );
    let ingress = builder.ingress(10);
    let pipeline = builder.start().unwrap();
    let mut completions = Vec::new();
    for n in [1u64, 7, 2] {
        completions.push(ingress.try_push_tracked(n).unwrap());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // While the batcher waits, 1's timeout passes and 2 arrives: 1's batch
    // goes without it.
    for completion in completions {
        completion.await;
    }
    assert_eq!(
        batches.triggers_and_ids(),
        vec![
            (BatchTrigger::Timeout, vec![1]),
            (BatchTrigger::Timeout, vec![2])
        ]
    );
    assert!(!pipeline.drain(Duration::from_secs(1)).await.forced);
}

#[tokio::test(start_paused = true)]
async fn keyed_batches_never_mix_keys() {
    struct Keyed;
    impl Handler for Keyed {
        type Data = u64;
        async fn handle_message(&self, message: &mut Message<u64>, _: &ProcessorContext) {
            message.put_batch_key(message.data % 2);
        }
        async fn handle_batch(&self, batch: &mut [Message<u64>], info: &BatchInfo) {
            assert!(
                batch.iter().all(|m| m.batch_key() == &info.batch_key
                    && BatchKey::Int(m.data % 2) == info.batch_key)
            );
        }
    }
    let mut builder = Pipeline::builder("keys", Keyed).batcher(
        "default",
        batches_of(3, Duration::from_millis(5)).concurrency(2),
    );
    let ingress = builder.ingress(100);
    let _pipeline = builder.start().unwrap();
    let outcomes = ingress.test_batch(0..50u64).await;
    assert!(outcomes.iter().all(Outcome::is_success), "{outcomes:?}");
}

#[tokio::test]
async fn failures_and_panics_fail_only_their_message_and_run_handle_failed() {
    let (handler, batches) = Collect::new();
    let mut builder = Pipeline::builder("failures", handler)
        .batcher("default", batches_of(5, Duration::from_millis(5)));
    let ingress = builder.ingress(10);
    let _pipeline = builder.start().unwrap();

    let outcomes = ingress.test_batch([1u64, 13, 666, 2]).await;
    assert_eq!(outcomes[0], Outcome::Succeeded);
    assert_eq!(outcomes[1], Outcome::Failed("thirteen".into()));
    assert_failed_with(&outcomes[2], "the beast");
    assert_eq!(outcomes[3], Outcome::Succeeded);
    assert_eq!(batches.failed_hook.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_message_routed_to_an_unknown_batcher_fails() {
    struct Lost;
    impl Handler for Lost {
        type Data = u64;
        async fn handle_message(&self, message: &mut Message<u64>, _: &ProcessorContext) {
            message.put_batcher("nowhere");
        }
    }
    let mut builder = Pipeline::builder("lost", Lost).batcher("default", BatcherOptions::new());
    let ingress = builder.ingress(1);
    let _pipeline = builder.start().unwrap();
    assert_eq!(
        ingress.test_message(1u64).await,
        Outcome::Failed("no batcher named \"nowhere\"".into())
    );
}

#[tokio::test]
async fn without_batchers_messages_are_acknowledged_after_processing() {
    let (handler, _) = Collect::new();
    let recorder = Recorder::new();
    let producer = Numbered::new(500, 1000, recorder.clone(), |id| id);
    let pipeline = Pipeline::builder("no-batchers", handler)
        .producer(producer)
        .start()
        .unwrap();
    pipeline.join().await;
    recorder.assert_exactly_once(500);
    assert_eq!(
        recorder.failed().len(),
        1,
        "only 13 fails (666 panics only above 500)"
    );
}

#[tokio::test]
async fn a_panic_in_partition_by_or_size_of_fails_that_message_only() {
    let (handler, _) = Collect::new();
    let mut builder = Pipeline::builder("closure-panics", handler)
        .processors(ProcessorOptions::new().concurrency(2).partition_by(
            |message: &Message<u64>| {
                if message.data == 7 {
                    panic!("no partition for 7");
                }
                message.data
            },
        ))
        .batcher(
            "default",
            BatcherOptions::new()
                .batch_size(4)
                .batch_timeout(Duration::from_millis(5))
                .max_batch_bytes(100, |message: &Message<u64>| {
                    if message.data == 9 {
                        panic!("no size for 9");
                    }
                    1
                }),
        );
    let ingress = builder.ingress(20);
    let pipeline = builder.start().unwrap();
    let outcomes = ingress.test_batch(0..20u64).await;
    for (n, outcome) in outcomes.iter().enumerate() {
        match n {
            7 => assert!(
                matches!(outcome, Outcome::Failed(r) if r.contains("partition_by panicked: no partition for 7")),
                "{outcome:?}"
            ),
            9 => assert!(
                matches!(outcome, Outcome::Failed(r) if r.contains("size_of panicked: no size for 9")),
                "{outcome:?}"
            ),
            13 => assert!(!outcome.is_success()),
            _ => assert_eq!(outcome, &Outcome::Succeeded, "{n}"),
        }
    }
    // The pipeline still works, and once drained every slot is back.
    assert_eq!(ingress.test_message(20u64).await, Outcome::Succeeded);
    assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
    assert_eq!(pipeline.in_flight(), 0);
}

/// Produces three messages, then panics, waking `panicking` first.
struct PanicsSecondTime {
    recorder: Arc<Recorder>,
    asked: usize,
    panicking: Arc<tokio::sync::Notify>,
}

impl Producer<u64> for PanicsSecondTime {
    async fn produce(&mut self, _demand: usize) -> Produced<u64> {
        self.asked += 1;
        if self.asked > 1 {
            self.panicking.notify_one();
            panic!("asked again");
        }
        let acknowledger: Arc<dyn Acknowledger<u64>> = self.recorder.clone();
        Produced::Messages(
            (0..3u64)
                .map(|n| Message::new(n).with_acknowledger(acknowledger.clone()))
                .collect(),
        )
    }
}

/// Ready once `go` is notified; then records the demand it is asked for, and
/// finishes.
struct AskedAfter {
    go: Arc<tokio::sync::Notify>,
    asked: Arc<Mutex<Vec<usize>>>,
}

impl Producer<u64> for AskedAfter {
    async fn produce(&mut self, demand: usize) -> Produced<u64> {
        self.asked.lock().unwrap().push(demand);
        Produced::Finished
    }

    async fn ready(&mut self) {
        self.go.notified().await;
    }
}

#[tokio::test]
async fn a_panicking_producer_stops_and_gives_its_slots_back() {
    let (handler, _) = Collect::new();
    let recorder = Recorder::new();
    let panicking = Arc::new(tokio::sync::Notify::new());
    let asked = Arc::new(Mutex::new(Vec::new()));
    // A producer is asked only when all 3 slots are free: the second one, ready
    // once the first panics, is asked only if the first gave its slots back.
    let pipeline = Pipeline::builder("producer-panics", handler)
        .producer(PanicsSecondTime {
            recorder: recorder.clone(),
            asked: 0,
            panicking: panicking.clone(),
        })
        .producer(AskedAfter {
            go: panicking,
            asked: asked.clone(),
        })
        .processors(ProcessorOptions::new().max_demand(3).min_demand(0))
        .max_in_flight(3)
        .start()
        .unwrap();
    within_10s(pipeline.join(), "the pipeline ends with its producers").await;
    recorder.assert_exactly_once(3);
    assert_eq!(*asked.lock().unwrap(), vec![3]);
    assert_eq!(pipeline.in_flight(), 0);
}

/// Has messages to give, but panics when asked whether it is ready.
struct PanicsWhenReady(Arc<AtomicUsize>);

impl Producer<u64> for PanicsWhenReady {
    async fn produce(&mut self, demand: usize) -> Produced<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Produced::Messages((0..demand as u64).map(Message::new).collect())
    }

    async fn ready(&mut self) {
        panic!("not ready");
    }
}

#[tokio::test]
async fn a_producer_whose_ready_panics_stops_unasked() {
    let (handler, _) = Collect::new();
    let asked = Arc::new(AtomicUsize::new(0));
    let pipeline = Pipeline::builder("ready-panics", handler)
        .producer(PanicsWhenReady(asked.clone()))
        .start()
        .unwrap();
    within_10s(pipeline.join(), "the pipeline ends with its only producer").await;
    assert_eq!(asked.load(Ordering::SeqCst), 0);
    assert_eq!(pipeline.in_flight(), 0);
}

#[tokio::test]
async fn acknowledgements_are_grouped_per_acknowledger() {
    let (handler, _) = Collect::new();
    let (first, second) = (Recorder::new(), Recorder::new());
    let messages: Vec<Message<u64>> = (0..40u64)
        .map(|id| {
            let acknowledger: Arc<dyn Acknowledger<u64>> = if id % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            Message::new(id + 100).with_acknowledger(acknowledger)
        })
        .collect();
    let pipeline = Pipeline::builder("grouped", handler)
        .producer(StreamProducer::new(stream::iter(messages)))
        .processors(ProcessorOptions::new().concurrency(1).max_demand(40))
        .batcher("default", batches_of(40, Duration::from_secs(5)))
        .start()
        .unwrap();
    pipeline.join().await;
    assert_eq!((first.acked(), second.acked()), (20, 20));
    // One batch of 40, acknowledged with one call per acknowledger.
    assert_eq!(
        (
            first.calls.load(Ordering::SeqCst),
            second.calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
}

/// Records what it acknowledged only after a pause (as a broker round trip would).
struct SlowAcknowledger(Recorder);

impl Acknowledger<u64> for SlowAcknowledger {
    fn ack(
        &self,
        successful: Vec<Message<u64>>,
        failed: Vec<Message<u64>>,
    ) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.0.ack(successful, failed).await;
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_completion_resolves_after_its_acknowledger_ran() {
    let (handler, _) = Collect::new();
    let acknowledger = Arc::new(SlowAcknowledger(Recorder::default()));
    let mut builder = Pipeline::builder("ack-then-complete", handler);
    let ingress = builder.ingress(10);
    let _pipeline = builder.start().unwrap();
    let outcomes = ingress
        .test_batch((0..5u64).map(|id| Message::new(id).with_acknowledger(acknowledger.clone())))
        .await;
    assert!(outcomes.iter().all(Outcome::is_success));
    assert_eq!(acknowledger.0.acked(), 5);
}

/// Waits inside `produce` for the messages sent to it (its `ready` is the
/// default, which returns at once): asked while it has none, it holds the
/// slots it was asked with until messages arrive.
struct WaitsInProduce(tokio::sync::mpsc::UnboundedReceiver<Message<u64>>);

impl WaitsInProduce {
    fn new() -> (tokio::sync::mpsc::UnboundedSender<Message<u64>>, Self) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, Self(rx))
    }
}

impl Producer<u64> for WaitsInProduce {
    async fn produce(&mut self, demand: usize) -> Produced<u64> {
        let mut messages = Vec::new();
        // Cancel-safe; 0 only once every sender is gone.
        if self.0.recv_many(&mut messages, demand).await == 0 {
            Produced::Finished
        } else {
            Produced::Messages(messages)
        }
    }
}

#[test]
fn only_produced_messages_count_as_in_flight() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let gauge = || -> f64 {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(key, ..)| key.key().name() == telemetry::IN_FLIGHT)
            .map_or(0.0, |(.., value)| match value {
                DebugValue::Gauge(value) => value.into_inner(),
                _ => f64::NAN,
            })
    };
    with_recorder_paused(&recorder, async {
        let (handler, _, gate) = Collect::gated();
        let (tx, producer) = WaitsInProduce::new();
        let pipeline = Pipeline::builder("in-flight", handler)
            .producer(producer)
            .processors(ProcessorOptions::new().concurrency(1).max_demand(10))
            .batcher("default", batches_of(3, Duration::from_millis(1)))
            .start()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The producer waits in `produce`, holding the 10 slots it was
        // asked with: none is a message.
        assert_eq!((pipeline.in_flight(), pipeline.peak_in_flight()), (0, 0));
        assert_eq!(gauge(), 0.0);
        for n in 0..3u64 {
            tx.send(Message::new(n)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!((pipeline.in_flight(), pipeline.peak_in_flight()), (3, 3));
        assert_eq!(gauge(), 3.0);
        gate.add_permits(1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!((pipeline.in_flight(), pipeline.peak_in_flight()), (0, 3));
        assert_eq!(gauge(), 0.0);
        pipeline.drain(Duration::from_secs(1)).await;
    });
}

/// A metrics recorder whose histogram or gauge `name` (of stage `stage`,
/// if given) is the given one, which may panic (every other series is a
/// no-op): the stage updating it stops, unless it contains panics outside
/// its handlers.
struct Panicky {
    name: &'static str,
    stage: Option<&'static str>,
    histogram: metrics::Histogram,
    gauge: metrics::Gauge,
}

impl Panicky {
    fn histogram(
        name: &'static str,
        record: impl metrics::HistogramFn + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            stage: None,
            histogram: metrics::Histogram::from_arc(Arc::new(record)),
            gauge: metrics::Gauge::noop(),
        }
    }

    fn gauge(name: &'static str, gauge: impl metrics::GaugeFn + Send + Sync + 'static) -> Self {
        Self {
            name,
            stage: None,
            histogram: metrics::Histogram::noop(),
            gauge: metrics::Gauge::from_arc(Arc::new(gauge)),
        }
    }

    /// Only the series of stage `stage`.
    fn of_stage(self, stage: &'static str) -> Self {
        Self {
            stage: Some(stage),
            ..self
        }
    }

    fn is_it(&self, key: &metrics::Key) -> bool {
        key.name() == self.name
            && self.stage.is_none_or(|stage| {
                key.labels()
                    .any(|label| label.key() == "stage" && label.value() == stage)
            })
    }
}

/// Panics on batches of 3 or more: the batch processor recording one stops
/// (batch processors contain panics in handlers and acknowledgers, not elsewhere).
struct BatchesOfThreePanic;

impl metrics::HistogramFn for BatchesOfThreePanic {
    fn record(&self, size: f64) {
        assert!(size < 3.0, "no batch of 3");
    }
}

/// Panics the first time it records.
#[derive(Default)]
struct PanicsOnce(std::sync::atomic::AtomicBool);

impl metrics::HistogramFn for PanicsOnce {
    fn record(&self, _: f64) {
        assert!(self.0.swap(true, Ordering::SeqCst), "first record");
    }
}

impl metrics::Recorder for Panicky {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }

    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        if self.is_it(key) {
            self.gauge.clone()
        } else {
            metrics::Gauge::noop()
        }
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if self.is_it(key) {
            self.histogram.clone()
        } else {
            metrics::Histogram::noop()
        }
    }
}

#[test]
fn a_batch_processor_that_stopped_is_restarted_for_the_next_batch() {
    let recorder = Panicky::histogram(telemetry::BATCH_SIZE, BatchesOfThreePanic);
    with_recorder_paused(&recorder, async {
        let (handler, batches) = Collect::new();
        let mut builder = Pipeline::builder("restart", handler)
            .processors(ProcessorOptions::new().concurrency(1))
            .batcher("default", batches_of(3, Duration::from_millis(1)));
        let ingress = builder.ingress(10);
        let pipeline = builder.start().unwrap();
        // The only batch processor stops, dropping its batch and freeing
        // the slots of its messages.
        for outcome in ingress.test_batch([1u64, 2, 3]).await {
            assert_failed_with(&outcome, "dropped");
        }
        // Its batcher restarts it with the next batch: the pipeline is healthy.
        assert!(pipeline.is_healthy(), "{:?}", pipeline.stopped_stages());
        // The next batch goes to a new one, and resizing does not wait for
        // the one that stopped.
        assert_eq!(ingress.test_message(4u64).await, Outcome::Succeeded);
        within_10s(
            pipeline.set_batcher_concurrency("default", 2),
            "the resize returned",
        )
        .await
        .unwrap();
        assert_eq!(pipeline.in_flight(), 0);
        // Round robin among idle ones: 40 goes to the first, and the
        // second stops. Shrinking drops it.
        assert_eq!(ingress.test_message(40u64).await, Outcome::Succeeded);
        let lost = ingress.test_batch([5u64, 6, 7]).await;
        assert!(lost.iter().all(|outcome| !outcome.is_success()), "{lost:?}");
        within_10s(
            pipeline.set_batcher_concurrency("default", 1),
            "the resize returned",
        )
        .await
        .unwrap();
        assert_eq!(pipeline.in_flight(), 0);
        assert_eq!(ingress.test_message(8u64).await, Outcome::Succeeded);
        assert_eq!(batches.seen.lock().unwrap().len(), 3);
        // One that stopped is not restarted by the drain.
        let lost = ingress.test_batch([9u64, 10, 11]).await;
        assert!(lost.iter().all(|outcome| !outcome.is_success()), "{lost:?}");
        assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
        assert_eq!(pipeline.in_flight(), 0);
    });
}

#[test]
fn a_processor_panicking_outside_its_handlers_keeps_its_place_and_frees_the_slots() {
    for partitioned in [false, true] {
        // Only processors time their handlers without batchers.
        let recorder = Panicky::histogram(telemetry::HANDLER_DURATION, PanicsOnce::default());
        with_recorder_paused(&recorder, async {
            let mut options = ProcessorOptions::new().concurrency(1);
            if partitioned {
                options = options.partition_by(|message| message.data);
            }
            let (ingress, pipeline, _) = ten_in_flight("processor-panics", options, None);
            let lost = ingress.test_message(1u64).await;
            assert_failed_with(&lost, "dropped");
            assert_eq!(pipeline.in_flight(), 0, "partitioned: {partitioned}");
            // The same processor takes the next message, with every slot.
            let outcomes = within_10s(
                ingress.test_batch(0..10u64),
                "a processor took the messages",
            )
            .await;
            assert!(outcomes.iter().all(Outcome::is_success), "{outcomes:?}");
            assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
            assert_eq!(pipeline.in_flight(), 0);
        });
    }
}

/// A tracing subscriber that panics on the first error logged from module
/// `target` (a stage's), outside anything that stage contains: its task stops.
struct FirstErrorPanics {
    target: &'static str,
    fired: std::sync::atomic::AtomicBool,
}

impl FirstErrorPanics {
    fn from(target: &'static str) -> Self {
        Self {
            target,
            fired: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl tracing::Subscriber for FirstErrorPanics {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let metadata = event.metadata();
        if *metadata.level() == tracing::Level::ERROR
            && metadata.target() == self.target
            && !self.fired.swap(true, Ordering::SeqCst)
        {
            panic!("the subscriber panicked");
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn a_processor_stopped_by_a_panic_is_restarted_in_its_place() {
    for partitioned in [false, true] {
        // Timing the handler panics first (contained: message 1 is lost),
        // then logging that loss does, which stops the processor's task.
        let recorder = Panicky::histogram(telemetry::HANDLER_DURATION, PanicsOnce::default());
        let subscriber = FirstErrorPanics::from("hermes_pipeline::processor_stage");
        tracing::subscriber::with_default(subscriber, || {
            with_recorder_paused(&recorder, async {
                // With partitioning, message 1 and the odd ones after it go
                // to the same processor.
                let options = if partitioned {
                    ProcessorOptions::new()
                        .concurrency(2)
                        .partition_by(|message| message.data % 2)
                } else {
                    ProcessorOptions::new().concurrency(1)
                };
                let (ingress, pipeline, _) = ten_in_flight("processor-restarts", options, None);
                let acks = Recorder::new();
                let tracked = acks.tracking();
                let lost = ingress.test_message(tracked(1)).await;
                assert_failed_with(&lost, "dropped");
                assert_eq!(pipeline.in_flight(), 0, "partitioned: {partitioned}");
                // Restarting (after a pause) counts as running.
                assert!(pipeline.is_healthy(), "{:?}", pipeline.stopped_stages());
                let ids = [3u64, 5, 7, 9, 11, 15, 17, 19, 20, 21];
                let outcomes = within_10s(
                    ingress.test_batch(ids.map(&tracked)),
                    "the restarted processor took the messages",
                )
                .await;
                assert!(outcomes.iter().all(Outcome::is_success), "{outcomes:?}");
                assert_eq!(pipeline.in_flight(), 0, "partitioned: {partitioned}");
                assert!(pipeline.is_healthy(), "{:?}", pipeline.stopped_stages());
                assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
                assert_eq!(pipeline.in_flight(), 0);
                // Each handled once and acknowledged once; the lost one not at all.
                let acked = acks.sorted_acks();
                let once: Vec<_> = ids.map(|id| (id, vec![Status::Ok])).into();
                assert_eq!(acked, once, "partitioned: {partitioned}");
            });
        });
    }
}

/// Why the messages of a batcher's open batches fail when a panic stops it.
const STOPPED_BY_A_PANIC: &str = "the batcher stopped by a panic before its batch was handled";

#[test]
fn a_batcher_stopped_by_a_panic_is_restarted_in_its_place() {
    // The only batch processor stops on its first batch (timing it panics);
    // the batcher logs that it restarts it as it sends the next batch, and
    // that log panics: the batcher's task stops with that batch in hand
    // (lost) and another open (acknowledged as failed).
    let recorder = Panicky::histogram(telemetry::BATCH_SIZE, PanicsOnce::default());
    let subscriber = FirstErrorPanics::from("hermes_pipeline::batcher_stage");
    tracing::subscriber::with_default(subscriber, || {
        with_recorder_paused(&recorder, async {
            let (ingress, pipeline, batches) = ten_in_flight(
                "batcher-restarts",
                ProcessorOptions::new().concurrency(1),
                Some(batches_of(3, Duration::from_secs(3600))),
            );
            let acks = Recorder::new();
            let tracked = acks.tracking();
            let keyed = |id| {
                let mut message = tracked(id);
                message.put_batch_key("open");
                message
            };
            for outcome in ingress.test_batch([1, 2, 3].map(&tracked)).await {
                assert_failed_with(&outcome, "dropped");
            }
            assert_eq!(pipeline.in_flight(), 0);
            // 100 waits in an open batch (for an hour) as the batch of 4, 5
            // and 6 closes and the batcher stops sending it: that batch, in
            // hand, is lost; the open one fails.
            let outcomes = ingress
                .test_batch([tracked(4), tracked(5), keyed(100), tracked(6)])
                .await;
            for outcome in [&outcomes[0], &outcomes[1], &outcomes[3]] {
                assert_failed_with(outcome, "dropped");
            }
            assert_failed_with(&outcomes[2], STOPPED_BY_A_PANIC);
            assert_eq!(pipeline.in_flight(), 0);
            // Restarting (after a pause) counts as running.
            assert!(pipeline.is_healthy(), "{:?}", pipeline.stopped_stages());
            assert_eq!(pipeline.stopped_stages(), vec![]);
            // The restarted batcher batches the next messages, restarting
            // its batch processor, and keeps its keyed batches apart.
            let outcomes = within_10s(
                ingress.test_batch([7, 8, 9].map(&tracked)),
                "the restarted batcher took the messages",
            )
            .await;
            assert!(outcomes.iter().all(Outcome::is_success), "{outcomes:?}");
            assert_eq!(pipeline.in_flight(), 0);
            assert!(pipeline.is_healthy(), "{:?}", pipeline.stopped_stages());
            let open = ingress.try_push_tracked(keyed(200)).unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert_eq!(pipeline.in_flight(), 1);
            // The drain flushes it.
            assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
            assert_eq!(open.await, Outcome::Succeeded);
            assert_eq!(pipeline.in_flight(), 0);
            // Each acknowledged once; the lost ones not at all.
            let acked = acks.sorted_acks();
            let mut once: Vec<_> = [7, 8, 9].map(|id| (id, vec![Status::Ok])).into();
            once.push((100, vec![Status::Failed(STOPPED_BY_A_PANIC.into())]));
            once.push((200, vec![Status::Ok]));
            assert_eq!(acked, once);
            let mut handled: Vec<Vec<u64>> = (batches.triggers_and_ids().into_iter())
                .map(|(_, ids)| ids)
                .collect();
            handled.sort_unstable();
            assert_eq!(handled, vec![vec![7, 8, 9], vec![200]]);
        });
    });
}

#[test]
fn a_batcher_stopped_by_a_panic_after_the_drain_deadline_still_fails_its_open_batches() {
    // As above, the batch processor stops on its first batch, and the
    // batcher's log of restarting it panics. The batcher is held past the
    // drain's deadline acknowledging 50 (its size_of panics; its
    // acknowledger is slow), then flushes: the default batch (4) goes
    // first, and the panic stops the batcher, not restarted, with 100 open.
    let recorder = Panicky::histogram(telemetry::BATCH_SIZE, PanicsOnce::default());
    let subscriber = FirstErrorPanics::from("hermes_pipeline::batcher_stage");
    tracing::subscriber::with_default(subscriber, || {
        with_recorder_paused(&recorder, async {
            let size_of = |message: &Message<u64>| {
                assert_ne!(message.data, 50, "no size for 50");
                1
            };
            let (ingress, pipeline, _) = ten_in_flight(
                "batcher-stops-late",
                ProcessorOptions::new().concurrency(1),
                Some(batches_of(3, Duration::from_secs(3600)).max_batch_bytes(100, size_of)),
            );
            let acks = Recorder::new();
            let tracked = acks.tracking();
            for outcome in ingress.test_batch([1, 2, 3].map(&tracked)).await {
                assert_failed_with(&outcome, "dropped");
            }
            let mut open = tracked(100);
            open.put_batch_key("open");
            let slow = Message::new(50)
                .with_acknowledger(
                    Arc::new(SlowAcknowledger(Recorder::default())) as Arc<dyn Acknowledger<u64>>
                );
            let completions: Vec<_> = [open, tracked(4), slow]
                .into_iter()
                .map(|message| ingress.try_push_tracked(message).unwrap())
                .collect();
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert_eq!(pipeline.in_flight(), 3);
            assert!(pipeline.drain(Duration::from_millis(10)).await.forced);
            let [open, lost, slow] = <[_; 3]>::try_from(completions).unwrap();
            assert_failed_with(&slow.await, "size_of panicked");
            assert_failed_with(&lost.await, "dropped");
            assert_failed_with(&open.await, STOPPED_BY_A_PANIC);
            assert_eq!(pipeline.in_flight(), 0);
            let batcher = StoppedStage::Batcher("default".into());
            assert!(pipeline.stopped_stages().contains(&batcher));
            // The open batch's message failed once; the lost ones not at all.
            let acked = acks.sorted_acks();
            let once = vec![(100, vec![Status::Failed(STOPPED_BY_A_PANIC.into())])];
            assert_eq!(acked, once);
        });
    });
}

/// Panics on a second or more: only a handler held that long records it.
struct SlowPanics;

impl metrics::HistogramFn for SlowPanics {
    fn record(&self, seconds: f64) {
        assert!(seconds < 1.0, "a handler took a second");
    }
}

#[test]
fn a_batch_processor_stopping_after_its_batcher_frees_the_slots_of_its_batch() {
    let recorder = Panicky::histogram(telemetry::HANDLER_DURATION, SlowPanics);
    with_recorder_paused(&recorder, async {
        let (handler, batches, gate) = Collect::gated();
        let mut builder = Pipeline::builder("stops-last", handler)
            .processors(ProcessorOptions::new().concurrency(1))
            .batcher("default", batches_of(10, Duration::from_secs(3600)));
        let ingress = builder.ingress(10);
        let pipeline = builder.start().unwrap();
        let completions = push_tracked(&ingress, 1..=3);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(pipeline.in_flight(), 3);
        // The drain flushes the open batch to the only batch processor,
        // which holds it at the gate while the batcher stops, then stops
        // itself, timing the batch handler.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            gate.add_permits(1);
        });
        assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
        for outcome in futures::future::join_all(completions).await {
            assert_failed_with(&outcome, "dropped");
        }
        assert_eq!(batches.seen.lock().unwrap().len(), 1);
        assert_eq!(pipeline.in_flight(), 0);
    });
}

/// An in-flight gauge that panics whenever it goes down.
struct DecrementPanics;

impl metrics::GaugeFn for DecrementPanics {
    fn increment(&self, _: f64) {}

    fn decrement(&self, _: f64) {
        panic!("the in-flight gauge went down");
    }

    fn set(&self, _: f64) {}
}

/// A `Collect` pipeline named `name`, with `processors`, room for 10
/// messages in flight and `batcher`, if any, as its default batcher; fed by
/// the returned ingress, of 10.
fn ten_in_flight(
    name: &str,
    processors: ProcessorOptions<u64>,
    batcher: Option<BatcherOptions<u64>>,
) -> (Ingress<u64>, Pipeline<Collect>, Arc<Batches>) {
    let (handler, batches) = Collect::new();
    let mut builder = Pipeline::builder(name, handler)
        .processors(processors)
        .max_in_flight(10);
    if let Some(batcher) = batcher {
        builder = builder.batcher("default", batcher);
    }
    let ingress = builder.ingress(10);
    let pipeline = builder.start().unwrap();
    (ingress, pipeline, batches)
}

#[test]
fn a_panicking_in_flight_gauge_leaks_no_slot() {
    for batched in [false, true] {
        let recorder = Panicky::gauge(telemetry::IN_FLIGHT, DecrementPanics);
        with_recorder_paused(&recorder, async {
            let processors = ProcessorOptions::new().concurrency(1);
            let batcher = batched.then(|| batches_of(10, Duration::from_millis(1)));
            let (ingress, pipeline, _) = ten_in_flight("gauge-panics", processors, batcher);
            // Every acknowledgement panics as it frees the slots, after
            // the completions resolved; the stage acknowledging frees them
            // anyway, though the gauge panics again. The second round
            // needs every slot.
            for _ in 0..2 {
                within_10s(ingress.test_batch(0..10u64), "every slot was free").await;
                assert_eq!(pipeline.in_flight(), 0, "batched: {batched}");
            }
            assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
            assert_eq!(pipeline.in_flight(), 0);
        });
    }
}

/// An in-flight gauge that panics whenever it goes up.
struct IncrementPanics;

impl metrics::GaugeFn for IncrementPanics {
    fn increment(&self, _: f64) {
        panic!("the in-flight gauge went up");
    }

    fn decrement(&self, _: f64) {}

    fn set(&self, _: f64) {}
}

#[test]
fn a_panicking_in_flight_gauge_loses_no_produced_message() {
    for batched in [false, true] {
        let recorder = Panicky::gauge(telemetry::IN_FLIGHT, IncrementPanics);
        with_recorder_paused(&recorder, async {
            let processors = ProcessorOptions::new().concurrency(1);
            let batcher = batched.then(|| batches_of(10, Duration::from_millis(1)));
            let (ingress, pipeline, batches) =
                ten_in_flight("gauge-panics-up", processors, batcher);
            let acks = Recorder::new();
            let tracked = acks.tracking();
            // The gauge panics each time the producer stage admits messages
            // it was handed: they go on all the same, and the second round
            // needs every slot back.
            for round in 0..2u64 {
                // From 20 on: the handler fails 13.
                let ids = 20 + round * 10..30 + round * 10;
                let outcomes = within_10s(
                    ingress.test_batch(ids.map(&tracked)),
                    "every message was acknowledged",
                )
                .await;
                assert!(
                    outcomes.iter().all(Outcome::is_success),
                    "batched: {batched}: {outcomes:?}"
                );
                assert_eq!(pipeline.in_flight(), 0, "batched: {batched}");
            }
            assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
            let acked = acks.sorted_acks();
            let once: Vec<_> = (20..40u64).map(|id| (id, vec![Status::Ok])).collect();
            assert_eq!(acked, once, "batched: {batched}");
            if batched {
                let mut handled: Vec<u64> = batches
                    .seen
                    .lock()
                    .unwrap()
                    .iter()
                    .flat_map(|(.., ids)| ids.clone())
                    .collect();
                handled.sort_unstable();
                assert_eq!(handled, (20..40).collect::<Vec<_>>());
            }
            assert_eq!(pipeline.in_flight(), 0);
        });
    }
}

#[test]
fn a_batcher_panicking_on_every_chunk_is_restarted_each_time() {
    // The batcher's queue-depth gauge goes down as it takes a chunk: a
    // panic there is outside what the batcher contains.
    let recorder =
        Panicky::gauge(telemetry::QUEUE_DEPTH, DecrementPanics).of_stage("batcher:default");
    with_recorder_paused(&recorder, async {
        let (handler, _) = Collect::new();
        let mut builder = Pipeline::builder("batcher-panics", handler)
            .processors(ProcessorOptions::new().concurrency(2))
            .batcher("default", batches_of(10, Duration::from_millis(1)));
        let ingress = builder.ingress(10);
        let pipeline = builder.start().unwrap();
        assert!(pipeline.is_healthy(), "{:?}", pipeline.stopped_stages());
        // Resizing the processors keeps every index below the count alive.
        for concurrency in [4, 1, 3] {
            pipeline.set_processor_concurrency(concurrency).unwrap();
            assert_eq!(pipeline.stopped_stages(), vec![], "{concurrency}");
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert_eq!(pipeline.stopped_stages(), vec![], "{concurrency}");
        }
        // The batcher stops with each message it is handed, freeing its
        // slot, and is restarted each time (after a longer pause): it
        // counts as running throughout.
        for id in 1..=3u64 {
            let lost = within_10s(ingress.test_message(id), "the batcher took it").await;
            assert_failed_with(&lost, "dropped");
            assert_eq!(pipeline.in_flight(), 0);
            assert!(pipeline.is_healthy(), "{:?}", pipeline.stopped_stages());
            assert!(pipeline.is_running());
        }
        pipeline.shutdown();
        assert!(!pipeline.is_healthy(), "draining");
        assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
        assert_eq!(pipeline.in_flight(), 0);
        // Stopped with the rest by the drain.
        let batcher = StoppedStage::Batcher("default".into());
        assert!(pipeline.stopped_stages().contains(&batcher));
        assert_eq!(batcher.to_string(), r#"batcher "default""#);
    });
}

#[tokio::test]
async fn a_producer_that_stopped_makes_the_pipeline_unhealthy() {
    let (handler, _) = Collect::new();
    let mut builder = Pipeline::builder("producer-stops", handler)
        .producer(PanicsWhenReady(Arc::default()))
        .processors(
            ProcessorOptions::new()
                .concurrency(2)
                .partition_by(|m| m.data),
        );
    let ingress = builder.ingress(10);
    let pipeline = builder.start().unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let producer = pipeline.topology().producers[0].clone();
    assert_eq!(
        pipeline.stopped_stages(),
        vec![StoppedStage::Producer(producer)]
    );
    assert!(!pipeline.is_healthy());
    // The ingress goes on.
    assert_eq!(ingress.test_message(1u64).await, Outcome::Succeeded);
    assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
    assert!(!pipeline.is_running());
    let stopped = pipeline.stopped_stages();
    assert!(stopped.contains(&StoppedStage::Processor(1)), "{stopped:?}");
    assert_eq!(stopped.len(), 4, "{stopped:?}");
}

#[tokio::test(start_paused = true)]
async fn try_push_reports_full_at_capacity_and_succeeds_once_drained() {
    let (handler, _, gate) = Collect::gated();
    let mut builder = Pipeline::builder("full", handler)
        .processors(ProcessorOptions::new().concurrency(1).max_demand(2))
        .batcher("default", batches_of(2, Duration::from_millis(1)))
        .max_in_flight(2);
    let ingress = builder.ingress(3);
    let pipeline = builder.start().unwrap();

    // Two messages fill the pipeline (held in the gated batch), three the buffer.
    let mut completions = Vec::new();
    for n in 0..5u64 {
        completions.push(ingress.try_push_tracked(n).unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(pipeline.in_flight(), 2);
    let refused = ingress.try_push(99u64).unwrap_err();
    assert!(matches!(refused, PushError::Full(_)));
    assert_eq!(
        refused.into_message().data,
        99,
        "the refused message is handed back"
    );

    gate.add_permits(100);
    for completion in completions {
        assert_eq!(completion.await, Outcome::Succeeded);
    }
    assert!(ingress.try_push(100u64).is_ok(), "room again once drained");
}

/// Never finishes a batch: for the drain deadline.
struct Stuck;
impl Handler for Stuck {
    type Data = u64;
    async fn handle_message(&self, _: &mut Message<u64>, _: &ProcessorContext) {}
    async fn handle_batch(&self, _: &mut [Message<u64>], _: &BatchInfo) {
        std::future::pending::<()>().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_flushes_partial_batches_and_acknowledges_everything() {
    const ENDLESS: u64 = 1 << 40;
    let (handler, batches) = Collect::new();
    let recorder = Recorder::new();
    let pipeline = Pipeline::builder("drain", handler)
        .producer(Numbered::new(ENDLESS, 500, recorder.clone(), |id| id))
        .batcher("default", batches_of(7, Duration::from_secs(3600)))
        .batcher("big", BatcherOptions::new().batch_size(7))
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let drained = pipeline.drain(Duration::from_secs(10)).await;
    assert!(!drained.forced);
    assert!(!pipeline.is_running());
    let acked = recorder.acked() as u64;
    assert!(
        acked > 0 && acked < ENDLESS,
        "stopped asking the producer ({acked})"
    );
    recorder.assert_exactly_once(acked);
    let failed = recorder.failed();
    let expected = usize::from(acked > 13) + usize::from(acked > 666);
    assert_eq!(failed.len(), expected, "{failed:?}");
    let batched: usize = batches
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|batch| batch.3.len())
        .sum();
    assert_eq!(
        batched as u64 + recorder.failed().len() as u64,
        acked,
        "every success went through a batch"
    );
}

#[tokio::test(start_paused = true)]
async fn drain_flushes_partial_batches_without_waiting_for_their_timeout() {
    let (handler, batches) = Collect::new();
    let mut builder = Pipeline::builder("flush", handler)
        .batcher("default", batches_of(10, Duration::from_secs(3600)));
    let ingress = builder.ingress(10);
    let pipeline = builder.start().unwrap();
    let completions = push_tracked(&ingress, 0..3);
    tokio::task::yield_now().await;

    let started = Instant::now();
    assert!(!pipeline.drain(Duration::from_secs(10)).await.forced);
    assert_eq!(started.elapsed(), Duration::ZERO);
    for completion in completions {
        assert_eq!(completion.await, Outcome::Succeeded);
    }
    assert_eq!(
        batches.triggers_and_ids(),
        vec![(BatchTrigger::Flush, vec![0, 1, 2])]
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_flushes_a_partial_batch_holding_the_slots_its_producer_waits_for() {
    let (handler, batches) = Collect::new();
    // The producer is asked again only once 2 slots are free.
    let mut builder = Pipeline::builder("drain-stall", handler)
        .processors(ProcessorOptions::new().concurrency(1).max_demand(4))
        .batcher("default", batches_of(4, Duration::from_secs(3600)))
        .max_in_flight(4);
    let ingress = builder.ingress(10);
    let pipeline = builder.start().unwrap();
    let completions = push_tracked(&ingress, 0..3);
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Three slots held by the open batch, one free.
    assert_eq!(pipeline.in_flight(), 3);

    let started = Instant::now();
    assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
    assert_eq!(started.elapsed(), Duration::ZERO);
    for completion in completions {
        assert_eq!(completion.await, Outcome::Succeeded);
    }
    assert_eq!(
        batches.triggers_and_ids(),
        vec![(BatchTrigger::Flush, vec![0, 1, 2])]
    );
    assert_eq!(pipeline.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn partial_batches_flush_when_the_drain_starts_not_when_producers_end() {
    let (handler, batches) = Collect::new();
    let mut builder = Pipeline::builder("flush-at-start", handler)
        .producer(NeverFinishes)
        .processors(ProcessorOptions::new().concurrency(1))
        .batcher("default", batches_of(10, Duration::from_secs(3600)));
    let ingress = builder.ingress(10);
    let pipeline = builder.start().unwrap();
    let completions = push_tracked(&ingress, 0..3);
    tokio::time::sleep(Duration::from_millis(10)).await;

    // The other producer keeps the drain going until its deadline, but the
    // open batch goes at once.
    let drain = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.drain(Duration::from_secs(5)).await }
    });
    let started = Instant::now();
    for completion in completions {
        assert_eq!(completion.await, Outcome::Succeeded);
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(pipeline.is_running());
    assert!(drain.await.unwrap().forced);
    assert_eq!(
        batches.triggers_and_ids(),
        vec![(BatchTrigger::Flush, vec![0, 1, 2])]
    );
}

/// Takes ten seconds over the batch holding message 0, no time over others.
struct SlowOverZero;

impl Handler for SlowOverZero {
    type Data = u64;

    async fn handle_message(&self, _: &mut Message<u64>, _: &ProcessorContext) {}

    async fn handle_batch(&self, batch: &mut [Message<u64>], _: &BatchInfo) {
        if batch.iter().any(|message| message.data == 0) {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_draining_producer_is_asked_as_soon_as_one_slot_is_free() {
    // Running, the producer is asked again only once 2 slots are free.
    let mut builder = Pipeline::builder("drain-any-slot", SlowOverZero)
        .processors(ProcessorOptions::new().concurrency(1).max_demand(4))
        .batcher(
            "default",
            batches_of(3, Duration::from_secs(3600)).concurrency(2),
        )
        .max_in_flight(4);
    let ingress = builder.ingress(10);
    let pipeline = builder.start().unwrap();
    let slow = push_tracked(&ingress, 0..3);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let last = ingress.try_push_tracked(3u64).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The slow batch holds 3 slots: the free one is too few to ask the ingress.
    assert_eq!(pipeline.in_flight(), 3);

    let drain = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.drain(Duration::from_secs(5)).await }
    });
    let started = Instant::now();
    assert_eq!(last.await, Outcome::Succeeded);
    assert_eq!(started.elapsed(), Duration::ZERO);
    // The slow batch outlasts the deadline.
    assert!(drain.await.unwrap().forced);
    for completion in slow {
        assert_failed_with(&completion.await, "deadline");
    }
    assert_eq!(pipeline.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn at_the_drain_deadline_what_remains_is_acknowledged_as_failed() {
    let recorder = Recorder::new();
    let pipeline = Pipeline::builder("deadline", Stuck)
        .producer(Numbered::new(50, 100, recorder.clone(), |id| id))
        .batcher("default", batches_of(10, Duration::from_millis(1)))
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = Instant::now();
    let drained = pipeline.drain(Duration::from_secs(2)).await;
    assert!(drained.forced);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    recorder.assert_exactly_once(50);
    let failed = recorder.failed();
    assert_eq!(failed.len(), 50);
    assert!(failed.values().all(|reason| reason.contains("deadline")));
}

#[tokio::test(start_paused = true)]
async fn at_the_drain_deadline_an_ingress_backlog_is_failed_not_waited_for() {
    let (handler, _) = Collect::new();
    let mut builder = Pipeline::builder("deadline-backlog", handler)
        .processors(ProcessorOptions::new().concurrency(1).max_demand(1))
        .rate_limit(RateLimit::new(1, Duration::from_secs(1)));
    let ingress = builder.ingress(20);
    let pipeline = builder.start().unwrap();
    let completions = push_tracked(&ingress, 0..20);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // At one message a second, the backlog would take 18 more seconds.
    let started = Instant::now();
    let drained = pipeline.drain(Duration::from_secs(1)).await;
    assert!(drained.forced);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    let outcomes = futures::future::join_all(completions).await;
    let succeeded = outcomes.iter().filter(|o| o.is_success()).count();
    assert!((2..=3).contains(&succeeded), "{outcomes:?}");
    for outcome in &outcomes[succeeded..] {
        assert_failed_with(outcome, "deadline");
    }
}

/// Asks to be drained until it finishes, and never does.
struct NeverFinishes;

impl Producer<u64> for NeverFinishes {
    async fn produce(&mut self, _demand: usize) -> Produced<u64> {
        std::future::pending().await
    }

    fn prepare_for_draining(&mut self) -> Draining {
        Draining::UntilFinished
    }
}

#[tokio::test(start_paused = true)]
async fn the_drain_ends_at_its_deadline_even_if_a_producer_never_finishes() {
    let (handler, _) = Collect::new();
    let pipeline = Pipeline::builder("never-finishes", handler)
        .producer(NeverFinishes)
        .start()
        .unwrap();
    let started = Instant::now();
    let drained = pipeline.drain(Duration::from_secs(3)).await;
    assert!(drained.forced);
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

/// Always has `demand` messages ready, and asks to be drained until it
/// finishes, which it never does (like a channel whose senders live on).
struct NeverRunsDry {
    produced: Arc<AtomicUsize>,
    recorder: Arc<Recorder>,
}

impl Producer<u64> for NeverRunsDry {
    async fn produce(&mut self, demand: usize) -> Produced<u64> {
        let first = self.produced.fetch_add(demand, Ordering::SeqCst) as u64;
        let acknowledger: Arc<dyn Acknowledger<u64>> = self.recorder.clone();
        let messages = (first..first + demand as u64)
            .map(|id| Message::new(id).with_acknowledger(acknowledger.clone()))
            .collect();
        Produced::Messages(messages)
    }

    fn prepare_for_draining(&mut self) -> Draining {
        Draining::UntilFinished
    }
}

#[test]
fn at_the_drain_deadline_a_producer_that_never_runs_dry_gives_up_at_most_max_in_flight() {
    let produced = Arc::new(AtomicUsize::new(0));
    let recorder = Recorder::new();
    let producer = NeverRunsDry {
        produced: produced.clone(),
        recorder: recorder.clone(),
    };
    // On its own thread: a drain that never returns must fail the test, not hang it.
    let (done, drained) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let pipeline = Pipeline::builder("never-dry", Stuck)
                .producer(producer)
                .processors(ProcessorOptions::new().concurrency(1).max_demand(10))
                .batcher("default", BatcherOptions::new().batch_size(10))
                .max_in_flight(50)
                .start()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            let started = Instant::now();
            let drained = pipeline.drain(Duration::from_secs(1)).await;
            let _ = done.send((drained, started.elapsed(), pipeline.in_flight()));
        });
    });
    let (drained, took, in_flight) = drained
        .recv_timeout(Duration::from_secs(60))
        .expect("the drain did not return");
    assert!(drained.forced);
    assert_eq!(took, Duration::from_secs(1));
    assert_eq!(in_flight, 0);
    // 50 stuck in flight, then at most 50 more taken and failed at the deadline.
    let produced = produced.load(Ordering::SeqCst);
    assert_eq!(produced, 100);
    recorder.assert_exactly_once(produced as u64);
    let failed = recorder.failed();
    assert_eq!(failed.len(), produced);
    assert!(failed.values().all(|reason| reason.contains("deadline")));
}

#[tokio::test(start_paused = true)]
async fn draining_processes_what_the_ingress_accepted_and_then_refuses() {
    let (handler, _) = Collect::new();
    let mut builder = Pipeline::builder("ingress-drain", handler)
        .processors(ProcessorOptions::new().concurrency(1).max_demand(1))
        .max_in_flight(1);
    let ingress = builder.ingress(10);
    let pipeline = builder.start().unwrap();
    let completions = push_tracked(&ingress, 0..10);
    pipeline.shutdown();
    for completion in completions {
        assert_eq!(completion.await, Outcome::Succeeded);
    }
    pipeline.join().await;
    assert!(matches!(ingress.try_push(1u64), Err(PushError::Closed(_))));
}

/// Takes ten seconds over `handle_failed`.
struct SlowToFail;

impl Handler for SlowToFail {
    type Data = u64;

    async fn handle_message(&self, _: &mut Message<u64>, _: &ProcessorContext) {}

    async fn handle_failed(&self, _: &mut [Message<u64>], _: FailedIn) {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_ingress_refuses_pushes_as_soon_as_the_drain_starts() {
    // A message partition_by panics on is failed by its producer stage,
    // which waits for handle_failed: it cannot close its ingress meanwhile.
    let mut builder = Pipeline::builder("refuse-at-once", SlowToFail).processors(
        ProcessorOptions::new()
            .concurrency(1)
            .partition_by(|message| {
                assert_ne!(message.data, 13, "no partition for 13");
                0
            }),
    );
    let ingress = builder.ingress(10);
    let other = ingress.clone();
    let pipeline = builder.start().unwrap();
    let failed = ingress.try_push_tracked(13u64).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The buffer is full: a push waits for room.
    for n in 0..10u64 {
        ingress.try_push(n).unwrap();
    }
    let waiting = tokio::spawn(async move { other.push(99u64).await });
    tokio::time::sleep(Duration::from_millis(10)).await;

    pipeline.shutdown();
    assert!(ingress.is_closed());
    let refused = ingress.try_push(100u64).unwrap_err();
    assert!(matches!(refused, PushError::Closed(_)), "{refused:?}");
    let refused = waiting.await.unwrap().unwrap_err();
    assert!(matches!(&refused, PushError::Closed(_)), "{refused:?}");
    assert_eq!(refused.into_message().data, 99, "handed back");
    // What was accepted before is still processed.
    assert!(!failed.await.is_success());
    pipeline.join().await;
    assert_eq!(pipeline.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_holds_and_can_change_while_running() {
    let (handler, _) = Collect::new();
    let recorder = Recorder::new();
    let pipeline = Pipeline::builder("rate", handler)
        .producer(Numbered::new(1_000_000, 1000, recorder.clone(), |id| {
            id + 2000
        }))
        .rate_limit(RateLimit::new(100, Duration::from_secs(1)))
        .start()
        .unwrap();
    // Just inside each window: 100 per started second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(recorder.acked(), 300);

    pipeline
        .set_rate_limit(Some(RateLimit::new(10, Duration::from_secs(1))))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(recorder.acked(), 300 + 20);
    assert_eq!(
        pipeline.topology().rate_limit,
        Some(RateLimit::new(10, Duration::from_secs(1)))
    );
    assert!(
        pipeline
            .set_rate_limit(Some(RateLimit::new(0, Duration::from_secs(1))))
            .is_err()
    );
    pipeline.drain(Duration::from_secs(1)).await;
}

/// Counts the messages handled.
struct Tally(Arc<AtomicUsize>);

impl Handler for Tally {
    type Data = u64;

    async fn handle_message(&self, _: &mut Message<u64>, _: &ProcessorContext) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn no_rate_limit_window_lets_more_through_after_producers_idled() {
    let handled = Arc::new(AtomicUsize::new(0));
    let (first_tx, first) = WaitsInProduce::new();
    let (second_tx, second) = WaitsInProduce::new();
    let pipeline = Pipeline::builder("rate-idle", Tally(handled.clone()))
        .producer(first)
        .producer(second)
        .processors(ProcessorOptions::new().concurrency(1).max_demand(100))
        .rate_limit(RateLimit::new(100, Duration::from_secs(1)))
        .start()
        .unwrap();
    // Both producers are asked for 100 in the first windows, then wait in
    // `produce` with none.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for tx in [&first_tx, &second_tx] {
        for n in 0..300u64 {
            tx.send(Message::new(n)).unwrap();
        }
    }
    // Both answer at once: a window starts with the burst, and each lets
    // exactly 100 through.
    for window in 1..=6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            handled.load(Ordering::SeqCst),
            100 * window,
            "window {window}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!pipeline.drain(Duration::from_secs(1)).await.forced);
}

#[tokio::test(start_paused = true)]
async fn a_new_rate_limit_applies_to_a_producer_already_asked() {
    let handled = Arc::new(AtomicUsize::new(0));
    let recorder = Recorder::new();
    let (tx, producer) = WaitsInProduce::new();
    let pipeline = Pipeline::builder("rate-change", Tally(handled.clone()))
        .producer(producer)
        .processors(ProcessorOptions::new().concurrency(1).max_demand(100))
        .rate_limit(RateLimit::new(100, Duration::from_secs(1)))
        .start()
        .unwrap();
    // The producer is asked for 100 under the old limit, and waits in `produce`.
    tokio::time::sleep(Duration::from_millis(500)).await;
    pipeline
        .set_rate_limit(Some(RateLimit::new(10, Duration::from_secs(1))))
        .unwrap();
    let acknowledger: Arc<dyn Acknowledger<u64>> = recorder.clone();
    for n in 0..100u64 {
        tx.send(Message::new(n).with_acknowledger(acknowledger.clone()))
            .unwrap();
    }
    // It answers with all 100 at once; 10 go through in each window.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(handled.load(Ordering::SeqCst), 10);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handled.load(Ordering::SeqCst), 20);
    // At the drain deadline, what waits for the rate limit fails.
    assert!(pipeline.drain(Duration::from_secs(2)).await.forced);
    assert_eq!(handled.load(Ordering::SeqCst), 40);
    recorder.assert_exactly_once(100);
    let failed = recorder.failed();
    assert_eq!(failed.len(), 60);
    assert!(failed.values().all(|reason| reason.contains("deadline")));
}

#[tokio::test(start_paused = true)]
async fn setting_a_rate_limit_mid_window_keeps_what_the_window_let_through() {
    let handled = Arc::new(AtomicUsize::new(0));
    let recorder = Recorder::new();
    let pipeline = Pipeline::builder("rate-reapply", Tally(handled.clone()))
        .producer(Numbered::new(1_000_000, 1000, recorder.clone(), |id| id))
        .processors(ProcessorOptions::new().concurrency(1).max_demand(100))
        .rate_limit(RateLimit::new(100, Duration::from_secs(1)))
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(handled.load(Ordering::SeqCst), 100);
    // The same limit again (a controller re-applying it on a timer), then
    // lowered and raised back: the first window lets nothing more through.
    for allowed in [100, 10, 100] {
        pipeline
            .set_rate_limit(Some(RateLimit::new(allowed, Duration::from_secs(1))))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(handled.load(Ordering::SeqCst), 100, "after {allowed}/s");
    }
    // The next window starts when the first would have ended.
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert_eq!(handled.load(Ordering::SeqCst), 200);
    pipeline.drain(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn idle_ingresses_leave_their_slots_to_other_producers() {
    let handled = Arc::new(AtomicUsize::new(0));
    let recorder = Recorder::new();
    let mut builder = Pipeline::builder("idle-ingresses", Tally(handled.clone()))
        .processors(ProcessorOptions::new().concurrency(1).max_demand(100))
        .max_in_flight(150);
    // Were they asked while empty, these two would hold all 150 slots.
    let ingresses = [builder.ingress(10), builder.ingress(10)];
    let producer = Numbered::new(1000, 150, recorder.clone(), |id| id);
    let violations = producer.violations.clone();
    let pipeline = builder.producer(producer).start().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(recorder.acked(), 1000);
    assert!(violations.lock().unwrap().is_empty());
    for ingress in &ingresses {
        assert!(ingress.test_message(7u64).await.is_success());
    }
    assert_eq!(handled.load(Ordering::SeqCst), 1002);
    // Once every handle is dropped, the waiting ingresses finish.
    drop(ingresses);
    within_10s(
        pipeline.join(),
        "the pipeline ends once its producers are done",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn idle_streams_leave_their_slots_to_other_producers() {
    let handled = Arc::new(AtomicUsize::new(0));
    let recorder = Recorder::new();
    let (first_tx, first) = futures::channel::mpsc::unbounded::<u64>();
    let (second_tx, second) = futures::channel::mpsc::unbounded::<u64>();
    let producer = Numbered::new(1000, 150, recorder.clone(), |id| id);
    let violations = producer.violations.clone();
    // Were they asked while empty, these two streams would hold all 150 slots.
    let pipeline = Pipeline::builder("idle-streams", Tally(handled.clone()))
        .producer(StreamProducer::from_data(first))
        .producer(StreamProducer::from_data(second))
        .producer(producer)
        .processors(ProcessorOptions::new().concurrency(1).max_demand(100))
        .max_in_flight(150)
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(recorder.acked(), 1000);
    assert!(violations.lock().unwrap().is_empty());
    for tx in [&first_tx, &second_tx] {
        tx.unbounded_send(7).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(handled.load(Ordering::SeqCst), 1002);
    // Once the streams end, so does the pipeline.
    drop((first_tx, second_tx));
    within_10s(
        pipeline.join(),
        "the pipeline ends once its producers are done",
    )
    .await;
}

/// Holds every message until let through, counting the processors busy at once
/// and the indices they run under.
struct Turnstile(Arc<Counts>);

struct Counts {
    gate: tokio::sync::Semaphore,
    busy: AtomicUsize,
    peak_busy: AtomicUsize,
    indices: Mutex<std::collections::BTreeSet<usize>>,
}

impl Handler for Turnstile {
    type Data = u64;

    async fn handle_message(&self, _: &mut Message<u64>, context: &ProcessorContext) {
        let counts = &self.0;
        counts.indices.lock().unwrap().insert(context.processor);
        let busy = counts.busy.fetch_add(1, Ordering::SeqCst) + 1;
        counts.peak_busy.fetch_max(busy, Ordering::SeqCst);
        counts.gate.acquire().await.unwrap().forget();
        counts.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn shrinking_then_regrowing_the_processors_never_runs_more_than_asked() {
    let turnstile = Arc::new(Counts {
        gate: tokio::sync::Semaphore::new(0),
        busy: AtomicUsize::new(0),
        peak_busy: AtomicUsize::new(0),
        indices: Mutex::default(),
    });
    let mut builder = Pipeline::builder("regrow", Turnstile(turnstile.clone()))
        .processors(ProcessorOptions::new().concurrency(4).max_demand(1));
    let ingress = builder.ingress(64);
    let pipeline = builder.start().unwrap();
    let mut completions = push_tracked(&ingress, 0..4);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(turnstile.busy.load(Ordering::SeqCst), 4);

    // Processors 2 and 3 are mid-message: they retire only once it is done,
    // and the regrow finds them still running.
    pipeline.set_processor_concurrency(2).unwrap();
    pipeline.set_processor_concurrency(4).unwrap();
    completions.extend(push_tracked(&ingress, 4..40));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(turnstile.peak_busy.load(Ordering::SeqCst), 4);

    turnstile.gate.add_permits(1_000);
    for completion in completions {
        assert_eq!(completion.await, Outcome::Succeeded);
    }
    assert_eq!(turnstile.peak_busy.load(Ordering::SeqCst), 4);
    assert_eq!(*turnstile.indices.lock().unwrap(), (0..4).collect());
    assert_eq!(pipeline.topology().processors.concurrency, 4);
}

#[tokio::test]
async fn concurrency_changes_while_running_and_topology_shows_it() {
    let (handler, _) = Collect::new();
    let mut builder = Pipeline::builder("resize", handler)
        .processors(
            ProcessorOptions::new()
                .concurrency(2)
                .max_demand(8)
                .min_demand(2),
        )
        .batcher(
            "default",
            batches_of(4, Duration::from_millis(5)).concurrency(1),
        );
    let ingress = builder.ingress(64);
    let pipeline = builder.start().unwrap();
    let topology = pipeline.topology();
    assert_eq!(
        topology.processors,
        ProcessorsTopology {
            concurrency: 2,
            max_demand: 8,
            min_demand: 2,
            partitioned: false
        }
    );
    assert_eq!(topology.batchers[0].concurrency, 1);
    assert_eq!(topology.producers, vec!["ingress_0".to_owned()]);

    pipeline.set_processor_concurrency(4).unwrap();
    pipeline
        .set_batcher_concurrency("default", 3)
        .await
        .unwrap();
    assert!(
        ingress
            .test_batch(0..100u64)
            .await
            .iter()
            .filter(|o| o.is_success())
            .count()
            == 99
    );
    pipeline.set_processor_concurrency(1).unwrap();
    pipeline
        .set_batcher_concurrency("default", 1)
        .await
        .unwrap();
    assert!(
        ingress
            .test_batch(100..200u64)
            .await
            .iter()
            .all(Outcome::is_success)
    );

    let topology = pipeline.topology();
    assert_eq!(
        (
            topology.processors.concurrency,
            topology.batchers[0].concurrency
        ),
        (1, 1)
    );
    assert_eq!(
        pipeline.set_processor_concurrency(0),
        Err(ResizeError::Zero)
    );
    assert_eq!(
        pipeline.set_batcher_concurrency("nope", 2).await,
        Err(ResizeError::UnknownBatcher("nope".into()))
    );
    pipeline.drain(Duration::from_secs(5)).await;
    assert_eq!(
        pipeline.set_processor_concurrency(2),
        Err(ResizeError::NotRunning)
    );
}

#[tokio::test]
async fn partitioned_processors_cannot_be_resized() {
    let (handler, _) = Collect::new();
    let mut builder = Pipeline::builder("partitioned", handler).processors(
        ProcessorOptions::new()
            .concurrency(2)
            .partition_by(|message: &Message<u64>| message.data),
    );
    let _ingress = builder.ingress(1);
    let pipeline = builder.start().unwrap();
    assert_eq!(
        pipeline.set_processor_concurrency(3),
        Err(ResizeError::Partitioned)
    );
    assert!(pipeline.topology().processors.partitioned);
}

#[tokio::test]
async fn a_message_routed_to_a_batcher_fails_when_the_pipeline_has_none() {
    let (handler, _) = Collect::new();
    let mut builder = Pipeline::builder("no-batchers", handler);
    let ingress = builder.ingress(4);
    let _pipeline = builder.start().unwrap();
    assert_eq!(ingress.test_message(1u64).await, Outcome::Succeeded);
    assert_eq!(
        ingress.test_message(1000u64).await,
        Outcome::Failed("no batcher named \"big\"".into())
    );
}

#[tokio::test]
async fn bad_configuration_is_refused_with_a_reason() {
    let no_producer = Pipeline::builder("bad", Stuck).start();
    assert!(matches!(no_producer, Err(ConfigError::NoProducer)));

    let mut builder = Pipeline::builder("bad", Stuck)
        .processors(ProcessorOptions::new().max_demand(4).min_demand(4));
    builder.ingress(1);
    let error = builder.start().err().unwrap().to_string();
    assert!(
        error.contains("min_demand must be below max_demand"),
        "{error}"
    );

    let mut builder = Pipeline::builder("bad", Stuck)
        .batcher("a", BatcherOptions::new())
        .batcher("a", BatcherOptions::new());
    builder.ingress(1);
    assert!(
        builder
            .start()
            .err()
            .unwrap()
            .to_string()
            .contains("two batchers are named \"a\"")
    );

    let mut builder = Pipeline::builder("bad", Stuck)
        .batcher("a", BatcherOptions::new().batch_size(50))
        .max_in_flight(10);
    builder.ingress(1);
    assert!(
        builder
            .start()
            .err()
            .unwrap()
            .to_string()
            .contains("above max_in_flight")
    );

    // Too large for a semaphore, given or as the default from the stage sizes.
    for builder in [
        Pipeline::builder("bad", Stuck).max_in_flight(usize::MAX),
        Pipeline::builder("bad", Stuck).max_in_flight(1 << 34),
        Pipeline::builder("bad", Stuck)
            .batcher("huge", BatcherOptions::new().batch_size(usize::MAX / 2)),
    ] {
        let mut builder = builder;
        builder.ingress(1);
        let error = builder.start().err().unwrap().to_string();
        assert!(
            error.contains("max_in_flight must be between 1 and"),
            "{error}"
        );
    }

    // An ingress buffer empty, or too large for a Tokio channel (which panics).
    for capacity in [0, usize::MAX, (usize::MAX >> 3) + 1] {
        let mut builder = Pipeline::builder("bad", Stuck);
        builder.ingress(4);
        let ingress = builder.ingress(capacity);
        let error = builder.start().err().unwrap().to_string();
        assert!(
            error.contains(&format!(
                "ingress_1 has capacity {capacity}: an ingress capacity must be between 1 and"
            )),
            "{error}"
        );
        assert!(matches!(ingress.try_push(1u64), Err(PushError::Closed(_))));
    }
    let mut builder = Pipeline::builder("largest", Stuck);
    let ingress = builder.ingress(usize::MAX >> 3);
    let pipeline = builder.start().unwrap();
    assert_eq!(ingress.free(), usize::MAX >> 3);
    pipeline.drain(Duration::from_secs(1)).await;

    // Timers beyond what Tokio's reach.
    let mut builder = Pipeline::builder("bad", Stuck).batcher(
        "a",
        BatcherOptions::new().batch_timeout(MAX_TIMEOUT + Duration::from_secs(1)),
    );
    builder.ingress(1);
    let error = builder.start().err().unwrap().to_string();
    assert!(error.contains("at most a year"), "{error}");
    let mut builder = Pipeline::builder("bad", Stuck).rate_limit(RateLimit::new(1, Duration::MAX));
    builder.ingress(1);
    let error = builder.start().err().unwrap().to_string();
    assert!(error.contains("at most a year"), "{error}");
}

#[test]
fn starting_outside_a_runtime_is_an_error() {
    let mut builder = Pipeline::builder("no-runtime", Stuck);
    builder.ingress(1);
    assert!(matches!(builder.start(), Err(ConfigError::NoRuntime)));
}

#[test]
fn stage_metrics_are_recorded_per_pipeline_and_stage() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (handler, _) = Collect::new();
            let mut builder = Pipeline::builder("metered", handler)
                .batcher("default", batches_of(2, Duration::from_millis(1)));
            let ingress = builder.ingress(8);
            let pipeline = builder.start().unwrap();
            ingress.test_batch([1u64, 2, 13, 4]).await;
            pipeline.drain(Duration::from_secs(1)).await;
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str, stage: &str| -> u64 {
        snapshot
            .iter()
            .filter(|(key, ..)| {
                key.key().name() == name
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "stage" && l.value() == stage)
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "pipeline" && l.value() == "metered")
            })
            .map(|(.., value)| match value {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    // The ingress hands all four on: none fails before a processor.
    assert_eq!(counter(telemetry::RECEIVED, "ingress_0"), 4);
    assert_eq!(counter(telemetry::SUCCEEDED, "ingress_0"), 4);
    assert_eq!(counter(telemetry::FAILED, "ingress_0"), 0);
    assert_eq!(counter(telemetry::RECEIVED, "processor"), 4);
    assert_eq!(counter(telemetry::FAILED, "processor"), 1);
    assert_eq!(counter(telemetry::SUCCEEDED, "processor"), 3);
    assert_eq!(counter(telemetry::RECEIVED, "batcher:default"), 3);
    assert_eq!(counter(telemetry::SUCCEEDED, "batcher:default"), 3);
    let names: Vec<&str> = snapshot.iter().map(|(key, ..)| key.key().name()).collect();
    for name in [
        telemetry::BATCH_SIZE,
        telemetry::HANDLER_DURATION,
        telemetry::IN_FLIGHT,
        telemetry::QUEUE_DEPTH,
    ] {
        assert!(names.contains(&name), "{name} missing");
    }
    // A stage exports only the series it records.
    let series_of = |stage: &str| -> Vec<&str> {
        let mut names: Vec<&str> = snapshot
            .iter()
            .filter(|(key, ..)| {
                key.key()
                    .labels()
                    .any(|l| l.key() == "stage" && l.value() == stage)
            })
            .map(|(key, ..)| key.key().name())
            .collect();
        names.sort_unstable();
        names
    };
    let mut counters = [telemetry::RECEIVED, telemetry::SUCCEEDED, telemetry::FAILED];
    counters.sort_unstable();
    assert_eq!(series_of("ingress_0"), counters);
    let processor = series_of("processor");
    assert!(!processor.contains(&telemetry::BATCH_SIZE), "{processor:?}");
    assert!(
        processor.contains(&telemetry::HANDLER_DURATION),
        "{processor:?}"
    );
    assert!(series_of("batcher:default").contains(&telemetry::BATCH_SIZE));
}

/// A pipeline whose batcher flushes when idle, with `concurrency` batch
/// processors that each wait for a permit of the returned gate before
/// handling a batch, and a timeout long enough to never fire.
fn gated_group_commit(
    concurrency: usize,
) -> (
    Ingress<u64>,
    Pipeline<Collect>,
    Arc<tokio::sync::Semaphore>,
    Arc<Batches>,
) {
    let (handler, batches, gate) = Collect::gated();
    let mut builder = Pipeline::builder("group-commit", handler)
        .processors(ProcessorOptions::new().concurrency(1))
        .batcher(
            "default",
            batches_of(100, Duration::from_secs(3600))
                .concurrency(concurrency)
                .flush_when_idle(true),
        );
    let ingress = builder.ingress(100);
    let pipeline = builder.start().unwrap();
    (ingress, pipeline, gate, batches)
}

/// Releases `permits` batches through the gate, awaits every completion
/// (none may wait for the batch timeout), and returns the batches handled:
/// trigger and messages.
async fn release_and_collect(
    gate: &tokio::sync::Semaphore,
    permits: usize,
    completions: Vec<Completion>,
    batches: &Batches,
) -> Vec<(BatchTrigger, Vec<u64>)> {
    let started = Instant::now();
    gate.add_permits(permits);
    for completion in completions {
        assert_eq!(completion.await, Outcome::Succeeded);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no batch waited for its timeout"
    );
    batches.triggers_and_ids()
}

#[tokio::test(start_paused = true)]
async fn flush_when_idle_hands_partial_batches_to_idle_batch_processors() {
    let (ingress, _pipeline, gate, batches) = gated_group_commit(1);

    // The only batch processor is idle: the first message goes at once.
    let mut completions = vec![ingress.try_push_tracked(0u64).unwrap()];
    tokio::time::sleep(Duration::from_millis(1)).await;
    // While it is busy, later messages gather into one batch, which goes as
    // soon as the batch processor is free again.
    completions.extend((100..130u64).map(|n| ingress.try_push_tracked(n).unwrap()));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let seen = release_and_collect(&gate, 2, completions, &batches).await;
    assert_eq!(
        seen,
        vec![
            (BatchTrigger::Idle, vec![0]),
            (BatchTrigger::Idle, (100..130).collect()),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn flush_when_idle_fills_the_next_batch_while_a_larger_one_is_handled() {
    let (ingress, _pipeline, gate, batches) = gated_group_commit(2);

    // Nothing is being handled: the first five go at once, as one batch.
    let mut completions: Vec<Completion> = (0..5u64)
        .map(|n| ingress.try_push_tracked(n).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    // While it is handled, the next messages gather although the second batch
    // processor is idle, until they are as many: then they go to it. The
    // last five wait for an idle processor.
    for n in 100..110u64 {
        completions.push(ingress.try_push_tracked(n).unwrap());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seen = release_and_collect(&gate, 3, completions, &batches).await;
    assert_eq!(
        seen,
        vec![
            (BatchTrigger::Idle, (0..5).collect()),
            (BatchTrigger::Idle, (100..105).collect()),
            (BatchTrigger::Idle, (105..110).collect()),
        ]
    );
}

/// Panics in the synchronous part of its callbacks, before making their
/// futures: `handle_message` on 3, `handle_batch` on a batch holding 5.
struct PanicsBeforeItsFuture;

impl Handler for PanicsBeforeItsFuture {
    type Data = u64;

    fn handle_message(
        &self,
        message: &mut Message<u64>,
        _: &ProcessorContext,
    ) -> impl Future<Output = ()> + Send {
        if message.data == 3 {
            panic!("no message for 3");
        }
        async {}
    }

    fn handle_batch(
        &self,
        batch: &mut [Message<u64>],
        _: &BatchInfo,
    ) -> impl Future<Output = ()> + Send {
        assert!(batch.iter().all(|m| m.data != 5), "no batch for 5");
        async {}
    }
}

/// Records acknowledgements, and panics before making its future when one
/// of them holds 7.
struct AcksPanicOnSeven(Arc<Recorder>);

impl Acknowledger<u64> for AcksPanicOnSeven {
    fn ack(
        &self,
        successful: Vec<Message<u64>>,
        failed: Vec<Message<u64>>,
    ) -> futures::future::BoxFuture<'_, ()> {
        let seven = successful.iter().chain(&failed).any(|m| m.data == 7);
        let recorded = self.0.ack(successful, failed);
        assert!(!seven, "cannot acknowledge 7");
        recorded
    }
}

#[tokio::test]
async fn callbacks_panicking_before_their_future_fail_only_their_messages() {
    let recorder = Recorder::new();
    let acknowledger: Arc<dyn Acknowledger<u64>> = Arc::new(AcksPanicOnSeven(recorder.clone()));
    let mut builder = Pipeline::builder("sync-panics", PanicsBeforeItsFuture)
        .processors(ProcessorOptions::new().concurrency(1).max_demand(1))
        .batcher("default", batches_of(1, Duration::from_millis(1)));
    let ingress = builder.ingress(4);
    let pipeline = builder.start().unwrap();
    for n in 0..12u64 {
        ingress
            .push(Message::new(n).with_acknowledger(acknowledger.clone()))
            .await
            .unwrap();
    }
    assert!(!pipeline.drain(Duration::from_secs(5)).await.forced);
    assert_eq!(pipeline.in_flight(), 0);
    // Every message reached its acknowledger once (7's call panicked after
    // recording), the two that panicked in a handler as failed.
    recorder.assert_exactly_once(12);
    let failed = recorder.failed();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(
        failed[&3].contains("handle_message panicked: no message for 3"),
        "{failed:?}"
    );
    assert!(
        failed[&5].contains("handle_batch panicked: no batch for 5"),
        "{failed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_size_of_near_usize_max_closes_batches_without_overflow() {
    let (handler, batches) = Collect::new();
    let mut builder = Pipeline::builder("huge-sizes", handler).batcher(
        "default",
        batches_of(10, Duration::from_secs(3600))
            .max_batch_bytes(100, |_: &Message<u64>| usize::MAX),
    );
    let ingress = builder.ingress(10);
    let _pipeline = builder.start().unwrap();
    let started = Instant::now();
    let outcomes = ingress.test_batch([1u64, 2, 4]).await;
    assert!(outcomes.iter().all(Outcome::is_success), "{outcomes:?}");
    // Each message is over the limit on its own: a batch each, sent at once.
    assert_eq!(started.elapsed(), Duration::ZERO);
    let seen = batches.seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter()
            .all(|(_, _, trigger, ids)| *trigger == BatchTrigger::Bytes && ids.len() == 1),
        "{seen:?}"
    );
}
