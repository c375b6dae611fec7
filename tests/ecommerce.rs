//! The e-commerce example's scenarios (examples/ecommerce) on every backend
//! combination this build has: SQLite databases per service with the
//! in-memory transport, and with each broker transport enabled by a feature.
//!
//! One combination at a time: scenario 8 loads the machine, and the
//! scenarios' deadlines are real time.

#[path = "../examples/ecommerce/scenarios.rs"]
mod scenarios;
#[path = "../examples/ecommerce/shop.rs"]
mod shop;
#[path = "../examples/support/transport.rs"]
mod transport;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn every_scenario(transport: &str) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = std::env::temp_dir().join(format!("saga-ecommerce-test-{}", saga::MessageId::new()));
    let outcomes = match scenarios::run_all(&dir, transport).await {
        Ok(outcomes) => outcomes,
        Err(error) if transport != "memory" && error.is_retryable() => {
            let _ = saga_core::testing::unavailable::<()>(transport, error);
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
    assert_eq!(outcomes.len(), 8, "every scenario ran");
    assert!(failed.is_empty(), "on {transport}:\n{}", failed.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_sqlite_and_memory() {
    every_scenario("memory").await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_sqlite_and_kafka() {
    every_scenario("kafka").await;
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_sqlite_and_rabbitmq() {
    every_scenario("amqp").await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_sqlite_and_redis() {
    every_scenario("redis").await;
}
