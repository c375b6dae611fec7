//! The saga engine end to end on a SQL store: an orchestrator and a
//! participant, each with its own store, relays and the in-memory transport
//! delivering everything twice; checks what the tables hold afterwards.
//!
//! `engine_case!(Store, Tx, setup)` expands to the test; `setup` returns a
//! fresh store and the qualifier of its business tables (a schema, or `main`).

/// Expands to the end-to-end test for one store type.
macro_rules! engine_case {
    ($store:ty, $tx:ty, $setup:path) => {
        use std::sync::Arc;
        use std::time::Duration;

        use async_trait::async_trait;
        use saga_core::memory::{Faults, MemoryTransport, MemoryTransportConfig};
        use saga_core::{
            CommandHandler, Message, Orchestrator, OrchestratorConfig, Participant, Reply, SagaDefinition, SagaId,
            SagaState, SagaStep, StepContext, StepError, StepOutcome, Transactional, Transport,
        };
        use saga_outbox::{Relay, RelayConfig};
        use serde::{Deserialize, Serialize};

        type Tx = $tx;

        #[derive(Serialize, Deserialize)]
        struct Order {
            sku: String,
            quantity: i32,
            /// Refused by the last (local) step, to make the saga compensate.
            refuse: bool,
        }

        struct Reserve;

        #[async_trait]
        impl SagaStep<Order, Tx> for Reserve {
            fn name(&self) -> &str {
                "reserve"
            }
            async fn execute(
                &self,
                _: &mut StepContext<'_, Tx>,
                order: &mut Order,
            ) -> Result<StepOutcome, StepError> {
                StepOutcome::send_json("stock.commands", "stock.reserve", order)
            }
            async fn compensate(
                &self,
                _: &mut StepContext<'_, Tx>,
                order: &mut Order,
            ) -> Result<StepOutcome, StepError> {
                StepOutcome::send_json("stock.commands", "stock.release", order)
            }
        }

        /// A local step: writes in the orchestrator's own transaction.
        struct Approve {
            schema: String,
        }

        #[async_trait]
        impl SagaStep<Order, Tx> for Approve {
            fn name(&self) -> &str {
                "approve"
            }
            async fn execute(
                &self,
                ctx: &mut StepContext<'_, Tx>,
                order: &mut Order,
            ) -> Result<StepOutcome, StepError> {
                if order.refuse {
                    return Err(StepError::rejected("order refused"));
                }
                sqlx::query(&format!(
                    "CREATE TABLE IF NOT EXISTS {}.approved (saga UUID PRIMARY KEY)",
                    self.schema
                ))
                .execute(&mut **ctx.tx)
                .await
                .map_err(|e| StepError::retryable(e.to_string()))?;
                sqlx::query(&format!("INSERT INTO {}.approved VALUES ($1)", self.schema))
                    .bind(ctx.saga_id.as_uuid())
                    .execute(&mut **ctx.tx)
                    .await
                    .map_err(|e| StepError::retryable(e.to_string()))?;
                Ok(StepOutcome::Done)
            }
            async fn compensate(
                &self,
                _: &mut StepContext<'_, Tx>,
                _: &mut Order,
            ) -> Result<StepOutcome, StepError> {
                Ok(StepOutcome::Done)
            }
        }

        struct Stock {
            schema: String,
            sign: i32,
        }

        #[async_trait]
        impl CommandHandler<Tx> for Stock {
            async fn handle(&self, tx: &mut Tx, command: &Message) -> Result<Reply, StepError> {
                let order: Order = command.payload_json()?;
                let updated = sqlx::query(&format!(
                    "UPDATE {}.stock SET available = available + $2 WHERE sku = $1 AND available + $2 >= 0",
                    self.schema
                ))
                .bind(&order.sku)
                .bind(self.sign * order.quantity)
                .execute(&mut **tx)
                .await
                .map_err(|e| StepError::retryable(e.to_string()))?;
                if updated.rows_affected() == 0 {
                    return Err(StepError::rejected(format!("not enough {}", order.sku)));
                }
                Ok(Reply::empty("stock.done"))
            }
        }

        async fn available(store: &$store, qualifier: &str, sku: &str) -> i32 {
            sqlx::query_scalar(&format!(
                "SELECT available FROM {qualifier}.stock WHERE sku = $1"
            ))
            .bind(sku)
            .fetch_one(store.pool())
            .await
            .unwrap()
        }

        async fn wait_end(orchestrator: &Orchestrator<$store>, id: SagaId) -> SagaState {
            for _ in 0..1000 {
                let state = orchestrator.saga(id).await.unwrap().unwrap().instance.state;
                if state.is_terminal() {
                    return state;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("saga {id} did not end within 20 s");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn sagas_complete_and_compensate_with_duplicate_deliveries() {
            let (Some((orders, orders_q)), Some((stock, stock_q))) = ($setup().await, $setup().await) else {
                return;
            };
            sqlx::query(&format!(
                "INSERT INTO {}.stock VALUES ('book', 10)",
                stock_q
            ))
            .execute(stock.pool())
            .await
            .unwrap();
            let transport = MemoryTransport::new(MemoryTransportConfig {
                faults: Faults {
                    duplicate: 1.0,
                    ..Faults::default()
                },
                ..MemoryTransportConfig::default()
            });
            let shared: Arc<dyn Transport> = Arc::new(transport.clone());
            let relay = |s: &$store| {
                Relay::new(
                    s.clone(),
                    Arc::clone(&shared),
                    RelayConfig::default().poll_interval(Duration::from_millis(20)),
                )
                .spawn()
            };
            let mut workers = vec![relay(&orders), relay(&stock)];
            workers.push(
                Participant::new(
                    "stock",
                    "stock.commands",
                    stock.clone(),
                    Arc::clone(&shared),
                )
                .on(
                    "stock.reserve",
                    Stock {
                        schema: stock_q.clone(),
                        sign: -1,
                    },
                )
                .on(
                    "stock.release",
                    Stock {
                        schema: stock_q.clone(),
                        sign: 1,
                    },
                )
                .spawn()
                .await
                .unwrap(),
            );
            let orchestrator = Orchestrator::builder(
                orders.clone(),
                Arc::clone(&shared),
                OrchestratorConfig::new("orders").poll_interval(Duration::from_millis(20)),
            )
            .saga(SagaDefinition::new("order").step(Reserve).step(Approve {
                schema: orders_q.clone(),
            }))
            .build();
            workers.push(orchestrator.spawn().await.unwrap());

            let mut tx = orders.begin().await.unwrap();
            let ok = orchestrator
                .start(
                    &mut tx,
                    "order",
                    &Order {
                        sku: "book".into(),
                        quantity: 3,
                        refuse: false,
                    },
                )
                .await
                .unwrap();
            let refused = orchestrator
                .start(
                    &mut tx,
                    "order",
                    &Order {
                        sku: "book".into(),
                        quantity: 4,
                        refuse: true,
                    },
                )
                .await
                .unwrap();
            let too_many = orchestrator
                .start(
                    &mut tx,
                    "order",
                    &Order {
                        sku: "book".into(),
                        quantity: 50,
                        refuse: false,
                    },
                )
                .await
                .unwrap();
            orders.commit(tx).await.unwrap();

            assert_eq!(wait_end(&orchestrator, ok).await, SagaState::Completed);
            assert_eq!(
                wait_end(&orchestrator, refused).await,
                SagaState::Compensated
            );
            assert_eq!(
                wait_end(&orchestrator, too_many).await,
                SagaState::Compensated
            );
            saga_outbox::wait_until_delivered(&orders, Duration::from_secs(10))
                .await
                .unwrap();
            saga_outbox::wait_until_delivered(&stock, Duration::from_secs(10))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;

            assert_eq!(
                available(&stock, &stock_q, "book").await,
                7,
                "3 reserved once; 4 reserved and released once; 50 refused"
            );
            let approved: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {}.approved",
                orders_q
            ))
            .fetch_one(orders.pool())
            .await
            .unwrap();
            assert_eq!(
                approved, 1,
                "the local step's write committed once, with its transition"
            );
            let view = orchestrator.saga(too_many).await.unwrap().unwrap();
            assert!(view.instance.error.unwrap().contains("not enough book"));
            let mut commands: Vec<String> = transport
                .published("stock.commands")
                .into_iter()
                .map(|m| m.message_type)
                .collect();
            commands.sort();
            assert_eq!(
                commands,
                [
                    "stock.release",
                    "stock.reserve",
                    "stock.reserve",
                    "stock.reserve"
                ],
                "each command published once; only the refused saga had something to release"
            );
            for worker in workers {
                worker.shutdown().await;
            }
        }
    };
}
