//! Batch keys: which messages may share a batch.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

/// The key that splits a batcher's messages into batches: a batch never mixes keys.
///
/// Messages with the [`Default`](BatchKey::Default) key are batched together and their
/// batches are spread over the batcher's concurrency. Batches of any other key are
/// always handled by the same batch processor, so one key is handled serially, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BatchKey {
    /// No key: the batcher's common batch.
    #[default]
    Default,
    /// An integer key (a shard, a tenant id).
    Int(u64),
    /// A string key (a destination queue URL, a conversation id).
    Str(Arc<str>),
}

impl BatchKey {
    /// Whether this is the default key.
    pub fn is_default(&self) -> bool {
        matches!(self, BatchKey::Default)
    }

    /// A stable hash of the key, used to pick the batch processor for keyed batches.
    pub(crate) fn route_hash(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

impl From<u64> for BatchKey {
    fn from(key: u64) -> Self {
        BatchKey::Int(key)
    }
}

impl From<&str> for BatchKey {
    fn from(key: &str) -> Self {
        BatchKey::Str(key.into())
    }
}

impl From<String> for BatchKey {
    fn from(key: String) -> Self {
        BatchKey::Str(key.into())
    }
}

impl From<Arc<str>> for BatchKey {
    fn from(key: Arc<str>) -> Self {
        BatchKey::Str(key)
    }
}
