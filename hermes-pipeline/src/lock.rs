//! Locking a mutex whose holder may have panicked.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking its value as it is if a holder panicked: every value
/// guarded in this crate stays consistent between statements.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
