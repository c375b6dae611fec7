//! The saga engine end to end on PostgreSQL (see `engine_case`).

#[macro_use]
mod engine_case;

use saga_core::testing::{unavailable, unique};
use saga_sqlx::PostgresStore;
use sqlx::postgres::PgPoolOptions;

/// A store on its own schema, with a `stock` table in it.
async fn store() -> Option<(PostgresStore, String)> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/saga_test".to_owned());
    let pool = match PgPoolOptions::new().max_connections(5).connect(&url).await {
        Ok(pool) => pool,
        Err(error) => return unavailable(&format!("PostgreSQL at {url}"), error),
    };
    let store = PostgresStore::with_schema(pool, &unique("e").replace('-', "_")).unwrap();
    store.migrate().await.unwrap();
    let schema = store.schema().to_owned();
    sqlx::query(&format!(
        "CREATE TABLE {schema}.stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL CHECK (available >= 0))"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    Some((store, schema))
}

engine_case!(
    PostgresStore,
    sqlx::Transaction<'static, sqlx::Postgres>,
    store
);
