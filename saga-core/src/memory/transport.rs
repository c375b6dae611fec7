//! The in-memory transport, with faults to inject.
//!
//! Each channel is a log; each consumer group keeps its own pending and
//! in-flight sets per channel, starting at the beginning of the log. A group
//! never hands out a message while an earlier message of the same ordering key
//! is in flight or pending, so per-key order holds across competing members.
//! Faults ([`Faults`]) imitate what real brokers do under trouble.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::ids::MessageId;
use crate::message::Message;
use crate::transport::{
    Acknowledger, Capabilities, DeadLetter, Delivery, Subscription, Transport, dead_letter_message,
};

/// Faults the in-memory transport injects. All probabilities are 0.0 to 1.0.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// After an ack, deliver the message once more (a broker redelivering
    /// something already processed).
    pub duplicate: f64,
    /// An ack is lost: the consumer believes it acknowledged, the broker
    /// delivers the message again (a consumer that died right after its commit).
    pub lose_ack: f64,
    /// Hand out messages of different keys in random order instead of publish order.
    pub reorder: bool,
    /// Each message becomes deliverable after a random delay in this range.
    pub delay: Option<(Duration, Duration)>,
    /// A publish fails (retryably) without storing the message.
    pub publish_failure: f64,
}

/// What a publish rule ([`MemoryTransport::on_publish`]) does to one publish.
#[derive(Debug)]
pub enum PublishFault {
    /// The publish fails with this error (retryable or not, as the error says).
    Fail(Error),
    /// The publish never returns, as with a broker that stopped answering.
    Hang,
    /// The publish succeeds after this long, as with a slow broker.
    Delay(Duration),
    /// The publish fails with this error after this long, as with a broker
    /// that stalls and then refuses, or a client that gives up on its own
    /// timeout.
    FailAfter(Duration, Error),
}

type PublishRule = Arc<dyn Fn(&str, &Message) -> Option<PublishFault> + Send + Sync>;

/// Settings of a [`MemoryTransport`].
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryTransportConfig {
    /// Deliveries of one message to one group before it is dead-lettered.
    pub max_deliveries: u32,
    /// Wait before a nacked message is delivered again.
    pub redelivery_delay: Duration,
    /// Faults to inject.
    pub faults: Faults,
    /// Seed of the fault dice, so a failing run can be repeated.
    pub seed: u64,
}

impl Default for MemoryTransportConfig {
    /// 5 deliveries, 10 ms redelivery delay, no faults.
    fn default() -> Self {
        Self {
            max_deliveries: 5,
            redelivery_delay: Duration::from_millis(10),
            faults: Faults::default(),
            seed: 0x5a6a,
        }
    }
}

/// A message waiting in, or handed out by, one group.
#[derive(Clone)]
struct Entry {
    message: Message,
    deliveries: u32,
    available_at: Instant,
    duplicated: bool,
}

/// Position of an entry: log index, then copy number (for duplicates).
type Position = (usize, u32);

#[derive(Default)]
struct GroupChannel {
    offset: usize,
    pending: BTreeMap<Position, Entry>,
    in_flight: HashMap<u64, (Position, Entry)>,
    copies: u32,
}

struct State {
    logs: HashMap<String, Vec<Message>>,
    groups: HashMap<(String, String), GroupChannel>,
    config: MemoryTransportConfig,
    rng: fastrand::Rng,
    outage_until: Option<Instant>,
    next_tag: u64,
    /// Dead letters replayed, per dead-letter channel.
    replayed: HashMap<String, HashSet<MessageId>>,
}

struct Shared {
    state: Mutex<State>,
    changed: Notify,
    rule: Mutex<Option<PublishRule>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An in-process broker. Clones share the same channels.
#[derive(Clone)]
pub struct MemoryTransport {
    shared: Arc<Shared>,
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransport").finish_non_exhaustive()
    }
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new(MemoryTransportConfig::default())
    }
}

impl MemoryTransport {
    /// A transport with `config`.
    pub fn new(config: MemoryTransportConfig) -> Self {
        let rng = fastrand::Rng::with_seed(config.seed);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    logs: HashMap::new(),
                    groups: HashMap::new(),
                    config,
                    rng,
                    outage_until: None,
                    next_tag: 0,
                    replayed: HashMap::new(),
                }),
                changed: Notify::new(),
                rule: Mutex::new(None),
            }),
        }
    }

    /// Replaces the faults (for example to stop them before checking results).
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().config.faults = faults;
        self.shared.changed.notify_waiters();
    }

    /// The broker is unreachable for `duration`: publishes and acks fail,
    /// nothing is delivered, unsettled deliveries come back afterwards.
    pub fn outage(&self, duration: Duration) {
        self.shared.lock().outage_until = Some(Instant::now() + duration);
        self.shared.changed.notify_waiters();
    }

    /// Decides the fate of every publish from now on: `Some(fault)` applies
    /// the fault, `None` publishes normally. Replaces the previous rule.
    pub fn on_publish(
        &self,
        rule: impl Fn(&str, &Message) -> Option<PublishFault> + Send + Sync + 'static,
    ) {
        *self
            .shared
            .rule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(rule));
    }

    /// Removes the publish rule.
    pub fn clear_publish_rule(&self) {
        *self
            .shared
            .rule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Every message ever published to `channel`, in order (dead letters
    /// included, on dead-letter channels).
    pub fn published(&self, channel: &str) -> Vec<Message> {
        self.shared
            .lock()
            .logs
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }
}

fn in_outage(state: &State, now: Instant) -> bool {
    state.outage_until.is_some_and(|until| until > now)
}

fn append(state: &mut State, channel: &str, message: Message) {
    state
        .logs
        .entry(channel.to_owned())
        .or_default()
        .push(message);
}

impl State {
    /// Moves new log entries of `channel` into `group`'s pending set.
    fn catch_up(&mut self, group: &str, channel: &str, now: Instant) {
        let log_len = self.logs.get(channel).map_or(0, Vec::len);
        let key = (group.to_owned(), channel.to_owned());
        let delay = self.config.faults.delay;
        let start = self.groups.entry(key.clone()).or_default().offset;
        for index in start..log_len {
            let extra = delay.map_or(Duration::ZERO, |(min, max)| {
                let span = max.saturating_sub(min).as_micros() as u64;
                min + Duration::from_micros(self.rng.u64(0..=span))
            });
            let message = self.logs[channel][index].clone();
            let gc = self.groups.get_mut(&key).expect("inserted above");
            gc.pending.insert(
                (index, 0),
                Entry {
                    message,
                    deliveries: 0,
                    available_at: now + extra,
                    duplicated: false,
                },
            );
        }
        if let Some(gc) = self.groups.get_mut(&key) {
            gc.offset = log_len;
        }
    }

    /// Hands out the next deliverable entry of `group` on `channels`, or says
    /// when to look again.
    fn take(
        &mut self,
        group: &str,
        channels: &[String],
        now: Instant,
    ) -> Result<(String, u64, Entry), Option<Instant>> {
        if in_outage(self, now) {
            return Err(self.outage_until);
        }
        let mut wake: Option<Instant> = None;
        let mut candidates: Vec<(String, Position)> = Vec::new();
        for channel in channels {
            self.catch_up(group, channel, now);
            let gc = &self.groups[&(group.to_owned(), channel.clone())];
            let mut blocked: HashSet<&str> = gc
                .in_flight
                .values()
                .filter_map(|(_, e)| e.message.ordering_key.as_deref())
                .collect();
            for (position, entry) in &gc.pending {
                let key = entry.message.ordering_key.as_deref();
                if key.is_some_and(|k| blocked.contains(k)) {
                    continue;
                }
                if entry.available_at <= now {
                    candidates.push((channel.clone(), *position));
                    if !self.config.faults.reorder {
                        break;
                    }
                } else {
                    wake = Some(wake.map_or(entry.available_at, |w| w.min(entry.available_at)));
                }
                if let Some(k) = key {
                    blocked.insert(k);
                }
            }
        }
        if candidates.is_empty() {
            return Err(wake);
        }
        let pick = if self.config.faults.reorder {
            self.rng.usize(0..candidates.len())
        } else {
            0
        };
        let (channel, position) = candidates.swap_remove(pick);
        self.next_tag += 1;
        let tag = self.next_tag;
        let gc = self
            .groups
            .get_mut(&(group.to_owned(), channel.clone()))
            .expect("candidate group exists");
        let mut entry = gc.pending.remove(&position).expect("candidate is pending");
        entry.deliveries += 1;
        gc.in_flight.insert(tag, (position, entry.clone()));
        Ok((channel, tag, entry))
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn publish(&self, channel: &str, message: &Message) -> Result<()> {
        let rule = self
            .shared
            .rule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match rule.and_then(|rule| rule(channel, message)) {
            Some(PublishFault::Fail(error)) => return Err(error),
            Some(PublishFault::Hang) => std::future::pending::<()>().await,
            Some(PublishFault::Delay(wait)) => tokio::time::sleep(wait).await,
            Some(PublishFault::FailAfter(wait, error)) => {
                tokio::time::sleep(wait).await;
                return Err(error);
            }
            None => {}
        }
        {
            let mut state = self.shared.lock();
            if in_outage(&state, Instant::now()) {
                return Err(Error::Unavailable("in-memory broker outage".into()));
            }
            let failure = state.config.faults.publish_failure;
            if failure > 0.0 && state.rng.f64() < failure {
                return Err(Error::Unavailable("injected publish failure".into()));
            }
            append(&mut state, channel, message.clone());
        }
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn subscribe(&self, group: &str, channels: &[String]) -> Result<Box<dyn Subscription>> {
        if channels.is_empty() {
            return Err(Error::Config("subscribe needs at least one channel".into()));
        }
        {
            let mut state = self.shared.lock();
            let now = Instant::now();
            for channel in channels {
                state.catch_up(group, channel, now);
            }
        }
        Ok(Box::new(MemorySubscription {
            shared: Arc::clone(&self.shared),
            group: group.to_owned(),
            channels: channels.to_vec(),
        }))
    }

    /// Fails while an [`outage`](Self::outage) lasts.
    async fn check(&self) -> Result<()> {
        if in_outage(&self.shared.lock(), Instant::now()) {
            return Err(Error::Unavailable("in-memory broker outage".into()));
        }
        Ok(())
    }

    /// Forgets the channels' logs and every group's place in them (whatever
    /// `groups` names: the in-memory broker knows them all).
    async fn delete_channels(&self, channels: &[String], _groups: &[String]) -> Result<()> {
        let mut state = self.shared.lock();
        for channel in channels {
            for name in [channel.clone(), self.dead_letter_channel(channel)] {
                state.logs.remove(&name);
                state.replayed.remove(&name);
                state.groups.retain(|(_, of), _| *of != name);
            }
        }
        Ok(())
    }

    async fn dead_letters(&self, channel: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        let dead = self.dead_letter_channel(channel);
        let state = self.shared.lock();
        let replayed = state.replayed.get(&dead);
        Ok(state
            .logs
            .get(&dead)
            .into_iter()
            .flatten()
            .filter(|m| replayed.is_none_or(|r| !r.contains(&m.id)))
            .take(limit)
            .map(|m| DeadLetter::from_dead_message(m.clone()))
            .collect())
    }

    async fn replay_dead_letter(&self, channel: &str, id: MessageId) -> Result<bool> {
        let dead = self.dead_letter_channel(channel);
        let letter = {
            let state = self.shared.lock();
            if state.replayed.get(&dead).is_some_and(|r| r.contains(&id)) {
                return Ok(false);
            }
            let Some(message) = state
                .logs
                .get(&dead)
                .and_then(|log| log.iter().find(|m| m.id == id))
            else {
                return Ok(false);
            };
            DeadLetter::from_dead_message(message.clone())
        };
        self.publish(channel, &letter.message).await?;
        self.shared
            .lock()
            .replayed
            .entry(dead)
            .or_default()
            .insert(id);
        Ok(true)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_per_key: true,
            replays_history: true,
            redelivers_unacked: true,
        }
    }
}

struct MemorySubscription {
    shared: Arc<Shared>,
    group: String,
    channels: Vec<String>,
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = self
                .shared
                .lock()
                .take(&self.group, &self.channels, Instant::now());
            match taken {
                Ok((channel, tag, entry)) => {
                    let acker = MemoryAcker {
                        shared: Arc::clone(&self.shared),
                        group: self.group.clone(),
                        channel: channel.clone(),
                        tag,
                        settled: false,
                    };
                    return Ok(Delivery::new(
                        channel,
                        entry.message,
                        entry.deliveries,
                        Box::new(acker),
                    ));
                }
                Err(Some(wake)) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(wake) => {}
                    }
                }
                Err(None) => notified.await,
            }
        }
    }
}

struct MemoryAcker {
    shared: Arc<Shared>,
    group: String,
    channel: String,
    tag: u64,
    settled: bool,
}

enum Settle {
    Ack,
    Nack(String),
    DeadLetter(String),
    /// The consumer went away: back in line without delay.
    Abandon,
}

impl MemoryAcker {
    fn settle(&mut self, how: Settle) -> Result<()> {
        self.settled = true;
        let mut state = self.shared.lock();
        let now = Instant::now();
        let key = (self.group.clone(), self.channel.clone());
        let Some((position, mut entry)) = state
            .groups
            .get_mut(&key)
            .and_then(|gc| gc.in_flight.remove(&self.tag))
        else {
            return Ok(());
        };
        let outage = in_outage(&state, now);
        let how = if outage { Settle::Abandon } else { how };
        let faults = state.config.faults.clone();
        let max_deliveries = state.config.max_deliveries;
        let redelivery_delay = state.config.redelivery_delay;
        let requeue_at = match how {
            Settle::Ack if faults.lose_ack > 0.0 && state.rng.f64() < faults.lose_ack => Some(now),
            Settle::Ack => {
                if !entry.duplicated && faults.duplicate > 0.0 && state.rng.f64() < faults.duplicate
                {
                    let gc = state.groups.get_mut(&key).expect("group exists");
                    gc.copies += 1;
                    let copy = Entry {
                        message: entry.message.clone(),
                        deliveries: 0,
                        available_at: now,
                        duplicated: true,
                    };
                    gc.pending.insert((position.0, gc.copies), copy);
                }
                None
            }
            Settle::Nack(error) if entry.deliveries >= max_deliveries => {
                let dead = dead_letter_message(
                    &entry.message,
                    &self.channel,
                    &format!("delivered {} times; last error: {error}", entry.deliveries),
                );
                append(&mut state, &format!("{}.dlq", self.channel), dead);
                None
            }
            Settle::Nack(_) => Some(now + redelivery_delay),
            Settle::DeadLetter(error) => {
                let dead = dead_letter_message(&entry.message, &self.channel, &error);
                append(&mut state, &format!("{}.dlq", self.channel), dead);
                None
            }
            Settle::Abandon => Some(now),
        };
        if let Some(at) = requeue_at {
            entry.available_at = at;
            if let Some(gc) = state.groups.get_mut(&key) {
                gc.pending.insert(position, entry);
            }
        }
        drop(state);
        self.shared.changed.notify_waiters();
        if outage {
            return Err(Error::Unavailable(
                "in-memory broker outage; the delivery will come again".into(),
            ));
        }
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.settle(Settle::Abandon);
        }
    }
}

#[async_trait]
impl Acknowledger for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settle(Settle::Ack)
    }

    async fn nack(mut self: Box<Self>, error: &str) -> Result<()> {
        self.settle(Settle::Nack(error.to_owned()))
    }

    async fn dead_letter(mut self: Box<Self>, error: &str) -> Result<()> {
        self.settle(Settle::DeadLetter(error.to_owned()))
    }
}
