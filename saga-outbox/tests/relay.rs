//! The relay on the in-memory store and transport; the transport fails,
//! rejects or hangs on chosen messages.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::memory::{MemoryStore, MemoryTransport, PublishFault};
use saga_core::saga::{LogStatus, SagaLogEntry};
use saga_core::{
    Error, Message, OutboxEntry, OutboxStore, RetryPolicy, SagaId, SagaState, SagaStore,
    Transactional, Transport,
};
use saga_outbox::{Relay, RelayConfig, wait_until_delivered};

const CHANNEL: &str = "events";

#[derive(Clone, Copy)]
enum Rule {
    /// Fail this many publishes, retryably.
    Fail(u32),
    /// Reject every publish as permanently invalid.
    Reject,
    /// Never answer the first publish.
    Hang,
}

/// The in-memory broker, misbehaving for chosen payloads.
#[derive(Clone, Default)]
struct Flaky {
    inner: MemoryTransport,
    rules: Arc<Mutex<HashMap<String, Rule>>>,
}

impl Flaky {
    fn new() -> Self {
        let flaky = Self::default();
        let rules = Arc::clone(&flaky.rules);
        flaky.inner.on_publish(move |_, message| {
            let key = label(message);
            let mut rules = rules.lock().unwrap();
            match rules.get(&key).copied()? {
                Rule::Fail(0) => None,
                Rule::Fail(n) => {
                    rules.insert(key.clone(), Rule::Fail(n - 1));
                    Some(PublishFault::Fail(Error::Unavailable(format!(
                        "broker refused {key} for now"
                    ))))
                }
                Rule::Reject => Some(PublishFault::Fail(Error::InvalidMessage(format!(
                    "{key} is too large for the broker"
                )))),
                Rule::Hang => {
                    rules.remove(&key);
                    Some(PublishFault::Hang)
                }
            }
        });
        flaky
    }

    fn rule(&self, label: &str, rule: Rule) {
        self.rules.lock().unwrap().insert(label.to_owned(), rule);
    }

    fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    fn labels(&self) -> Vec<String> {
        self.inner.published(CHANNEL).iter().map(label).collect()
    }

    fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(self.inner.clone())
    }
}

fn label(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

fn config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(7)
        .poll_interval(Duration::from_millis(50))
        .lease(Duration::from_secs(5))
        .retry(
            RetryPolicy::attempts(5)
                .with_backoff(Duration::from_millis(100), Duration::from_secs(1)),
        )
}

/// Enqueues `per_key` messages for each key, interleaved, labelled `key:index`.
async fn fill(store: &MemoryStore, keys: &[&str], per_key: usize) {
    let mut tx = store.begin().await.unwrap();
    let mut entries = Vec::new();
    for index in 0..per_key {
        for key in keys {
            let message =
                Message::new("test", format!("{key}:{index}").into_bytes()).with_ordering_key(*key);
            entries.push(OutboxEntry::new(CHANNEL, message));
        }
    }
    store.enqueue(&mut tx, &entries).await.unwrap();
    store.commit(tx).await.unwrap();
}

/// Per key, the indexes in the order they were first published.
fn order_by_key(labels: &[String]) -> BTreeMap<String, Vec<usize>> {
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
    by_key
}

fn assert_complete_and_ordered(labels: &[String], keys: &[&str], per_key: usize) {
    let by_key = order_by_key(labels);
    for key in keys {
        assert_eq!(
            by_key.get(*key),
            Some(&(0..per_key).collect()),
            "key {key}: {labels:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn drains_everything_in_key_order() {
    let store = MemoryStore::new();
    let transport = Flaky::new();
    fill(&store, &["a", "b", "c"], 30).await;
    let relay = Relay::new(store.clone(), transport.transport(), config()).spawn();
    wait_until_delivered(&store, Duration::from_secs(30))
        .await
        .unwrap();
    let labels = transport.labels();
    assert_eq!(labels.len(), 90, "each message published once");
    assert_complete_and_ordered(&labels, &["a", "b", "c"], 30);
    relay.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_message_holds_back_its_key_only() {
    let store = MemoryStore::new();
    let transport = Flaky::new();
    transport.rule("slow:0", Rule::Fail(3));
    fill(&store, &["slow", "fast"], 5).await;
    let relay = Relay::new(store.clone(), transport.transport(), config());
    let first = relay.run_once().await.unwrap();
    assert_eq!(first.failed, 1);
    assert!(
        first.released >= 1,
        "the rest of the failed key is held back: {first:?}"
    );
    let labels = transport.labels();
    assert!(!labels.iter().any(|l| l.starts_with("slow")), "{labels:?}");
    assert!(
        labels.iter().any(|l| l.starts_with("fast")),
        "other keys flow meanwhile: {labels:?}"
    );
    let worker = relay.spawn();
    wait_until_delivered(&store, Duration::from_secs(60))
        .await
        .unwrap();
    let labels = transport.labels();
    assert_eq!(labels.len(), 10);
    assert_complete_and_ordered(&labels, &["slow", "fast"], 5);
    worker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_poison_message_is_dead_lettered_and_the_rest_flow() {
    let store = MemoryStore::new();
    let transport = Flaky::new();
    transport.rule("k:1", Rule::Reject);
    fill(&store, &["k"], 4).await;
    let relay = Relay::new(store.clone(), transport.transport(), config()).spawn();
    wait_until_delivered(&store, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(transport.labels(), ["k:0", "k:2", "k:3"]);
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(label(&dead[0].record.entry.message), "k:1");
    assert!(dead[0].error.contains("too large"), "{}", dead[0].error);
    assert_eq!(
        dead[0].record.attempts, 1,
        "a permanent error is not retried"
    );

    transport.clear();
    assert!(store.requeue_dead_letter(dead[0].record.seq).await.unwrap());
    wait_until_delivered(&store, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(transport.labels().last().map(String::as_str), Some("k:1"));
    relay.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_dead_letter_with_the_last_error() {
    let store = MemoryStore::new();
    let transport = Flaky::new();
    transport.rule("k:0", Rule::Fail(u32::MAX));
    fill(&store, &["k"], 2).await;
    let relay = Relay::new(store.clone(), transport.transport(), config()).spawn();
    wait_until_delivered(&store, Duration::from_secs(60))
        .await
        .unwrap();
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].record.attempts, 5,
        "every attempt of the policy was made"
    );
    assert!(
        dead[0].error.contains("broker refused k:0"),
        "{}",
        dead[0].error
    );
    assert_eq!(
        transport.labels(),
        ["k:1"],
        "the key moves on once its head is dead-lettered"
    );
    relay.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn two_relays_publish_each_message_exactly_once() {
    let store = MemoryStore::new();
    let transport = Flaky::new();
    let keys: Vec<String> = (0..40).map(|k| format!("k{k}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    fill(&store, &keys, 10).await;
    let a = Relay::new(store.clone(), transport.transport(), config().owner("a")).spawn();
    let b = Relay::new(store.clone(), transport.transport(), config().owner("b")).spawn();
    wait_until_delivered(&store, Duration::from_secs(60))
        .await
        .unwrap();
    let labels = transport.labels();
    assert_eq!(
        labels.len(),
        400,
        "no message published twice while both relays live"
    );
    assert_eq!(labels.iter().collect::<HashSet<_>>().len(), 400);
    assert_complete_and_ordered(&labels, &keys, 10);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_relay_killed_mid_batch_loses_nothing() {
    let store = MemoryStore::new();
    let transport = Flaky::new();
    transport.rule("a:3", Rule::Hang);
    fill(&store, &["a", "b"], 20).await;
    let doomed = Relay::new(
        store.clone(),
        transport.transport(),
        config().owner("doomed"),
    )
    .spawn();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        store.stats().await.unwrap().pending > 0,
        "the doomed relay is stuck with a claimed batch"
    );
    doomed.abort().await;
    let survivor = Relay::new(
        store.clone(),
        transport.transport(),
        config().owner("survivor"),
    )
    .spawn();
    wait_until_delivered(&store, Duration::from_secs(60))
        .await
        .unwrap();
    let labels = transport.labels();
    assert_complete_and_ordered(&labels, &["a", "b"], 20);
    survivor.shutdown().await;
}

#[test]
fn metrics_count_outcomes_and_report_lag() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use saga_outbox::metrics_names;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = MemoryStore::new();
            let transport = Flaky::new();
            transport.rule("k:0", Rule::Fail(2));
            transport.rule("p:0", Rule::Reject);
            fill(&store, &["k", "p"], 3).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            let config = config().lag_interval(Duration::from_secs(3600));
            let relay = Relay::new(store.clone(), transport.transport(), config).spawn();
            wait_until_delivered(&store, Duration::from_secs(60))
                .await
                .unwrap();
            relay.shutdown().await;
        });
    });
    let values: HashMap<String, DebugValue> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| (key.key().name().to_owned(), value))
        .collect();
    let counter = |name: &str| match values.get(name) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name}: {other:?}"),
    };
    let gauge = |name: &str| match values.get(name) {
        Some(DebugValue::Gauge(v)) => v.into_inner(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(counter(metrics_names::PUBLISHED), 5);
    assert_eq!(counter(metrics_names::FAILED), 2);
    assert_eq!(counter(metrics_names::DEAD_LETTERED), 1);
    // Refreshed once, at start: six messages waiting for five seconds.
    assert!((gauge(metrics_names::PENDING) - 6.0).abs() < f64::EPSILON);
    assert!(
        gauge(metrics_names::LAG_SECONDS) >= 5.0,
        "{}",
        gauge(metrics_names::LAG_SECONDS)
    );
}

/// Records `n` consumed messages; returns their ids.
async fn processed(store: &MemoryStore, n: usize) -> Vec<saga_core::MessageId> {
    use saga_core::IdempotencyStore;
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = saga_core::MessageId::new();
        let mut tx = store.begin().await.unwrap();
        store
            .begin_processing(&mut tx, "stock", id, saga_core::clock::now())
            .await
            .unwrap();
        store.commit(tx).await.unwrap();
        ids.push(id);
    }
    ids
}

/// Whether `id` would be processed as new.
async fn is_fresh(store: &MemoryStore, id: saga_core::MessageId) -> bool {
    use saga_core::IdempotencyStore;
    let mut tx = store.begin().await.unwrap();
    let begin = store
        .begin_processing(&mut tx, "stock", id, saga_core::clock::now())
        .await
        .unwrap();
    begin == saga_core::store::Begin::Fresh
}

/// A saga in `state`, last changed now.
async fn saga(store: &MemoryStore, state: SagaState) -> SagaId {
    let saga = saga_core::testing::saga_store::saga("order", state, None);
    let mut tx = store.begin().await.unwrap();
    store.create(&mut tx, &saga).await.unwrap();
    store.commit(tx).await.unwrap();
    saga.id
}

/// One choreography log entry of `correlation_id`, written now.
async fn log(store: &MemoryStore, correlation_id: &str) {
    let entry = SagaLogEntry {
        correlation_id: correlation_id.into(),
        consumer: "stock".into(),
        message_id: saga_core::MessageId::new(),
        message_type: "order.placed".into(),
        status: LogStatus::Handled,
        emitted: Vec::new(),
        error: None,
        at: saga_core::clock::now(),
    };
    let mut tx = store.begin().await.unwrap();
    store.append_log(&mut tx, &entry).await.unwrap();
    store.commit(tx).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retention_deletes_only_what_is_old_in_bounded_batches() {
    use saga_outbox::{Purged, Retention, RetentionPolicy};

    let store = MemoryStore::new();
    let transport = Flaky::new();
    let relay = Relay::new(
        store.clone(),
        transport.transport(),
        config().batch_size(100),
    );
    fill(&store, &["old"], 25).await;
    while relay.run_once().await.unwrap().claimed > 0 {}
    let old_ids = processed(&store, 15).await;
    let old_sagas = [
        saga(&store, SagaState::Completed).await,
        saga(&store, SagaState::Compensated).await,
    ];
    let kept_sagas = [
        saga(&store, SagaState::Running).await,
        saga(&store, SagaState::Compensating).await,
        saga(&store, SagaState::Failed).await,
    ];
    log(&store, "old-flow").await;
    tokio::time::advance(Duration::from_secs(2 * 3600)).await;
    let young_saga = saga(&store, SagaState::Completed).await;
    log(&store, "young-flow").await;
    fill(&store, &["young"], 5).await;
    while relay.run_once().await.unwrap().claimed > 0 {}
    let young_ids = processed(&store, 3).await;

    let policy = RetentionPolicy {
        published: Some(Duration::from_secs(3600)),
        processed: Some(Duration::from_secs(3600)),
        finished_sagas: Some(Duration::from_secs(3600)),
        saga_log: Some(Duration::from_secs(3600)),
        batch_size: 10,
        interval: Duration::from_secs(60),
    };
    let retention = Retention::new(store.clone(), policy);
    assert_eq!(
        retention.run_once().await.unwrap(),
        Purged {
            published: 25,
            processed: 15,
            finished_sagas: 2,
            saga_log: 1,
        }
    );
    for id in old_sagas {
        assert_eq!(
            store.get(id).await.unwrap(),
            None,
            "an old finished saga is gone"
        );
    }
    for id in kept_sagas.into_iter().chain([young_saga]) {
        assert!(
            store.get(id).await.unwrap().is_some(),
            "running, compensating, FAILED and young sagas stay"
        );
    }
    assert!(store.log("old-flow").await.unwrap().is_empty());
    assert_eq!(store.log("young-flow").await.unwrap().len(), 1);
    assert_eq!(retention.run_once().await.unwrap(), Purged::default());
    assert!(
        is_fresh(&store, old_ids[0]).await,
        "an expired record is gone"
    );
    assert!(
        !is_fresh(&store, young_ids[0]).await,
        "a young record stays"
    );
    assert_eq!(store.stats().await.unwrap().pending, 0);
}

/// Starts a relay on 40 slow messages, stops it mid-batch with `stop`, and
/// checks what a stop promises: the batch in hand is finished, nothing more
/// is published, nothing is both published and pending, and nothing stays
/// leased, so another relay claims every remaining message at once.
async fn stops_mid_batch_holding_nothing<F, Fut>(owner: &str, stop: F)
where
    F: FnOnce(saga_core::Worker) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let store = MemoryStore::new();
    let transport = Flaky::new();
    transport
        .inner
        .on_publish(|_, _| Some(PublishFault::Delay(Duration::from_millis(50))));
    fill(&store, &["a", "b", "c", "d"], 10).await;
    let relay = Relay::new(
        store.clone(),
        transport.transport(),
        config().batch_size(4).owner(owner),
    )
    .spawn();
    tokio::time::sleep(Duration::from_millis(120)).await;
    stop(relay).await;
    let published: HashSet<String> = transport.labels().into_iter().collect();
    assert!(
        !published.is_empty() && published.len() < 40,
        "stopped mid-run: {}",
        published.len()
    );
    // Ten poll intervals: a relay still running would publish more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        transport.labels().len(),
        published.len(),
        "nothing published after the stop"
    );
    let remaining = store
        .claim(&saga_core::store::ClaimRequest {
            owner: "next".into(),
            limit: 100,
            now: saga_core::clock::now(),
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap();
    assert!(
        remaining
            .iter()
            .all(|r| !published.contains(&label(&r.entry.message)))
    );
    assert_eq!(
        store.stats().await.unwrap().pending as usize,
        40 - published.len()
    );
    assert_eq!(
        remaining.len(),
        40 - published.len(),
        "every remaining message is claimable at once: none left leased"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_the_batch_in_hand_and_holds_nothing() {
    stops_mid_batch_holding_nothing("leaving", saga_core::Worker::shutdown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_relay_and_retention_end() {
    use saga_core::testing::worker::ends_when_dropped;
    use saga_outbox::{Retention, RetentionPolicy};
    let store = MemoryStore::new();
    let relay = Relay::new(store.clone(), Flaky::new().transport(), config());
    ends_when_dropped("relay", async || Ok(relay.spawn())).await;
    let retention = Retention::new(
        store,
        RetentionPolicy {
            interval: Duration::from_millis(20),
            ..RetentionPolicy::default()
        },
    );
    ends_when_dropped("retention", async || Ok(retention.spawn())).await;
}

/// A relay dropped mid-batch stops as `shutdown` does. (Real time: a relay
/// that spins after the drop would never let paused time advance, and the
/// test would hang instead of failing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_dropped_mid_batch_stops_and_holds_nothing() {
    stops_mid_batch_holding_nothing("dropped", async |relay| {
        drop(relay);
        // The batch in hand goes on in the background.
        tokio::time::sleep(Duration::from_millis(500)).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_detached_relay_keeps_publishing() {
    let store = MemoryStore::new();
    let transport = Flaky::new();
    Relay::new(store.clone(), transport.transport(), config())
        .spawn()
        .detach();
    fill(&store, &["a", "b"], 5).await;
    wait_until_delivered(&store, Duration::from_secs(30))
        .await
        .unwrap();
    assert_complete_and_ordered(&transport.labels(), &["a", "b"], 5);
}

/// Under the default configuration a broker outage never turns a message
/// into a dead letter: 200 retryable failures in a row (over an hour of
/// capped backoff), then the message goes out, in order.
#[tokio::test(start_paused = true)]
async fn an_outage_never_dead_letters_under_the_defaults() {
    let store = MemoryStore::new();
    let transport = Flaky::new();
    transport.rule("a:0", Rule::Fail(200));
    fill(&store, &["a"], 3).await;
    let relay = Relay::new(store.clone(), transport.transport(), RelayConfig::default()).spawn();
    wait_until_delivered(&store, Duration::from_secs(3 * 3600))
        .await
        .unwrap();
    assert!(
        store.dead_letters(10).await.unwrap().is_empty(),
        "nothing dead-lettered"
    );
    assert_eq!(transport.labels(), ["a:0", "a:1", "a:2"]);
    relay.shutdown().await;
}

/// A permanent error still dead-letters at once under the defaults.
#[tokio::test(start_paused = true)]
async fn a_permanent_error_dead_letters_at_once_under_the_defaults() {
    let store = MemoryStore::new();
    let transport = Flaky::new();
    transport.rule("a:0", Rule::Reject);
    fill(&store, &["a"], 2).await;
    let relay = Relay::new(store.clone(), transport.transport(), RelayConfig::default()).spawn();
    wait_until_delivered(&store, Duration::from_secs(60))
        .await
        .unwrap();
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].record.attempts, 1, "no retry of a permanent error");
    assert_eq!(transport.labels(), ["a:1"]);
    relay.shutdown().await;
}
