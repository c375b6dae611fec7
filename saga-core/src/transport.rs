//! The transport: publish with broker confirmation, consume as a group with
//! explicit acknowledgement.

use std::fmt;

use async_trait::async_trait;

use crate::error::Result;
use crate::ids::MessageId;
use crate::message::{Message, OutboxEntry};
use crate::wire::headers;

/// What a transport guarantees beyond the basic contract; conformance tests
/// check only what is claimed here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct Capabilities {
    /// Messages with the same ordering key reach a group in publish order.
    pub ordered_per_key: bool,
    /// A group that subscribes late still receives messages published before.
    pub replays_history: bool,
    /// Unacknowledged deliveries of a consumer that went away are redelivered.
    pub redelivers_unacked: bool,
}

/// A message broker seen as channels (topics, exchanges, streams).
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Publishes one message; returns once the broker confirmed it stored it.
    async fn publish(&self, channel: &str, message: &Message) -> Result<()>;

    /// Publishes several messages; one result per entry, in order. Messages of
    /// one ordering key are confirmed in order. The default publishes one by one.
    async fn publish_batch(&self, entries: &[OutboxEntry]) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            results.push(self.publish(&entry.channel, &entry.message).await);
        }
        results
    }

    /// Joins consumer group `group` on `channels`. Members of one group share
    /// the messages; every group receives every message.
    async fn subscribe(&self, group: &str, channels: &[String]) -> Result<Box<dyn Subscription>>;

    /// Whether the broker answers now (for health endpoints); reconnects
    /// first where the transport holds a connection. The default answers
    /// `Ok`: a transport with no connection to lose.
    async fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Deletes what the broker keeps for `channels`: each channel, its
    /// dead-letter channel, and the state of `groups` on them (their queues,
    /// their pending messages). Messages still in them are lost. A later
    /// publish or subscribe makes the channel anew; deleting what does not
    /// exist succeeds. For tests and demos that made channels of their own
    /// and must not leave them behind; members still subscribed may fail.
    async fn delete_channels(&self, channels: &[String], groups: &[String]) -> Result<()>;

    /// The dead letters of `channel` not replayed yet, oldest first, at most
    /// `limit`: what any consumer group of `channel` gave up on, with why.
    /// Entries that cannot be read as a message (malformed input kept as
    /// the broker got it) are left out; the broker's own tools show them.
    async fn dead_letters(&self, channel: &str, limit: usize) -> Result<Vec<DeadLetter>>;

    /// Publishes dead letter `id` of `channel` to `channel` again, as it was
    /// first published, and takes it off [`dead_letters`](Self::dead_letters).
    /// `Ok(false)`: `channel` has no such dead letter (already replayed, or
    /// never there). Every group of `channel` receives it again: a group
    /// that handled it before skips it as a duplicate, the one that gave up
    /// on it runs its handler again. A crash between the publish and the
    /// removal leaves it listed; replaying it again is harmless.
    async fn replay_dead_letter(&self, channel: &str, id: MessageId) -> Result<bool>;

    /// The channel where messages rejected from `channel` end up.
    fn dead_letter_channel(&self, channel: &str) -> String {
        format!("{channel}.dlq")
    }

    /// What this transport guarantees.
    fn capabilities(&self) -> Capabilities;
}

/// One member of a consumer group.
#[async_trait]
pub trait Subscription: Send {
    /// Waits for the next delivery. Messages that cannot be decoded never come
    /// out here: the transport dead-letters them with the decoding error.
    async fn next(&mut self) -> Result<Delivery>;
}

/// How a delivery is settled with the broker.
#[async_trait]
pub trait Acknowledger: Send {
    /// Processing succeeded: never deliver it again to this group.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Processing failed for now: deliver it again later, until the transport's
    /// delivery limit moves it to the dead-letter channel with `error`.
    async fn nack(self: Box<Self>, error: &str) -> Result<()>;
    /// Processing can never succeed: move it to the dead-letter channel now.
    async fn dead_letter(self: Box<Self>, error: &str) -> Result<()>;
    /// The consumer still holds the delivery and will settle it later:
    /// where the broker gives a delivery to another member after it sat
    /// unsettled for a while, the clock starts again. The default does
    /// nothing: a broker that takes deliveries back only from members that
    /// went away.
    async fn keep(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A message handed to one consumer, to be settled exactly once.
///
/// Dropping a delivery without settling it counts as a consumer that died:
/// the transport delivers the message again.
pub struct Delivery {
    /// The channel it came from.
    pub channel: String,
    /// The message.
    pub message: Message,
    /// How many times it was delivered to this group, this time included.
    pub attempt: u32,
    acker: Box<dyn Acknowledger>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("channel", &self.channel)
            .field("message", &self.message.id)
            .field("type", &self.message.message_type)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery settled through `acker` (for transport implementations).
    pub fn new(
        channel: impl Into<String>,
        message: Message,
        attempt: u32,
        acker: Box<dyn Acknowledger>,
    ) -> Self {
        Self {
            channel: channel.into(),
            message,
            attempt,
            acker,
        }
    }

    /// Acknowledges it.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    /// Asks for a later redelivery.
    pub async fn nack(self, error: &str) -> Result<()> {
        self.acker.nack(error).await
    }

    /// Dead-letters it with `error`.
    pub async fn dead_letter(self, error: &str) -> Result<()> {
        self.acker.dead_letter(error).await
    }

    /// Tells the broker the consumer still holds it (see [`Acknowledger::keep`]).
    pub async fn keep(&mut self) -> Result<()> {
        self.acker.keep().await
    }
}

/// A dead letter: the original message with the error and the source channel attached.
pub fn dead_letter_message(message: &Message, channel: &str, error: &str) -> Message {
    message
        .clone()
        .with_header(headers::DEAD_LETTER_ERROR, error)
        .with_header(headers::DEAD_LETTER_CHANNEL, channel)
}

/// A message a consumer group gave up on, as [`Transport::dead_letters`] lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// The message as it was first published.
    pub message: Message,
    /// Why it was dead-lettered: the handler's error, or the delivery limit.
    pub error: String,
}

impl DeadLetter {
    /// Splits a message read from a dead-letter channel (as
    /// [`dead_letter_message`] wrote it) into the message as first published
    /// and the error (for transport implementations).
    pub fn from_dead_message(mut message: Message) -> Self {
        let error = message
            .headers
            .remove(headers::DEAD_LETTER_ERROR)
            .unwrap_or_default();
        message.headers.remove(headers::DEAD_LETTER_CHANNEL);
        Self { message, error }
    }
}
