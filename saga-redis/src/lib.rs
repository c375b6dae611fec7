//! Redis for saga-core: a Redis Streams [transport](RedisTransport) and a
//! Redis [idempotency store](RedisIdempotencyStore).
//!
//! ```no_run
//! use saga_core::{Message, Transport};
//! use saga_redis::{RedisConfig, RedisTransport};
//!
//! # async fn run() -> saga_core::Result<()> {
//! // REDIS_URL, or redis://127.0.0.1:6379
//! let transport = RedisTransport::connect(RedisConfig::from_env()).await?;
//! let mut orders = transport.subscribe("billing", &["orders".to_owned()]).await?;
//! transport.publish("orders", &Message::new("order.placed", b"{}".to_vec())).await?;
//! let delivery = orders.next().await?;
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! [`transport`] describes how each delivery guarantee maps onto streams and
//! what Redis cannot guarantee (order per key across competing members);
//! [`idempotency`] states the limit of an inbox that is not in your
//! database's transaction.

mod config;
mod error;
pub mod idempotency;
pub mod transport;

pub use config::RedisConfig;
pub use idempotency::{RedisIdempotencyStore, RedisTx};
pub use transport::RedisTransport;
