//! The message envelope every transport carries.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::clock;
use crate::error::{Error, Result};
use crate::ids::{MessageId, SagaId};

/// The content type of payloads built by [`Message::json`].
pub const JSON: &str = "application/json";

/// W3C trace context (`traceparent` and optional `tracestate`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TraceContext {
    /// The `traceparent` value, e.g. `00-<trace id>-<span id>-01`.
    pub traceparent: String,
    /// The optional vendor-specific `tracestate` value.
    pub tracestate: Option<String>,
}

/// One message: its metadata and its payload bytes.
///
/// Every field maps to a plain string header (see [`crate::wire`]), so a
/// consumer written in another language can read it with a standard client.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// Unique id (UUIDv7). Consumers deduplicate by it.
    pub id: MessageId,
    /// What the message is, e.g. `stock.reserve`.
    pub message_type: String,
    /// Who produced it, e.g. `order-service`.
    pub source: String,
    /// When it was produced.
    pub time: DateTime<Utc>,
    /// Messages with the same key are delivered in the order they were written.
    pub ordering_key: Option<String>,
    /// Ties together every message of one business transaction.
    pub correlation_id: Option<String>,
    /// The id of the message that caused this one.
    pub causation_id: Option<MessageId>,
    /// The saga this message belongs to.
    pub saga_id: Option<SagaId>,
    /// Where a reply to this message goes.
    pub reply_to: Option<String>,
    /// W3C trace context.
    pub trace: Option<TraceContext>,
    /// The payload's media type; [`JSON`] for payloads built by [`Message::json`].
    pub content_type: String,
    /// Free headers. Names that collide with the reserved ones in
    /// [`crate::wire`] are overridden by the envelope's own fields on the wire.
    pub headers: BTreeMap<String, String>,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

impl Message {
    /// A message of `message_type` with raw payload bytes (`application/octet-stream`).
    pub fn new(message_type: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            id: MessageId::new(),
            message_type: message_type.into(),
            source: String::new(),
            time: clock::now(),
            ordering_key: None,
            correlation_id: None,
            causation_id: None,
            saga_id: None,
            reply_to: None,
            trace: None,
            content_type: "application/octet-stream".to_owned(),
            headers: BTreeMap::new(),
            payload: payload.into(),
        }
    }

    /// A message whose payload is `value` serialized as JSON.
    pub fn json<T: Serialize + ?Sized>(message_type: impl Into<String>, value: &T) -> Result<Self> {
        let mut message = Self::new(message_type, serde_json::to_vec(value)?);
        JSON.clone_into(&mut message.content_type);
        Ok(message)
    }

    /// Deserializes the payload as JSON.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error::InvalidMessage(format!(
                "payload of message {} ({}) is not the expected JSON: {e}",
                self.id, self.message_type
            ))
        })
    }

    /// Sets the source.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Sets the ordering key.
    #[must_use]
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    #[must_use]
    pub fn with_causation_id(mut self, id: MessageId) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Sets the saga id.
    #[must_use]
    pub fn with_saga_id(mut self, id: SagaId) -> Self {
        self.saga_id = Some(id);
        self
    }

    /// Sets the reply channel.
    #[must_use]
    pub fn with_reply_to(mut self, channel: impl Into<String>) -> Self {
        self.reply_to = Some(channel.into());
        self
    }

    /// Sets the trace context.
    #[must_use]
    pub fn with_trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Adds a free header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// A free header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// A message caused by this one: same correlation id, saga id and trace
    /// context, causation id set to this message's id.
    #[must_use]
    pub fn follow_up(&self, mut next: Message) -> Message {
        next.causation_id = Some(self.id);
        next.correlation_id = self
            .correlation_id
            .clone()
            .or_else(|| Some(self.id.to_string()));
        next.saga_id = next.saga_id.or(self.saga_id);
        next.trace = next.trace.or_else(|| self.trace.clone());
        next
    }
}

/// A message together with the channel it goes to: one outbox row.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutboxEntry {
    /// Destination channel (topic, exchange, stream).
    pub channel: String,
    /// The message.
    pub message: Message,
}

impl OutboxEntry {
    /// A message bound for `channel`.
    pub fn new(channel: impl Into<String>, message: Message) -> Self {
        Self {
            channel: channel.into(),
            message,
        }
    }
}
