//! Quickstart: an orchestrated saga across two services, in memory.
//!
//! The order service orchestrates `reserve-stock` then `charge-payment`; the
//! stock and payment services are participants with their own stores. The
//! first order goes through; the second is declined by payment, so its stock
//! reservation is released (compensated). Prints each saga's history and
//! exits non-zero if either ends differently.
//!
//! Run: `cargo run --example quickstart` (`-- --help` for the options;
//! `RUST_LOG=saga=debug` shows what the library does).
//!
//! The same code on a real broker, chosen by configuration alone (addresses
//! from `KAFKA_BROKERS`, `AMQP_URL`, `REDIS_URL`):
//! `cargo run --example quickstart --features kafka -- --transport kafka`
//! (or `amqp`, `redis`). Each run uses topics, queues or streams of its own,
//! and deletes them when it ends.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use saga::memory::{MemoryStore, MemoryTx};
use saga::outbox::{Relay, RelayConfig};
use saga::{
    CommandHandler, Message, Orchestrator, OrchestratorConfig, Participant, Reply, SagaDefinition,
    SagaId, SagaState, SagaStep, StepContext, StepError, StepOutcome, Transactional,
};
use serde::{Deserialize, Serialize};

#[path = "support/logs.rs"]
mod logs;
#[path = "support/transport.rs"]
mod transport;

use transport::TransportKind;

/// The shortest saga: an order service orchestrates reserve-stock then
/// charge-payment against a stock and a payment service. One order
/// completes; the other is declined and its reservation released.
#[derive(clap::Parser)]
#[command(name = "quickstart")]
struct Cli {
    /// Where the services' messages travel.
    #[arg(long, value_enum, default_value_t = TransportKind::Memory)]
    transport: TransportKind,
}

/// The channels and consumer groups a run makes on the broker.
const CHANNELS: [&str; 3] = ["stock.commands", "payment.commands", "orders.replies"];
const GROUPS: [&str; 3] = ["stock", "payment", "orders"];

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    id: String,
    sku: String,
    quantity: u32,
    /// In cents: money is never a float.
    total_cents: u64,
    customer: String,
}

/// Remote step: the stock service reserves, or releases on compensation.
struct ReserveStock;

#[async_trait]
impl<Tx: Send + 'static> SagaStep<Order, Tx> for ReserveStock {
    fn name(&self) -> &str {
        "reserve-stock"
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

/// Remote step: the payment service charges. The last step: nothing to undo after it.
struct ChargePayment;

#[async_trait]
impl<Tx: Send + 'static> SagaStep<Order, Tx> for ChargePayment {
    fn name(&self) -> &str {
        "charge-payment"
    }

    async fn execute(
        &self,
        _: &mut StepContext<'_, Tx>,
        order: &mut Order,
    ) -> Result<StepOutcome, StepError> {
        StepOutcome::send_json("payment.commands", "payment.charge", order)
    }

    async fn compensate(
        &self,
        _: &mut StepContext<'_, Tx>,
        _: &mut Order,
    ) -> Result<StepOutcome, StepError> {
        Ok(StepOutcome::Done)
    }
}

/// Stock service: `stock.reserve` and `stock.release`, on a row per SKU.
struct Stock {
    release: bool,
}

#[async_trait]
impl CommandHandler<MemoryTx> for Stock {
    async fn handle(&self, tx: &mut MemoryTx, command: &Message) -> Result<Reply, StepError> {
        let order: Order = command.payload_json()?;
        let available: u32 = tx.get("stock", &order.sku)?.unwrap_or(0);
        let left = if self.release {
            available + order.quantity
        } else if available >= order.quantity {
            available - order.quantity
        } else {
            return Err(StepError::rejected(format!(
                "only {available} of {} left",
                order.sku
            )));
        };
        tx.put("stock", &order.sku, &left)?;
        Reply::json("stock.done", &serde_json::json!({ "left": left }))
    }
}

/// Payment service: `payment.charge` on a wallet per customer.
struct Payment;

#[async_trait]
impl CommandHandler<MemoryTx> for Payment {
    async fn handle(&self, tx: &mut MemoryTx, command: &Message) -> Result<Reply, StepError> {
        let order: Order = command.payload_json()?;
        let balance: u64 = tx.get("wallets", &order.customer)?.unwrap_or(0);
        if balance < order.total_cents {
            return Err(StepError::rejected(format!(
                "insufficient funds: {balance} < {}",
                order.total_cents
            )));
        }
        tx.put("wallets", &order.customer, &(balance - order.total_cents))?;
        Ok(Reply::empty("payment.charged"))
    }
}

async fn wait_for_end(
    orchestrator: &Orchestrator<MemoryStore>,
    id: SagaId,
) -> saga::Result<SagaState> {
    loop {
        let state = orchestrator.saga(id).await?.map(|v| v.instance.state);
        match state {
            Some(state) if state.is_terminal() => return Ok(state),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    logs::init("warn");
    match run(cli.transport).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(kind: TransportKind) -> saga::Result<bool> {
    // Topic, queue and stream names that no other run uses.
    let prefix = format!("quickstart-{}.", saga::MessageId::new());
    let transport = transport::connect(kind, &prefix).await?;
    let result = orders(&transport).await;
    let cleaned = transport
        .delete_channels(&CHANNELS.map(String::from), &GROUPS.map(String::from))
        .await;
    let all_as_expected = result?;
    cleaned?;
    Ok(all_as_expected)
}

/// Runs the services and places the two orders.
async fn orders(transport: &Arc<dyn saga::Transport>) -> saga::Result<bool> {
    let (orders, stock, payment) = (MemoryStore::new(), MemoryStore::new(), MemoryStore::new());

    // Initial business data, committed like any other write.
    let mut tx = stock.begin().await?;
    tx.put("stock", "book", &10u32)?;
    stock.commit(tx).await?;
    let mut tx = payment.begin().await?;
    tx.put("wallets", "alice", &5_000u64)?;
    tx.put("wallets", "bob", &100u64)?;
    payment.commit(tx).await?;

    let mut workers = Vec::new();
    for store in [&orders, &stock, &payment] {
        workers
            .push(Relay::new(store.clone(), Arc::clone(transport), RelayConfig::default()).spawn());
    }
    workers.push(
        Participant::new(
            "stock",
            "stock.commands",
            stock.clone(),
            Arc::clone(transport),
        )
        .on("stock.reserve", Stock { release: false })
        .on("stock.release", Stock { release: true })
        .spawn()
        .await?,
    );
    workers.push(
        Participant::new(
            "payment",
            "payment.commands",
            payment.clone(),
            Arc::clone(transport),
        )
        .on("payment.charge", Payment)
        .spawn()
        .await?,
    );
    let orchestrator = Orchestrator::builder(
        orders.clone(),
        Arc::clone(transport),
        OrchestratorConfig::new("orders"),
    )
    .saga(
        SagaDefinition::new("place-order")
            .step(ReserveStock)
            .step(ChargePayment),
    )
    .build();
    workers.push(orchestrator.spawn().await?);

    let mut all_as_expected = true;
    for (customer, expected) in [
        ("alice", SagaState::Completed),
        ("bob", SagaState::Compensated),
    ] {
        let order = Order {
            id: format!("order-{customer}"),
            sku: "book".into(),
            quantity: 2,
            total_cents: 2_500,
            customer: customer.into(),
        };
        // The order row and the saga commit in one transaction.
        let mut tx = orders.begin().await?;
        tx.put("orders", &order.id, &"PENDING")?;
        let id = orchestrator.start(&mut tx, "place-order", &order).await?;
        orders.commit(tx).await?;

        let state = tokio::time::timeout(Duration::from_secs(30), wait_for_end(&orchestrator, id))
            .await
            .map_err(|_| saga::Error::Timeout(format!("saga {id} did not end within 30 s")))??;
        let view = orchestrator.saga(id).await?.expect("the saga exists");
        println!(
            "{} for {customer}: {} (expected {})",
            order.id,
            state.as_str(),
            expected.as_str()
        );
        for event in &view.instance.history {
            println!(
                "  {:<15} {:<13} {:<13} attempt {} {}",
                event.step,
                format!("{:?}", event.phase),
                format!("{:?}", event.status),
                event.attempt,
                event.error.as_deref().unwrap_or("")
            );
        }
        all_as_expected &= state == expected;
    }
    let books: u32 = stock.row("stock", "book").await?.unwrap_or(0);
    let alice: u64 = payment.row("wallets", "alice").await?.unwrap_or(0);
    let bob: u64 = payment.row("wallets", "bob").await?.unwrap_or(0);
    println!("stock of book: {books} (10 - 2 reserved for alice; bob's 2 released)");
    println!("wallets: alice {alice}, bob {bob} (cents)");
    all_as_expected &= books == 8 && alice == 2_500 && bob == 100;
    for worker in workers {
        worker.shutdown().await;
    }
    println!(
        "{}",
        if all_as_expected {
            "all as expected"
        } else {
            "NOT as expected"
        }
    );
    Ok(all_as_expected)
}
