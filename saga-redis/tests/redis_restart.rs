//! Redis SIGKILLed and restarted under a running publisher and consumer,
//! and Redis refusing writes for a while.
//!
//! The tests start a server of their own on a free port (see
//! `support/redis_server.rs`).

use std::time::Duration;

use saga_core::testing::{PATIENCE, transport, unique};
use saga_core::{Message, OutboxEntry, Transport};
use saga_redis::{RedisConfig, RedisTransport};

#[path = "support/redis_server.rs"]
mod redis_server;

use redis_server::{Keeps, RedisServer};

fn config(server: &RedisServer) -> RedisConfig {
    RedisConfig::default()
        .url(server.url())
        .prefix(format!("{}:", unique("restart")))
        .reclaim_idle(Duration::from_secs(1))
        .block(Duration::from_millis(200))
}

/// SIGKILL and restart mid-stream: nothing acknowledged is lost; publisher
/// and consumer go on by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_loses_no_acknowledged_message() {
    let Some(mut server) = RedisServer::start(Keeps::Everything).await else {
        return;
    };
    let subject = RedisTransport::connect(config(&server)).await.unwrap();
    let restarted = &mut server;
    transport::messages_survive_a_broker_restart(subject, move || async move {
        restarted.restart().await;
    })
    .await;
}

/// A server that comes back without its data (no persistence, or a
/// failover to an empty replica) lost what it held, but a subscription goes
/// on with what is published afterwards: it creates its consumer group
/// again. Before, it failed with `NOGROUP` on every read, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_outlives_a_server_that_lost_its_data() {
    let Some(mut server) = RedisServer::start(Keeps::Nothing).await else {
        return;
    };
    let transport = RedisTransport::connect(config(&server)).await.unwrap();
    let channel = unique("events");
    let mut subscription = transport
        .subscribe(&unique("group"), std::slice::from_ref(&channel))
        .await
        .unwrap();
    server.restart().await;
    let after = Message::new("test.event", b"after".to_vec());
    let give_up = tokio::time::Instant::now() + PATIENCE;
    while let Err(error) = transport.publish(&channel, &after).await {
        assert!(
            tokio::time::Instant::now() < give_up,
            "never published: {error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut errors = Vec::new();
    let received = loop {
        assert!(
            tokio::time::Instant::now() < give_up,
            "nothing received after the server came back empty; the subscription's errors: {errors:#?}"
        );
        match tokio::time::timeout(Duration::from_secs(1), subscription.next()).await {
            Ok(Ok(delivery)) => break delivery,
            Ok(Err(error)) => {
                errors.push(error.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => {}
        }
    };
    assert_eq!(received.message.id, after.id);
    received.ack().await.unwrap();
}

/// A server that refuses writes for a while fails a publish retryably,
/// alone or in a batch, so the relay waits instead of dead-lettering; the
/// same publish goes through once the server takes writes again. Here it is
/// `NOREPLICAS` (fewer replicas than `min-replicas-to-write`); `LOADING`,
/// while a restarted server reads its append-only file, is the same case.
/// Before, a batch called every per-entry server answer permanent: the
/// process campaign saw a relay dead-letter a message on `LOADING`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_writes_for_a_while_fails_publishes_retryably() {
    let Some(server) = RedisServer::start(Keeps::Nothing).await else {
        return;
    };
    let transport = RedisTransport::connect(config(&server)).await.unwrap();
    let admin = redis::Client::open(server.url()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let refuse_writes = |replicas: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("min-replicas-to-write").arg(replicas);
        cmd
    };
    let _: () = refuse_writes("1").query_async(&mut admin).await.unwrap();
    let channel = unique("events");
    let message = Message::new("test.event", b"x".to_vec());
    let alone = transport.publish(&channel, &message).await.unwrap_err();
    assert!(alone.is_retryable(), "a single publish: {alone}");
    let batch = [
        OutboxEntry::new(&channel, message.clone()),
        OutboxEntry::new(&channel, Message::new("test.event", b"y".to_vec())),
    ];
    for result in transport.publish_batch(&batch).await {
        let error = result.unwrap_err();
        assert!(error.is_retryable(), "a batched publish: {error}");
    }
    let _: () = refuse_writes("0").query_async(&mut admin).await.unwrap();
    for result in transport.publish_batch(&batch).await {
        result.unwrap();
    }
}
