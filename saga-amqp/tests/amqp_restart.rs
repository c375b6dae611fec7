//! RabbitMQ restarted under a running publisher and consumer.
//!
//! A binary of its own: it stops the broker (`rabbitmqctl stop_app`), which
//! would break any test running beside it.

use saga_amqp::{AmqpConfig, AmqpTransport};
use saga_core::testing::{transport, unavailable, unique};

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl is installed");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

/// `stop_app` then `start_app` mid-stream: nothing confirmed is lost and the
/// consumer reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_loses_no_confirmed_message() {
    let config = AmqpConfig::from_env().prefix(format!("{}.", unique("test")));
    let Some(subject) = (match AmqpTransport::connect(config).await {
        Ok(transport) => Some(transport),
        Err(e) => unavailable("RabbitMQ", e),
    }) else {
        return;
    };
    transport::messages_survive_a_broker_restart(subject, || async {
        rabbitmqctl(&["stop_app"]);
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    })
    .await;
}
