//! The e-commerce example's scenarios (examples/ecommerce) on every backend
//! combination this build has, orchestrated and choreographed: SQLite files
//! with the in-memory transport, and PostgreSQL with each broker transport
//! enabled by a feature.
//!
//! One combination at a time: scenario 8 loads the machine, and the
//! scenarios' deadlines are real time.

#[path = "../examples/ecommerce/faults.rs"]
mod faults;
#[path = "../examples/ecommerce/scenarios.rs"]
mod scenarios;
#[path = "../examples/ecommerce/shop.rs"]
mod shop;
#[path = "../examples/support/transport.rs"]
mod transport;

use shop::Databases;
use transport::TransportKind;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn run_id() -> String {
    let id = saga::MessageId::new().to_string().replace('-', "");
    format!("ecommerce_test_{}", &id[id.len() - 12..])
}

/// Every scenario on `databases`, which are removed afterwards.
async fn every_scenario(databases: Databases, transport: TransportKind, choreography: bool) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let config = shop::ShopConfig {
        choreography,
        ..shop::ShopConfig::default()
    };
    let outcomes = scenarios::run_all(&databases, transport, &run_id(), &config, false).await;
    databases
        .remove()
        .await
        .expect("the run's databases are removed");
    let outcomes = match outcomes {
        Ok(outcomes) => outcomes,
        Err(error) if error.is_retryable() => {
            let _ = saga_core::testing::unavailable::<()>(
                &format!("{transport} or the database"),
                error,
            );
            return;
        }
        Err(error) => panic!("the scenarios on {transport} stopped: {error}"),
    };
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| {
            format!(
                "{} ({:.1} s): expected {}, got {}",
                o.scenario,
                o.elapsed.as_secs_f64(),
                o.expected,
                o.got
            )
        })
        .collect();
    // Scenarios 7 and 9 (step deadlines) exist only with an orchestrator.
    assert_eq!(
        outcomes.len(),
        if choreography { 7 } else { 9 },
        "every scenario ran"
    );
    assert!(failed.is_empty(), "on {transport}:\n{}", failed.join("\n"));
}

async fn every_scenario_on_sqlite(choreography: bool) {
    let dir = std::env::temp_dir().join(run_id());
    every_scenario(Databases::Sqlite(dir), TransportKind::Memory, choreography).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_sqlite_and_memory() {
    every_scenario_on_sqlite(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_sqlite_and_memory_by_choreography() {
    every_scenario_on_sqlite(true).await;
}

/// Both modes, one after the other, on PostgreSQL databases of their own at
/// `ECOMMERCE_POSTGRES`.
#[cfg(all(
    feature = "postgres",
    any(feature = "kafka", feature = "amqp", feature = "redis")
))]
async fn every_scenario_on_postgres(transport: TransportKind) {
    let server = std::env::var("ECOMMERCE_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    for choreography in [false, true] {
        let databases = Databases::Postgres {
            server: server.clone(),
            prefix: run_id(),
        };
        every_scenario(databases, transport, choreography).await;
    }
}

#[cfg(all(feature = "postgres", feature = "kafka"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_postgres_and_kafka() {
    every_scenario_on_postgres(TransportKind::Kafka).await;
}

#[cfg(all(feature = "postgres", feature = "amqp"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_postgres_and_rabbitmq() {
    every_scenario_on_postgres(TransportKind::Amqp).await;
}

#[cfg(all(feature = "postgres", feature = "redis"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_postgres_and_redis() {
    every_scenario_on_postgres(TransportKind::Redis).await;
}
