//! Publish and consume rates of each broker transport, against the broker's
//! own client doing the same work with the same guarantees, in the same run.
//!
//! ```sh
//! cargo bench --bench transports --features kafka,amqp,redis
//! SAGA_BENCH_TRANSPORTS=redis SAGA_BENCH_MESSAGES=50000 cargo bench --bench transports --features kafka,amqp,redis
//! ```
//!
//! N messages of 1 KiB (`SAGA_BENCH_MESSAGES`, default 20000), ordering keys
//! `agg-0..99`, on fresh channels, per transport:
//! - raw publish: the client library alone, batches of 100 waiting for every
//!   confirmation (Redis: a pipeline of `XADD`; RabbitMQ: persistent
//!   messages with publisher confirms; Kafka: idempotent producer, acks=all);
//! - `publish_batch`: ours, batches of 100 (what the relay calls);
//! - `publish`: ours, one message at a time, each confirmed before the next;
//! - raw consume: the client alone, one ack per message (Redis: `XREADGROUP`
//!   + `XACK`; RabbitMQ: prefetch 32 + `basic.ack`; Kafka: a commit per message);
//! - consume: ours, `Subscription::next` + `Delivery::ack` per message.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use saga::{Message, OutboxEntry, Transport, wire};

const BATCH: usize = 100;

fn messages() -> usize {
    std::env::var("SAGA_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn batch(channel: &str, from: usize, count: usize) -> Vec<OutboxEntry> {
    (from..from + count)
        .map(|i| {
            OutboxEntry::new(
                channel,
                Message::new("bench.event", vec![b'x'; 1024])
                    .with_ordering_key(format!("agg-{}", i % 100)),
            )
        })
        .collect()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", saga::MessageId::new())
}

struct Row {
    transport: &'static str,
    raw_publish: f64,
    publish_batch: f64,
    publish_one: f64,
    raw_consume: f64,
    consume: f64,
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

async fn ours_publish<T: Transport>(transport: &T, channel: &str, n: usize) -> (f64, f64) {
    let start = Instant::now();
    for from in (0..n).step_by(BATCH) {
        let entries = batch(channel, from, BATCH.min(n - from));
        for result in transport.publish_batch(&entries).await {
            result.expect("publish_batch");
        }
    }
    let batched = rate(n, start.elapsed());
    let one_n = (n / 10).max(100);
    let start = Instant::now();
    for entry in batch(channel, 0, one_n) {
        transport
            .publish(&entry.channel, &entry.message)
            .await
            .expect("publish");
    }
    (batched, rate(one_n, start.elapsed()))
}

async fn ours_consume<T: Transport>(transport: &T, group: &str, channel: &str, n: usize) -> f64 {
    let mut subscription = transport
        .subscribe(group, &[channel.to_owned()])
        .await
        .expect("subscribe");
    let start = Instant::now();
    for _ in 0..n {
        let delivery = subscription.next().await.expect("next");
        delivery.ack().await.expect("ack");
    }
    rate(n, start.elapsed())
}

async fn redis(n: usize) -> Row {
    use saga::redis::{RedisConfig, RedisTransport};
    let config = RedisConfig::from_env().prefix(format!("{}:", unique("bench")));
    let transport = RedisTransport::connect(config.clone())
        .await
        .expect("Redis");
    let mut conn = redis::Client::open(config.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    let raw_key = transport.stream_key(&unique("raw"));
    let start = Instant::now();
    for from in (0..n).step_by(BATCH) {
        let mut pipe = redis::pipe();
        for entry in batch("raw", from, BATCH.min(n - from)) {
            let cmd = pipe.cmd("XADD").arg(&raw_key).arg("*");
            for (k, v) in wire::to_headers(&entry.message) {
                cmd.arg(k).arg(v);
            }
            cmd.arg("data").arg(entry.message.payload);
        }
        let _: Vec<String> = pipe.query_async(&mut conn).await.unwrap();
    }
    let raw_publish = rate(n, start.elapsed());
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&raw_key)
        .arg("raw")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let start = Instant::now();
    let mut consumed = 0;
    while consumed < n {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("raw")
            .arg("c")
            .arg("COUNT")
            .arg(32)
            .arg("STREAMS")
            .arg(&raw_key)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
            let _: u64 = redis::cmd("XACK")
                .arg(&raw_key)
                .arg("raw")
                .arg(&entry.id)
                .query_async(&mut conn)
                .await
                .unwrap();
            consumed += 1;
        }
    }
    let raw_consume = rate(n, start.elapsed());

    let channel = unique("ours");
    let (publish_batch, publish_one) = ours_publish(&transport, &channel, n).await;
    let consume = ours_consume(&transport, "bench", &channel, n).await;
    Row {
        transport: "redis",
        raw_publish,
        publish_batch,
        publish_one,
        raw_consume,
        consume,
    }
}

async fn amqp(n: usize) -> Row {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use saga::amqp::{AmqpConfig, AmqpTransport};
    let config = AmqpConfig::from_env().prefix(format!("{}.", unique("bench")));
    let transport = AmqpTransport::connect(config.clone())
        .await
        .expect("RabbitMQ");
    let connection =
        lapin::Connection::connect(&config.url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let queue = unique("bench-raw");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
    let start = Instant::now();
    for from in (0..n).step_by(BATCH) {
        let mut confirms = Vec::new();
        for entry in batch("raw", from, BATCH.min(n - from)) {
            let mut headers = FieldTable::default();
            for (k, v) in wire::to_headers(&entry.message) {
                headers.insert(k.into(), AMQPValue::LongString(v.into()));
            }
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &entry.message.payload,
                        lapin::BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_headers(headers),
                    )
                    .await
                    .unwrap(),
            );
        }
        for confirm in confirms {
            assert!(confirm.await.unwrap().is_ack());
        }
    }
    let raw_publish = rate(n, start.elapsed());
    channel
        .basic_qos(32, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let delivery = consumer.next().await.unwrap().unwrap();
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    let raw_consume = rate(n, start.elapsed());

    let name = unique("ours");
    // A group must exist before publishing: unroutable messages are refused.
    drop(
        transport
            .subscribe("bench", std::slice::from_ref(&name))
            .await
            .unwrap(),
    );
    let (publish_batch, publish_one) = ours_publish(&transport, &name, n).await;
    let consume = ours_consume(&transport, "bench", &name, n).await;
    Row {
        transport: "amqp",
        raw_publish,
        publish_batch,
        publish_one,
        raw_consume,
        consume,
    }
}

async fn kafka(n: usize) -> Row {
    use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{ClientConfig, Message as _};
    use saga::kafka::{KafkaConfig, KafkaTransport};
    let config = KafkaConfig::from_env().prefix(format!("{}.", unique("bench")));
    let transport = KafkaTransport::connect(config.clone())
        .await
        .expect("Kafka");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()
        .unwrap();
    let raw_channel = unique("raw");
    let topic = transport.topic(&raw_channel);
    // Created by our transport with the same partitions; raw clients use it as is.
    drop(
        transport
            .subscribe("create", std::slice::from_ref(&raw_channel))
            .await
            .unwrap(),
    );
    let start = Instant::now();
    for from in (0..n).step_by(BATCH) {
        let entries = batch("raw", from, BATCH.min(n - from));
        let mut pending = Vec::new();
        for entry in &entries {
            let headers = wire::to_headers(&entry.message).into_iter().fold(
                OwnedHeaders::new(),
                |h, (k, v)| {
                    h.insert(Header {
                        key: &k,
                        value: Some(v.as_bytes()),
                    })
                },
            );
            let record = FutureRecord::to(&topic)
                .key(entry.message.ordering_key.as_deref().unwrap_or_default())
                .payload(&entry.message.payload)
                .headers(headers);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        for delivery in pending {
            delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }
    let raw_publish = rate(n, start.elapsed());
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", unique("raw"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let message = consumer.recv().await.unwrap();
        assert!(message.payload().is_some());
        consumer
            .commit_message(&message, CommitMode::Async)
            .unwrap();
    }
    let raw_consume = rate(n, start.elapsed());

    let channel = unique("ours");
    let (publish_batch, publish_one) = ours_publish(&transport, &channel, n).await;
    let consume = ours_consume(&transport, "bench", &channel, n).await;
    Row {
        transport: "kafka",
        raw_publish,
        publish_batch,
        publish_one,
        raw_consume,
        consume,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = messages();
    let chosen =
        std::env::var("SAGA_BENCH_TRANSPORTS").unwrap_or_else(|_| "redis,amqp,kafka".into());
    let mut rows = Vec::new();
    for name in chosen.split(',') {
        eprintln!("measuring {name} with {n} messages of 1 KiB…");
        rows.push(match name.trim() {
            "redis" => redis(n).await,
            "amqp" => amqp(n).await,
            "kafka" => kafka(n).await,
            other => panic!("unknown transport {other:?}"),
        });
    }
    println!(
        "| transport | raw publish | publish_batch | ratio | publish (one by one) | raw consume | consume | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {:.0}/s | {:.0}/s | {:.2}× | {:.0}/s | {:.0}/s | {:.0}/s | {:.2}× |",
            row.transport,
            row.raw_publish,
            row.publish_batch,
            row.publish_batch / row.raw_publish,
            row.publish_one,
            row.raw_consume,
            row.consume,
            row.consume / row.raw_consume,
        );
    }
}
