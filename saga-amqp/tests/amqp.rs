//! saga-amqp against a real RabbitMQ (`AMQP_URL`, default amqp://guest:guest@127.0.0.1:5672/%2f).

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use saga_amqp::{AmqpConfig, AmqpTransport};
use saga_core::testing::{PATIENCE, unavailable, unique};
use saga_core::wire::headers;
use saga_core::{Message, Transport};

fn config() -> AmqpConfig {
    AmqpConfig::from_env().prefix(format!("{}.", unique("test")))
}

async fn transport() -> Option<AmqpTransport> {
    match AmqpTransport::connect(config()).await {
        Ok(transport) => Some(transport),
        Err(e) => unavailable("RabbitMQ", e),
    }
}

mod transport_suite {
    // Order per key only with a single active consumer (the module below);
    // no history: a group sees what is published after it exists.
    saga_core::transport_conformance!(super::transport, claims: {
        ordered_per_key: false,
        replays_history: false,
        redelivers_unacked: true,
    });
}

async fn ordered() -> Option<AmqpTransport> {
    match AmqpTransport::connect(config().single_active_consumer(true)).await {
        Ok(transport) => Some(transport),
        Err(e) => unavailable("RabbitMQ", e),
    }
}

/// With a single active consumer per group, order per key holds across
/// competing members, and a member that dies hands over to the next.
mod single_active_consumer {
    use saga_core::testing::transport;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn order_per_key_is_kept() {
        let Some(subject) = super::ordered().await else {
            return;
        };
        assert!(saga_core::Transport::capabilities(&subject).ordered_per_key);
        transport::order_per_key_is_kept(subject).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unacked_delivery_goes_to_another_member() {
        let Some(subject) = super::ordered().await else {
            return;
        };
        transport::unacked_delivery_goes_to_another_member(subject).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeated_nacks_end_in_the_dead_letter_channel() {
        let Some(subject) = super::ordered().await else {
            return;
        };
        transport::repeated_nacks_end_in_the_dead_letter_channel(subject).await;
    }
}

async fn raw_channel(config: &AmqpConfig) -> (Connection, lapin::Channel) {
    let connection = Connection::connect(&config.url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

/// Messages that are not ours (bad id, a header that is not text, no type)
/// go to the dead-letter queue with the reason; the good one still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_the_reason() {
    let Some(transport) = transport().await else {
        return;
    };
    let channel = unique("orders");
    let mut sub = transport
        .subscribe("billing", std::slice::from_ref(&channel))
        .await
        .unwrap();
    let config = transport.config().clone();
    let (_connection, raw) = raw_channel(&config).await;
    let good = Message::new("order.placed", b"{}".to_vec());
    let mut bad_id = FieldTable::default();
    bad_id.insert("ce_id".into(), text("not-a-uuid"));
    bad_id.insert("ce_type".into(), text("x"));
    let mut number = FieldTable::default();
    number.insert("ce_id".into(), text(&good.id.to_string()));
    number.insert("ce_type".into(), AMQPValue::LongInt(7));
    let mut no_type = FieldTable::default();
    no_type.insert("ce_id".into(), text(&good.id.to_string()));
    let malformed = [(bad_id, "ce_id"), (number, "ce_type"), (no_type, "ce_type")];
    for (table, _) in &malformed {
        raw.basic_publish(
            format!("{}{channel}", config.prefix).into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_headers(table.clone()),
        )
        .await
        .unwrap();
    }
    transport.publish(&channel, &good).await.unwrap();
    let delivery = tokio::time::timeout(PATIENCE, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery.message.id, good.id, "the good message still flows");
    delivery.ack().await.unwrap();

    // The dead letters wait in the channel's dead-letter queue.
    let dead_queue = format!("{}{channel}.dlq", config.prefix);
    let mut consumer = raw
        .basic_consume(
            dead_queue.as_str().into(),
            "inspector".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for (_, names) in &malformed {
        let letter = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let table = letter.properties.headers().clone().unwrap();
        let header = |name: &str| match table.inner().get(name) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("{name}: {other:?}"),
        };
        let error = header(headers::DEAD_LETTER_ERROR);
        assert!(error.contains(names), "{error:?} names {names}");
        assert_eq!(header(headers::DEAD_LETTER_CHANNEL), channel);
    }
}

/// Python's pika, not our code, reads a published message from the group's
/// queue: id, type and payload from the documented headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_reads_a_published_message() {
    let Some(transport) = transport().await else {
        return;
    };
    let channel = unique("orders");
    drop(
        transport
            .subscribe("interop", std::slice::from_ref(&channel))
            .await
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Message::json("order.placed", &serde_json::json!({"order": 7}))
        .unwrap()
        .with_ordering_key("order-7");
    transport.publish(&channel, &sent).await.unwrap();
    let queue = format!("{}{channel}/interop", transport.config().prefix);
    let script = r#"
import json, sys, time, pika
connection = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
channel = connection.channel()
for _ in range(100):
    method, properties, body = channel.basic_get(sys.argv[2], auto_ack=True)
    if method:
        break
    time.sleep(0.1)
headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in properties.headers.items()}
print(json.dumps({"headers": headers, "message_id": properties.message_id, "type": properties.type, "body": body.decode()}))
"#;
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&transport.config().url)
        .arg(&queue)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "pika failed (scripts/services tools installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(read["headers"]["ce_id"], sent.id.to_string());
    assert_eq!(read["headers"]["ce_type"], "order.placed");
    assert_eq!(read["headers"]["ce_specversion"], "1.0");
    assert_eq!(read["headers"]["ce_partitionkey"], "order-7");
    assert_eq!(read["message_id"], sent.id.to_string());
    assert_eq!(read["type"], "order.placed");
    assert_eq!(read["body"], r#"{"order":7}"#);
}

/// A publish to a channel no group listens on fails (retryable) instead of
/// vanishing: the outbox keeps the message until a group exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_nobody_would_receive_fails_and_can_be_retried() {
    let Some(transport) = transport().await else {
        return;
    };
    let channel = unique("nobody");
    let message = Message::new("lonely", b"1".to_vec());
    let error = transport.publish(&channel, &message).await.unwrap_err();
    assert!(error.is_retryable(), "{error}");
    assert!(error.to_string().contains("no queue is bound"), "{error}");
    let mut sub = transport
        .subscribe("late", std::slice::from_ref(&channel))
        .await
        .unwrap();
    transport.publish(&channel, &message).await.unwrap();
    let delivery = tokio::time::timeout(PATIENCE, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery.message.id, message.id);
    delivery.ack().await.unwrap();
}

/// A queue declared elsewhere with other arguments gives an error that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_queue_is_named_in_the_error() {
    let Some(transport) = transport().await else {
        return;
    };
    let channel = unique("orders");
    let (_connection, raw) = raw_channel(transport.config()).await;
    let queue = format!("{}{channel}/billing", transport.config().prefix);
    raw.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let Err(error) = transport
        .subscribe("billing", std::slice::from_ref(&channel))
        .await
    else {
        panic!("subscribing to a queue with other arguments succeeded");
    };
    assert!(error.to_string().contains(&queue), "{error}");
}

/// The password of `AMQP_URL` never shows: not in the config's `Debug`, not
/// in the error of a broker that cannot be reached, not in the error of a
/// broker that refuses it.
#[tokio::test]
async fn passwords_never_show_in_errors_or_debug() {
    let secret = "s3cret-pw";
    let port = saga_core::testing::free_port();
    let closed = AmqpConfig::default().url(format!("amqp://guest:{secret}@127.0.0.1:{port}/%2f"));
    let debug = format!("{closed:?}");
    assert!(
        !debug.contains(secret) && debug.contains("guest:***@"),
        "{debug}"
    );
    let error = AmqpTransport::connect(closed)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!("guest:***@127.0.0.1:{port}")),
        "{error}"
    );
    assert!(!error.contains(secret), "{error}");

    if transport().await.is_none() {
        return;
    }
    let url = saga_core::redact::redact_url(&config().url).replace("***", secret);
    assert!(
        url.contains(secret),
        "AMQP_URL {url} has no password to replace"
    );
    let error = AmqpTransport::connect(config().url(url))
        .await
        .unwrap_err()
        .to_string();
    assert!(!error.contains(secret), "{error}");
}

/// Dropping a component's Worker ends its tasks, its subscription's included.
/// lapin's heartbeat task of a closed connection ends at its next tick, half
/// the heartbeat interval (60 s by default) later: a 4 s heartbeat keeps the
/// wait short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_workers_end() {
    let config = config();
    let separator = if config.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}heartbeat=4", config.url);
    let transport = match AmqpTransport::connect(config.url(url)).await {
        Ok(transport) => transport,
        Err(e) => return unavailable("RabbitMQ", e).unwrap_or(()),
    };
    saga_core::testing::worker::engine_workers_end_when_dropped(
        saga_core::memory::MemoryStore::new(),
        std::sync::Arc::new(transport),
    )
    .await;
}
