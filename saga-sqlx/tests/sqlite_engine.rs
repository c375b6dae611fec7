//! The saga engine end to end on SQLite (see `engine_case`).

#[macro_use]
mod engine_case;

use saga_core::testing::unique;
use saga_sqlx::SqliteStore;

/// A store in its own file, with a `stock` table in it.
async fn store() -> Option<(SqliteStore, String)> {
    let path = std::env::temp_dir().join(format!("{}.db", unique("saga-engine")));
    let store = SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL CHECK (available >= 0))")
        .execute(store.pool())
        .await
        .unwrap();
    Some((store, "main".to_owned()))
}

engine_case!(SqliteStore, sqlx::Transaction<'static, sqlx::Sqlite>, store);
