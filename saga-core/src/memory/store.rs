//! The in-memory store: every store trait, with real transactions.
//!
//! A [`MemoryTx`] holds the store's lock from `begin` to commit or drop, so
//! transactions are serializable; every write it makes is recorded with its
//! undo, and a transaction dropped without commit undoes them all. Besides the
//! engine's tables it keeps JSON business rows ([`MemoryTx::put`],
//! [`MemoryTx::get`], [`MemoryStore::row`]), so a service's own state commits or rolls back with its
//! inbox and outbox rows, as it would in SQL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

use crate::clock;
use crate::error::{Error, Result};
use crate::ids::{MessageId, SagaId};
use crate::message::OutboxEntry;
use crate::saga::{SagaInstance, SagaLogEntry, SagaState};
use crate::store::{
    Begin, ClaimRequest, DeadLetter, IdempotencyStore, OutboxRecord, OutboxStats, OutboxStore,
    SagaFilter, SagaStore, StepClaim, StepMark, Transactional,
};

/// A step mark, the reply stored with it, and when it was written.
type MarkRow = (StepMark, Option<OutboxEntry>, DateTime<Utc>);

#[derive(Default)]
struct State {
    next_seq: i64,
    outbox: BTreeMap<i64, OutboxRow>,
    dead: BTreeMap<i64, DeadLetter>,
    inbox: HashMap<(String, MessageId), (Option<OutboxEntry>, DateTime<Utc>)>,
    marks: HashMap<(String, SagaId, u32), MarkRow>,
    /// The latest cut-off of a mark purge.
    marks_purged_before: Option<DateTime<Utc>>,
    sagas: HashMap<SagaId, SagaInstance>,
    log: Vec<SagaLogEntry>,
    rows: HashMap<(String, String), serde_json::Value>,
}

#[derive(Clone)]
struct OutboxRow {
    record: OutboxRecord,
    retry_at: DateTime<Utc>,
    lease: Option<(String, DateTime<Utc>)>,
    published_at: Option<DateTime<Utc>>,
}

impl OutboxRow {
    /// Unpublished and leased by `owner` (expired or not: nobody took it over).
    fn leased_by(&self, owner: &str) -> bool {
        self.published_at.is_none() && self.lease.as_ref().is_some_and(|(o, _)| o == owner)
    }
}

type Undo = Box<dyn FnOnce(&mut State) + Send>;

/// In-memory outbox, idempotency and saga store. Clones share the same data.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    enqueued: Arc<Notify>,
    /// Until when transactions fail, as during a database restart.
    outage_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

/// A transaction on a [`MemoryStore`]: commits all of its writes or none.
pub struct MemoryTx {
    state: OwnedMutexGuard<State>,
    undo: Vec<Undo>,
    enqueued: bool,
    committed: bool,
}

impl fmt::Debug for MemoryTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTx")
            .field("writes", &self.undo.len())
            .finish_non_exhaustive()
    }
}

impl Drop for MemoryTx {
    fn drop(&mut self) {
        if !self.committed {
            while let Some(undo) = self.undo.pop() {
                undo(&mut self.state);
            }
        }
    }
}

impl MemoryTx {
    fn on_rollback(&mut self, undo: impl FnOnce(&mut State) + Send + 'static) {
        self.undo.push(Box::new(undo));
    }

    /// Reads a business row of `table` as `T`.
    pub fn get<T: DeserializeOwned>(&self, table: &str, key: &str) -> Result<Option<T>> {
        self.state
            .rows
            .get(&(table.to_owned(), key.to_owned()))
            .map(|v| T::deserialize(v).map_err(Error::from))
            .transpose()
    }

    /// Writes a business row of `table`; it commits or rolls back with the transaction.
    pub fn put<T: Serialize + ?Sized>(&mut self, table: &str, key: &str, value: &T) -> Result<()> {
        let id = (table.to_owned(), key.to_owned());
        let old = self
            .state
            .rows
            .insert(id.clone(), serde_json::to_value(value)?);
        self.on_rollback(move |s| restore(&mut s.rows, id, old));
        Ok(())
    }

    /// Deletes a business row of `table`.
    pub fn delete(&mut self, table: &str, key: &str) {
        let id = (table.to_owned(), key.to_owned());
        let old = self.state.rows.remove(&id);
        self.on_rollback(move |s| restore(&mut s.rows, id, old));
    }
}

fn restore<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, key: K, old: Option<V>) {
    match old {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    };
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The database is unreachable for `duration`, as during a restart:
    /// `begin` fails, and so does `commit`, which rolls the transaction
    /// back. Both fail retryably ([`Error::Unavailable`]).
    pub fn outage(&self, duration: std::time::Duration) {
        *self
            .outage_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(tokio::time::Instant::now() + duration);
    }

    fn reachable(&self) -> Result<()> {
        let until = *self
            .outage_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if until.is_some_and(|until| until > tokio::time::Instant::now()) {
            return Err(Error::Unavailable("in-memory database outage".into()));
        }
        Ok(())
    }

    /// Reads a committed business row of `table` as `T`.
    pub async fn row<T: DeserializeOwned>(&self, table: &str, key: &str) -> Result<Option<T>> {
        let state = self.state.lock().await;
        state
            .rows
            .get(&(table.to_owned(), key.to_owned()))
            .map(|v| T::deserialize(v).map_err(Error::from))
            .transpose()
    }

    /// Every committed business row of `table`, by key.
    pub async fn rows(&self, table: &str) -> BTreeMap<String, serde_json::Value> {
        let state = self.state.lock().await;
        state
            .rows
            .iter()
            .filter(|((t, _), _)| t == table)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[async_trait]
impl Transactional for MemoryStore {
    type Tx = MemoryTx;

    async fn begin(&self) -> Result<MemoryTx> {
        self.reachable()?;
        Ok(MemoryTx {
            state: Arc::clone(&self.state).lock_owned().await,
            undo: Vec::new(),
            enqueued: false,
            committed: false,
        })
    }

    async fn commit(&self, mut tx: MemoryTx) -> Result<()> {
        self.reachable()?;
        tx.committed = true;
        tx.undo.clear();
        let enqueued = tx.enqueued;
        drop(tx);
        if enqueued {
            self.enqueued.notify_waiters();
            self.enqueued.notify_one();
        }
        Ok(())
    }
}

fn lease_free(row: &OutboxRow, now: DateTime<Utc>) -> bool {
    row.lease.as_ref().is_none_or(|(_, until)| *until <= now)
}

#[async_trait]
impl OutboxStore for MemoryStore {
    async fn enqueue(&self, tx: &mut MemoryTx, entries: &[OutboxEntry]) -> Result<()> {
        let now = clock::now();
        for entry in entries {
            tx.state.next_seq += 1;
            let seq = tx.state.next_seq;
            tx.state.outbox.insert(
                seq,
                OutboxRow {
                    record: OutboxRecord {
                        seq,
                        entry: entry.clone(),
                        attempts: 0,
                        last_error: None,
                        created_at: now,
                    },
                    retry_at: now,
                    lease: None,
                    published_at: None,
                },
            );
            tx.on_rollback(move |s| {
                s.outbox.remove(&seq);
            });
        }
        tx.enqueued |= !entries.is_empty();
        Ok(())
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<OutboxRecord>> {
        let mut state = self.state.lock().await;
        let lease_until = request.now + clock::to_chrono(request.lease);
        let mut blocked: HashSet<String> = HashSet::new();
        let mut claimed = Vec::new();
        for row in state.outbox.values_mut() {
            if claimed.len() >= request.limit {
                break;
            }
            if row.published_at.is_some() {
                continue;
            }
            let key = row.record.entry.message.ordering_key.clone();
            if key.as_ref().is_some_and(|k| blocked.contains(k)) {
                continue;
            }
            if row.retry_at <= request.now && lease_free(row, request.now) {
                row.lease = Some((request.owner.clone(), lease_until));
                claimed.push(row.record.clone());
            } else if let Some(key) = key {
                blocked.insert(key);
            }
        }
        Ok(claimed)
    }

    async fn mark_published(&self, owner: &str, seqs: &[i64], now: DateTime<Utc>) -> Result<u64> {
        let mut state = self.state.lock().await;
        let mut marked = 0;
        for seq in seqs {
            if let Some(row) = state.outbox.get_mut(seq).filter(|r| r.leased_by(owner)) {
                row.published_at = Some(now);
                row.lease = None;
                marked += 1;
            }
        }
        Ok(marked)
    }

    async fn record_failure(
        &self,
        owner: &str,
        seq: i64,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<bool> {
        let mut state = self.state.lock().await;
        let Some(row) = state.outbox.get_mut(&seq).filter(|r| r.leased_by(owner)) else {
            return Ok(false);
        };
        row.record.attempts += 1;
        row.record.last_error = Some(error.to_owned());
        row.retry_at = retry_at;
        row.lease = None;
        Ok(true)
    }

    async fn dead_letter(
        &self,
        owner: &str,
        seq: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let mut state = self.state.lock().await;
        if !state.outbox.get(&seq).is_some_and(|r| r.leased_by(owner)) {
            return Ok(false);
        }
        {
            let row = state.outbox.remove(&seq).expect("checked above");
            let mut record = row.record;
            record.attempts += 1;
            record.last_error = Some(error.to_owned());
            state.dead.insert(
                seq,
                DeadLetter {
                    record,
                    error: error.to_owned(),
                    dead_at: now,
                },
            );
        }
        Ok(true)
    }

    async fn release(&self, owner: &str, seqs: &[i64]) -> Result<u64> {
        let mut state = self.state.lock().await;
        let mut released = 0;
        for row in state.outbox.values_mut() {
            let mine = row.lease.as_ref().is_some_and(|(o, _)| o == owner);
            if mine && (seqs.is_empty() || seqs.contains(&row.record.seq)) {
                row.lease = None;
                released += 1;
            }
        }
        Ok(released)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let state = self.state.lock().await;
        Ok(state.dead.values().take(limit).cloned().collect())
    }

    async fn requeue_dead_letter(&self, seq: i64) -> Result<bool> {
        let mut state = self.state.lock().await;
        let Some(dead) = state.dead.remove(&seq) else {
            return Ok(false);
        };
        let mut record = dead.record;
        record.attempts = 0;
        let now = clock::now();
        state.outbox.insert(
            seq,
            OutboxRow {
                record,
                retry_at: now,
                lease: None,
                published_at: None,
            },
        );
        drop(state);
        self.enqueued.notify_waiters();
        Ok(true)
    }

    async fn is_pending(&self, tx: &mut MemoryTx, message_id: MessageId) -> Result<bool> {
        Ok(tx
            .state
            .outbox
            .values()
            .any(|r| r.published_at.is_none() && r.record.entry.message.id == message_id))
    }

    async fn stats(&self) -> Result<OutboxStats> {
        let state = self.state.lock().await;
        let pending = state.outbox.values().filter(|r| r.published_at.is_none());
        Ok(OutboxStats {
            pending: pending.clone().count() as u64,
            dead: state.dead.len() as u64,
            oldest_pending: pending.map(|r| r.record.created_at).min(),
        })
    }

    async fn purge_published(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let mut state = self.state.lock().await;
        let old: Vec<i64> = state
            .outbox
            .values()
            .filter(|r| r.published_at.is_some_and(|at| at < before))
            .take(limit)
            .map(|r| r.record.seq)
            .collect();
        for seq in &old {
            state.outbox.remove(seq);
        }
        Ok(old.len() as u64)
    }

    async fn wait_for_messages(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.enqueued.notified()).await;
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn begin_processing(
        &self,
        tx: &mut MemoryTx,
        consumer: &str,
        message_id: MessageId,
        now: DateTime<Utc>,
    ) -> Result<Begin> {
        let key = (consumer.to_owned(), message_id);
        if let Some((reply, _)) = tx.state.inbox.get(&key) {
            return Ok(Begin::Duplicate {
                reply: reply.clone(),
            });
        }
        tx.state.inbox.insert(key.clone(), (None, now));
        tx.on_rollback(move |s| {
            s.inbox.remove(&key);
        });
        Ok(Begin::Fresh)
    }

    async fn save_reply(
        &self,
        tx: &mut MemoryTx,
        consumer: &str,
        message_id: MessageId,
        reply: &OutboxEntry,
    ) -> Result<()> {
        let key = (consumer.to_owned(), message_id);
        let Some(row) = tx.state.inbox.get_mut(&key) else {
            return Err(Error::NotFound(format!(
                "no inbox record of message {message_id} for `{consumer}`"
            )));
        };
        let old = row.0.replace(reply.clone());
        tx.on_rollback(move |s| {
            if let Some(row) = s.inbox.get_mut(&key) {
                row.0 = old;
            }
        });
        Ok(())
    }

    async fn claim_step(
        &self,
        tx: &mut MemoryTx,
        consumer: &str,
        saga_id: SagaId,
        step: u32,
        mark: StepMark,
        now: DateTime<Utc>,
    ) -> Result<StepClaim> {
        let key = (consumer.to_owned(), saga_id, step);
        if let Some((mark, reply, _)) = tx.state.marks.get(&key) {
            return Ok(StepClaim::Existing {
                mark: *mark,
                reply: reply.clone(),
            });
        }
        tx.state.marks.insert(key.clone(), (mark, None, now));
        tx.on_rollback(move |s| {
            s.marks.remove(&key);
        });
        Ok(StepClaim::Inserted)
    }

    async fn update_step(
        &self,
        tx: &mut MemoryTx,
        consumer: &str,
        saga_id: SagaId,
        step: u32,
        mark: StepMark,
        reply: Option<&OutboxEntry>,
    ) -> Result<()> {
        let key = (consumer.to_owned(), saga_id, step);
        let now = clock::now();
        let old = tx
            .state
            .marks
            .insert(key.clone(), (mark, reply.cloned(), now));
        tx.on_rollback(move |s| restore(&mut s.marks, key, old));
        Ok(())
    }

    async fn marks_purged_before(&self, tx: &mut MemoryTx) -> Result<Option<DateTime<Utc>>> {
        Ok(tx.state.marks_purged_before)
    }

    async fn purge_expired(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let mut state = self.state.lock().await;
        state.marks_purged_before = state.marks_purged_before.max(Some(before));
        let inbox: Vec<_> = state
            .inbox
            .iter()
            .filter(|(_, (_, at))| *at < before)
            .map(|(k, _)| k.clone())
            .take(limit)
            .collect();
        for key in &inbox {
            state.inbox.remove(key);
        }
        let room = limit - inbox.len();
        let marks: Vec<_> = state
            .marks
            .iter()
            .filter(|(_, (_, _, at))| *at < before)
            .map(|(k, _)| k.clone())
            .take(room)
            .collect();
        for key in &marks {
            state.marks.remove(key);
        }
        Ok((inbox.len() + marks.len()) as u64)
    }
}

#[async_trait]
impl SagaStore for MemoryStore {
    async fn create(&self, tx: &mut MemoryTx, saga: &SagaInstance) -> Result<()> {
        if tx.state.sagas.contains_key(&saga.id) {
            return Err(Error::InvalidState(format!(
                "saga {} already exists",
                saga.id
            )));
        }
        let mut saga = saga.clone();
        saga.version = 0;
        let id = saga.id;
        tx.state.sagas.insert(id, saga);
        tx.on_rollback(move |s| {
            s.sagas.remove(&id);
        });
        Ok(())
    }

    async fn load(&self, tx: &mut MemoryTx, id: SagaId) -> Result<Option<SagaInstance>> {
        Ok(tx.state.sagas.get(&id).cloned())
    }

    async fn save(&self, tx: &mut MemoryTx, saga: &SagaInstance) -> Result<()> {
        let stored_version = tx.state.sagas.get(&saga.id).map(|s| s.version);
        match stored_version {
            None => Err(Error::NotFound(format!("saga {}", saga.id))),
            Some(version) if version != saga.version => Err(Error::Conflict {
                saga_id: saga.id,
                expected: saga.version,
            }),
            Some(_) => {
                let mut next = saga.clone();
                next.version += 1;
                next.lease_owner = None;
                next.lease_until = None;
                let id = saga.id;
                let old = tx.state.sagas.insert(id, next);
                tx.on_rollback(move |s| restore(&mut s.sagas, id, old));
                Ok(())
            }
        }
    }

    async fn get(&self, id: SagaId) -> Result<Option<SagaInstance>> {
        Ok(self.state.lock().await.sagas.get(&id).cloned())
    }

    async fn claim_due(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<SagaId>> {
        let mut state = self.state.lock().await;
        let mut due: Vec<(DateTime<Utc>, SagaId)> = state
            .sagas
            .values()
            .filter(|s| !s.state.is_terminal())
            .filter(|s| s.lease_until.is_none_or(|until| until <= now))
            .filter_map(|s| s.wake_at.filter(|at| *at <= now).map(|at| (at, s.id)))
            .collect();
        due.sort();
        due.truncate(limit);
        let until = now + clock::to_chrono(lease);
        for (_, id) in &due {
            if let Some(saga) = state.sagas.get_mut(id) {
                saga.lease_owner = Some(owner.to_owned());
                saga.lease_until = Some(until);
            }
        }
        Ok(due.into_iter().map(|(_, id)| id).collect())
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>> {
        let state = self.state.lock().await;
        let mut sagas: Vec<SagaInstance> = state
            .sagas
            .values()
            .filter(|s| filter.state.is_none_or(|st| s.state == st))
            .filter(|s| filter.saga_type.as_ref().is_none_or(|t| &s.saga_type == t))
            .filter(|s| filter.started_before.is_none_or(|at| s.created_at < at))
            .cloned()
            .collect();
        sagas.sort_by_key(|s| (s.created_at, s.id));
        if filter.limit > 0 {
            sagas.truncate(filter.limit);
        }
        Ok(sagas)
    }

    async fn append_log(&self, tx: &mut MemoryTx, entry: &SagaLogEntry) -> Result<()> {
        tx.state.log.push(entry.clone());
        tx.on_rollback(|s| {
            s.log.pop();
        });
        Ok(())
    }

    async fn log(&self, correlation_id: &str) -> Result<Vec<SagaLogEntry>> {
        let state = self.state.lock().await;
        Ok(state
            .log
            .iter()
            .filter(|e| e.correlation_id == correlation_id)
            .cloned()
            .collect())
    }

    async fn purge_finished(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let mut state = self.state.lock().await;
        let mut finished: Vec<(DateTime<Utc>, SagaId)> = state
            .sagas
            .values()
            .filter(|s| {
                matches!(s.state, SagaState::Completed | SagaState::Compensated)
                    && s.updated_at < before
            })
            .map(|s| (s.updated_at, s.id))
            .collect();
        finished.sort();
        finished.truncate(limit);
        for (_, id) in &finished {
            state.sagas.remove(id);
        }
        Ok(finished.len() as u64)
    }

    async fn purge_log(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let mut state = self.state.lock().await;
        let mut purged = 0;
        state.log.retain(|entry| {
            let old = entry.at < before && purged < limit;
            purged += usize::from(old);
            !old
        });
        Ok(purged as u64)
    }
}
