//! Crash recovery: the orchestrator is killed at every one of its commits
//! (just before it, so the transaction rolls back, and just after it), a new
//! instance starts on the same store (the start itself commits in the
//! caller's transaction and is not a crash point here), and the saga must still end as its plan
//! says, with every effect applied once and nothing lost.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use common::{CheckoutData, Plan, SAGA, World};
use saga::memory::{MemoryStore, MemoryTransport, MemoryTx};
use saga::saga::{SagaInstance, SagaLogEntry};
use saga::store::{
    Begin, ClaimRequest, DeadLetter, OutboxRecord, OutboxStats, SagaFilter, StepClaim, StepMark,
};
use saga::{
    IdempotencyStore, MessageId, OutboxEntry, OutboxStore, Result, SagaId, SagaStore, Transactional,
};
use tokio::sync::Notify;

/// Where the orchestrator dies.
#[derive(Clone, Copy, Debug)]
enum Crash {
    BeforeCommit(u32),
    AfterCommit(u32),
}

#[derive(Default)]
struct Trap {
    commits: AtomicU32,
    crash: Option<(u32, bool)>,
    hit: AtomicBool,
    sprung: Notify,
}

/// A store that hangs for good at a chosen commit, as a killed process would.
#[derive(Clone)]
struct CrashingStore {
    inner: MemoryStore,
    trap: Arc<Trap>,
}

#[async_trait]
impl Transactional for CrashingStore {
    type Tx = MemoryTx;

    async fn begin(&self) -> Result<MemoryTx> {
        self.inner.begin().await
    }

    async fn commit(&self, tx: MemoryTx) -> Result<()> {
        let n = self.trap.commits.fetch_add(1, Ordering::SeqCst) + 1;
        match self.trap.crash {
            Some((at, before)) if at == n => {
                self.trap.hit.store(true, Ordering::SeqCst);
                if !before {
                    self.inner.commit(tx).await?;
                }
                self.trap.sprung.notify_one();
                std::future::pending().await
            }
            _ => self.inner.commit(tx).await,
        }
    }
}

#[async_trait]
impl OutboxStore for CrashingStore {
    async fn enqueue(&self, tx: &mut MemoryTx, entries: &[OutboxEntry]) -> Result<()> {
        self.inner.enqueue(tx, entries).await
    }
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<OutboxRecord>> {
        self.inner.claim(request).await
    }
    async fn mark_published(&self, owner: &str, seqs: &[i64], now: DateTime<Utc>) -> Result<u64> {
        self.inner.mark_published(owner, seqs, now).await
    }
    async fn record_failure(
        &self,
        owner: &str,
        seq: i64,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<bool> {
        self.inner.record_failure(owner, seq, error, retry_at).await
    }
    async fn dead_letter(
        &self,
        owner: &str,
        seq: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.inner.dead_letter(owner, seq, error, now).await
    }
    async fn is_pending(&self, tx: &mut MemoryTx, message_id: saga::MessageId) -> Result<bool> {
        self.inner.is_pending(tx, message_id).await
    }
    async fn release(&self, owner: &str, seqs: &[i64]) -> Result<u64> {
        self.inner.release(owner, seqs).await
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.inner.dead_letters(limit).await
    }
    async fn requeue_dead_letter(&self, seq: i64) -> Result<bool> {
        self.inner.requeue_dead_letter(seq).await
    }
    async fn stats(&self) -> Result<OutboxStats> {
        self.inner.stats().await
    }
    async fn purge_published(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        self.inner.purge_published(before, limit).await
    }
}

#[async_trait]
impl IdempotencyStore for CrashingStore {
    async fn begin_processing(
        &self,
        tx: &mut MemoryTx,
        consumer: &str,
        id: MessageId,
        now: DateTime<Utc>,
    ) -> Result<Begin> {
        self.inner.begin_processing(tx, consumer, id, now).await
    }
    async fn save_reply(
        &self,
        tx: &mut MemoryTx,
        consumer: &str,
        id: MessageId,
        reply: &OutboxEntry,
    ) -> Result<()> {
        self.inner.save_reply(tx, consumer, id, reply).await
    }
    async fn claim_step(
        &self,
        tx: &mut MemoryTx,
        consumer: &str,
        saga: SagaId,
        step: u32,
        mark: StepMark,
        now: DateTime<Utc>,
    ) -> Result<StepClaim> {
        self.inner
            .claim_step(tx, consumer, saga, step, mark, now)
            .await
    }
    async fn update_step(
        &self,
        tx: &mut MemoryTx,
        consumer: &str,
        saga: SagaId,
        step: u32,
        mark: StepMark,
        reply: Option<&OutboxEntry>,
    ) -> Result<()> {
        self.inner
            .update_step(tx, consumer, saga, step, mark, reply)
            .await
    }
    async fn purge_expired(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        self.inner.purge_expired(before, limit).await
    }
    async fn marks_purged_before(&self, tx: &mut MemoryTx) -> Result<Option<DateTime<Utc>>> {
        self.inner.marks_purged_before(tx).await
    }
}

#[async_trait]
impl SagaStore for CrashingStore {
    async fn create(&self, tx: &mut MemoryTx, saga: &SagaInstance) -> Result<()> {
        self.inner.create(tx, saga).await
    }
    async fn load(&self, tx: &mut MemoryTx, id: SagaId) -> Result<Option<SagaInstance>> {
        self.inner.load(tx, id).await
    }
    async fn save(&self, tx: &mut MemoryTx, saga: &SagaInstance) -> Result<()> {
        self.inner.save(tx, saga).await
    }
    async fn get(&self, id: SagaId) -> Result<Option<SagaInstance>> {
        self.inner.get(id).await
    }
    async fn claim_due(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<SagaId>> {
        self.inner.claim_due(owner, now, lease, limit).await
    }
    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>> {
        self.inner.list(filter).await
    }
    async fn append_log(&self, tx: &mut MemoryTx, entry: &SagaLogEntry) -> Result<()> {
        self.inner.append_log(tx, entry).await
    }
    async fn log(&self, correlation_id: &str) -> Result<Vec<SagaLogEntry>> {
        self.inner.log(correlation_id).await
    }
    async fn purge_finished(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        self.inner.purge_finished(before, limit).await
    }
    async fn purge_log(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        self.inner.purge_log(before, limit).await
    }
}

/// Runs one saga with the orchestrator dying at `crash`; returns the
/// orchestrator's commits before it died (all of them without a crash) and
/// whether the crash happened.
fn run(plan: &Plan, crash: Option<Crash>) -> (u32, bool) {
    common::paused_runtime().block_on(async {
        let mut world = World::start_without_orchestrator(MemoryTransport::default()).await;
        let trap = Arc::new(Trap {
            crash: crash.map(|c| match c {
                Crash::BeforeCommit(n) => (n, true),
                Crash::AfterCommit(n) => (n, false),
            }),
            ..Trap::default()
        });
        let doomed = common::orchestrator(
            CrashingStore { inner: world.orchestrator_store.clone(), trap: Arc::clone(&trap) },
            Arc::new(world.transport.clone()),
            &world.counters,
        );
        // The start commits in the caller's transaction; the trap counts the
        // orchestrator's own transitions from there on.
        let id = world.orchestrator.start_saga(SAGA, &CheckoutData { plan: plan.clone() }).await.unwrap();
        let worker = doomed.spawn().await.unwrap();
        let ended = async {
            while !world.state(id).await.is_terminal() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            () = trap.sprung.notified() => {}
            () = ended => {}
            () = tokio::time::sleep(Duration::from_secs(3600)) => panic!("saga neither ended nor crashed"),
        }
        worker.abort().await;
        let hit = trap.hit.load(Ordering::SeqCst);
        let commits = trap.commits.load(Ordering::SeqCst);
        world.orchestrator_worker = Some(world.orchestrator.spawn().await.unwrap());
        world.wait_terminal(&[id], Duration::from_secs(3600)).await;
        world.wait_quiet().await;
        let check = world.check_saga(id, plan, plan.slow_at.is_none()).await.and(world.check_nothing_lost().await);
        if let Err(error) = check {
            panic!("plan {plan:?}, crash {crash:?}: {error}");
        }
        world.shutdown().await;
        (commits, hit)
    })
}

fn crash_at_every_commit(plan: &Plan) {
    let (clean, _) = run(plan, None);
    assert!(
        clean >= 3,
        "a clean run of {plan:?} made only {clean} commits"
    );
    for n in 1..=clean {
        for crash in [Crash::BeforeCommit(n), Crash::AfterCommit(n)] {
            let (_, hit) = run(plan, Some(crash));
            assert!(
                hit,
                "{crash:?} never happened for {plan:?} (clean run: {clean} commits)"
            );
        }
    }
}

#[test]
fn happy_path_survives_a_crash_at_every_commit() {
    crash_at_every_commit(&Plan::default());
}

#[test]
fn compensation_survives_a_crash_at_every_commit() {
    crash_at_every_commit(&Plan {
        reject_at: Some(3),
        ..Plan::default()
    });
}

#[test]
fn retries_survive_a_crash_at_every_commit() {
    crash_at_every_commit(&Plan {
        reject_at: Some(3),
        transient: [(2, 2)].into(),
        compensation_failures: [(1, 2), (0, 1)].into(),
        ..Plan::default()
    });
}

#[test]
fn a_late_reply_survives_a_crash_at_every_commit() {
    crash_at_every_commit(&Plan {
        slow_at: Some(2),
        ..Plan::default()
    });
}
