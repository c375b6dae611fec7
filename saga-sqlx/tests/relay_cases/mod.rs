//! Relay cases every SQL store runs (called from each database's test file).

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
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
