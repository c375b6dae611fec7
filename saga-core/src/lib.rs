//! Sagas, a transactional outbox and idempotent consumers: the core.
//!
//! This crate holds the vocabulary ([`Message`], [`Error`]), the traits every
//! backend implements ([`Transport`], [`OutboxStore`], [`IdempotencyStore`],
//! [`SagaStore`]), the engine ([`Orchestrator`], [`Participant`],
//! [`EventConsumer`]), in-memory implementations of every trait
//! ([`memory`]), and behind the `testing` feature the conformance suites every
//! backend runs ([`testing`]). It needs no network.
//!
//! # Defining and running a saga
//!
//! ```no_run
//! use std::sync::Arc;
//! use saga_core::memory::{MemoryStore, MemoryTransport};
//! use saga_core::{
//!     Orchestrator, OrchestratorConfig, SagaDefinition, SagaStep, StepContext, StepError,
//!     StepOutcome,
//! };
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Order { id: String, sku: String, quantity: u32 }
//!
//! /// A remote step: sends a command to the stock service, which replies.
//! struct ReserveStock;
//!
//! #[async_trait::async_trait]
//! impl<Tx: Send + 'static> SagaStep<Order, Tx> for ReserveStock {
//!     fn name(&self) -> &str { "reserve-stock" }
//!     async fn execute(&self, _: &mut StepContext<'_, Tx>, order: &mut Order)
//!         -> Result<StepOutcome, StepError> {
//!         StepOutcome::send_json("stock.commands", "stock.reserve", order)
//!     }
//!     async fn compensate(&self, _: &mut StepContext<'_, Tx>, order: &mut Order)
//!         -> Result<StepOutcome, StepError> {
//!         StepOutcome::send_json("stock.commands", "stock.release", order)
//!     }
//! }
//!
//! # async fn run() -> saga_core::Result<()> {
//! let store = MemoryStore::new();
//! let transport = Arc::new(MemoryTransport::default());
//! let orchestrator = Orchestrator::builder(store, transport, OrchestratorConfig::new("orders"))
//!     .saga(SagaDefinition::new("place-order").step(ReserveStock))
//!     .build();
//! let worker = orchestrator.spawn().await?;
//! let order = Order { id: "o-1".into(), sku: "A".into(), quantity: 2 };
//! let saga_id = orchestrator.start_saga("place-order", &order).await?;
//! println!("{:?}", orchestrator.saga(saga_id).await?);
//! worker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! A relay (crate `saga-outbox`) publishes what the stores' outboxes hold;
//! participants ([`Participant`]) answer the commands.
//!
//! # Guarantees
//! - A saga's state change and the command it sends commit in one transaction.
//! - Replies and commands are deduplicated by message id in the consumer's own
//!   transaction; a duplicate command gets the stored reply again.
//! - Compensations run in exact reverse order of the completed steps; a step
//!   whose reply missed its deadline is compensated too, and the participant
//!   runtime makes that safe whichever of command and compensation arrives first.
//! - A compensation that keeps failing leaves the saga FAILED, visible through
//!   [`Orchestrator::list`] and retryable through [`Orchestrator::retry`].
//!
//! # Writing a backend
//! 1. Implement [`Transactional`] with your transaction type; dropping it must
//!    roll back.
//! 2. Implement [`OutboxStore`], [`IdempotencyStore`] and [`SagaStore`] on the
//!    same type; read each trait's contract (claim order per key, duplicate
//!    detection waiting for the first writer, optimistic version check).
//! 3. For a transport, implement [`Transport`], [`Subscription`] and
//!    [`Acknowledger`]: confirm publishes before returning, map the envelope
//!    with [`wire::to_headers`] and [`wire::from_headers`], dead-letter what
//!    does not decode, make a dropped [`Delivery`] come again, answer
//!    [`Transport::check`] from the broker, delete what
//!    [`Transport::delete_channels`] names, list and replay what it
//!    dead-lettered ([`Transport::dead_letters`],
//!    [`Transport::replay_dead_letter`]), keep a delivery its member is
//!    still retrying from being handed to another member
//!    ([`Acknowledger::keep`], where the broker would otherwise reclaim
//!    it), and report honest
//!    [`Capabilities`] (written out again to `transport_conformance!`, so
//!    the cases of what is not claimed show as not run).
//! 4. In your tests, call the suites of [`testing`] with a setup function that
//!    reaches your real service and returns `None` (after printing why) when it
//!    is unreachable and `SAGA_REQUIRE_SERVICES` is not `1`. A transport also
//!    calls `testing::transport::messages_survive_a_broker_restart` from a
//!    test binary of its own, with a hook that restarts the real broker
//!    (saga-redis, saga-amqp and saga-kafka show three ways).
//! 5. Map native error codes to [`Error::is_retryable`]: serialization
//!    failures, deadlocks, broker retriable codes are retryable; syntax
//!    errors and constraint violations in a query are not. Failing to open a
//!    transaction at all (a database restarting or refusing connections, a
//!    password being rotated) is retryable: nothing in the message being
//!    handled causes it, so it must never dead-letter that message.

pub mod choreography;
pub mod clock;
mod error;
mod ids;
pub mod memory;
mod message;
pub mod participant;
pub mod redact;
mod reply;
mod retry;
pub mod saga;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;
pub mod wire;
mod worker;

pub use choreography::{EventConsumer, EventContext, EventHandler};
pub use error::{BoxError, Error, Result, StepError};
pub use ids::{MessageId, SagaId};
pub use message::{JSON, Message, OutboxEntry, TraceContext};
pub use participant::{CommandHandler, Participant};
pub use reply::Reply;
pub use retry::RetryPolicy;
pub use saga::{
    Orchestrator, OrchestratorConfig, Phase, SagaDefinition, SagaInstance, SagaState, SagaStep,
    SagaView, StartOptions, StepConfig, StepContext, StepEvent, StepOutcome, StepStatus,
};
pub use store::{IdempotencyStore, OutboxStore, SagaStore, Store, Transactional};
pub use transport::{Acknowledger, Capabilities, DeadLetter, Delivery, Subscription, Transport};
pub use worker::{StopSignal, Worker};
