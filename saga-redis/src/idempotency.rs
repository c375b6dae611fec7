//! The Redis idempotency store: records with `SET ... EX`, guarded by
//! `SET NX PX` locks.
//!
//! A transaction of this store ([`RedisTx`]) takes a lock per record it
//! touches (`SET <record>:lock <token> NX PX lock_timeout`; a second
//! transaction on the same record waits for it), reads the record, and
//! buffers its writes. `commit` checks in one Lua script that every lock is
//! still its own, writes the records with the retention as their expiry, and
//! drops the locks. A transaction dropped without commit releases its locks
//! (or they expire after [`RedisConfig::lock_timeout`] if the process died).
//!
//! **Limit:** this transaction is not the SQL database's. A service that
//! records a message here and changes its database can crash between the
//! two commits: commit the database first and the message is processed again
//! after the crash (the effect must then be idempotent on its own); commit
//! here first and the effect is lost. Use it where the effect itself lives in
//! Redis or is idempotent, or for consumers that only read; keep the SQL
//! stores' inbox for effects in a SQL database.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use saga_core::store::{Begin, IdempotencyStore, StepClaim, StepMark, Transactional};
use saga_core::{Error, MessageId, OutboxEntry, Result, SagaId};
use serde::{Deserialize, Serialize};

use crate::config::RedisConfig;
use crate::error::redis;

/// How long a waiting transaction sleeps between two lock attempts.
const LOCK_POLL: Duration = Duration::from_millis(10);

/// Deduplication of consumed messages and step marks, in Redis.
#[derive(Clone)]
pub struct RedisIdempotencyStore {
    conn: ConnectionManager,
    config: RedisConfig,
}

impl std::fmt::Debug for RedisIdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisIdempotencyStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What is kept per message and per step.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    /// When it was first written, µs since the epoch (the purge order).
    at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mark: Option<StepMark>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply: Option<OutboxEntry>,
}

/// A transaction of [`RedisIdempotencyStore`]. Dropping it releases its locks.
pub struct RedisTx {
    conn: ConnectionManager,
    token: String,
    locks: Vec<String>,
    writes: BTreeMap<String, Record>,
    finished: bool,
}

impl std::fmt::Debug for RedisTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTx")
            .field("locks", &self.locks)
            .field("writes", &self.writes.len())
            .finish_non_exhaustive()
    }
}

const RELEASE: &str = r"
for i, lock in ipairs(KEYS) do
  if redis.call('GET', lock) == ARGV[1] then redis.call('DEL', lock) end
end
return 0";

/// KEYS: n locks, then m records, then the index. ARGV: token, expiry
/// seconds, n, then m record values, then m scores.
const COMMIT: &str = r"
local n = tonumber(ARGV[3])
for i = 1, n do
  if redis.call('GET', KEYS[i]) ~= ARGV[1] then return 0 end
end
local m = #KEYS - n - 1
local index = KEYS[#KEYS]
for j = 1, m do
  redis.call('SET', KEYS[n + j], ARGV[3 + j], 'EX', ARGV[2])
  redis.call('ZADD', index, ARGV[3 + m + j], KEYS[n + j])
end
for i = 1, n do redis.call('DEL', KEYS[i]) end
return 1";

impl Drop for RedisTx {
    fn drop(&mut self) {
        if self.finished || self.locks.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut conn = self.conn.clone();
        let locks = std::mem::take(&mut self.locks);
        let token = self.token.clone();
        runtime.spawn(async move {
            let released: redis::RedisResult<i64> = redis::Script::new(RELEASE)
                .key(locks)
                .arg(token)
                .invoke_async(&mut conn)
                .await;
            if let Err(error) = released {
                tracing::warn!(%error, "releasing idempotency locks failed; they expire on their own");
            }
        });
    }
}

impl RedisIdempotencyStore {
    /// Connects to Redis.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let conn = crate::transport::connect(&config, config.response_timeout).await?;
        Ok(Self { conn, config })
    }

    fn index_key(&self) -> String {
        self.config.key("idempotency:index")
    }

    /// Where the latest purge cut-off is kept (microseconds).
    fn purged_key(&self) -> String {
        self.config.key("idempotency:purged_before")
    }

    fn message_key(&self, consumer: &str, id: MessageId) -> String {
        self.config.key(&format!("idempotency:msg:{consumer}:{id}"))
    }

    fn step_key(&self, consumer: &str, saga: SagaId, step: u32) -> String {
        self.config
            .key(&format!("idempotency:step:{consumer}:{saga}:{step}"))
    }

    /// Takes the lock of `key` for `tx` (waiting while another transaction
    /// holds it) and reads the record as `tx` sees it.
    async fn lock_and_read(&self, tx: &mut RedisTx, key: &str) -> Result<Option<Record>> {
        if let Some(record) = tx.writes.get(key) {
            return Ok(Some(record.clone()));
        }
        let lock = format!("{key}:lock");
        if !tx.locks.contains(&lock) {
            let ttl = u64::try_from(self.config.lock_timeout.as_millis()).unwrap_or(u64::MAX);
            let give_up = tokio::time::Instant::now() + self.config.lock_timeout;
            loop {
                let taken: Option<String> = redis::cmd("SET")
                    .arg(&lock)
                    .arg(&tx.token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut tx.conn)
                    .await
                    .map_err(redis("SET NX (idempotency lock)"))?;
                if taken.is_some() {
                    tx.locks.push(lock);
                    break;
                }
                if tokio::time::Instant::now() >= give_up {
                    return Err(Error::Timeout(format!("waiting for the lock on {key}")));
                }
                tokio::time::sleep(LOCK_POLL).await;
            }
        }
        let stored: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut tx.conn)
            .await
            .map_err(redis("GET (idempotency record)"))?;
        stored
            .map(|text| {
                serde_json::from_str(&text).map_err(|e| {
                    Error::InvalidMessage(format!("idempotency record {key} is not ours: {e}"))
                })
            })
            .transpose()
    }
}

#[async_trait]
impl Transactional for RedisIdempotencyStore {
    type Tx = RedisTx;

    async fn begin(&self) -> Result<RedisTx> {
        Ok(RedisTx {
            conn: self.conn.clone(),
            token: uuid::Uuid::now_v7().simple().to_string(),
            locks: Vec::new(),
            writes: BTreeMap::new(),
            finished: false,
        })
    }

    async fn commit(&self, mut tx: RedisTx) -> Result<()> {
        tx.finished = true;
        if tx.locks.is_empty() {
            return Ok(());
        }
        let commit = redis::Script::new(COMMIT);
        let mut script = commit.prepare_invoke();
        for lock in &tx.locks {
            script.key(lock);
        }
        for key in tx.writes.keys() {
            script.key(key);
        }
        script.key(self.index_key());
        script
            .arg(&tx.token)
            .arg(self.config.retention.as_secs().max(1))
            .arg(tx.locks.len());
        for record in tx.writes.values() {
            script.arg(serde_json::to_string(record)?);
        }
        for record in tx.writes.values() {
            script.arg(record.at);
        }
        let mut conn = tx.conn.clone();
        let committed: i64 = script
            .invoke_async(&mut conn)
            .await
            .map_err(redis("commit (idempotency)"))?;
        if committed == 1 {
            Ok(())
        } else {
            Err(Error::Timeout(format!(
                "an idempotency lock expired before commit (lock timeout {:?})",
                self.config.lock_timeout
            )))
        }
    }
}

#[async_trait]
impl IdempotencyStore for RedisIdempotencyStore {
    async fn begin_processing(
        &self,
        tx: &mut RedisTx,
        consumer: &str,
        message_id: MessageId,
        now: DateTime<Utc>,
    ) -> Result<Begin> {
        let key = self.message_key(consumer, message_id);
        if let Some(record) = self.lock_and_read(tx, &key).await? {
            return Ok(Begin::Duplicate {
                reply: record.reply,
            });
        }
        tx.writes.insert(
            key,
            Record {
                at: now.timestamp_micros(),
                mark: None,
                reply: None,
            },
        );
        Ok(Begin::Fresh)
    }

    async fn save_reply(
        &self,
        tx: &mut RedisTx,
        consumer: &str,
        message_id: MessageId,
        reply: &OutboxEntry,
    ) -> Result<()> {
        let key = self.message_key(consumer, message_id);
        let record = tx.writes.get_mut(&key).ok_or_else(|| {
            Error::InvalidState(format!(
                "save_reply for {message_id} without begin_processing in this transaction"
            ))
        })?;
        record.reply = Some(reply.clone());
        Ok(())
    }

    async fn claim_step(
        &self,
        tx: &mut RedisTx,
        consumer: &str,
        saga_id: SagaId,
        step: u32,
        mark: StepMark,
        now: DateTime<Utc>,
    ) -> Result<StepClaim> {
        let key = self.step_key(consumer, saga_id, step);
        if let Some(record) = self.lock_and_read(tx, &key).await? {
            return Ok(StepClaim::Existing {
                mark: record.mark.ok_or_else(|| {
                    Error::InvalidMessage(format!("step record {key} has no mark"))
                })?,
                reply: record.reply,
            });
        }
        tx.writes.insert(
            key,
            Record {
                at: now.timestamp_micros(),
                mark: Some(mark),
                reply: None,
            },
        );
        Ok(StepClaim::Inserted)
    }

    async fn update_step(
        &self,
        tx: &mut RedisTx,
        consumer: &str,
        saga_id: SagaId,
        step: u32,
        mark: StepMark,
        reply: Option<&OutboxEntry>,
    ) -> Result<()> {
        let key = self.step_key(consumer, saga_id, step);
        let lock = format!("{key}:lock");
        if !tx.locks.contains(&lock) {
            return Err(Error::InvalidState(format!(
                "update_step for {saga_id} step {step} without claim_step in this transaction"
            )));
        }
        let at = self
            .lock_and_read(tx, &key)
            .await?
            .ok_or_else(|| Error::NotFound(format!("step record {key}")))?
            .at;
        tx.writes.insert(
            key,
            Record {
                at,
                mark: Some(mark),
                reply: reply.cloned(),
            },
        );
        Ok(())
    }

    /// Records expire after [`RedisConfig::retention`](crate::RedisConfig::retention)
    /// on their own, so marks older than that may be gone even before any purge.
    async fn marks_purged_before(&self, _: &mut RedisTx) -> Result<Option<DateTime<Utc>>> {
        let mut conn = self.conn.clone();
        let purged: Option<i64> = redis::cmd("GET")
            .arg(self.purged_key())
            .query_async(&mut conn)
            .await
            .map_err(redis("GET (idempotency purge)"))?;
        let expired = saga_core::clock::now() - saga_core::clock::to_chrono(self.config.retention);
        Ok(Some(
            purged
                .and_then(DateTime::from_timestamp_micros)
                .map_or(expired, |purged| purged.max(expired)),
        ))
    }

    async fn purge_expired(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let mut conn = self.conn.clone();
        // The latest cut-off, kept for marks_purged_before.
        let _: i64 = redis::Script::new(
            "local old = tonumber(redis.call('GET', KEYS[1]) or '-1') \
             if tonumber(ARGV[1]) > old then redis.call('SET', KEYS[1], ARGV[1]) end return 0",
        )
        .key(self.purged_key())
        .arg(before.timestamp_micros())
        .invoke_async(&mut conn)
        .await
        .map_err(redis("remembering the purge (idempotency)"))?;
        let keys: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.index_key())
            .arg("-inf")
            .arg(format!("({}", before.timestamp_micros()))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(redis("ZRANGE (idempotency index)"))?;
        if keys.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("DEL").arg(&keys);
        pipe.cmd("ZREM").arg(self.index_key()).arg(&keys);
        let (deleted, _): (u64, u64) = pipe
            .query_async(&mut conn)
            .await
            .map_err(redis("purge (idempotency)"))?;
        Ok(deleted)
    }
}
