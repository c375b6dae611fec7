//! A member of a consumer group: what it reads ahead, which partitions it
//! owns under which assignment, and how a delivery is settled.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use saga_core::transport::{Acknowledger, Delivery, Subscription, Transport};
use saga_core::{Error, Result};
use tokio::sync::mpsc;

use super::settle::Settle;
use super::{KafkaTransport, client_config, decode, millis};
use crate::error::kafka;

/// Joins `group` on the topics of `channels`; returns once the member has
/// its first assignment, or after a session timeout without one.
pub(super) async fn subscribe(
    transport: &KafkaTransport,
    group: &str,
    channels: &[String],
) -> Result<Box<dyn Subscription>> {
    if channels.is_empty() {
        return Err(Error::Config("subscribe needs at least one channel".into()));
    }
    let topics: Vec<String> = channels.iter().map(|c| transport.topic(c)).collect();
    let dead: Vec<String> = channels
        .iter()
        .map(|c| transport.topic(&transport.dead_letter_channel(c)))
        .collect();
    transport
        .ensure_topics(&[topics.clone(), dead].concat())
        .await?;
    let (joined, mut has_joined) = tokio::sync::watch::channel(false);
    let partitions: Arc<Mutex<HashMap<(String, i32), PartitionState>>> = Arc::default();
    let consumer: StreamConsumer<Rebalancing> = client_config(&transport.inner.config)
        .set("group.id", group)
        // Acks store offsets; librdkafka commits what is stored every
        // `commit_interval`, and on a revoke or a stop.
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.commit.interval.ms",
            millis(transport.inner.config.commit_interval),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            millis(transport.inner.config.session_timeout),
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
        transport: transport.clone(),
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
        transport.inner.config.session_timeout,
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
            .map(|c| (transport.topic(c), c.clone()))
            .collect(),
        received,
        poller,
    }))
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
    /// The offset stored for commit last (`None` before the first).
    stored: Option<i64>,
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

pub(super) struct Shared {
    pub(super) transport: KafkaTransport,
    consumer: Member,
    partitions: Arc<Mutex<HashMap<(String, i32), PartitionState>>>,
    /// Offsets nacked or dropped, with the assignment they were delivered
    /// under, to seek back to before the next delivery.
    pub(super) rewinds: Mutex<Vec<(String, i32, i64, u64)>>,
    /// Deliveries per (topic, partition, offset) by this member.
    attempts: Mutex<HashMap<(String, i32, i64), u32>>,
    /// Whether an error waits in the channel to `next()` (see [`poll`]).
    error_waiting: AtomicBool,
}

impl Shared {
    /// Marks an offset delivered under assignment `epoch` acked, and stores
    /// the partition's offset for commit as far as every older one is.
    pub(super) fn acked(&self, topic: &str, partition: i32, offset: i64, epoch: u64) -> Result<()> {
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
                // now knows nothing of this offset; storing from it would
                // commit what this assignment has not delivered.
                return Ok(());
            };
            state.outstanding.remove(&offset);
            let position = state.outstanding.first().copied().unwrap_or(state.next);
            if state.stored.is_some_and(|c| position <= c) {
                return Ok(());
            }
            state.stored = Some(position);
            position
        };
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition, Offset::Offset(position))
            .map_err(kafka("store offset"))?;
        self.consumer
            .store_offsets(&list)
            .map_err(kafka("store offset"))
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
                let offset = {
                    let mut partitions = shared.partitions.lock().unwrap();
                    // A partition assigned again since starts at the
                    // committed offset, which no unacked delivery is past.
                    let Some(state) = partitions
                        .get_mut(&(topic.clone(), partition))
                        .filter(|s| s.assigned && s.epoch == epoch)
                    else {
                        continue;
                    };
                    // An older offset still expected is where the
                    // partition must go back to.
                    let target = state.expect.map_or(offset, |e| e.min(offset));
                    state.expect = Some(target);
                    target
                };
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
