//! The envelope on the wire: plain string headers plus payload bytes.
//!
//! Follows the CloudEvents 1.0 binary content mode as its Kafka binding
//! writes it (`ce_` prefix), used unchanged on every transport, so a standard
//! client in any language can read our messages:
//!
//! | header | envelope field | notes |
//! |---|---|---|
//! | `ce_specversion` | | always `1.0` |
//! | `ce_id` | [`Message::id`] | UUID text |
//! | `ce_type` | [`Message::message_type`] | |
//! | `ce_source` | [`Message::source`] | `/` when empty (CloudEvents requires one) |
//! | `ce_time` | [`Message::time`] | RFC 3339, microseconds, `Z` |
//! | `content-type` | [`Message::content_type`] | |
//! | `ce_partitionkey` | [`Message::ordering_key`] | CloudEvents partitioning extension |
//! | `ce_correlationid` | [`Message::correlation_id`] | |
//! | `ce_causationid` | [`Message::causation_id`] | UUID text |
//! | `ce_sagaid` | [`Message::saga_id`] | UUID text |
//! | `ce_replyto` | [`Message::reply_to`] | channel name |
//! | `ce_traceparent`, `ce_tracestate` | [`Message::trace`] | CloudEvents distributed tracing extension |
//! | anything else | [`Message::headers`] | free headers, as they are |
//!
//! The saga engine adds free headers of its own, named in [`headers`].
//!
//! Where the transports put it:
//!
//! | transport | headers | payload | ordering key |
//! |---|---|---|---|
//! | Kafka (`saga-kafka`) | record headers | record value | record key |
//! | RabbitMQ (`saga-amqp`) | AMQP headers (also `message_id`, `type`, `content_type` properties) | body | header only |
//! | Redis Streams (`saga-redis`) | one entry field per header | field `data` | field only |

use chrono::{DateTime, SecondsFormat, Utc};

use crate::error::{Error, Result};
use crate::message::{Message, TraceContext};

/// Header names the engine itself writes as free headers.
pub mod headers {
    /// Index of the saga step a command belongs to.
    pub const SAGA_STEP: &str = "saga_step";
    /// `forward` or `compensation`.
    pub const SAGA_PHASE: &str = "saga_phase";
    /// Attempt number of the step that sent a command (1-based).
    pub const SAGA_ATTEMPT: &str = "saga_attempt";
    /// On a reply: `success` or `failure`.
    pub const SAGA_OUTCOME: &str = "saga_outcome";
    /// On a failure reply: the error text.
    pub const SAGA_ERROR: &str = "saga_error";
    /// On a failure reply: `true` when retrying the step can help.
    pub const SAGA_RETRYABLE: &str = "saga_retryable";
    /// On a dead letter: why it was dead-lettered.
    pub const DEAD_LETTER_ERROR: &str = "dead_letter_error";
    /// On a dead letter: the channel it was taken from.
    pub const DEAD_LETTER_CHANNEL: &str = "dead_letter_channel";
}

const SPECVERSION: &str = "ce_specversion";
const ID: &str = "ce_id";
const TYPE: &str = "ce_type";
const SOURCE: &str = "ce_source";
const TIME: &str = "ce_time";
const CONTENT_TYPE: &str = "content-type";
const PARTITION_KEY: &str = "ce_partitionkey";
const CORRELATION_ID: &str = "ce_correlationid";
const CAUSATION_ID: &str = "ce_causationid";
const SAGA_ID: &str = "ce_sagaid";
const REPLY_TO: &str = "ce_replyto";
const TRACEPARENT: &str = "ce_traceparent";
const TRACESTATE: &str = "ce_tracestate";

/// Header names this mapping reserves for envelope fields.
pub const RESERVED: [&str; 13] = [
    SPECVERSION,
    ID,
    TYPE,
    SOURCE,
    TIME,
    CONTENT_TYPE,
    PARTITION_KEY,
    CORRELATION_ID,
    CAUSATION_ID,
    SAGA_ID,
    REPLY_TO,
    TRACEPARENT,
    TRACESTATE,
];

/// The message's metadata as plain string headers (payload not included).
pub fn to_headers(message: &Message) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = message
        .headers
        .iter()
        .filter(|(name, _)| !RESERVED.contains(&name.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut put = |name: &str, value: String| out.push((name.to_owned(), value));
    put(SPECVERSION, "1.0".to_owned());
    put(ID, message.id.to_string());
    put(TYPE, message.message_type.clone());
    put(
        SOURCE,
        if message.source.is_empty() {
            "/".to_owned()
        } else {
            message.source.clone()
        },
    );
    put(
        TIME,
        message.time.to_rfc3339_opts(SecondsFormat::Micros, true),
    );
    put(CONTENT_TYPE, message.content_type.clone());
    if let Some(key) = &message.ordering_key {
        put(PARTITION_KEY, key.clone());
    }
    if let Some(id) = &message.correlation_id {
        put(CORRELATION_ID, id.clone());
    }
    if let Some(id) = message.causation_id {
        put(CAUSATION_ID, id.to_string());
    }
    if let Some(id) = message.saga_id {
        put(SAGA_ID, id.to_string());
    }
    if let Some(channel) = &message.reply_to {
        put(REPLY_TO, channel.clone());
    }
    if let Some(trace) = &message.trace {
        put(TRACEPARENT, trace.traceparent.clone());
        if let Some(state) = &trace.tracestate {
            put(TRACESTATE, state.clone());
        }
    }
    out
}

/// Rebuilds a message from headers and payload, as read from the wire.
///
/// Fails with [`Error::InvalidMessage`] naming the header at fault when a
/// required header is missing or a value does not parse. Header names are
/// matched without regard to case (some brokers change it).
pub fn from_headers<I, K, V>(headers: I, payload: Vec<u8>) -> Result<Message>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: Into<String>,
{
    let mut fields: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    for (name, value) in headers {
        let name = name.as_ref();
        let known = RESERVED.iter().find(|r| r.eq_ignore_ascii_case(name));
        fields.insert(
            known.map_or_else(|| name.to_owned(), |r| (*r).to_owned()),
            value.into(),
        );
    }
    let mut take = |name: &str| fields.remove(name);
    let required = |value: Option<String>, name: &str| {
        value.ok_or_else(|| Error::InvalidMessage(format!("header `{name}` is missing")))
    };
    let parse_id = |value: String, name: &str| {
        value.parse().map_err(|e| {
            Error::InvalidMessage(format!("header `{name}` is not a UUID ({value:?}): {e}"))
        })
    };

    if let Some(version) = take(SPECVERSION)
        && version != "1.0"
    {
        return Err(Error::InvalidMessage(format!(
            "header `{SPECVERSION}` is {version:?}; only 1.0 is understood"
        )));
    }
    let id = parse_id(required(take(ID), ID)?, ID)?;
    let message_type = required(take(TYPE), TYPE)?;
    if message_type.is_empty() {
        return Err(Error::InvalidMessage(format!("header `{TYPE}` is empty")));
    }
    let source = take(SOURCE).filter(|s| s != "/").unwrap_or_default();
    let time_text = required(take(TIME), TIME)?;
    let time = DateTime::parse_from_rfc3339(&time_text)
        .map_err(|e| {
            Error::InvalidMessage(format!(
                "header `{TIME}` is not RFC 3339 ({time_text:?}): {e}"
            ))
        })?
        .with_timezone(&Utc);
    let content_type = take(CONTENT_TYPE).unwrap_or_else(|| "application/octet-stream".into());
    let ordering_key = take(PARTITION_KEY);
    let correlation_id = take(CORRELATION_ID);
    let causation_id = take(CAUSATION_ID)
        .map(|v| parse_id(v, CAUSATION_ID))
        .transpose()?;
    let saga_id = take(SAGA_ID).map(|v| parse_id(v, SAGA_ID)).transpose()?;
    let reply_to = take(REPLY_TO);
    let tracestate = take(TRACESTATE);
    let trace = take(TRACEPARENT).map(|traceparent| TraceContext {
        traceparent,
        tracestate,
    });
    Ok(Message {
        id: crate::ids::MessageId::from_uuid(id),
        message_type,
        source,
        time,
        ordering_key,
        correlation_id,
        causation_id: causation_id.map(crate::ids::MessageId::from_uuid),
        saga_id: saga_id.map(crate::ids::SagaId::from_uuid),
        reply_to,
        trace,
        content_type,
        headers: fields,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{MessageId, SagaId};

    fn full_message() -> Message {
        Message::json("stock.reserve", &serde_json::json!({"sku": "A", "qty": 2}))
            .unwrap()
            .with_source("order-service")
            .with_ordering_key("order-1")
            .with_correlation_id("corr-1")
            .with_causation_id(MessageId::new())
            .with_saga_id(SagaId::new())
            .with_reply_to("order.replies")
            .with_trace(TraceContext {
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                tracestate: Some("rojo=00f067aa0ba902b7".into()),
            })
            .with_header("tenant", "acme")
    }

    #[test]
    fn every_field_round_trips_through_headers() {
        let message = full_message();
        let headers = to_headers(&message);
        let back = from_headers(headers, message.payload.clone()).unwrap();
        // The wire keeps microseconds.
        let mut expected = message.clone();
        expected.time = DateTime::parse_from_rfc3339(
            &message.time.to_rfc3339_opts(SecondsFormat::Micros, true),
        )
        .unwrap()
        .with_timezone(&Utc);
        assert_eq!(back, expected);
    }

    #[test]
    fn headers_use_cloudevents_names() {
        let message = full_message();
        let headers: std::collections::BTreeMap<_, _> = to_headers(&message).into_iter().collect();
        assert_eq!(headers["ce_specversion"], "1.0");
        assert_eq!(headers["ce_id"], message.id.to_string());
        assert_eq!(headers["ce_type"], "stock.reserve");
        assert_eq!(headers["ce_source"], "order-service");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["ce_partitionkey"], "order-1");
        assert_eq!(headers["tenant"], "acme");
    }

    #[test]
    fn a_free_header_cannot_override_an_envelope_field() {
        let message = full_message().with_header("ce_type", "forged");
        let headers = to_headers(&message);
        let types: Vec<_> = headers.iter().filter(|(k, _)| k == "ce_type").collect();
        assert_eq!(types.len(), 1);
        assert_eq!(types[0].1, "stock.reserve");
    }

    #[test]
    fn malformed_headers_name_the_field_at_fault() {
        let base = to_headers(&full_message());
        let without = |name: &str| -> Vec<(String, String)> {
            base.iter().filter(|(k, _)| k != name).cloned().collect()
        };
        let replaced = |name: &str, value: &str| -> Vec<(String, String)> {
            base.iter()
                .map(|(k, v)| {
                    if k == name {
                        (k.clone(), value.to_owned())
                    } else {
                        (k.clone(), v.clone())
                    }
                })
                .collect()
        };
        let cases = [
            (without("ce_id"), "`ce_id` is missing"),
            (without("ce_type"), "`ce_type` is missing"),
            (without("ce_time"), "`ce_time` is missing"),
            (replaced("ce_id", "not-a-uuid"), "`ce_id` is not a UUID"),
            (replaced("ce_sagaid", "x"), "`ce_sagaid` is not a UUID"),
            (
                replaced("ce_time", "yesterday"),
                "`ce_time` is not RFC 3339",
            ),
            (replaced("ce_specversion", "0.3"), "only 1.0"),
        ];
        for (headers, expected) in cases {
            let err = from_headers(headers, Vec::new()).unwrap_err();
            assert!(matches!(err, Error::InvalidMessage(_)), "{err}");
            assert!(err.to_string().contains(expected), "{err} lacks {expected}");
            assert!(!err.is_retryable());
        }
    }

    #[test]
    fn header_names_match_without_case() {
        let upper: Vec<(String, String)> = to_headers(&full_message())
            .into_iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), v))
            .collect();
        let back = from_headers(upper, Vec::new()).unwrap();
        assert_eq!(back.message_type, "stock.reserve");
    }
}
