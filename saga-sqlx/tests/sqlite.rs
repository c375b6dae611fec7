//! The saga-core conformance suites against SQLite, one database file per test.

use saga_core::testing::unique;
use saga_sqlx::SqliteStore;

async fn store() -> Option<SqliteStore> {
    let path = std::env::temp_dir().join(format!("{}.db", unique("saga-sqlite")));
    let store = SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("a SQLite file in the temporary directory");
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

mod engine {
    saga_core::engine_conformance!(super::store, super::relay_cases::spawn_relay);
}

#[tokio::test]
async fn migrating_twice_changes_nothing() {
    let store = store().await.unwrap();
    store.migrate().await.unwrap();
}

/// Many transactions that read and then write, at once, all commit: none
/// fails with `SQLITE_BUSY` (a deferred transaction upgrading its lock while
/// another connection writes would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_read_then_write_transactions_all_commit() {
    use saga_core::{Message, OutboxEntry, OutboxStore, SagaId, SagaStore, Transactional};
    let store = store().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = store.begin().await?;
            // A read first: the transaction holds a snapshot, not yet the write lock.
            store.load(&mut tx, SagaId::new()).await?;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let entry =
                OutboxEntry::new("replies", Message::new("done", format!("{i}").into_bytes()));
            store.enqueue(&mut tx, &[entry]).await?;
            store.commit(tx).await
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("every transaction commits");
    }
    assert_eq!(store.stats().await.unwrap().pending, 64);
}

mod relay_cases;

mod relay {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_relays_publish_each_message_exactly_once() {
        let store = super::store().await.unwrap();
        super::relay_cases::two_relays_publish_each_message_exactly_once(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poison_message_is_dead_lettered_and_the_rest_flow() {
        let store = super::store().await.unwrap();
        super::relay_cases::a_poison_message_is_dead_lettered_and_the_rest_flow(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_aborted_mid_batch_loses_nothing() {
        let store = super::store().await.unwrap();
        super::relay_cases::a_relay_aborted_mid_batch_loses_nothing(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_stalled_past_its_lease_cannot_dead_letter() {
        let store = super::store().await.unwrap();
        super::relay_cases::a_relay_stalled_past_its_lease_cannot_dead_letter(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_workers_end() {
        let store = super::store().await.unwrap();
        super::relay_cases::dropped_workers_end(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_of_one_key_never_have_it_published_twice_at_once() {
        let store = super::store().await.unwrap();
        super::relay_cases::concurrent_writers_of_one_key_never_have_it_published_twice_at_once(
            store,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_is_published_in_commit_order() {
        let store = super::store().await.unwrap();
        super::relay_cases::a_key_is_published_in_commit_order(store).await;
    }
}

/// The application's own sqlx migrations and the store's share the file, in
/// either order, and each runs again without complaint: both sides leave
/// the other's versions in `_sqlx_migrations` alone.
#[tokio::test]
async fn the_applications_migrations_share_the_file() {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
    let dir = std::env::temp_dir().join(unique("saga-app-migrations"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("20200101000000_orders.sql"),
        "CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT NOT NULL);",
    )
    .unwrap();
    let mut app = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    app.set_ignore_missing(true);
    for store_first in [true, false] {
        let path = std::env::temp_dir().join(format!("{}.db", unique("saga-shared")));
        let pool = SqlitePool::connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true),
        )
        .await
        .unwrap();
        let store = SqliteStore::new(pool.clone());
        for _ in 0..2 {
            if store_first {
                store.migrate().await.expect("the store's migrations");
                app.run(&pool).await.expect("the application's migrations");
            } else {
                app.run(&pool).await.expect("the application's migrations");
                store.migrate().await.expect("the store's migrations");
            }
        }
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('orders', 'saga_outbox') ORDER BY name",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(
            tables,
            ["orders", "saga_outbox"],
            "store first: {store_first}"
        );
        pool.close().await;
        let _ = std::fs::remove_file(&path);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
