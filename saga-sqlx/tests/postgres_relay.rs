//! The relay on a real PostgreSQL outbox: several relays at once, poison
//! messages, a relay aborted mid-batch, and a relay process killed with SIGKILL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use saga_core::testing::{unavailable, unique};
use saga_core::transport::{Capabilities, Subscription};
use saga_core::{DeadLetter, Error, Message, MessageId, OutboxStore, Result, Transport};
use saga_outbox::{Relay, wait_until_delivered};
use saga_sqlx::PostgresStore;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

mod relay_cases;

use relay_cases::{assert_complete_and_ordered, config, fill, label};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/saga_test".to_owned())
}

async fn pool() -> Option<PgPool> {
    let url = database_url();
    match PgPoolOptions::new().max_connections(5).connect(&url).await {
        Ok(pool) => Some(pool),
        Err(error) => unavailable(&format!("PostgreSQL at {url}"), error),
    }
}

async fn store() -> Option<PostgresStore> {
    let store = PostgresStore::with_schema(pool().await?, &unique("r").replace('-', "_")).unwrap();
    store.migrate().await.unwrap();
    Some(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_each_message_exactly_once() {
    let Some(store) = store().await else { return };
    relay_cases::two_relays_publish_each_message_exactly_once(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_rest_flow() {
    let Some(store) = store().await else { return };
    relay_cases::a_poison_message_is_dead_lettered_and_the_rest_flow(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_aborted_mid_batch_loses_nothing() {
    let Some(store) = store().await else { return };
    relay_cases::a_relay_aborted_mid_batch_loses_nothing(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stalled_past_its_lease_cannot_dead_letter() {
    let Some(store) = store().await else { return };
    relay_cases::a_relay_stalled_past_its_lease_cannot_dead_letter(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_workers_end() {
    let Some(store) = store().await else { return };
    relay_cases::dropped_workers_end(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_key_never_have_it_published_twice_at_once() {
    let Some(store) = store().await else { return };
    relay_cases::concurrent_writers_of_one_key_never_have_it_published_twice_at_once(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_published_in_commit_order() {
    let Some(store) = store().await else { return };
    relay_cases::a_key_is_published_in_commit_order(store).await;
}

/// A broker that is a table: a publish is confirmed once its row committed,
/// so what a killed process published stays visible.
struct TableBroker {
    pool: PgPool,
    table: String,
}

#[async_trait]
impl Transport for TableBroker {
    async fn publish(&self, _: &str, message: &Message) -> Result<()> {
        sqlx::query(&format!("INSERT INTO {} (label) VALUES ($1)", self.table))
            .bind(label(message))
            .execute(&self.pool)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(())
    }

    async fn subscribe(&self, _: &str, _: &[String]) -> Result<Box<dyn Subscription>> {
        Err(Error::Config(
            "the table broker only records publishes".into(),
        ))
    }

    /// The table is the only channel: deleting forgets what it recorded.
    async fn delete_channels(&self, _: &[String], _: &[String]) -> Result<()> {
        sqlx::query(&format!("DELETE FROM {}", self.table))
            .execute(&self.pool)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// Nothing is ever dead-lettered into the table.
    async fn dead_letters(&self, _: &str, _: usize) -> Result<Vec<DeadLetter>> {
        Ok(Vec::new())
    }

    async fn replay_dead_letter(&self, _: &str, _: MessageId) -> Result<bool> {
        Ok(false)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_per_key: true,
            replays_history: false,
            redelivers_unacked: false,
        }
    }
}

const CHILD_SCHEMA: &str = "SAGA_SIGKILL_CHILD_SCHEMA";

/// Runs a relay until killed. Started by `a_relay_killed_with_sigkill_loses_nothing`
/// as a child process; it does nothing on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper: the child process of a_relay_killed_with_sigkill_loses_nothing"]
async fn sigkill_child_relay() {
    let Ok(schema) = std::env::var(CHILD_SCHEMA) else {
        return;
    };
    let pool = PgPool::connect(&database_url()).await.unwrap();
    let store = PostgresStore::with_schema(pool.clone(), &schema).unwrap();
    let broker = TableBroker {
        pool,
        table: format!("{schema}.broker"),
    };
    let _relay = Relay::new(store, Arc::new(broker), config("child").batch_size(25)).spawn();
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_sigkill_loses_nothing() {
    let Some(store) = store().await else { return };
    let broker_table = format!("{}.broker", store.schema());
    sqlx::query(&format!(
        "CREATE TABLE {broker_table} (seq BIGSERIAL PRIMARY KEY, label TEXT NOT NULL)"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let (keys, per_key) = (100, 30);
    fill(&store, keys, per_key).await;
    let published = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {broker_table}"))
            .fetch_one(store.pool())
            .await
            .unwrap()
    };

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkill_child_relay",
            "--include-ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_SCHEMA, store.schema())
        .env("DATABASE_URL", database_url())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut waited = 0;
    while published().await < 300 {
        assert!(waited < 600, "the child relay published nothing in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = published().await;
    assert!(
        at_kill < (keys * per_key) as i64,
        "killed before it finished ({at_kill} published)"
    );
    assert!(store.stats().await.unwrap().pending > 0);

    let broker = TableBroker {
        pool: store.pool().clone(),
        table: broker_table.clone(),
    };
    let survivor = Relay::new(store.clone(), Arc::new(broker), config("survivor")).spawn();
    wait_until_delivered(&store, Duration::from_secs(120))
        .await
        .unwrap();
    survivor.shutdown().await;
    let labels: Vec<String> =
        sqlx::query_scalar(&format!("SELECT label FROM {broker_table} ORDER BY seq"))
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_complete_and_ordered(&labels, keys, per_key);
    let duplicates = labels.len() - labels.iter().collect::<HashSet<_>>().len();
    println!(
        "published {} (at the kill: {at_kill}), republished after the kill: {duplicates}",
        labels.len()
    );
}

const SKEWED_SCHEMA: &str = "SAGA_SKEWED_CHILD_SCHEMA";

/// A relay on a host whose clock is 10 minutes ahead, for 3 s. Started by
/// `a_relay_on_a_skewed_host_respects_the_leases_of_others` as a child
/// process; it does nothing on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper: the child process of a_relay_on_a_skewed_host_respects_the_leases_of_others"]
async fn skewed_child_relay() {
    let Ok(schema) = std::env::var(SKEWED_SCHEMA) else {
        return;
    };
    saga_core::clock::skew(chrono::Duration::minutes(10));
    let pool = PgPool::connect(&database_url()).await.unwrap();
    let store = PostgresStore::with_schema(pool.clone(), &schema).unwrap();
    store.migrate().await.unwrap();
    let broker = TableBroker {
        pool,
        table: format!("{schema}.broker"),
    };
    let relay = Relay::new(store, Arc::new(broker), config("skewed")).spawn();
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.shutdown().await;
}

/// Leases are compared on the database's clock: a relay whose host clock is
/// 10 minutes ahead does not see the leases of a live relay as expired, so
/// it does not publish what that relay holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_a_skewed_host_respects_the_leases_of_others() {
    let Some(store) = store().await else { return };
    let broker_table = format!("{}.broker", store.schema());
    sqlx::query(&format!(
        "CREATE TABLE {broker_table} (seq BIGSERIAL PRIMARY KEY, label TEXT NOT NULL)"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    fill(&store, 5, 4).await;
    // The live relay claims every key's head and hangs publishing them,
    // holding their 30 s leases.
    let hanging = saga_core::memory::MemoryTransport::default();
    hanging.on_publish(|_, _| Some(saga_core::memory::PublishFault::Hang));
    let live = Relay::new(
        store.clone(),
        Arc::new(hanging),
        config("live").lease(Duration::from_secs(30)),
    );
    let holding = tokio::spawn(async move { live.run_once().await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "skewed_child_relay",
            "--include-ignored",
            "--test-threads",
            "1",
        ])
        .env(SKEWED_SCHEMA, store.schema())
        .env("DATABASE_URL", database_url())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the skewed relay ran");
    holding.abort();
    let published: Vec<String> =
        sqlx::query_scalar(&format!("SELECT label FROM {broker_table} ORDER BY seq"))
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert!(
        published.is_empty(),
        "the skewed relay took over live leases and published {published:?}"
    );
}
