//! Picks the transport from the command line, for the examples.

use std::sync::Arc;

use saga::Transport;

/// The name given with `--transport`, or `memory`.
// Tests include this module but take no command line.
#[allow(dead_code)]
pub(crate) fn chosen() -> String {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--transport") {
        Some(at) => args.get(at + 1).cloned().unwrap_or_default(),
        None => "memory".into(),
    }
}

/// A prefix for topic, queue and stream names that no other run uses.
pub(crate) fn run_prefix() -> String {
    format!("run-{}.", saga::MessageId::new())
}

/// Connects to the transport called `name` (addresses from the environment);
/// every topic, queue or stream name starts with `prefix`.
#[cfg_attr(
    not(any(feature = "kafka", feature = "amqp", feature = "redis")),
    allow(unused_variables, clippy::unused_async)
)]
pub(crate) async fn connect(name: &str, prefix: &str) -> saga::Result<Arc<dyn Transport>> {
    Ok(match name {
        "memory" => Arc::new(saga::memory::MemoryTransport::default()),
        #[cfg(feature = "kafka")]
        "kafka" => Arc::new(
            saga::kafka::KafkaTransport::connect(
                saga::kafka::KafkaConfig::from_env().prefix(prefix),
            )
            .await?,
        ),
        #[cfg(feature = "amqp")]
        "amqp" => Arc::new(
            saga::amqp::AmqpTransport::connect(saga::amqp::AmqpConfig::from_env().prefix(prefix))
                .await?,
        ),
        #[cfg(feature = "redis")]
        "redis" => Arc::new(
            saga::redis::RedisTransport::connect(
                saga::redis::RedisConfig::from_env().prefix(prefix),
            )
            .await?,
        ),
        other => {
            return Err(saga::Error::Config(format!(
                "unknown transport {other:?}: use memory, or kafka, amqp, redis with the cargo feature of that name"
            )));
        }
    })
}
