//! [`SqliteStore`]: every saga-core store in one SQLite database file.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use saga_core::clock;
use saga_core::saga::{LogStatus, SagaInstance, SagaLogEntry, SagaState};
use saga_core::store::{
    Begin, ClaimRequest, DeadLetter, OutboxRecord, OutboxStats, SagaFilter, StepClaim, StepMark,
};
use saga_core::{
    Error, IdempotencyStore, MessageId, OutboxEntry, OutboxStore, Result, SagaId, SagaStore,
    Transactional,
};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
};
use tokio::sync::Notify;

use crate::codec::{decode, encode};
use crate::error::{beginning, db};
use crate::uncancelled::uncancelled;

/// The outbox, idempotency and saga stores in one SQLite database.
///
/// SQLite has one writer at a time: transactions queue for the write lock (up
/// to the busy timeout, then fail retryably). Relays in the same process are
/// woken at each commit; relays in other processes poll.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    committed: Arc<Notify>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn time(micros: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| Error::InvalidState(format!("stored time {micros} is out of range")))
}

fn opt_time(micros: Option<i64>) -> Result<Option<DateTime<Utc>>> {
    micros.map(time).transpose()
}

fn json_text(value: &impl serde::Serialize) -> Result<String> {
    Ok(serde_json::to_string(value)?)
}

fn uuid<T: FromStr>(text: &str) -> Result<T> {
    text.parse()
        .map_err(|_| Error::InvalidState(format!("stored id {text:?} is not a UUID")))
}

fn stored_reply(row: &SqliteRow) -> Result<Option<OutboxEntry>> {
    let field = |e| db("reading a stored reply")(e);
    let Some(channel) = row
        .try_get::<Option<String>, _>("reply_channel")
        .map_err(field)?
    else {
        return Ok(None);
    };
    let headers: String = row.try_get("reply_headers").map_err(field)?;
    decode(
        channel,
        serde_json::from_str(&headers)?,
        row.try_get("reply_payload").map_err(field)?,
    )
    .map(Some)
}

fn outbox_record(row: &SqliteRow) -> Result<OutboxRecord> {
    let field = |e| db("reading an outbox row")(e);
    let headers: String = row.try_get("headers").map_err(field)?;
    let attempts: i64 = row.try_get("attempts").map_err(field)?;
    Ok(OutboxRecord {
        seq: row.try_get("seq").map_err(field)?,
        entry: decode(
            row.try_get("channel").map_err(field)?,
            serde_json::from_str(&headers)?,
            row.try_get("payload").map_err(field)?,
        )?,
        attempts: attempts.max(0) as u32,
        last_error: row.try_get("last_error").map_err(field)?,
        created_at: time(row.try_get("created_at").map_err(field)?)?,
    })
}

fn saga_row(row: &SqliteRow) -> Result<SagaInstance> {
    let field = |e| db("reading a saga row")(e);
    let state: String = row.try_get("state").map_err(field)?;
    let id: String = row.try_get("id").map_err(field)?;
    let awaiting: Option<String> = row.try_get("awaiting").map_err(field)?;
    let data: String = row.try_get("data").map_err(field)?;
    let history: String = row.try_get("history").map_err(field)?;
    let step: i64 = row.try_get("step").map_err(field)?;
    let attempt: i64 = row.try_get("attempt").map_err(field)?;
    let version: i64 = row.try_get("version").map_err(field)?;
    Ok(SagaInstance {
        id: uuid(&id)?,
        saga_type: row.try_get("saga_type").map_err(field)?,
        state: SagaState::parse(&state)
            .ok_or_else(|| Error::InvalidState(format!("unknown saga state {state:?}")))?,
        step: step.max(0) as u32,
        attempt: attempt.max(0) as u32,
        data: serde_json::from_str(&data)?,
        awaiting: awaiting.as_deref().map(uuid).transpose()?,
        wake_at: opt_time(row.try_get("wake_at").map_err(field)?)?,
        lease_owner: row.try_get("lease_owner").map_err(field)?,
        lease_until: opt_time(row.try_get("lease_until").map_err(field)?)?,
        error: row.try_get("error").map_err(field)?,
        correlation_id: row.try_get("correlation_id").map_err(field)?,
        history: serde_json::from_str(&history)?,
        version: version.max(0) as u64,
        created_at: time(row.try_get("created_at").map_err(field)?)?,
        updated_at: time(row.try_get("updated_at").map_err(field)?)?,
    })
}

const SAGA_COLUMNS: &str = "id, saga_type, state, step, attempt, data, awaiting, wake_at, lease_owner, \
     lease_until, error, correlation_id, history, version, created_at, updated_at";

const OUTBOX_COLUMNS: &str = "seq, channel, headers, payload, attempts, last_error, created_at";

fn limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// A store on an existing pool.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            committed: Arc::default(),
        }
    }

    /// Opens (creating it if needed) the database at `url` (`sqlite://path` or
    /// `sqlite::memory:`), in WAL mode with a 5 s busy timeout, and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("bad SQLite URL {url:?}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(db("opening the SQLite database"))?;
        let store = Self::new(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Wakes every relay waiting on this store, and leaves a permit for one
    /// that is busy publishing right now: a commit made while no relay
    /// waits is not missed until the next poll.
    fn wake_relays(&self) {
        self.committed.notify_waiters();
        self.committed.notify_one();
    }

    /// Applies the embedded migrations the database lacks; running it again
    /// changes nothing. Your own sqlx migrations may share the file: each
    /// side leaves the other's versions alone (set
    /// [`Migrator::set_ignore_missing`](sqlx::migrate::Migrator::set_ignore_missing)
    /// on yours).
    pub async fn migrate(&self) -> Result<()> {
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.set_ignore_missing(true);
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(db("connecting to migrate"))?;
        migrator
            .run_direct(&mut *conn)
            .await
            .map_err(|e| Error::backend("applying migrations", false, e))
    }

    /// Counts a failed publish of an unpublished record, keeps its error,
    /// releases its lease and sets `column` (`retry_at` or `dead_at`) to `at`.
    /// Only while `owner` leases the record (fencing); `false` otherwise.
    async fn count_failure(
        &self,
        owner: &str,
        seq: i64,
        error: &str,
        column: &'static str,
        at: DateTime<Utc>,
        context: &'static str,
    ) -> Result<bool> {
        let result = sqlx::query(&format!(
            "UPDATE saga_outbox SET attempts = attempts + 1, last_error = ?2, {column} = ?3, \
             lease_owner = NULL, lease_until = NULL \
             WHERE seq = ?1 AND lease_owner = ?4 AND published_at IS NULL AND dead_at IS NULL"
        ))
        .bind(seq)
        .bind(error)
        .bind(micros(at))
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db(context))?;
        Ok(result.rows_affected() == 1)
    }
}

#[async_trait]
impl Transactional for SqliteStore {
    type Tx = crate::SqliteTx;

    /// `BEGIN IMMEDIATE`: the transaction takes SQLite's write lock at once,
    /// waiting up to the busy timeout. A deferred transaction that reads
    /// first would fail with `SQLITE_BUSY` when it tries to write while
    /// another connection writes, and no wait helps it then.
    ///
    /// `BEGIN` and `COMMIT` run to their end even when the caller's future
    /// is dropped (see the `uncancelled` module).
    async fn begin(&self) -> Result<Self::Tx> {
        let pool = self.pool.clone();
        uncancelled(async move { pool.begin_with("BEGIN IMMEDIATE").await })
            .await?
            .map_err(beginning)
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        uncancelled(tx.commit()).await?.map_err(db("committing"))?;
        self.wake_relays();
        Ok(())
    }
}

#[async_trait]
impl OutboxStore for SqliteStore {
    async fn enqueue(&self, tx: &mut Self::Tx, entries: &[OutboxEntry]) -> Result<()> {
        let now = micros(clock::now());
        for entry in entries {
            let (channel, headers, payload) = encode(entry);
            sqlx::query(
                "INSERT INTO saga_outbox (channel, message_id, ordering_key, headers, payload, created_at, retry_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            )
            .bind(channel)
            .bind(entry.message.id.to_string())
            .bind(&entry.message.ordering_key)
            .bind(headers.to_string())
            .bind(payload)
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(db("enqueueing outbox messages"))?;
        }
        Ok(())
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<OutboxRecord>> {
        let now = micros(request.now);
        let rows = sqlx::query(&format!(
            "UPDATE saga_outbox SET lease_owner = ?1, lease_until = ?2 WHERE seq IN ( \
                 SELECT o.seq FROM saga_outbox o \
                 WHERE o.published_at IS NULL AND o.dead_at IS NULL AND o.retry_at <= ?3 \
                   AND (o.lease_until IS NULL OR o.lease_until <= ?3) \
                   AND (o.ordering_key IS NULL OR o.seq = (SELECT min(p.seq) FROM saga_outbox p \
                       WHERE p.ordering_key = o.ordering_key \
                         AND p.published_at IS NULL AND p.dead_at IS NULL)) \
                 ORDER BY o.seq LIMIT ?4) \
             RETURNING {OUTBOX_COLUMNS}"
        ))
        .bind(&request.owner)
        .bind(micros(request.now + clock::to_chrono(request.lease)))
        .bind(now)
        .bind(limit(request.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("claiming outbox messages"))?;
        let mut records = rows.iter().map(outbox_record).collect::<Result<Vec<_>>>()?;
        records.sort_by_key(|r| r.seq);
        Ok(records)
    }

    async fn mark_published(&self, owner: &str, seqs: &[i64], now: DateTime<Utc>) -> Result<u64> {
        let mut tx = self.begin().await?;
        let mut marked = 0;
        for seq in seqs {
            marked += sqlx::query(
                "UPDATE saga_outbox SET published_at = ?2, lease_owner = NULL, lease_until = NULL \
                 WHERE seq = ?1 AND lease_owner = ?3 AND published_at IS NULL AND dead_at IS NULL",
            )
            .bind(seq)
            .bind(micros(now))
            .bind(owner)
            .execute(&mut *tx)
            .await
            .map_err(db("marking messages published"))?
            .rows_affected();
        }
        tx.commit()
            .await
            .map_err(db("marking messages published"))?;
        Ok(marked)
    }

    async fn record_failure(
        &self,
        owner: &str,
        seq: i64,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<bool> {
        self.count_failure(
            owner,
            seq,
            error,
            "retry_at",
            retry_at,
            "recording a publish failure",
        )
        .await
    }

    async fn dead_letter(
        &self,
        owner: &str,
        seq: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.count_failure(
            owner,
            seq,
            error,
            "dead_at",
            now,
            "dead-lettering a message",
        )
        .await
    }

    async fn release(&self, owner: &str, seqs: &[i64]) -> Result<u64> {
        let result = sqlx::query(
            "UPDATE saga_outbox SET lease_owner = NULL, lease_until = NULL \
             WHERE lease_owner = ?1 AND published_at IS NULL \
               AND (?2 = '[]' OR seq IN (SELECT value FROM json_each(?2)))",
        )
        .bind(owner)
        .bind(json_text(&seqs)?)
        .execute(&self.pool)
        .await
        .map_err(db("releasing claimed messages"))?;
        Ok(result.rows_affected())
    }

    async fn dead_letters(&self, limit_to: usize) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(&format!(
            "SELECT {OUTBOX_COLUMNS}, dead_at FROM saga_outbox WHERE dead_at IS NOT NULL ORDER BY seq LIMIT ?1"
        ))
        .bind(limit(limit_to))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing dead letters"))?;
        rows.iter()
            .map(|row| {
                let record = outbox_record(row)?;
                Ok(DeadLetter {
                    error: record.last_error.clone().unwrap_or_default(),
                    dead_at: time(
                        row.try_get("dead_at")
                            .map_err(db("reading a dead letter"))?,
                    )?,
                    record,
                })
            })
            .collect()
    }

    async fn requeue_dead_letter(&self, seq: i64) -> Result<bool> {
        let result = sqlx::query(
            "UPDATE saga_outbox SET dead_at = NULL, attempts = 0, retry_at = ?2 WHERE seq = ?1 AND dead_at IS NOT NULL",
        )
        .bind(seq)
        .bind(micros(clock::now()))
        .execute(&self.pool)
        .await
        .map_err(db("requeueing a dead letter"))?;
        self.wake_relays();
        Ok(result.rows_affected() == 1)
    }

    async fn is_pending(&self, tx: &mut Self::Tx, message_id: MessageId) -> Result<bool> {
        let pending: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM saga_outbox WHERE message_id = ?1 AND published_at IS NULL AND dead_at IS NULL LIMIT 1",
        )
        .bind(message_id.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db("looking for a pending message"))?;
        Ok(pending.is_some())
    }

    async fn stats(&self) -> Result<OutboxStats> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(published_at IS NULL AND dead_at IS NULL), 0) AS pending, \
                    COALESCE(SUM(dead_at IS NOT NULL), 0) AS dead, \
                    MIN(CASE WHEN published_at IS NULL AND dead_at IS NULL THEN created_at END) AS oldest \
             FROM saga_outbox",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db("reading outbox stats"))?;
        let field = |e| db("reading outbox stats")(e);
        let pending: i64 = row.try_get("pending").map_err(field)?;
        let dead: i64 = row.try_get("dead").map_err(field)?;
        Ok(OutboxStats {
            pending: pending.max(0) as u64,
            dead: dead.max(0) as u64,
            oldest_pending: opt_time(row.try_get("oldest").map_err(field)?)?,
        })
    }

    async fn purge_published(&self, before: DateTime<Utc>, limit_to: usize) -> Result<u64> {
        let result = sqlx::query(
            "DELETE FROM saga_outbox WHERE seq IN (SELECT seq FROM saga_outbox \
             WHERE published_at IS NOT NULL AND published_at < ?1 ORDER BY seq LIMIT ?2)",
        )
        .bind(micros(before))
        .bind(limit(limit_to))
        .execute(&self.pool)
        .await
        .map_err(db("purging published messages"))?;
        Ok(result.rows_affected())
    }

    async fn wait_for_messages(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.committed.notified()).await;
    }
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn begin_processing(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        message_id: MessageId,
        now: DateTime<Utc>,
    ) -> Result<Begin> {
        let inserted = sqlx::query(
            "INSERT INTO saga_inbox (consumer, message_id, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(message_id.to_string())
        .bind(micros(now))
        .execute(&mut **tx)
        .await
        .map_err(db("recording a consumed message"))?;
        if inserted.rows_affected() == 1 {
            return Ok(Begin::Fresh);
        }
        let row = sqlx::query(
            "SELECT reply_channel, reply_headers, reply_payload FROM saga_inbox WHERE consumer = ?1 AND message_id = ?2",
        )
        .bind(consumer)
        .bind(message_id.to_string())
        .fetch_one(&mut **tx)
        .await
        .map_err(db("reading a consumed message"))?;
        Ok(Begin::Duplicate {
            reply: stored_reply(&row)?,
        })
    }

    async fn save_reply(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        message_id: MessageId,
        reply: &OutboxEntry,
    ) -> Result<()> {
        let (channel, headers, payload) = encode(reply);
        let updated = sqlx::query(
            "UPDATE saga_inbox SET reply_channel = ?3, reply_headers = ?4, reply_payload = ?5 \
             WHERE consumer = ?1 AND message_id = ?2",
        )
        .bind(consumer)
        .bind(message_id.to_string())
        .bind(channel)
        .bind(headers.to_string())
        .bind(payload)
        .execute(&mut **tx)
        .await
        .map_err(db("storing a reply"))?;
        if updated.rows_affected() == 0 {
            return Err(Error::NotFound(format!(
                "no inbox record of message {message_id} for `{consumer}`"
            )));
        }
        Ok(())
    }

    async fn claim_step(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        saga_id: SagaId,
        step: u32,
        mark: StepMark,
        now: DateTime<Utc>,
    ) -> Result<StepClaim> {
        let inserted = sqlx::query(
            "INSERT INTO saga_step_marks (consumer, saga_id, step, mark, created_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(saga_id.to_string())
        .bind(i64::from(step))
        .bind(mark.as_str())
        .bind(micros(now))
        .execute(&mut **tx)
        .await
        .map_err(db("claiming a step mark"))?;
        if inserted.rows_affected() == 1 {
            return Ok(StepClaim::Inserted);
        }
        let row = sqlx::query(
            "SELECT mark, reply_channel, reply_headers, reply_payload FROM saga_step_marks \
             WHERE consumer = ?1 AND saga_id = ?2 AND step = ?3",
        )
        .bind(consumer)
        .bind(saga_id.to_string())
        .bind(i64::from(step))
        .fetch_one(&mut **tx)
        .await
        .map_err(db("reading a step mark"))?;
        let text: String = row.try_get("mark").map_err(db("reading a step mark"))?;
        Ok(StepClaim::Existing {
            mark: StepMark::parse(&text)
                .ok_or_else(|| Error::InvalidState(format!("unknown step mark {text:?}")))?,
            reply: stored_reply(&row)?,
        })
    }

    async fn update_step(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        saga_id: SagaId,
        step: u32,
        mark: StepMark,
        reply: Option<&OutboxEntry>,
    ) -> Result<()> {
        let (channel, headers, payload) = match reply.map(encode) {
            Some((c, h, p)) => (Some(c), Some(h.to_string()), Some(p)),
            None => (None, None, None),
        };
        sqlx::query(
            "INSERT INTO saga_step_marks (consumer, saga_id, step, mark, reply_channel, reply_headers, reply_payload, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
             ON CONFLICT (consumer, saga_id, step) DO UPDATE SET mark = excluded.mark, \
             reply_channel = excluded.reply_channel, reply_headers = excluded.reply_headers, \
             reply_payload = excluded.reply_payload",
        )
        .bind(consumer)
        .bind(saga_id.to_string())
        .bind(i64::from(step))
        .bind(mark.as_str())
        .bind(channel)
        .bind(headers)
        .bind(payload)
        .bind(micros(clock::now()))
        .execute(&mut **tx)
        .await
        .map_err(db("updating a step mark"))?;
        Ok(())
    }

    async fn purge_expired(&self, before: DateTime<Utc>, limit_to: usize) -> Result<u64> {
        let from_inbox = sqlx::query(
            "DELETE FROM saga_inbox WHERE rowid IN (SELECT rowid FROM saga_inbox WHERE created_at < ?1 LIMIT ?2)",
        )
        .bind(micros(before))
        .bind(limit(limit_to))
        .execute(&self.pool)
        .await
        .map_err(db("purging consumed messages"))?
        .rows_affected();
        let room = limit(limit_to).saturating_sub(i64::try_from(from_inbox).unwrap_or(i64::MAX));
        let from_marks = sqlx::query(
            "DELETE FROM saga_step_marks WHERE rowid IN (SELECT rowid FROM saga_step_marks WHERE created_at < ?1 LIMIT ?2)",
        )
        .bind(micros(before))
        .bind(room)
        .execute(&self.pool)
        .await
        .map_err(db("purging step marks"))?
        .rows_affected();
        sqlx::query(
            "INSERT INTO saga_marks_purged (id, before) VALUES (1, ?1) \
             ON CONFLICT (id) DO UPDATE SET before = max(before, excluded.before)",
        )
        .bind(micros(before))
        .execute(&self.pool)
        .await
        .map_err(db("remembering the step-mark purge"))?;
        Ok(from_inbox + from_marks)
    }

    async fn marks_purged_before(&self, tx: &mut Self::Tx) -> Result<Option<DateTime<Utc>>> {
        let before: Option<i64> =
            sqlx::query_scalar("SELECT before FROM saga_marks_purged WHERE id = 1")
                .fetch_optional(&mut **tx)
                .await
                .map_err(db("reading the step-mark purge"))?;
        opt_time(before)
    }
}

#[async_trait]
impl SagaStore for SqliteStore {
    async fn create(&self, tx: &mut Self::Tx, saga: &SagaInstance) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO saga_instances ({SAGA_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 0, ?14, ?15)"
        ))
        .bind(saga.id.to_string())
        .bind(&saga.saga_type)
        .bind(saga.state.as_str())
        .bind(i64::from(saga.step))
        .bind(i64::from(saga.attempt))
        .bind(json_text(&saga.data)?)
        .bind(saga.awaiting.map(|m| m.to_string()))
        .bind(saga.wake_at.map(micros))
        .bind(&saga.lease_owner)
        .bind(saga.lease_until.map(micros))
        .bind(&saga.error)
        .bind(&saga.correlation_id)
        .bind(json_text(&saga.history)?)
        .bind(micros(saga.created_at))
        .bind(micros(saga.updated_at))
        .execute(&mut **tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => Error::InvalidState(format!("saga {} already exists", saga.id)),
            _ => db("creating a saga")(e),
        })?;
        Ok(())
    }

    async fn load(&self, tx: &mut Self::Tx, id: SagaId) -> Result<Option<SagaInstance>> {
        let row = sqlx::query(&format!(
            "SELECT {SAGA_COLUMNS} FROM saga_instances WHERE id = ?1"
        ))
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db("loading a saga"))?;
        row.as_ref().map(saga_row).transpose()
    }

    async fn save(&self, tx: &mut Self::Tx, saga: &SagaInstance) -> Result<()> {
        let updated = sqlx::query(
            "UPDATE saga_instances SET state = ?3, step = ?4, attempt = ?5, data = ?6, awaiting = ?7, wake_at = ?8, \
             error = ?9, correlation_id = ?10, history = ?11, updated_at = ?12, version = version + 1, \
             lease_owner = NULL, lease_until = NULL WHERE id = ?1 AND version = ?2",
        )
        .bind(saga.id.to_string())
        .bind(i64::try_from(saga.version).unwrap_or(i64::MAX))
        .bind(saga.state.as_str())
        .bind(i64::from(saga.step))
        .bind(i64::from(saga.attempt))
        .bind(json_text(&saga.data)?)
        .bind(saga.awaiting.map(|m| m.to_string()))
        .bind(saga.wake_at.map(micros))
        .bind(&saga.error)
        .bind(&saga.correlation_id)
        .bind(json_text(&saga.history)?)
        .bind(micros(saga.updated_at))
        .execute(&mut **tx)
        .await
        .map_err(db("saving a saga"))?;
        if updated.rows_affected() == 1 {
            return Ok(());
        }
        let exists = sqlx::query("SELECT 1 FROM saga_instances WHERE id = ?1")
            .bind(saga.id.to_string())
            .fetch_optional(&mut **tx)
            .await
            .map_err(db("checking a saga"))?;
        Err(match exists {
            Some(_) => Error::Conflict {
                saga_id: saga.id,
                expected: saga.version,
            },
            None => Error::NotFound(format!("saga {}", saga.id)),
        })
    }

    async fn get(&self, id: SagaId) -> Result<Option<SagaInstance>> {
        let row = sqlx::query(&format!(
            "SELECT {SAGA_COLUMNS} FROM saga_instances WHERE id = ?1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a saga"))?;
        row.as_ref().map(saga_row).transpose()
    }

    async fn claim_due(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
        limit_to: usize,
    ) -> Result<Vec<SagaId>> {
        let rows = sqlx::query(
            "UPDATE saga_instances SET lease_owner = ?1, lease_until = ?2 WHERE id IN ( \
                 SELECT id FROM saga_instances WHERE state IN ('RUNNING', 'COMPENSATING') AND wake_at <= ?3 \
                   AND (lease_until IS NULL OR lease_until <= ?3) ORDER BY wake_at LIMIT ?4) \
             RETURNING id, wake_at",
        )
        .bind(owner)
        .bind(micros(now + clock::to_chrono(lease)))
        .bind(micros(now))
        .bind(limit(limit_to))
        .fetch_all(&self.pool)
        .await
        .map_err(db("claiming due sagas"))?;
        let mut due = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id").map_err(db("reading due sagas"))?;
            let wake_at: Option<i64> = row.try_get("wake_at").map_err(db("reading due sagas"))?;
            due.push((wake_at, uuid::<SagaId>(&id)?));
        }
        due.sort();
        Ok(due.into_iter().map(|(_, id)| id).collect())
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>> {
        let rows = sqlx::query(&format!(
            "SELECT {SAGA_COLUMNS} FROM saga_instances WHERE (?1 IS NULL OR state = ?1) \
             AND (?2 IS NULL OR saga_type = ?2) AND (?4 IS NULL OR created_at < ?4) \
             ORDER BY created_at, id LIMIT ?3"
        ))
        .bind(filter.state.map(SagaState::as_str))
        .bind(&filter.saga_type)
        .bind(if filter.limit == 0 {
            -1
        } else {
            limit(filter.limit)
        })
        .bind(filter.started_before.map(micros))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing sagas"))?;
        rows.iter().map(saga_row).collect()
    }

    async fn append_log(&self, tx: &mut Self::Tx, entry: &SagaLogEntry) -> Result<()> {
        sqlx::query(
            "INSERT INTO saga_log (correlation_id, consumer, message_id, message_type, status, emitted, error, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(&entry.correlation_id)
        .bind(&entry.consumer)
        .bind(entry.message_id.to_string())
        .bind(&entry.message_type)
        .bind(entry.status.as_str())
        .bind(json_text(&entry.emitted)?)
        .bind(&entry.error)
        .bind(micros(entry.at))
        .execute(&mut **tx)
        .await
        .map_err(db("appending to the saga log"))?;
        Ok(())
    }

    async fn purge_finished(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let result = sqlx::query(
            "DELETE FROM saga_instances WHERE id IN (SELECT id FROM saga_instances \
             WHERE state IN ('COMPLETED', 'COMPENSATED') AND updated_at < ?1 \
             ORDER BY updated_at LIMIT ?2)",
        )
        .bind(micros(before))
        .bind(self::limit(limit))
        .execute(&self.pool)
        .await
        .map_err(db("purging finished sagas"))?;
        Ok(result.rows_affected())
    }

    async fn purge_log(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let result = sqlx::query(
            "DELETE FROM saga_log WHERE seq IN (SELECT seq FROM saga_log WHERE at < ?1 \
             ORDER BY at LIMIT ?2)",
        )
        .bind(micros(before))
        .bind(self::limit(limit))
        .execute(&self.pool)
        .await
        .map_err(db("purging the saga log"))?;
        Ok(result.rows_affected())
    }

    async fn log(&self, correlation_id: &str) -> Result<Vec<SagaLogEntry>> {
        let rows = sqlx::query(
            "SELECT correlation_id, consumer, message_id, message_type, status, emitted, error, at \
             FROM saga_log WHERE correlation_id = ?1 ORDER BY seq",
        )
        .bind(correlation_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the saga log"))?;
        rows.iter()
            .map(|row| {
                let field = |e| db("reading a saga log row")(e);
                let status: String = row.try_get("status").map_err(field)?;
                let emitted: String = row.try_get("emitted").map_err(field)?;
                let message_id: String = row.try_get("message_id").map_err(field)?;
                Ok(SagaLogEntry {
                    correlation_id: row.try_get("correlation_id").map_err(field)?,
                    consumer: row.try_get("consumer").map_err(field)?,
                    message_id: uuid(&message_id)?,
                    message_type: row.try_get("message_type").map_err(field)?,
                    status: LogStatus::parse(&status).ok_or_else(|| {
                        Error::InvalidState(format!("unknown log status {status:?}"))
                    })?,
                    emitted: serde_json::from_str(&emitted)?,
                    error: row.try_get("error").map_err(field)?,
                    at: time(row.try_get("at").map_err(field)?)?,
                })
            })
            .collect()
    }
}
