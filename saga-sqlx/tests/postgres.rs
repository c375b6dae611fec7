//! The saga-core conformance suites against a real PostgreSQL, one schema per test.
//!
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/saga_test`).

use std::time::Duration;

use saga_core::testing::{unavailable, unique};
use saga_sqlx::PostgresStore;
use sqlx::postgres::PgPoolOptions;

async fn store() -> Option<PostgresStore> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/saga_test".to_owned());
    let pool = match PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
    {
        Ok(pool) => pool,
        Err(error) => return unavailable(&format!("PostgreSQL at {url}"), error),
    };
    let store = PostgresStore::with_schema(pool, &unique("t").replace('-', "_"))
        .expect("a valid schema name");
    store.migrate().await.expect("migrations apply");
    Some(store)
}

mod outbox {
    saga_core::outbox_conformance!(super::store);
}

mod idempotency {
    saga_core::idempotency_conformance!(super::store);
}

mod saga_store {
    saga_core::saga_store_conformance!(super::store);
}

mod relay_cases;

mod engine {
    saga_core::engine_conformance!(super::store, super::relay_cases::spawn_relay);
}

#[tokio::test]
async fn migrating_twice_changes_nothing() {
    let Some(store) = store().await else { return };
    store.migrate().await.unwrap();
}

/// One notification per committing transaction, none for a rolled-back one,
/// and a waiting relay wakes at the commit instead of at its poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_notifies_once_per_committed_transaction() {
    use saga_core::{Message, OutboxEntry, OutboxStore, Transactional};
    use sqlx::postgres::PgListener;

    let Some(store) = store().await else { return };
    let mut listener = PgListener::connect_with(store.pool()).await.unwrap();
    listener.listen(&store.notify_channel()).await.unwrap();
    let entry = || OutboxEntry::new("orders", Message::new("order.placed", b"{}".to_vec()));
    let quiet = Duration::from_millis(500);

    let mut tx = store.begin().await.unwrap();
    store.enqueue(&mut tx, &[entry()]).await.unwrap();
    drop(tx);
    assert!(
        tokio::time::timeout(quiet, listener.recv()).await.is_err(),
        "a rollback notifies nobody"
    );

    let mut tx = store.begin().await.unwrap();
    for _ in 0..3 {
        store.enqueue(&mut tx, &[entry(), entry()]).await.unwrap();
    }
    store.commit(tx).await.unwrap();
    tokio::time::timeout(quiet, listener.recv())
        .await
        .expect("notified at commit")
        .unwrap();
    assert!(
        tokio::time::timeout(quiet, listener.recv()).await.is_err(),
        "six rows, one notification"
    );

    let waiter = store.clone();
    let waiting =
        tokio::spawn(async move { waiter.wait_for_messages(Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tx = store.begin().await.unwrap();
    store.enqueue(&mut tx, &[entry()]).await.unwrap();
    store.commit(tx).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("woken by the commit, not at the 30 s poll interval")
        .unwrap();
}

/// A message that commits after a newer one of its key was claimed (two
/// writers, the older one slower) is not claimed while that one is in
/// flight: two relays would publish the key at once, and the broker would
/// pick their order. `enqueue` makes the second writer of a key wait for
/// the first, so only a writer that bypasses it (a version of the library
/// before that lock, during a rolling deploy) commits the key out of
/// order: the slow writer here inserts its row as such a version did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_does_not_open_a_second_line_for_its_key() {
    use saga_core::store::ClaimRequest;
    use saga_core::{Message, OutboxEntry, OutboxStore, Transactional};
    let Some(store) = store().await else { return };
    let entry = |label: &str| {
        OutboxEntry::new(
            "events",
            Message::new("test.event", label.as_bytes().to_vec()).with_ordering_key("k"),
        )
    };
    let mut slow = store.begin().await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO {}.saga_outbox (channel, message_id, ordering_key, headers, payload, created_at, retry_at) \
         VALUES ('events', $1, 'k', '{{}}', 'older', now(), now())",
        store.schema()
    ))
    .bind(saga_core::MessageId::new().as_uuid())
    .execute(&mut *slow)
    .await
    .unwrap();
    let mut fast = store.begin().await.unwrap();
    store.enqueue(&mut fast, &[entry("newer")]).await.unwrap();
    store.commit(fast).await.unwrap();
    let claim = |owner: &str| ClaimRequest {
        owner: owner.to_owned(),
        limit: 10,
        now: saga_core::clock::now(),
        lease: Duration::from_secs(30),
    };
    let first = store.claim(&claim("relay-a")).await.unwrap();
    assert_eq!(first.len(), 1, "the committed message is the key's head");
    store.commit(slow).await.unwrap();
    let second = store.claim(&claim("relay-b")).await.unwrap();
    let labels: Vec<String> = second
        .iter()
        .map(|r| String::from_utf8_lossy(&r.entry.message.payload).into_owned())
        .collect();
    assert!(
        labels.is_empty(),
        "claimed {labels:?} while relay-a still publishes the key"
    );
}

/// A second writer of a key waits at `enqueue` until the first committed,
/// so a key's `seq`s are its commit order; writers of other keys do not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_of_a_key_waits_for_the_first_to_commit() {
    use saga_core::{Message, OutboxEntry, OutboxStore, Transactional};
    let Some(store) = store().await else { return };
    let entry = |key: &str| {
        OutboxEntry::new(
            "events",
            Message::new("test.event", b"{}".to_vec()).with_ordering_key(key),
        )
    };
    let mut first = store.begin().await.unwrap();
    store.enqueue(&mut first, &[entry("k")]).await.unwrap();
    let mut other_key = store.begin().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        store.enqueue(&mut other_key, &[entry("j")]),
    )
    .await
    .expect("a writer of another key does not wait")
    .unwrap();
    store.commit(other_key).await.unwrap();
    let second = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tx = store.begin().await.unwrap();
            store.enqueue(&mut tx, &[entry("k")]).await.unwrap();
            store.commit(tx).await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "the second writer of the key committed while the first was open"
    );
    store.commit(first).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the second writer goes on once the first committed")
        .unwrap();
}

/// A database that refuses connections for a while (restarting, or
/// `ALLOW_CONNECTIONS false` as here) is a retryable failure to begin, so
/// a consumer waits for it instead of dead-lettering what it was handling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_refusing_connections_is_retryable() {
    use saga_core::Transactional;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/saga_test".to_owned());
    let Some(admin) = sqlx::PgPool::connect(&url)
        .await
        .map_or_else(|e| unavailable(&format!("PostgreSQL at {url}"), e), Some)
    else {
        return;
    };
    let database = unique("refusing").replace('-', "_");
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&admin)
        .await
        .unwrap();
    let server = url
        .rsplit_once('/')
        .map_or(url.as_str(), |(server, _)| server);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&format!("{server}/{database}"))
        .await
        .unwrap();
    let store = PostgresStore::new(pool.clone());
    store.migrate().await.unwrap();
    for sql in [
        format!("ALTER DATABASE {database} ALLOW_CONNECTIONS false"),
        format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
        ),
    ] {
        sqlx::query(&sql).execute(&admin).await.unwrap();
    }
    let refused = store.begin().await.err();
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    let error = refused.expect("no transaction begins while the database refuses connections");
    assert!(
        error.is_retryable(),
        "a database refusing connections is worth waiting for: {error}"
    );
}
