//! Broadway-style streaming pipelines for Tokio.
//!
//! A pipeline moves [`Message`]s through bounded stages:
//!
//! ```text
//! producers --demand--> processors --> batchers --> batch processors --> acknowledgers
//! ```
//!
//! * **Demand-driven**: a [`Producer`] is only asked for as many messages as the
//!   pipeline has room for; a push [`Ingress`] refuses messages when full.
//! * **Bounded**: at most `max_in_flight` messages are between production and
//!   acknowledgement, whatever the offered load.
//! * **Processors** run [`Handler::handle_message`] with configurable concurrency,
//!   optionally partitioned by key to keep per-key order.
//! * **Batchers** group messages by size, time, bytes and [`BatchKey`], and run
//!   [`Handler::handle_batch`] with their own concurrency.
//! * **Acknowledgement** happens exactly once per message, grouped per
//!   [`Acknowledger`], after the message's final fate.
//! * Rate limiting, runtime resizing, graceful [`drain`](Pipeline::drain) with a
//!   deadline, `metrics` telemetry and test helpers come built in.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use futures::stream;
//! use hermes_pipeline::*;
//!
//! struct Doubler;
//!
//! impl Handler for Doubler {
//!     type Data = u64;
//!
//!     async fn handle_message(&self, message: &mut Message<u64>, _: &ProcessorContext) {
//!         if message.data == 13 {
//!             message.fail("unlucky");
//!         }
//!         message.data *= 2;
//!     }
//!
//!     async fn handle_batch(&self, batch: &mut [Message<u64>], info: &BatchInfo) {
//!         let sum: u64 = batch.iter().map(|message| message.data).sum();
//!         println!("batch of {} from {}: sum {sum}", info.size, info.batcher);
//!     }
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), ConfigError> {
//! let mut builder = Pipeline::builder("doubler", Doubler)
//!     .producer(StreamProducer::from_data(stream::iter(1..=100u64)))
//!     .processors(ProcessorOptions::new().concurrency(2))
//!     .batcher("sum", BatcherOptions::new().batch_size(10).batch_timeout(Duration::from_millis(50)));
//! let ingress = builder.ingress(16);
//! let pipeline = builder.start()?;
//!
//! assert_eq!(ingress.test_message(13).await, Outcome::Failed("unlucky".into()));
//! assert!(ingress.test_message(21).await.is_success());
//!
//! let drained = pipeline.drain(Duration::from_secs(5)).await;
//! assert!(!drained.forced);
//! # Ok(()) }
//! ```
//!
//! # Metrics
//!
//! Through the [`metrics`] facade, labelled `pipeline` and `stage`
//! (`producer_N`/`ingress_N`, `processor`, `batcher:NAME`): see [`telemetry`].

#![warn(missing_docs)]

mod acknowledger;
mod batch_key;
mod batch_processor_stage;
mod batcher_stage;
mod builder;
mod handler;
mod holding_inbox;
mod in_flight;
mod ingress;
mod liveness;
mod lock;
mod message;
mod options;
mod outcome;
mod panic_message;
mod pipeline;
mod processor_pool;
mod processor_stage;
mod producer;
mod producer_stage;
mod rate_limiter;
mod stream_producer;
mod supervisor;
pub mod telemetry;
mod terminator;
mod topology;

pub use acknowledger::Acknowledger;
pub use batch_key::BatchKey;
pub use batcher_stage::SizeFn;
pub use builder::PipelineBuilder;
pub use handler::{BatchInfo, BatchTrigger, FailedIn, Handler, ProcessorContext};
pub use ingress::{Ingress, PushError};
pub use message::{Message, Metadata, Reason, Status};
pub use options::{BatcherOptions, DEFAULT_MAX_DEMAND, MAX_TIMEOUT, ProcessorOptions};
pub use outcome::{Completion, Outcome};
pub use pipeline::{ConfigError, Drained, Pipeline, ResizeError};
pub use producer::{DEFAULT_IDLE_BACKOFF, Draining, Produced, Producer};
pub use producer_stage::PartitionFn;
pub use rate_limiter::RateLimit;
pub use stream_producer::StreamProducer;
pub use topology::{BatcherTopology, ProcessorsTopology, StoppedStage, Topology};
