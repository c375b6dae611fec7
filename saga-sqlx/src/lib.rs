//! PostgreSQL and SQLite implementations of the saga-core stores, on sqlx.
//!
//! [`PostgresStore`] is an outbox, idempotency and saga store in one schema
//! of your database. Every write that belongs to a business transaction takes
//! your `sqlx::Transaction`, so the business row, the saga state and the
//! outgoing messages commit together or not at all.
//!
//! ```no_run
//! use saga_sqlx::PostgresStore;
//!
//! # async fn run() -> saga_core::Result<()> {
//! let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
//! let pool = sqlx::PgPool::connect(&url).await.map_err(|e| saga_core::Error::Unavailable(e.to_string()))?;
//! let store = PostgresStore::with_schema(pool, "orders_saga")?;
//! store.migrate().await?; // once at start-up; safe to repeat
//! # Ok(()) }
//! ```
//!
//! With the `sqlite` feature, [`SqliteStore`] keeps the same stores in one
//! SQLite file (no server): the embedded default.
//!
//! # Your rows in the same transaction
//! This crate re-exports the sqlx it is built on as [`sqlx`] (0.8), so you
//! need no dependency of your own (if you add one, it must be the same major
//! version, or its `Transaction` is another type). A transaction from
//! [`Transactional::begin`](saga_core::Transactional::begin) is a
//! `sqlx::Transaction`: write your business rows on it with `&mut *tx`
//! (`&mut **ctx.tx` inside a saga step), and they commit with the saga
//! state and the outgoing messages. [`SqlxResultExt::db_context`] turns
//! sqlx's errors into saga-core's, retryable where the stores' would be.
//!
//! The re-export serves functions and types (`sqlx::query`, `sqlx::Row`,
//! ...). sqlx's macros (`query!`, `query_as!`, `#[derive(sqlx::FromRow)]`)
//! expand to paths that start at a crate named `sqlx`: to use them, add
//! `sqlx = "0.8"` to your own dependencies (the same major version).
//!
//! ```no_run
//! use saga_sqlx::{SqliteStore, SqlxResultExt, sqlx};
//! use saga_core::Transactional;
//!
//! # async fn run() -> saga_core::Result<()> {
//! let store = SqliteStore::connect("sqlite://shop.db").await?;
//! sqlx::query("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, status TEXT NOT NULL)")
//!     .execute(store.pool())
//!     .await
//!     .db_context("creating the orders table")?;
//! let mut tx = store.begin().await?;
//! sqlx::query("INSERT INTO orders (id, status) VALUES (?, 'PENDING')")
//!     .bind("o-1")
//!     .execute(&mut *tx)
//!     .await
//!     .db_context("inserting the order")?;
//! // ... start a saga or enqueue messages on the same `tx` ...
//! store.commit(tx).await?;
//! # Ok(()) }
//! ```
//!
//! # Where your tables live
//! The store's tables are all named `saga_*` (`saga_outbox`, `saga_inbox`,
//! `saga_step_marks`, `saga_instances`, `saga_log`), beside sqlx's
//! `_sqlx_migrations`.
//! - PostgreSQL: they live in the store's own schema (`saga` unless
//!   [`PostgresStore::with_schema`] names another). Your tables live in any
//!   other schema of the same database, `public` as usual; one transaction
//!   writes both. Several stores (one per service) can share a database with
//!   a schema each.
//! - SQLite: one file holds both; give your tables any name not starting
//!   with `saga_`. If you run sqlx migrations of your own on the file, call
//!   `set_ignore_missing(true)` on your `Migrator`: the store's migrations
//!   and yours share `_sqlx_migrations`, and each side leaves the other's
//!   versions alone.

mod codec;
mod error;
#[cfg(feature = "postgres")]
mod postgres;
mod schema;
#[cfg(feature = "sqlite")]
mod sqlite;
mod uncancelled;

pub use error::SqlxResultExt;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
pub use schema::validate_identifier;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
/// The sqlx this crate is built on: write your business rows with it.
pub use sqlx;

/// [`PostgresStore`]'s transaction: the `Tx` of your saga steps and handlers.
#[cfg(feature = "postgres")]
pub type PostgresTx = sqlx::Transaction<'static, sqlx::Postgres>;

/// [`SqliteStore`]'s transaction: the `Tx` of your saga steps and handlers.
#[cfg(feature = "sqlite")]
pub type SqliteTx = sqlx::Transaction<'static, sqlx::Sqlite>;
