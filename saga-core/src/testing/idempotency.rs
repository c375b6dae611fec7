//! Conformance cases for [`IdempotencyStore`].

use std::sync::Arc;

use chrono::SubsecRound;
use std::time::Duration;

use crate::clock;
use crate::ids::{MessageId, SagaId};
use crate::message::{Message, OutboxEntry};
use crate::store::{Begin, IdempotencyStore, StepClaim, StepMark};

async fn process<S: IdempotencyStore>(store: &S, consumer: &str, id: MessageId) -> Begin {
    let mut tx = store.begin().await.unwrap();
    let outcome = store
        .begin_processing(&mut tx, consumer, id, clock::now())
        .await
        .unwrap();
    store.commit(tx).await.unwrap();
    outcome
}

/// A reply as backends keep it: the wire format has microsecond times.
fn reply() -> OutboxEntry {
    let mut message = Message::json("stock.reserved", &serde_json::json!({"reserved": 2}))
        .unwrap()
        .with_header("saga_outcome", "success");
    message.time = message.time.trunc_subsecs(6);
    OutboxEntry::new("orders.replies", message)
}

/// The first delivery is fresh; once committed, the same id is a duplicate.
pub async fn first_delivery_is_fresh_then_duplicate<S: IdempotencyStore>(store: S) {
    let id = MessageId::new();
    assert_eq!(process(&store, "stock", id).await, Begin::Fresh);
    assert_eq!(
        process(&store, "stock", id).await,
        Begin::Duplicate { reply: None }
    );
}

/// A rolled-back transaction leaves no record: the message is processed again.
pub async fn rollback_forgets_the_message<S: IdempotencyStore>(store: S) {
    let id = MessageId::new();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store
            .begin_processing(&mut tx, "stock", id, clock::now())
            .await
            .unwrap(),
        Begin::Fresh
    );
    drop(tx);
    assert_eq!(process(&store, "stock", id).await, Begin::Fresh);
}

/// A duplicate comes back with the reply stored the first time.
pub async fn duplicate_returns_the_stored_reply<S: IdempotencyStore>(store: S) {
    let id = MessageId::new();
    let stored = reply();
    let mut tx = store.begin().await.unwrap();
    store
        .begin_processing(&mut tx, "stock", id, clock::now())
        .await
        .unwrap();
    store
        .save_reply(&mut tx, "stock", id, &stored)
        .await
        .unwrap();
    store.commit(tx).await.unwrap();
    assert_eq!(
        process(&store, "stock", id).await,
        Begin::Duplicate {
            reply: Some(stored)
        }
    );
}

/// Each consumer deduplicates on its own.
pub async fn consumers_are_independent<S: IdempotencyStore>(store: S) {
    let id = MessageId::new();
    assert_eq!(process(&store, "stock", id).await, Begin::Fresh);
    assert_eq!(process(&store, "payment", id).await, Begin::Fresh);
}

/// Two deliveries of one message processed at the same time: exactly one is fresh.
pub async fn concurrent_deliveries_are_processed_once<S: IdempotencyStore>(store: S) {
    let store = Arc::new(store);
    let id = MessageId::new();
    let attempt = |store: Arc<S>| async move {
        let mut tx = store.begin().await.unwrap();
        let outcome = store
            .begin_processing(&mut tx, "stock", id, clock::now())
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        match outcome {
            Ok(outcome) => {
                store.commit(tx).await.unwrap();
                outcome
            }
            Err(error) => panic!("begin_processing failed: {error}"),
        }
    };
    let (a, b) = tokio::join!(
        tokio::spawn(attempt(Arc::clone(&store))),
        tokio::spawn(attempt(Arc::clone(&store)))
    );
    let fresh = [a.unwrap(), b.unwrap()]
        .iter()
        .filter(|o| **o == Begin::Fresh)
        .count();
    assert_eq!(fresh, 1);
}

/// A step mark is written once; later claims see it, with the reply stored by `update_step`.
pub async fn step_claim_inserts_then_reports_existing<S: IdempotencyStore>(store: S) {
    let saga = SagaId::new();
    let stored = reply();
    let mut tx = store.begin().await.unwrap();
    let claim = store
        .claim_step(&mut tx, "stock", saga, 0, StepMark::Applied, clock::now())
        .await
        .unwrap();
    assert_eq!(claim, StepClaim::Inserted);
    store
        .update_step(&mut tx, "stock", saga, 0, StepMark::Applied, Some(&stored))
        .await
        .unwrap();
    store.commit(tx).await.unwrap();

    let mut tx = store.begin().await.unwrap();
    let claim = store
        .claim_step(
            &mut tx,
            "stock",
            saga,
            0,
            StepMark::Compensated,
            clock::now(),
        )
        .await
        .unwrap();
    assert_eq!(
        claim,
        StepClaim::Existing {
            mark: StepMark::Applied,
            reply: Some(stored)
        }
    );
    store
        .update_step(&mut tx, "stock", saga, 0, StepMark::Compensated, None)
        .await
        .unwrap();
    store.commit(tx).await.unwrap();

    let mut tx = store.begin().await.unwrap();
    let claim = store
        .claim_step(&mut tx, "stock", saga, 0, StepMark::Applied, clock::now())
        .await
        .unwrap();
    assert_eq!(
        claim,
        StepClaim::Existing {
            mark: StepMark::Compensated,
            reply: None
        }
    );
    let other_step = store
        .claim_step(
            &mut tx,
            "stock",
            saga,
            1,
            StepMark::Compensated,
            clock::now(),
        )
        .await
        .unwrap();
    assert_eq!(other_step, StepClaim::Inserted);
    let other_consumer = store
        .claim_step(&mut tx, "payment", saga, 0, StepMark::Applied, clock::now())
        .await
        .unwrap();
    assert_eq!(other_consumer, StepClaim::Inserted);
}

/// A step mark written in a rolled-back transaction is gone.
pub async fn step_claim_rolls_back_with_the_transaction<S: IdempotencyStore>(store: S) {
    let saga = SagaId::new();
    let mut tx = store.begin().await.unwrap();
    store
        .claim_step(&mut tx, "stock", saga, 2, StepMark::Applied, clock::now())
        .await
        .unwrap();
    drop(tx);
    let mut tx = store.begin().await.unwrap();
    let claim = store
        .claim_step(
            &mut tx,
            "stock",
            saga,
            2,
            StepMark::Compensated,
            clock::now(),
        )
        .await
        .unwrap();
    assert_eq!(claim, StepClaim::Inserted);
}

/// Purge removes records older than the cut-off (their messages count as new
/// again) and keeps younger ones.
pub async fn purge_removes_only_old_records<S: IdempotencyStore>(store: S) {
    let old = MessageId::new();
    let young = MessageId::new();
    let now = clock::now();
    let mut tx = store.begin().await.unwrap();
    store
        .begin_processing(&mut tx, "stock", old, now - chrono::Duration::hours(2))
        .await
        .unwrap();
    store
        .begin_processing(&mut tx, "stock", young, now)
        .await
        .unwrap();
    store.commit(tx).await.unwrap();
    let purged = store
        .purge_expired(now - chrono::Duration::hours(1), 100)
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert_eq!(process(&store, "stock", old).await, Begin::Fresh);
    assert_eq!(
        process(&store, "stock", young).await,
        Begin::Duplicate { reply: None }
    );
}

/// A purge's cut-off is remembered, and an earlier cut-off never moves it back.
pub async fn the_latest_purge_cut_off_is_remembered<S: IdempotencyStore>(store: S) {
    let remembered = async || {
        let mut tx = store.begin().await.unwrap();
        let before = store.marks_purged_before(&mut tx).await.unwrap();
        drop(tx);
        before
    };
    let cut = clock::now().trunc_subsecs(6) - chrono::Duration::hours(1);
    store.purge_expired(cut, 10).await.unwrap();
    assert!(remembered().await >= Some(cut), "{:?}", remembered().await);
    store
        .purge_expired(cut - chrono::Duration::hours(1), 10)
        .await
        .unwrap();
    assert!(
        remembered().await >= Some(cut),
        "an earlier cut-off does not move it back"
    );
}
