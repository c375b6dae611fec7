//! Relay cases every SQL store runs (called from each database's test file).

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::memory::{MemoryTransport, PublishFault};
use saga_core::{Error, Message, OutboxEntry, OutboxStore, RetryPolicy};
use saga_outbox::{Relay, RelayConfig, wait_until_delivered};

pub const CHANNEL: &str = "events";

pub fn config(owner: &str) -> RelayConfig {
    RelayConfig::default()
        .owner(owner)
        .batch_size(50)
        .poll_interval(Duration::from_millis(50))
        .lease(Duration::from_secs(2))
        .retry(
            RetryPolicy::attempts(5)
                .with_backoff(Duration::from_millis(50), Duration::from_millis(500)),
        )
}

/// The relay the engine suite runs beside the store (saga-core's
/// `engine::SpawnRelay`).
pub fn spawn_relay<S: OutboxStore + Clone>(
    store: S,
    transport: Arc<dyn saga_core::Transport>,
) -> saga_core::Worker {
    Relay::new(
        store,
        transport,
        RelayConfig::default()
            .poll_interval(Duration::from_millis(20))
            .lease(Duration::from_secs(2)),
    )
    .spawn()
}

/// Enqueues `per_key` messages per key, interleaved, labelled `key:index`.
pub async fn fill<S: OutboxStore>(store: &S, keys: usize, per_key: usize) {
    let mut tx = store.begin().await.unwrap();
    let mut entries = Vec::new();
    for index in 0..per_key {
        for key in 0..keys {
            let message = Message::new("test", format!("k{key}:{index}").into_bytes())
                .with_ordering_key(format!("k{key}"));
            entries.push(OutboxEntry::new(CHANNEL, message));
        }
    }
    store.enqueue(&mut tx, &entries).await.unwrap();
    store.commit(tx).await.unwrap();
}

pub fn label(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

/// Every message present, and per key in order of first publication.
pub fn assert_complete_and_ordered(labels: &[String], keys: usize, per_key: usize) {
    let mut seen = HashSet::new();
    let mut by_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for l in labels {
        if seen.insert(l.clone()) {
            let (key, index) = l.split_once(':').unwrap();
            by_key
                .entry(key.to_owned())
                .or_default()
                .push(index.parse().unwrap());
        }
    }
    assert_eq!(by_key.len(), keys, "every key published");
    for (key, indexes) in by_key {
        assert_eq!(
            indexes,
            (0..per_key).collect::<Vec<_>>(),
            "key {key} incomplete or out of order"
        );
    }
}

/// Two relays on one store: each message published once, keys in order.
pub async fn two_relays_publish_each_message_exactly_once<S: OutboxStore + Clone>(store: S) {
    fill(&store, 100, 20).await;
    let transport = MemoryTransport::default();
    let relays = [
        Relay::new(store.clone(), Arc::new(transport.clone()), config("a")).spawn(),
        Relay::new(store.clone(), Arc::new(transport.clone()), config("b")).spawn(),
    ];
    wait_until_delivered(&store, Duration::from_secs(60))
        .await
        .unwrap();
    let labels: Vec<String> = transport.published(CHANNEL).iter().map(label).collect();
    assert_eq!(
        labels.len(),
        2000,
        "no message published twice while both relays live"
    );
    assert_complete_and_ordered(&labels, 100, 20);
    for relay in relays {
        relay.shutdown().await;
    }
}

/// A message the broker rejects for good is dead-lettered; the rest flow; it can be requeued.
pub async fn a_poison_message_is_dead_lettered_and_the_rest_flow<S: OutboxStore + Clone>(store: S) {
    fill(&store, 2, 10).await;
    let transport = MemoryTransport::default();
    transport.on_publish(|_, m| {
        (label(m) == "k0:3")
            .then(|| PublishFault::Fail(Error::InvalidMessage("k0:3 is too large".into())))
    });
    let relay = Relay::new(store.clone(), Arc::new(transport.clone()), config("a")).spawn();
    wait_until_delivered(&store, Duration::from_secs(30))
        .await
        .unwrap();
    let labels: Vec<String> = transport.published(CHANNEL).iter().map(label).collect();
    assert_eq!(labels.len(), 19);
    assert!(!labels.contains(&"k0:3".to_owned()));
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(label(&dead[0].record.entry.message), "k0:3");
    assert!(dead[0].error.contains("too large"));
    transport.clear_publish_rule();
    assert!(store.requeue_dead_letter(dead[0].record.seq).await.unwrap());
    wait_until_delivered(&store, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        transport.published(CHANNEL).last().map(label).as_deref(),
        Some("k0:3")
    );
    relay.shutdown().await;
}

/// A relay stopped mid-batch: another publishes its messages once the lease expires.
pub async fn a_relay_aborted_mid_batch_loses_nothing<S: OutboxStore + Clone>(store: S) {
    fill(&store, 3, 30).await;
    let transport = MemoryTransport::default();
    transport.on_publish(|_, m| (label(m) == "k1:4").then_some(PublishFault::Hang));
    let doomed = Relay::new(store.clone(), Arc::new(transport.clone()), config("doomed")).spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(store.stats().await.unwrap().pending > 0, "stuck mid-batch");
    doomed.abort().await;
    transport.clear_publish_rule();
    let survivor = Relay::new(
        store.clone(),
        Arc::new(transport.clone()),
        config("survivor"),
    )
    .spawn();
    wait_until_delivered(&store, Duration::from_secs(30))
        .await
        .unwrap();
    let labels: Vec<String> = transport.published(CHANNEL).iter().map(label).collect();
    assert_complete_and_ordered(&labels, 3, 30);
    survivor.shutdown().await;
}

/// A relay that stalls past its lease (its broker call hangs, then fails
/// for good) is fenced. Another relay has taken the message over and is
/// still publishing it when the stalled relay gives up: the stalled relay's
/// dead letter is refused, so the message is not both published and dead,
/// and the key's next message does not go out before it.
pub async fn a_relay_stalled_past_its_lease_cannot_dead_letter<S: OutboxStore + Clone>(store: S) {
    fill(&store, 1, 3).await;
    let transport = MemoryTransport::default();
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = Arc::clone(&attempts);
    transport.on_publish(move |_, m| {
        if label(m) != "k0:0" {
            return None;
        }
        match counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            // The stalled relay: refused for good after 1.5 s.
            0 => Some(PublishFault::FailAfter(
                Duration::from_millis(1500),
                Error::InvalidMessage("k0:0 refused after a stall".into()),
            )),
            // The relay that took over: confirmed after 1.5 s.
            1 => Some(PublishFault::Delay(Duration::from_millis(1500))),
            _ => None,
        }
    });
    let relay = |owner: &str, lease: u64| {
        Relay::new(
            store.clone(),
            Arc::new(transport.clone()),
            config(owner).lease(Duration::from_millis(lease)),
        )
    };
    let stalled = relay("stalled", 300);
    let stalled = tokio::spawn(async move { stalled.run_once().await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let successor = relay("successor", 10_000);
    let taken = tokio::spawn(async move { successor.run_once().await });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let third = relay("third", 10_000);
    third.run_once().await.unwrap();
    let report = stalled.await.unwrap().unwrap();
    taken.await.unwrap().unwrap();
    for _ in 0..3 {
        third.run_once().await.unwrap();
    }
    assert_eq!(
        report.dead_lettered, 0,
        "the stalled relay's dead letter is refused: {report:?}"
    );
    assert!(store.dead_letters(10).await.unwrap().is_empty());
    let labels: Vec<String> = transport.published(CHANNEL).iter().map(label).collect();
    assert_complete_and_ordered(&labels, 1, 3);
    assert_eq!(store.stats().await.unwrap().pending, 0);
}

/// Dropping the handle of any worker on this store ends its tasks: the
/// relay, retention, and the engine's components (none keeps polling the
/// database behind the user's back).
pub async fn dropped_workers_end<S: saga_core::Store + Clone>(store: S) {
    use saga_core::testing::worker::{ends_when_dropped, engine_workers_end_when_dropped};
    use saga_outbox::{Retention, RetentionPolicy};
    let transport = Arc::new(MemoryTransport::default());
    let relay = Relay::new(store.clone(), transport.clone(), config("dropped"));
    ends_when_dropped("relay", async || Ok(relay.spawn())).await;
    let policy = RetentionPolicy {
        interval: Duration::from_millis(20),
        ..RetentionPolicy::default()
    };
    let retention = Retention::new(store.clone(), policy);
    ends_when_dropped("retention", async || Ok(retention.spawn())).await;
    engine_workers_end_when_dropped(store, transport).await;
}

/// A transport that remembers, per ordering key, which relay is publishing
/// it right now, and counts the times two relays published one key at once.
struct KeyWatch {
    inner: MemoryTransport,
    relay: usize,
    in_flight: Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
    overlaps: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl saga_core::Transport for KeyWatch {
    async fn publish(&self, channel: &str, message: &Message) -> saga_core::Result<()> {
        let key = message.ordering_key.clone().unwrap_or_default();
        let other = self
            .in_flight
            .lock()
            .unwrap()
            .insert(key.clone(), self.relay);
        if other.is_some_and(|other| other != self.relay) {
            self.overlaps
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        // Long enough for another relay to come by.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let published = self.inner.publish(channel, message).await;
        let mut in_flight = self.in_flight.lock().unwrap();
        if in_flight.get(&key) == Some(&self.relay) {
            in_flight.remove(&key);
        }
        published
    }

    async fn subscribe(
        &self,
        group: &str,
        channels: &[String],
    ) -> saga_core::Result<Box<dyn saga_core::Subscription>> {
        self.inner.subscribe(group, channels).await
    }

    async fn delete_channels(
        &self,
        channels: &[String],
        groups: &[String],
    ) -> saga_core::Result<()> {
        self.inner.delete_channels(channels, groups).await
    }

    async fn dead_letters(
        &self,
        channel: &str,
        limit: usize,
    ) -> saga_core::Result<Vec<saga_core::DeadLetter>> {
        self.inner.dead_letters(channel, limit).await
    }

    async fn replay_dead_letter(
        &self,
        channel: &str,
        id: saga_core::MessageId,
    ) -> saga_core::Result<bool> {
        self.inner.replay_dead_letter(channel, id).await
    }

    fn capabilities(&self) -> saga_core::Capabilities {
        self.inner.capabilities()
    }
}

/// Several writers commit messages of the same keys at once, so a key's
/// messages commit in another order than they were numbered, while two
/// relays publish: a key is never published by both relays at the same
/// time (its order at the broker would then be the broker's guess), and
/// every message arrives once.
pub async fn concurrent_writers_of_one_key_never_have_it_published_twice_at_once<
    S: OutboxStore + Clone,
>(
    store: S,
) {
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 40;
    let memory = MemoryTransport::default();
    let in_flight = Arc::default();
    let overlaps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let relays: Vec<_> = (0..2)
        .map(|relay| {
            let transport = KeyWatch {
                inner: memory.clone(),
                relay,
                in_flight: Arc::clone(&in_flight),
                overlaps: Arc::clone(&overlaps),
            };
            Relay::new(
                store.clone(),
                Arc::new(transport),
                config(&format!("relay-{relay}")).poll_interval(Duration::from_millis(5)),
            )
            .spawn()
        })
        .collect();
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..PER_WRITER {
                let mut tx = store.begin().await.unwrap();
                let message = Message::new("test.event", format!("w{writer}-{n}").into_bytes())
                    .with_ordering_key(format!("k{}", (writer + n) % 2));
                store
                    .enqueue(&mut tx, &[OutboxEntry::new(CHANNEL, message)])
                    .await
                    .unwrap();
                // Hold the transaction a little: later numbers commit first.
                let hold = (writer * 7 + n * 13) % 10;
                tokio::time::sleep(Duration::from_millis(hold as u64)).await;
                store.commit(tx).await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    wait_until_delivered(&store, Duration::from_secs(60))
        .await
        .unwrap();
    for relay in relays {
        relay.shutdown().await;
    }
    let published = memory.published(CHANNEL);
    let unique: HashSet<_> = published.iter().map(|m| m.id).collect();
    assert_eq!(unique.len(), WRITERS * PER_WRITER, "every message arrived");
    assert_eq!(
        overlaps.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a key was published by two relays at the same time"
    );
}

/// Two transactions write a message of one key, and the one that wrote
/// first commits last: the key's messages are published in commit order
/// (DESIGN: order means commit order), whatever order their `seq`s say.
/// A store may make the second writer of a key wait for the first, so that
/// the second commits last too; what is published first committed first.
pub async fn a_key_is_published_in_commit_order<S: OutboxStore + Clone>(store: S) {
    let first = Message::new("test.event", b"first".to_vec()).with_ordering_key("k");
    let second = Message::new("test.event", b"second".to_vec()).with_ordering_key("k");
    let committed: Arc<Mutex<Vec<saga_core::MessageId>>> = Arc::default();
    let mut tx = store.begin().await.unwrap();
    store
        .enqueue(&mut tx, &[OutboxEntry::new(CHANNEL, first.clone())])
        .await
        .unwrap();
    let other = {
        let (store, committed, second) = (store.clone(), Arc::clone(&committed), second.clone());
        tokio::spawn(async move {
            let mut tx = store.begin().await.unwrap();
            store
                .enqueue(&mut tx, &[OutboxEntry::new(CHANNEL, second.clone())])
                .await
                .unwrap();
            store.commit(tx).await.unwrap();
            committed.lock().unwrap().push(second.id);
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.commit(tx).await.unwrap();
    committed.lock().unwrap().push(first.id);
    other.await.unwrap();
    let memory = MemoryTransport::default();
    let relay = Relay::new(store.clone(), Arc::new(memory.clone()), config("relay")).spawn();
    wait_until_delivered(&store, Duration::from_secs(10))
        .await
        .unwrap();
    relay.shutdown().await;
    let published: Vec<_> = memory.published(CHANNEL).iter().map(|m| m.id).collect();
    let committed = committed.lock().unwrap().clone();
    let name = |id| if id == first.id { "first" } else { "second" };
    assert_eq!(
        published.iter().copied().map(name).collect::<Vec<_>>(),
        committed.iter().copied().map(name).collect::<Vec<_>>(),
        "published (left) in another order than committed (right)"
    );
}
