//! The message data of the ingest pipeline: one verified webhook event, and
//! the slot where the batch handler records what became of it.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

use super::normalize::NormalizedMessage;

/// A verified, parsed (and, where configured, normalized) webhook event on
/// its way to Postgres. The HTTP handler keeps a clone of the `Arc` and reads
/// [`fate`](Self::fate) once the pipeline acknowledged the message.
#[derive(Debug)]
pub struct WebhookEvent {
    /// The source's name.
    pub source: Arc<str>,
    /// The provider stored with a normalized message.
    pub provider: Arc<str>,
    /// Unique per source across redeliveries.
    pub idempotency_key: String,
    /// The raw body: valid JSON text, stored as `jsonb`.
    pub body: String,
    /// When the request arrived.
    pub received_at: DateTime<Utc>,
    /// The normalized message, for sources with `normalize = "sms"|"email"`.
    pub message: Option<NormalizedMessage>,
    /// The event id written by the latest attempt that included this row
    /// (0: none yet). Set by the batch statement.
    pub(crate) written_id: AtomicI64,
    fate: OnceLock<Fate>,
}

/// What became of an event, as recorded by the batch handler before the
/// pipeline acknowledges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Committed: the event's id, and whether it was already stored.
    Stored {
        /// The stored event's id.
        id: i64,
        /// Whether it was already stored: by an earlier delivery, or by an
        /// earlier attempt at this batch whose commit went unconfirmed.
        duplicate: bool,
    },
    /// The database refused the event; it is not stored.
    Rejected(String),
    /// The batch could not be written. The event is not known to be stored
    /// (part of a batch may have committed before a later step failed): a
    /// redelivery finds out, stored once either way.
    Failed {
        /// Whether trying again later may succeed (lost connection, deadlock, …).
        transient: bool,
        /// Why.
        reason: String,
    },
}

impl WebhookEvent {
    /// A new event, not yet written.
    pub fn new(
        source: Arc<str>,
        provider: Arc<str>,
        idempotency_key: String,
        body: String,
        received_at: DateTime<Utc>,
        message: Option<NormalizedMessage>,
    ) -> Self {
        Self {
            source,
            provider,
            idempotency_key,
            body,
            received_at,
            message,
            written_id: AtomicI64::new(0),
            fate: OnceLock::new(),
        }
    }

    /// What became of the event, once recorded.
    pub fn fate(&self) -> Option<&Fate> {
        self.fate.get()
    }

    /// Records the event's fate; the first record wins.
    pub(crate) fn set_fate(&self, fate: Fate) {
        let _ = self.fate.set(fate);
    }

    pub(crate) fn written_id(&self) -> Option<i64> {
        match self.written_id.load(Ordering::Acquire) {
            0 => None,
            id => Some(id),
        }
    }

    pub(crate) fn set_written_id(&self, id: i64) {
        self.written_id.store(id, Ordering::Release);
    }
}
