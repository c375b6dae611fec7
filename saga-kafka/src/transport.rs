//! The Kafka transport.
//!
//! A channel is a topic (`prefix + channel`), created by the transport with
//! [`KafkaConfig::partitions`] and [`KafkaConfig::replication`]; a group is a
//! Kafka consumer group starting at the earliest offset. The ordering key is
//! the record key, so one key stays in one partition, in order.
//!
//! | contract | how |
//! |---|---|
//! | publish confirmed | idempotent producer, `acks=all`; `publish` returns with the broker's acknowledgement |
//! | ack after the handler | an ack stores its partition's offset up to the oldest delivery not yet acked; the member commits what is stored every [`KafkaConfig::commit_interval`] (1 s), and when the partition is revoked or the member stops: one commit per interval however many acks, so that commits never queue up ahead of the group's heartbeats |
//! | nack, dropped delivery | the member seeks its partition back to that offset: the message and those after it come again, in order |
//! | dead member | the group rebalances; the new owner starts at the committed offset, so the acks of the member's last commit interval are delivered again |
//! | broker away | the client reconnects by itself; `next()` reports one of its errors at a time (the rest are logged at debug), so what is published after the outage is not queued behind them |
//! | subscription dropped | the member leaves its group on a thread of its own, waited for up to 3 s: a clean leave is quicker; a close held by a rebalance in progress goes on in the background |
//! | dead letter | produced to `<channel>.dlq` with the error, confirmed, then acked |
//! | attempts | counted by the member (Kafka keeps no delivery count) |
//! | dead letters listed | the `<channel>.dlq` topic read from its start to its end, less the ids in `<channel>.dlq.replayed` |
//! | dead letter replayed | produced to `<channel>` and confirmed, then its id to `<channel>.dlq.replayed` (a Kafka topic cannot lose one record) |
//!
//! Not guaranteed: the delivery count survives a rebalance. A message whose
//! handler kills its process every time is delivered again to each new owner
//! and never reaches the dead-letter topic by count; [`Transport::dead_letter_channel`]
//! still takes what handlers reject.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use saga_core::transport::{Capabilities, Subscription, Transport};
use saga_core::wire;
use saga_core::{DeadLetter, Error, Message, MessageId, OutboxEntry, Result};

use crate::config::KafkaConfig;
use crate::error::kafka;

mod dead_letters;
mod settle;
mod subscription;

/// Sagas over Kafka. Cheap to clone; clones share one producer.
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    created: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (key, value) in &config.extra {
        client.set(key, value);
    }
    client
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// Asks a broker for the cluster's metadata, waiting at most 5 s.
async fn probe(producer: &FutureProducer) -> Result<()> {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(None, Duration::from_secs(5))
            .map(|_| ())
    })
    .await
    .map_err(|e| Error::Unavailable(format!("Kafka metadata probe: {e}")))?
    .map_err(kafka("metadata"))
}

impl KafkaTransport {
    /// Connects to Kafka: builds the producer and checks that a broker answers.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let producer: FutureProducer = client_config(&config)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", millis(config.publish_timeout))
            .create()
            .map_err(|e| Error::Config(format!("Kafka producer: {e}")))?;
        let admin: AdminClient<DefaultClientContext> = client_config(&config)
            .create()
            .map_err(|e| Error::Config(format!("Kafka admin client: {e}")))?;
        probe(&producer).await.map_err(|e| {
            Error::Unavailable(format!(
                "Kafka at {}: {e}",
                saga_core::redact::redact_url(&config.brokers)
            ))
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer,
                admin,
                created: Mutex::default(),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The topic of `channel`.
    pub fn topic(&self, channel: &str) -> String {
        self.inner.config.topic(channel)
    }

    /// Creates the topics this process has not created or seen yet.
    async fn ensure_topics(&self, topics: &[String]) -> Result<()> {
        let missing: Vec<&String> = {
            let created = self.inner.created.lock().unwrap();
            let mut seen = HashSet::new();
            topics
                .iter()
                .filter(|t| !created.contains(*t) && seen.insert(*t))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let config = &self.inner.config;
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    config.partitions,
                    TopicReplication::Fixed(config.replication),
                )
            })
            .collect();
        let results = self
            .inner
            .admin
            .create_topics(
                &new,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(kafka("create topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(topic_error("creating", &topic, code)),
            }
        }
        self.inner
            .created
            .lock()
            .unwrap()
            .extend(missing.into_iter().cloned());
        Ok(())
    }
}

/// What the admin API answered for one topic, as an error saying whether a
/// retry can help.
fn topic_error(action: &str, topic: &str, code: RDKafkaErrorCode) -> Error {
    Error::backend(
        format!("{action} topic {topic:?}"),
        matches!(
            code,
            RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NotController
                | RDKafkaErrorCode::OperationTimedOut
        ),
        code.to_string(),
    )
}

fn record_headers(fields: impl IntoIterator<Item = (String, Vec<u8>)>) -> OwnedHeaders {
    fields
        .into_iter()
        .fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header {
                key: &key,
                value: Some(&value),
            })
        })
}

fn message_headers(message: &Message) -> OwnedHeaders {
    record_headers(
        wire::to_headers(message)
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes())),
    )
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn publish(&self, channel: &str, message: &Message) -> Result<()> {
        let topic = self.topic(channel);
        self.ensure_topics(std::slice::from_ref(&topic)).await?;
        let mut record = FutureRecord::to(&topic)
            .payload(&message.payload)
            .headers(message_headers(message));
        if let Some(key) = &message.ordering_key {
            record = record.key(key);
        }
        self.inner
            .producer
            .send(record, Timeout::Never)
            .await
            .map_err(|(e, _)| kafka("produce")(e))?;
        Ok(())
    }

    /// Queues every record, then waits for the acknowledgements in order:
    /// the producer batches them; the idempotent producer keeps their order
    /// per partition.
    async fn publish_batch(&self, entries: &[OutboxEntry]) -> Vec<Result<()>> {
        let topics: Vec<String> = entries.iter().map(|e| self.topic(&e.channel)).collect();
        if let Err(error) = self.ensure_topics(&topics).await {
            let text = error.to_string();
            let retryable = error.is_retryable();
            return entries
                .iter()
                .map(|_| Err(Error::backend("create topics", retryable, text.clone())))
                .collect();
        }
        let mut pending = Vec::with_capacity(entries.len());
        for (entry, topic) in entries.iter().zip(&topics) {
            let mut record = FutureRecord::to(topic)
                .payload(&entry.message.payload)
                .headers(message_headers(&entry.message));
            if let Some(key) = &entry.message.ordering_key {
                record = record.key(key);
            }
            pending.push(
                self.inner
                    .producer
                    .send_result(record)
                    .map_err(|(e, _)| kafka("produce")(e)),
            );
        }
        let mut results = Vec::with_capacity(entries.len());
        for sent in pending {
            results.push(match sent {
                Ok(future) => match future.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(kafka("produce")(e)),
                    Err(_) => Err(Error::Closed("the Kafka producer was dropped".into())),
                },
                Err(error) => Err(error),
            });
        }
        results
    }

    /// A broker returns the cluster's metadata within 5 s.
    async fn check(&self) -> Result<()> {
        probe(&self.inner.producer).await
    }

    async fn subscribe(&self, group: &str, channels: &[String]) -> Result<Box<dyn Subscription>> {
        subscription::subscribe(self, group, channels).await
    }

    /// Deletes each channel's topic and dead-letter topic. The groups'
    /// committed offsets on them go with the topics (the broker drops the
    /// offsets of a deleted topic); group ids are not prefixed, so `groups`
    /// are left alone: another run may share their names.
    async fn delete_channels(&self, channels: &[String], _groups: &[String]) -> Result<()> {
        let topics: Vec<String> = channels
            .iter()
            .flat_map(|c| {
                let dead = self.topic(&self.dead_letter_channel(c));
                [self.topic(c), format!("{dead}.replayed"), dead]
            })
            .collect();
        if topics.is_empty() {
            return Ok(());
        }
        {
            let mut created = self.inner.created.lock().unwrap();
            for topic in &topics {
                created.remove(topic);
            }
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let results = self
            .inner
            .admin
            .delete_topics(
                &names,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(kafka("delete topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => return Err(topic_error("deleting", &topic, code)),
            }
        }
        Ok(())
    }

    async fn dead_letters(&self, channel: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut letters = self.unreplayed(channel).await?;
        letters.truncate(limit);
        Ok(letters)
    }

    async fn replay_dead_letter(&self, channel: &str, id: MessageId) -> Result<bool> {
        let Some(letter) = self
            .unreplayed(channel)
            .await?
            .into_iter()
            .find(|letter| letter.message.id == id)
        else {
            return Ok(false);
        };
        self.publish(channel, &letter.message).await?;
        let marker = format!(
            "{}.replayed",
            self.topic(&self.dead_letter_channel(channel))
        );
        let id = id.to_string();
        self.inner
            .producer
            .send(
                FutureRecord::to(&marker).key(&id).payload(&id),
                Timeout::Never,
            )
            .await
            .map_err(|(e, _)| kafka("produce (replayed dead letter)")(e))?;
        Ok(true)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_per_key: true,
            replays_history: true,
            redelivers_unacked: true,
        }
    }
}

fn decode(raw_headers: &[(String, Vec<u8>)], payload: Vec<u8>) -> Result<Message> {
    let mut fields = Vec::with_capacity(raw_headers.len());
    for (name, value) in raw_headers {
        let text = String::from_utf8(value.clone())
            .map_err(|_| Error::InvalidMessage(format!("header `{name}` is not UTF-8 text")))?;
        fields.push((name.as_str(), text));
    }
    wire::from_headers(fields, payload)
}
