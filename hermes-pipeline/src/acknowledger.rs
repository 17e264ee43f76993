//! Acknowledgers: where a message's final fate is reported to its source.

use futures::future::BoxFuture;

use crate::message::Message;

/// Told, exactly once per message, whether the message succeeded or failed.
///
/// The pipeline groups the messages of one acknowledger (same `Arc`) that reach
/// their final fate together, into one call with the successful and the failed
/// ones. This is where an SQS message is deleted, an HTTP request learns its row is
/// committed, or a polling cursor advances. The pipeline awaits the returned future
/// before the stage moves on, so acknowledgement applies back-pressure too.
pub trait Acknowledger<T>: Send + Sync + 'static {
    /// Acknowledges `successful` and `failed` messages (either may be empty, not both).
    fn ack(&self, successful: Vec<Message<T>>, failed: Vec<Message<T>>) -> BoxFuture<'_, ()>;
}
