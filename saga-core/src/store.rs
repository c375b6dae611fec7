//! The storage traits: outbox, idempotency (inbox) and saga store.
//!
//! Every write that belongs to a business transaction takes the caller's
//! transaction (`&mut Self::Tx`), so the business row, the saga state and the
//! outgoing messages commit together or not at all. A transaction that is
//! dropped without [`Transactional::commit`] rolls back.
//!
//! Operations that depend on time take `now` from the caller (see
//! [`crate::clock`]); stores never read a clock themselves.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::Result;
use crate::ids::{MessageId, SagaId};
use crate::message::OutboxEntry;
use crate::saga::{SagaInstance, SagaLogEntry, SagaState};

/// A store whose writes happen inside transactions of type `Tx`.
#[async_trait]
pub trait Transactional: Send + Sync + 'static {
    /// The backend's transaction. Dropping it without commit rolls back.
    type Tx: Send + 'static;

    /// Opens a transaction.
    async fn begin(&self) -> Result<Self::Tx>;

    /// Commits a transaction.
    async fn commit(&self, tx: Self::Tx) -> Result<()>;

    /// The time in this store's clock domain: what leases, wake-up times,
    /// deadlines and retry times written to the store are computed from, so
    /// that every process comparing them agrees whatever its own clock says.
    /// A store with a server answers with the server's clock; the default is
    /// the process clock ([`crate::clock::now`]), right for a store that
    /// lives in one process or on one host.
    async fn now(&self) -> DateTime<Utc> {
        crate::clock::now()
    }
}

/// One message waiting in the outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRecord {
    /// Position in the outbox; increases with every enqueued message.
    pub seq: i64,
    /// Destination and message.
    pub entry: OutboxEntry,
    /// Publish attempts that failed so far.
    pub attempts: u32,
    /// The last publish error.
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
}

/// A message the relay gave up on.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// The record as it was when it was dead-lettered.
    pub record: OutboxRecord,
    /// Why.
    pub error: String,
    /// When.
    pub dead_at: DateTime<Utc>,
}

/// What [`OutboxStore::claim`] asks for.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    /// Who claims (one relay instance).
    pub owner: String,
    /// At most this many records.
    pub limit: usize,
    /// The time of the claim.
    pub now: DateTime<Utc>,
    /// How long the claim protects the records from other relays.
    pub lease: Duration,
}

/// Counts that tell how far behind the relay is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutboxStats {
    /// Messages not yet published nor dead-lettered.
    pub pending: u64,
    /// Messages in the dead-letter list.
    pub dead: u64,
    /// When the oldest pending message was enqueued.
    pub oldest_pending: Option<DateTime<Utc>>,
}

/// Where outgoing messages wait until the relay has published them.
///
/// # Claim contract
/// [`claim`](Self::claim) returns pending, due (`retry_at <= now`), unleased
/// (or lease expired) records and leases them to `owner`. For every ordering
/// key, the records it returns are the oldest pending records of that key, in
/// `seq` order: a record is never returned while an older pending record of
/// its key is leased by someone else or waits for its retry time. Dead-lettered
/// records leave the line. Records without an ordering key are independent.
#[async_trait]
pub trait OutboxStore: Transactional {
    /// Adds messages in the caller's transaction.
    async fn enqueue(&self, tx: &mut Self::Tx, entries: &[OutboxEntry]) -> Result<()>;

    /// Leases a batch of records to publish (see the claim contract above).
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<OutboxRecord>>;

    /// The broker confirmed these records: they are never claimed again.
    /// Fenced: only records `owner` still leases are marked (another relay
    /// took over the others after `owner`'s lease expired, and publishes them
    /// again). Returns how many were marked.
    async fn mark_published(&self, owner: &str, seqs: &[i64], now: DateTime<Utc>) -> Result<u64>;

    /// Publishing failed: count the attempt, keep the error, release the lease
    /// and make the record due again at `retry_at`. Fenced as
    /// [`mark_published`](Self::mark_published): `false` if `owner` no
    /// longer leases the record, which is then left as it is.
    async fn record_failure(
        &self,
        owner: &str,
        seq: i64,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<bool>;

    /// Moves a record to the dead-letter list with its error. Fenced as
    /// [`mark_published`](Self::mark_published): `false` if `owner` no
    /// longer leases the record, which is then left as it is.
    async fn dead_letter(
        &self,
        owner: &str,
        seq: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<bool>;

    /// Releases leases without counting an attempt: the listed records, or
    /// with `seqs` empty every record leased by `owner` (clean shutdown).
    async fn release(&self, owner: &str, seqs: &[i64]) -> Result<u64>;

    /// Dead letters, oldest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>>;

    /// Puts a dead letter back in line with its attempts reset. `false` if there is no such dead letter.
    async fn requeue_dead_letter(&self, seq: i64) -> Result<bool>;

    /// Pending and dead counts and the age of the oldest pending record.
    async fn stats(&self) -> Result<OutboxStats>;

    /// Whether the message with this id waits in the outbox, as `tx` sees
    /// it: not yet published nor dead-lettered. (The orchestrator counts a
    /// step's deadline from the moment its command left the outbox.)
    async fn is_pending(&self, tx: &mut Self::Tx, message_id: MessageId) -> Result<bool>;

    /// Deletes up to `limit` records published before `before`; returns how many.
    async fn purge_published(&self, before: DateTime<Utc>, limit: usize) -> Result<u64>;

    /// Waits until something may have been enqueued, or `max_wait` passed.
    /// The default just sleeps; stores that can notify (LISTEN/NOTIFY, an
    /// in-process signal) return as soon as a commit added messages.
    async fn wait_for_messages(&self, max_wait: Duration) {
        tokio::time::sleep(max_wait).await;
    }
}

/// The answer of [`IdempotencyStore::begin_processing`].
// Returned once per message; boxing the reply would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Begin {
    /// First time: process it. The record is part of the caller's transaction.
    Fresh,
    /// Already processed; here is the reply stored then, if there was one.
    Duplicate {
        /// The reply to send again.
        reply: Option<OutboxEntry>,
    },
}

/// What a participant has done for one step of one saga.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StepMark {
    /// The step's forward action was applied.
    Applied,
    /// The step was compensated, or cancelled before its action ran.
    Compensated,
    /// The step's action refused for good ([`StepError::rejected`](crate::StepError::rejected)):
    /// every later attempt of the step gets the same refusal, and the
    /// action never runs for it.
    Refused,
}

impl StepMark {
    /// The mark's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Compensated => "compensated",
            Self::Refused => "refused",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s output.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "applied" => Some(Self::Applied),
            "compensated" => Some(Self::Compensated),
            "refused" => Some(Self::Refused),
            _ => None,
        }
    }
}

/// The answer of [`IdempotencyStore::claim_step`].
// Returned once per command; boxing the reply would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum StepClaim {
    /// There was no mark; the requested one is now written (in the caller's transaction).
    Inserted,
    /// A mark exists (and is now locked by the caller's transaction until it ends).
    Existing {
        /// The mark.
        mark: StepMark,
        /// The reply stored with it.
        reply: Option<OutboxEntry>,
    },
}

/// Deduplication of consumed messages, and per-step marks that make
/// compensation safe when a command and its compensation race.
#[async_trait]
pub trait IdempotencyStore: Transactional {
    /// Records that `consumer` processes `message_id`, in the caller's
    /// transaction. A second call for the same pair, in any transaction,
    /// answers [`Begin::Duplicate`] once the first committed (and waits for it
    /// while it is open, where the backend locks).
    async fn begin_processing(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        message_id: MessageId,
        now: DateTime<Utc>,
    ) -> Result<Begin>;

    /// Stores the reply to send again if the same message comes back.
    async fn save_reply(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        message_id: MessageId,
        reply: &OutboxEntry,
    ) -> Result<()>;

    /// Writes `mark` for (`consumer`, `saga_id`, `step`) if there is none, or
    /// returns the existing mark, locked until the transaction ends.
    async fn claim_step(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        saga_id: SagaId,
        step: u32,
        mark: StepMark,
        now: DateTime<Utc>,
    ) -> Result<StepClaim>;

    /// Overwrites the mark (and its stored reply) of a claimed step.
    async fn update_step(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        saga_id: SagaId,
        step: u32,
        mark: StepMark,
        reply: Option<&OutboxEntry>,
    ) -> Result<()>;

    /// Deletes up to `limit` message and step records created before `before`;
    /// returns how many. A duplicate older than the retention is processed
    /// again. Remembers `before` (the latest one) for
    /// [`marks_purged_before`](Self::marks_purged_before).
    async fn purge_expired(&self, before: DateTime<Utc>, limit: usize) -> Result<u64>;

    /// Step marks created before this may have been purged: for a saga
    /// older than this, a missing mark says nothing about whether its action
    /// ran here. `None` if no mark was ever purged.
    async fn marks_purged_before(&self, tx: &mut Self::Tx) -> Result<Option<DateTime<Utc>>>;
}

/// Which sagas [`SagaStore::list`] returns.
#[derive(Clone, Debug, Default)]
pub struct SagaFilter {
    /// Only sagas in this state.
    pub state: Option<SagaState>,
    /// Only sagas of this type.
    pub saga_type: Option<String>,
    /// Only sagas created before this.
    pub started_before: Option<DateTime<Utc>>,
    /// At most this many (0: no limit).
    pub limit: usize,
}

/// Saga instances and the choreography log.
#[async_trait]
pub trait SagaStore: Transactional {
    /// Inserts a new instance (its `version` is 0).
    async fn create(&self, tx: &mut Self::Tx, saga: &SagaInstance) -> Result<()>;

    /// Reads an instance inside a transaction.
    async fn load(&self, tx: &mut Self::Tx, id: SagaId) -> Result<Option<SagaInstance>>;

    /// Writes `saga` if the stored version still equals `saga.version`, storing
    /// `saga.version + 1` and clearing the lease; [`crate::Error::Conflict`] otherwise.
    async fn save(&self, tx: &mut Self::Tx, saga: &SagaInstance) -> Result<()>;

    /// Reads an instance outside any transaction (queries).
    async fn get(&self, id: SagaId) -> Result<Option<SagaInstance>>;

    /// Leases to `owner` up to `limit` unfinished sagas whose `wake_at` is at or
    /// before `now` and whose lease is free or expired; returns their ids,
    /// earliest `wake_at` first. An owner that stopped leaves expired leases,
    /// so its sagas come back here.
    async fn claim_due(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<SagaId>>;

    /// Instances matching the filter, oldest first.
    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>>;

    /// Appends one entry to the choreography log, in the caller's transaction.
    async fn append_log(&self, tx: &mut Self::Tx, entry: &SagaLogEntry) -> Result<()>;

    /// The log entries of one correlation id, in the order they were written.
    async fn log(&self, correlation_id: &str) -> Result<Vec<SagaLogEntry>>;

    /// Deletes up to `limit` sagas that ended COMPLETED or COMPENSATED
    /// before `before` (by their last change), oldest first; returns how
    /// many. Never a saga still running or compensating, nor a FAILED one,
    /// which waits for an operator.
    async fn purge_finished(&self, before: DateTime<Utc>, limit: usize) -> Result<u64>;

    /// Deletes up to `limit` choreography log entries written before
    /// `before`, oldest first; returns how many.
    async fn purge_log(&self, before: DateTime<Utc>, limit: usize) -> Result<u64>;
}

/// A transaction with a message recorded as processed, or the reply stored
/// when it was processed before.
// Made once per message and taken apart at once.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Inbox<Tx> {
    /// First time: process it in this transaction.
    Fresh(Tx),
    /// Processed before; the stored reply, if any.
    Duplicate(Option<OutboxEntry>),
}

/// Opens a transaction and records in it that `consumer` processes `message_id`.
pub(crate) async fn open_inbox<S: IdempotencyStore + ?Sized>(
    store: &S,
    consumer: &str,
    message_id: MessageId,
) -> Result<Inbox<S::Tx>> {
    // Read before the transaction: a store may ask its server for the time.
    let now = store.now().await;
    let mut tx = store.begin().await?;
    match store
        .begin_processing(&mut tx, consumer, message_id, now)
        .await?
    {
        Begin::Fresh => Ok(Inbox::Fresh(tx)),
        Begin::Duplicate { reply } => Ok(Inbox::Duplicate(reply)),
    }
}

/// Every store the engine needs, on one backend sharing one transaction type.
pub trait Store: OutboxStore + IdempotencyStore + SagaStore {}

impl<S: OutboxStore + IdempotencyStore + SagaStore> Store for S {}
