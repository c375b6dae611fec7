//! The e-commerce example as processes (order, stock, payment, two
//! instances of each, and two relay processes of each one's outbox) on
//! PostgreSQL, over Redis Streams (orchestrated and choreographed),
//! RabbitMQ and Kafka: the process-level fault campaign. While 500 orders
//! go in over HTTP, and four writers of the test's own commit messages of
//! three shared ordering keys at once into the orders service's outbox,
//! random services and relays are SIGKILLed and started again, the broker
//! goes away for 15 s (a Redis server of the
//! campaign's own paused, then SIGKILLed and restarted on its fsynced
//! append-only file; RabbitMQ stopped and started; a Kafka broker of the
//! campaign's own SIGKILLed and restarted on its durable storage), and the
//! services' PostgreSQL server (a cluster of the campaign's own) crashes
//! (an immediate stop: every connection cut, no shutdown checkpoint) and
//! starts again on its data 5 s later. Afterwards, read straight from the three
//! databases: no order is PENDING and no saga RUNNING or COMPENSATING,
//! stock and money add up exactly (scenario 8's invariants: nothing
//! applied twice or left applied), and every outbox drained with nothing
//! dead. A consumer group of the test's own, subscribed before the first
//! order, checks from the broker that every published message arrived and
//! that each service's messages of one ordering key on one channel came in
//! commit order, where the transport claims order per key (here Kafka only).
//! `SAGA_CAMPAIGN_ORDERS`, `SAGA_CAMPAIGN_KILLS`, `SAGA_CAMPAIGN_OUTAGE_SECS`
//! and `SAGA_CAMPAIGN_SEED` scale it up or repeat a run (see `campaign`).
//!
//! Runs the example binary that `cargo test` builds
//! (`target/<profile>/examples/ecommerce`).

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use saga::sql::PostgresStore;
use saga::sql::sqlx::{self, PgPool, Row};
use saga::{Message, MessageId, OutboxEntry, OutboxStore, Transactional, Transport};
use saga_core::testing::{Process, free_port, unavailable, unique, until_up};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORDERS: usize = 500;
const KILLS: usize = 5;

#[path = "support/example.rs"]
mod example;
#[path = "../saga-kafka/tests/support/nisshi.rs"]
mod nisshi;
#[path = "support/postgres_server.rs"]
mod postgres_server;
/// (Its servers that keep nothing are for saga-redis's own test.)
#[allow(dead_code)]
#[path = "../saga-redis/tests/support/redis_server.rs"]
mod redis_server;
/// For the channels the services use (`shop::CHANNELS`); the services
/// themselves run as the example's processes.
#[allow(dead_code)]
#[path = "../examples/ecommerce/shop.rs"]
mod shop;

use example::example_binary;
use nisshi::Nisshi;
use postgres_server::PostgresServer;
use redis_server::{Keeps, RedisServer};
use shop::CHANNELS;

/// One HTTP/1.1 request; `None` when the service cannot be reached.
async fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, serde_json::Value)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    ))
}

/// One instance of a service: the example binary as `service <name>`, or
/// as `relay <name>` for the relay of its outbox.
struct Service {
    name: &'static str,
    relay: bool,
    port: u16,
    process: Process,
}

impl Service {
    /// `service <name> <args…>`, with `env` set.
    fn new(name: &'static str, args: Vec<String>, env: Vec<(&'static str, String)>) -> Self {
        let command = ["service", name].into_iter().map(String::from);
        Self::running(name, command.chain(args).collect(), env)
    }

    /// `relay <name> <args…>`, with `env` set: the relay of the service's
    /// outbox, in a process of its own.
    fn relay(name: &'static str, args: Vec<String>, env: Vec<(&'static str, String)>) -> Self {
        let command = ["relay".to_owned(), name.to_owned()].into_iter();
        let mut relay = Self::running(name, command.chain(args).collect(), env);
        relay.relay = true;
        relay
    }

    /// `serve <args…>`: every service and route on one listener.
    fn all(args: Vec<String>) -> Self {
        let command = std::iter::once("serve".to_owned());
        Self::running("all", command.chain(args).collect(), Vec::new())
    }

    fn running(name: &'static str, args: Vec<String>, env: Vec<(&'static str, String)>) -> Self {
        let port = free_port();
        let process = Process::new(move || {
            let mut command = Command::new(example_binary());
            command
                .args(&args)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            command
        });
        Self {
            name,
            relay: false,
            port,
            process,
        }
    }

    /// What the campaign calls it: `order`, `order relay`.
    fn label(&self) -> String {
        if self.relay {
            format!("{} relay", self.name)
        } else {
            self.name.to_owned()
        }
    }

    fn spawn(&mut self) {
        self.process.start();
    }

    fn kill(&mut self) {
        self.process.kill();
    }

    async fn until_healthy(&self) {
        let port = self.port;
        until_up(
            &format!("the {} process", self.label()),
            Duration::from_secs(60),
            || async move { matches!(http(port, "GET", "/health", "").await, Some((200, _))) },
        )
        .await;
    }
}

/// Retries a request until the service answers (it may be down for a while).
async fn call(port: u16, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(answer) = http(port, method, path, body).await
            && answer.0 < 500
        {
            return answer;
        }
        assert!(Instant::now() < deadline, "{method} {path} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_killed_with_sigkill_lose_nothing() {
    campaign("orchestration", Broker::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choreographed_services_killed_with_sigkill_lose_nothing() {
    campaign("choreography", Broker::Redis).await;
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_over_rabbitmq_lose_nothing_through_kills_and_outages() {
    campaign("orchestration", Broker::RabbitMq).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_over_kafka_lose_nothing_through_kills_and_outages() {
    campaign("orchestration", Broker::Kafka).await;
}

/// One test at a time: each loads the machine with six processes, and
/// stops the broker or a database for a while.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The broker the services talk through, and how the campaign takes it
/// away for a while.
#[derive(Clone, Copy, Debug)]
enum Broker {
    /// A server of the campaign's own with an fsynced append-only file:
    /// paused (`CLIENT PAUSE … ALL`: every command waits, as with a server
    /// that stopped answering) for half the outage, then SIGKILLed and
    /// started again after the other half.
    Redis,
    /// `rabbitmqctl stop_app`, then `start_app`: connections drop and are
    /// refused meanwhile, and the queues come back from disk.
    RabbitMq,
    /// A broker of the campaign's own on durable storage (the shared one
    /// keeps its data in memory), SIGKILLed and started again after the
    /// outage.
    Kafka,
}

/// A broker process of the campaign's own, which it can SIGKILL and start
/// again with what it acknowledged kept.
enum Own {
    Redis(RedisServer),
    Kafka(Nisshi),
}

impl Own {
    /// What tells the services where it is.
    fn env(&self) -> (&'static str, String) {
        match self {
            Self::Redis(server) => ("REDIS_URL", server.url()),
            Self::Kafka(broker) => ("KAFKA_BROKERS", broker.address()),
        }
    }

    fn kill(&mut self) {
        match self {
            Self::Redis(server) => server.kill(),
            Self::Kafka(broker) => broker.kill(),
        }
    }

    async fn restart(&mut self) {
        match self {
            Self::Redis(server) => server.restart().await,
            Self::Kafka(broker) => broker.restart().await,
        }
    }
}

impl Broker {
    fn arg(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::RabbitMq => "amqp",
            Self::Kafka => "kafka",
        }
    }

    /// Starts the broker of the campaign's own, if it has one: `Err` (after
    /// [`unavailable`]) when it cannot.
    async fn start(self) -> Result<Option<Own>, ()> {
        match self {
            Self::Redis => RedisServer::start(Keeps::Everything)
                .await
                .map(|s| Some(Own::Redis(s))),
            Self::Kafka => Nisshi::start().await.map(|b| Some(Own::Kafka(b))),
            Self::RabbitMq => {
                let address = "127.0.0.1:5672";
                match tokio::net::TcpStream::connect(address).await {
                    Ok(_) => Some(None),
                    Err(error) => unavailable(&format!("RabbitMQ at {address}"), error),
                }
            }
        }
        .ok_or(())
    }

    /// Takes the broker away for `outage`, then brings it back.
    async fn outage(self, outage: Duration, own: Option<&mut Own>) {
        match (self, own) {
            (Self::Redis, Some(own)) => {
                let url = own.env().1;
                let half = outage / 2;
                let millis = half.as_millis().to_string();
                run(
                    "redis-cli",
                    &["-u", &url, "CLIENT", "PAUSE", &millis, "ALL"],
                );
                tokio::time::sleep(half).await;
                own.kill();
                tokio::time::sleep(outage.saturating_sub(half)).await;
                own.restart().await;
            }
            (Self::RabbitMq, _) => {
                run("rabbitmqctl", &["stop_app"]);
                tokio::time::sleep(outage).await;
                run("rabbitmqctl", &["start_app"]);
                run("rabbitmqctl", &["await_startup"]);
            }
            (Self::Kafka, Some(own)) => {
                own.kill();
                tokio::time::sleep(outage).await;
                own.restart().await;
            }
            (broker, None) => panic!("{broker:?} runs on a broker of the campaign's own"),
        }
    }

    /// A transport of the test's own on the services' channels.
    async fn connect(self, prefix: &str, own: Option<&Own>) -> Arc<dyn Transport> {
        let transport: saga::Result<Arc<dyn Transport>> = match (self, own) {
            (Self::Redis, Some(own)) => saga::redis::RedisTransport::connect(
                saga::redis::RedisConfig::from_env()
                    .url(own.env().1)
                    .prefix(prefix),
            )
            .await
            .map(|t| Arc::new(t) as Arc<dyn Transport>),
            #[cfg(feature = "amqp")]
            (Self::RabbitMq, _) => saga::amqp::AmqpTransport::connect(
                saga::amqp::AmqpConfig::from_env().prefix(prefix),
            )
            .await
            .map(|t| Arc::new(t) as Arc<dyn Transport>),
            #[cfg(feature = "kafka")]
            (Self::Kafka, Some(own)) => saga::kafka::KafkaTransport::connect(
                saga::kafka::KafkaConfig::from_env()
                    .brokers(own.env().1)
                    .prefix(prefix),
            )
            .await
            .map(|t| Arc::new(t) as Arc<dyn Transport>),
            #[allow(unreachable_patterns)]
            (other, _) => panic!("this test build cannot connect to {other:?}"),
        };
        transport.unwrap_or_else(|e| panic!("the test connects to {self:?}: {e}"))
    }
}

/// The channel of the campaign's own writers (see [`write_shared_keys`]).
const SHARED_CHANNEL: &str = "campaign.shared-keys";
/// How many writers commit at once, and over how few ordering keys.
const WRITERS: u64 = 4;
const SHARED_KEYS: usize = 3;
/// One message in so many orders comes from each writer: the relay
/// publishes a key's messages one at a time, so a few keys' lines drain
/// slowly, and the campaign is about the sagas.
const ORDERS_PER_SHARED_WRITE: usize = 40;

/// Several writers committing messages of the same ordering keys at once,
/// into the orders service's outbox (its relays, killed and restarted apart
/// from the services, publish them): what two instances of a service do
/// when both announce something of one customer. Each writer enqueues its
/// message, pauses, then bumps the key's counter in `campaign_keys`, and
/// records the value in `campaign_commits`. The counter's row lock queues
/// the writers of a key, so the value is the key's commit order, read
/// apart from the outbox: the broker's order is checked against it. (The
/// store makes a key's second writer wait at `enqueue` for the first to
/// commit, so its `seq`s are its commit order too; the campaign checks
/// that as well.) Runs until it committed `limit` or `running` is false;
/// returns how many it committed.
async fn write_shared_keys(
    store: PostgresStore,
    writer: u64,
    limit: usize,
    running: Arc<AtomicBool>,
) -> usize {
    let mut rng = fastrand::Rng::with_seed(writer);
    let mut committed = 0;
    while committed < limit && running.load(Ordering::Relaxed) {
        let key = format!("shared-{}", rng.usize(..SHARED_KEYS));
        let message = Message::new("campaign.written", format!("writer {writer}").into_bytes())
            .with_ordering_key(key.clone());
        let pause = Duration::from_millis(rng.u64(0..50));
        // A failure (the database away) loses nothing: the transaction
        // rolled back whole, message and position together.
        if write_shared_key(&store, &key, message, pause).await.is_ok() {
            committed += 1;
        }
        // Spread over the faults (the first kills come within seconds).
        tokio::time::sleep(Duration::from_millis(rng.u64(0..400))).await;
    }
    committed
}

async fn write_shared_key(
    store: &PostgresStore,
    key: &str,
    message: Message,
    pause: Duration,
) -> saga::Result<()> {
    let id = message.id;
    let mut tx = store.begin().await?;
    store
        .enqueue(&mut tx, &[OutboxEntry::new(SHARED_CHANNEL, message)])
        .await?;
    tokio::time::sleep(pause).await;
    let db = |e| saga::Error::backend("the campaign's counter", true, e);
    let position: i64 = sqlx::query_scalar(
        "INSERT INTO campaign_keys (key, commits) VALUES ($1, 1) \
         ON CONFLICT (key) DO UPDATE SET commits = campaign_keys.commits + 1 RETURNING commits",
    )
    .bind(key)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    sqlx::query("INSERT INTO campaign_commits (message_id, position) VALUES ($1, $2)")
        .bind(id.as_uuid())
        .bind(position)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    store.commit(tx).await
}

/// A consumer group of the test's own on every channel, subscribed before
/// the first order: what it receives is what the broker holds.
const AUDIT_GROUP: &str = "campaign-audit";

/// The message ids the audit group received, first deliveries in the order
/// they came (a redelivery is not listed again).
#[derive(Default)]
struct Audited {
    order: Vec<MessageId>,
    seen: HashSet<MessageId>,
}

/// Consumes [`AUDIT_GROUP`] on every channel until dropped.
fn audit(transport: &Arc<dyn Transport>) -> (Arc<Mutex<Audited>>, tokio::task::JoinHandle<()>) {
    let audited = Arc::new(Mutex::new(Audited::default()));
    let (transport, record) = (Arc::clone(transport), Arc::clone(&audited));
    let task = tokio::spawn(async move {
        let channels: Vec<String> = CHANNELS
            .into_iter()
            .chain([SHARED_CHANNEL])
            .map(String::from)
            .collect();
        let mut subscription = loop {
            match transport.subscribe(AUDIT_GROUP, &channels).await {
                Ok(subscription) => break subscription,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        loop {
            match subscription.next().await {
                Ok(delivery) => {
                    let id = delivery.message.id;
                    {
                        let mut audited = record.lock().unwrap();
                        if audited.seen.insert(id) {
                            audited.order.push(id);
                        }
                    }
                    let _ = delivery.ack().await;
                }
                // The broker is away: the subscription reconnects itself.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    (audited, task)
}

/// One published outbox row: which service wrote it, where to, its key and
/// its place in that service's outbox.
struct Published {
    service: &'static str,
    channel: String,
    key: Option<String>,
    seq: i64,
    /// Its place in its key's commit order.
    position: i64,
}

/// Every message the services' outboxes published reached the audit group
/// (waits up to a minute for the last ones), and per service, channel and
/// ordering key their first deliveries came in commit order: the order a
/// broker keeps is a key's within one channel (a Kafka partition, a queue,
/// a stream); a group reading several channels interleaves them as they
/// come. A key's commit order is its outbox order (`seq`) where one writer
/// at a time writes it (a saga's messages, under the saga's lock);
/// `positions` gives it for the messages of concurrent writers (see
/// [`write_shared_keys`]). The order is checked only where the transport
/// claims it (`ordered`): Redis does not (an entry a member read and lost
/// in a server restart is reclaimed after newer ones), nor RabbitMQ without
/// single active consumer. Returns how many messages there were, and how
/// many of the concurrent writers' committed in another order than their
/// `seq`s (the cases where outbox order is not commit order).
async fn check_broker_saw_everything_in_order(
    outboxes: &[(&'static str, &PgPool)],
    audited: &Mutex<Audited>,
    positions: &HashMap<MessageId, i64>,
    ordered: bool,
    faults: &[String],
) -> (usize, usize) {
    let mut published: HashMap<MessageId, Published> = HashMap::new();
    for (service, pool) in outboxes {
        let rows = sqlx::query(
            "SELECT message_id, channel, ordering_key, seq FROM saga.saga_outbox \
             WHERE published_at IS NOT NULL ORDER BY seq",
        )
        .fetch_all(*pool)
        .await
        .unwrap();
        for row in rows {
            let id = MessageId::from_uuid(row.get("message_id"));
            let seq = row.get("seq");
            // A participant answers a command again with the same reply, its
            // id unchanged: the audit group lists a message where it first
            // came, which is where its first row was published.
            published.entry(id).or_insert(Published {
                service,
                channel: row.get("channel"),
                key: row.get("ordering_key"),
                seq,
                position: positions.get(&id).copied().unwrap_or(seq),
            });
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let missing: Vec<MessageId> = {
            let audited = audited.lock().unwrap();
            published
                .keys()
                .filter(|id| !audited.seen.contains(*id))
                .copied()
                .collect()
        };
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "{} of {} published messages never reached the broker's audit group (first: {:?}) after {faults:?}",
        missing.len(),
        published.len(),
        missing.first()
    );
    let mut by_key: HashMap<(&str, &str, &str), Vec<&Published>> = HashMap::new();
    for published in published.values() {
        if let Some(key) = &published.key {
            by_key
                .entry((published.service, &published.channel, key))
                .or_default()
                .push(published);
        }
    }
    let overtaken = by_key
        .into_values()
        .map(|mut line| {
            line.sort_by_key(|p| p.position);
            line.windows(2).filter(|w| w[0].seq > w[1].seq).count()
        })
        .sum();
    if !ordered {
        return (published.len(), overtaken);
    }
    let audited = audited.lock().unwrap();
    let mut last: HashMap<(&str, &str, &str), (i64, MessageId)> = HashMap::new();
    for id in &audited.order {
        let Some(Published {
            service,
            channel,
            key: Some(key),
            position,
            ..
        }) = published.get(id)
        else {
            continue;
        };
        if let Some((before, before_id)) = last.insert((service, channel, key), (*position, *id)) {
            assert!(
                before < *position,
                "{service}'s messages of key {key} on {channel} came out of commit order: {id} (position {position}) after {before_id} (position {before}) after {faults:?}"
            );
        }
    }
    (published.len(), overtaken)
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// How long the orders and sagas may go without a change before the
/// campaign gives up on them: the drain after the faults takes as long as
/// it takes at the campaign's scale, as long as it moves (a saga's
/// attempts are bounded, so it cannot move forever).
const STALL: Duration = Duration::from_secs(180);

/// Waits until no order is PENDING, for as long as orders leave PENDING or
/// sagas change (a line every 30 s says how far it got), and returns the
/// orders by status. When nothing changed for [`STALL`], says where
/// everything stands (sagas by state, each outbox's pending and dead)
/// before returning, so the failure that follows can be read.
async fn drain(
    databases: &[(&'static str, &PgPool); 3],
    faults: &[String],
) -> HashMap<String, i64> {
    let orders_db = databases[0].1;
    let started = Instant::now();
    let mut last = None;
    let (mut moved, mut reported) = (Instant::now(), Instant::now());
    loop {
        let statuses = counts(
            orders_db,
            "SELECT status, count(*) FROM orders GROUP BY status",
        )
        .await;
        let pending = statuses.get("PENDING").copied().unwrap_or(0);
        let changed: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT max(updated_at) FROM saga.saga_instances")
                .fetch_one(orders_db)
                .await
                .unwrap();
        if last != Some((pending, changed)) {
            (last, moved) = (Some((pending, changed)), Instant::now());
        }
        if pending == 0 {
            return statuses;
        }
        let stalled = moved.elapsed() >= STALL;
        if stalled || reported.elapsed() >= Duration::from_secs(30) {
            reported = Instant::now();
            let sagas = counts(
                orders_db,
                "SELECT state, count(*) FROM saga.saga_instances GROUP BY state",
            )
            .await;
            let mut outboxes = Vec::new();
            for (service, pool) in databases {
                let store = saga::sql::PostgresStore::with_schema((*pool).clone(), "saga").unwrap();
                let stats = saga::OutboxStore::stats(&store).await.unwrap();
                outboxes.push(format!(
                    "{service} pending {} dead {}",
                    stats.pending, stats.dead
                ));
            }
            eprintln!(
                "draining for {:?}: orders {statuses:?}, sagas {sagas:?}, outboxes {outboxes:?}{}",
                started.elapsed(),
                if stalled {
                    format!(", no order finished for {STALL:?}: giving up after {faults:?}")
                } else {
                    String::new()
                }
            );
        }
        if stalled {
            return statuses;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `query`'s rows as (name, count): a `GROUP BY` of one text column.
async fn counts(pool: &PgPool, query: &str) -> HashMap<String, i64> {
    sqlx::query(query)
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A number from the environment, or `default`.
fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The e-commerce services as processes, two instances of each (so two
/// orchestrators and two relays per service), on PostgreSQL and `broker`.
/// While the orders go in over HTTP: SIGKILLs of random instances, a
/// broker outage and a crash of the PostgreSQL server (one of the
/// campaign's own, started again on its data). Afterwards, from the databases: no
/// order PENDING, stock and money exact, every outbox drained with nothing
/// dead.
///
/// `SAGA_CAMPAIGN_ORDERS` (default 500), `SAGA_CAMPAIGN_KILLS` (default 5)
/// and `SAGA_CAMPAIGN_OUTAGE_SECS` (default 15) scale it up;
/// `SAGA_CAMPAIGN_SEED` repeats a fault schedule (the faults say theirs).
async fn campaign(mode: &str, broker: Broker) {
    let _turn = ONE_AT_A_TIME.lock().await;
    example_binary();
    let orders = usize::try_from(setting("SAGA_CAMPAIGN_ORDERS", ORDERS as u64)).unwrap();
    let kills = usize::try_from(setting("SAGA_CAMPAIGN_KILLS", KILLS as u64)).unwrap();
    let outage = Duration::from_secs(setting("SAGA_CAMPAIGN_OUTAGE_SECS", 15));
    let postgres = match PostgresServer::start() {
        Ok(postgres) => postgres,
        Err(error) => {
            return unavailable("a PostgreSQL cluster of the campaign's own", error).unwrap_or(());
        }
    };
    let server = postgres.url();
    let Ok(mut own) = broker.start().await else {
        return;
    };
    let env: Vec<(&'static str, String)> = own.iter().map(Own::env).collect();
    let instance = unique("shop").replace('-', "_");
    let args = vec![
        "--transport".to_owned(),
        broker.arg().to_owned(),
        "--database-url".to_owned(),
        server.clone(),
        "--instance".to_owned(),
        instance.clone(),
        "--mode".to_owned(),
        mode.to_owned(),
    ];
    // order, stock, payment, then their second instances, then two relays
    // of each one's outbox: the services write to their outboxes, the
    // relays (killed apart from them) publish.
    let names = ["order", "stock", "payment"];
    let mut services: Vec<Service> = names
        .into_iter()
        .chain(names)
        .map(|name| {
            let args = [args.clone(), vec!["--no-relay".to_owned()]].concat();
            Service::new(name, args, env.clone())
        })
        .chain(
            names
                .into_iter()
                .chain(names)
                .map(|name| Service::relay(name, args.clone(), env.clone())),
        )
        .collect();
    // The first instances create the databases; the others join them.
    for part in [0..3, 3..12] {
        for service in &mut services[part.clone()] {
            service.spawn();
        }
        for service in &services[part] {
            service.until_healthy().await;
        }
    }
    let transport = broker.connect(&format!("{instance}."), own.as_ref()).await;
    let (audited, audit_task) = audit(&transport);
    let database = |service: &str| format!("{server}/{instance}_{service}");
    let orders_db = PgPool::connect(&database("orders")).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE campaign_keys (key TEXT PRIMARY KEY, commits BIGINT NOT NULL); \
         CREATE TABLE campaign_commits (message_id UUID PRIMARY KEY, position BIGINT NOT NULL)",
    )
    .execute(&orders_db)
    .await
    .unwrap();
    let order_ports = [services[0].port, services[3].port];
    let (stock_port, payment_port) = (services[1].port, services[2].port);
    let products: Vec<(String, i64, &str)> = (0..5)
        .map(|i| {
            (
                format!("gadget-{i}"),
                40 + 10 * i,
                ["5.00", "7.50", "10.00", "12.50", "15.00"][i as usize],
            )
        })
        .collect();
    let customers: Vec<(String, i64)> = (0..50)
        .map(|i| (format!("buyer-{i}"), 2_000 + 700 * i))
        .collect();
    for (id, available, price) in &products {
        let body = format!(r#"{{"available": {available}, "unit_price": "{price}"}}"#);
        assert_eq!(
            call(stock_port, "PUT", &format!("/stock/{id}"), &body)
                .await
                .0,
            200
        );
    }
    for (id, cents) in &customers {
        let body = format!(r#"{{"balance": "{}.{:02}"}}"#, cents / 100, cents % 100);
        assert_eq!(
            call(payment_port, "PUT", &format!("/wallets/{id}"), &body)
                .await
                .0,
            200
        );
    }

    let writing = Arc::new(AtomicBool::new(true));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = PostgresStore::with_schema(orders_db.clone(), "saga").unwrap();
            let writes = (orders / ORDERS_PER_SHARED_WRITE).max(25);
            tokio::spawn(write_shared_keys(
                store,
                writer,
                writes,
                Arc::clone(&writing),
            ))
        })
        .collect();
    // Place the orders from two tasks, one per order instance, while the
    // main task injects the faults.
    let mut placers = Vec::new();
    for part in 0..2 {
        let customers = customers.clone();
        let products: Vec<String> = products.iter().map(|p| p.0.clone()).collect();
        let port = order_ports[part as usize];
        placers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(part);
            for n in (part as usize..orders).step_by(2) {
                let customer = &customers[n % customers.len()].0;
                let product = &products[rng.usize(..products.len())];
                let body = format!(
                    r#"{{"customer_id": "{customer}", "items": [{{"product_id": "{product}", "quantity": {}}}]}}"#,
                    rng.i64(1..=3)
                );
                let (status, _) = call(port, "POST", "/orders", &body).await;
                assert_eq!(status, 201, "an order was refused");
            }
        }));
    }
    let seed = setting("SAGA_CAMPAIGN_SEED", fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut faults = vec![format!("seed {seed}")];
    let broker_outage_at = kills / 2;
    for kill in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1200))).await;
        if kill == broker_outage_at {
            broker.outage(outage, own.as_mut()).await;
            faults.push(format!("{broker:?} away {outage:?}"));
        }
        if kill == broker_outage_at + 1 {
            postgres.crash();
            tokio::time::sleep(Duration::from_secs(5)).await;
            postgres.start_again();
            faults.push("PostgreSQL crashed, started again after 5s".to_owned());
        }
        let victim = &mut services[rng.usize(..12)];
        faults.push(format!("SIGKILL {}", victim.label()));
        victim.kill();
        tokio::time::sleep(Duration::from_millis(rng.u64(100..800))).await;
        victim.spawn();
        victim.until_healthy().await;
    }
    for placer in placers {
        placer.await.unwrap();
    }
    writing.store(false, Ordering::Relaxed);
    let mut shared = 0;
    for writer in writers {
        shared += writer.await.unwrap();
    }
    // Read the databases themselves.
    let stock_db = PgPool::connect(&database("stock")).await.unwrap();
    let payment_db = PgPool::connect(&database("payment")).await.unwrap();
    let databases = [
        ("orders", &orders_db),
        ("stock", &stock_db),
        ("payment", &payment_db),
    ];
    let statuses = drain(&databases, &faults).await;
    assert_eq!(
        statuses.get("PENDING"),
        None,
        "orders left PENDING: {statuses:?} after {faults:?}"
    );
    let placed: i64 = statuses.values().sum();
    assert!(
        placed >= orders as i64,
        "{placed} orders stored for {orders} accepted"
    );

    let confirmed = sqlx::query(
        "SELECT customer_id, items, total_cents FROM orders WHERE status = 'CONFIRMED'",
    )
    .fetch_all(&orders_db)
    .await
    .unwrap();
    let mut units: HashMap<String, i64> = HashMap::new();
    let mut spent: HashMap<String, i64> = HashMap::new();
    for row in &confirmed {
        let items: serde_json::Value = serde_json::from_str(row.get("items")).unwrap();
        for item in items.as_array().unwrap() {
            *units
                .entry(item["product_id"].as_str().unwrap().to_owned())
                .or_default() += item["quantity"].as_i64().unwrap();
        }
        *spent.entry(row.get("customer_id")).or_default() += row.get::<i64, _>("total_cents");
    }
    for (id, initial, _) in &products {
        let row = sqlx::query("SELECT available, reserved FROM products WHERE product_id = $1")
            .bind(id)
            .fetch_one(&stock_db)
            .await
            .unwrap();
        let (available, reserved): (i64, i64) = (row.get("available"), row.get("reserved"));
        assert_eq!(
            available + reserved,
            *initial,
            "{id}: stock appeared or vanished after {faults:?}"
        );
        assert_eq!(
            reserved,
            units.get(id).copied().unwrap_or(0),
            "{id}: reserved != confirmed units after {faults:?}"
        );
    }
    for (id, initial) in &customers {
        let balance: i64 =
            sqlx::query_scalar("SELECT balance_cents FROM wallets WHERE customer_id = $1")
                .bind(id)
                .fetch_one(&payment_db)
                .await
                .unwrap();
        assert_eq!(
            balance + spent.get(id).copied().unwrap_or(0),
            *initial,
            "{id}: money appeared or vanished after {faults:?}"
        );
    }
    for (service, pool) in databases {
        let store = saga::sql::PostgresStore::with_schema(pool.clone(), "saga").unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let stats = loop {
            let stats = saga::OutboxStore::stats(&store).await.unwrap();
            if stats.pending == 0 || Instant::now() >= deadline {
                break stats;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert_eq!(
            (stats.pending, stats.dead),
            (0, 0),
            "{service}: the outbox drains and dead-letters nothing after {faults:?}"
        );
    }
    let sagas = counts(
        &orders_db,
        "SELECT state, count(*) FROM saga.saga_instances GROUP BY state",
    )
    .await;
    for state in ["RUNNING", "COMPENSATING"] {
        assert!(
            !sagas.contains_key(state),
            "sagas left {state}: {sagas:?} after {faults:?}"
        );
    }
    let unexplained: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga.saga_instances \
         WHERE state = 'FAILED' AND (error IS NULL OR error = '')",
    )
    .fetch_one(&orders_db)
    .await
    .unwrap();
    assert_eq!(unexplained, 0, "FAILED sagas without a reason: {sagas:?}");
    let ordered = transport.capabilities().ordered_per_key;
    let positions: HashMap<MessageId, i64> = sqlx::query_as::<_, (sqlx::types::Uuid, i64)>(
        "SELECT message_id, position FROM campaign_commits",
    )
    .fetch_all(&orders_db)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, position)| (MessageId::from_uuid(id), position))
    .collect();
    assert!(
        positions.len() >= shared,
        "{shared} writes of shared keys committed, {} recorded",
        positions.len()
    );
    let (published, overtaken) =
        check_broker_saw_everything_in_order(&databases, &audited, &positions, ordered, &faults)
            .await;
    assert_eq!(
        overtaken, 0,
        "messages of one key committed in another order than their outbox seqs: the store let \
         a second writer of a key draw its seq before the first committed, after {faults:?}"
    );
    let order = if ordered {
        "in order per key"
    } else {
        "(order per key not claimed by the transport, not checked)"
    };
    eprintln!(
        "{mode} over {broker:?}: orders {statuses:?}, sagas {sagas:?}, {published} messages \
         all received {order}, {} of them from {WRITERS} writers of {SHARED_KEYS} shared keys \
         (each key's committed in its seq order), after {faults:?}",
        positions.len()
    );
    audit_task.abort();
    let _ = audit_task.await;
    let _ = transport
        .delete_channels(
            &CHANNELS
                .into_iter()
                .chain([SHARED_CHANNEL])
                .map(String::from)
                .collect::<Vec<_>>(),
            &[AUDIT_GROUP.to_owned()],
        )
        .await;

    for service in &mut services {
        service.kill();
    }
    for pool in [orders_db, stock_db, payment_db] {
        pool.close().await;
    }
}

/// The HTTP API as documented: status codes, error bodies naming the field,
/// nothing stored for invalid input, the order view with its saga's steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_answers_as_documented() {
    let dir = std::env::temp_dir().join(unique("saga-ecommerce-http"));
    // Every route on one listener, over the in-memory transport.
    let mut shop = Service::all(vec![
        "--database-url".into(),
        format!("sqlite://{}", dir.display()),
    ]);
    shop.spawn();
    shop.until_healthy().await;
    let port = shop.port;

    let (status, body) = call(
        port,
        "PUT",
        "/stock/book",
        r#"{"available": 10, "unit_price": "12.50"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        call(port, "PUT", "/wallets/alice", r#"{"balance": "100.00"}"#)
            .await
            .0,
        200
    );
    let (status, body) = call(port, "PUT", "/wallets/bob", r#"{"balance": 12.5}"#).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (422, Some("balance")),
        "money as a float is refused"
    );

    let invalid = [
        (
            r#"{"customer_id": "alice", "items": [{"product_id": "book", "quantity": 0}]}"#,
            422,
            Some("items[0].quantity"),
        ),
        (
            r#"{"customer_id": "alice", "items": [{"quantity": 1}]}"#,
            422,
            Some("items[0].product_id"),
        ),
        (
            r#"{"items": [{"product_id": "book", "quantity": 1}]}"#,
            422,
            Some("customer_id"),
        ),
        (
            r#"{"customer_id": "alice", "items": []}"#,
            422,
            Some("items"),
        ),
        (r#"{"customer_id": "alice", "items": ["#, 400, None),
    ];
    for (body, expected, field) in invalid {
        let (status, answer) = call(port, "POST", "/orders", body).await;
        assert_eq!(status, expected, "{body} → {answer}");
        assert!(answer["error"].is_string(), "an error message: {answer}");
        assert_eq!(answer["field"].as_str(), field, "{body} → {answer}");
    }

    let (status, placed) = call(
        port,
        "POST",
        "/orders",
        r#"{"customer_id": "alice", "items": [{"product_id": "book", "quantity": 2}]}"#,
    )
    .await;
    assert_eq!(status, 201, "{placed}");
    assert_eq!(placed["status"], "PENDING");
    let id = placed["order_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let (status, view) = call(port, "GET", &format!("/orders/{id}"), "").await;
        assert_eq!(status, 200);
        if view["status"] != "PENDING" || Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view["status"], "CONFIRMED", "{view}");
    assert_eq!(view["reason"], serde_json::Value::Null);
    assert_eq!(view["saga"]["state"], "COMPLETED");
    let steps = view["saga"]["steps"].as_array().unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s["name"] == "process-payment" && s["status"] == "succeeded"),
        "{view}"
    );
    assert!(
        steps
            .iter()
            .all(|s| s["at"].is_string() && s.get("error").is_some()),
        "{view}"
    );
    assert_eq!(call(port, "GET", "/orders/no-such-order", "").await.0, 404);
    let (_, stock) = call(port, "GET", "/stock/book", "").await;
    assert_eq!(
        (stock["available"].as_i64(), stock["reserved"].as_i64()),
        (Some(8), Some(2))
    );
    let (_, wallet) = call(port, "GET", "/wallets/alice", "").await;
    assert_eq!(wallet["balance"], "75.00");
    assert_eq!(call(port, "GET", "/stock/unknown", "").await.0, 404);

    shop.kill();
    // Only the valid order was stored.
    let orders = sqlx::SqlitePool::connect(&format!("sqlite://{}/orders.db", dir.display()))
        .await
        .unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&orders)
        .await
        .unwrap();
    assert_eq!(stored, 1, "invalid requests stored nothing");
    orders.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
