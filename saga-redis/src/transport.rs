//! The Redis Streams transport.
//!
//! A channel is a stream (`prefix + channel`). An entry holds the
//! CloudEvents headers of [`saga_core::wire`] as fields, one field per
//! header, and the payload in the field `data`. A group is a Redis consumer
//! group created at `0`, so a new group reads what the stream still holds.
//!
//! | contract | how |
//! |---|---|
//! | publish confirmed | the `XADD` reply (with `appendfsync always`, after the fsync) |
//! | ack after the handler | `XACK` |
//! | nack | the entry stays pending; the same member claims it again at once (`XCLAIM`), which counts a delivery |
//! | dead member | its pending entries are taken over by `XAUTOCLAIM` after [`RedisConfig::reclaim_idle`] |
//! | dead letter | `XADD` to `<channel>.dlq` with the error and `XACK`, in one `MULTI` |
//! | a delivery held while its handling is retried | `XCLAIM … JUSTID` by the member itself: the entry's idle time starts again, its delivery count does not move |
//! | dead letters listed, replayed | `XRANGE` on `<channel>.dlq`; a replay is an `XADD` to the channel, then `XDEL` from `<channel>.dlq` |
//! | attempts | the group's delivery counter (`XPENDING`) |
//! | members that went away | removed after [`RedisConfig::forget_idle`] with nothing pending |
//! | a server that lost its data | on `NOGROUP` the subscription creates its groups again at `0` and goes on with what is published afterwards; what the server lost is lost (run it with `appendfsync always`) |
//!
//! Not guaranteed: order per ordering key when several members of one group
//! read the same stream (Redis hands entries to whichever member asks). With
//! one member per group, entries arrive in stream order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimReply, StreamClaimReply, StreamId, StreamInfoConsumersReply, StreamRangeReply,
    StreamReadReply,
};
use redis::{Client, Value};
use saga_core::transport::{Acknowledger, Capabilities, Delivery, Subscription, Transport};
use saga_core::wire::{self, headers};
use saga_core::{DeadLetter, Error, Message, MessageId, OutboxEntry, Result};

use crate::config::RedisConfig;
use crate::error::{is_missing_group, redis};

/// The stream field that holds the payload.
pub const DATA_FIELD: &str = "data";

/// Sagas over Redis Streams. Cheap to clone.
#[derive(Clone)]
pub struct RedisTransport {
    shared: Arc<Shared>,
}

struct Shared {
    conn: ConnectionManager,
    config: RedisConfig,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

pub(crate) async fn connect(
    config: &RedisConfig,
    response_timeout: Duration,
) -> Result<ConnectionManager> {
    let url = saga_core::redact::redact_url(&config.url);
    let client = Client::open(config.url.as_str())
        .map_err(|e| Error::Config(format!("Redis URL {url:?}: {e}")))?;
    let manager = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(config.response_timeout))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(1));
    let conn = client
        .get_connection_manager_with_config(manager)
        .await
        .map_err(|e| Error::Unavailable(format!("Redis at {url}: {e}")))?;
    Ok(conn)
}

impl RedisTransport {
    /// Connects to Redis.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let conn = connect(&config, config.response_timeout).await?;
        Ok(Self {
            shared: Arc::new(Shared { conn, config }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    /// The stream key of `channel`.
    pub fn stream_key(&self, channel: &str) -> String {
        self.shared.config.key(channel)
    }

    /// Reads the dead-letter stream of `channel` from its start and passes
    /// each entry that is a message, with its entry id, to `visit`, until
    /// `visit` returns false or the stream ends.
    async fn scan_dead_letters(
        &self,
        channel: &str,
        mut visit: impl FnMut(String, DeadLetter) -> bool + Send,
    ) -> Result<()> {
        const PAGE: usize = 100;
        let key = self.stream_key(&self.dead_letter_channel(channel));
        let mut start = "-".to_owned();
        loop {
            let mut conn = self.shared.conn.clone();
            let page: StreamRangeReply = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut conn)
                .await
                .map_err(redis("XRANGE"))?;
            let full = page.ids.len() == PAGE;
            for entry in page.ids {
                start = format!("({}", entry.id);
                match Fields::from_entry(entry.map).decode() {
                    Ok(message) => {
                        if !visit(entry.id, DeadLetter::from_dead_message(message)) {
                            return Ok(());
                        }
                    }
                    Err(error) => {
                        tracing::debug!(stream = %key, id = %entry.id, %error, "dead letter is not a message; not listed");
                    }
                }
            }
            if !full {
                return Ok(());
            }
        }
    }
}

/// The `XADD` arguments (without the key) for `message`.
fn xadd(config: &RedisConfig, key: &str, message: &Message) -> Result<redis::Cmd> {
    if message.headers.contains_key(DATA_FIELD) {
        return Err(Error::InvalidMessage(format!(
            "header `{DATA_FIELD}` is reserved for the payload on Redis"
        )));
    }
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key);
    if let Some(max_len) = config.max_len {
        cmd.arg("MAXLEN").arg("~").arg(max_len);
    }
    cmd.arg("*");
    for (name, value) in wire::to_headers(message) {
        cmd.arg(name).arg(value);
    }
    cmd.arg(DATA_FIELD).arg(message.payload.as_slice());
    Ok(cmd)
}

#[async_trait]
impl Transport for RedisTransport {
    async fn publish(&self, channel: &str, message: &Message) -> Result<()> {
        let cmd = xadd(&self.shared.config, &self.stream_key(channel), message)?;
        let mut conn = self.shared.conn.clone();
        let _: String = cmd.query_async(&mut conn).await.map_err(redis("XADD"))?;
        Ok(())
    }

    /// One pipeline, one round trip: Redis applies the entries in order.
    async fn publish_batch(&self, entries: &[OutboxEntry]) -> Vec<Result<()>> {
        let mut pipe = redis::pipe();
        let mut results: Vec<Option<Result<()>>> = Vec::with_capacity(entries.len());
        for entry in entries {
            match xadd(
                &self.shared.config,
                &self.stream_key(&entry.channel),
                &entry.message,
            ) {
                Ok(cmd) => {
                    pipe.add_command(cmd);
                    results.push(None);
                }
                Err(error) => results.push(Some(Err(error))),
            }
        }
        let mut conn = self.shared.conn.clone();
        let replies: std::result::Result<Vec<Value>, _> =
            pipe.ignore_errors().query_async(&mut conn).await;
        let mut replies = match replies {
            Ok(replies) => replies.into_iter(),
            Err(error) => {
                let retryable = crate::error::is_retryable(&error);
                let text = error.to_string();
                return results
                    .into_iter()
                    .map(|r| {
                        r.unwrap_or_else(|| {
                            Err(Error::backend("XADD pipeline", retryable, text.clone()))
                        })
                    })
                    .collect();
            }
        };
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| match replies.next() {
                    Some(Value::ServerError(error)) => {
                        Err(redis("XADD")(redis::RedisError::from(error)))
                    }
                    Some(_) => Ok(()),
                    None => Err(Error::backend("XADD pipeline", true, "reply missing")),
                })
            })
            .collect()
    }

    /// `PING`.
    async fn check(&self) -> Result<()> {
        let mut conn = self.shared.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(redis("PING"))?;
        Ok(())
    }

    async fn subscribe(&self, group: &str, channels: &[String]) -> Result<Box<dyn Subscription>> {
        if channels.is_empty() {
            return Err(Error::Config("subscribe needs at least one channel".into()));
        }
        let config = &self.shared.config;
        let keys: Vec<String> = channels.iter().map(|c| self.stream_key(c)).collect();
        create_groups(&self.shared, group, &keys).await?;
        // A blocking read holds its connection: each member reads on its own.
        let reader = connect(config, config.block + config.response_timeout).await?;
        Ok(Box::new(RedisSubscription {
            shared: Arc::clone(&self.shared),
            reader,
            group: group.to_owned(),
            consumer: format!("member-{}", uuid::Uuid::now_v7().simple()),
            streams: channels
                .iter()
                .map(|c| (c.clone(), self.stream_key(c)))
                .collect(),
            buffer: VecDeque::new(),
            retry: Arc::default(),
            last_reclaim: None,
        }))
    }

    /// Deletes each channel's stream and its dead-letter stream (`DEL`);
    /// the groups on them go with the streams, whatever `groups` names.
    async fn delete_channels(&self, channels: &[String], _groups: &[String]) -> Result<()> {
        let keys: Vec<String> = channels
            .iter()
            .flat_map(|c| {
                [
                    self.stream_key(c),
                    self.stream_key(&self.dead_letter_channel(c)),
                ]
            })
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut conn = self.shared.conn.clone();
        let _: i64 = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(redis("DEL"))?;
        Ok(())
    }

    async fn dead_letters(&self, channel: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut letters = Vec::new();
        if limit > 0 {
            self.scan_dead_letters(channel, |_, letter| {
                letters.push(letter);
                letters.len() < limit
            })
            .await?;
        }
        Ok(letters)
    }

    async fn replay_dead_letter(&self, channel: &str, id: MessageId) -> Result<bool> {
        let mut found = None;
        self.scan_dead_letters(channel, |entry, letter| {
            if letter.message.id == id {
                found = Some((entry, letter));
            }
            found.is_none()
        })
        .await?;
        let Some((entry, letter)) = found else {
            return Ok(false);
        };
        self.publish(channel, &letter.message).await?;
        let mut conn = self.shared.conn.clone();
        let _: u64 = redis::cmd("XDEL")
            .arg(self.stream_key(&self.dead_letter_channel(channel)))
            .arg(&entry)
            .query_async(&mut conn)
            .await
            .map_err(redis("XDEL"))?;
        Ok(true)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_per_key: false,
            replays_history: true,
            redelivers_unacked: true,
        }
    }
}

/// An entry read from a stream, not yet handed out.
struct Fetched {
    stream: usize,
    entry: StreamId,
    attempt: u32,
}

struct RedisSubscription {
    shared: Arc<Shared>,
    reader: ConnectionManager,
    group: String,
    consumer: String,
    /// (channel, stream key)
    streams: Vec<(String, String)>,
    buffer: VecDeque<Fetched>,
    /// Entries this member nacked, to claim again at once.
    retry: Arc<Mutex<VecDeque<(usize, String)>>>,
    last_reclaim: Option<Instant>,
}

impl RedisSubscription {
    fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    fn reclaim_every(&self) -> Duration {
        (self.config().reclaim_idle / 3).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// How many times the group delivered `id` (this delivery included).
    async fn delivered(&self, stream: usize, id: &str) -> Result<u32> {
        let mut conn = self.shared.conn.clone();
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&self.streams[stream].1)
            .arg(&self.group)
            .arg(id)
            .arg(id)
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(redis("XPENDING"))?;
        Ok(pending.first().map_or(1, |(_, _, _, count)| {
            u32::try_from(*count).unwrap_or(u32::MAX)
        }))
    }

    /// Claims the entries this member nacked.
    async fn claim_nacked(&mut self) -> Result<bool> {
        let Some((stream, id)) = self.retry.lock().unwrap().pop_front() else {
            return Ok(false);
        };
        let mut conn = self.shared.conn.clone();
        let claimed: StreamClaimReply = redis::cmd("XCLAIM")
            .arg(&self.streams[stream].1)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(&id)
            .query_async(&mut conn)
            .await
            .map_err(redis("XCLAIM"))?;
        for entry in claimed.ids {
            let attempt = self.delivered(stream, &entry.id).await?;
            self.buffer.push_back(Fetched {
                stream,
                entry,
                attempt,
            });
        }
        Ok(true)
    }

    /// Takes over entries other members (or this one) left pending too long.
    async fn reclaim(&mut self) -> Result<()> {
        if self
            .last_reclaim
            .is_some_and(|at| at.elapsed() < self.reclaim_every())
        {
            return Ok(());
        }
        self.last_reclaim = Some(Instant::now());
        let idle = u64::try_from(self.config().reclaim_idle.as_millis()).unwrap_or(u64::MAX);
        for stream in 0..self.streams.len() {
            let mut conn = self.shared.conn.clone();
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&self.streams[stream].1)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(idle)
                .arg("0-0")
                .arg("COUNT")
                .arg(self.config().batch)
                .query_async(&mut conn)
                .await
                .map_err(redis("XAUTOCLAIM"))?;
            for entry in reply.claimed {
                let attempt = self.delivered(stream, &entry.id).await?;
                self.buffer.push_back(Fetched {
                    stream,
                    entry,
                    attempt,
                });
            }
            self.forget_idle_members(stream).await?;
        }
        Ok(())
    }

    /// Removes members that have been idle for [`RedisConfig::forget_idle`]
    /// with nothing pending: what is left of consumers that went away.
    async fn forget_idle_members(&self, stream: usize) -> Result<()> {
        let key = &self.streams[stream].1;
        let mut conn = self.shared.conn.clone();
        let members: StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(key)
            .arg(&self.group)
            .query_async(&mut conn)
            .await
            .map_err(redis("XINFO CONSUMERS"))?;
        let forget = self.config().forget_idle.as_millis();
        for member in members.consumers {
            if member.pending == 0 && member.name != self.consumer && member.idle as u128 >= forget
            {
                let _: i64 = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(key)
                    .arg(&self.group)
                    .arg(&member.name)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis("XGROUP DELCONSUMER"))?;
            }
        }
        Ok(())
    }

    /// Reads new entries, blocking up to [`RedisConfig::block`].
    async fn read_new(&mut self) -> Result<()> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.config().batch)
            .arg("BLOCK")
            .arg(u64::try_from(self.config().block.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS");
        for (_, key) in &self.streams {
            cmd.arg(key);
        }
        for _ in &self.streams {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = cmd
            .query_async(&mut self.reader)
            .await
            .map_err(redis("XREADGROUP"))?;
        for stream_reply in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(stream) = self
                .streams
                .iter()
                .position(|(_, k)| *k == stream_reply.key)
            else {
                continue;
            };
            for entry in stream_reply.ids {
                self.buffer.push_back(Fetched {
                    stream,
                    entry,
                    attempt: 1,
                });
            }
        }
        Ok(())
    }

    fn settle(&self, stream: usize, id: String, attempt: u32, fields: Fields) -> Settle {
        Settle {
            shared: Arc::clone(&self.shared),
            group: self.group.clone(),
            consumer: self.consumer.clone(),
            channel: self.streams[stream].0.clone(),
            key: self.streams[stream].1.clone(),
            stream,
            id,
            attempt,
            fields,
            retry: Arc::clone(&self.retry),
        }
    }
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            if let Some(Fetched {
                stream,
                entry,
                attempt,
            }) = self.buffer.pop_front()
            {
                let fields = Fields::from_entry(entry.map);
                let settle = self.settle(stream, entry.id, attempt, fields);
                if attempt > self.config().max_deliveries {
                    let error = format!(
                        "delivered {attempt} times without an acknowledgement (limit {})",
                        self.config().max_deliveries
                    );
                    Box::new(settle).dead_letter(&error).await?;
                    continue;
                }
                match settle.fields.decode() {
                    Ok(message) => {
                        let channel = settle.channel.clone();
                        return Ok(Delivery::new(channel, message, attempt, Box::new(settle)));
                    }
                    Err(error) => {
                        tracing::warn!(channel = %settle.channel, id = %settle.id, %error, "undecodable entry dead-lettered");
                        Box::new(settle).dead_letter(&error.to_string()).await?;
                        continue;
                    }
                }
            }
            match self.fetch().await {
                Ok(()) => {}
                Err(error) if is_missing_group(&error) => {
                    tracing::warn!(group = %self.group, %error, "a stream or consumer group is gone (did the server lose its data?); creating them again from the streams' start");
                    let keys: Vec<String> =
                        self.streams.iter().map(|(_, key)| key.clone()).collect();
                    create_groups(&self.shared, &self.group, &keys).await?;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

impl RedisSubscription {
    /// Fills the buffer: entries this member nacked, then entries of dead
    /// members, then new ones.
    async fn fetch(&mut self) -> Result<()> {
        if self.claim_nacked().await? {
            return Ok(());
        }
        self.reclaim().await?;
        if self.buffer.is_empty() {
            self.read_new().await?;
        }
        Ok(())
    }
}

/// Creates `group` on each stream (and the stream) at `0`, so that it reads
/// what the stream holds; a group that exists stays as it is.
async fn create_groups(shared: &Shared, group: &str, keys: &[String]) -> Result<()> {
    let mut conn = shared.conn.clone();
    for key in keys {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(redis("XGROUP CREATE")(e)),
        }
    }
    Ok(())
}

/// An entry's fields as read, kept to dead-letter it as it came.
struct Fields {
    data: Option<Vec<u8>>,
    headers: Vec<(String, std::result::Result<String, Vec<u8>>)>,
}

impl Fields {
    fn from_entry(map: HashMap<String, Value>) -> Self {
        let mut data = None;
        let mut headers = Vec::with_capacity(map.len());
        for (name, value) in map {
            let bytes = match value {
                Value::BulkString(bytes) => bytes,
                Value::SimpleString(text) => text.into_bytes(),
                other => format!("{other:?}").into_bytes(),
            };
            if name == DATA_FIELD {
                data = Some(bytes);
            } else {
                headers.push((
                    name,
                    String::from_utf8(bytes).map_err(std::string::FromUtf8Error::into_bytes),
                ));
            }
        }
        Self { data, headers }
    }

    /// The message, or why the entry is not one.
    fn decode(&self) -> Result<Message> {
        let data = self.data.clone().ok_or_else(|| {
            Error::InvalidMessage(format!("stream entry has no `{DATA_FIELD}` field"))
        })?;
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            let value = value
                .as_ref()
                .map_err(|_| Error::InvalidMessage(format!("field `{name}` is not UTF-8 text")))?;
            headers.push((name.as_str(), value.clone()));
        }
        wire::from_headers(headers, data)
    }

    /// The entry as it came, plus the dead-letter fields.
    fn dead_letter_args(&self, cmd: &mut redis::Cmd, channel: &str, error: &str) {
        for (name, value) in &self.headers {
            if name == headers::DEAD_LETTER_ERROR || name == headers::DEAD_LETTER_CHANNEL {
                continue;
            }
            match value {
                Ok(text) => cmd.arg(name).arg(text),
                Err(bytes) => cmd.arg(name).arg(bytes.as_slice()),
            };
        }
        cmd.arg(headers::DEAD_LETTER_ERROR)
            .arg(error)
            .arg(headers::DEAD_LETTER_CHANNEL)
            .arg(channel);
        if let Some(data) = &self.data {
            cmd.arg(DATA_FIELD).arg(data.as_slice());
        }
    }
}

/// Settles one delivery.
struct Settle {
    shared: Arc<Shared>,
    group: String,
    consumer: String,
    channel: String,
    key: String,
    stream: usize,
    id: String,
    attempt: u32,
    fields: Fields,
    retry: Arc<Mutex<VecDeque<(usize, String)>>>,
}

#[async_trait]
impl Acknowledger for Settle {
    async fn ack(self: Box<Self>) -> Result<()> {
        let mut conn = self.shared.conn.clone();
        let _: u64 = redis::cmd("XACK")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&self.id)
            .query_async(&mut conn)
            .await
            .map_err(redis("XACK"))?;
        Ok(())
    }

    async fn nack(self: Box<Self>, error: &str) -> Result<()> {
        if self.attempt >= self.shared.config.max_deliveries {
            return self.dead_letter(error).await;
        }
        self.retry
            .lock()
            .unwrap()
            .push_back((self.stream, self.id.clone()));
        Ok(())
    }

    /// `XCLAIM … JUSTID` by this member: the entry's idle time starts
    /// again, so no other member reclaims it while its handling is retried.
    async fn keep(&mut self) -> Result<()> {
        let mut conn = self.shared.conn.clone();
        let _: Vec<String> = redis::cmd("XCLAIM")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(&self.id)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await
            .map_err(redis("XCLAIM JUSTID"))?;
        Ok(())
    }

    async fn dead_letter(self: Box<Self>, error: &str) -> Result<()> {
        let dead = self.shared.config.key(&format!("{}.dlq", self.channel));
        let mut add = redis::cmd("XADD");
        add.arg(&dead);
        if let Some(max_len) = self.shared.config.max_len {
            add.arg("MAXLEN").arg("~").arg(max_len);
        }
        add.arg("*");
        self.fields.dead_letter_args(&mut add, &self.channel, error);
        let mut ack = redis::cmd("XACK");
        ack.arg(&self.key).arg(&self.group).arg(&self.id);
        let mut pipe = redis::pipe();
        pipe.atomic().add_command(add).add_command(ack);
        let mut conn = self.shared.conn.clone();
        let _: (String, u64) = pipe
            .query_async(&mut conn)
            .await
            .map_err(redis("dead letter (XADD + XACK)"))?;
        Ok(())
    }
}
