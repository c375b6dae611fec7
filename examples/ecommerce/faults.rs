//! Transports that misbehave on purpose, for the scenarios: each wraps a
//! real one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use saga::{
    DeadLetter, Message, MessageId, OutboxEntry, Subscription, Transport, transport::Capabilities,
};

/// Publishes every message twice: each consumer sees each message twice.
pub(crate) struct Twice(pub(crate) Arc<dyn Transport>);

#[async_trait]
impl Transport for Twice {
    async fn publish(&self, channel: &str, message: &Message) -> saga::Result<()> {
        self.0.publish(channel, message).await?;
        self.0.publish(channel, message).await
    }

    async fn publish_batch(&self, entries: &[OutboxEntry]) -> Vec<saga::Result<()>> {
        let doubled: Vec<OutboxEntry> = entries
            .iter()
            .flat_map(|e| [e.clone(), e.clone()])
            .collect();
        let results = self.0.publish_batch(&doubled).await;
        results
            .chunks(2)
            .map(|pair| match pair {
                [Ok(()), Ok(())] => Ok(()),
                [Err(e), _] | [_, Err(e)] => Err(saga::Error::Unavailable(e.to_string())),
                _ => Err(saga::Error::Unavailable("missing result".into())),
            })
            .collect()
    }

    async fn check(&self) -> saga::Result<()> {
        self.0.check().await
    }

    async fn subscribe(
        &self,
        group: &str,
        channels: &[String],
    ) -> saga::Result<Box<dyn Subscription>> {
        self.0.subscribe(group, channels).await
    }

    async fn delete_channels(&self, channels: &[String], groups: &[String]) -> saga::Result<()> {
        self.0.delete_channels(channels, groups).await
    }

    async fn dead_letters(&self, channel: &str, limit: usize) -> saga::Result<Vec<DeadLetter>> {
        self.0.dead_letters(channel, limit).await
    }

    async fn replay_dead_letter(&self, channel: &str, id: MessageId) -> saga::Result<bool> {
        self.0.replay_dead_letter(channel, id).await
    }

    fn dead_letter_channel(&self, channel: &str) -> String {
        self.0.dead_letter_channel(channel)
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
}

/// Confirms the first publish of one message type without delivering it (a
/// message lost on the way); everything else goes through, one by one.
pub(crate) struct LoseFirst {
    inner: Arc<dyn Transport>,
    message_type: &'static str,
    lost: AtomicBool,
}

impl LoseFirst {
    pub(crate) fn new(inner: Arc<dyn Transport>, message_type: &'static str) -> Self {
        Self {
            inner,
            message_type,
            lost: AtomicBool::new(false),
        }
    }

    fn loses(&self, message: &Message) -> bool {
        message.message_type == self.message_type && !self.lost.swap(true, Ordering::SeqCst)
    }
}

#[async_trait]
impl Transport for LoseFirst {
    async fn publish(&self, channel: &str, message: &Message) -> saga::Result<()> {
        if self.loses(message) {
            return Ok(());
        }
        self.inner.publish(channel, message).await
    }

    async fn check(&self) -> saga::Result<()> {
        self.inner.check().await
    }

    async fn subscribe(
        &self,
        group: &str,
        channels: &[String],
    ) -> saga::Result<Box<dyn Subscription>> {
        self.inner.subscribe(group, channels).await
    }

    async fn delete_channels(&self, channels: &[String], groups: &[String]) -> saga::Result<()> {
        self.inner.delete_channels(channels, groups).await
    }

    async fn dead_letters(&self, channel: &str, limit: usize) -> saga::Result<Vec<DeadLetter>> {
        self.inner.dead_letters(channel, limit).await
    }

    async fn replay_dead_letter(&self, channel: &str, id: MessageId) -> saga::Result<bool> {
        self.inner.replay_dead_letter(channel, id).await
    }

    fn dead_letter_channel(&self, channel: &str) -> String {
        self.inner.dead_letter_channel(channel)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}
