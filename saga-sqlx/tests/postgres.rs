//! The saga-core conformance suites against a real PostgreSQL, one schema per test.
//!
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/saga_test`).

use std::time::Duration;

use saga_core::testing::{unavailable, unique};
use saga_sqlx::PostgresStore;
use sqlx::postgres::PgPoolOptions;

async fn store() -> Option<PostgresStore> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/saga_test".to_owned());
    let pool = match PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
    {
        Ok(pool) => pool,
        Err(error) => return unavailable(&format!("PostgreSQL at {url}"), error),
    };
    let store = PostgresStore::with_schema(pool, &unique("t").replace('-', "_"))
        .expect("a valid schema name");
    store.migrate().await.expect("migrations apply");
    Some(store)
}

mod outbox {
    saga_core::outbox_conformance!(super::store);
}

mod idempotency {
    saga_core::idempotency_conformance!(super::store);
}

mod saga_store {
    saga_core::saga_store_conformance!(super::store);
}

mod relay_cases;

mod engine {
    saga_core::engine_conformance!(super::store, super::relay_cases::spawn_relay);
}

#[tokio::test]
async fn migrating_twice_changes_nothing() {
    let Some(store) = store().await else { return };
    store.migrate().await.unwrap();
}

/// One notification per committing transaction, none for a rolled-back one,
/// and a waiting relay wakes at the commit instead of at its poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_notifies_once_per_committed_transaction() {
    use saga_core::{Message, OutboxEntry, OutboxStore, Transactional};
    use sqlx::postgres::PgListener;

    let Some(store) = store().await else { return };
    let mut listener = PgListener::connect_with(store.pool()).await.unwrap();
    listener.listen(&store.notify_channel()).await.unwrap();
    let entry = || OutboxEntry::new("orders", Message::new("order.placed", b"{}".to_vec()));
    let quiet = Duration::from_millis(500);

    let mut tx = store.begin().await.unwrap();
    store.enqueue(&mut tx, &[entry()]).await.unwrap();
    drop(tx);
    assert!(
        tokio::time::timeout(quiet, listener.recv()).await.is_err(),
        "a rollback notifies nobody"
    );

    let mut tx = store.begin().await.unwrap();
    for _ in 0..3 {
        store.enqueue(&mut tx, &[entry(), entry()]).await.unwrap();
    }
    store.commit(tx).await.unwrap();
    tokio::time::timeout(quiet, listener.recv())
        .await
        .expect("notified at commit")
        .unwrap();
    assert!(
        tokio::time::timeout(quiet, listener.recv()).await.is_err(),
        "six rows, one notification"
    );

    let waiter = store.clone();
    let waiting =
        tokio::spawn(async move { waiter.wait_for_messages(Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tx = store.begin().await.unwrap();
    store.enqueue(&mut tx, &[entry()]).await.unwrap();
    store.commit(tx).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("woken by the commit, not at the 30 s poll interval")
        .unwrap();
}
