//! Producers: the demand-driven sources of a pipeline.

use std::future::Future;
use std::time::Duration;

use crate::message::Message;

/// What a producer returns when asked for messages.
#[derive(Debug)]
pub enum Produced<T> {
    /// Up to `demand` messages. An empty vector is treated like
    /// `Idle(DEFAULT_IDLE_BACKOFF)`.
    Messages(Vec<Message<T>>),
    /// Nothing right now: ask again after this back-off.
    Idle(Duration),
    /// The source is exhausted: the producer is not asked again. When every
    /// producer has finished, the pipeline drains and stops.
    Finished,
}

/// Back-off applied when a producer returns an empty `Produced::Messages`.
pub const DEFAULT_IDLE_BACKOFF: Duration = Duration::from_millis(100);

/// What a producer wants when the pipeline starts draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Draining {
    /// Stop asking at once (what a broker-backed source wants: unasked messages
    /// simply stay in the broker).
    Stop,
    /// Keep asking, within demand, until the producer returns
    /// [`Produced::Finished`] (what an in-memory buffer of already accepted
    /// messages wants). If the drain deadline passes first, the producer is
    /// asked, without waiting, for what it holds ready, which is acknowledged
    /// as failed: an ingress's whole backlog (at most its capacity, as it
    /// stops accepting when the drain starts), any other producer's up to
    /// `max_in_flight` messages. What a producer still holds beyond that
    /// stays with it, never produced, and is dropped with it.
    UntilFinished,
}

/// A demand-driven source of messages.
///
/// The pipeline calls [`produce`](Producer::produce) with the demand it has room for
/// and never more: a producer must return at most `demand` messages. A producer that
/// returns more has the excess acknowledged as failed, so the in-flight bound holds.
///
/// `produce` must be cancel-safe: when the pipeline drains, a pending `produce`
/// future is dropped (a long poll is abandoned, not awaited).
pub trait Producer<T>: Send + 'static {
    /// Returns up to `demand` messages, or says to wait, or that the source is done.
    fn produce(&mut self, demand: usize) -> impl Future<Output = Produced<T>> + Send;

    /// Waits until the producer has messages, or something else to say, before
    /// the pipeline takes in-flight slots to ask it; called before every ask
    /// (a panic stops the producer, like one in `produce`). A producer that
    /// waits in `produce` for messages to arrive (a push buffer, a long poll)
    /// holds up to `max_demand` slots while it waits, which other producers of
    /// the same pipeline then lack; waiting here instead holds none. Must be
    /// cancel-safe, like `produce`. The default returns at once.
    fn ready(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Called once when the pipeline starts draining. The default stops at once.
    fn prepare_for_draining(&mut self) -> Draining {
        Draining::Stop
    }
}
