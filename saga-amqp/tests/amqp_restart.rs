//! RabbitMQ restarted under a running publisher and consumer.
//!
//! A binary of its own: it stops the broker (`rabbitmqctl stop_app`), which
//! would break any test running beside it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_amqp::{AmqpConfig, AmqpTransport};
use saga_core::testing::{PATIENCE, unavailable, unique};
use saga_core::{Message, Transport};

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl is installed");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

/// Every message confirmed before `stop_app` and every message published
/// after `start_app` is consumed; the consumer reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_loses_no_confirmed_message() {
    let config = AmqpConfig::from_env().prefix(format!("{}.", unique("test")));
    let Some(transport) = (match AmqpTransport::connect(config).await {
        Ok(transport) => Some(transport),
        Err(e) => unavailable("RabbitMQ", e),
    }) else {
        return;
    };
    let channel = unique("orders");
    let mut sub = transport
        .subscribe("billing", std::slice::from_ref(&channel))
        .await
        .unwrap();
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let consumer = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                match sub.next().await {
                    Ok(delivery) => {
                        let label = String::from_utf8(delivery.message.payload.clone()).unwrap();
                        seen.lock().unwrap().insert(label);
                        let _ = delivery.ack().await;
                        // Slow enough that the restart finds work in flight.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        })
    };
    let publish = |i: usize| {
        let transport = transport.clone();
        let channel = channel.clone();
        async move {
            let message = Message::new("tick", format!("m{i}").into_bytes());
            for _ in 0..600 {
                if transport.publish(&channel, &message).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("m{i} never confirmed");
        }
    };
    for i in 0..200 {
        publish(i).await;
    }
    let before = seen.lock().unwrap().len();
    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    for i in 200..400 {
        publish(i).await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    while seen.lock().unwrap().len() < 400 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.abort();
    let seen = seen.lock().unwrap();
    let missing: Vec<_> = (0..400)
        .map(|i| format!("m{i}"))
        .filter(|l| !seen.contains(l))
        .collect();
    assert!(
        before < 200,
        "the restart came after everything was consumed"
    );
    assert!(missing.is_empty(), "never consumed: {missing:?}");
}
