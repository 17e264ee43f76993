//! Restarting, in its place, a stage (a processor, a batcher) whose task a
//! panic stopped outside the calls it contains, say in a tracing subscriber
//! or a metrics recorder.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::panic_message::{catch_panic, log_caught};

/// The first pause before a stage stopped by a panic is restarted; it
/// doubles with each restart, up to [`RESTART_BACKOFF_MAX`], so a panic on
/// every message does not spin a core.
const RESTART_BACKOFF: Duration = Duration::from_millis(20);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A stage that ran this long before it panicked waits the first pause again.
const RESTART_BACKOFF_RESET: Duration = Duration::from_secs(30);

/// A stage its supervisor can run again after a panic escaped it.
pub(crate) trait Supervised {
    /// Runs the stage until it has nothing left to do. A panic escaping this
    /// leaves the stage whole enough for [`recover`](Self::recover).
    fn run(&mut self) -> impl Future<Output = ()> + Send;

    /// Called as soon as a panic escaped [`run`](Self::run), before anything
    /// else: accounts for the messages the stage lost (reported dropped, their
    /// slots freed), keeps those it can still acknowledge for
    /// [`settle`](Self::settle), and puts it back in a state `run` can start
    /// from.
    fn recover(&mut self) {}

    /// Called after [`recover`](Self::recover), whether or not the stage is
    /// restarted: settles what `recover` kept rather than dropped (a
    /// batcher acknowledges its open batches' messages as failed). A panic
    /// escaping this is recovered from like one escaping `run`.
    fn settle(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Whether the stage has nothing left to do (its input is closed and
    /// empty, say): it is not restarted then.
    fn finished(&mut self) -> bool;
}

/// Runs `stage` in `span` until it ends, restarting it in its place (after a
/// back-off) when a panic escapes it; what it kept as it recovered is
/// settled first, restarted or not. It is not restarted once `deadline` (the
/// drain's) passed, nor when it has nothing left to do: this then returns,
/// and its task ends. `what` names it in the log.
pub(crate) async fn supervise<S: Supervised>(
    mut stage: S,
    span: tracing::Span,
    deadline: CancellationToken,
    what: String,
) {
    let mut backoff = RESTART_BACKOFF;
    loop {
        let started = Instant::now();
        let run = catch_panic(|| stage.run().instrument(span.clone()));
        let Err(panic) = run.await else {
            tracing::debug!(parent: &span, "{what} stopped");
            return;
        };
        // At once, in the poll that caught the panic: nothing else sees the
        // stage as the panic left it.
        stage.recover();
        if let Err(panic) = catch_panic(|| stage.settle().instrument(span.clone())).await {
            // What it was settling is lost as if `run` had panicked; the
            // first `recover` left nothing more to settle.
            stage.recover();
            log_caught(
                || tracing::error!(parent: &span, %panic, "{what} panicked settling what a panic stopped"),
            );
        }
        if deadline.is_cancelled() || stage.finished() {
            log_caught(
                || tracing::error!(parent: &span, %panic, "{what} stopped by a panic outside the calls it contains: not restarted (the drain's deadline passed, or nothing is left for it)"),
            );
            return;
        }
        if started.elapsed() >= RESTART_BACKOFF_RESET {
            backoff = RESTART_BACKOFF;
        }
        log_caught(
            || tracing::error!(parent: &span, %panic, ?backoff, "{what} stopped by a panic outside the calls it contains: restarting it"),
        );
        tokio::select! {
            biased;
            () = deadline.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
        // Retired by a shrink, or its input drained by others, meanwhile.
        if stage.finished() {
            return;
        }
    }
}
