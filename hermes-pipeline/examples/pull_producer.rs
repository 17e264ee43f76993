//! A pull producer feeding a batcher: a fake "queue" is polled on demand, messages
//! are validated by processors, and valid ones are written in batches; the
//! acknowledger then deletes them from the queue (here: counts them).
//!
//! Run with `cargo run -p hermes-pipeline --example pull_producer`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use hermes_pipeline::{
    Acknowledger, BatchInfo, BatcherOptions, Handler, Message, Pipeline, ProcessorContext,
    ProcessorOptions, Produced, Producer,
};

/// Polls a queue holding `remaining` jobs, at most `demand` at a time, like an SQS
/// ReceiveMessage with MaxNumberOfMessages = demand.
struct QueuePoller {
    next: u32,
    remaining: u32,
    queue: Arc<Queue>,
}

impl Producer<u32> for QueuePoller {
    async fn produce(&mut self, demand: usize) -> Produced<u32> {
        if self.remaining == 0 {
            return Produced::Finished;
        }
        let take = self
            .remaining
            .min(u32::try_from(demand).unwrap_or(u32::MAX));
        let acknowledger: Arc<dyn Acknowledger<u32>> = self.queue.clone();
        let messages = (self.next..self.next + take)
            .map(|job| Message::new(job).with_acknowledger(acknowledger.clone()))
            .collect();
        self.next += take;
        self.remaining -= take;
        Produced::Messages(messages)
    }
}

/// The queue's side of acknowledgement: delete what succeeded, let the rest be redelivered.
#[derive(Default)]
struct Queue {
    deleted: AtomicUsize,
    redelivered: AtomicUsize,
}

impl Acknowledger<u32> for Queue {
    fn ack(&self, successful: Vec<Message<u32>>, failed: Vec<Message<u32>>) -> BoxFuture<'_, ()> {
        self.deleted.fetch_add(successful.len(), Ordering::Relaxed);
        self.redelivered.fetch_add(failed.len(), Ordering::Relaxed);
        Box::pin(async {})
    }
}

struct Jobs;

impl Handler for Jobs {
    type Data = u32;

    async fn handle_message(&self, message: &mut Message<u32>, _: &ProcessorContext) {
        if message.data % 100 == 99 {
            message.fail("job is malformed");
        }
    }

    async fn handle_batch(&self, batch: &mut [Message<u32>], info: &BatchInfo) {
        // A real handler would write the batch to a database in one round trip.
        println!(
            "batch of {} ({:?}) by batch processor {}",
            batch.len(),
            info.trigger,
            info.batch_processor
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let queue = Arc::new(Queue::default());
    let pipeline = Pipeline::builder("jobs", Jobs)
        .producer(QueuePoller {
            next: 0,
            remaining: 1_000,
            queue: queue.clone(),
        })
        .processors(ProcessorOptions::new().concurrency(2).max_demand(50))
        .batcher(
            "db",
            BatcherOptions::new()
                .batch_size(100)
                .batch_timeout(Duration::from_millis(20))
                .concurrency(2),
        )
        .start()?;
    println!("{:#?}", pipeline.topology());
    pipeline.join().await; // the producer finishes after 1,000 jobs; the pipeline drains
    println!(
        "deleted {}, left for redelivery {}",
        queue.deleted.load(Ordering::Relaxed),
        queue.redelivered.load(Ordering::Relaxed)
    );
    Ok(())
}
