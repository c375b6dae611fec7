//! Choreography: services react to each other's events, with no coordinator.
//!
//! An [`EventConsumer`] handles each event in one transaction of its store:
//! inbox record, the handler's business writes, the events it emits (through
//! the outbox) and a line in the saga log under the event's correlation id.
//! [`emit`] starts a flow from a service's own transaction. The log of a
//! correlation id ([`crate::store::SagaStore::log`]) shows the flow step by
//! step, as the history of an orchestrated saga does.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::error::{Error, Result, StepError};
use crate::message::{Message, OutboxEntry};
use crate::retry::RetryPolicy;
use crate::saga::{LogStatus, SagaLogEntry};
use crate::store::{Inbox, Store, open_inbox};
use crate::transport::Transport;
use crate::worker::{self, Worker};
use chrono::{DateTime, Utc};

/// What an event handler sees: its transaction, and where to put the events it emits.
pub struct EventContext<'a, Tx> {
    /// The consumer's transaction.
    pub tx: &'a mut Tx,
    event: &'a Message,
    source: &'a str,
    emitted: Vec<OutboxEntry>,
}

impl<Tx> EventContext<'_, Tx> {
    /// Emits `message` to `channel` when the transaction commits; it inherits
    /// the handled event's correlation id, saga id and ordering key, and is caused by it.
    pub fn emit(&mut self, channel: impl Into<String>, message: Message) {
        let mut message = self.event.follow_up(message);
        if message.source.is_empty() {
            self.source.clone_into(&mut message.source);
        }
        if message.ordering_key.is_none() {
            message.ordering_key.clone_from(&self.event.ordering_key);
        }
        self.emitted.push(OutboxEntry::new(channel, message));
    }

    /// Emits an event whose payload is `payload` as JSON.
    pub fn emit_json<T: Serialize + ?Sized>(
        &mut self,
        channel: impl Into<String>,
        event_type: impl Into<String>,
        payload: &T,
    ) -> Result<(), StepError> {
        let message = Message::json(event_type, payload).map_err(StepError::from)?;
        self.emit(channel, message);
        Ok(())
    }
}

/// Handles one type of event: the trait choreography services implement.
#[async_trait]
pub trait EventHandler<Tx: Send + 'static>: Send + Sync + 'static {
    /// Applies the event through `ctx.tx` and emits what follows. A retryable
    /// error redelivers the event later; a permanent one dead-letters it and
    /// logs the failure under its correlation id.
    async fn handle(
        &self,
        ctx: &mut EventContext<'_, Tx>,
        event: &Message,
    ) -> Result<(), StepError>;
}

/// Writes the first event of a choreographed flow in the caller's transaction
/// and logs it as emitted by `source`.
pub async fn emit<S: Store>(
    store: &S,
    tx: &mut S::Tx,
    source: &str,
    channel: &str,
    event: Message,
) -> Result<()> {
    let mut event = event;
    if event.source.is_empty() {
        source.clone_into(&mut event.source);
    }
    let correlation_id = event
        .correlation_id
        .get_or_insert_with(|| event.id.to_string())
        .clone();
    let entry = SagaLogEntry {
        correlation_id,
        consumer: source.to_owned(),
        message_id: event.id,
        message_type: event.message_type.clone(),
        status: LogStatus::Emitted,
        emitted: Vec::new(),
        error: None,
        at: store.now().await,
    };
    store
        .enqueue(tx, &[OutboxEntry::new(channel, event)])
        .await?;
    store.append_log(tx, &entry).await
}

/// A choreography service: a consumer group on one or more event channels.
pub struct EventConsumer<S: Store> {
    inner: Arc<Inner<S>>,
}

impl<S: Store> Clone for EventConsumer<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: Store> fmt::Debug for EventConsumer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventConsumer")
            .field("name", &self.inner.name)
            .field("channels", &self.inner.channels)
            .field("events", &self.inner.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct Inner<S: Store> {
    name: String,
    channels: Vec<String>,
    store: S,
    transport: Arc<dyn Transport>,
    handlers: HashMap<String, Arc<dyn EventHandler<S::Tx>>>,
    retry: RetryPolicy,
}

impl<S: Store + Clone> Clone for Inner<S> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            channels: self.channels.clone(),
            store: self.store.clone(),
            transport: Arc::clone(&self.transport),
            handlers: self.handlers.clone(),
            retry: self.retry.clone(),
        }
    }
}

impl<S: Store + Clone> EventConsumer<S> {
    /// A consumer named `name` (consumer group, inbox name, log author) on `channels`.
    pub fn new(
        name: impl Into<String>,
        channels: impl IntoIterator<Item = impl Into<String>>,
        store: S,
        transport: Arc<dyn Transport>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                channels: channels.into_iter().map(Into::into).collect(),
                store,
                transport,
                handlers: HashMap::new(),
                retry: RetryPolicy::forever(),
            }),
        }
    }

    /// Registers the handler of `event_type`; events of other types are
    /// acknowledged and skipped. Register every handler before
    /// [`spawn`](Self::spawn): a clone made earlier, or a running worker,
    /// keeps the handlers it had.
    #[must_use]
    pub fn on(mut self, event_type: impl Into<String>, handler: impl EventHandler<S::Tx>) -> Self {
        Arc::make_mut(&mut self.inner)
            .handlers
            .insert(event_type.into(), Arc::new(handler));
        self
    }

    /// How an event whose handling failed retryably (the store or the
    /// broker unreachable, a conflict) is tried again. The member keeps the
    /// delivery and calls the handler again after the policy's backoff, so
    /// later messages of its key never overtake it; once the policy's
    /// attempts are used up, the message is dead-lettered with the last
    /// error. The default, [`RetryPolicy::forever`] (100 ms doubling up to
    /// 30 s), never dead-letters what an outage caused: a failure that never
    /// passes shows as a warning per attempt and holds the member.
    #[must_use]
    pub fn handling_retry(mut self, policy: RetryPolicy) -> Self {
        Arc::make_mut(&mut self.inner).retry = policy;
        self
    }

    /// Consumes events in the background.
    pub async fn spawn(&self) -> Result<Worker> {
        let this = self.clone();
        let inner = &self.inner;
        let (worker, _) = worker::spawn_consumer(
            &*inner.transport,
            &inner.name,
            &inner.channels,
            inner.retry.clone(),
            move |event| {
                let this = this.clone();
                async move { this.handle(&event).await }
            },
        )
        .await?;
        Ok(worker)
    }

    /// Handles one event (what the background consumer does for each).
    pub async fn handle(&self, event: &Message) -> Result<()> {
        let inner = &self.inner;
        let Some(handler) = inner.handlers.get(&event.message_type).cloned() else {
            tracing::debug!(event = %event.id, r#type = %event.message_type, "no handler; skipping");
            return Ok(());
        };
        let now = inner.store.now().await;
        let Inbox::Fresh(mut tx) = open_inbox(&inner.store, &inner.name, event.id).await? else {
            return Ok(());
        };
        let mut ctx = EventContext {
            tx: &mut tx,
            event,
            source: &inner.name,
            emitted: Vec::new(),
        };
        let outcome = handler.handle(&mut ctx, event).await;
        let emitted = std::mem::take(&mut ctx.emitted);
        match outcome {
            Ok(()) => {
                inner.store.enqueue(&mut tx, &emitted).await?;
                let entry = self.log_entry(event, LogStatus::Handled, &emitted, None, now);
                inner.store.append_log(&mut tx, &entry).await?;
                inner.store.commit(tx).await
            }
            Err(error) if error.retryable => Err(Error::Unavailable(format!(
                "handler of `{}` in `{}` failed: {}",
                event.message_type, inner.name, error.message
            ))),
            Err(error) => {
                // The failure is logged, but the event is not recorded as
                // processed: replayed from the dead-letter channel, it runs
                // the handler again.
                drop(tx);
                let mut tx = inner.store.begin().await?;
                let entry = self.log_entry(
                    event,
                    LogStatus::Failed,
                    &[],
                    Some(error.message.clone()),
                    now,
                );
                inner.store.append_log(&mut tx, &entry).await?;
                inner.store.commit(tx).await?;
                // The transport moves the event to its dead-letter channel.
                Err(Error::InvalidMessage(format!(
                    "`{}` rejected event {} ({}): {}",
                    inner.name, event.id, event.message_type, error.message
                )))
            }
        }
    }

    fn log_entry(
        &self,
        event: &Message,
        status: LogStatus,
        emitted: &[OutboxEntry],
        error: Option<String>,
        at: DateTime<Utc>,
    ) -> SagaLogEntry {
        SagaLogEntry {
            correlation_id: event
                .correlation_id
                .clone()
                .unwrap_or_else(|| event.id.to_string()),
            consumer: self.inner.name.clone(),
            message_id: event.id,
            message_type: event.message_type.clone(),
            status,
            emitted: emitted
                .iter()
                .map(|e| e.message.message_type.clone())
                .collect(),
            error,
            at,
        }
    }
}
