//! Property tests of the pipeline's invariants over random topologies and loads:
//! every message acknowledged exactly once with the outcome its handlers gave it
//! (callbacks panicking on the call or while polled included), the in-flight
//! bound and demand never exceeded, per-partition order kept, batches within size
//! and never mixing keys.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hermes_pipeline::{
    BatchInfo, BatchKey, BatcherOptions, FailedIn, Handler, Message, Pipeline, ProcessorContext,
    ProcessorOptions, Status,
};
use proptest::prelude::*;
use support::{Identified, Numbered, Recorder, within_10s};

/// A message and what the test wants to happen to it.
#[derive(Clone, Debug)]
struct Item {
    id: u64,
    key: u64,
    fate: Fate,
}

impl Identified for Item {
    fn id(&self) -> u64 {
        self.id
    }
}

/// What happens to a message; each panic comes in both [`When`]s.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Succeed,
    FailInProcessor,
    /// Fails in the processor, then `handle_failed` panics on it.
    FailThenHookPanics,
    FailInBatch,
    /// `prepare_messages` panics on the message's chunk, failing all of it.
    PanicInPrepare(When),
    PanicInProcessor(When),
    /// `handle_batch` panics on the message's batch, failing all it did not fail.
    PanicInBatch(When),
}

/// When a callback panics.
#[derive(Clone, Copy, Debug, PartialEq)]
enum When {
    /// On the call, before returning its future.
    Called,
    /// While its future is polled.
    Polled,
}

/// Mostly successes, with every failure and panic mixed in.
fn fate() -> impl Strategy<Value = Fate> {
    let when = || prop_oneof![Just(When::Called), Just(When::Polled)];
    prop_oneof![
        28 => Just(Fate::Succeed),
        1 => Just(Fate::FailInProcessor),
        1 => Just(Fate::FailThenHookPanics),
        1 => Just(Fate::FailInBatch),
        1 => when().prop_map(Fate::PanicInPrepare),
        2 => when().prop_map(Fate::PanicInProcessor),
        2 => when().prop_map(Fate::PanicInBatch),
    ]
}

/// Panics now if `when` is `Called`, else returns a future that panics when polled
/// if `when` is `Polled`; `None` gives a future that does nothing.
fn panic_at(when: Option<When>, what: String) -> impl Future<Output = ()> + Send {
    if when == Some(When::Called) {
        panic!("{what}");
    }
    async move {
        if when == Some(When::Polled) {
            panic!("{what}");
        }
    }
}

/// What the callbacks saw.
#[derive(Default)]
struct Observed {
    /// Per key: (processor, id) in handle_message order.
    processed: HashMap<u64, Vec<(usize, u64)>>,
    /// Per batcher and batch key: ids in handle_batch order.
    batched: HashMap<(String, BatchKey), Vec<u64>>,
    /// Ids in a chunk whose `prepare_messages` panicked.
    prepare_panicked: HashSet<u64>,
    /// Ids in a batch whose `handle_batch` panicked.
    batch_panicked: HashSet<u64>,
    violations: Vec<String>,
}

impl Observed {
    /// Text the failure reason of message `id` must contain, or `None` if it
    /// must succeed.
    fn expected_failure(&self, id: u64, fate: Fate) -> Option<&'static str> {
        if self.prepare_panicked.contains(&id) {
            return Some("prepare panic");
        }
        match fate {
            Fate::Succeed if self.batch_panicked.contains(&id) => Some("batch panic"),
            Fate::Succeed => None,
            Fate::FailInProcessor | Fate::FailThenHookPanics => Some("failed in processor"),
            Fate::FailInBatch => Some("failed in batch"),
            Fate::PanicInPrepare(_) => Some("prepare panic"),
            Fate::PanicInProcessor(_) => Some("processor panic"),
            Fate::PanicInBatch(_) => Some("batch panic"),
        }
    }
}

/// The handler: records what each callback sees and acts out each message's fate.
struct Checker {
    observed: Arc<Mutex<Observed>>,
    batch_sizes: HashMap<String, usize>,
    keyed_batches: bool,
    max_demand: usize,
}

impl Handler for Checker {
    type Data = Item;

    fn prepare_messages(
        &self,
        messages: &mut [Message<Item>],
        _: &ProcessorContext,
    ) -> impl Future<Output = ()> + Send {
        let when = messages.iter().find_map(|m| match m.data.fate {
            Fate::PanicInPrepare(when) => Some(when),
            _ => None,
        });
        let mut observed = self.observed.lock().unwrap();
        if messages.is_empty() || messages.len() > self.max_demand {
            observed.violations.push(format!(
                "chunk of {} (max_demand {})",
                messages.len(),
                self.max_demand
            ));
        }
        if when.is_some() {
            observed
                .prepare_panicked
                .extend(messages.iter().map(|m| m.data.id));
        }
        drop(observed);
        panic_at(when, "prepare panic".into())
    }

    fn handle_message(
        &self,
        message: &mut Message<Item>,
        context: &ProcessorContext,
    ) -> impl Future<Output = ()> + Send {
        let item = message.data.clone();
        self.observed
            .lock()
            .unwrap()
            .processed
            .entry(item.key)
            .or_default()
            .push((context.processor, item.id));
        if let Fate::FailInProcessor | Fate::FailThenHookPanics = item.fate {
            message.fail("failed in processor");
        }
        if item.id.is_multiple_of(3) {
            message.put_batcher("thirds");
        }
        if self.keyed_batches {
            message.put_batch_key(item.key);
        }
        let when = match item.fate {
            Fate::PanicInProcessor(when) => Some(when),
            _ => None,
        };
        panic_at(when, format!("processor panic for {}", item.id))
    }

    fn handle_batch(
        &self,
        batch: &mut [Message<Item>],
        info: &BatchInfo,
    ) -> impl Future<Output = ()> + Send {
        let when = batch.iter().find_map(|m| match m.data.fate {
            Fate::PanicInBatch(when) => Some(when),
            _ => None,
        });
        let mut observed = self.observed.lock().unwrap();
        let limit = self.batch_sizes[&*info.batcher];
        if batch.len() > limit || batch.is_empty() || batch.len() != info.size {
            observed.violations.push(format!(
                "batch of {} in {} (limit {limit})",
                batch.len(),
                info.batcher
            ));
        }
        for message in batch.iter() {
            if message.batch_key() != &info.batch_key {
                observed.violations.push(format!(
                    "batch {:?} holds key {:?}",
                    info.batch_key,
                    message.batch_key()
                ));
            }
            let wanted = if message.data.id % 3 == 0 {
                "thirds"
            } else {
                "rest"
            };
            if wanted != &*info.batcher {
                observed.violations.push(format!(
                    "message {} in batcher {}",
                    message.data.id, info.batcher
                ));
            }
            if message.is_failed() {
                observed.violations.push(format!(
                    "failed message {} reached a batch",
                    message.data.id
                ));
            }
        }
        let ids = batch.iter().map(|message| message.data.id);
        observed
            .batched
            .entry((info.batcher.to_string(), info.batch_key.clone()))
            .or_default()
            .extend(ids.clone());
        if when.is_some() {
            observed.batch_panicked.extend(ids);
        }
        drop(observed);
        for message in batch.iter_mut() {
            if message.data.fate == Fate::FailInBatch {
                message.fail("failed in batch");
            }
        }
        panic_at(when, "batch panic".into())
    }

    fn handle_failed(
        &self,
        messages: &mut [Message<Item>],
        _: FailedIn,
    ) -> impl Future<Output = ()> + Send {
        let panics = messages
            .iter()
            .any(|m| m.data.fate == Fate::FailThenHookPanics);
        panic_at(panics.then_some(When::Called), "hook panic".into())
    }
}

#[derive(Debug, Clone)]
struct Case {
    items: Vec<(u64, Fate)>,
    processors: usize,
    max_demand: usize,
    min_demand: usize,
    partitioned: bool,
    keyed_batches: bool,
    batch_size: usize,
    batch_concurrency: usize,
    flush_when_idle: bool,
    max_in_flight: usize,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((0..8u64, fate()), 0..400),
        1..5usize,
        1..40usize,
        any::<bool>(),
        any::<bool>(),
        1..30usize,
        1..4usize,
        0..200usize,
    )
        .prop_flat_map(
            |(
                items,
                processors,
                max_demand,
                partitioned,
                keyed_batches,
                batch_size,
                batch_concurrency,
                extra,
            )| {
                (0..max_demand, any::<bool>()).prop_map(move |(min_demand, flush_when_idle)| Case {
                    items: items.clone(),
                    processors,
                    max_demand,
                    min_demand,
                    partitioned,
                    keyed_batches,
                    batch_size,
                    batch_concurrency,
                    flush_when_idle,
                    max_in_flight: batch_size + extra,
                })
            },
        )
}

fn run_case(case: Case) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let recorder = Recorder::new();
        let observed = Arc::new(Mutex::new(Observed::default()));
        let items = case.items.clone();
        let producer = Numbered::new(
            items.len() as u64,
            case.max_in_flight,
            recorder.clone(),
            move |id| {
                let (key, fate) = items[id as usize];
                Item { id, key, fate }
            },
        );
        let violations = producer.violations.clone();
        let asks = producer.asks.clone();
        let peak_outstanding = producer.peak_outstanding.clone();
        let handler = Checker {
            observed: observed.clone(),
            batch_sizes: HashMap::from([
                ("rest".into(), case.batch_size),
                ("thirds".into(), case.batch_size),
            ]),
            keyed_batches: case.keyed_batches,
            max_demand: case.max_demand,
        };
        let mut processors = ProcessorOptions::new()
            .concurrency(case.processors)
            .max_demand(case.max_demand)
            .min_demand(case.min_demand);
        if case.partitioned {
            processors = processors.partition_by(|message: &Message<Item>| message.data.key);
        }
        let batcher = || {
            BatcherOptions::new()
                .batch_size(case.batch_size)
                .batch_timeout(Duration::from_millis(5))
                .concurrency(case.batch_concurrency)
                .flush_when_idle(case.flush_when_idle)
        };
        let pipeline = Pipeline::builder("props", handler)
            .producer(producer)
            .processors(processors)
            .batcher("rest", batcher())
            .batcher("thirds", batcher())
            .max_in_flight(case.max_in_flight)
            .start()
            .unwrap();
        within_10s(pipeline.join(), "pipeline did not finish").await;

        let total = case.items.len() as u64;
        recorder.assert_exactly_once(total);
        prop_assert!(
            violations.lock().unwrap().is_empty(),
            "demand: {:?}",
            violations.lock().unwrap()
        );
        let asks = asks.lock().unwrap();
        prop_assert!(
            asks.iter().all(|&ask| (1..=case.max_demand).contains(&ask)),
            "asks {:?} outside 1..={}",
            asks,
            case.max_demand
        );
        // Produced but not yet acknowledged, as the producer and acknowledger
        // see it and as the pipeline counts it: within the bound, and none left.
        let peak_outstanding = peak_outstanding.load(Ordering::SeqCst);
        prop_assert!(peak_outstanding <= case.max_in_flight);
        let peak_in_flight = pipeline.peak_in_flight();
        prop_assert!(
            (1..=case.max_in_flight).contains(&peak_in_flight) || total == 0,
            "peak in flight {} outside 1..={}",
            peak_in_flight,
            case.max_in_flight
        );
        prop_assert_eq!(pipeline.in_flight(), 0);

        let observed = observed.lock().unwrap();
        prop_assert!(observed.violations.is_empty(), "{:?}", observed.violations);
        let acks = recorder.acks();
        for (id, &(_, fate)) in case.items.iter().enumerate() {
            let id = id as u64;
            let status = &acks[&id][0];
            match (observed.expected_failure(id, fate), status) {
                (None, Status::Ok) => {}
                (Some(text), Status::Failed(reason)) if reason.to_string().contains(text) => {}
                (expected, _) => prop_assert!(
                    false,
                    "message {} ({:?}): {:?}, expected a failure containing {:?}",
                    id,
                    fate,
                    status,
                    expected
                ),
            }
        }
        if case.partitioned {
            for (key, seen) in &observed.processed {
                let ids: Vec<u64> = seen.iter().map(|(_, id)| *id).collect();
                prop_assert!(
                    ids.windows(2).all(|w| w[0] < w[1]),
                    "key {} processed out of order: {:?}",
                    key,
                    ids
                );
                let processors: Vec<usize> = seen.iter().map(|(p, _)| *p).collect();
                prop_assert!(
                    processors.windows(2).all(|w| w[0] == w[1]),
                    "key {} on several processors",
                    key
                );
            }
            if case.keyed_batches {
                for ((batcher, key), ids) in &observed.batched {
                    prop_assert!(
                        ids.windows(2).all(|w| w[0] < w[1]),
                        "{} key {:?} batched out of order",
                        batcher,
                        key
                    );
                }
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn pipeline_invariants_hold(case in case()) {
        run_case(case)?;
    }
}
