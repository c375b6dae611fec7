//! The Kafka-compatible broker SIGKILLed and restarted under a running
//! publisher and consumer.
//!
//! The test starts a broker of its own (nisshi, `NISSHI_BIN`, built by
//! `scripts/services kafka`) on a free port, storing in a fresh PostgreSQL
//! database (`NISSHI_STORAGE_URL`, default postgres://postgres@127.0.0.1:5432),
//! so that what the broker confirmed survives the kill.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::testing::{PATIENCE, transport, unique};
use saga_core::{Message, Transport};
use saga_kafka::{KafkaConfig, KafkaTransport};
use tokio::time::Instant;

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

/// A group of two members outlives a broker outage longer than its session
/// timeout: the broker forgets the members, they rejoin by themselves, and
/// everything published after it comes back is consumed. Dropping the
/// members afterwards returns (their close waits for the group on threads
/// of their own: on the runtime's, it never returned here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_rejoins_after_an_outage_longer_than_its_session() {
    const EACH_SIDE: usize = 100;
    let Some(mut broker) = Nisshi::start().await else {
        return;
    };
    let session = Duration::from_secs(6);
    let config = KafkaConfig::default()
        .brokers(broker.address())
        .prefix(format!("{}.", unique("outage")))
        .partitions(4)
        .session_timeout(session);
    let subject = KafkaTransport::connect(config).await.unwrap();
    let (group, channel) = (unique("group"), unique("commands"));
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let story: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let mut members = Vec::new();
    for member in 0..2 {
        let mut sub = subject
            .subscribe(&group, std::slice::from_ref(&channel))
            .await
            .unwrap();
        let (seen, story) = (Arc::clone(&seen), Arc::clone(&story));
        members.push(tokio::spawn(async move {
            loop {
                match sub.next().await {
                    Ok(delivery) => {
                        let label = String::from_utf8_lossy(&delivery.message.payload).into_owned();
                        seen.lock().unwrap().insert(label);
                        let _ = delivery.ack().await;
                    }
                    Err(error) => {
                        let at = started.elapsed().as_secs_f64();
                        story
                            .lock()
                            .unwrap()
                            .push(format!("member {member} at {at:.1} s: {error}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    let publish = |i: usize| {
        let message = Message::new("thing.done", format!("m{i}").into_bytes())
            .with_ordering_key(format!("k{}", i % 16));
        let (subject, channel) = (&subject, &channel);
        async move {
            let give_up = Instant::now() + PATIENCE * 3;
            while let Err(error) = subject.publish(channel, &message).await {
                assert!(Instant::now() < give_up, "m{i} never confirmed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for i in 0..EACH_SIDE {
        publish(i).await;
    }
    broker.kill();
    tokio::time::sleep(session * 4).await;
    let back = started.elapsed().as_secs_f64();
    broker.restart().await;
    for i in EACH_SIDE..2 * EACH_SIDE {
        publish(i).await;
    }
    let deadline = Instant::now() + PATIENCE * 3;
    while seen.lock().unwrap().len() < 2 * EACH_SIDE && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for member in members {
        member.abort();
    }
    let seen = seen.lock().unwrap();
    let missing: Vec<String> = (0..2 * EACH_SIDE)
        .map(|i| format!("m{i}"))
        .filter(|l| !seen.contains(l))
        .collect();
    assert!(
        missing.is_empty(),
        "never consumed after the broker came back at {back:.1} s: {} of {}, {missing:?}\n\
         the members' errors: {:#?}",
        missing.len(),
        2 * EACH_SIDE,
        story.lock().unwrap()
    );
}

/// The errors an outage raised do not stand between a member and what is
/// published after it: at most one waits for the next `next()`. Before, each
/// error the client raised while the broker was away was queued, so a
/// consumer that backs off after each error (as the library's workers do,
/// up to 5 s) spent many minutes on stale errors while its partitions'
/// messages waited behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_leaves_at_most_one_error_before_the_next_message() {
    let Some(mut broker) = Nisshi::start().await else {
        return;
    };
    let config = KafkaConfig::default()
        .brokers(broker.address())
        .prefix(format!("{}.", unique("errors")))
        .partitions(1);
    let subject = KafkaTransport::connect(config).await.unwrap();
    let channel = unique("events");
    let mut sub = subject
        .subscribe(&unique("group"), std::slice::from_ref(&channel))
        .await
        .unwrap();
    // Away for a while, with nobody calling `next()`.
    broker.kill();
    tokio::time::sleep(Duration::from_secs(15)).await;
    broker.restart().await;
    let message = Message::new("thing.done", b"after".to_vec()).with_ordering_key("k");
    let give_up = Instant::now() + PATIENCE * 3;
    while let Err(error) = subject.publish(&channel, &message).await {
        assert!(Instant::now() < give_up, "never confirmed: {error}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut errors = Vec::new();
    let delivery = loop {
        match tokio::time::timeout(PATIENCE * 3, sub.next())
            .await
            .expect("the message published after the outage arrives")
        {
            Ok(delivery) => break delivery,
            Err(error) => errors.push(error.to_string()),
        }
    };
    assert_eq!(delivery.message.id, message.id);
    assert!(
        errors.len() <= 1,
        "{} errors stood before the message published after the outage: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}
