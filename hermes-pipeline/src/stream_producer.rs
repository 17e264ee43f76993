//! A producer over any `Stream`.

use std::fmt;

use futures::{FutureExt, Stream, StreamExt};

use crate::message::Message;
use crate::producer::{Produced, Producer};

/// Turns a [`Stream`] of messages into a [`Producer`].
///
/// Before it is asked, it waits for the stream's next item in
/// [`ready`](Producer::ready), so an idle stream holds no in-flight slots that
/// other producers could use. Asked for `demand`, it returns that item and
/// more that are ready without waiting, up to `demand` in all. It finishes
/// when the stream ends. The item it waited for is held until it is asked: if
/// the pipeline stops first, that item is dropped with the producer, like
/// those still in the stream.
///
/// ```
/// use futures::stream;
/// use hermes_pipeline::StreamProducer;
///
/// let producer = StreamProducer::from_data(stream::iter(1..=3u32));
/// # let _ = producer;
/// ```
pub struct StreamProducer<S: Stream> {
    stream: S,
    /// The item `ready` waited for, returned first when asked.
    next: Option<S::Item>,
    ended: bool,
}

impl<S: Stream> StreamProducer<S> {
    /// A producer of the stream's messages.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            next: None,
            ended: false,
        }
    }
}

impl<S, T> StreamProducer<futures::stream::Map<S, fn(T) -> Message<T>>>
where
    S: Stream<Item = T>,
{
    /// A producer that wraps each item of the stream in [`Message::new`].
    pub fn from_data(stream: S) -> Self {
        Self::new(stream.map(Message::new as fn(T) -> Message<T>))
    }
}

impl<S: Stream + fmt::Debug> fmt::Debug for StreamProducer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamProducer")
            .field("stream", &self.stream)
            .field("holds_next", &self.next.is_some())
            .field("ended", &self.ended)
            .finish()
    }
}

impl<S, T> Producer<T> for StreamProducer<S>
where
    S: Stream<Item = Message<T>> + Send + Unpin + 'static,
    T: Send + 'static,
{
    async fn produce(&mut self, demand: usize) -> Produced<T> {
        self.ready().await;
        let Some(first) = self.next.take() else {
            return Produced::Finished;
        };
        let mut messages = Vec::with_capacity(demand.min(1024));
        messages.push(first);
        while messages.len() < demand {
            match self.stream.next().now_or_never() {
                Some(Some(message)) => messages.push(message),
                Some(None) => {
                    self.ended = true;
                    break;
                }
                None => break,
            }
        }
        Produced::Messages(messages)
    }

    async fn ready(&mut self) {
        if self.next.is_none() && !self.ended {
            // Cancel-safe: an item is taken from the stream only as this completes.
            match self.stream.next().await {
                Some(message) => self.next = Some(message),
                None => self.ended = true,
            }
        }
    }
}
