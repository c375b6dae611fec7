//! Conformance cases for [`SagaStore`].

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};

use crate::clock;
use crate::error::Error;
use crate::ids::{MessageId, SagaId};
use crate::saga::{LogStatus, Phase, SagaInstance, SagaLogEntry, SagaState, StepEvent, StepStatus};
use crate::store::{SagaFilter, SagaStore};

const LEASE: Duration = Duration::from_secs(30);

/// Times as every backend keeps them: microseconds.
fn now() -> DateTime<Utc> {
    clock::now().trunc_subsecs(6)
}

/// A saga of `saga_type` in `state`, created and changed now, with no
/// history: for tests that need instances in a store.
pub fn saga(saga_type: &str, state: SagaState, wake_at: Option<DateTime<Utc>>) -> SagaInstance {
    let at = now();
    SagaInstance {
        id: SagaId::new(),
        saga_type: saga_type.to_owned(),
        state,
        step: 0,
        attempt: 1,
        data: serde_json::json!({"order": "o-1", "total": "12.50"}),
        awaiting: None,
        wake_at,
        lease_owner: None,
        lease_until: None,
        error: None,
        correlation_id: "corr".to_owned(),
        history: Vec::new(),
        version: 0,
        created_at: at,
        updated_at: at,
    }
}

async fn create<S: SagaStore>(store: &S, saga: &SagaInstance) {
    let mut tx = store.begin().await.unwrap();
    store.create(&mut tx, saga).await.unwrap();
    store.commit(tx).await.unwrap();
}

/// A created saga can be loaded in a transaction and read outside one.
pub async fn create_then_load_and_get<S: SagaStore>(store: S) {
    let created = saga("order", SagaState::Running, Some(now()));
    create(&store, &created).await;
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.load(&mut tx, created.id).await.unwrap(),
        Some(created.clone())
    );
    drop(tx);
    assert_eq!(store.get(created.id).await.unwrap(), Some(created));
    assert_eq!(store.get(SagaId::new()).await.unwrap(), None);
}

/// A saga created in a rolled-back transaction does not exist.
pub async fn rollback_discards_the_saga<S: SagaStore>(store: S) {
    let created = saga("order", SagaState::Running, None);
    let mut tx = store.begin().await.unwrap();
    store.create(&mut tx, &created).await.unwrap();
    drop(tx);
    assert_eq!(store.get(created.id).await.unwrap(), None);
}

/// A save from a stale read fails with a conflict and changes nothing.
pub async fn save_checks_the_version<S: SagaStore>(store: S) {
    let created = saga("order", SagaState::Running, None);
    create(&store, &created).await;
    let mut first = created.clone();
    first.step = 1;
    let mut tx = store.begin().await.unwrap();
    store.save(&mut tx, &first).await.unwrap();
    store.commit(tx).await.unwrap();
    let mut stale = created.clone();
    stale.step = 7;
    let mut tx = store.begin().await.unwrap();
    let error = store.save(&mut tx, &stale).await.unwrap_err();
    assert!(matches!(error, Error::Conflict { .. }), "{error}");
    assert!(error.is_retryable());
    drop(tx);
    let stored = store.get(created.id).await.unwrap().unwrap();
    assert_eq!((stored.step, stored.version), (1, 1));
}

/// Every field, history included, reads back as written.
pub async fn everything_round_trips<S: SagaStore>(store: S) {
    let mut full = saga("order", SagaState::Compensating, Some(now()));
    full.step = 2;
    full.attempt = 3;
    full.awaiting = Some(MessageId::new());
    full.error = Some("payment declined".to_owned());
    full.history = vec![StepEvent {
        step: "reserve-stock".to_owned(),
        index: 0,
        phase: Phase::Forward,
        status: StepStatus::TimedOut,
        attempt: 2,
        at: now(),
        error: Some("no reply".to_owned()),
    }];
    create(&store, &full).await;
    let mut tx = store.begin().await.unwrap();
    let mut changed = store.load(&mut tx, full.id).await.unwrap().unwrap();
    changed.state = SagaState::Failed;
    changed.wake_at = None;
    changed.history.push(StepEvent {
        status: StepStatus::Failed,
        phase: Phase::Compensation,
        ..changed.history[0].clone()
    });
    store.save(&mut tx, &changed).await.unwrap();
    store.commit(tx).await.unwrap();
    let stored = store.get(full.id).await.unwrap().unwrap();
    changed.version += 1;
    assert_eq!(stored, changed);
}

/// Only unfinished sagas that are due and not leased are claimed, and once.
pub async fn claim_due_returns_due_unleased_unfinished_sagas<S: SagaStore>(store: S) {
    let ty = crate::testing::unique("claim");
    let past = now() - chrono::Duration::seconds(5);
    let due = saga(&ty, SagaState::Running, Some(past));
    let compensating = saga(&ty, SagaState::Compensating, Some(past));
    let future = saga(
        &ty,
        SagaState::Running,
        Some(now() + chrono::Duration::hours(1)),
    );
    let waiting = saga(&ty, SagaState::Running, None);
    let finished = saga(&ty, SagaState::Completed, Some(past));
    for s in [&due, &compensating, &future, &waiting, &finished] {
        create(&store, s).await;
    }
    let claimed = store
        .claim_due("engine-1", now(), LEASE, 100)
        .await
        .unwrap();
    let mine: Vec<_> = claimed
        .iter()
        .filter(|id| **id == due.id || **id == compensating.id)
        .collect();
    assert_eq!(mine.len(), 2, "{claimed:?}");
    for id in [future.id, waiting.id, finished.id] {
        assert!(!claimed.contains(&id));
    }
    let leased = store.get(due.id).await.unwrap().unwrap();
    assert_eq!(leased.lease_owner.as_deref(), Some("engine-1"));
    let again = store
        .claim_due("engine-2", now(), LEASE, 100)
        .await
        .unwrap();
    assert!(!again.contains(&due.id) && !again.contains(&compensating.id));
}

/// An owner that stopped leaves expired leases; another owner claims those sagas.
pub async fn expired_leases_are_claimed_again<S: SagaStore>(store: S) {
    let stuck = saga(
        "order",
        SagaState::Running,
        Some(now() - chrono::Duration::seconds(1)),
    );
    create(&store, &stuck).await;
    assert!(
        store
            .claim_due("crashed", now(), LEASE, 100)
            .await
            .unwrap()
            .contains(&stuck.id)
    );
    let later = now() + chrono::Duration::seconds(31);
    let reclaimed = store
        .claim_due("survivor", later, LEASE, 100)
        .await
        .unwrap();
    assert!(reclaimed.contains(&stuck.id));
    assert_eq!(
        store
            .get(stuck.id)
            .await
            .unwrap()
            .unwrap()
            .lease_owner
            .as_deref(),
        Some("survivor")
    );
}

/// Saving a saga releases its lease.
pub async fn save_clears_the_lease<S: SagaStore>(store: S) {
    let due = saga(
        "order",
        SagaState::Running,
        Some(now() - chrono::Duration::seconds(1)),
    );
    create(&store, &due).await;
    store
        .claim_due("engine-1", now(), LEASE, 100)
        .await
        .unwrap();
    let mut tx = store.begin().await.unwrap();
    let loaded = store.load(&mut tx, due.id).await.unwrap().unwrap();
    store.save(&mut tx, &loaded).await.unwrap();
    store.commit(tx).await.unwrap();
    let saved = store.get(due.id).await.unwrap().unwrap();
    assert_eq!((saved.lease_owner, saved.lease_until), (None, None));
    assert!(
        store
            .claim_due("engine-2", now(), LEASE, 100)
            .await
            .unwrap()
            .contains(&due.id)
    );
}

/// Listing filters by state, type and start time, oldest first, with a
/// limit.
pub async fn list_filters_by_state_type_and_start<S: SagaStore>(store: S) {
    let ty = crate::testing::unique("list");
    let a = SagaInstance {
        created_at: now() - chrono::Duration::hours(1),
        ..saga(&ty, SagaState::Failed, None)
    };
    let b = saga(&ty, SagaState::Completed, None);
    let c = saga(&ty, SagaState::Failed, None);
    let other = saga("other", SagaState::Failed, None);
    for s in [&a, &b, &c, &other] {
        create(&store, s).await;
    }
    let filter = SagaFilter {
        state: Some(SagaState::Failed),
        saga_type: Some(ty.clone()),
        ..SagaFilter::default()
    };
    let ids: Vec<_> = store
        .list(&filter)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, [a.id, c.id]);
    let one = store
        .list(&SagaFilter {
            limit: 1,
            ..filter.clone()
        })
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    let started_earlier = store
        .list(&SagaFilter {
            started_before: Some(now() - chrono::Duration::minutes(1)),
            ..filter
        })
        .await
        .unwrap();
    assert_eq!(
        started_earlier.iter().map(|s| s.id).collect::<Vec<_>>(),
        [a.id],
        "only the saga started an hour ago"
    );
}

/// The choreography log returns one correlation id's entries in write order.
pub async fn log_keeps_order_per_correlation<S: SagaStore>(store: S) {
    let corr = crate::testing::unique("corr");
    let entry = |consumer: &str, status: LogStatus| SagaLogEntry {
        correlation_id: corr.clone(),
        consumer: consumer.to_owned(),
        message_id: MessageId::new(),
        message_type: format!("{consumer}.event"),
        status,
        emitted: vec!["next.event".to_owned()],
        error: (status == LogStatus::Failed).then(|| "declined".to_owned()),
        at: now(),
    };
    let entries = [
        entry("order", LogStatus::Emitted),
        entry("stock", LogStatus::Handled),
        entry("payment", LogStatus::Failed),
    ];
    for e in &entries {
        let mut tx = store.begin().await.unwrap();
        store.append_log(&mut tx, e).await.unwrap();
        store.commit(tx).await.unwrap();
    }
    let mut tx = store.begin().await.unwrap();
    let mut other = entry("x", LogStatus::Handled);
    "someone-else".clone_into(&mut other.correlation_id);
    store.append_log(&mut tx, &other).await.unwrap();
    drop(tx);
    assert_eq!(store.log(&corr).await.unwrap(), entries);
}

/// Retention deletes sagas that ended COMPLETED or COMPENSATED before the
/// cut-off, oldest first and at most `limit`; never a running,
/// compensating or FAILED saga, nor one that ended after the cut-off.
pub async fn purge_removes_only_old_finished_sagas<S: SagaStore>(store: S) {
    let old = now() - chrono::Duration::hours(2);
    let aged = |state: SagaState, at: DateTime<Utc>| {
        let mut s = saga("order", state, None);
        s.created_at = at;
        s.updated_at = at;
        s
    };
    let oldest = aged(SagaState::Completed, old - chrono::Duration::minutes(5));
    let older = aged(SagaState::Compensated, old);
    let kept = [
        aged(SagaState::Running, old),
        aged(SagaState::Compensating, old),
        aged(SagaState::Failed, old),
        aged(SagaState::Completed, now()),
    ];
    for s in [&oldest, &older].into_iter().chain(&kept) {
        create(&store, s).await;
    }
    let cut = now() - chrono::Duration::hours(1);
    assert_eq!(store.purge_finished(cut, 1).await.unwrap(), 1, "bounded");
    assert_eq!(store.get(oldest.id).await.unwrap(), None, "oldest first");
    assert_eq!(store.purge_finished(cut, 10).await.unwrap(), 1);
    assert_eq!(store.get(older.id).await.unwrap(), None);
    for s in &kept {
        assert!(
            store.get(s.id).await.unwrap().is_some(),
            "a {} saga is kept",
            s.state.as_str()
        );
    }
    assert_eq!(store.purge_finished(cut, 10).await.unwrap(), 0);
}

/// Retention deletes log entries written before the cut-off, at most `limit`.
pub async fn purge_removes_only_old_log_entries<S: SagaStore>(store: S) {
    let corr = crate::testing::unique("corr");
    let entry = |at: DateTime<Utc>| SagaLogEntry {
        correlation_id: corr.clone(),
        consumer: "stock".to_owned(),
        message_id: MessageId::new(),
        message_type: "order.placed".to_owned(),
        status: LogStatus::Handled,
        emitted: Vec::new(),
        error: None,
        at,
    };
    let old = [
        entry(now() - chrono::Duration::hours(3)),
        entry(now() - chrono::Duration::hours(2)),
    ];
    let fresh = entry(now());
    for e in old.iter().chain([&fresh]) {
        let mut tx = store.begin().await.unwrap();
        store.append_log(&mut tx, e).await.unwrap();
        store.commit(tx).await.unwrap();
    }
    let cut = now() - chrono::Duration::hours(1);
    assert_eq!(store.purge_log(cut, 1).await.unwrap(), 1, "bounded");
    assert_eq!(store.purge_log(cut, 10).await.unwrap(), 1);
    assert_eq!(store.log(&corr).await.unwrap(), [fresh]);
}
