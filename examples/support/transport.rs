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

/// Connects to the transport called `name` (addresses from the environment),
/// with topics, queues or streams of this run's own.
pub(crate) async fn connect(name: &str) -> saga::Result<Arc<dyn Transport>> {
    // Names of this run's own, so that runs never see each other's messages.
    #[cfg_attr(
        not(any(feature = "kafka", feature = "amqp", feature = "redis")),
        allow(unused_variables)
    )]
    let prefix = format!("run-{}.", saga::MessageId::new());
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
