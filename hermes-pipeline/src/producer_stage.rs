//! The producer stage: asks one producer for what the pipeline has room for and
//! hands the messages to the processors.

use std::sync::Arc;

use futures::FutureExt;
use metrics::Gauge;
use tokio_util::sync::CancellationToken;

use crate::handler::{FailedIn, Handler};
use crate::in_flight::InFlight;
use crate::message::Message;
use crate::panic_message::{catch_panic, catch_panic_now};
use crate::processor_stage::DEADLINE_EXCEEDED;
use crate::producer::{DEFAULT_IDLE_BACKOFF, Draining, Produced, Producer};
use crate::rate_limiter::RateLimiter;
use crate::telemetry::StageMetrics;
use crate::terminator::Terminator;

/// Maps a message to its partition (any `u64`; taken modulo the processor count).
pub type PartitionFn<T> = Arc<dyn Fn(&Message<T>) -> u64 + Send + Sync>;

/// How a producer stage hands chunks to the processors.
pub(crate) enum Dispatch<T> {
    /// One queue that every processor takes chunks from.
    Shared {
        tx: async_channel::Sender<Vec<Message<T>>>,
        depth: Gauge,
    },
    /// One queue per processor; a message's partition picks it, keeping per-key order.
    Partitioned {
        txs: Vec<async_channel::Sender<Vec<Message<T>>>>,
        partition_by: PartitionFn<T>,
        depth: Gauge,
    },
}

impl<T> Clone for Dispatch<T> {
    fn clone(&self) -> Self {
        match self {
            Dispatch::Shared { tx, depth } => Dispatch::Shared {
                tx: tx.clone(),
                depth: depth.clone(),
            },
            Dispatch::Partitioned {
                txs,
                partition_by,
                depth,
            } => Dispatch::Partitioned {
                txs: txs.clone(),
                partition_by: partition_by.clone(),
                depth: depth.clone(),
            },
        }
    }
}

impl<T> Dispatch<T> {
    /// Sends the chunk on; gives back whatever no processor could take (only when
    /// every processor is gone, which a running pipeline never allows), and
    /// what `partition_by` panicked on, failed.
    fn send(&self, chunk: Vec<Message<T>>) -> Vec<Message<T>> {
        match self {
            Dispatch::Shared { tx, depth } => {
                let len = chunk.len();
                match tx.try_send(chunk) {
                    Ok(()) => {
                        depth.increment(len as f64);
                        Vec::new()
                    }
                    Err(error) => error.into_inner(),
                }
            }
            Dispatch::Partitioned {
                txs,
                partition_by,
                depth,
            } => {
                let partitions = txs.len() as u64;
                let mut parts: Vec<Vec<Message<T>>> = txs.iter().map(|_| Vec::new()).collect();
                let mut undelivered = Vec::new();
                for mut message in chunk {
                    match catch_panic_now(|| partition_by(&message)) {
                        // The remainder is below `partitions`, itself a usize.
                        Ok(key) => parts[(key % partitions) as usize].push(message),
                        Err(panic) => {
                            message.fail(format!("partition_by panicked: {panic}"));
                            undelivered.push(message);
                        }
                    }
                }
                for (tx, part) in txs.iter().zip(parts) {
                    if part.is_empty() {
                        continue;
                    }
                    let len = part.len();
                    match tx.try_send(part) {
                        Ok(()) => depth.increment(len as f64),
                        Err(error) => undelivered.extend(error.into_inner()),
                    }
                }
                undelivered
            }
        }
    }
}

/// Demand settings of the processors, as seen by a producer stage.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DemandSettings {
    /// The most a producer is asked for at once.
    pub(crate) max_demand: usize,
    /// A producer is asked again once this many slots are free (`max_demand -
    /// min_demand`); while draining, once any is.
    pub(crate) refill: usize,
}

pub(crate) struct ProducerStage<P, H: Handler> {
    pub(crate) producer: P,
    pub(crate) parts: ProducerParts<H>,
}

/// Everything a producer stage uses besides its producer (which need not be `Sync`).
pub(crate) struct ProducerParts<H: Handler> {
    pub(crate) dispatch: Dispatch<H::Data>,
    pub(crate) demand: DemandSettings,
    /// The most messages taken from the producer at the drain deadline, to be
    /// failed (see `fail_leftovers`).
    pub(crate) leftovers: usize,
    pub(crate) rate_limiter: Arc<RateLimiter>,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the drain deadline passes.
    pub(crate) deadline: CancellationToken,
    pub(crate) terminator: Terminator<H>,
    pub(crate) metrics: StageMetrics,
}

const UNDELIVERABLE: &str = "no processor is running to take the message";
const OVER_DEMAND: &str = "the producer returned more messages than were demanded";

impl<P, H> ProducerStage<P, H>
where
    H: Handler,
    P: Producer<H::Data>,
{
    pub(crate) async fn run(self) {
        let ProducerStage {
            mut producer,
            parts: stage,
        } = self;
        let mut draining = false;
        loop {
            if !draining && stage.shutdown.is_cancelled() {
                match catch_panic_now(|| producer.prepare_for_draining()) {
                    Ok(Draining::Stop) => break,
                    Ok(Draining::UntilFinished) => draining = true,
                    Err(panic) => {
                        tracing::error!(%panic, "prepare_for_draining panicked: the producer stops");
                        break;
                    }
                }
            }
            // Before the drain, waits end when it starts; during it, at its deadline.
            let stop = if draining {
                &stage.deadline
            } else {
                &stage.shutdown
            };
            if draining && stop.is_cancelled() {
                stage.fail_leftovers(&mut producer).await;
                break;
            }
            // Waits for the producer to have messages before taking slots for
            // it, in one wait that `stop` ends at either step.
            let ready_then_demand = async {
                catch_panic(|| producer.ready()).await?;
                Ok::<_, String>(stage.acquire_demand(draining).await)
            };
            let demand = match unless(stop, ready_then_demand).await {
                None => continue,
                Some(Ok(demand)) => demand,
                Some(Err(panic)) => {
                    tracing::error!(%panic, "ready panicked: the producer stops");
                    break;
                }
            };
            let produce = catch_panic(|| producer.produce(demand.asked));
            let Some(produced) = unless(stop, produce).await else {
                stage.give_back(&demand, 0);
                continue;
            };
            let produced = match produced {
                Ok(produced) => produced,
                Err(panic) => {
                    // What it held is lost with its state: it is not asked again.
                    tracing::error!(%panic, "produce panicked: the producer stops");
                    stage.give_back(&demand, 0);
                    break;
                }
            };
            match produced {
                Produced::Messages(messages) if !messages.is_empty() => {
                    stage.dispatch(messages, &demand).await
                }
                Produced::Messages(_) => stage.idle(&demand, DEFAULT_IDLE_BACKOFF, stop).await,
                Produced::Idle(backoff) => stage.idle(&demand, backoff, stop).await,
                Produced::Finished => {
                    stage.give_back(&demand, 0);
                    break;
                }
            }
        }
        tracing::debug!("producer stopped");
    }
}

impl<H: Handler> ProducerParts<H> {
    /// Free in-flight slots, cut down to what the rate limit allows: at
    /// least `refill`, or while draining at least one, since the slots a
    /// drain waits for may only free up once this producer's backlog (or its
    /// `Finished`) went through.
    async fn acquire_demand(&self, draining: bool) -> Demand {
        let in_flight = &self.terminator.in_flight;
        let at_least = if draining { 1 } else { self.demand.refill };
        let slots = in_flight.acquire(at_least, self.demand.max_demand).await;
        // Dropped mid-wait (shutdown), the slots must not leak.
        let guard = SlotsGuard { in_flight, slots };
        let asked = self.rate_limiter.room(slots).await;
        std::mem::forget(guard);
        Demand { slots, asked }
    }

    /// Puts `used` produced messages in flight, in the demand's slots, and
    /// frees the slots left over.
    fn give_back(&self, demand: &Demand, used: usize) {
        let in_flight = &self.terminator.in_flight;
        in_flight.admit(used);
        in_flight.give_back(demand.slots.saturating_sub(used));
    }

    async fn idle(&self, demand: &Demand, backoff: std::time::Duration, stop: &CancellationToken) {
        self.give_back(demand, 0);
        unless(stop, tokio::time::sleep(backoff)).await;
    }

    /// At the drain deadline: fails what the producer still holds ready (an
    /// ingress's accepted messages), without waiting for it or for demand, up
    /// to `leftovers` messages, yielding between rounds. A producer that is
    /// never empty (a channel whose senders live on) keeps the rest: it is
    /// not asked again, so those are never produced.
    async fn fail_leftovers<P: Producer<H::Data>>(&self, producer: &mut P) {
        let mut budget = self.leftovers;
        while budget > 0 {
            let ask = budget.min(self.demand.max_demand);
            let Some(Ok(Produced::Messages(messages))) =
                catch_panic(|| producer.produce(ask)).now_or_never()
            else {
                break;
            };
            if messages.is_empty() {
                break;
            }
            // More than asked is failed too: it was produced.
            budget = budget.saturating_sub(messages.len());
            self.metrics.received.increment(messages.len() as u64);
            self.fail(messages, DEADLINE_EXCEEDED, false).await;
            tokio::task::yield_now().await;
        }
    }

    async fn dispatch(&self, mut messages: Vec<Message<H::Data>>, demand: &Demand) {
        let excess = if messages.len() > demand.asked {
            messages.split_off(demand.asked)
        } else {
            Vec::new()
        };
        self.give_back(demand, messages.len());
        self.metrics
            .received
            .increment((messages.len() + excess.len()) as u64);
        if !excess.is_empty() {
            tracing::warn!(asked = demand.asked, excess = excess.len(), "{OVER_DEMAND}");
            self.fail(excess, OVER_DEMAND, false).await;
        }
        // Each part counts in the rate-limit window it is sent in; what the
        // window has no room for waits for the next, until the drain deadline.
        while !messages.is_empty() {
            let admit = self.rate_limiter.admit(messages.len());
            let Some(admitted) = unless(&self.deadline, admit).await else {
                self.fail(messages, DEADLINE_EXCEEDED, true).await;
                return;
            };
            let rest = messages.split_off(admitted);
            self.send(messages).await;
            messages = rest;
        }
    }

    /// Hands messages to the processors; fails what none could take.
    async fn send(&self, messages: Vec<Message<H::Data>>) {
        let sent = messages.len();
        let undelivered = self.dispatch.send(messages);
        self.metrics
            .succeeded
            .increment((sent - undelivered.len()) as u64);
        if !undelivered.is_empty() {
            self.fail(undelivered, UNDELIVERABLE, true).await;
        }
    }

    async fn fail(
        &self,
        mut messages: Vec<Message<H::Data>>,
        reason: &'static str,
        holds_slots: bool,
    ) {
        Message::fail_all(&mut messages, reason);
        if holds_slots {
            self.terminator
                .acknowledge(messages, FailedIn::Processor, &self.metrics)
                .await;
        } else {
            self.terminator
                .acknowledge_unadmitted(messages, FailedIn::Processor, &self.metrics)
                .await;
        }
    }
}

/// Runs `work` unless `stop` is cancelled first.
async fn unless<F: Future>(stop: &CancellationToken, work: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = stop.cancelled() => None,
        output = work => Some(output),
    }
}

/// What a producer is asked for, and what backs it.
struct Demand {
    /// In-flight slots held.
    slots: usize,
    /// What the producer is asked for (≤ slots, cut to the rate limit's room).
    asked: usize,
}

/// Frees held slots if the rate-limit wait is abandoned.
struct SlotsGuard<'a> {
    in_flight: &'a InFlight,
    slots: usize,
}

impl Drop for SlotsGuard<'_> {
    fn drop(&mut self) {
        self.in_flight.give_back(self.slots);
    }
}
