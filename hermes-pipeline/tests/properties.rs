//! Property tests of the pipeline's invariants over random topologies and loads:
//! every message acknowledged exactly once, the in-flight bound and demand never
//! exceeded, per-partition order kept, batches within size and never mixing keys.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hermes_pipeline::{
    BatchInfo, BatchKey, BatcherOptions, Handler, Message, Pipeline, ProcessorContext,
    ProcessorOptions,
};
use proptest::prelude::*;
use support::{Identified, Numbered, Recorder};

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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Succeed,
    FailInProcessor,
    PanicInProcessor,
    FailInBatch,
    PanicInBatch,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        20 => Just(Fate::Succeed),
        1 => Just(Fate::FailInProcessor),
        1 => Just(Fate::PanicInProcessor),
        1 => Just(Fate::FailInBatch),
        1 => Just(Fate::PanicInBatch),
    ]
}

#[derive(Default)]
struct Observed {
    /// Per key: (processor, id) in handle_message order.
    processed: HashMap<u64, Vec<(usize, u64)>>,
    /// Per batcher and batch key: ids in handle_batch order.
    batched: HashMap<(String, BatchKey), Vec<u64>>,
    violations: Vec<String>,
}

struct Checker {
    observed: Arc<Mutex<Observed>>,
    batch_sizes: HashMap<String, usize>,
    keyed_batches: bool,
}

impl Handler for Checker {
    type Data = Item;

    async fn handle_message(&self, message: &mut Message<Item>, context: &ProcessorContext) {
        let item = message.data.clone();
        self.observed
            .lock()
            .unwrap()
            .processed
            .entry(item.key)
            .or_default()
            .push((context.processor, item.id));
        match item.fate {
            Fate::FailInProcessor => message.fail("failed in processor"),
            Fate::PanicInProcessor => panic!("processor panic for {}", item.id),
            _ => {}
        }
        if item.id % 3 == 0 {
            message.put_batcher("thirds");
        }
        if self.keyed_batches {
            message.put_batch_key(item.key);
        }
    }

    async fn handle_batch(&self, batch: &mut [Message<Item>], info: &BatchInfo) {
        {
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
            observed
                .batched
                .entry((info.batcher.to_string(), info.batch_key.clone()))
                .or_default()
                .extend(batch.iter().map(|message| message.data.id));
        }
        for message in batch.iter_mut() {
            if message.data.fate == Fate::FailInBatch {
                message.fail("failed in batch");
            }
        }
        if batch
            .iter()
            .any(|message| message.data.fate == Fate::PanicInBatch)
        {
            panic!("batch panic");
        }
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
        let handler = Checker {
            observed: observed.clone(),
            batch_sizes: HashMap::from([
                ("rest".into(), case.batch_size),
                ("thirds".into(), case.batch_size),
            ]),
            keyed_batches: case.keyed_batches,
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
        tokio::time::timeout(Duration::from_secs(30), pipeline.join())
            .await
            .expect("pipeline did not finish");

        let total = case.items.len() as u64;
        recorder.assert_exactly_once(total);
        prop_assert!(
            violations.lock().unwrap().is_empty(),
            "demand: {:?}",
            violations.lock().unwrap()
        );
        prop_assert!(pipeline.peak_in_flight() <= case.max_in_flight);
        prop_assert_eq!(pipeline.in_flight(), 0);

        let observed = observed.lock().unwrap();
        prop_assert!(observed.violations.is_empty(), "{:?}", observed.violations);
        let failed = recorder.failed();
        for (id, (_, fate)) in case.items.iter().enumerate() {
            let id = id as u64;
            match fate {
                Fate::Succeed => {}
                Fate::FailInProcessor => prop_assert_eq!(
                    failed.get(&id).map(String::as_str),
                    Some("failed in processor")
                ),
                Fate::PanicInProcessor => prop_assert!(
                    failed
                        .get(&id)
                        .is_some_and(|r| r.contains("processor panic"))
                ),
                Fate::FailInBatch | Fate::PanicInBatch => prop_assert!(failed.contains_key(&id)),
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
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn pipeline_invariants_hold(case in case()) {
        run_case(case)?;
    }
}
