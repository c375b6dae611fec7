//! Dead letters on Kafka: a `<channel>.dlq` topic read whole, less the ids
//! recorded in `<channel>.dlq.replayed`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use saga_core::{DeadLetter, Error, Result, Transport};

use super::{KafkaTransport, client_config, decode};
use crate::config::KafkaConfig;
use crate::error::kafka;

/// How long reading a whole dead-letter topic may take.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Every record of `topic`, from its start to its end now, in offset order
/// per partition, on a consumer of its own that commits nothing.
fn read_topic(config: &KafkaConfig, topic: &str) -> Result<Vec<OwnedMessage>> {
    let consumer: BaseConsumer = client_config(config)
        .set(
            "group.id",
            format!("saga-reader-{}", uuid::Uuid::now_v7().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| Error::Config(format!("Kafka consumer: {e}")))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(kafka("metadata"))?;
    let mut list = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for partition in metadata
        .topics()
        .iter()
        .flat_map(rdkafka::metadata::MetadataTopic::partitions)
    {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.id(), Duration::from_secs(5))
            .map_err(kafka("watermarks"))?;
        if high > low {
            list.add_partition_offset(topic, partition.id(), Offset::Offset(low))
                .map_err(kafka("assign"))?;
            ends.insert(partition.id(), high);
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return Ok(records);
    }
    consumer.assign(&list).map_err(kafka("assign"))?;
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(Error::Unavailable(format!(
                "reading topic {topic:?} to its end took longer than {READ_TIMEOUT:?}"
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(error)) => return Err(kafka("reading")(error)),
            Some(Ok(record)) => {
                let (partition, offset) = (record.partition(), record.offset());
                if ends.get(&partition).is_some_and(|end| offset + 1 >= *end) {
                    ends.remove(&partition);
                }
                records.push(record.detach());
            }
        }
    }
    Ok(records)
}

fn owned_headers(record: &OwnedMessage) -> Vec<(String, Vec<u8>)> {
    record.headers().map_or_else(Vec::new, |headers| {
        headers
            .iter()
            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
            .collect()
    })
}

impl KafkaTransport {
    /// The dead letters of `channel` not replayed yet, oldest first.
    pub(super) async fn unreplayed(&self, channel: &str) -> Result<Vec<DeadLetter>> {
        let dead = self.topic(&self.dead_letter_channel(channel));
        let replayed = format!("{dead}.replayed");
        self.ensure_topics(&[dead.clone(), replayed.clone()])
            .await?;
        let config = self.inner.config.clone();
        let (records, markers) = tokio::task::spawn_blocking(move || {
            Ok::<_, Error>((read_topic(&config, &dead)?, read_topic(&config, &replayed)?))
        })
        .await
        .map_err(|e| Error::Unavailable(format!("reading dead letters: {e}")))??;
        let replayed: HashSet<Vec<u8>> = markers
            .iter()
            .filter_map(|m| m.payload().map(<[u8]>::to_vec))
            .collect();
        let mut letters: Vec<(i64, i32, i64, DeadLetter)> = records
            .iter()
            .filter_map(|record| {
                let payload = record.payload().unwrap_or_default().to_vec();
                match decode(&owned_headers(record), payload) {
                    Ok(message) => Some((
                        record.timestamp().to_millis().unwrap_or(0),
                        record.partition(),
                        record.offset(),
                        DeadLetter::from_dead_message(message),
                    )),
                    Err(error) => {
                        tracing::debug!(topic = record.topic(), offset = record.offset(), %error, "dead letter is not a message; not listed");
                        None
                    }
                }
            })
            .filter(|(.., letter)| !replayed.contains(letter.message.id.to_string().as_bytes()))
            .collect();
        letters.sort_by_key(|(at, partition, offset, _)| (*at, *partition, *offset));
        Ok(letters.into_iter().map(|(.., letter)| letter).collect())
    }
}
