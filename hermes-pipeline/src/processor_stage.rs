//! The processor stage: runs `prepare_messages` and `handle_message` on each chunk,
//! then routes messages to their batchers or acknowledges them.

use std::sync::Arc;

use metrics::Gauge;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::handler::{FailedIn, Handler, ProcessorContext};
use crate::message::Message;
use crate::panic_message::catch_panic;
use crate::processor_pool::Seat;
use crate::supervisor::Supervised;
use crate::telemetry::StageMetrics;
use crate::terminator::Terminator;

/// Reason given to messages still in the pipeline when the drain deadline passes.
pub(crate) const DEADLINE_EXCEEDED: &str =
    "shutdown deadline exceeded before the message was handled";

/// Where processors send messages bound for one batcher.
pub(crate) struct BatcherInlet<T> {
    pub(crate) name: Arc<str>,
    pub(crate) tx: mpsc::UnboundedSender<Vec<Message<T>>>,
    pub(crate) depth: Gauge,
}

impl<T> Clone for BatcherInlet<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            tx: self.tx.clone(),
            depth: self.depth.clone(),
        }
    }
}

pub(crate) struct ProcessorStage<H: Handler> {
    pub(crate) context: ProcessorContext,
    pub(crate) inbox: async_channel::Receiver<Vec<Message<H::Data>>>,
    pub(crate) batchers: Vec<BatcherInlet<H::Data>>,
    /// Its place in a pool that can shrink; `None` when partitioned.
    pub(crate) seat: Option<Seat>,
    pub(crate) deadline: CancellationToken,
    pub(crate) terminator: Terminator<H>,
    pub(crate) metrics: StageMetrics,
}

impl<H: Handler> Supervised for ProcessorStage<H> {
    /// Takes and handles chunks until its input is closed and empty or it
    /// retires. A panic escaping this (outside the calls it contains, say in
    /// a tracing subscriber) leaves the stage whole, the messages it lost
    /// accounted for: its supervisor runs it again, with nothing to recover.
    async fn run(&mut self) {
        while let Some(chunk) = self.next_chunk().await {
            // Handlers' panics are contained per message; one elsewhere (say,
            // in a metrics recorder) loses the messages this processor still
            // holds, not the processor: it takes the next chunk.
            let mut held = chunk.len();
            if let Err(panic) = catch_panic(|| self.handle(chunk, &mut held)).await {
                // The slots first: the log may panic too.
                self.terminator.in_flight.release_lost(held);
                tracing::error!(
                    processor = self.context.processor,
                    lost = held,
                    %panic,
                    "processor panicked outside its handlers: the messages it held are dropped"
                );
            }
            if self.retired() {
                break;
            }
        }
    }

    /// Whether this processor has nothing left to do: its input is closed
    /// and empty, or it retires now (and gives up its index).
    fn finished(&mut self) -> bool {
        (self.inbox.is_closed() && self.inbox.is_empty()) || self.retired()
    }
}

impl<H: Handler> ProcessorStage<H> {
    /// The next chunk, or `None` once the input is closed and empty, or this
    /// processor is retired by a smaller concurrency.
    async fn next_chunk(&mut self) -> Option<Vec<Message<H::Data>>> {
        loop {
            let Some(seat) = &mut self.seat else {
                return self.inbox.recv().await.ok();
            };
            tokio::select! {
                biased;
                chunk = self.inbox.recv() => return chunk.ok(),
                changed = seat.target.changed() => {
                    if changed.is_err() {
                        self.seat = None;
                    } else if self.retired() {
                        return None;
                    }
                }
            }
        }
    }

    /// Whether this processor retires now (and gives up its index).
    fn retired(&mut self) -> bool {
        let index = self.context.processor;
        self.seat.as_mut().is_some_and(|seat| seat.retire(index))
    }

    /// Handles a chunk; `held` counts its messages not yet handed to a
    /// batcher or acknowledged (whose slots a panic here would leave taken).
    async fn handle(&self, mut chunk: Vec<Message<H::Data>>, held: &mut usize) {
        self.metrics.queue_depth.decrement(chunk.len() as f64);
        self.metrics.received.increment(chunk.len() as u64);
        let started = Instant::now();
        let interrupted = self.deadline.is_cancelled() || {
            tokio::select! {
                biased;
                () = self.run_handlers(&mut chunk) => false,
                () = self.deadline.cancelled() => true,
            }
        };
        if interrupted {
            Message::fail_all(&mut chunk, DEADLINE_EXCEEDED);
        }
        self.metrics
            .duration
            .record(started.elapsed().as_secs_f64());
        let done = self.route(chunk, held);
        let acknowledged = done.len();
        self.terminator
            .acknowledge(done, FailedIn::Processor, &self.metrics)
            .await;
        *held -= acknowledged;
    }

    async fn run_handlers(&self, chunk: &mut [Message<H::Data>]) {
        let handler = &self.terminator.handler;
        let prepare = catch_panic(|| handler.prepare_messages(chunk, &self.context));
        if let Err(panic) = prepare.await {
            let reason = format!("prepare_messages panicked: {panic}");
            Message::fail_all(chunk, reason);
            return;
        }
        for message in chunk.iter_mut().filter(|message| !message.is_failed()) {
            let handle = catch_panic(|| handler.handle_message(message, &self.context));
            if let Err(panic) = handle.await {
                message.fail(format!("handle_message panicked: {panic}"));
            }
        }
    }

    /// Which batcher a message goes to; fails a message routed to an unknown one.
    fn batcher_of(&self, message: &mut Message<H::Data>) -> Option<usize> {
        if message.is_failed() {
            return None;
        }
        let Some(name) = message.batcher() else {
            return (!self.batchers.is_empty()).then_some(0);
        };
        let index = self
            .batchers
            .iter()
            .position(|batcher| &*batcher.name == name);
        if index.is_none() {
            let reason = format!("no batcher named {name:?}");
            message.fail(reason);
        }
        index
    }

    /// Sends messages on to their batchers and returns those whose fate is final
    /// here (failed, or successful with no batcher configured).
    fn route(&self, mut chunk: Vec<Message<H::Data>>, held: &mut usize) -> Vec<Message<H::Data>> {
        let mut routes = chunk.iter_mut().map(|message| self.batcher_of(message));
        let first = routes.next().flatten();
        // The common case: the whole chunk goes to one batcher, sent as it is.
        if let Some(index) = first
            && routes.all(|route| route == Some(index))
        {
            return self.forward(index, chunk, held);
        }
        let mut done = Vec::new();
        let mut outboxes: Vec<Vec<Message<H::Data>>> =
            self.batchers.iter().map(|_| Vec::new()).collect();
        for mut message in chunk {
            match self.batcher_of(&mut message) {
                Some(index) => outboxes[index].push(message),
                None => done.push(message),
            }
        }
        for (index, outbox) in outboxes.into_iter().enumerate() {
            if !outbox.is_empty() {
                done.extend(self.forward(index, outbox, held));
            }
        }
        done
    }

    /// Hands messages to batcher `index` (which then holds them); gives them
    /// back failed if it is gone.
    fn forward(
        &self,
        index: usize,
        messages: Vec<Message<H::Data>>,
        held: &mut usize,
    ) -> Vec<Message<H::Data>> {
        let batcher = &self.batchers[index];
        let len = messages.len();
        match batcher.tx.send(messages) {
            Ok(()) => {
                *held -= len;
                batcher.depth.increment(len as f64);
                self.metrics.succeeded.increment(len as u64);
                Vec::new()
            }
            Err(mpsc::error::SendError(mut messages)) => {
                let reason = format!("batcher {:?} is not running", batcher.name);
                Message::fail_all(&mut messages, reason);
                messages
            }
        }
    }
}
