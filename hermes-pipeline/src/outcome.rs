//! The final fate of a message, as seen by whoever pushed it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::message::Reason;

/// How a message ended: acknowledged as successful, or as failed with a reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The message went through every stage and was acknowledged as successful.
    Succeeded,
    /// The message was acknowledged as failed.
    Failed(Reason),
}

impl Outcome {
    /// Whether the message succeeded.
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Succeeded)
    }
}

/// A future resolving with a message's [`Outcome`] once it is acknowledged.
///
/// Obtained from [`Message::attach_completion`](crate::Message::attach_completion) or
/// [`Ingress::try_push_tracked`](crate::Ingress::try_push_tracked). Dropping it is fine:
/// the message is still processed and acknowledged.
#[derive(Debug)]
pub struct Completion {
    rx: oneshot::Receiver<Outcome>,
}

impl Completion {
    pub(crate) fn new(rx: oneshot::Receiver<Outcome>) -> Self {
        Self { rx }
    }
}

/// Reason reported when a message was dropped without being acknowledged: the
/// runtime running the pipeline was shut down under it, the producer or stage
/// holding it panicked outside the handlers (say, in a metrics recorder), or a
/// handler replaced its completion
/// ([`Message::attach_completion`](crate::Message::attach_completion)).
const DROPPED: &str = "message dropped before acknowledgement (runtime shut down, its producer or a stage panicked outside the handlers, or its completion was replaced)";

impl Future for Completion {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|result| result.unwrap_or(Outcome::Failed(DROPPED.into())))
    }
}
