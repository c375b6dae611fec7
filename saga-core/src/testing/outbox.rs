//! Conformance cases for [`OutboxStore`].

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};

use crate::clock::{self, to_chrono};
use crate::message::{Message, OutboxEntry};
use crate::store::{ClaimRequest, OutboxStore};

const LEASE: Duration = Duration::from_secs(30);

/// A message as backends keep it: the wire format has microsecond times.
fn entry(key: Option<&str>, label: &str) -> OutboxEntry {
    let mut message = Message::new("test.event", label.as_bytes().to_vec());
    message.time = message.time.trunc_subsecs(6);
    message.ordering_key = key.map(str::to_owned);
    OutboxEntry::new("orders", message)
}

fn request(owner: &str, limit: usize, now: DateTime<Utc>) -> ClaimRequest {
    ClaimRequest {
        owner: owner.to_owned(),
        limit,
        now,
        lease: LEASE,
    }
}

fn labels(records: &[crate::store::OutboxRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.entry.message.payload).into_owned())
        .collect()
}

async fn enqueue<S: OutboxStore>(store: &S, entries: &[OutboxEntry]) {
    let mut tx = store.begin().await.expect("begin");
    store.enqueue(&mut tx, entries).await.expect("enqueue");
    store.commit(tx).await.expect("commit");
}

/// Far enough ahead that every record is due and every lease expired.
fn later(seconds: i64) -> DateTime<Utc> {
    clock::now() + chrono::Duration::seconds(seconds)
}

/// Messages enqueued in a committed transaction can be claimed, whole and in order.
pub async fn enqueue_commits_with_the_transaction<S: OutboxStore>(store: S) {
    let entries = [entry(None, "a"), entry(None, "b")];
    enqueue(&store, &entries).await;
    let claimed = store.claim(&request("r1", 10, later(1))).await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert_eq!(claimed[0].entry, entries[0]);
    assert_eq!(claimed[1].entry, entries[1]);
    assert!(claimed[0].seq < claimed[1].seq);
    assert_eq!(claimed[0].attempts, 0);
}

/// A transaction dropped without commit leaves no message behind.
pub async fn rollback_discards_enqueued_messages<S: OutboxStore>(store: S) {
    let mut tx = store.begin().await.unwrap();
    store.enqueue(&mut tx, &[entry(None, "a")]).await.unwrap();
    drop(tx);
    assert!(
        store
            .claim(&request("r1", 10, later(1)))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.stats().await.unwrap().pending, 0);
}

/// A claim returns at most `limit` records, oldest first; the rest stay for the next claim.
pub async fn claim_respects_limit_and_order<S: OutboxStore>(store: S) {
    let entries: Vec<_> = (0..5).map(|i| entry(None, &format!("m{i}"))).collect();
    enqueue(&store, &entries).await;
    let now = later(1);
    let first = store.claim(&request("r1", 3, now)).await.unwrap();
    assert_eq!(labels(&first), ["m0", "m1", "m2"]);
    let second = store.claim(&request("r2", 10, now)).await.unwrap();
    assert_eq!(labels(&second), ["m3", "m4"]);
}

/// A leased record is invisible to other relays until the lease expires.
pub async fn claimed_records_are_leased<S: OutboxStore>(store: S) {
    enqueue(&store, &[entry(None, "a")]).await;
    let now = later(1);
    assert_eq!(store.claim(&request("r1", 10, now)).await.unwrap().len(), 1);
    assert!(
        store
            .claim(&request("r2", 10, now))
            .await
            .unwrap()
            .is_empty()
    );
    let expired = now + to_chrono(LEASE) + chrono::Duration::seconds(1);
    let again = store.claim(&request("r2", 10, expired)).await.unwrap();
    assert_eq!(labels(&again), ["a"], "an expired lease frees the record");
}

/// Once marked published, a record never comes back, lease or not.
pub async fn published_records_are_never_claimed_again<S: OutboxStore>(store: S) {
    enqueue(&store, &[entry(None, "a"), entry(None, "b")]).await;
    let now = later(1);
    let claimed = store.claim(&request("r1", 10, now)).await.unwrap();
    store
        .mark_published("r1", &[claimed[0].seq], now)
        .await
        .unwrap();
    let far = later(3600);
    assert_eq!(
        labels(&store.claim(&request("r2", 10, far)).await.unwrap()),
        ["b"]
    );
    assert_eq!(store.stats().await.unwrap().pending, 1);
}

/// Message k+1 of a key is not handed out while message k waits for its
/// retry; other keys keep flowing.
pub async fn per_key_order_holds_while_the_head_waits<S: OutboxStore>(store: S) {
    enqueue(
        &store,
        &[
            entry(Some("k1"), "k1-a"),
            entry(Some("k1"), "k1-b"),
            entry(Some("k2"), "k2-a"),
        ],
    )
    .await;
    let now = later(1);
    let claimed = store.claim(&request("r1", 10, now)).await.unwrap();
    let got = labels(&claimed);
    assert!(
        got.contains(&"k1-a".to_owned()) && got.contains(&"k2-a".to_owned()),
        "{got:?}"
    );
    if let Some(b) = got.iter().position(|l| l == "k1-b") {
        let a = got.iter().position(|l| l == "k1-a").unwrap();
        assert!(a < b, "a key's records come in order: {got:?}");
    }
    let seq = |label: &str| claimed[got.iter().position(|l| l == label).unwrap()].seq;
    store
        .record_failure(
            "r1",
            seq("k1-a"),
            "broker down",
            now + chrono::Duration::seconds(60),
        )
        .await
        .unwrap();
    store
        .mark_published("r1", &[seq("k2-a")], now)
        .await
        .unwrap();
    store.release("r1", &[]).await.unwrap();
    enqueue(&store, &[entry(Some("k2"), "k2-b")]).await;
    let meanwhile = labels(&store.claim(&request("r2", 10, now)).await.unwrap());
    assert_eq!(meanwhile, ["k2-b"], "k1-b must wait behind k1-a; k2 flows");
    let after = labels(
        &store
            .claim(&request("r3", 10, now + chrono::Duration::seconds(61)))
            .await
            .unwrap(),
    );
    assert_eq!(after.first().map(String::as_str), Some("k1-a"), "{after:?}");
}

/// A failure counts an attempt, keeps the error and hides the record until its retry time.
pub async fn failure_counts_attempts_and_delays<S: OutboxStore>(store: S) {
    enqueue(&store, &[entry(None, "a")]).await;
    let now = later(1);
    let claimed = store.claim(&request("r1", 10, now)).await.unwrap();
    store
        .record_failure(
            "r1",
            claimed[0].seq,
            "boom",
            now + chrono::Duration::seconds(5),
        )
        .await
        .unwrap();
    assert!(
        store
            .claim(&request("r1", 10, now))
            .await
            .unwrap()
            .is_empty()
    );
    let retried = store
        .claim(&request("r1", 10, now + chrono::Duration::seconds(6)))
        .await
        .unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].attempts, 1);
    assert_eq!(retried[0].last_error.as_deref(), Some("boom"));
}

/// A dead letter leaves its key's line (the next message flows), is listed
/// with its error, and can be put back.
pub async fn dead_letters_leave_the_line_and_can_be_requeued<S: OutboxStore>(store: S) {
    enqueue(
        &store,
        &[entry(Some("k"), "poison"), entry(Some("k"), "next")],
    )
    .await;
    let now = later(1);
    let claimed = store.claim(&request("r1", 1, now)).await.unwrap();
    assert_eq!(labels(&claimed), ["poison"]);
    store
        .dead_letter("r1", claimed[0].seq, "rejected by broker", now)
        .await
        .unwrap();
    assert_eq!(
        labels(&store.claim(&request("r1", 10, now)).await.unwrap()),
        ["next"]
    );
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error, "rejected by broker");
    assert_eq!(dead[0].record.entry, claimed[0].entry);
    assert_eq!(store.stats().await.unwrap().dead, 1);
    assert!(store.requeue_dead_letter(claimed[0].seq).await.unwrap());
    assert!(!store.requeue_dead_letter(claimed[0].seq).await.unwrap());
    assert!(store.dead_letters(10).await.unwrap().is_empty());
    let again = store.claim(&request("r2", 10, later(3600))).await.unwrap();
    assert!(labels(&again).contains(&"poison".to_owned()));
    assert_eq!(
        again
            .iter()
            .find(|r| r.seq == claimed[0].seq)
            .unwrap()
            .attempts,
        0
    );
}

/// A relay whose lease expired and was taken over cannot write over the
/// relay that took over: its mark, failure and dead letter are refused
/// (fencing), so a message is never both published and dead, and message
/// k+1 never overtakes a message k that the new owner still publishes.
pub async fn writes_of_a_relay_that_lost_its_lease_are_refused<S: OutboxStore>(store: S) {
    enqueue(
        &store,
        &[
            entry(Some("k"), "k-0"),
            entry(Some("k"), "k-1"),
            entry(None, "x"),
            entry(None, "y"),
        ],
    )
    .await;
    let now = later(1);
    let stale = store.claim(&request("stale", 10, now)).await.unwrap();
    let seq = |label: &str| stale[labels(&stale).iter().position(|l| l == label).unwrap()].seq;
    let expired = now + to_chrono(LEASE) + chrono::Duration::seconds(1);
    let taken = store.claim(&request("fresh", 10, expired)).await.unwrap();
    assert!(
        labels(&taken).contains(&"k-0".to_owned()),
        "an expired lease is taken over: {:?}",
        labels(&taken)
    );
    assert!(
        !store
            .dead_letter("stale", seq("k-0"), "rejected, too late", expired)
            .await
            .unwrap(),
        "the old owner cannot dead-letter what another relay holds"
    );
    assert!(
        !store
            .record_failure("stale", seq("x"), "timed out, too late", expired)
            .await
            .unwrap(),
        "nor record a failure on it"
    );
    assert_eq!(
        store
            .mark_published("stale", &[seq("y")], expired)
            .await
            .unwrap(),
        0,
        "nor mark it published"
    );
    assert!(store.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(
        store.claim(&request("third", 10, expired)).await.unwrap(),
        [],
        "k-1 waits behind k-0, which the new owner still holds"
    );
    assert_eq!(
        store
            .mark_published("fresh", &[seq("k-0")], expired)
            .await
            .unwrap(),
        1,
        "the owner's own writes go through"
    );
    store.release("fresh", &[]).await.unwrap();
    let next = labels(&store.claim(&request("third", 10, expired)).await.unwrap());
    assert!(next.contains(&"k-1".to_owned()), "{next:?}");
}

/// A message is pending from its commit until it is published or
/// dead-lettered, as a transaction sees it.
pub async fn pending_messages_are_found_by_id<S: OutboxStore>(store: S) {
    let (a, b, c) = (entry(None, "a"), entry(None, "b"), entry(None, "c"));
    enqueue(&store, &[a.clone(), b.clone(), c.clone()]).await;
    let pending = async |id| {
        let mut tx = store.begin().await.unwrap();
        let pending = store.is_pending(&mut tx, id).await.unwrap();
        drop(tx);
        pending
    };
    assert!(pending(a.message.id).await);
    assert!(
        !pending(crate::MessageId::new()).await,
        "an unknown id is not pending"
    );
    let now = later(1);
    let claimed = store.claim(&request("r1", 10, now)).await.unwrap();
    let seq = |label: &str| claimed[labels(&claimed).iter().position(|l| l == label).unwrap()].seq;
    assert!(pending(a.message.id).await, "claimed is still pending");
    store.mark_published("r1", &[seq("a")], now).await.unwrap();
    store
        .dead_letter("r1", seq("b"), "refused", now)
        .await
        .unwrap();
    assert!(!pending(a.message.id).await, "published");
    assert!(!pending(b.message.id).await, "dead-lettered");
    assert!(pending(c.message.id).await);
}

/// Released records are claimable at once, with no attempt counted.
pub async fn release_returns_records_without_an_attempt<S: OutboxStore>(store: S) {
    enqueue(&store, &[entry(None, "a"), entry(None, "b")]).await;
    let now = later(1);
    assert_eq!(store.claim(&request("r1", 10, now)).await.unwrap().len(), 2);
    assert_eq!(store.release("r1", &[]).await.unwrap(), 2);
    let claimed = store.claim(&request("r2", 10, now)).await.unwrap();
    assert_eq!(labels(&claimed), ["a", "b"]);
    assert!(claimed.iter().all(|r| r.attempts == 0));
}

/// Purge deletes published records older than the cut-off, and nothing pending.
pub async fn purge_deletes_only_old_published_records<S: OutboxStore>(store: S) {
    enqueue(
        &store,
        &[entry(None, "a"), entry(None, "b"), entry(None, "c")],
    )
    .await;
    let now = later(1);
    let claimed = store.claim(&request("r1", 2, now)).await.unwrap();
    store
        .mark_published(
            "r1",
            &claimed.iter().map(|r| r.seq).collect::<Vec<_>>(),
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .purge_published(now - chrono::Duration::seconds(1), 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .purge_published(now + chrono::Duration::seconds(1), 1)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .purge_published(now + chrono::Duration::seconds(1), 10)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.stats().await.unwrap().pending, 1);
    assert_eq!(
        labels(&store.claim(&request("r1", 10, now)).await.unwrap()),
        ["c"]
    );
}

/// Stats count pending and dead records and date the oldest pending one.
pub async fn stats_report_pending_dead_and_oldest<S: OutboxStore>(store: S) {
    assert_eq!(store.stats().await.unwrap().oldest_pending, None);
    let before = clock::now() - chrono::Duration::seconds(5);
    enqueue(&store, &[entry(None, "a"), entry(None, "b")]).await;
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.pending, 2);
    assert_eq!(stats.dead, 0);
    let oldest = stats.oldest_pending.expect("oldest pending");
    assert!(oldest >= before && oldest <= later(5), "{oldest}");
}

/// Two relays claiming at the same time never get the same record.
pub async fn concurrent_claims_never_overlap<S: OutboxStore>(store: S) {
    let entries: Vec<_> = (0..60)
        .map(|i| entry(Some(&format!("k{i}")), &format!("m{i}")))
        .collect();
    enqueue(&store, &entries).await;
    let now = later(1);
    let (first, second) = (request("r1", 30, now), request("r2", 30, now));
    let (a, b) = tokio::join!(store.claim(&first), store.claim(&second));
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut seen = HashSet::new();
    for record in a.iter().chain(&b) {
        assert!(
            seen.insert(record.seq),
            "record {} claimed twice",
            record.seq
        );
    }
    let rest = store.claim(&request("r3", 100, now)).await.unwrap();
    assert_eq!(seen.len() + rest.len(), 60);
}

/// Callers whose `begin` or `commit` is cancelled midway (an aborted task, a
/// `select!`, a timeout) leave no connection inside a transaction: every
/// transaction afterwards begins at once, and what it commits is there.
pub async fn cancelled_begins_and_commits_leave_the_store_usable<S: OutboxStore>(store: S) {
    let mut rng = fastrand::Rng::with_seed(0x5a6a);
    for _ in 0..300 {
        let wait = Duration::from_micros(rng.u64(0..3000));
        if let Ok(Ok(mut tx)) = tokio::time::timeout(wait, store.begin()).await {
            store
                .enqueue(&mut tx, &[entry(None, "maybe")])
                .await
                .expect("enqueue");
            let wait = Duration::from_micros(rng.u64(0..3000));
            let _ = tokio::time::timeout(wait, store.commit(tx)).await;
        }
    }
    for index in 0..16 {
        let committed = tokio::time::timeout(Duration::from_secs(10), async {
            let mut tx = store.begin().await?;
            store
                .enqueue(&mut tx, &[entry(None, &format!("sure-{index}"))])
                .await?;
            store.commit(tx).await
        })
        .await;
        assert!(
            matches!(committed, Ok(Ok(()))),
            "transaction {index} after the cancellations: {committed:?}"
        );
    }
    // Counted by label: a commit whose caller gave up may still land after
    // the loop above (it runs to its end on a task of its own).
    let claimed = store
        .claim(&request(
            "counter",
            10_000,
            store.now().await + chrono::Duration::seconds(1),
        ))
        .await
        .expect("claim");
    let sure = claimed
        .iter()
        .filter(|r| r.entry.message.payload.starts_with(b"sure-"))
        .count();
    assert_eq!(sure, 16, "every committed message is there");
}
