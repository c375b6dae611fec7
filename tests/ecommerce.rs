//! The e-commerce example's scenarios (examples/ecommerce) on every backend
//! combination this build has, orchestrated and choreographed: SQLite files
//! with the in-memory transport, and PostgreSQL with each broker transport
//! enabled by a feature.
//!
//! One combination at a time: scenario 8 loads the machine, and the
//! scenarios' deadlines are real time.

#[path = "../examples/ecommerce/scenarios.rs"]
mod scenarios;
#[path = "../examples/ecommerce/shop.rs"]
mod shop;
#[path = "../examples/support/transport.rs"]
mod transport;

use shop::Databases;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn run_id() -> String {
    let id = saga::MessageId::new().to_string().replace('-', "");
    id[id.len() - 12..].to_owned()
}

async fn every_scenario(databases: Databases, transport: &str, choreography: bool) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let config = shop::ShopConfig {
        choreography,
        ..shop::ShopConfig::default()
    };
    let outcomes = match scenarios::run_all(&databases, transport, &config).await {
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
    // Scenario 7 (a step deadline) exists only with an orchestrator.
    assert_eq!(
        outcomes.len(),
        if choreography { 7 } else { 8 },
        "every scenario ran"
    );
    assert!(failed.is_empty(), "on {transport}:\n{}", failed.join("\n"));
}

async fn every_scenario_on_sqlite(choreography: bool) {
    let dir = std::env::temp_dir().join(format!("saga-ecommerce-test-{}", run_id()));
    every_scenario(Databases::Sqlite(dir.clone()), "memory", choreography).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_sqlite_and_memory() {
    every_scenario_on_sqlite(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_sqlite_and_memory_by_choreography() {
    every_scenario_on_sqlite(true).await;
}

/// The PostgreSQL server for the service databases (`ECOMMERCE_POSTGRES`),
/// and a guard that drops the run's databases afterwards.
#[cfg(all(
    feature = "postgres",
    any(feature = "kafka", feature = "amqp", feature = "redis")
))]
struct Postgres {
    server: String,
    prefix: String,
}

#[cfg(all(
    feature = "postgres",
    any(feature = "kafka", feature = "amqp", feature = "redis")
))]
impl Postgres {
    fn new() -> Self {
        Self {
            server: std::env::var("ECOMMERCE_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into()),
            prefix: format!("ecommerce_test_{}", run_id()),
        }
    }

    fn databases(&self) -> Databases {
        Databases::Postgres {
            server: self.server.clone(),
            prefix: self.prefix.clone(),
        }
    }

    async fn drop_databases(&self) {
        let Ok(admin) = sqlx::PgPool::connect(&format!("{}/postgres", self.server)).await else {
            return;
        };
        let names: Vec<String> =
            sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
                .bind(format!("{}%", self.prefix))
                .fetch_all(&admin)
                .await
                .unwrap_or_default();
        for name in names {
            let _ = sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
                .execute(&admin)
                .await;
        }
    }
}

#[cfg(all(
    feature = "postgres",
    any(feature = "kafka", feature = "amqp", feature = "redis")
))]
/// Both modes, one after the other.
async fn every_scenario_on_postgres(transport: &str) {
    for choreography in [false, true] {
        let postgres = Postgres::new();
        every_scenario(postgres.databases(), transport, choreography).await;
        postgres.drop_databases().await;
    }
}

#[cfg(all(feature = "postgres", feature = "kafka"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_postgres_and_kafka() {
    every_scenario_on_postgres("kafka").await;
}

#[cfg(all(feature = "postgres", feature = "amqp"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_postgres_and_rabbitmq() {
    every_scenario_on_postgres("amqp").await;
}

#[cfg(all(feature = "postgres", feature = "redis"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_postgres_and_redis() {
    every_scenario_on_postgres("redis").await;
}
