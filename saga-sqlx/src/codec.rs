//! How messages are kept in rows: channel, CloudEvents headers as a JSON
//! object, payload bytes (the same mapping the transports put on the wire).

use std::collections::BTreeMap;

use saga_core::{Error, OutboxEntry, Result, wire};

/// The row form of an entry: channel, headers, payload.
pub(crate) fn encode(entry: &OutboxEntry) -> (String, serde_json::Value, Vec<u8>) {
    let headers: serde_json::Map<String, serde_json::Value> = wire::to_headers(&entry.message)
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    (
        entry.channel.clone(),
        serde_json::Value::Object(headers),
        entry.message.payload.clone(),
    )
}

/// An entry back from its row form.
pub(crate) fn decode(
    channel: String,
    headers: serde_json::Value,
    payload: Vec<u8>,
) -> Result<OutboxEntry> {
    let serde_json::Value::Object(map) = headers else {
        return Err(Error::InvalidMessage(
            "stored headers are not a JSON object".into(),
        ));
    };
    let pairs: BTreeMap<String, String> = map
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect();
    Ok(OutboxEntry::new(
        channel,
        wire::from_headers(pairs, payload)?,
    ))
}
