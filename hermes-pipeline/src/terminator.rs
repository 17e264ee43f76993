//! Acknowledgement: the last step of every message, wherever its fate was decided.

use std::sync::Arc;

use crate::acknowledger::Acknowledger;
use crate::handler::{FailedIn, Handler};
use crate::in_flight::InFlight;
use crate::message::{Message, PendingCompletion};
use crate::panic_message::catch_panic;
use crate::telemetry::StageMetrics;

/// Acknowledges messages whose fate is final and frees their in-flight slots.
pub(crate) struct Terminator<H> {
    pub(crate) handler: Arc<H>,
    pub(crate) in_flight: Arc<InFlight>,
}

impl<H> Clone for Terminator<H> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

type Group<T> = (Arc<dyn Acknowledger<T>>, Vec<Message<T>>, Vec<Message<T>>);

impl<H: Handler> Terminator<H> {
    /// Acknowledges `messages` (successful and failed ones mixed): runs
    /// `handle_failed` on the failed ones, resolves completions, calls each
    /// acknowledger once with its (successful, failed) lists, then frees the slots.
    pub(crate) async fn acknowledge(
        &self,
        messages: Vec<Message<H::Data>>,
        failed_in: FailedIn,
        metrics: &StageMetrics,
    ) {
        let count = messages.len();
        self.acknowledge_unadmitted(messages, failed_in, metrics)
            .await;
        self.in_flight.release(count);
    }

    /// Like [`acknowledge`](Self::acknowledge), for messages that never held an
    /// in-flight slot (a producer's excess over demand).
    pub(crate) async fn acknowledge_unadmitted(
        &self,
        messages: Vec<Message<H::Data>>,
        failed_in: FailedIn,
        metrics: &StageMetrics,
    ) {
        if messages.is_empty() {
            return;
        }
        let (mut successful, mut failed) = if messages.iter().any(Message::is_failed) {
            messages
                .into_iter()
                .partition::<Vec<_>, _>(|message| !message.is_failed())
        } else {
            (messages, Vec::new())
        };
        if !failed.is_empty() {
            let hook = catch_panic(|| self.handler.handle_failed(&mut failed, failed_in));
            if let Err(panic) = hook.await {
                tracing::error!(%panic, "handle_failed panicked");
            }
        }
        metrics.succeeded.increment(successful.len() as u64);
        metrics.failed.increment(failed.len() as u64);
        // Completions resolve once the acknowledgers have run, so whoever
        // awaits one sees the acknowledgement's effects.
        let completions: Vec<_> = successful
            .iter_mut()
            .chain(failed.iter_mut())
            .filter_map(Message::take_completion)
            .collect();

        for (acknowledger, successful, failed) in group(successful, failed) {
            if let Err(panic) = catch_panic(|| acknowledger.ack(successful, failed)).await {
                tracing::error!(%panic, "acknowledger panicked");
            }
        }
        completions.into_iter().for_each(PendingCompletion::resolve);
    }
}

/// Groups messages by acknowledger (same `Arc`), keeping order within each list.
/// The common case, one acknowledger for all, moves the lists without copying.
/// Messages without an acknowledger are done: their completions were taken.
fn group<T>(successful: Vec<Message<T>>, failed: Vec<Message<T>>) -> Vec<Group<T>> {
    let mut all = successful.iter().chain(failed.iter());
    let first = all
        .next()
        .and_then(|message| message.acknowledger().cloned());
    if let Some(first) = &first {
        let same = |message: &Message<T>| {
            message
                .acknowledger()
                .is_some_and(|a| Arc::ptr_eq(a, first))
        };
        if all.all(same) {
            return vec![(first.clone(), successful, failed)];
        }
    }
    let mut groups: Vec<Group<T>> = Vec::new();
    let mut place = |message: Message<T>, is_failed: bool| {
        let Some(acknowledger) = message.acknowledger().cloned() else {
            return;
        };
        let index = match groups
            .iter()
            .position(|(a, _, _)| Arc::ptr_eq(a, &acknowledger))
        {
            Some(index) => index,
            None => {
                groups.push((acknowledger, Vec::new(), Vec::new()));
                groups.len() - 1
            }
        };
        let group = &mut groups[index];
        if is_failed {
            group.2.push(message)
        } else {
            group.1.push(message)
        }
    };
    successful
        .into_iter()
        .for_each(|message| place(message, false));
    failed.into_iter().for_each(|message| place(message, true));
    groups
}
