//! The saga engine end to end on PostgreSQL (see `engine_case`).

#[macro_use]
mod engine_case;

use saga_core::testing::{unavailable, unique};
use saga_sqlx::PostgresStore;
use sqlx::postgres::PgPoolOptions;

/// A store on its own schema, with a `stock` table in it.
async fn store() -> Option<(PostgresStore, String)> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/saga_test".to_owned());
    let pool = match PgPoolOptions::new().max_connections(5).connect(&url).await {
        Ok(pool) => pool,
        Err(error) => return unavailable(&format!("PostgreSQL at {url}"), error),
    };
    let store = PostgresStore::with_schema(pool, &unique("e").replace('-', "_")).unwrap();
    store.migrate().await.unwrap();
    let schema = store.schema().to_owned();
    sqlx::query(&format!(
        "CREATE TABLE {schema}.stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL CHECK (available >= 0))"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    Some((store, schema))
}

engine_case!(
    PostgresStore,
    sqlx::Transaction<'static, sqlx::Postgres>,
    store
);

/// Deadlines are compared on the database's clock: an orchestrator on a host
/// whose clock is 10 minutes ahead does not time out a step whose 60 s
/// deadline has just started, and one on a host 10 minutes behind does not
/// start a deadline that has already passed for everyone else.
mod skewed_host {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use saga_core::memory::MemoryTransport;
    use saga_core::{
        Orchestrator, OrchestratorConfig, SagaDefinition, SagaId, SagaState, SagaStep,
        StartOptions, StepContext, StepError, StepOutcome, StepStatus, Transactional,
    };
    use saga_outbox::{Relay, RelayConfig};
    use saga_sqlx::PostgresStore;

    type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

    const SCHEMA: &str = "SAGA_SKEWED_ORCHESTRATOR_SCHEMA";
    /// How far the child's clock is off, in minutes (negative: behind).
    const SKEW: &str = "SAGA_SKEW_MINUTES";

    /// Sets this process's clock off as the parent asked.
    fn skew_as_asked() {
        let minutes: i64 = std::env::var(SKEW).unwrap().parse().unwrap();
        saga_core::clock::skew(chrono::Duration::minutes(minutes));
    }

    /// A remote step nobody answers, with the default 60 s deadline.
    struct Unanswered;

    #[async_trait]
    impl SagaStep<serde_json::Value, Tx> for Unanswered {
        fn name(&self) -> &str {
            "unanswered"
        }
        async fn execute(
            &self,
            _: &mut StepContext<'_, Tx>,
            data: &mut serde_json::Value,
        ) -> Result<StepOutcome, StepError> {
            StepOutcome::send_json("nobody.commands", "nobody.ask", data)
        }
        async fn compensate(
            &self,
            _: &mut StepContext<'_, Tx>,
            _: &mut serde_json::Value,
        ) -> Result<StepOutcome, StepError> {
            Ok(StepOutcome::Done)
        }
    }

    fn orchestrator(
        store: &PostgresStore,
        transport: &MemoryTransport,
    ) -> Orchestrator<PostgresStore> {
        Orchestrator::builder(
            store.clone(),
            Arc::new(transport.clone()),
            OrchestratorConfig::new("orders").poll_interval(Duration::from_millis(20)),
        )
        .saga(SagaDefinition::<serde_json::Value, Tx>::new("asking").step(Unanswered))
        .build()
    }

    fn database_url() -> String {
        std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/saga_test".to_owned())
    }

    /// An orchestrator on a skewed host, for 3 s. Started by
    /// `an_orchestrator_on_a_skewed_host_keeps_the_deadlines` as a child
    /// process; it does nothing on its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "helper: the child process of an_orchestrator_on_a_skewed_host_keeps_the_deadlines"]
    async fn skewed_child_orchestrator() {
        let Ok(schema) = std::env::var(SCHEMA) else {
            return;
        };
        skew_as_asked();
        let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
        let store = PostgresStore::with_schema(pool, &schema).unwrap();
        let worker = orchestrator(&store, &MemoryTransport::default())
            .spawn()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        worker.shutdown().await;
    }

    /// The saga the skewed child starts.
    const SAGA: &str = "SAGA_SKEWED_SAGA_ID";

    /// Starts a saga (`SAGA`) on a skewed host: its first step sends the
    /// command, in the starting transaction. Started by
    /// `an_orchestrator_on_a_host_behind_starts_deadlines_on_the_database_clock`.
    #[tokio::test]
    #[ignore = "helper: the child process of an_orchestrator_on_a_host_behind_starts_deadlines_on_the_database_clock"]
    async fn skewed_child_starting() {
        let (Ok(schema), Ok(id)) = (std::env::var(SCHEMA), std::env::var(SAGA)) else {
            return;
        };
        skew_as_asked();
        let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
        let store = PostgresStore::with_schema(pool, &schema).unwrap();
        let options = StartOptions {
            id: Some(id.parse().unwrap()),
            ..StartOptions::default()
        };
        let mut tx = store.begin().await.unwrap();
        orchestrator(&store, &MemoryTransport::default())
            .start_with(&mut tx, "asking", &serde_json::json!({"order": 2}), options)
            .await
            .unwrap();
        store.commit(tx).await.unwrap();
    }

    /// Runs `helper` in a child process whose clock is `minutes` off, on
    /// `schema`; whether it passed.
    fn child(helper: &str, minutes: i64, schema: &str, saga: Option<SagaId>) -> bool {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("skewed_host::{helper}"),
                "--include-ignored",
                "--test-threads",
                "1",
            ])
            .env(SCHEMA, schema)
            .env(SKEW, minutes.to_string())
            .env(SAGA, saga.map(|id| id.to_string()).unwrap_or_default())
            .env("DATABASE_URL", database_url())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// A store on a host 10 minutes ahead whose only connection is taken,
    /// asked the time for the first time. Started by
    /// `the_first_time_read_is_the_servers_even_with_the_pool_taken`.
    #[tokio::test]
    #[ignore = "helper: the child process of the_first_time_read_is_the_servers_even_with_the_pool_taken"]
    async fn skewed_child_reading_the_time() {
        let Ok(schema) = std::env::var(SCHEMA) else {
            return;
        };
        skew_as_asked();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url())
            .await
            .unwrap();
        let store = PostgresStore::with_schema(pool, &schema).unwrap();
        let tx = store.begin().await.unwrap();
        let read = store.now().await;
        drop(tx);
        let off = (read - chrono::Utc::now()).abs();
        assert!(
            off < chrono::Duration::minutes(1),
            "the store answered its host's clock, {off} off the real time"
        );
    }

    /// The first time a store gives is the server's, even when the caller
    /// holds every connection of the pool: before, it was the host's clock
    /// until an idle connection could measure the offset.
    #[tokio::test]
    async fn the_first_time_read_is_the_servers_even_with_the_pool_taken() {
        let Some((_store, schema)) = super::store().await else {
            return;
        };
        assert!(
            child("skewed_child_reading_the_time", 10, &schema, None),
            "the skewed store read the time wrong (see its output)"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orchestrator_on_a_skewed_host_keeps_the_deadlines() {
        let Some((store, schema)) = super::store().await else {
            return;
        };
        let transport = MemoryTransport::default();
        let orchestrator = orchestrator(&store, &transport);
        let mut tx = store.begin().await.unwrap();
        let id = orchestrator
            .start(&mut tx, "asking", &serde_json::json!({"order": 1}))
            .await
            .unwrap();
        store.commit(tx).await.unwrap();
        // This host sends the command: its deadline starts.
        let engine = orchestrator.spawn().await.unwrap();
        let relay = Relay::new(
            store.clone(),
            Arc::new(transport.clone()),
            RelayConfig::default().poll_interval(Duration::from_millis(20)),
        )
        .spawn();
        saga_outbox::wait_until_delivered(&store, Duration::from_secs(10))
            .await
            .unwrap();
        relay.shutdown().await;
        engine.shutdown().await;
        let sent = orchestrator.saga(id).await.unwrap().unwrap().instance;
        assert!(sent.awaiting.is_some(), "the command was sent");

        assert!(
            child("skewed_child_orchestrator", 10, &schema, None),
            "the skewed orchestrator ran"
        );

        let after = orchestrator.saga(id).await.unwrap().unwrap().instance;
        let events: Vec<StepStatus> = after.history.iter().map(|e| e.status).collect();
        assert_eq!(
            (after.state, after.attempt, after.wake_at),
            (SagaState::Running, 1, sent.wake_at),
            "the skewed orchestrator acted on a deadline that had not passed: {events:?}"
        );
    }

    /// A host 10 minutes behind starts a saga, whose first step sends its
    /// command: the 60 s deadline ends a minute from the database's now,
    /// not 9 minutes ago, and an orchestrator on a right clock leaves it
    /// running.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orchestrator_on_a_host_behind_starts_deadlines_on_the_database_clock() {
        let Some((store, schema)) = super::store().await else {
            return;
        };
        let orchestrator = orchestrator(&store, &MemoryTransport::default());
        let id = SagaId::new();
        assert!(
            child("skewed_child_starting", -10, &schema, Some(id)),
            "the host behind started the saga (see its output)"
        );
        let sent = orchestrator.saga(id).await.unwrap().unwrap().instance;
        assert!(sent.awaiting.is_some(), "the command was sent");
        let wake_at = sent
            .wake_at
            .expect("a step waiting for its reply has a deadline");
        let left = wake_at - store.now().await;
        assert!(
            left > chrono::Duration::seconds(30) && left <= chrono::Duration::seconds(60),
            "the deadline the host behind set ends {left} from the database's now, not about 60 s"
        );

        let engine = orchestrator.spawn().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        engine.shutdown().await;
        let after = orchestrator.saga(id).await.unwrap().unwrap().instance;
        let events: Vec<StepStatus> = after.history.iter().map(|e| e.status).collect();
        assert_eq!(
            (after.state, after.attempt, after.wake_at),
            (SagaState::Running, 1, sent.wake_at),
            "a deadline the host behind started fired early: {events:?}"
        );
    }
}
