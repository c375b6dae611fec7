//! PostgreSQL and SQLite implementations of the outbox, idempotency and saga stores (sqlx), with embedded migrations and LISTEN/NOTIFY wake-up.
//!
//! **Not implemented yet.** This crate holds no code so far; issue #3
//! builds it. Until then, use the in-memory implementations in
//! `saga_core::memory`, which keep the same contracts.
