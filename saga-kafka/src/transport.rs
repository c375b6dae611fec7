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
//! | ack after the handler | offsets are committed by hand, only up to the oldest delivery not yet acked in each partition |
//! | nack, dropped delivery | the member seeks its partition back to that offset: the message and those after it come again, in order |
//! | dead member | the group rebalances; the new owner starts at the committed offset |
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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use saga_core::transport::{Acknowledger, Capabilities, Delivery, Subscription, Transport};
use saga_core::wire::{self, headers};
use saga_core::{DeadLetter, Error, Message, MessageId, OutboxEntry, Result};
use tokio::sync::mpsc;

use crate::config::KafkaConfig;
use crate::error::kafka;

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
        if channels.is_empty() {
            return Err(Error::Config("subscribe needs at least one channel".into()));
        }
        let topics: Vec<String> = channels.iter().map(|c| self.topic(c)).collect();
        let dead: Vec<String> = channels
            .iter()
            .map(|c| self.topic(&self.dead_letter_channel(c)))
            .collect();
        self.ensure_topics(&[topics.clone(), dead].concat()).await?;
        let (joined, mut has_joined) = tokio::sync::watch::channel(false);
        let partitions: Arc<Mutex<HashMap<(String, i32), PartitionState>>> = Arc::default();
        let consumer: StreamConsumer<Rebalancing> = client_config(&self.inner.config)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set(
                "session.timeout.ms",
                millis(self.inner.config.session_timeout),
            )
            .set("heartbeat.interval.ms", "500")
            .create_with_context(Rebalancing {
                partitions: Arc::clone(&partitions),
                joined,
            })
            .map_err(|e| Error::Config(format!("Kafka consumer: {e}")))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(kafka("subscribe"))?;
        let shared = Arc::new(Shared {
            transport: self.clone(),
            consumer: Member(Some(consumer)),
            partitions,
            rewinds: Mutex::default(),
            attempts: Mutex::default(),
            error_waiting: AtomicBool::new(false),
        });
        let (sender, received) = mpsc::channel(BUFFER);
        let poller = tokio::spawn(poll(Arc::clone(&shared), sender));
        // Return once this member is in the group, so that a member added now
        // takes its share of what is published next.
        if tokio::time::timeout(
            self.inner.config.session_timeout,
            has_joined.wait_for(|joined| *joined),
        )
        .await
        .is_err()
        {
            tracing::warn!(
                group,
                "no partition assignment yet; the member joins in the background"
            );
        }
        Ok(Box::new(KafkaSubscription {
            shared,
            channels: channels
                .iter()
                .map(|c| (self.topic(c), c.clone()))
                .collect(),
            received,
            poller,
        }))
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

/// Records a member reads ahead of its handler. The poll task blocks when
/// the buffer is full and polls again as soon as the handler takes one, so
/// rebalances are served between any two deliveries.
const BUFFER: usize = 256;

/// What a member knows of one partition it owns.
#[derive(Default)]
struct PartitionState {
    /// Whether this member owns the partition now.
    assigned: bool,
    /// Counts assignments and revocations, so that records read under an
    /// earlier assignment are dropped.
    epoch: u64,
    /// Offsets delivered and not yet acked.
    outstanding: BTreeSet<i64>,
    /// One past the highest offset delivered.
    next: i64,
    /// The offset committed last (`None` before the first commit).
    committed: Option<i64>,
    /// After a seek back: the offset the partition must deliver next; records
    /// read before the seek are dropped until it comes.
    expect: Option<i64>,
}

/// Tracks assignments: records of a partition that was taken away are the
/// new owner's to deliver, from the committed offset.
struct Rebalancing {
    partitions: Arc<Mutex<HashMap<(String, i32), PartitionState>>>,
    joined: tokio::sync::watch::Sender<bool>,
}

impl ClientContext for Rebalancing {}

impl ConsumerContext for Rebalancing {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Revoke(list) = rebalance {
            let mut partitions = self.partitions.lock().unwrap();
            for element in list.elements() {
                if let Some(state) =
                    partitions.get_mut(&(element.topic().to_owned(), element.partition()))
                {
                    *state = PartitionState {
                        epoch: state.epoch + 1,
                        ..PartitionState::default()
                    };
                }
            }
        }
    }

    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Assign(list) = rebalance {
            let mut partitions = self.partitions.lock().unwrap();
            for element in list.elements() {
                let state = partitions
                    .entry((element.topic().to_owned(), element.partition()))
                    .or_default();
                *state = PartitionState {
                    assigned: true,
                    epoch: state.epoch + 1,
                    ..PartitionState::default()
                };
            }
            self.joined.send_replace(true);
        }
    }
}

/// A member's consumer, which leaves its group on a thread of its own when
/// dropped, waited for up to [`LEAVE_WAIT`]. librdkafka's close returns once
/// the group let the member go: at once when the group is stable (the
/// member then left cleanly, and the others need not wait a session
/// timeout for its partitions), but only as long as a rebalance in
/// progress takes otherwise, which after a broker outage never ended in a
/// test. Dropping a subscription must not hold the runtime's thread longer.
struct Member(Option<StreamConsumer<Rebalancing>>);

/// How long dropping a subscription waits for its member to leave.
const LEAVE_WAIT: Duration = Duration::from_secs(3);

impl std::ops::Deref for Member {
    type Target = StreamConsumer<Rebalancing>;

    fn deref(&self) -> &Self::Target {
        self.0
            .as_ref()
            .expect("the consumer is taken only when the member is dropped")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let Some(consumer) = self.0.take() else {
            return;
        };
        let (left, has_left) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("saga-kafka-leave".into())
            .spawn(move || {
                drop(consumer);
                let _ = left.send(());
            });
        match spawned {
            Ok(_) => {
                if has_left.recv_timeout(LEAVE_WAIT).is_err() {
                    tracing::warn!(
                        "the Kafka consumer has not left its group after {LEAVE_WAIT:?}; it goes on leaving in the background"
                    );
                }
            }
            // The consumer went down with the closure: it closed here.
            Err(error) => {
                tracing::warn!(%error, "no thread to close the Kafka consumer on; it closed on the caller's");
            }
        }
    }
}

struct Shared {
    transport: KafkaTransport,
    consumer: Member,
    partitions: Arc<Mutex<HashMap<(String, i32), PartitionState>>>,
    /// Offsets nacked or dropped, with the assignment they were delivered
    /// under, to seek back to before the next delivery.
    rewinds: Mutex<Vec<(String, i32, i64, u64)>>,
    /// Deliveries per (topic, partition, offset) by this member.
    attempts: Mutex<HashMap<(String, i32, i64), u32>>,
    /// Whether an error waits in the channel to `next()` (see [`poll`]).
    error_waiting: AtomicBool,
}

impl Shared {
    /// Marks an offset delivered under assignment `epoch` acked, and commits
    /// as far as every older one is.
    fn acked(&self, topic: &str, partition: i32, offset: i64, epoch: u64) -> Result<()> {
        self.attempts
            .lock()
            .unwrap()
            .remove(&(topic.to_owned(), partition, offset));
        let position = {
            let mut partitions = self.partitions.lock().unwrap();
            let Some(state) = partitions
                .get_mut(&(topic.to_owned(), partition))
                .filter(|s| s.assigned && s.epoch == epoch)
            else {
                // Revoked meanwhile (and maybe assigned again): the owner
                // delivers it again from the committed offset. Its state
                // now knows nothing of this offset; committing from it
                // would commit what this assignment has not delivered.
                return Ok(());
            };
            state.outstanding.remove(&offset);
            let position = state.outstanding.first().copied().unwrap_or(state.next);
            if state.committed.is_some_and(|c| position <= c) {
                return Ok(());
            }
            state.committed = Some(position);
            position
        };
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition, Offset::Offset(position))
            .map_err(kafka("commit"))?;
        self.consumer
            .commit(&list, CommitMode::Async)
            .map_err(kafka("commit"))
    }
}

/// One record as read, owned.
struct Record {
    topic: String,
    partition: i32,
    offset: i64,
    epoch: u64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

/// Polls the consumer for as long as the subscription lives: this serves
/// the group's heartbeats and rebalances too.
///
/// The client's errors (a broker unreachable, all brokers down) tell of its
/// state; it reconnects by itself. One of them waits in the channel at a
/// time and the others are only logged: queued, the dozens an outage raises
/// would stand between `next()` and the messages after it, each costing its
/// caller a backoff.
async fn poll(shared: Arc<Shared>, sender: mpsc::Sender<Result<Record>>) {
    loop {
        let read = match shared.consumer.recv().await {
            Ok(message) => {
                let topic = message.topic().to_owned();
                let partition = message.partition();
                let epoch = shared
                    .partitions
                    .lock()
                    .unwrap()
                    .get(&(topic.clone(), partition))
                    .map_or(0, |p| p.epoch);
                Ok(Record {
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    headers: message
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                    topic,
                    partition,
                    epoch,
                })
            }
            Err(error) => {
                if shared.error_waiting.swap(true, Ordering::AcqRel) {
                    if crate::error::is_retryable(&error) {
                        tracing::debug!(%error, "Kafka consumer error (one is already waiting to be reported)");
                    } else {
                        tracing::warn!(%error, "Kafka consumer error (one is already waiting to be reported)");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(kafka("consume")(error))
            }
        };
        let failed = read.is_err();
        if sender.send(read).await.is_err() {
            return;
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct KafkaSubscription {
    shared: Arc<Shared>,
    /// topic → channel
    channels: HashMap<String, String>,
    received: mpsc::Receiver<Result<Record>>,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

impl KafkaSubscription {
    /// Seeks each partition with a nacked or dropped delivery back to the
    /// oldest such offset.
    async fn rewind(&self) -> Result<()> {
        let rewinds = std::mem::take(&mut *self.shared.rewinds.lock().unwrap());
        if rewinds.is_empty() {
            return Ok(());
        }
        let mut oldest: HashMap<(String, i32, u64), i64> = HashMap::new();
        for (topic, partition, offset, epoch) in rewinds {
            let at = oldest.entry((topic, partition, epoch)).or_insert(offset);
            *at = (*at).min(offset);
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            for ((topic, partition, epoch), offset) in oldest {
                {
                    let mut partitions = shared.partitions.lock().unwrap();
                    // A partition assigned again since starts at the
                    // committed offset, which no unacked delivery is past.
                    let Some(state) = partitions
                        .get_mut(&(topic.clone(), partition))
                        .filter(|s| s.assigned && s.epoch == epoch)
                    else {
                        continue;
                    };
                    state.expect = Some(state.expect.map_or(offset, |e| e.min(offset)));
                }
                if let Err(error) = shared.consumer.seek(
                    &topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(5),
                ) {
                    // The partition's records are dropped until `expect`
                    // comes: try again before the next delivery.
                    tracing::warn!(%topic, partition, offset, %error, "seek back failed; trying again");
                    shared
                        .rewinds
                        .lock()
                        .unwrap()
                        .push((topic, partition, offset, epoch));
                }
            }
        })
        .await
        .map_err(|e| Error::Unavailable(format!("seek: {e}")))
    }

    /// Registers a record as delivered; `None` for a record read under an
    /// earlier assignment or before a seek back.
    fn admit(&self, record: &Record) -> Option<u32> {
        {
            let mut partitions = self.shared.partitions.lock().unwrap();
            let state = partitions.get_mut(&(record.topic.clone(), record.partition))?;
            if !state.assigned || state.epoch != record.epoch {
                return None;
            }
            match state.expect {
                Some(expected) if record.offset != expected => return None,
                Some(_) => state.expect = None,
                None => {}
            }
            state.outstanding.insert(record.offset);
            state.next = state.next.max(record.offset + 1);
        }
        let mut attempts = self.shared.attempts.lock().unwrap();
        let count = attempts
            .entry((record.topic.clone(), record.partition, record.offset))
            .or_insert(0);
        *count += 1;
        Some(*count)
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            self.rewind().await?;
            let record = self
                .received
                .recv()
                .await
                .ok_or_else(|| Error::Closed("the Kafka poll task ended".into()))?;
            let record = record.inspect_err(|_| {
                self.shared.error_waiting.store(false, Ordering::Release);
            })?;
            let Some(attempt) = self.admit(&record) else {
                continue;
            };
            let channel = self
                .channels
                .get(&record.topic)
                .cloned()
                .unwrap_or_else(|| record.topic.clone());
            let settle = Settle {
                shared: Arc::clone(&self.shared),
                channel: channel.clone(),
                topic: record.topic,
                partition: record.partition,
                offset: record.offset,
                epoch: record.epoch,
                attempt,
                key: record.key,
                raw_headers: record.headers,
                payload: record.payload,
                settled: false,
            };
            let max = self.shared.transport.config().max_deliveries;
            if attempt > max {
                let error =
                    format!("delivered {attempt} times without an acknowledgement (limit {max})");
                Box::new(settle).dead_letter(&error).await?;
                continue;
            }
            match decode(&settle.raw_headers, settle.payload.clone()) {
                Ok(message) => {
                    return Ok(Delivery::new(channel, message, attempt, Box::new(settle)));
                }
                Err(error) => {
                    tracing::warn!(%channel, offset = settle.offset, %error, "undecodable record dead-lettered");
                    Box::new(settle).dead_letter(&error.to_string()).await?;
                }
            }
        }
    }
}

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
    async fn unreplayed(&self, channel: &str) -> Result<Vec<DeadLetter>> {
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

fn decode(raw_headers: &[(String, Vec<u8>)], payload: Vec<u8>) -> Result<Message> {
    let mut fields = Vec::with_capacity(raw_headers.len());
    for (name, value) in raw_headers {
        let text = String::from_utf8(value.clone())
            .map_err(|_| Error::InvalidMessage(format!("header `{name}` is not UTF-8 text")))?;
        fields.push((name.as_str(), text));
    }
    wire::from_headers(fields, payload)
}

/// Settles one record.
struct Settle {
    shared: Arc<Shared>,
    channel: String,
    topic: String,
    partition: i32,
    offset: i64,
    /// The assignment it was delivered under.
    epoch: u64,
    attempt: u32,
    key: Option<Vec<u8>>,
    raw_headers: Vec<(String, Vec<u8>)>,
    payload: Vec<u8>,
    settled: bool,
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
