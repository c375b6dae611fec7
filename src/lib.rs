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
//!   and SQLite stores;
//! - [`kafka`] (`saga-kafka`, feature `kafka`): the Kafka transport;
//! - [`amqp`] (`saga-amqp`, feature `amqp`): the RabbitMQ transport;
//! - [`redis`] (`saga-redis`, feature `redis`): the Redis Streams transport
//!   and a Redis idempotency store.
//!
//! Everything of `saga-core` is also available at the root (`saga::Orchestrator`).
//! A backend you do not enable is not compiled.
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

#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub use saga_amqp as amqp;
pub use saga_core as core;
pub use saga_core::*;
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use saga_kafka as kafka;
pub use saga_outbox as outbox;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use saga_redis as redis;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub use saga_sqlx as sql;

/// The README's Rust code, compiled and run as a doc test, so the README
/// says nothing that does not build.
#[cfg(all(doctest, feature = "sqlite"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
