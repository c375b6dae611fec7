//! The RabbitMQ transport.
//!
//! Topology, all durable and declared by the transport (`P` is
//! [`AmqpConfig::prefix`]):
//!
//! | name | kind | what for |
//! |---|---|---|
//! | `P<channel>` | fanout exchange | every message published to the channel |
//! | `P<channel>/<group>` | quorum queue bound to it | one group's copy; its members compete for it |
//! | `P<channel>.dlq` | fanout exchange | dead letters of the channel (`x-dead-letter-exchange` of every group queue) |
//! | `P<channel>.dlq` | classic queue bound to it | keeps the dead letters until an operator reads them |
//!
//! | contract | how |
//! |---|---|
//! | publish confirmed | publisher confirms; `mandatory`, so a channel no group listens on yet fails the publish (retryable) instead of dropping the message |
//! | persistent | `delivery_mode = 2` on quorum queues |
//! | ack after the handler | manual `basic.ack` |
//! | nack | the member hands the delivery back to itself and delivers it again before anything prefetched after it (a requeue would put it behind those, and the key's next message would overtake it); the broker keeps it unacknowledged meanwhile. Attempts = the queue's `x-delivery-count` (deliveries to members) plus the member's own nacks |
//! | dead member, dropped delivery | RabbitMQ requeues what a closed channel held; a dropped delivery is nacked |
//! | dead letter | published to `P<channel>.dlq` with the error, confirmed, then acked; `x-delivery-limit` backs it up for consumers that crash before they can |
//! | dead letters listed | `basic.get` from the `P<channel>.dlq` queue without acknowledging, on a connection of its own that is then closed: the broker puts them back where they were |
//! | dead letter replayed | found the same way, published to `P<channel>` and confirmed, then acknowledged (removed) |
//!
//! A delivery held while its handling is retried stays unacknowledged; the
//! broker's `consumer_timeout` (30 minutes by default) closes a channel that
//! holds one longer, and the message is delivered again.
//!
//! Headers are the CloudEvents ones of [`saga_core::wire`] as AMQP string
//! headers; `message_id`, `type` and `content_type` are also set as AMQP
//! properties for tools that show those.
//!
//! A dropped subscription closes its connection at once; lapin ends that
//! connection's heartbeat task at its next tick, half the negotiated
//! heartbeat later (30 s by default; `?heartbeat=N` in the URL sets it).
//!
//! Order per ordering key: RabbitMQ dispatches one queue round-robin to its
//! consumers, so competing members may handle two messages of one key at the
//! same time. [`AmqpConfig::single_active_consumer`] keeps the order instead:
//! one member of each group consumes, the others take over when it goes away;
//! a nack does not reorder (see above).

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use saga_core::transport::{Acknowledger, Capabilities, Delivery, Subscription, Transport};
use saga_core::wire::{self, headers};
use saga_core::{DeadLetter, Error, Message, MessageId, OutboxEntry, Result};
use tokio::sync::{Mutex, mpsc};

use crate::config::AmqpConfig;
use crate::error::amqp;

/// How often a waiting subscription checks that its connection is still open.
const LIVENESS_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long opening a connection and declaring a subscription's topology may
/// take. A broker that is still starting can accept the TCP connection and
/// then not answer; without a bound, a subscription reconnecting at that
/// moment would wait forever.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The header RabbitMQ's quorum queues set on a redelivered message.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// Sagas over RabbitMQ. Cheap to clone; publishes share one connection.
#[derive(Clone)]
pub struct AmqpTransport {
    inner: Arc<Inner>,
}

struct Inner {
    config: AmqpConfig,
    publisher: Mutex<Option<Publisher>>,
}

struct Publisher {
    connection: Connection,
    channel: Channel,
    declared: HashSet<String>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

async fn open(config: &AmqpConfig) -> Result<(Connection, Channel)> {
    let connection = Connection::connect(&config.url, ConnectionProperties::default())
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "RabbitMQ at {}: {e}",
                saga_core::redact::redact_url(&config.url)
            ))
        })?;
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("channel.open"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("confirm.select"))?;
    Ok((connection, channel))
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares the exchanges of `channel` and the queue that keeps its dead letters.
async fn declare_channel(amqp_channel: &Channel, config: &AmqpConfig, channel: &str) -> Result<()> {
    let exchange = config.exchange(channel);
    let dead = config.exchange(&format!("{channel}.dlq"));
    for name in [&exchange, &dead] {
        amqp_channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange(),
                FieldTable::default(),
            )
            .await
            .map_err(topology(name))?;
    }
    amqp_channel
        .queue_declare(dead.as_str().into(), durable_queue(), FieldTable::default())
        .await
        .map_err(topology(&dead))?;
    amqp_channel
        .queue_bind(
            dead.as_str().into(),
            dead.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(topology(&dead))?;
    Ok(())
}

/// A declaration the broker refused names what it was declaring.
fn topology(name: &str) -> impl FnOnce(lapin::Error) -> Error + '_ {
    move |error| {
        let retryable = crate::error::is_retryable(&error);
        Error::backend(
            format!("declaring {name:?} (does it exist with other arguments?)"),
            retryable,
            error,
        )
    }
}

fn properties(message: &Message) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in wire::to_headers(message) {
        table.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(message.id.to_string().into())
        .with_type(message.message_type.as_str().into())
        .with_content_type(message.content_type.as_str().into())
        .with_headers(table)
}

/// What a publish confirmation means for the caller.
fn confirmed(exchange: &str, confirmation: lapin::Result<Confirmation>) -> Result<()> {
    match confirmation.map_err(amqp("publisher confirm"))? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(Error::Unavailable(format!(
            "no queue is bound to exchange {exchange:?} yet (no group subscribed): not stored"
        ))),
        Confirmation::Nack(_) => Err(Error::Unavailable(format!(
            "RabbitMQ refused a message for {exchange:?} (publisher nack)"
        ))),
        Confirmation::NotRequested => Err(Error::Config(
            "publisher confirms are not on for this channel".into(),
        )),
    }
}

impl AmqpTransport {
    /// Connects to RabbitMQ.
    pub async fn connect(config: AmqpConfig) -> Result<Self> {
        let (connection, channel) = open(&config).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                publisher: Mutex::new(Some(Publisher {
                    connection,
                    channel,
                    declared: HashSet::new(),
                })),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }

    /// A channel to publish on, with the exchanges of `channels` declared;
    /// reconnects when the last connection broke.
    async fn publisher(&self, channels: &[&str]) -> Result<Channel> {
        let mut guard = self.inner.publisher.lock().await;
        if guard
            .as_ref()
            .is_some_and(|p| !p.channel.status().connected() || !p.connection.status().connected())
        {
            *guard = None;
        }
        if guard.is_none() {
            let (connection, channel) =
                tokio::time::timeout(OPEN_TIMEOUT, open(&self.inner.config))
                    .await
                    .map_err(|_| {
                        Error::Unavailable(format!(
                            "RabbitMQ did not open a connection within {OPEN_TIMEOUT:?}"
                        ))
                    })??;
            *guard = Some(Publisher {
                connection,
                channel,
                declared: HashSet::new(),
            });
        }
        let publisher = guard.as_mut().expect("connected above");
        for channel in channels {
            if !publisher.declared.contains(*channel) {
                declare_channel(&publisher.channel, &self.inner.config, channel).await?;
                publisher.declared.insert((*channel).to_owned());
            }
        }
        Ok(publisher.channel.clone())
    }

    /// Takes messages from the dead-letter queue of `channel`, unacknowledged,
    /// until `pick` returns true for one or the queue is empty. Returns the
    /// connection and the channel that hold them (closing the connection
    /// puts them back; dropping the channel would close it before the
    /// picked one is acknowledged) and the picked message with its
    /// acknowledger.
    async fn read_dead_letters(
        &self,
        channel: &str,
        mut pick: impl FnMut(DeadLetter) -> bool + Send,
    ) -> Result<(Connection, Channel, Option<(DeadLetter, lapin::Acker)>)> {
        let config = &self.inner.config;
        let (connection, amqp_channel) = tokio::time::timeout(OPEN_TIMEOUT, open(config))
            .await
            .map_err(|_| {
            Error::Unavailable(format!(
                "RabbitMQ did not open a connection within {OPEN_TIMEOUT:?}"
            ))
        })??;
        declare_channel(&amqp_channel, config, channel).await?;
        let queue = config.exchange(&format!("{channel}.dlq"));
        loop {
            let Some(got) = amqp_channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(amqp("basic.get"))?
            else {
                break;
            };
            let delivery = got.delivery;
            match decode(&delivery.properties, delivery.data) {
                Ok(message) => {
                    let letter = DeadLetter::from_dead_message(message);
                    if pick(letter.clone()) {
                        return Ok((connection, amqp_channel, Some((letter, delivery.acker))));
                    }
                }
                Err(error) => {
                    tracing::debug!(%queue, %error, "dead letter is not a message; not listed");
                }
            }
        }
        Ok((connection, amqp_channel, None))
    }

    /// Deletes the queues and exchanges of `channels` on a channel of its
    /// own (an error closes an AMQP channel), and forgets having declared them.
    async fn delete(&self, channels: &[String], groups: &[String]) -> Result<()> {
        let mut guard = self.inner.publisher.lock().await;
        if let Some(publisher) = guard.as_mut() {
            for channel in channels {
                publisher.declared.remove(channel);
            }
        }
        drop(guard);
        let config = &self.inner.config;
        let (connection, mut amqp_channel) = open(config).await?;
        let mut deleted = Ok(());
        for channel in channels {
            let dead = config.exchange(&format!("{channel}.dlq"));
            let queues = groups
                .iter()
                .map(|group| config.group_queue(channel, group))
                .chain([dead.clone()]);
            let exchanges = [config.exchange(channel), dead.clone()];
            for (name, is_queue) in queues
                .map(|q| (q, true))
                .chain(exchanges.into_iter().map(|e| (e, false)))
            {
                // An error closes the AMQP channel: go on with a new one.
                if !amqp_channel.status().connected() {
                    amqp_channel = connection
                        .create_channel()
                        .await
                        .map_err(amqp("channel.open"))?;
                }
                let result = if is_queue {
                    amqp_channel
                        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await
                        .map(drop)
                        .map_err(amqp("queue.delete"))
                } else {
                    amqp_channel
                        .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                        .await
                        .map_err(amqp("exchange.delete"))
                };
                deleted = deleted.and(result.map_err(|e| {
                    Error::backend(format!("deleting {name:?}"), e.is_retryable(), e)
                }));
            }
        }
        let _ = connection.close(200, "deleted".into()).await;
        deleted
    }

    async fn send(
        amqp_channel: &Channel,
        exchange: &str,
        message: &Message,
    ) -> Result<lapin::PublisherConfirm> {
        amqp_channel
            .basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.payload,
                properties(message),
            )
            .await
            .map_err(amqp("basic.publish"))
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn publish(&self, channel: &str, message: &Message) -> Result<()> {
        let amqp_channel = self.publisher(&[channel]).await?;
        let exchange = self.inner.config.exchange(channel);
        let confirm = Self::send(&amqp_channel, &exchange, message).await?;
        confirmed(&exchange, confirm.await)
    }

    /// Sends every message, then waits for the confirms in order: one round
    /// trip for the batch, not one per message.
    async fn publish_batch(&self, entries: &[OutboxEntry]) -> Vec<Result<()>> {
        let channels: Vec<&str> = entries.iter().map(|e| e.channel.as_str()).collect();
        let amqp_channel = match self.publisher(&channels).await {
            Ok(c) => c,
            Err(error) => {
                let text = error.to_string();
                return entries
                    .iter()
                    .map(|_| Err(Error::Unavailable(text.clone())))
                    .collect();
            }
        };
        let mut pending = Vec::with_capacity(entries.len());
        for entry in entries {
            let exchange = self.inner.config.exchange(&entry.channel);
            let sent = Self::send(&amqp_channel, &exchange, &entry.message).await;
            pending.push((exchange, sent));
        }
        let mut results = Vec::with_capacity(entries.len());
        for (exchange, sent) in pending {
            results.push(match sent {
                Ok(confirm) => confirmed(&exchange, confirm.await),
                Err(error) => Err(error),
            });
        }
        results
    }

    /// The publishing connection is open, or can be opened again.
    async fn check(&self) -> Result<()> {
        self.publisher(&[]).await.map(|_| ())
    }

    async fn subscribe(&self, group: &str, channels: &[String]) -> Result<Box<dyn Subscription>> {
        if channels.is_empty() {
            return Err(Error::Config("subscribe needs at least one channel".into()));
        }
        let (hand_back, handed_back) = mpsc::unbounded_channel();
        let mut subscription = AmqpSubscription {
            config: self.inner.config.clone(),
            group: group.to_owned(),
            channels: channels.to_vec(),
            link: None,
            generation: 1,
            handed_back,
            hand_back,
        };
        subscription.link = Some(subscription.open().await?);
        Ok(Box::new(subscription))
    }

    /// Deletes each channel's exchange, the queue of each of `groups` on it,
    /// and its dead-letter exchange and queue.
    async fn delete_channels(&self, channels: &[String], groups: &[String]) -> Result<()> {
        self.delete(channels, groups).await
    }

    async fn dead_letters(&self, channel: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut letters = Vec::new();
        if limit == 0 {
            return Ok(letters);
        }
        let (connection, _channel, _) = self
            .read_dead_letters(channel, |letter| {
                letters.push(letter);
                letters.len() >= limit
            })
            .await?;
        // Closing puts back every message read, unacknowledged, in place.
        let _ = connection.close(200, "listed".into()).await;
        Ok(letters)
    }

    async fn replay_dead_letter(&self, channel: &str, id: MessageId) -> Result<bool> {
        let (connection, _channel, found) = self
            .read_dead_letters(channel, |letter| letter.message.id == id)
            .await?;
        let replayed = match found {
            None => Ok(false),
            Some((letter, acker)) => match self.publish(channel, &letter.message).await {
                Ok(()) => acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(amqp("basic.ack"))
                    .and_then(|acked| {
                        if acked {
                            Ok(true)
                        } else {
                            Err(Error::Unavailable(format!(
                                "the dead letter {id} was replayed, but its channel closed before it could be removed: it is still listed"
                            )))
                        }
                    }),
                Err(error) => Err(error),
            },
        };
        let _ = connection.close(200, "replayed".into()).await;
        replayed
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_per_key: self.inner.config.single_active_consumer,
            replays_history: false,
            redelivers_unacked: true,
        }
    }
}

type Incoming = (usize, lapin::Result<AmqpDelivery>);

struct AmqpSubscription {
    config: AmqpConfig,
    group: String,
    channels: Vec<String>,
    link: Option<Link>,
    /// Counts the links opened: a delivery handed back belongs to one.
    generation: u64,
    /// Nacked deliveries, handed back to be delivered again first.
    handed_back: mpsc::UnboundedReceiver<Returned>,
    hand_back: mpsc::UnboundedSender<Returned>,
}

/// A nacked delivery on its way back to its subscription, which delivers it
/// again before anything the broker sent after it: a requeue would put it
/// behind the messages already prefetched, and a key's next message would
/// overtake it. The broker still holds it unacknowledged, so if the member
/// goes away the broker delivers it elsewhere.
struct Returned {
    generation: u64,
    index: usize,
    payload: Payload,
}

/// Where a delivery goes back on nack.
struct Returner {
    sender: mpsc::UnboundedSender<Returned>,
    generation: u64,
    index: usize,
}

/// One connection consuming every queue of a subscription.
struct Link {
    /// Taken when the link is dropped, to close it.
    connection: Option<Connection>,
    channel: Channel,
    incoming: mpsc::Receiver<Incoming>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

impl Link {
    fn is_open(&self) -> bool {
        self.channel.status().connected()
            && self
                .connection
                .as_ref()
                .is_some_and(|c| c.status().connected())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for forwarder in &self.forwarders {
            forwarder.abort();
        }
        // Closing the connection hands what it held back to the queues.
        if let Some(connection) = self.connection.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = connection.close(200, "subscription dropped".into()).await;
            });
        }
    }
}

impl AmqpSubscription {
    fn queue_arguments(&self, channel: &str) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(i32::try_from(self.config.max_deliveries).unwrap_or(i32::MAX)),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.config.exchange(&format!("{channel}.dlq")).into()),
        );
        if self.config.single_active_consumer {
            arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        arguments
    }

    async fn open(&self) -> Result<Link> {
        let (connection, channel) = open(&self.config).await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp("basic.qos"))?;
        let (sender, incoming) = mpsc::channel(usize::from(self.config.prefetch).max(1));
        let mut forwarders = Vec::new();
        let tag = format!("member-{}", uuid::Uuid::now_v7().simple());
        for (index, name) in self.channels.iter().enumerate() {
            declare_channel(&channel, &self.config, name).await?;
            let queue = self.config.group_queue(name, &self.group);
            channel
                .queue_declare(
                    queue.as_str().into(),
                    durable_queue(),
                    self.queue_arguments(name),
                )
                .await
                .map_err(topology(&queue))?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    self.config.exchange(name).into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(topology(&queue))?;
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    format!("{tag}-{index}").into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp("basic.consume"))?;
            let sender = sender.clone();
            forwarders.push(tokio::spawn(async move {
                while let Some(item) = consumer.next().await {
                    let failed = item.is_err();
                    if sender.send((index, item)).await.is_err() || failed {
                        return;
                    }
                }
            }));
        }
        Ok(Link {
            connection: Some(connection),
            channel,
            incoming,
            forwarders,
        })
    }

    /// A delivery handed back by a nack, as its next attempt.
    fn again(&self, returned: Returned) -> Result<Delivery> {
        let Returned {
            index, mut payload, ..
        } = returned;
        payload.settle.attempt = payload.settle.attempt.saturating_add(1);
        let message = decode(&payload.settle.properties, payload.data.clone())?;
        Ok(Delivery::new(
            self.channels[index].clone(),
            message,
            payload.settle.attempt,
            Box::new(payload),
        ))
    }

    /// Turns a broker delivery into ours, or dead-letters what is not a message.
    async fn accept(&self, index: usize, delivery: AmqpDelivery) -> Result<Option<Delivery>> {
        let link = self.link.as_ref().expect("called with a link");
        let channel = &self.channels[index];
        let attempt = delivery_count(&delivery.properties).saturating_add(1);
        let settle = Box::new(Settle {
            channel: link.channel.clone(),
            dead_exchange: self.config.exchange(&format!("{channel}.dlq")),
            source: channel.clone(),
            properties: delivery.properties.clone(),
            attempt,
            max_deliveries: self.config.max_deliveries,
            acker: Some(delivery.acker),
        });
        let message = match decode(&delivery.properties, delivery.data.clone()) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%channel, %error, "undecodable message dead-lettered");
                settle
                    .dead_letter_raw(&delivery.data, &error.to_string())
                    .await?;
                return Ok(None);
            }
        };
        if attempt > self.config.max_deliveries {
            let error = format!(
                "delivered {attempt} times without an acknowledgement (limit {})",
                self.config.max_deliveries
            );
            settle.dead_letter_raw(&delivery.data, &error).await?;
            return Ok(None);
        }
        Ok(Some(Delivery::new(
            channel.clone(),
            message,
            attempt,
            Box::new(Payload {
                settle,
                data: delivery.data,
                returner: Some(Returner {
                    sender: self.hand_back.clone(),
                    generation: self.generation,
                    index,
                }),
            }),
        )))
    }
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        // What a nack handed back comes first, if its link still stands (the
        // broker redelivers what an earlier link held).
        while let Ok(returned) = self.handed_back.try_recv() {
            if returned.generation == self.generation && self.link.is_some() {
                return self.again(returned);
            }
        }
        loop {
            if self.link.is_none() {
                let opened = tokio::time::timeout(OPEN_TIMEOUT, self.open())
                    .await
                    .map_err(|_| {
                        Error::Unavailable(format!(
                            "RabbitMQ did not complete a subscription within {OPEN_TIMEOUT:?}"
                        ))
                    })?;
                self.link = Some(opened?);
                self.generation += 1;
            }
            let link = self.link.as_mut().expect("opened above");
            let received = tokio::select! {
                received = link.incoming.recv() => received,
                // lapin does not always end the consumer stream when the
                // broker closes the connection: look at the link itself.
                () = tokio::time::sleep(LIVENESS_CHECK) => {
                    if link.is_open() {
                        continue;
                    }
                    self.link = None;
                    return Err(Error::Unavailable("the AMQP connection closed".into()));
                }
            };
            match received {
                Some((index, Ok(delivery))) => {
                    if let Some(delivery) = self.accept(index, delivery).await? {
                        return Ok(delivery);
                    }
                }
                Some((_, Err(error))) => {
                    self.link = None;
                    return Err(amqp("consuming")(error));
                }
                None => {
                    self.link = None;
                    return Err(Error::Unavailable("the AMQP consumer stopped".into()));
                }
            }
        }
    }
}

fn delivery_count(properties: &BasicProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(DELIVERY_COUNT).cloned());
    match value {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(n).unwrap_or(u32::MAX),
        Some(AMQPValue::LongInt(n)) => u32::try_from(n).unwrap_or(u32::MAX),
        Some(AMQPValue::LongUInt(n)) => n,
        Some(AMQPValue::ShortInt(n)) => u32::try_from(n).unwrap_or(0),
        _ => 0,
    }
}

/// The message in a delivery: string headers plus the body.
fn decode(properties: &BasicProperties, data: Vec<u8>) -> Result<Message> {
    let mut fields = Vec::new();
    if let Some(table) = properties.headers() {
        for (name, value) in table {
            let name = name.as_str();
            if name.starts_with("x-") {
                continue;
            }
            let text = match value {
                AMQPValue::LongString(text) => String::from_utf8(text.as_bytes().to_vec())
                    .map_err(|_| {
                        Error::InvalidMessage(format!("header `{name}` is not UTF-8 text"))
                    })?,
                AMQPValue::ShortString(text) => text.as_str().to_owned(),
                other => {
                    return Err(Error::InvalidMessage(format!(
                        "header `{name}` is not a string: {other:?}"
                    )));
                }
            };
            fields.push((name.to_owned(), text));
        }
    }
    wire::from_headers(fields, data)
}

/// Settles one delivery on the channel it came from.
struct Settle {
    channel: Channel,
    dead_exchange: String,
    source: String,
    properties: BasicProperties,
    attempt: u32,
    max_deliveries: u32,
    /// `None` once settled.
    acker: Option<lapin::Acker>,
}

impl Drop for Settle {
    /// A delivery dropped unsettled goes back to the queue, as if its
    /// consumer had died.
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            });
        }
    }
}

impl Settle {
    fn acker(&mut self) -> lapin::Acker {
        self.acker.take().expect("a delivery is settled once")
    }

    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.acker()
            .ack(BasicAckOptions::default())
            .await
            .map_err(amqp("basic.ack"))?;
        Ok(())
    }

    /// Publishes the message as it came, with the error, to the dead-letter
    /// exchange, waits for the confirm, then acks the original.
    async fn dead_letter_raw(self: Box<Self>, data: &[u8], error: &str) -> Result<()> {
        let mut table = self.properties.headers().clone().unwrap_or_default();
        table.insert(
            headers::DEAD_LETTER_ERROR.into(),
            AMQPValue::LongString(error.into()),
        );
        table.insert(
            headers::DEAD_LETTER_CHANNEL.into(),
            AMQPValue::LongString(self.source.as_str().into()),
        );
        let confirm = self
            .channel
            .basic_publish(
                self.dead_exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                data,
                self.properties.clone().with_headers(table),
            )
            .await
            .map_err(amqp("basic.publish (dead letter)"))?;
        confirmed(&self.dead_exchange, confirm.await)?;
        self.ack().await
    }
}

/// A delivery's settlement, with the body kept for a dead letter.
struct Payload {
    settle: Box<Settle>,
    data: Vec<u8>,
    /// Where a nack hands it back; `None` requeues it at the broker.
    returner: Option<Returner>,
}

/// How long settling a delivery may take. lapin can leave an ack pending
/// forever when the connection drops under it (a broker restart): a
/// consumer awaiting it would never ask for its next delivery, and its
/// subscription would never see the connection was gone.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `settling`, bounded by [`SETTLE_TIMEOUT`]: a settlement that does not
/// complete is retryable, and the broker redelivers the message.
async fn bounded(what: &str, settling: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(SETTLE_TIMEOUT, settling)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Unavailable(format!(
                "{what} did not complete within {SETTLE_TIMEOUT:?}; the broker will deliver the message again"
            )))
        })
}

#[async_trait]
impl Acknowledger for Payload {
    async fn ack(self: Box<Self>) -> Result<()> {
        bounded("basic.ack", self.settle.ack()).await
    }

    async fn nack(mut self: Box<Self>, error: &str) -> Result<()> {
        if self.settle.attempt >= self.settle.max_deliveries {
            return self.dead_letter(error).await;
        }
        if let Some(returner) = &self.returner {
            let (sender, generation, index) =
                (returner.sender.clone(), returner.generation, returner.index);
            let returned = Returned {
                generation,
                index,
                payload: *self,
            };
            return match sender.send(returned) {
                Ok(()) => Ok(()),
                // The subscription is gone: the broker takes it back.
                Err(mpsc::error::SendError(returned)) => {
                    let mut payload = returned.payload;
                    payload.returner = None;
                    Box::new(payload).nack(error).await
                }
            };
        }
        let mut settle = self.settle;
        let acker = settle.acker();
        bounded("basic.nack", async move {
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
                .map(drop)
                .map_err(amqp("basic.nack"))
        })
        .await
    }

    async fn dead_letter(self: Box<Self>, error: &str) -> Result<()> {
        let Self { settle, data, .. } = *self;
        bounded("dead-lettering", settle.dead_letter_raw(&data, error)).await
    }
}
