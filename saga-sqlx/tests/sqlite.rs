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

#[tokio::test]
async fn migrating_twice_changes_nothing() {
    let store = store().await.unwrap();
    store.migrate().await.unwrap();
}
