//! The Kafka-compatible broker SIGKILLed and restarted under a running
//! publisher and consumer.
//!
//! The test starts a broker of its own (nisshi, `NISSHI_BIN`, built by
//! `scripts/services kafka`) on a free port, storing in a fresh PostgreSQL
//! database (`NISSHI_STORAGE_URL`, default postgres://postgres@127.0.0.1:5432),
//! so that what the broker confirmed survives the kill.

use saga_core::testing::{transport, unique};
use saga_kafka::{KafkaConfig, KafkaTransport};

#[path = "support/nisshi.rs"]
mod nisshi;

use nisshi::Nisshi;

/// SIGKILL and restart mid-stream: nothing confirmed is lost; producer and
/// consumer go on by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_loses_no_confirmed_message() {
    let Some(mut broker) = Nisshi::start().await else {
        return;
    };
    let config = KafkaConfig::default()
        .brokers(broker.address())
        .prefix(format!("{}.", unique("restart")))
        .partitions(2);
    let subject = KafkaTransport::connect(config).await.unwrap();
    let restarted = &mut broker;
    transport::messages_survive_a_broker_restart(subject, move || async move {
        restarted.restart().await;
    })
    .await;
}
