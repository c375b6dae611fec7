//! Conformance cases for [`Transport`].
//!
//! Each case uses channels and groups of its own. Cases about ordering,
//! history and redelivery check only what [`Transport::capabilities`] claims.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::SubsecRound;

use crate::ids::{MessageId, SagaId};
use crate::message::{Message, OutboxEntry, TraceContext};
use crate::testing::{PATIENCE, unique};
use crate::transport::{Delivery, Subscription, Transport};
use crate::wire::headers;

/// How long a case waits to be sure nothing more arrives.
const QUIET: Duration = Duration::from_millis(1500);

async fn subscribe<T: Transport>(
    transport: &T,
    group: &str,
    channel: &str,
) -> Box<dyn Subscription> {
    transport
        .subscribe(group, &[channel.to_owned()])
        .await
        .unwrap_or_else(|e| panic!("subscribe {group} to {channel}: {e}"))
}

async fn receive(subscription: &mut Box<dyn Subscription>) -> Delivery {
    tokio::time::timeout(PATIENCE, subscription.next())
        .await
        .expect("a delivery within the patience window")
        .expect("a delivery")
}

async fn nothing_more(subscription: &mut Box<dyn Subscription>) {
    if let Ok(delivery) = tokio::time::timeout(QUIET, subscription.next()).await {
        panic!(
            "expected no delivery, got {:?}",
            delivery.map(|d| d.message.id)
        );
    }
}

fn message(label: &str) -> Message {
    Message::new("test.event", label.as_bytes().to_vec()).with_source("conformance")
}

fn keyed(key: &str, label: &str) -> Message {
    message(label).with_ordering_key(key)
}

fn label(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.message.payload).into_owned()
}

/// A reachable broker passes the health check.
pub async fn check_passes_while_the_broker_runs<T: Transport>(transport: T) {
    transport.check().await.expect("the broker answers");
}

/// A published message reaches a subscribed group with its id, type and payload.
pub async fn published_message_is_delivered<T: Transport>(transport: T) {
    let channel = unique("events");
    let mut sub = subscribe(&transport, &unique("group"), &channel).await;
    let sent = message("hello");
    transport.publish(&channel, &sent).await.unwrap();
    let delivery = receive(&mut sub).await;
    assert_eq!(delivery.channel, channel);
    assert_eq!(delivery.message.id, sent.id);
    assert_eq!(delivery.message.message_type, "test.event");
    assert_eq!(delivery.message.payload, b"hello");
    assert_eq!(delivery.attempt, 1);
    delivery.ack().await.unwrap();
}

/// Every envelope field and free header survives the trip.
pub async fn envelope_round_trips<T: Transport>(transport: T) {
    let channel = unique("events");
    let mut sub = subscribe(&transport, &unique("group"), &channel).await;
    let mut sent = Message::json(
        "order.placed",
        &serde_json::json!({"total": "12.50", "items": [1, 2]}),
    )
    .unwrap()
    .with_source("order-service")
    .with_ordering_key("order-7")
    .with_correlation_id("corr-7")
    .with_causation_id(MessageId::new())
    .with_saga_id(SagaId::new())
    .with_reply_to("order.replies")
    .with_trace(TraceContext {
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        tracestate: Some("congo=t61rcWkgMzE".into()),
    })
    .with_header("tenant", "acme")
    .with_header(headers::SAGA_STEP, "2");
    sent.time = sent.time.trunc_subsecs(6);
    transport.publish(&channel, &sent).await.unwrap();
    let delivery = receive(&mut sub).await;
    assert_eq!(delivery.message, sent);
    delivery.ack().await.unwrap();
}

/// After [`Transport::delete_channels`] a channel starts afresh: the
/// messages its group had not taken are gone, and it works again at once.
/// Deleting channels that never existed succeeds.
pub async fn deleted_channels_start_afresh<T: Transport>(transport: T) {
    transport
        .delete_channels(&[unique("never")], &[unique("group")])
        .await
        .expect("deleting what does not exist succeeds");
    let channel = unique("events");
    let group = unique("group");
    let sub = subscribe(&transport, &group, &channel).await;
    transport
        .publish(&channel, &message("before"))
        .await
        .unwrap();
    drop(sub);
    transport
        .delete_channels(std::slice::from_ref(&channel), std::slice::from_ref(&group))
        .await
        .expect("deleting the channel");
    let mut sub = subscribe(&transport, &group, &channel).await;
    transport
        .publish(&channel, &message("after"))
        .await
        .unwrap();
    let delivery = receive(&mut sub).await;
    assert_eq!(
        label(&delivery),
        "after",
        "what the deleted channel held is gone"
    );
    delivery.ack().await.unwrap();
    nothing_more(&mut sub).await;
}

/// After an ack the group never sees the message again.
pub async fn acked_message_is_not_redelivered<T: Transport>(transport: T) {
    let channel = unique("events");
    let mut sub = subscribe(&transport, &unique("group"), &channel).await;
    transport.publish(&channel, &message("once")).await.unwrap();
    receive(&mut sub).await.ack().await.unwrap();
    nothing_more(&mut sub).await;
}

/// A nacked message comes back, counted as a second delivery.
pub async fn nacked_message_is_redelivered<T: Transport>(transport: T) {
    let channel = unique("events");
    let mut sub = subscribe(&transport, &unique("group"), &channel).await;
    let sent = message("again");
    transport.publish(&channel, &sent).await.unwrap();
    receive(&mut sub).await.nack("not yet").await.unwrap();
    let again = receive(&mut sub).await;
    assert_eq!(again.message.id, sent.id);
    assert_eq!(again.attempt, 2);
    again.ack().await.unwrap();
}

/// A member that dies holding an unacknowledged delivery: another member of
/// the group gets the message.
pub async fn unacked_delivery_goes_to_another_member<T: Transport>(transport: T) {
    assert!(
        transport.capabilities().redelivers_unacked,
        "the case runs only where `redelivers_unacked` is claimed"
    );
    let channel = unique("events");
    let group = unique("group");
    let mut first = subscribe(&transport, &group, &channel).await;
    let sent = message("orphan");
    transport.publish(&channel, &sent).await.unwrap();
    let delivery = receive(&mut first).await;
    assert_eq!(delivery.message.id, sent.id);
    let mut second = subscribe(&transport, &group, &channel).await;
    drop(delivery);
    drop(first);
    let again = receive(&mut second).await;
    assert_eq!(again.message.id, sent.id);
    again.ack().await.unwrap();
}

/// Two members of one group share the messages: each message reaches one of
/// them, and both get some.
pub async fn group_members_share_the_work<T: Transport>(transport: T) {
    let channel = unique("events");
    let group = unique("group");
    let subs = [
        subscribe(&transport, &group, &channel).await,
        subscribe(&transport, &group, &channel).await,
    ];
    let total = 40;
    for i in 0..total {
        transport
            .publish(&channel, &keyed(&format!("k{i}"), &format!("m{i}")))
            .await
            .unwrap();
    }
    let seen: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let mut tasks = Vec::new();
    for (member, mut sub) in subs.into_iter().enumerate() {
        let seen = Arc::clone(&seen);
        tasks.push(tokio::spawn(async move {
            while let Ok(Ok(delivery)) = tokio::time::timeout(QUIET * 2, sub.next()).await {
                seen.lock().unwrap().push((member, label(&delivery)));
                tokio::time::sleep(Duration::from_millis(5)).await;
                delivery.ack().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    let unique_labels: HashSet<_> = seen.iter().map(|(_, l)| l.clone()).collect();
    assert_eq!(unique_labels.len(), total, "every message consumed");
    assert_eq!(seen.len(), total, "no message consumed twice");
    for member in 0..2 {
        assert!(
            seen.iter().any(|(m, _)| *m == member),
            "member {member} got no work"
        );
    }
}

/// Two groups each receive every message.
pub async fn every_group_gets_every_message<T: Transport>(transport: T) {
    let channel = unique("events");
    let mut a = subscribe(&transport, &unique("group-a"), &channel).await;
    let mut b = subscribe(&transport, &unique("group-b"), &channel).await;
    for i in 0..5 {
        transport
            .publish(&channel, &message(&format!("m{i}")))
            .await
            .unwrap();
    }
    for sub in [&mut a, &mut b] {
        let mut got = HashSet::new();
        for _ in 0..5 {
            let delivery = receive(sub).await;
            got.insert(label(&delivery));
            delivery.ack().await.unwrap();
        }
        assert_eq!(got.len(), 5);
    }
}

/// Messages of one key are handled in publish order, also by competing
/// members and across nacks: every fourth message is nacked on its first
/// delivery, and the next message of its key must not be handled before it.
/// Two messages of one key are never in flight at once.
pub async fn order_per_key_is_kept<T: Transport>(transport: T) {
    assert!(
        transport.capabilities().ordered_per_key,
        "the case runs only where `ordered_per_key` is claimed"
    );
    let channel = unique("events");
    let group = unique("group");
    let subs = [
        subscribe(&transport, &group, &channel).await,
        subscribe(&transport, &group, &channel).await,
    ];
    let keys = ["a", "b", "c"];
    let per_key = 15;
    for i in 0..per_key {
        for key in keys {
            transport
                .publish(&channel, &keyed(key, &format!("{key}:{i}")))
                .await
                .unwrap();
        }
    }
    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let nacked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let overlaps: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for mut sub in subs {
        let (order, nacked) = (Arc::clone(&order), Arc::clone(&nacked));
        let (in_flight, overlaps) = (Arc::clone(&in_flight), Arc::clone(&overlaps));
        tasks.push(tokio::spawn(async move {
            while let Ok(Ok(delivery)) = tokio::time::timeout(QUIET * 2, sub.next()).await {
                let label = label(&delivery);
                let (key, index) = label.split_once(':').unwrap();
                let key = key.to_owned();
                if !in_flight.lock().unwrap().insert(key.clone()) {
                    overlaps.lock().unwrap().push(label.clone());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                let first_time = index.parse::<u32>().unwrap() % 4 == 1
                    && nacked.lock().unwrap().insert(label.clone());
                in_flight.lock().unwrap().remove(&key);
                if first_time {
                    delivery.nack("not yet").await.unwrap();
                } else {
                    order.lock().unwrap().push(label);
                    delivery.ack().await.unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        *overlaps.lock().unwrap(),
        Vec::<String>::new(),
        "messages handed out while another message of their key was in flight"
    );
    let mut by_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for entry in order.lock().unwrap().iter() {
        let (key, index) = entry.split_once(':').unwrap();
        by_key
            .entry(key.to_owned())
            .or_default()
            .push(index.parse().unwrap());
    }
    for key in keys {
        let expected: Vec<u32> = (0..per_key).collect();
        assert_eq!(
            by_key.get(key),
            Some(&expected),
            "key {key} out of order or incomplete"
        );
    }
}

/// A message nacked again and again ends in the dead-letter channel with its
/// error, and the channel keeps flowing.
pub async fn repeated_nacks_end_in_the_dead_letter_channel<T: Transport>(transport: T) {
    let channel = unique("events");
    let mut dead = subscribe(
        &transport,
        &unique("dlq-reader"),
        &transport.dead_letter_channel(&channel),
    )
    .await;
    let mut sub = subscribe(&transport, &unique("group"), &channel).await;
    let poison = message("poison");
    transport.publish(&channel, &poison).await.unwrap();
    let mut deliveries = 0;
    while let Ok(Ok(delivery)) = tokio::time::timeout(QUIET * 2, sub.next()).await {
        assert_eq!(delivery.message.id, poison.id);
        deliveries += 1;
        assert!(deliveries <= 50, "never dead-lettered");
        delivery.nack("handler exploded").await.unwrap();
    }
    assert!(deliveries >= 2, "redelivered before dead-lettering");
    let letter = receive(&mut dead).await;
    assert_eq!(letter.message.id, poison.id);
    let error = letter
        .message
        .header(headers::DEAD_LETTER_ERROR)
        .unwrap_or_default();
    assert!(
        error.contains("handler exploded"),
        "dead letter carries the error: {error:?}"
    );
    letter.ack().await.unwrap();
    let next = message("next");
    transport.publish(&channel, &next).await.unwrap();
    let delivery = receive(&mut sub).await;
    assert_eq!(delivery.message.id, next.id);
    delivery.ack().await.unwrap();
}

/// A message dead-lettered by the consumer goes to the dead-letter channel at
/// once and is not delivered again.
pub async fn dead_lettered_message_is_not_redelivered<T: Transport>(transport: T) {
    let channel = unique("events");
    let mut dead = subscribe(
        &transport,
        &unique("dlq-reader"),
        &transport.dead_letter_channel(&channel),
    )
    .await;
    let mut sub = subscribe(&transport, &unique("group"), &channel).await;
    let bad = message("malformed");
    transport.publish(&channel, &bad).await.unwrap();
    receive(&mut sub)
        .await
        .dead_letter("payload is not JSON")
        .await
        .unwrap();
    let letter = receive(&mut dead).await;
    assert_eq!(letter.message.id, bad.id);
    assert_eq!(
        letter.message.header(headers::DEAD_LETTER_ERROR),
        Some("payload is not JSON")
    );
    assert_eq!(
        letter.message.header(headers::DEAD_LETTER_CHANNEL),
        Some(channel.as_str())
    );
    letter.ack().await.unwrap();
    nothing_more(&mut sub).await;
}

/// Dead letters are listed oldest first with their error, and a replayed one
/// is delivered again as first published, then no longer listed.
pub async fn dead_letters_are_listed_and_replayed<T: Transport>(transport: T) {
    let channel = unique("events");
    let mut sub = subscribe(&transport, &unique("group"), &channel).await;
    // One key: the case reads them in the order published, which a
    // transport keeps per key only.
    let (good, first, second) = (
        keyed("k", "good"),
        keyed("k", "poison-1"),
        keyed("k", "poison-2"),
    );
    for m in [&good, &first, &second] {
        transport.publish(&channel, m).await.unwrap();
    }
    for (expected, error) in [
        (&good, None),
        (&first, Some("bad input 1")),
        (&second, Some("bad input 2")),
    ] {
        let delivery = receive(&mut sub).await;
        assert_eq!(delivery.message.id, expected.id);
        match error {
            None => delivery.ack().await.unwrap(),
            Some(error) => delivery.dead_letter(error).await.unwrap(),
        }
    }
    let listed = transport.dead_letters(&channel, 10).await.unwrap();
    let summary: Vec<(MessageId, &str)> = listed
        .iter()
        .map(|l| (l.message.id, l.error.as_str()))
        .collect();
    assert_eq!(
        summary,
        [(first.id, "bad input 1"), (second.id, "bad input 2")],
        "the dead letters, oldest first, with their errors"
    );
    assert_eq!(listed[0].message.payload, first.payload);
    assert_eq!(listed[0].message.message_type, first.message_type);
    assert_eq!(listed[0].message.header(headers::DEAD_LETTER_ERROR), None);
    let one = transport.dead_letters(&channel, 1).await.unwrap();
    assert_eq!(one.len(), 1, "the limit holds");
    assert_eq!(one[0].message.id, first.id);
    assert!(
        transport
            .dead_letters(&channel, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        transport
            .dead_letters(&unique("quiet"), 10)
            .await
            .unwrap()
            .is_empty(),
        "a channel with no dead letter lists none"
    );

    assert!(
        transport
            .replay_dead_letter(&channel, first.id)
            .await
            .unwrap(),
        "the dead letter is replayed"
    );
    let again = receive(&mut sub).await;
    assert_eq!(again.message.id, first.id, "delivered again");
    assert_eq!(again.message.payload, first.payload);
    assert_eq!(
        again.message.header(headers::DEAD_LETTER_ERROR),
        None,
        "as first published, without the dead-letter headers"
    );
    again.ack().await.unwrap();
    let left: Vec<MessageId> = transport
        .dead_letters(&channel, 10)
        .await
        .unwrap()
        .iter()
        .map(|l| l.message.id)
        .collect();
    assert_eq!(left, [second.id], "a replayed dead letter is off the list");
    assert!(
        !transport
            .replay_dead_letter(&channel, first.id)
            .await
            .unwrap(),
        "replayed once only"
    );
    assert!(
        !transport
            .replay_dead_letter(&channel, MessageId::new())
            .await
            .unwrap(),
        "an unknown id is not replayed"
    );
    nothing_more(&mut sub).await;
}

/// A batch publish confirms each message; all are delivered.
pub async fn publish_batch_confirms_each_message<T: Transport>(transport: T) {
    let channel = unique("events");
    let mut sub = subscribe(&transport, &unique("group"), &channel).await;
    let batch: Vec<_> = (0..10)
        .map(|i| OutboxEntry::new(channel.clone(), keyed("k", &format!("m{i}"))))
        .collect();
    let results = transport.publish_batch(&batch).await;
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let mut got = Vec::new();
    for _ in 0..10 {
        let delivery = receive(&mut sub).await;
        got.push(label(&delivery));
        delivery.ack().await.unwrap();
    }
    let expected: Vec<_> = (0..10).map(|i| format!("m{i}")).collect();
    if transport.capabilities().ordered_per_key {
        assert_eq!(got, expected);
    } else {
        assert_eq!(
            got.iter().collect::<HashSet<_>>(),
            expected.iter().collect()
        );
    }
}

/// A group that subscribes after messages were published still receives them.
pub async fn late_group_receives_history<T: Transport>(transport: T) {
    assert!(
        transport.capabilities().replays_history,
        "the case runs only where `replays_history` is claimed"
    );
    let channel = unique("events");
    let sent = message("early");
    transport.publish(&channel, &sent).await.unwrap();
    let mut sub = subscribe(&transport, &unique("late"), &channel).await;
    let delivery = receive(&mut sub).await;
    assert_eq!(delivery.message.id, sent.id);
    delivery.ack().await.unwrap();
}

/// The broker restarts mid-stream: every message confirmed before `restart`
/// and every message published after it is consumed, and the subscription
/// goes on by itself.
///
/// Not in [`crate::transport_conformance!`]: `restart` stops and starts the
/// real broker (it returns once the broker accepts connections again), so a
/// backend calls this from a test binary of its own.
pub async fn messages_survive_a_broker_restart<T, F, Fut>(transport: T, restart: F)
where
    T: Transport,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    const EACH_SIDE: usize = 200;
    let channel = unique("events");
    let mut sub = subscribe(&transport, &unique("group"), &channel).await;
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    // What the consumer went through, for the failure message: its errors
    // and when it last received, relative to the restart.
    let story: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = tokio::time::Instant::now();
    let consumer = {
        let (seen, story) = (Arc::clone(&seen), Arc::clone(&story));
        tokio::spawn(async move {
            loop {
                match sub.next().await {
                    Ok(delivery) => {
                        // Handled once received: an ack lost in the restart
                        // means it may come again, never that it is lost.
                        seen.lock().unwrap().insert(label(&delivery));
                        let _ = delivery.ack().await;
                        // Slow enough that the restart finds work in flight.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(error) => {
                        let at = started.elapsed().as_secs_f64();
                        story.lock().unwrap().push(format!("{at:.2} s: {error}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    let publish = |i: usize| {
        let message = keyed(&format!("k{}", i % 7), &format!("m{i}"));
        let transport = &transport;
        let channel = &channel;
        async move {
            let give_up = tokio::time::Instant::now() + PATIENCE * 3;
            while let Err(error) = transport.publish(channel, &message).await {
                assert!(
                    tokio::time::Instant::now() < give_up,
                    "m{i} never confirmed: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for i in 0..EACH_SIDE {
        publish(i).await;
    }
    let before = seen.lock().unwrap().len();
    let restarting = started.elapsed().as_secs_f64();
    restart().await;
    let restarted = started.elapsed().as_secs_f64();
    for i in EACH_SIDE..2 * EACH_SIDE {
        publish(i).await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    while seen.lock().unwrap().len() < 2 * EACH_SIDE && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.abort();
    let seen = seen.lock().unwrap();
    let missing: Vec<String> = (0..2 * EACH_SIDE)
        .map(|i| format!("m{i}"))
        .filter(|l| !seen.contains(l))
        .collect();
    assert!(
        before < EACH_SIDE,
        "the restart came after everything was consumed: nothing was in flight"
    );
    assert!(
        missing.is_empty(),
        "never consumed: {missing:?}\nthe restart ran from {restarting:.2} s to {restarted:.2} s; \
         the consumer's errors: {:#?}",
        story.lock().unwrap()
    );
}
