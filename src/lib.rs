//! Sagas with compensations, a transactional outbox and idempotent consumers
//! for Rust services.
//!
//! This facade re-exports the workspace's crates:
//! - [`core`] (`saga-core`): the message envelope, errors, the store and
//!   transport traits, the saga engine (orchestrator, participant runtime,
//!   choreography consumer) and in-memory implementations of every trait;
//! - [`outbox`] (`saga-outbox`): the relay from any outbox store to any transport.
//!
//! - [`sql`] (`saga-sqlx`, features `postgres` and `sqlite`): the PostgreSQL
//!   and SQLite stores.
//!
//! Everything of `saga-core` is also available at the root (`saga::Orchestrator`).
//! Not implemented yet: the broker transports `saga-kafka`, `saga-amqp`,
//! `saga-redis` (features `kafka`, `amqp`, `redis`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use saga::memory::{MemoryStore, MemoryTransport};
//! use saga::outbox::{Relay, RelayConfig};
//!
//! # async fn run() -> saga::Result<()> {
//! let store = MemoryStore::new();
//! let transport = Arc::new(MemoryTransport::default());
//! let relay = Relay::new(store.clone(), transport.clone(), RelayConfig::default()).spawn();
//! relay.shutdown().await;
//! # Ok(()) }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

pub use saga_core as core;
pub use saga_core::*;
pub use saga_outbox as outbox;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub use saga_sqlx as sql;
