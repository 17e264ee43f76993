//! Containing panics of user callbacks, and turning them into failure reasons.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

/// Calls `call` and awaits the future it returns, catching a panic in either:
/// a callback may panic in its synchronous part, before it makes its future,
/// as well as while polled. `Err` holds the panic's message.
pub(crate) async fn catch_panic<F, Fut>(call: F) -> Result<Fut::Output, String>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    AssertUnwindSafe(async move { call().await })
        .catch_unwind()
        .await
        .map_err(|payload| panic_message(&*payload))
}

/// Calls the synchronous callback `call`, catching a panic: `Err` holds its
/// message.
pub(crate) fn catch_panic_now<T>(call: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(call)).map_err(|payload| panic_message(&*payload))
}

/// Logs with `log`, catching a panic there: a log that runs after a panic,
/// or while one unwinds, may meet the subscriber that panicked, and must not
/// stop what logs it (a supervisor, which would leave its stage dead; a drop,
/// which would leave slots unfreed).
pub(crate) fn log_caught(log: impl FnOnce()) {
    let _ = catch_panic_now(log);
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
