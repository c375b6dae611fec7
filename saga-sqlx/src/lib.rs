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
//! Not yet here: MySQL.

mod codec;
mod error;
#[cfg(feature = "postgres")]
mod postgres;
mod schema;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
pub use schema::validate_identifier;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
