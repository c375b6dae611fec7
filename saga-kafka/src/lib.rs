//! Kafka for saga-core: a [transport](KafkaTransport) on rdkafka with an
//! idempotent producer (`acks=all`), the ordering key as the record key, and
//! offsets stored when the handler succeeded and committed every second.
//!
//! ```no_run
//! use saga_core::{Message, Transport};
//! use saga_kafka::{KafkaConfig, KafkaTransport};
//!
//! # async fn run() -> saga_core::Result<()> {
//! // KAFKA_BROKERS, or 127.0.0.1:9092
//! let transport = KafkaTransport::connect(KafkaConfig::from_env()).await?;
//! let mut orders = transport.subscribe("billing", &["orders".to_owned()]).await?;
//! transport.publish("orders", &Message::new("order.placed", b"{}".to_vec())).await?;
//! let delivery = orders.next().await?;
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! [`transport`] tells how each delivery guarantee maps onto Kafka and what
//! Kafka cannot guarantee. No Kafka transactions: the outbox already makes a
//! state change and its messages atomic.

mod config;
mod error;
pub mod transport;

pub use config::KafkaConfig;
pub use transport::KafkaTransport;
