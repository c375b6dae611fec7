//! Settling one Kafka delivery: an ack stores the offset for commit, a nack
//! or a drop seeks back, a dead letter is produced to `<channel>.dlq` first.

use std::sync::Arc;

use async_trait::async_trait;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use saga_core::Result;
use saga_core::transport::{Acknowledger, Transport};
use saga_core::wire::headers;

use super::record_headers;
use super::subscription::Shared;
use crate::error::kafka;

/// Settles one record.
pub(super) struct Settle {
    pub(super) shared: Arc<Shared>,
    pub(super) channel: String,
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
    /// The assignment it was delivered under.
    pub(super) epoch: u64,
    pub(super) attempt: u32,
    pub(super) key: Option<Vec<u8>>,
    pub(super) raw_headers: Vec<(String, Vec<u8>)>,
    pub(super) payload: Vec<u8>,
    pub(super) settled: bool,
}

impl Settle {
    fn rewind(&self) {
        self.shared.rewinds.lock().unwrap().push((
            self.topic.clone(),
            self.partition,
            self.offset,
            self.epoch,
        ));
    }
}

impl Drop for Settle {
    /// A delivery dropped unsettled is delivered again, as if its consumer had died.
    fn drop(&mut self) {
        if !self.settled {
            self.rewind();
        }
    }
}

#[async_trait]
impl Acknowledger for Settle {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settled = true;
        self.shared
            .acked(&self.topic, self.partition, self.offset, self.epoch)
    }

    async fn nack(mut self: Box<Self>, error: &str) -> Result<()> {
        if self.attempt >= self.shared.transport.config().max_deliveries {
            return self.dead_letter(error).await;
        }
        self.settled = true;
        self.rewind();
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, error: &str) -> Result<()> {
        let transport = &self.shared.transport;
        let topic = transport.topic(&transport.dead_letter_channel(&self.channel));
        let mut fields: Vec<(String, Vec<u8>)> = self
            .raw_headers
            .iter()
            .filter(|(k, _)| k != headers::DEAD_LETTER_ERROR && k != headers::DEAD_LETTER_CHANNEL)
            .cloned()
            .collect();
        fields.push((headers::DEAD_LETTER_ERROR.into(), error.as_bytes().to_vec()));
        fields.push((
            headers::DEAD_LETTER_CHANNEL.into(),
            self.channel.as_bytes().to_vec(),
        ));
        let mut record = FutureRecord::to(&topic)
            .payload(&self.payload)
            .headers(record_headers(fields));
        // A key keeps the dead letters of one key in order on one
        // partition; keyless ones all go to the first, so that they are
        // listed in the order they died even within one millisecond (the
        // listing sorts by timestamp, then partition and offset).
        record = match &self.key {
            Some(key) => record.key(key),
            None => record.partition(0),
        };
        transport
            .inner
            .producer
            .send(record, Timeout::Never)
            .await
            .map_err(|(e, _)| kafka("produce (dead letter)")(e))?;
        self.settled = true;
        self.shared
            .acked(&self.topic, self.partition, self.offset, self.epoch)
    }
}
