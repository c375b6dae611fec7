//! Replies to saga commands: how a participant writes them and the
//! orchestrator reads them.

use serde::Serialize;

use crate::error::{Error, Result, StepError};
use crate::message::{Message, OutboxEntry};
use crate::wire::headers;

/// What a command handler answers on success.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// The reply's message type.
    pub message_type: String,
    /// Its content type.
    pub content_type: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Reply {
    /// A reply of `message_type` with no payload.
    pub fn empty(message_type: impl Into<String>) -> Self {
        Self {
            message_type: message_type.into(),
            content_type: crate::message::JSON.to_owned(),
            payload: b"null".to_vec(),
        }
    }

    /// A reply whose payload is `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(
        message_type: impl Into<String>,
        value: &T,
    ) -> Result<Self, StepError> {
        Ok(Self {
            message_type: message_type.into(),
            content_type: crate::message::JSON.to_owned(),
            payload: serde_json::to_vec(value).map_err(|e| StepError::from(Error::from(e)))?,
        })
    }
}

/// The reply to `command` saying it succeeded, bound for the command's reply channel.
pub(crate) fn success(command: &Message, source: &str, reply: Reply) -> Option<OutboxEntry> {
    let mut message = Message::new(reply.message_type, reply.payload);
    message.content_type = reply.content_type;
    let message = copy_saga_headers(command, message).with_header(headers::SAGA_OUTCOME, "success");
    bound_for_reply_channel(command, source, message)
}

/// The reply to `command` saying it failed.
pub(crate) fn failure(command: &Message, source: &str, error: &StepError) -> Option<OutboxEntry> {
    let message = Message::new(format!("{}.failed", command.message_type), Vec::new());
    let message = copy_saga_headers(command, message)
        .with_header(headers::SAGA_OUTCOME, "failure")
        .with_header(headers::SAGA_ERROR, error.message.clone())
        .with_header(headers::SAGA_RETRYABLE, error.retryable.to_string());
    bound_for_reply_channel(command, source, message)
}

/// A stored reply re-addressed to a later command of the same step (a retry
/// whose earlier attempt was applied): new id, caused by the new command.
pub(crate) fn readdress(stored: &OutboxEntry, command: &Message) -> OutboxEntry {
    let mut message = stored.message.clone();
    message.id = crate::MessageId::new();
    message.causation_id = Some(command.id);
    message.time = crate::clock::now();
    let message = copy_saga_headers(command, message);
    OutboxEntry::new(
        command
            .reply_to
            .clone()
            .unwrap_or_else(|| stored.channel.clone()),
        message,
    )
}

/// Reads a reply's outcome: `Ok(Ok(()))` success, `Ok(Err(e))` failure.
pub(crate) fn outcome(reply: &Message) -> Result<Result<(), StepError>> {
    match reply.header(headers::SAGA_OUTCOME) {
        Some("success") => Ok(Ok(())),
        Some("failure") => Ok(Err(StepError {
            retryable: reply.header(headers::SAGA_RETRYABLE) == Some("true"),
            message: reply
                .header(headers::SAGA_ERROR)
                .unwrap_or("the participant gave no reason")
                .to_owned(),
        })),
        other => Err(Error::InvalidMessage(format!(
            "reply {} ({}) has no valid `{}` header (found {other:?})",
            reply.id,
            reply.message_type,
            headers::SAGA_OUTCOME
        ))),
    }
}

fn copy_saga_headers(command: &Message, mut message: Message) -> Message {
    for name in [
        headers::SAGA_STEP,
        headers::SAGA_PHASE,
        headers::SAGA_ATTEMPT,
    ] {
        if let Some(value) = command.header(name) {
            message.headers.insert(name.to_owned(), value.to_owned());
        }
    }
    message
}

fn bound_for_reply_channel(
    command: &Message,
    source: &str,
    message: Message,
) -> Option<OutboxEntry> {
    let channel = command.reply_to.clone()?;
    let mut message = command.follow_up(message).with_source(source);
    message.ordering_key.clone_from(&command.ordering_key);
    Some(OutboxEntry::new(channel, message))
}
