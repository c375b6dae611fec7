//! saga-kafka against a real Kafka-compatible broker (`KAFKA_BROKERS`,
//! default 127.0.0.1:9092).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use saga_core::testing::{PATIENCE, unavailable, unique};
use saga_core::wire::headers;
use saga_core::{Message, Transport};
use saga_kafka::{KafkaConfig, KafkaTransport};

fn config() -> KafkaConfig {
    KafkaConfig::from_env()
        .prefix(format!("{}.", unique("test")))
        .partitions(4)
}

async fn transport() -> Option<KafkaTransport> {
    match KafkaTransport::connect(config()).await {
        Ok(transport) => Some(transport),
        Err(e) => unavailable("Kafka", e),
    }
}

mod transport_suite {
    saga_core::transport_conformance!(super::transport, claims: {
        ordered_per_key: true,
        replays_history: true,
        redelivers_unacked: true,
    });
}

/// Raw record headers, and what the dead letter's error must name.
type Malformed<'a> = (Vec<(&'a str, &'a [u8])>, &'a str);

fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

/// Records that are not our messages (bad id, a header that is not UTF-8,
/// no type) go to the dead-letter topic with the reason; the good one still
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_dead_lettered_with_the_reason() {
    let Some(transport) = transport().await else {
        return;
    };
    let channel = unique("orders");
    let mut sub = transport
        .subscribe("billing", std::slice::from_ref(&channel))
        .await
        .unwrap();
    let producer = raw_producer(&transport.config().brokers);
    let good = Message::new("order.placed", b"{}".to_vec()).with_ordering_key("k");
    let good_id = good.id.to_string();
    let malformed: [Malformed; 3] = [
        (vec![("ce_id", b"not-a-uuid"), ("ce_type", b"x")], "ce_id"),
        (
            vec![("ce_id", good_id.as_bytes()), ("ce_type", &[0xff, 0xfe])],
            "UTF-8",
        ),
        (vec![("ce_id", good_id.as_bytes())], "ce_type"),
    ];
    let topic = transport.topic(&channel);
    for (fields, _) in &malformed {
        let headers = fields.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(*v),
            })
        });
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("k")
                    .payload("{}")
                    .headers(headers),
                Duration::from_secs(10),
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

    let dead = read_with_python(
        &transport.config().brokers,
        &transport.topic(&transport.dead_letter_channel(&channel)),
        malformed.len(),
    )
    .await;
    for (record, (_, names)) in dead.iter().zip(&malformed) {
        let error = record["headers"][headers::DEAD_LETTER_ERROR]
            .as_str()
            .unwrap();
        assert!(error.contains(names), "{error:?} names {names}");
        assert_eq!(record["headers"][headers::DEAD_LETTER_CHANNEL], channel);
    }
}

/// Reads `count` records of `topic` from the beginning with Python's
/// confluent-kafka (not our code): one JSON object per record with its
/// headers (as text, lossy), key and value, in partition and offset order.
async fn read_with_python(brokers: &str, topic: &str, count: usize) -> Vec<serde_json::Value> {
    let script = r#"
import json, sys, uuid
from confluent_kafka import Consumer
consumer = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "interop-" + uuid.uuid4().hex,
                     "auto.offset.reset": "earliest", "enable.auto.commit": False})
consumer.subscribe([sys.argv[2]])
records = []
for _ in range(400):
    if len(records) == int(sys.argv[3]):
        break
    m = consumer.poll(0.1)
    if m is None or m.error():
        continue
    text = lambda b: None if b is None else b.decode("utf-8", "replace")
    records.append({"headers": {k: text(v) for k, v in (m.headers() or [])},
                    "key": text(m.key()), "value": text(m.value()), "offset": m.offset(),
                    "partition": m.partition()})
consumer.close()
records.sort(key=lambda r: (r["partition"], r["offset"]))
for r in records:
    print(json.dumps(r))
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-c", script, brokers, topic, &count.to_string()])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "confluent-kafka failed (scripts/services tools installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let records: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), count, "records read from {topic}");
    records
}

/// Python's confluent-kafka, not our code, reads a published record: id,
/// type, key and payload from the documented headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_kafka_reads_a_published_message() {
    let Some(transport) = transport().await else {
        return;
    };
    let channel = unique("orders");
    let sent = Message::json("order.placed", &serde_json::json!({"order": 7}))
        .unwrap()
        .with_ordering_key("order-7");
    transport.publish(&channel, &sent).await.unwrap();
    let records =
        read_with_python(&transport.config().brokers, &transport.topic(&channel), 1).await;
    let record = &records[0];
    assert_eq!(record["headers"]["ce_id"], sent.id.to_string());
    assert_eq!(record["headers"]["ce_type"], "order.placed");
    assert_eq!(record["headers"]["ce_specversion"], "1.0");
    assert_eq!(record["headers"]["content-type"], "application/json");
    assert_eq!(record["key"], "order-7");
    assert_eq!(record["value"], r#"{"order":7}"#);
}

/// Secrets among the extra librdkafka properties never show in `Debug`.
#[test]
fn secret_properties_never_show_in_debug() {
    let config = KafkaConfig::default()
        .set("sasl.username", "app")
        .set("sasl.password", "s3cret-pw");
    let debug = format!("{config:?}");
    assert!(!debug.contains("s3cret-pw"), "{debug}");
    assert!(debug.contains("\"sasl.username\", \"app\""), "{debug}");
}

/// Dropping a component's Worker ends its tasks, its subscription's included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_workers_end() {
    let Some(transport) = transport().await else {
        return;
    };
    saga_core::testing::worker::engine_workers_end_when_dropped(
        saga_core::memory::MemoryStore::new(),
        std::sync::Arc::new(transport),
    )
    .await;
}

/// An ack of a delivery made before a rebalance does not move the group's
/// committed offset back. The member's partition is revoked and assigned to
/// it again when another member joins (here on another channel of the same
/// group): what the member knows of the partition starts afresh, and the
/// old delivery's ack used to commit from that blank state, offset 0, so
/// the partition's next owner would start over from its first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_from_before_a_rebalance_commits_nothing_back() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let Some(transport) = transport().await else {
        return;
    };
    let (group, channel) = (unique("group"), unique("orders"));
    let mut member = transport
        .subscribe(&group, std::slice::from_ref(&channel))
        .await
        .unwrap();
    for i in 0..10 {
        let message =
            Message::new("order.placed", format!("m{i}").into_bytes()).with_ordering_key("k");
        transport.publish(&channel, &message).await.unwrap();
    }
    // Everything acked but the last delivery, whose offset is then what
    // the group committed.
    let mut held = None;
    for _ in 0..10 {
        let delivery = tokio::time::timeout(PATIENCE, member.next())
            .await
            .expect("the member receives what was published")
            .unwrap();
        if let Some(earlier) = held.replace(delivery) {
            earlier.ack().await.unwrap();
        }
    }
    let topic = transport.topic(&channel);
    let (brokers, reader_group) = (transport.config().brokers.clone(), group.clone());
    let committed = move || -> Vec<i64> {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &reader_group)
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for partition in 0..4 {
            list.add_partition(&topic, partition);
        }
        reader
            .committed_offsets(list, Duration::from_secs(10))
            .unwrap()
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(offset) => offset,
                _ => -1,
            })
            .collect()
    };
    // Acks are committed every commit interval.
    let interval = transport.config().commit_interval;
    let wait_for_commits = || tokio::time::sleep(interval * 3);
    wait_for_commits().await;
    let before = tokio::task::spawn_blocking(committed.clone())
        .await
        .unwrap();
    assert!(
        before.iter().any(|offset| *offset > 0),
        "the acks were committed: {before:?}"
    );
    let _other = transport
        .subscribe(&group, &[unique("invoices")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    held.expect("a delivery held").ack().await.unwrap();
    wait_for_commits().await;
    let after = tokio::task::spawn_blocking(committed).await.unwrap();
    assert!(
        after
            .iter()
            .zip(&before)
            .all(|(after, before)| after >= before),
        "the group's committed offsets went back from {before:?} to {after:?}"
    );
}
