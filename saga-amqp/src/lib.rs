//! RabbitMQ for saga-core: a [transport](AmqpTransport) on lapin with
//! durable topology, publisher confirms, manual acks and a dead-letter
//! exchange.
//!
//! ```no_run
//! use saga_amqp::{AmqpConfig, AmqpTransport};
//! use saga_core::{Message, Transport};
//!
//! # async fn run() -> saga_core::Result<()> {
//! // AMQP_URL, or amqp://guest:guest@127.0.0.1:5672/%2f
//! let transport = AmqpTransport::connect(AmqpConfig::from_env()).await?;
//! let mut orders = transport.subscribe("billing", &["orders".to_owned()]).await?;
//! transport.publish("orders", &Message::new("order.placed", b"{}".to_vec())).await?;
//! let delivery = orders.next().await?;
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! [`transport`] lists the exchanges and queues it declares, how each
//! delivery guarantee maps onto RabbitMQ, and the choice between sharing a
//! group's work and keeping the order per key.

mod config;
mod error;
pub mod transport;

pub use config::AmqpConfig;
pub use transport::AmqpTransport;
