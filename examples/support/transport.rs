//! The transport an example runs over, chosen on its command line.

use std::sync::Arc;

use saga::Transport;

/// Which transport (`--transport`); a broker's address comes from its
/// environment variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TransportKind {
    /// In memory, inside this process (no server).
    Memory,
    /// Kafka at `KAFKA_BROKERS` (cargo feature `kafka`).
    Kafka,
    /// RabbitMQ at `AMQP_URL` (cargo feature `amqp`).
    Amqp,
    /// Redis Streams at `REDIS_URL` (cargo feature `redis`).
    Redis,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Memory => "memory",
            Self::Kafka => "kafka",
            Self::Amqp => "amqp",
            Self::Redis => "redis",
        })
    }
}

/// Connects to the transport `kind` (address from the environment); every
/// topic, queue or stream name starts with `prefix`. A broker whose cargo
/// feature this build lacks is an error naming the feature.
#[cfg_attr(
    not(all(feature = "kafka", feature = "amqp", feature = "redis")),
    allow(clippy::unused_async)
)]
#[cfg_attr(
    not(any(feature = "kafka", feature = "amqp", feature = "redis")),
    allow(unused_variables)
)]
pub(crate) async fn connect(kind: TransportKind, prefix: &str) -> saga::Result<Arc<dyn Transport>> {
    Ok(match kind {
        TransportKind::Memory => Arc::new(saga::memory::MemoryTransport::default()),
        #[cfg(feature = "kafka")]
        TransportKind::Kafka => Arc::new(
            saga::kafka::KafkaTransport::connect(
                saga::kafka::KafkaConfig::from_env().prefix(prefix),
            )
            .await?,
        ),
        #[cfg(feature = "amqp")]
        TransportKind::Amqp => Arc::new(
            saga::amqp::AmqpTransport::connect(saga::amqp::AmqpConfig::from_env().prefix(prefix))
                .await?,
        ),
        #[cfg(feature = "redis")]
        TransportKind::Redis => Arc::new(
            saga::redis::RedisTransport::connect(
                saga::redis::RedisConfig::from_env().prefix(prefix),
            )
            .await?,
        ),
        #[allow(unreachable_patterns)]
        other => {
            return Err(saga::Error::Config(format!(
                "this build has no {other} transport: run it with `--features {other}`"
            )));
        }
    })
}
