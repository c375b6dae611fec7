//! Every public async fn of the library can be awaited where the future must
//! be `Send`: inside `tokio::spawn`, an `#[async_trait]` method or an axum
//! handler. This file only compiles if each one's future is `Send`; its test
//! checks that every `pub async fn` in the crates' sources is spawned here,
//! so a new one cannot be forgotten.
//!
//! The engine's functions are checked generically (for every store) and on
//! each concrete store, whose transaction types differ.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use saga::memory::MemoryStore;
use saga::outbox::{Relay, RelayConfig, Retention, RetentionPolicy, wait_until_delivered};
use saga::store::SagaFilter;
use saga::{
    Delivery, EventConsumer, Message, Orchestrator, Participant, SagaId, Store, Transport, Worker,
};

#[derive(serde::Serialize, serde::Deserialize)]
struct Data;

/// Spawns `future` on the runtime: compiles only if it is `Send + 'static`.
/// (Not named `spawn`: the check below looks for each function's name.)
fn spawned<F>(future: F)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    drop(tokio::spawn(future));
}

/// saga-core's engine and saga-outbox's relay on any store.
fn engine<S: Store + Clone>(store: S, transport: Arc<dyn Transport>) {
    let orchestrator = Orchestrator::builder(
        store.clone(),
        Arc::clone(&transport),
        saga::OrchestratorConfig::new("orders"),
    )
    .build();
    let (o, s) = (orchestrator.clone(), store.clone());
    spawned(async move {
        let mut tx = s.begin().await?;
        o.start(&mut tx, "t", &Data).await?;
        o.start_with(&mut tx, "t", &Data, saga::StartOptions::default())
            .await?;
        saga::choreography::emit(&s, &mut tx, "orders", "events", Message::new("e", vec![]))
            .await?;
        s.commit(tx).await
    });
    let o = orchestrator.clone();
    spawned(async move {
        let id = o.start_saga("t", &Data).await?;
        o.handle_reply(&Message::new("r", vec![])).await?;
        o.drive(id).await?;
        o.saga(id).await?;
        o.list(&SagaFilter::default()).await?;
        o.overdue(std::time::Duration::from_secs(60)).await?;
        o.retry(SagaId::new()).await?;
        o.spawn().await?.shutdown().await;
        Ok::<(), saga::Error>(())
    });
    let participant = Participant::new("stock", "commands", store.clone(), Arc::clone(&transport));
    spawned(async move {
        participant.handle(&Message::new("c", vec![])).await?;
        participant.spawn().await?.abort().await;
        Ok::<(), saga::Error>(())
    });
    let consumer = EventConsumer::new("audit", ["events"], store.clone(), Arc::clone(&transport));
    spawned(async move {
        consumer.handle(&Message::new("e", vec![])).await?;
        consumer.spawn().await.map(Worker::detach)
    });
    let relay = Relay::new(store.clone(), transport, RelayConfig::default());
    let retention = Retention::new(store.clone(), RetentionPolicy::default());
    spawned(async move {
        relay.run_once().await?;
        retention.run_once().await?;
        wait_until_delivered(&store, Duration::from_secs(1)).await
    });
}

/// What the engine functions above cannot reach: deliveries, a worker's
/// stop signal and the in-memory store's inspection helpers.
fn core(delivery: [Delivery; 3], store: MemoryStore) {
    let [mut a, b, c] = delivery;
    spawned(async move {
        a.keep().await?;
        a.ack().await?;
        b.nack("later").await?;
        c.dead_letter("never").await
    });
    let (worker, signal) = Worker::empty();
    spawned(async move {
        signal.sleep(Duration::from_millis(1)).await;
        signal.stopped().await;
    });
    worker.detach();
    spawned(async move {
        store.row::<serde_json::Value>("orders", "o-1").await?;
        store.rows("orders").await;
        Ok::<(), saga::Error>(())
    });
}

#[cfg(feature = "sqlite")]
fn sqlite(store: saga::sql::SqliteStore, transport: Arc<dyn Transport>) {
    engine(store.clone(), transport);
    spawned(async move {
        store.migrate().await?;
        saga::sql::SqliteStore::connect("sqlite::memory:").await
    });
}

#[cfg(feature = "postgres")]
fn postgres(store: saga::sql::PostgresStore, transport: Arc<dyn Transport>) {
    engine(store.clone(), transport);
    spawned(async move { store.migrate().await });
}

#[cfg(feature = "kafka")]
fn kafka() {
    spawned(saga::kafka::KafkaTransport::connect(
        saga::kafka::KafkaConfig::from_env(),
    ));
}

#[cfg(feature = "amqp")]
fn amqp() {
    spawned(saga::amqp::AmqpTransport::connect(
        saga::amqp::AmqpConfig::from_env(),
    ));
}

#[cfg(feature = "redis")]
fn redis() {
    spawned(saga::redis::RedisTransport::connect(
        saga::redis::RedisConfig::from_env(),
    ));
    spawned(saga::redis::RedisIdempotencyStore::connect(
        saga::redis::RedisConfig::from_env(),
    ));
}

/// The functions above are never called: compiling them is the check.
#[test]
fn every_public_async_fn_is_spawned_here() {
    let _ = (engine::<MemoryStore>, core);
    #[cfg(feature = "sqlite")]
    let _ = sqlite;
    #[cfg(feature = "postgres")]
    let _ = postgres;
    #[cfg(feature = "kafka")]
    let _ = kafka;
    #[cfg(feature = "amqp")]
    let _ = amqp;
    #[cfg(feature = "redis")]
    let _ = redis;

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let this = std::fs::read_to_string(root.join("tests/send_futures.rs")).unwrap();
    let mut missing = BTreeSet::new();
    let mut found = 0;
    let mut dirs = vec![root.join("src")];
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir()
            && path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("saga-")
        {
            dirs.push(path.join("src"));
        }
    }
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                // The conformance suites are test code, run by the backends' tests.
                if !path.ends_with("testing") {
                    dirs.push(path);
                }
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            for line in source.lines() {
                let Some(rest) = line.trim_start().strip_prefix("pub async fn ") else {
                    continue;
                };
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found += 1;
                let called = [
                    format!(".{name}("),
                    format!("::{name}("),
                    format!(".{name}::<"),
                    format!(" {name}("),
                    format!("({name}("),
                ];
                if !called.iter().any(|call| this.contains(call.as_str())) {
                    missing.insert(format!("{name} ({})", path.display()));
                }
            }
        }
    }
    assert!(found > 20, "the scan found only {found} public async fns");
    assert!(
        missing.is_empty(),
        "public async fns not spawned in tests/send_futures.rs: {missing:?}"
    );
}
