//! The Kafka-compatible broker SIGKILLed and restarted under a running
//! publisher and consumer, and a member busy on a broker that keeps its
//! offsets in a database.
//!
//! The test starts a broker of its own (nisshi, `NISSHI_BIN`, built by
//! `scripts/services kafka`) on a free port, storing in a fresh PostgreSQL
//! database (`NISSHI_STORAGE_URL`, default postgres://postgres@127.0.0.1:5432),
//! so that what the broker confirmed survives the kill.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::testing::{PATIENCE, transport, unique};
use saga_core::{Message, OutboxEntry, Transport};
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
/// timeout: the broker forgets the members, both rejoin by themselves and
/// take their share again, and everything published after it comes back is
/// consumed. Dropping the
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
    // Per member, how many messages published after the outage it took.
    let after: Arc<Mutex<[usize; 2]>> = Arc::default();
    let story: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let mut members = Vec::new();
    for member in 0..2 {
        let mut sub = subject
            .subscribe(&group, std::slice::from_ref(&channel))
            .await
            .unwrap();
        let (seen, after, story) = (Arc::clone(&seen), Arc::clone(&after), Arc::clone(&story));
        members.push(tokio::spawn(async move {
            loop {
                match sub.next().await {
                    Ok(delivery) => {
                        let label = String::from_utf8_lossy(&delivery.message.payload).into_owned();
                        let number: usize = label[1..].parse().unwrap();
                        if number >= EACH_SIDE {
                            after.lock().unwrap()[member] += 1;
                        }
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
    // Both members are back in the group: each takes its share of what is
    // published now (the first to rejoin may have taken all of the above
    // before the other came back).
    let mut next = 2 * EACH_SIDE;
    while after.lock().unwrap().contains(&0) && Instant::now() < deadline {
        publish(next).await;
        next += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
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
    let after = *after.lock().unwrap();
    assert!(
        !after.contains(&0),
        "a member took no part after the broker came back at {back:.1} s (messages taken \
         after it, per member: {after:?}); the members' errors: {:#?}",
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

/// Members that ack as fast as their handlers allow keep their place in
/// their groups. They used to commit on every ack: on a broker that keeps
/// offsets in a database, thousands of commits queued ahead of the
/// members' heartbeats, their sessions timed out, and their partitions were
/// delivered again from the last commit that had landed. Acks now store
/// offsets, and each member commits them once per commit interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_acking_fast_keep_their_sessions() {
    const MESSAGES: usize = 20_000;
    const GROUPS: usize = 6;
    let Some(broker) = Nisshi::start().await else {
        return;
    };
    let config = KafkaConfig::default()
        .brokers(broker.address())
        .prefix(format!("{}.", unique("busy")))
        .partitions(4)
        .session_timeout(Duration::from_secs(3));
    let subject = KafkaTransport::connect(config).await.unwrap();
    let channel = unique("events");
    let mut members = Vec::new();
    for _ in 0..GROUPS {
        members.push(
            subject
                .subscribe(&unique("group"), std::slice::from_ref(&channel))
                .await
                .unwrap(),
        );
    }
    for start in (0..MESSAGES).step_by(1000) {
        let batch: Vec<OutboxEntry> = (start..start + 1000)
            .map(|i| {
                let message = Message::new("thing.done", format!("m{i}").into_bytes())
                    .with_ordering_key(format!("k{}", i % 16));
                OutboxEntry::new(&channel, message)
            })
            .collect();
        for result in subject.publish_batch(&batch).await {
            result.unwrap();
        }
    }
    let consumers = members.into_iter().map(|mut member| {
        tokio::spawn(async move {
            let mut deliveries: HashMap<String, u32> = HashMap::new();
            while deliveries.len() < MESSAGES {
                let delivery = tokio::time::timeout(PATIENCE, member.next())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "{} of {MESSAGES} delivered, then nothing for {PATIENCE:?}",
                            deliveries.len()
                        )
                    })
                    .unwrap();
                let label = String::from_utf8_lossy(&delivery.message.payload).into_owned();
                *deliveries.entry(label).or_default() += 1;
                delivery.ack().await.unwrap();
            }
            deliveries.values().filter(|n| **n > 1).count()
        })
    });
    let mut again = Vec::new();
    for consumer in consumers.collect::<Vec<_>>() {
        again.push(consumer.await.unwrap());
    }
    assert!(
        again.iter().all(|n| *n == 0),
        "messages delivered again, per group, of {MESSAGES}: {again:?}: members lost their partitions while acking"
    );
}
