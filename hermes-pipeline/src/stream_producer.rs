//! A producer over any `Stream`.

use futures::{FutureExt, Stream, StreamExt};

use crate::message::Message;
use crate::producer::{Produced, Producer};

/// Turns a [`Stream`] of messages into a [`Producer`].
///
/// Asked for `demand`, it waits for the stream's next item, then takes up to
/// `demand` items in all that are ready without waiting. It finishes when the
/// stream ends.
///
/// ```
/// use futures::stream;
/// use hermes_pipeline::StreamProducer;
///
/// let producer = StreamProducer::from_data(stream::iter(1..=3u32));
/// # let _ = producer;
/// ```
#[derive(Debug)]
pub struct StreamProducer<S> {
    stream: S,
    ended: bool,
}

impl<S> StreamProducer<S> {
    /// A producer of the stream's messages.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
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

impl<S, T> Producer<T> for StreamProducer<S>
where
    S: Stream<Item = Message<T>> + Send + Unpin + 'static,
    T: Send + 'static,
{
    async fn produce(&mut self, demand: usize) -> Produced<T> {
        if self.ended {
            return Produced::Finished;
        }
        let Some(first) = self.stream.next().await else {
            self.ended = true;
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
}
