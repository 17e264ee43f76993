//! The unit of work flowing through a pipeline.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::acknowledger::Acknowledger;
use crate::batch_key::BatchKey;
use crate::outcome::Outcome;

/// Why a message failed, as given to [`Message::fail`].
pub type Reason = Cow<'static, str>;

/// Whether a message is still on its way to success, or has failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Not failed (yet): the message goes on to its batcher, or is acknowledged as successful.
    Ok,
    /// Failed with a reason: the message skips the rest of the pipeline and is acknowledged as failed.
    Failed(Reason),
}

/// String metadata attached to a message by its producer or handlers (e.g. an SQS
/// receipt handle or a message attribute). Empty metadata does not allocate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata(BTreeMap<Cow<'static, str>, String>);

impl Metadata {
    /// The value stored under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Stores `value` under `key`, replacing and returning any previous value.
    pub fn insert(
        &mut self,
        key: impl Into<Cow<'static, str>>,
        value: impl Into<String>,
    ) -> Option<String> {
        self.0.insert(key.into(), value.into())
    }

    /// Removes and returns the value under `key`.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// All entries, ordered by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v.as_str()))
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A message: its data plus everything the pipeline needs to route and acknowledge it.
///
/// Handlers receive `&mut Message<T>`: they change [`data`](Message::data), fail the
/// message, or route it to a named batcher with a batch key. The pipeline keeps
/// ownership throughout, which is how it guarantees that every message is
/// acknowledged exactly once, even when a handler panics or is cancelled.
pub struct Message<T> {
    /// The payload. Handlers may change it in place.
    pub data: T,
    metadata: Metadata,
    status: Status,
    batcher: Option<Cow<'static, str>>,
    batch_key: BatchKey,
    acknowledger: Option<Arc<dyn Acknowledger<T>>>,
    completion: Option<oneshot::Sender<Outcome>>,
}

impl<T> Message<T> {
    /// A new, successful message with no acknowledger, no metadata, the default
    /// batcher and the default batch key.
    pub fn new(data: T) -> Self {
        Self {
            data,
            metadata: Metadata::default(),
            status: Status::Ok,
            batcher: None,
            batch_key: BatchKey::Default,
            acknowledger: None,
            completion: None,
        }
    }

    /// Sets the acknowledger told of this message's final fate.
    pub fn with_acknowledger(mut self, acknowledger: Arc<dyn Acknowledger<T>>) -> Self {
        self.acknowledger = Some(acknowledger);
        self
    }

    /// Sets one metadata entry.
    pub fn with_metadata(
        mut self,
        key: impl Into<Cow<'static, str>>,
        value: impl Into<String>,
    ) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// The acknowledger, if the producer set one.
    pub fn acknowledger(&self) -> Option<&Arc<dyn Acknowledger<T>>> {
        self.acknowledger.as_ref()
    }

    /// The message's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The message's metadata, for changes.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }

    /// Ok, or failed with its reason.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Whether the message has failed.
    pub fn is_failed(&self) -> bool {
        matches!(self.status, Status::Failed(_))
    }

    /// Fails the message: it skips any remaining stage and is acknowledged as failed.
    /// Failing an already failed message keeps the first reason.
    pub fn fail(&mut self, reason: impl Into<Reason>) {
        if !self.is_failed() {
            self.status = Status::Failed(reason.into());
        }
    }

    /// Fails every message of `messages` (see [`fail`](Self::fail)).
    pub(crate) fn fail_all(messages: &mut [Self], reason: impl Into<Reason>) {
        let reason = reason.into();
        messages
            .iter_mut()
            .for_each(|message| message.fail(reason.clone()));
    }

    /// Routes the message to the batcher named `batcher`. Unrouted messages go to the
    /// first batcher configured; a name that no batcher has fails the message.
    pub fn put_batcher(&mut self, batcher: impl Into<Cow<'static, str>>) {
        self.batcher = Some(batcher.into());
    }

    /// The batcher the message was routed to, or `None` for the default (first) batcher.
    pub fn batcher(&self) -> Option<&str> {
        self.batcher.as_deref()
    }

    /// Gives the message a batch key: a batch only ever holds messages of one key,
    /// and batches of one (non-default) key are handled one at a time, in order.
    pub fn put_batch_key(&mut self, key: impl Into<BatchKey>) {
        self.batch_key = key.into();
    }

    /// The message's batch key.
    pub fn batch_key(&self) -> &BatchKey {
        &self.batch_key
    }

    /// Attaches a completion: the returned receiver resolves with the message's final
    /// [`Outcome`] when it is acknowledged. Used by [`Ingress`](crate::Ingress) and
    /// the test helpers; a message has at most one completion (a second call replaces it).
    pub fn attach_completion(&mut self) -> crate::outcome::Completion {
        let (tx, rx) = oneshot::channel();
        self.completion = Some(tx);
        crate::outcome::Completion::new(rx)
    }

    /// Removes the completion without resolving it.
    pub(crate) fn detach_completion(&mut self) {
        self.completion = None;
    }

    /// Takes the completion (if any), with the outcome the message's current
    /// status gives it, to be resolved later.
    pub(crate) fn take_completion(&mut self) -> Option<PendingCompletion> {
        let sender = self.completion.take()?;
        let outcome = match &self.status {
            Status::Ok => Outcome::Succeeded,
            Status::Failed(reason) => Outcome::Failed(reason.clone()),
        };
        Some(PendingCompletion { sender, outcome })
    }
}

/// A message's completion and the outcome it will resolve with.
pub(crate) struct PendingCompletion {
    sender: oneshot::Sender<Outcome>,
    outcome: Outcome,
}

impl PendingCompletion {
    pub(crate) fn resolve(self) {
        // The waiter may have gone away (e.g. an HTTP client hung up): nothing to tell.
        let _ = self.sender.send(self.outcome);
    }
}

impl<T> From<T> for Message<T> {
    fn from(data: T) -> Self {
        Message::new(data)
    }
}

impl<T: fmt::Debug> fmt::Debug for Message<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("data", &self.data)
            .field("metadata", &self.metadata)
            .field("status", &self.status)
            .field("batcher", &self.batcher)
            .field("batch_key", &self.batch_key)
            .field("acknowledger", &self.acknowledger.is_some())
            .field("completion", &self.completion.is_some())
            .finish()
    }
}
