//! A push ingress whose callers await each message's outcome, the shape of an
//! HTTP endpoint that answers 202 only once its event is committed, and 503 when
//! the pipeline is full.
//!
//! Run with `cargo run -p hermes-pipeline --example push_ingress`.

use std::time::Duration;

use hermes_pipeline::{
    BatchInfo, BatcherOptions, Handler, Message, Outcome, Pipeline, ProcessorContext, PushError,
};

struct Events;

impl Handler for Events {
    type Data = String;

    async fn handle_message(&self, message: &mut Message<String>, _: &ProcessorContext) {
        if message.data.trim().is_empty() {
            message.fail("empty event");
        }
    }

    async fn handle_batch(&self, batch: &mut [Message<String>], _: &BatchInfo) {
        tokio::time::sleep(Duration::from_millis(5)).await; // "commit"
        for message in batch.iter_mut() {
            message.metadata_mut().insert("committed", "yes");
        }
    }
}

/// What an HTTP handler would do with one request.
async fn handle_request(ingress: &hermes_pipeline::Ingress<String>, body: &str) -> (u16, String) {
    match ingress.try_push_tracked(body.to_owned()) {
        Ok(completion) => match completion.await {
            Outcome::Succeeded => (202, "accepted".into()),
            Outcome::Failed(reason) => (422, reason.into_owned()),
        },
        Err(PushError::Full(_)) => (503, "full, retry after 1 s".into()),
        Err(PushError::Closed(_)) => (503, "shutting down".into()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = Pipeline::builder("events", Events)
        .batcher(
            "db",
            BatcherOptions::new()
                .batch_size(50)
                .batch_timeout(Duration::from_millis(10)),
        )
        .max_in_flight(100);
    let ingress = builder.ingress(64);
    let pipeline = builder.start()?;

    for body in ["hello", " ", "world"] {
        let (status, text) = handle_request(&ingress, body).await;
        println!("{body:?} -> {status} {text}");
    }
    // Offer far more than fits at once: some requests get 503 instead of waiting.
    let requests = (0..1000).map(|n| {
        let ingress = ingress.clone();
        async move { handle_request(&ingress, &format!("event {n}")).await.0 }
    });
    let statuses = futures::future::join_all(requests).await;
    let accepted = statuses.iter().filter(|&&status| status == 202).count();
    println!(
        "burst of 1000: {accepted} accepted, {} refused with 503",
        1000 - accepted
    );

    pipeline.drain(Duration::from_secs(5)).await;
    Ok(())
}
