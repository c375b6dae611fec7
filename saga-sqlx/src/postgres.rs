//! [`PostgresStore`]: every saga-core store on one PostgreSQL schema.

use std::fmt;
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
use sqlx::postgres::{PgListener, PgPool, PgRow};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::codec::{decode, encode};
use crate::error::{beginning, db};
use crate::schema::validate_identifier;
use crate::uncancelled::uncancelled;

/// The outbox, idempotency and saga stores on one PostgreSQL schema.
///
/// Cheap to clone (the pool is shared). Writes that belong to a business
/// transaction take a [`PostgresTx`](crate::PostgresTx) from [`Transactional::begin`] or from the
/// same pool: your business rows commit with them.
/// After a commit that enqueued messages, relays waiting in
/// [`OutboxStore::wait_for_messages`] wake up through LISTEN/NOTIFY: one
/// notification per committing transaction, whatever the number of rows.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    schema: String,
    listener: Arc<Mutex<Option<PgListener>>>,
    clock: Arc<ServerClock>,
}

/// How often the server's clock is read again.
const CLOCK_REFRESH: Duration = Duration::from_secs(30);

/// The server's clock, as an offset from this process's: every time the
/// store writes or compares (leases, wake-up times, deadlines) comes from
/// it, so processes on hosts whose clocks disagree still agree.
#[derive(Debug, Default)]
struct ServerClock {
    /// Server time minus process time, in microseconds.
    offset_micros: AtomicI64,
    /// When the offset was last measured.
    measured: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl ServerClock {
    fn now(&self) -> DateTime<Utc> {
        clock::now() + chrono::Duration::microseconds(self.offset_micros.load(Ordering::Relaxed))
    }

    /// Whether the offset was ever measured.
    fn known(&self) -> bool {
        self.measured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    fn due(&self) -> bool {
        self.measured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none_or(|at| at.elapsed() >= CLOCK_REFRESH)
    }

    /// Reads the server's clock on `conn`, halfway through the round trip.
    async fn measure(&self, conn: &mut sqlx::PgConnection) -> Result<()> {
        let before = clock::now();
        let server: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(conn)
            .await
            .map_err(db("reading the server's clock"))?;
        let after = clock::now();
        let local = before + (after - before) / 2;
        let offset = (server - local).num_microseconds().unwrap_or(0);
        self.offset_micros.store(offset, Ordering::Relaxed);
        *self
            .measured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tokio::time::Instant::now());
        Ok(())
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// Reads the optional stored reply of an inbox or step-mark row.
fn stored_reply(row: &PgRow) -> Result<Option<OutboxEntry>> {
    let channel: Option<String> = row
        .try_get("reply_channel")
        .map_err(db("reading a stored reply"))?;
    let Some(channel) = channel else {
        return Ok(None);
    };
    let headers: serde_json::Value = row
        .try_get("reply_headers")
        .map_err(db("reading a stored reply"))?;
    let payload: Vec<u8> = row
        .try_get("reply_payload")
        .map_err(db("reading a stored reply"))?;
    decode(channel, headers, payload).map(Some)
}

fn outbox_record(row: &PgRow) -> Result<OutboxRecord> {
    let get = db("reading an outbox row");
    let seq: i64 = row.try_get("seq").map_err(db("reading an outbox row"))?;
    let entry = decode(
        row.try_get("channel")
            .map_err(db("reading an outbox row"))?,
        row.try_get("headers")
            .map_err(db("reading an outbox row"))?,
        row.try_get("payload")
            .map_err(db("reading an outbox row"))?,
    )?;
    let attempts: i32 = row
        .try_get("attempts")
        .map_err(db("reading an outbox row"))?;
    Ok(OutboxRecord {
        seq,
        entry,
        attempts: attempts.max(0) as u32,
        last_error: row
            .try_get("last_error")
            .map_err(db("reading an outbox row"))?,
        created_at: row.try_get("created_at").map_err(get)?,
    })
}

fn saga_row(row: &PgRow) -> Result<SagaInstance> {
    let field = |e| db("reading a saga row")(e);
    let state: String = row.try_get("state").map_err(field)?;
    let step: i32 = row.try_get("step").map_err(field)?;
    let attempt: i32 = row.try_get("attempt").map_err(field)?;
    let version: i64 = row.try_get("version").map_err(field)?;
    let history: serde_json::Value = row.try_get("history").map_err(field)?;
    Ok(SagaInstance {
        id: SagaId::from_uuid(row.try_get("id").map_err(field)?),
        saga_type: row.try_get("saga_type").map_err(field)?,
        state: SagaState::parse(&state)
            .ok_or_else(|| Error::InvalidState(format!("unknown saga state {state:?}")))?,
        step: step.max(0) as u32,
        attempt: attempt.max(0) as u32,
        data: row.try_get("data").map_err(field)?,
        awaiting: row
            .try_get::<Option<Uuid>, _>("awaiting")
            .map_err(field)?
            .map(MessageId::from_uuid),
        wake_at: row.try_get("wake_at").map_err(field)?,
        lease_owner: row.try_get("lease_owner").map_err(field)?,
        lease_until: row.try_get("lease_until").map_err(field)?,
        error: row.try_get("error").map_err(field)?,
        correlation_id: row.try_get("correlation_id").map_err(field)?,
        history: serde_json::from_value(history)?,
        version: version.max(0) as u64,
        created_at: row.try_get("created_at").map_err(field)?,
        updated_at: row.try_get("updated_at").map_err(field)?,
    })
}

const SAGA_COLUMNS: &str = "id, saga_type, state, step, attempt, data, awaiting, wake_at, lease_owner, \
     lease_until, error, correlation_id, history, version, created_at, updated_at";

const OUTBOX_COLUMNS: &str = "seq, channel, headers, payload, attempts, last_error, created_at";

impl PostgresStore {
    /// A store in schema `saga` of `pool`'s database.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            schema: "saga".to_owned(),
            listener: Arc::default(),
            clock: Arc::default(),
        }
    }

    /// A store in schema `schema` (validated: lowercase letters, digits, `_`).
    pub fn with_schema(pool: PgPool, schema: &str) -> Result<Self> {
        validate_identifier(schema)?;
        Ok(Self {
            pool,
            schema: schema.to_owned(),
            listener: Arc::default(),
            clock: Arc::default(),
        })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Creates the schema if needed and applies the embedded migrations that
    /// it lacks. Call once at start-up; running it again changes nothing.
    pub async fn migrate(&self) -> Result<()> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(db("connecting to migrate"))?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {}", self.schema))
            .execute(&mut *conn)
            .await
            .map_err(db("creating the schema"))?;
        sqlx::query(&format!("SET search_path TO {}", self.schema))
            .execute(&mut *conn)
            .await
            .map_err(db("selecting the schema"))?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        // Migrations the store does not know are the application's own.
        migrator.set_ignore_missing(true);
        // `run_direct` takes the connection itself: `run` goes through
        // `Acquire`, whose higher-ranked bound makes this future not `Send`
        // (sqlx's own workaround, hidden from its docs).
        let result = migrator.run_direct(&mut *conn).await;
        // The first reading of the server's clock, before anything depends on it.
        let measured = self.clock.measure(&mut conn).await;
        let reset = sqlx::query("RESET search_path").execute(&mut *conn).await;
        result.map_err(|e| Error::backend("applying migrations", false, e))?;
        reset.map_err(db("resetting the search path"))?;
        measured
    }

    /// The LISTEN/NOTIFY channel of this store's outbox.
    pub fn notify_channel(&self) -> String {
        format!("{}_saga_outbox", self.schema)
    }

    /// A schema-qualified table name.
    fn t(&self, table: &str) -> String {
        format!("{}.{table}", self.schema)
    }
}

impl PostgresStore {
    /// Measures the server's clock on a connection outside the pool, closed
    /// afterwards: for the first reading, when the pool has none idle.
    async fn measure_apart(&self) -> Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect_with(&self.pool.connect_options())
            .await
            .map_err(db("connecting to read the server's clock"))?;
        let measured = self.clock.measure(&mut conn).await;
        let _ = conn.close().await;
        measured
    }

    /// A listener on this store's channel, or `None` (the caller polls) if it cannot listen.
    async fn listen(&self) -> Option<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await.ok()?;
        listener.listen(&self.notify_channel()).await.ok()?;
        Some(listener)
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
            "UPDATE {} SET attempts = attempts + 1, last_error = $2, {column} = $3, \
             lease_owner = NULL, lease_until = NULL \
             WHERE seq = $1 AND lease_owner = $4 AND published_at IS NULL AND dead_at IS NULL",
            self.t("saga_outbox")
        ))
        .bind(seq)
        .bind(error)
        .bind(at)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db(context))?;
        Ok(result.rows_affected() == 1)
    }
}

#[async_trait]
impl Transactional for PostgresStore {
    type Tx = crate::PostgresTx;

    /// `BEGIN` and `COMMIT` run to their end even when the caller's future
    /// is dropped (see the `uncancelled` module).
    async fn begin(&self) -> Result<Self::Tx> {
        let pool = self.pool.clone();
        uncancelled(async move { pool.begin().await })
            .await?
            .map_err(beginning)
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        uncancelled(tx.commit()).await?.map_err(db("committing"))
    }

    /// The server's clock (`clock_timestamp()`), read at most every 30 s on
    /// an idle connection of the pool (never waiting for one: a caller may
    /// hold the last) and kept as an offset from the process clock. The
    /// first reading takes a connection of its own when the pool has none
    /// idle: until then the offset is unknown, and the host's clock may be
    /// minutes off.
    async fn now(&self) -> DateTime<Utc> {
        if self.clock.due() {
            let measured = match self.pool.try_acquire() {
                Some(mut conn) => self.clock.measure(&mut conn).await,
                None if !self.clock.known() => self.measure_apart().await,
                None => Ok(()),
            };
            if let Err(error) = measured {
                tracing::warn!(%error, "reading PostgreSQL's clock failed; the last offset stays");
            }
        }
        self.clock.now()
    }
}

#[async_trait]
impl OutboxStore for PostgresStore {
    async fn enqueue(&self, tx: &mut Self::Tx, entries: &[OutboxEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let now = self.now().await;
        let mut channels = Vec::with_capacity(entries.len());
        let mut ids = Vec::with_capacity(entries.len());
        let mut keys = Vec::with_capacity(entries.len());
        let mut headers = Vec::with_capacity(entries.len());
        let mut payloads = Vec::with_capacity(entries.len());
        for entry in entries {
            let (channel, h, payload) = encode(entry);
            channels.push(channel);
            ids.push(entry.message.id.as_uuid());
            keys.push(entry.message.ordering_key.clone());
            headers.push(h);
            payloads.push(payload);
        }
        // Order means commit order, and a relay takes a key's line in `seq`
        // order: the writers of one key must commit in the order they draw
        // their `seq`s. Each takes the key's lock (released at its commit)
        // before it draws one, so a second writer of the key waits for the
        // first to commit. Keys are locked in sorted order, so writers of
        // the same keys never wait for each other in a circle. The same
        // statement raises the relays' notification, delivered at commit
        // (identical ones of one transaction fold into one).
        sqlx::query(
            "SELECT pg_notify($1, ''), (SELECT count(*) FROM (\
               SELECT pg_advisory_xact_lock(hashtext($2), hashtext(k)) \
               FROM (SELECT DISTINCT k FROM UNNEST($3::text[]) AS u(k) WHERE k IS NOT NULL ORDER BY k) AS keys\
             ) AS locked)",
        )
        .bind(self.notify_channel())
        .bind(self.t("saga_outbox"))
        .bind(&keys)
        .execute(&mut **tx)
        .await
        .map_err(db("locking the messages' ordering keys"))?;
        sqlx::query(&format!(
            "INSERT INTO {} (channel, message_id, ordering_key, headers, payload, created_at, retry_at) \
             SELECT c, i, k, h, p, $6, $6 FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::jsonb[], $5::bytea[]) \
             WITH ORDINALITY AS u(c, i, k, h, p, n) ORDER BY n",
            self.t("saga_outbox")
        ))
        .bind(&channels)
        .bind(&ids)
        .bind(&keys)
        .bind(&headers)
        .bind(&payloads)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(db("enqueueing outbox messages"))?;
        Ok(())
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<OutboxRecord>> {
        let outbox = self.t("saga_outbox");
        // Only the head of each key's line: a record whose key has an older
        // pending record is never taken (the claim contract). Written as "the
        // key's smallest pending seq" so the planner always probes the
        // (ordering_key, seq) index: the NOT EXISTS form, on a table not yet
        // analyzed, scanned the seq index per candidate (25 s per claim at 20k rows).
        //
        // Nor is a record taken while its key has one in flight (leased):
        // two writers commit in another order than their seqs, so an older
        // record can become the head after a newer one was claimed, and two
        // relays would then publish the key at once. Claims take a lock of
        // their own first, so that each sees the leases of the one before
        // (a claim's snapshot is taken when its statement starts).
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&outbox)
            .execute(&mut *tx)
            .await
            .map_err(db("locking the outbox for a claim"))?;
        let rows = sqlx::query(&format!(
            "WITH picked AS ( \
                 SELECT o.seq FROM {outbox} o \
                 WHERE o.published_at IS NULL AND o.dead_at IS NULL AND o.retry_at <= $1 \
                   AND (o.lease_until IS NULL OR o.lease_until <= $1) \
                   AND (o.ordering_key IS NULL OR (o.seq = (SELECT min(p.seq) FROM {outbox} p \
                       WHERE p.ordering_key = o.ordering_key \
                         AND p.published_at IS NULL AND p.dead_at IS NULL) \
                     AND NOT EXISTS (SELECT 1 FROM {outbox} l \
                       WHERE l.ordering_key = o.ordering_key AND l.published_at IS NULL \
                         AND l.dead_at IS NULL AND l.lease_until > $1))) \
                 ORDER BY o.seq LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE {outbox} o SET lease_owner = $3, lease_until = $4 FROM picked \
             WHERE o.seq = picked.seq RETURNING o.seq, o.channel, o.headers, o.payload, o.attempts, \
             o.last_error, o.created_at"
        ))
        .bind(request.now)
        .bind(i64::try_from(request.limit).unwrap_or(i64::MAX))
        .bind(&request.owner)
        .bind(request.now + clock::to_chrono(request.lease))
        .fetch_all(&mut *tx)
        .await
        .map_err(db("claiming outbox messages"))?;
        self.commit(tx).await?;
        let mut records = rows.iter().map(outbox_record).collect::<Result<Vec<_>>>()?;
        records.sort_by_key(|r| r.seq);
        Ok(records)
    }

    async fn mark_published(&self, owner: &str, seqs: &[i64], now: DateTime<Utc>) -> Result<u64> {
        let result = sqlx::query(&format!(
            "UPDATE {} SET published_at = $2, lease_owner = NULL, lease_until = NULL \
             WHERE seq = ANY($1) AND lease_owner = $3 AND published_at IS NULL AND dead_at IS NULL",
            self.t("saga_outbox")
        ))
        .bind(seqs)
        .bind(now)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db("marking messages published"))?;
        Ok(result.rows_affected())
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
        let result = sqlx::query(&format!(
            "UPDATE {} SET lease_owner = NULL, lease_until = NULL \
             WHERE lease_owner = $1 AND published_at IS NULL AND (cardinality($2::bigint[]) = 0 OR seq = ANY($2))",
            self.t("saga_outbox")
        ))
        .bind(owner)
        .bind(seqs)
        .execute(&self.pool)
        .await
        .map_err(db("releasing claimed messages"))?;
        Ok(result.rows_affected())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(&format!(
            "SELECT {OUTBOX_COLUMNS}, dead_at FROM {} WHERE dead_at IS NOT NULL ORDER BY seq LIMIT $1",
            self.t("saga_outbox")
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing dead letters"))?;
        rows.iter()
            .map(|row| {
                let record = outbox_record(row)?;
                Ok(DeadLetter {
                    error: record.last_error.clone().unwrap_or_default(),
                    dead_at: row
                        .try_get("dead_at")
                        .map_err(db("reading a dead letter"))?,
                    record,
                })
            })
            .collect()
    }

    async fn requeue_dead_letter(&self, seq: i64) -> Result<bool> {
        let result = sqlx::query(&format!(
            "UPDATE {} SET dead_at = NULL, attempts = 0, retry_at = $2 WHERE seq = $1 AND dead_at IS NOT NULL",
            self.t("saga_outbox")
        ))
        .bind(seq)
        .bind(self.now().await)
        .execute(&self.pool)
        .await
        .map_err(db("requeueing a dead letter"))?;
        Ok(result.rows_affected() == 1)
    }

    async fn is_pending(&self, tx: &mut Self::Tx, message_id: MessageId) -> Result<bool> {
        let pending: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM {} WHERE message_id = $1 AND published_at IS NULL AND dead_at IS NULL LIMIT 1",
            self.t("saga_outbox")
        ))
        .bind(message_id.as_uuid())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db("looking for a pending message"))?;
        Ok(pending.is_some())
    }

    async fn stats(&self) -> Result<OutboxStats> {
        let row = sqlx::query(&format!(
            "SELECT count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL) AS pending, \
                    count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead, \
                    min(created_at) FILTER (WHERE published_at IS NULL AND dead_at IS NULL) AS oldest \
             FROM {}",
            self.t("saga_outbox")
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(db("reading outbox stats"))?;
        let pending: i64 = row.try_get("pending").map_err(db("reading outbox stats"))?;
        let dead: i64 = row.try_get("dead").map_err(db("reading outbox stats"))?;
        Ok(OutboxStats {
            pending: pending.max(0) as u64,
            dead: dead.max(0) as u64,
            oldest_pending: row.try_get("oldest").map_err(db("reading outbox stats"))?,
        })
    }

    async fn wait_for_messages(&self, max_wait: Duration) {
        let deadline = tokio::time::Instant::now() + max_wait;
        let listened = tokio::time::timeout_at(deadline, async {
            let mut listener = self.listener.lock().await;
            if listener.is_none() {
                *listener = self.listen().await;
            }
            match listener.as_mut() {
                Some(active) => {
                    if let Err(error) = active.recv().await {
                        tracing::warn!(%error, "LISTEN connection failed; relays poll until it is back");
                        *listener = None;
                    }
                    true
                }
                None => false,
            }
        })
        .await;
        if listened != Ok(true) {
            // No notification came, or none can: wait out the poll interval.
            tokio::time::sleep_until(deadline).await;
        }
    }

    async fn purge_published(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let outbox = self.t("saga_outbox");
        let result = sqlx::query(&format!(
            "DELETE FROM {outbox} WHERE seq IN (SELECT seq FROM {outbox} \
             WHERE published_at IS NOT NULL AND published_at < $1 ORDER BY seq LIMIT $2)"
        ))
        .bind(before)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(db("purging published messages"))?;
        Ok(result.rows_affected())
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn begin_processing(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        message_id: MessageId,
        now: DateTime<Utc>,
    ) -> Result<Begin> {
        let inbox = self.t("saga_inbox");
        // A concurrent first delivery holds the key; this insert waits for it
        // and then finds the row (or, if it rolled back, takes its place).
        let inserted = sqlx::query(&format!(
            "INSERT INTO {inbox} (consumer, message_id, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
        ))
        .bind(consumer)
        .bind(message_id.as_uuid())
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(db("recording a consumed message"))?;
        if inserted.rows_affected() == 1 {
            return Ok(Begin::Fresh);
        }
        let row = sqlx::query(&format!(
            "SELECT reply_channel, reply_headers, reply_payload FROM {inbox} WHERE consumer = $1 AND message_id = $2"
        ))
        .bind(consumer)
        .bind(message_id.as_uuid())
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
        let updated = sqlx::query(&format!(
            "UPDATE {} SET reply_channel = $3, reply_headers = $4, reply_payload = $5 \
             WHERE consumer = $1 AND message_id = $2",
            self.t("saga_inbox")
        ))
        .bind(consumer)
        .bind(message_id.as_uuid())
        .bind(channel)
        .bind(headers)
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
        let marks = self.t("saga_step_marks");
        let inserted = sqlx::query(&format!(
            "INSERT INTO {marks} (consumer, saga_id, step, mark, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING"
        ))
        .bind(consumer)
        .bind(saga_id.as_uuid())
        .bind(step as i32)
        .bind(mark.as_str())
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(db("claiming a step mark"))?;
        if inserted.rows_affected() == 1 {
            return Ok(StepClaim::Inserted);
        }
        let row = sqlx::query(&format!(
            "SELECT mark, reply_channel, reply_headers, reply_payload FROM {marks} \
             WHERE consumer = $1 AND saga_id = $2 AND step = $3 FOR UPDATE"
        ))
        .bind(consumer)
        .bind(saga_id.as_uuid())
        .bind(step as i32)
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
            Some((c, h, p)) => (Some(c), Some(h), Some(p)),
            None => (None, None, None),
        };
        sqlx::query(&format!(
            "INSERT INTO {} (consumer, saga_id, step, mark, reply_channel, reply_headers, reply_payload, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (consumer, saga_id, step) DO UPDATE SET mark = EXCLUDED.mark, \
             reply_channel = EXCLUDED.reply_channel, reply_headers = EXCLUDED.reply_headers, \
             reply_payload = EXCLUDED.reply_payload",
            self.t("saga_step_marks")
        ))
        .bind(consumer)
        .bind(saga_id.as_uuid())
        .bind(step as i32)
        .bind(mark.as_str())
        .bind(channel)
        .bind(headers)
        .bind(payload)
        .bind(self.now().await)
        .execute(&mut **tx)
        .await
        .map_err(db("updating a step mark"))?;
        Ok(())
    }

    async fn purge_expired(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let inbox = self.t("saga_inbox");
        let marks = self.t("saga_step_marks");
        let from_inbox = sqlx::query(&format!(
            "DELETE FROM {inbox} WHERE (consumer, message_id) IN \
             (SELECT consumer, message_id FROM {inbox} WHERE created_at < $1 LIMIT $2)"
        ))
        .bind(before)
        .bind(limit)
        .execute(&self.pool)
        .await
        .map_err(db("purging consumed messages"))?
        .rows_affected();
        let room = limit.saturating_sub(i64::try_from(from_inbox).unwrap_or(i64::MAX));
        let from_marks = sqlx::query(&format!(
            "DELETE FROM {marks} WHERE (consumer, saga_id, step) IN \
             (SELECT consumer, saga_id, step FROM {marks} WHERE created_at < $1 LIMIT $2)"
        ))
        .bind(before)
        .bind(room)
        .execute(&self.pool)
        .await
        .map_err(db("purging step marks"))?
        .rows_affected();
        sqlx::query(&format!(
            "INSERT INTO {purged} (id, before) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET before = GREATEST({purged}.before, EXCLUDED.before)",
            purged = self.t("saga_marks_purged")
        ))
        .bind(before)
        .execute(&self.pool)
        .await
        .map_err(db("remembering the step-mark purge"))?;
        Ok(from_inbox + from_marks)
    }

    async fn marks_purged_before(&self, tx: &mut Self::Tx) -> Result<Option<DateTime<Utc>>> {
        sqlx::query_scalar(&format!(
            "SELECT before FROM {} WHERE id = 1",
            self.t("saga_marks_purged")
        ))
        .fetch_optional(&mut **tx)
        .await
        .map_err(db("reading the step-mark purge"))
    }
}

#[async_trait]
impl SagaStore for PostgresStore {
    async fn create(&self, tx: &mut Self::Tx, saga: &SagaInstance) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO {} ({SAGA_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 0, $14, $15)",
            self.t("saga_instances")
        ))
        .bind(saga.id.as_uuid())
        .bind(&saga.saga_type)
        .bind(saga.state.as_str())
        .bind(saga.step as i32)
        .bind(saga.attempt as i32)
        .bind(&saga.data)
        .bind(saga.awaiting.map(|m| m.as_uuid()))
        .bind(saga.wake_at)
        .bind(&saga.lease_owner)
        .bind(saga.lease_until)
        .bind(&saga.error)
        .bind(&saga.correlation_id)
        .bind(serde_json::to_value(&saga.history)?)
        .bind(saga.created_at)
        .bind(saga.updated_at)
        .execute(&mut **tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                Error::InvalidState(format!("saga {} already exists", saga.id))
            }
            _ => db("creating a saga")(e),
        })?;
        Ok(())
    }

    async fn load(&self, tx: &mut Self::Tx, id: SagaId) -> Result<Option<SagaInstance>> {
        let row = sqlx::query(&format!(
            "SELECT {SAGA_COLUMNS} FROM {} WHERE id = $1",
            self.t("saga_instances")
        ))
        .bind(id.as_uuid())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db("loading a saga"))?;
        row.as_ref().map(saga_row).transpose()
    }

    async fn save(&self, tx: &mut Self::Tx, saga: &SagaInstance) -> Result<()> {
        let instances = self.t("saga_instances");
        let updated = sqlx::query(&format!(
            "UPDATE {instances} SET state = $3, step = $4, attempt = $5, data = $6, awaiting = $7, wake_at = $8, \
             error = $9, correlation_id = $10, history = $11, updated_at = $12, version = version + 1, \
             lease_owner = NULL, lease_until = NULL WHERE id = $1 AND version = $2"
        ))
        .bind(saga.id.as_uuid())
        .bind(i64::try_from(saga.version).unwrap_or(i64::MAX))
        .bind(saga.state.as_str())
        .bind(saga.step as i32)
        .bind(saga.attempt as i32)
        .bind(&saga.data)
        .bind(saga.awaiting.map(|m| m.as_uuid()))
        .bind(saga.wake_at)
        .bind(&saga.error)
        .bind(&saga.correlation_id)
        .bind(serde_json::to_value(&saga.history)?)
        .bind(saga.updated_at)
        .execute(&mut **tx)
        .await
        .map_err(db("saving a saga"))?;
        if updated.rows_affected() == 1 {
            return Ok(());
        }
        let exists = sqlx::query(&format!("SELECT 1 FROM {instances} WHERE id = $1"))
            .bind(saga.id.as_uuid())
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
            "SELECT {SAGA_COLUMNS} FROM {} WHERE id = $1",
            self.t("saga_instances")
        ))
        .bind(id.as_uuid())
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
        limit: usize,
    ) -> Result<Vec<SagaId>> {
        let instances = self.t("saga_instances");
        let rows = sqlx::query(&format!(
            "WITH due AS (SELECT id FROM {instances} \
                 WHERE state IN ('RUNNING', 'COMPENSATING') AND wake_at <= $1 \
                   AND (lease_until IS NULL OR lease_until <= $1) \
                 ORDER BY wake_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE {instances} s SET lease_owner = $3, lease_until = $4 FROM due \
             WHERE s.id = due.id RETURNING s.id, s.wake_at"
        ))
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(owner)
        .bind(now + clock::to_chrono(lease))
        .fetch_all(&self.pool)
        .await
        .map_err(db("claiming due sagas"))?;
        let mut due: Vec<(Option<DateTime<Utc>>, Uuid)> = rows
            .iter()
            .map(|r| Ok((r.try_get("wake_at")?, r.try_get("id")?)))
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(db("reading due sagas"))?;
        due.sort();
        Ok(due
            .into_iter()
            .map(|(_, id)| SagaId::from_uuid(id))
            .collect())
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>> {
        let rows = sqlx::query(&format!(
            "SELECT {SAGA_COLUMNS} FROM {} WHERE ($1::text IS NULL OR state = $1) \
             AND ($2::text IS NULL OR saga_type = $2) \
             AND ($4::timestamptz IS NULL OR created_at < $4) ORDER BY created_at, id LIMIT $3",
            self.t("saga_instances")
        ))
        .bind(filter.state.map(SagaState::as_str))
        .bind(&filter.saga_type)
        .bind(if filter.limit == 0 {
            i64::MAX
        } else {
            i64::try_from(filter.limit).unwrap_or(i64::MAX)
        })
        .bind(filter.started_before)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing sagas"))?;
        rows.iter().map(saga_row).collect()
    }

    async fn append_log(&self, tx: &mut Self::Tx, entry: &SagaLogEntry) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO {} (correlation_id, consumer, message_id, message_type, status, emitted, error, at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            self.t("saga_log")
        ))
        .bind(&entry.correlation_id)
        .bind(&entry.consumer)
        .bind(entry.message_id.as_uuid())
        .bind(&entry.message_type)
        .bind(entry.status.as_str())
        .bind(serde_json::to_value(&entry.emitted)?)
        .bind(&entry.error)
        .bind(entry.at)
        .execute(&mut **tx)
        .await
        .map_err(db("appending to the saga log"))?;
        Ok(())
    }

    async fn purge_finished(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let table = self.t("saga_instances");
        let result = sqlx::query(&format!(
            "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} \
             WHERE state IN ('COMPLETED', 'COMPENSATED') AND updated_at < $1 \
             ORDER BY updated_at LIMIT $2)"
        ))
        .bind(before)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(db("purging finished sagas"))?;
        Ok(result.rows_affected())
    }

    async fn purge_log(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let table = self.t("saga_log");
        let result = sqlx::query(&format!(
            "DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} WHERE at < $1 \
             ORDER BY at LIMIT $2)"
        ))
        .bind(before)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(db("purging the saga log"))?;
        Ok(result.rows_affected())
    }

    async fn log(&self, correlation_id: &str) -> Result<Vec<SagaLogEntry>> {
        let rows = sqlx::query(&format!(
            "SELECT correlation_id, consumer, message_id, message_type, status, emitted, error, at \
             FROM {} WHERE correlation_id = $1 ORDER BY seq",
            self.t("saga_log")
        ))
        .bind(correlation_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the saga log"))?;
        rows.iter()
            .map(|row| {
                let field = |e| db("reading a saga log row")(e);
                let status: String = row.try_get("status").map_err(field)?;
                let emitted: serde_json::Value = row.try_get("emitted").map_err(field)?;
                Ok(SagaLogEntry {
                    correlation_id: row.try_get("correlation_id").map_err(field)?,
                    consumer: row.try_get("consumer").map_err(field)?,
                    message_id: MessageId::from_uuid(row.try_get("message_id").map_err(field)?),
                    message_type: row.try_get("message_type").map_err(field)?,
                    status: LogStatus::parse(&status).ok_or_else(|| {
                        Error::InvalidState(format!("unknown log status {status:?}"))
                    })?,
                    emitted: serde_json::from_value(emitted)?,
                    error: row.try_get("error").map_err(field)?,
                    at: row.try_get("at").map_err(field)?,
                })
            })
            .collect()
    }
}
