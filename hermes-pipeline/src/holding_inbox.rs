//! The inbox of a stage that holds in-flight slots (a batcher, a batch
//! processor): it counts the messages the stage holds, and frees their slots
//! if the stage stops holding them.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use crate::in_flight::InFlight;
use crate::message::Message;
use crate::panic_message::log_caught;

/// What a holding inbox receives: some number of messages, each holding an
/// in-flight slot.
pub(crate) trait Parcel {
    /// The number of messages in it.
    fn messages(&self) -> usize;
}

impl<T> Parcel for Vec<Message<T>> {
    fn messages(&self) -> usize {
        self.len()
    }
}

/// A stage's inbox, which holds the in-flight slots of the messages the stage
/// received until it hands them on (to another stage, whose own inbox then
/// holds them) or acknowledges them (which frees them). Dropped as the stage
/// stops, it frees those of the messages it still holds: none once its sender
/// closed it and all it received was handed on, but a panic outside the calls
/// the stage contains (say, in a metrics recorder) loses what the stage had in
/// hand and the parcels waiting here (their completions report the drop),
/// unless the stage is restarted on it (a batcher): then only what it had in
/// hand, the messages of its open batches being acknowledged as failed (see
/// [`release_held`](Self::release_held)).
pub(crate) struct HoldingInbox<P: Parcel> {
    parcels: mpsc::UnboundedReceiver<P>,
    /// Messages received and not yet handed on or acknowledged.
    holding: usize,
    in_flight: Arc<InFlight>,
    /// The stage, as named in the log when it drops messages.
    stage: &'static str,
}

impl<P: Parcel> HoldingInbox<P> {
    /// The inbox of `stage` (a name for the log), on `parcels`.
    pub(crate) fn new(
        parcels: mpsc::UnboundedReceiver<P>,
        in_flight: Arc<InFlight>,
        stage: &'static str,
    ) -> Self {
        Self {
            parcels,
            holding: 0,
            in_flight,
            stage,
        }
    }

    /// The next parcel, whose messages the stage now holds; `None` once the
    /// inbox is closed and empty.
    pub(crate) async fn recv(&mut self) -> Option<P> {
        let parcel = self.parcels.recv().await?;
        self.holding += parcel.messages();
        Some(parcel)
    }

    /// Whether its sender is gone (or it was closed): nothing more comes.
    pub(crate) fn is_closed(&self) -> bool {
        self.parcels.is_closed()
    }

    /// Whether no parcel is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.parcels.is_empty()
    }

    /// `n` messages received were handed on, or acknowledged (which freed
    /// their slots): the stage no longer holds them.
    pub(crate) fn handed_on(&mut self, n: usize) {
        self.holding -= n;
    }

    /// A panic stopped the stage, which may be restarted on this inbox: of
    /// the messages it held, it lost all but `kept`, which it still has and
    /// acknowledges (that frees their slots). Frees the slots of the lost
    /// ones, and returns how many. The parcels waiting here are not lost.
    pub(crate) fn release_held(&mut self, kept: usize) -> usize {
        let lost = self.holding.saturating_sub(kept);
        self.holding -= lost;
        self.in_flight.release_lost(lost);
        lost
    }
}

impl<P: Parcel> Drop for HoldingInbox<P> {
    fn drop(&mut self) {
        // Closed first: the sender can then no longer send a parcel, and gets
        // back (and fails) one it tries to, so each parcel is counted once,
        // here or there.
        self.parcels.close();
        let mut lost = self.holding;
        loop {
            match self.parcels.try_recv() {
                Ok(parcel) => lost += parcel.messages(),
                Err(TryRecvError::Disconnected) => break,
                // A send begun before the close, on another thread, has yet
                // to land.
                Err(TryRecvError::Empty) => std::thread::yield_now(),
            }
        }
        if lost > 0 {
            log_caught(|| {
                tracing::error!(
                    lost,
                    "{} stopped holding messages: they are dropped",
                    self.stage
                );
            });
            self.in_flight.release_lost(lost);
        }
    }
}
