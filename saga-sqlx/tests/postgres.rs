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

#[tokio::test]
async fn migrating_twice_changes_nothing() {
    let Some(store) = store().await else { return };
    store.migrate().await.unwrap();
}
