//! saga-redis against a real Redis (`REDIS_URL`, default redis://127.0.0.1:6379).

use std::time::Duration;

use redis::streams::StreamRangeReply;
use saga_core::testing::{PATIENCE, free_port, unavailable, unique};
use saga_core::wire::headers;
use saga_core::{Message, Transport};
use saga_redis::{RedisConfig, RedisIdempotencyStore, RedisTransport};

fn config() -> RedisConfig {
    RedisConfig::from_env()
        .prefix(format!("{}:", unique("test")))
        .reclaim_idle(Duration::from_secs(1))
        .block(Duration::from_millis(200))
}

async fn transport() -> Option<RedisTransport> {
    match RedisTransport::connect(config()).await {
        Ok(transport) => Some(transport),
        Err(e) => unavailable("Redis", e),
    }
}

async fn idempotency_store() -> Option<RedisIdempotencyStore> {
    match RedisIdempotencyStore::connect(config()).await {
        Ok(store) => Some(store),
        Err(e) => unavailable("Redis", e),
    }
}

mod transport_suite {
    // No order per key with several members of a group.
    saga_core::transport_conformance!(super::transport, claims: {
        ordered_per_key: false,
        replays_history: true,
        redelivers_unacked: true,
    });
}

mod idempotency_suite {
    saga_core::idempotency_conformance!(super::idempotency_store);
}

async fn raw(config: &RedisConfig) -> redis::aio::MultiplexedConnection {
    redis::Client::open(config.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Raw stream fields, and what the dead letter's error must name.
type Entry<'a> = (&'a [(&'a str, &'a [u8])], &'a str);

fn field(entry: &redis::streams::StreamId, name: &str) -> Option<String> {
    entry.get(name)
}

/// Entries written by someone else that are not our messages go to the
/// dead-letter stream with the reason, and the good ones still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered_with_the_reason() {
    let Some(transport) = transport().await else {
        return;
    };
    let channel = unique("orders");
    let key = transport.stream_key(&channel);
    let mut sub = transport
        .subscribe("billing", std::slice::from_ref(&channel))
        .await
        .unwrap();
    let mut conn = raw(transport.config()).await;
    let good = Message::new("order.placed", b"{}".to_vec());
    let good_id = good.id.to_string();
    let malformed: [Entry; 3] = [
        (
            &[("ce_id", b"not-a-uuid"), ("ce_type", b"x"), ("data", b"{}")],
            "ce_id",
        ),
        (
            &[("ce_type", b"order.placed"), ("ce_id", good_id.as_bytes())],
            "data",
        ),
        (&[("ce_type", &[0xff, 0xfe]), ("data", b"{}")], "UTF-8"),
    ];
    for (fields, _) in &malformed {
        let _: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg(*fields)
            .query_async(&mut conn)
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

    let dead_key = transport.stream_key(&transport.dead_letter_channel(&channel));
    let dead: StreamRangeReply = redis::cmd("XRANGE")
        .arg(&dead_key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead.ids.len(), 3, "each malformed entry dead-lettered once");
    for (entry, (_, names)) in dead.ids.iter().zip(&malformed) {
        let error = field(entry, headers::DEAD_LETTER_ERROR).unwrap();
        assert!(error.contains(names), "{error:?} names {names}");
        assert_eq!(
            field(entry, headers::DEAD_LETTER_CHANNEL).as_deref(),
            Some(channel.as_str())
        );
    }
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(&key)
        .arg("billing")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending.count(), 0, "nothing left pending in the group");
}

/// `redis-cli`, not our code, reads a published message: id, type and
/// payload from the documented fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_reads_a_published_message() {
    let Some(transport) = transport().await else {
        return;
    };
    let channel = unique("orders");
    let sent = Message::json("order.placed", &serde_json::json!({"order": 7}))
        .unwrap()
        .with_ordering_key("order-7");
    transport.publish(&channel, &sent).await.unwrap();
    let output = tokio::process::Command::new("redis-cli")
        .arg("-u")
        .arg(&transport.config().url)
        .arg("--raw")
        .arg("XRANGE")
        .arg(transport.stream_key(&channel))
        .arg("-")
        .arg("+")
        .output()
        .await
        .expect("redis-cli is installed");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let value = |name: &str| {
        let at = lines
            .iter()
            .position(|l| *l == name)
            .unwrap_or_else(|| panic!("field {name} in {text}"));
        lines[at + 1].to_owned()
    };
    assert_eq!(value("ce_id"), sent.id.to_string());
    assert_eq!(value("ce_type"), "order.placed");
    assert_eq!(value("ce_specversion"), "1.0");
    assert_eq!(value("ce_partitionkey"), "order-7");
    assert_eq!(value("content-type"), "application/json");
    assert_eq!(value("data"), r#"{"order":7}"#);
}

/// A member that went away is removed from the group once idle long
/// enough with nothing pending; the live one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_went_away_are_forgotten() {
    let Some(transport) = transport().await else {
        return;
    };
    let transport = RedisTransport::connect(
        transport
            .config()
            .clone()
            .forget_idle(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let channel = unique("events");
    let mut gone = transport
        .subscribe("billing", std::slice::from_ref(&channel))
        .await
        .unwrap();
    transport
        .publish(&channel, &Message::new("tick", b"1".to_vec()))
        .await
        .unwrap();
    gone.next().await.unwrap().ack().await.unwrap();
    drop(gone);
    let mut live = transport
        .subscribe("billing", std::slice::from_ref(&channel))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    transport
        .publish(&channel, &Message::new("tick", b"2".to_vec()))
        .await
        .unwrap();
    live.next().await.unwrap().ack().await.unwrap();
    // The reclaim pass that runs before reading does the clean-up.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _ = tokio::time::timeout(Duration::from_millis(500), live.next()).await;
    let mut conn = raw(transport.config()).await;
    let members: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(transport.stream_key(&channel))
        .arg("billing")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members.consumers.len(), 1, "{:?}", members.consumers);
}

/// A trimmed stream keeps about `max_len` entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_trimmed_to_about_max_len() {
    let Some(transport) = transport().await else {
        return;
    };
    let transport = RedisTransport::connect(transport.config().clone().max_len(10))
        .await
        .unwrap();
    let channel = unique("events");
    for _ in 0..1000 {
        transport
            .publish(&channel, &Message::new("tick", b"x".to_vec()))
            .await
            .unwrap();
    }
    let mut conn = raw(transport.config()).await;
    let len: u64 = redis::cmd("XLEN")
        .arg(transport.stream_key(&channel))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((10..1000).contains(&len), "XLEN {len}");
}

/// A Redis server of this test's own, with an append-only file fsynced on
/// every write, so that a confirmed XADD survives a SIGKILL.
struct OwnServer {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl OwnServer {
    fn start(port: u16, dir: std::path::PathBuf) -> Self {
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn until_up(url: &str) {
    for _ in 0..100 {
        if let Ok(client) = redis::Client::open(url)
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("redis-server at {url} did not come up");
}

/// The broker is SIGKILLed and restarted mid-stream: nothing confirmed is
/// lost and the consumer goes on by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_loses_no_confirmed_message() {
    if transport().await.is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(unique("saga-redis-restart"));
    std::fs::create_dir_all(&dir).unwrap();
    let server = std::sync::Mutex::new(OwnServer::start(free_port(), dir));
    let url = server.lock().unwrap().url();
    until_up(&url).await;
    let subject = RedisTransport::connect(config().url(url.clone()))
        .await
        .unwrap();
    saga_core::testing::transport::messages_survive_a_broker_restart(subject, || async {
        {
            let mut server = server.lock().unwrap();
            server.kill();
            server.spawn();
        }
        until_up(&url).await;
    })
    .await;
}

/// The password of `REDIS_URL` never shows: not in the config's `Debug`, not
/// in the error of a server that cannot be reached, not in the error of a
/// server that refuses it.
#[tokio::test]
async fn passwords_never_show_in_errors_or_debug() {
    let secret = "s3cret-pw";
    let port = free_port();
    let mut closed = RedisConfig::default().url(format!("redis://:{secret}@127.0.0.1:{port}/15"));
    closed.response_timeout = Duration::from_millis(500);
    let debug = format!("{closed:?}");
    assert!(
        !debug.contains(secret) && debug.contains(":***@"),
        "{debug}"
    );
    let error = RedisTransport::connect(closed)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains(&format!(":***@127.0.0.1:{port}")), "{error}");
    assert!(!error.contains(secret), "{error}");

    let Some(reachable) = transport().await else {
        return;
    };
    drop(reachable);
    // The test server has no password: AUTH with one is refused.
    let url = config().url.replacen("://", &format!("://:{secret}@"), 1);
    let error = RedisIdempotencyStore::connect(config().url(url))
        .await
        .unwrap_err()
        .to_string();
    assert!(!error.contains(secret), "{error}");
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

/// A delivery its member keeps (while its handling is retried) is not
/// taken over by another member after `reclaim_idle`, nor counted as
/// delivered again; one left alone is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_delivery_is_not_reclaimed_by_another_member() {
    let Some(transport) = transport().await else {
        return;
    };
    let channel = unique("events");
    let group = unique("group");
    let mut holder = transport
        .subscribe(&group, std::slice::from_ref(&channel))
        .await
        .unwrap();
    let message = Message::new("test.event", b"held".to_vec());
    transport.publish(&channel, &message).await.unwrap();
    let mut held = tokio::time::timeout(PATIENCE, holder.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.message.id, message.id);
    let mut other = transport
        .subscribe(&group, std::slice::from_ref(&channel))
        .await
        .unwrap();
    // Three times `reclaim_idle`, kept every 400 ms.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        if let Ok(taken) = tokio::time::timeout(Duration::from_millis(400), other.next()).await {
            panic!("another member took the kept delivery: {taken:?}");
        }
        held.keep().await.unwrap();
    }
    // Left alone, the delivery is reclaimed: keeping it is what held it.
    drop(holder);
    let taken = tokio::time::timeout(PATIENCE, other.next())
        .await
        .expect("reclaimed once no longer kept")
        .unwrap();
    assert_eq!(taken.message.id, message.id);
    assert_eq!(taken.attempt, 2, "keeping it counted no delivery");
    taken.ack().await.unwrap();
    drop(held);
}
