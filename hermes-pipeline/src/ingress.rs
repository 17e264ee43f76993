//! Push ingress: hand messages to a running pipeline, and optionally await their fate.

use std::fmt;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::message::Message;
use crate::outcome::{Completion, Outcome};
use crate::producer::{Draining, Produced, Producer};

/// Why a push was refused. Either way the message is handed back.
#[derive(thiserror::Error)]
pub enum PushError<T> {
    /// The ingress buffer is full: the pipeline has no room right now. An HTTP
    /// front end turns this into `503` with `Retry-After`.
    #[error("the pipeline is full")]
    Full(Box<Message<T>>),
    /// The pipeline is draining or stopped and accepts nothing more.
    #[error("the pipeline is not accepting messages")]
    Closed(Box<Message<T>>),
}

impl<T> PushError<T> {
    /// The refused message.
    pub fn into_message(self) -> Message<T> {
        match self {
            PushError::Full(message) | PushError::Closed(message) => *message,
        }
    }
}

impl<T> fmt::Debug for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushError::Full(_) => f.write_str("Full(..)"),
            PushError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

/// A handle that pushes messages into a running pipeline through a bounded buffer.
///
/// Created with [`PipelineBuilder::ingress`](crate::PipelineBuilder::ingress); clone
/// it freely. [`try_push`](Ingress::try_push) never blocks and never grows memory:
/// when the buffer is full it hands the message back. The pipeline pulls from the
/// buffer as demand allows. When the pipeline drains, messages already accepted are
/// still processed; pushes after that fail with [`PushError::Closed`]. When every
/// handle is dropped and the buffer is empty, the ingress counts as a finished producer.
pub struct Ingress<T> {
    tx: mpsc::Sender<Message<T>>,
    /// Cancelled when the pipeline starts draining: pushes are refused from
    /// then on, even before the pipeline closes the buffer (it may be busy).
    draining: CancellationToken,
    /// Dropped after `tx`, so its signal comes once the sender is gone.
    signal: Signal,
}

/// Wakes the producer waiting for a push: on each push, and on each handle
/// dropped (the last one finishes the ingress).
struct Signal(Arc<Notify>);

impl Signal {
    fn notify(&self) {
        // Kept as a permit if the producer is not waiting yet.
        self.0.notify_one();
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        self.notify();
    }
}

impl<T> Clone for Ingress<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            draining: self.draining.clone(),
            signal: Signal(self.signal.0.clone()),
        }
    }
}

impl<T> fmt::Debug for Ingress<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ingress")
            .field("capacity", &self.tx.max_capacity())
            .field("free", &self.tx.capacity())
            .finish()
    }
}

/// The largest ingress buffer: what a Tokio bounded channel holds at most.
pub(crate) const MAX_INGRESS_CAPACITY: usize = tokio::sync::Semaphore::MAX_PERMITS;

impl<T: Send + 'static> Ingress<T> {
    /// An ingress of `capacity`, brought within `1..=MAX_INGRESS_CAPACITY`
    /// (the builder refuses to start with a capacity outside it), refusing
    /// pushes once `draining` is cancelled.
    pub(crate) fn new(capacity: usize, draining: CancellationToken) -> (Self, IngressProducer<T>) {
        let (tx, rx) = mpsc::channel(capacity.clamp(1, MAX_INGRESS_CAPACITY));
        let pushed = Arc::new(Notify::new());
        let ingress = Self {
            tx,
            draining,
            signal: Signal(pushed.clone()),
        };
        (ingress, IngressProducer { rx, pushed })
    }

    /// Pushes a message if there is room, without waiting.
    pub fn try_push(&self, message: impl Into<Message<T>>) -> Result<(), PushError<T>> {
        let message = message.into();
        if self.draining.is_cancelled() {
            return Err(PushError::Closed(Box::new(message)));
        }
        self.tx
            .try_send(message)
            .map(|()| self.signal.notify())
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(message) => PushError::Full(Box::new(message)),
                mpsc::error::TrySendError::Closed(message) => PushError::Closed(Box::new(message)),
            })
    }

    /// Pushes a message if there is room, and returns a [`Completion`] resolving
    /// with its outcome once it is acknowledged.
    pub fn try_push_tracked(
        &self,
        message: impl Into<Message<T>>,
    ) -> Result<Completion, PushError<T>> {
        let mut message = message.into();
        let completion = message.attach_completion();
        self.try_push(message)
            .map(|()| completion)
            .map_err(|mut error| {
                let (PushError::Full(message) | PushError::Closed(message)) = &mut error;
                message.detach_completion();
                error
            })
    }

    /// Pushes a message, waiting for room (or for the pipeline to drain,
    /// which refuses it).
    pub async fn push(&self, message: impl Into<Message<T>>) -> Result<(), PushError<T>> {
        let message = message.into();
        // Waiting for room, not with the message, keeps it if the wait ends
        // with a refusal.
        let room = tokio::select! {
            biased;
            () = self.draining.cancelled() => None,
            permit = self.tx.reserve() => permit.ok(),
        };
        match room {
            Some(permit) => {
                permit.send(message);
                self.signal.notify();
                Ok(())
            }
            None => Err(PushError::Closed(Box::new(message))),
        }
    }

    /// Test helper (like Broadway's `test_message`): pushes a message, waiting for
    /// room, and returns its outcome once acknowledged.
    pub async fn test_message(&self, message: impl Into<Message<T>>) -> Outcome {
        let mut message = message.into();
        let completion = message.attach_completion();
        match self.push(message).await {
            Ok(()) => completion.await,
            Err(error) => Outcome::Failed(error.to_string().into()),
        }
    }

    /// Test helper (like Broadway's `test_batch`): pushes every message, then
    /// returns their outcomes in the order given; if the pipeline stops
    /// accepting partway, only those of the messages pushed before.
    pub async fn test_batch<M: Into<Message<T>>>(
        &self,
        messages: impl IntoIterator<Item = M>,
    ) -> Vec<Outcome> {
        let mut completions = Vec::new();
        for message in messages {
            let mut message = message.into();
            let completion = message.attach_completion();
            if self.push(message).await.is_err() {
                break;
            }
            completions.push(completion);
        }
        futures::future::join_all(completions).await
    }

    /// How many more messages the buffer takes right now.
    pub fn free(&self) -> usize {
        self.tx.capacity()
    }

    /// Whether the pipeline stopped accepting messages.
    pub fn is_closed(&self) -> bool {
        self.draining.is_cancelled() || self.tx.is_closed()
    }
}

/// The pipeline side of an [`Ingress`]: a producer over its buffer.
pub(crate) struct IngressProducer<T> {
    rx: mpsc::Receiver<Message<T>>,
    /// Notified on each push and each handle dropped.
    pushed: Arc<Notify>,
}

impl<T: Send + 'static> Producer<T> for IngressProducer<T> {
    async fn produce(&mut self, demand: usize) -> Produced<T> {
        let mut messages = Vec::with_capacity(demand.min(self.rx.max_capacity()));
        // recv_many is cancel-safe and returns 0 only once closed and empty.
        if self.rx.recv_many(&mut messages, demand).await == 0 {
            Produced::Finished
        } else {
            Produced::Messages(messages)
        }
    }

    async fn ready(&mut self) {
        // Nothing is taken from the buffer, so its capacity holds and this is
        // cancel-safe. A push after the check leaves a permit: no wake is lost.
        while self.rx.is_empty() && !self.rx.is_closed() {
            self.pushed.notified().await;
        }
    }

    fn prepare_for_draining(&mut self) -> Draining {
        // Refuse new pushes but process everything already accepted.
        self.rx.close();
        Draining::UntilFinished
    }
}
