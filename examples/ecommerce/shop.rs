//! The three services: Order (orchestrates), Stock and Payment, each with
//! its own database (a SQLite file, or a PostgreSQL database), talking only
//! through the transport.
//!
//! Saga `place-order`: RecordOrder (local; compensation: mark CANCELLED) →
//! ReserveStock (stock service; compensation ReleaseStock) → ProcessPayment
//! (payment service; compensation RefundPayment) → ApproveOrder (local).
//! Money is integer cents, parsed from and printed as "12.50".

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
#[cfg(feature = "postgres")]
use saga::sql::sqlx;
use saga::{SagaState, Transport};
use serde::{Deserialize, Serialize};

/// Exact money: cents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Cents(pub(crate) i64);

impl Cents {
    /// Parses "12.50", "12.5" or "12" (no sign, at most two decimals).
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (units, fraction) = text.split_once('.').unwrap_or((text, ""));
        if units.is_empty()
            || fraction.len() > 2
            || !units.bytes().all(|b| b.is_ascii_digit())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let units: i64 = units.parse().ok()?;
        let fraction: i64 = format!("{fraction:0<2}").parse().ok()?;
        units.checked_mul(100)?.checked_add(fraction).map(Self)
    }
}

impl std::fmt::Display for Cents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// One line of an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Item {
    pub(crate) product_id: String,
    pub(crate) quantity: i64,
}

/// The saga's data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PlaceOrder {
    pub(crate) order_id: String,
    pub(crate) customer_id: String,
    pub(crate) items: Vec<Item>,
    /// Set from the stock service's reply (it knows the prices).
    pub(crate) total: Cents,
}

#[derive(Serialize, Deserialize)]
/// The stock service's answer to `stock.reserve`.
pub(crate) struct Reserved {
    pub(crate) total: Cents,
}

const ORDER_TABLES: &str = "CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, items TEXT NOT NULL,
    total_cents BIGINT, status TEXT NOT NULL, reason TEXT, saga_id TEXT NOT NULL)";
const STOCK_TABLES: &str = "CREATE TABLE IF NOT EXISTS products (
    product_id TEXT PRIMARY KEY, available BIGINT NOT NULL, reserved BIGINT NOT NULL,
    unit_price_cents BIGINT NOT NULL);
  CREATE TABLE IF NOT EXISTS reservations (order_id TEXT PRIMARY KEY, items TEXT NOT NULL,
    released BIGINT NOT NULL)";
const PAYMENT_TABLES: &str = "CREATE TABLE IF NOT EXISTS wallets (
    customer_id TEXT PRIMARY KEY, balance_cents BIGINT NOT NULL);
  CREATE TABLE IF NOT EXISTS payments (order_id TEXT PRIMARY KEY, amount_cents BIGINT NOT NULL,
    refunded BIGINT NOT NULL)";

/// How the shop is set up.
#[derive(Clone, Debug)]
pub(crate) struct ShopConfig {
    /// How long ReserveStock and ProcessPayment wait for their reply.
    pub(crate) deadline: Duration,
    /// How often a remote step is tried (a timeout counts as a try).
    pub(crate) attempts: u32,
    /// Events between the services instead of an orchestrator.
    pub(crate) choreography: bool,
    /// What this process runs of its services.
    pub(crate) role: Role,
}

/// What a process runs of the services it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The services, and a relay per service publishing its outbox.
    ServicesAndRelays,
    /// The services; processes of their own relay their outboxes
    /// (`ecommerce relay NAME`).
    Services,
    /// Only a relay per service: it publishes what the services' processes
    /// wrote to their outboxes.
    Relays,
}

impl Default for ShopConfig {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(10),
            attempts: 3,
            choreography: false,
            role: Role::ServicesAndRelays,
        }
    }
}

/// What `GET /orders/{id}` shows.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct OrderView {
    pub(crate) order_id: String,
    pub(crate) status: String,
    pub(crate) reason: Option<String>,
    pub(crate) total: Option<String>,
    pub(crate) saga: SagaSummary,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct SagaSummary {
    pub(crate) state: String,
    pub(crate) steps: Vec<StepView>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct StepView {
    pub(crate) name: String,
    pub(crate) status: String,
    pub(crate) at: String,
    pub(crate) error: Option<String>,
}

/// Where the services keep their data.
#[derive(Clone)]
pub(crate) enum Databases {
    /// One SQLite file per service in this directory.
    Sqlite(PathBuf),
    /// One database per service (`<prefix>_orders`, ...) on this server
    /// (`postgres://user@host:port`), created when missing.
    Postgres { server: String, prefix: String },
}

impl Databases {
    /// Databases of their own for a part of a run (a directory below, or a longer prefix).
    pub(crate) fn child(&self, name: &str) -> Self {
        match self {
            Self::Sqlite(dir) => Self::Sqlite(dir.join(name)),
            Self::Postgres { server, prefix } => Self::Postgres {
                server: server.clone(),
                prefix: format!("{prefix}_{name}"),
            },
        }
    }
}

impl std::fmt::Display for Databases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(dir) => write!(f, "SQLite files in {}", dir.display()),
            Self::Postgres { server, prefix } => write!(
                f,
                "PostgreSQL databases {prefix}_* at {}",
                saga::core::redact::redact_url(server)
            ),
        }
    }
}

impl Databases {
    /// Deletes every database (or file) of this place: what a demo made for itself.
    pub(crate) async fn remove(&self) -> saga::Result<()> {
        match self {
            Self::Sqlite(dir) => match std::fs::remove_dir_all(dir) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(
                    saga::Error::Config(format!("removing {}: {error}", dir.display())),
                ),
                _ => Ok(()),
            },
            #[cfg(feature = "postgres")]
            Self::Postgres { server, prefix } => on_postgres::drop_databases(server, prefix).await,
            #[cfg(not(feature = "postgres"))]
            Self::Postgres { .. } => Ok(()),
        }
    }
}

/// The channels the services use, and the consumer groups on them: what a
/// shop makes on the broker.
pub(crate) const CHANNELS: [&str; 6] = [
    "stock.commands",
    "payment.commands",
    "orders.replies",
    "orders.events",
    "stock.events",
    "payment.events",
];
const GROUPS: [&str; 3] = ["orders", "stock", "payment"];

/// Deletes what a shop made on the broker (see [`CHANNELS`]).
pub(crate) async fn delete_channels(transport: &dyn Transport) -> saga::Result<()> {
    transport
        .delete_channels(&CHANNELS.map(String::from), &GROUPS.map(String::from))
        .await
}

/// Which services this process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Services {
    pub(crate) order: bool,
    pub(crate) stock: bool,
    pub(crate) payment: bool,
}

impl Services {
    pub(crate) const ALL: Self = Self {
        order: true,
        stock: true,
        payment: true,
    };
}

/// What the scenarios and the HTTP API ask of the shop.
#[async_trait]
pub(crate) trait ShopApi: Send + Sync {
    async fn put_stock(
        &self,
        product_id: &str,
        available: i64,
        unit_price: Cents,
    ) -> saga::Result<()>;
    /// (available, reserved)
    async fn stock_of(&self, product_id: &str) -> saga::Result<Option<(i64, i64)>>;
    async fn put_wallet(&self, customer_id: &str, balance: Cents) -> saga::Result<()>;
    async fn wallet_of(&self, customer_id: &str) -> saga::Result<Option<Cents>>;
    /// Stores the order PENDING and starts its saga, in one transaction.
    async fn place_order(&self, customer_id: &str, items: Vec<Item>) -> saga::Result<String>;
    /// The order, its reason if cancelled, and its saga's steps.
    async fn order(&self, order_id: &str) -> saga::Result<Option<OrderView>>;
    /// The customer and lines of an order.
    async fn order_lines(&self, order_id: &str) -> saga::Result<(String, Vec<Item>)>;
    /// Whether this process reaches its databases and its broker.
    async fn healthy(&self) -> bool;
    /// Stops the payment service's consumer as a crash would.
    async fn crash_payment(&self);
    /// Starts the payment service's consumer (again).
    async fn start_payment(&self) -> saga::Result<()>;
    /// Stops every service cleanly.
    async fn stop(&self);

    /// Waits until the order's saga has ended (or `patience` passed).
    async fn settled(&self, order_id: &str, patience: Duration) -> saga::Result<OrderView> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let view = self
                .order(order_id)
                .await?
                .ok_or_else(|| saga::Error::NotFound(order_id.to_owned()))?;
            let ended = SagaState::parse(&view.saga.state).is_some_and(SagaState::is_terminal);
            if ended || tokio::time::Instant::now() >= deadline {
                return Ok(view);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Opens the databases and starts `services`.
pub(crate) async fn start(
    databases: &Databases,
    services: Services,
    transport: Arc<dyn Transport>,
    config: &ShopConfig,
) -> saga::Result<Arc<dyn ShopApi>> {
    Ok(match databases {
        Databases::Sqlite(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| saga::Error::Config(format!("{}: {e}", dir.display())))?;
            Arc::new(on_sqlite::start(dir, services, transport, config).await?)
        }
        #[cfg(feature = "postgres")]
        Databases::Postgres { server, prefix } => {
            Arc::new(on_postgres::start(server, prefix, services, transport, config).await?)
        }
        #[cfg(not(feature = "postgres"))]
        Databases::Postgres { .. } => {
            return Err(saga::Error::Config(
                "built without PostgreSQL: add `--features postgres`".into(),
            ));
        }
    })
}

/// A step event's status in words: `succeeded`, `compensation timed out`...
fn step_status(phase: saga::Phase, status: saga::StepStatus) -> String {
    use saga::StepStatus as S;
    let status = match status {
        S::Sent => "sent",
        S::Succeeded => "succeeded",
        S::Failed => "failed",
        S::TimedOut => "timed out",
        S::IgnoredReply => "ignored a late reply",
        S::RetryRequested => "retry requested",
        S::Postponed => "deadline postponed",
    };
    match phase {
        saga::Phase::Compensation => format!("compensation {status}"),
        saga::Phase::Forward => status.to_owned(),
    }
}

fn missing(service: &str) -> saga::Error {
    saga::Error::Config(format!("this process does not run the {service} service"))
}

#[cfg(feature = "postgres")]
fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> saga::Error {
    move |e| saga::Error::backend(context, true, e)
}

fn step_error(error: impl std::fmt::Display) -> saga::StepError {
    saga::StepError::retryable(format!("database: {error}"))
}

/// The services on one kind of database: `$store` with transactions of `$db`.
macro_rules! services_on {
    ($store:ty, $db:ty) => {
        use std::sync::Arc;

        use async_trait::async_trait;
        use saga::outbox::{Relay, RelayConfig};
        use saga::{
            CommandHandler, EventConsumer, EventContext, EventHandler, Message, Orchestrator, OrchestratorConfig, Participant, Reply,
            RetryPolicy, SagaDefinition, SagaId, SagaStep, StepConfig, StepContext, StepError,
            StepOutcome, StepStatus, SagaStore, Transactional, Transport, Worker,
        };
        use saga::sql::sqlx::{self, Row};
        use tokio::sync::Mutex;

        use super::{
            missing, step_error, step_status, Cents, Item, OrderView, PlaceOrder, Reserved, SagaSummary,
            Role, Services, ShopApi, ShopConfig, StepView,
        };

        type Tx = sqlx::Transaction<'static, $db>;


        struct RecordOrder;

        #[async_trait]
        impl SagaStep<PlaceOrder, Tx> for RecordOrder {
            fn name(&self) -> &str {
                "record-order"
            }

            /// The order row is written by whoever starts the saga, in the same transaction.
            async fn execute(
                &self,
                _: &mut StepContext<'_, Tx>,
                _: &mut PlaceOrder,
            ) -> Result<StepOutcome, StepError> {
                Ok(StepOutcome::Done)
            }

            async fn compensate(
                &self,
                ctx: &mut StepContext<'_, Tx>,
                order: &mut PlaceOrder,
            ) -> Result<StepOutcome, StepError> {
                sqlx::query("UPDATE orders SET status = 'CANCELLED' WHERE order_id = $1")
                    .bind(&order.order_id)
                    .execute(&mut **ctx.tx)
                    .await
                    .map_err(step_error)?;
                Ok(StepOutcome::Done)
            }
        }

        struct ReserveStock;

        #[async_trait]
        impl SagaStep<PlaceOrder, Tx> for ReserveStock {
            fn name(&self) -> &str {
                "reserve-stock"
            }

            async fn execute(
                &self,
                _: &mut StepContext<'_, Tx>,
                order: &mut PlaceOrder,
            ) -> Result<StepOutcome, StepError> {
                StepOutcome::send_json("stock.commands", "stock.reserve", order)
            }

            async fn on_reply(&self, order: &mut PlaceOrder, reply: &Message) -> Result<(), StepError> {
                let reserved: Reserved = reply.payload_json()?;
                order.total = reserved.total;
                Ok(())
            }

            async fn compensate(
                &self,
                _: &mut StepContext<'_, Tx>,
                order: &mut PlaceOrder,
            ) -> Result<StepOutcome, StepError> {
                StepOutcome::send_json("stock.commands", "stock.release", order)
            }
        }

        struct ProcessPayment;

        #[async_trait]
        impl SagaStep<PlaceOrder, Tx> for ProcessPayment {
            fn name(&self) -> &str {
                "process-payment"
            }

            async fn execute(
                &self,
                _: &mut StepContext<'_, Tx>,
                order: &mut PlaceOrder,
            ) -> Result<StepOutcome, StepError> {
                StepOutcome::send_json("payment.commands", "payment.charge", order)
            }

            async fn compensate(
                &self,
                _: &mut StepContext<'_, Tx>,
                order: &mut PlaceOrder,
            ) -> Result<StepOutcome, StepError> {
                StepOutcome::send_json("payment.commands", "payment.refund", order)
            }
        }

        struct ApproveOrder;

        #[async_trait]
        impl SagaStep<PlaceOrder, Tx> for ApproveOrder {
            fn name(&self) -> &str {
                "approve-order"
            }

            async fn execute(
                &self,
                ctx: &mut StepContext<'_, Tx>,
                order: &mut PlaceOrder,
            ) -> Result<StepOutcome, StepError> {
                sqlx::query("UPDATE orders SET status = 'CONFIRMED', total_cents = $2 WHERE order_id = $1")
                    .bind(&order.order_id)
                    .bind(order.total.0)
                    .execute(&mut **ctx.tx)
                    .await
                    .map_err(step_error)?;
                Ok(StepOutcome::Done)
            }

            async fn compensate(
                &self,
                _: &mut StepContext<'_, Tx>,
                _: &mut PlaceOrder,
            ) -> Result<StepOutcome, StepError> {
                Ok(StepOutcome::Done)
            }
        }


        /// The stock service: `stock.reserve` and `stock.release`.
        struct Stock {
            release: bool,
        }

        #[async_trait]
        impl CommandHandler<Tx> for Stock {
            async fn handle(&self, tx: &mut Tx, command: &Message) -> Result<Reply, StepError> {
                let order: PlaceOrder = command.payload_json()?;
                if self.release {
                    release(tx, &order.order_id).await?;
                    return Ok(Reply::empty("stock.released"));
                }
                let total = reserve(tx, &order).await?;
                Reply::json("stock.reserved", &Reserved { total })
            }
        }

        /// Reserves every line of `order`, or none; returns the order's total.
        async fn reserve(tx: &mut Tx, order: &PlaceOrder) -> Result<Cents, StepError> {
            let mut total = 0i64;
            for item in &order.items {
                let row = sqlx::query("SELECT available, unit_price_cents FROM products WHERE product_id = $1")
                    .bind(&item.product_id)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err(step_error)?
                    .ok_or_else(|| StepError::rejected(format!("unknown product {}", item.product_id)))?;
                let available: i64 = row.get("available");
                if available < item.quantity {
                    return Err(StepError::rejected(format!(
                        "out of stock: {} (available {available}, ordered {})",
                        item.product_id, item.quantity
                    )));
                }
                total += row.get::<i64, _>("unit_price_cents") * item.quantity;
            }
            for item in &order.items {
                sqlx::query("UPDATE products SET available = available - $2, reserved = reserved + $2 WHERE product_id = $1")
                    .bind(&item.product_id)
                    .bind(item.quantity)
                    .execute(&mut **tx)
                    .await
                    .map_err(step_error)?;
            }
            sqlx::query("INSERT INTO reservations (order_id, items, released) VALUES ($1, $2, 0)")
                .bind(&order.order_id)
                .bind(serde_json::to_string(&order.items).map_err(|e| StepError::rejected(e.to_string()))?)
                .execute(&mut **tx)
                .await
                .map_err(step_error)?;
            Ok(Cents(total))
        }

        /// Gives back what was reserved for `order_id`, if anything still is.
        async fn release(tx: &mut Tx, order_id: &str) -> Result<(), StepError> {
            let row = sqlx::query("SELECT items FROM reservations WHERE order_id = $1 AND released = 0")
                .bind(order_id)
                .fetch_optional(&mut **tx)
                .await
                .map_err(step_error)?;
            let Some(row) = row else {
                return Ok(());
            };
            let items: Vec<Item> =
                serde_json::from_str(row.get("items")).map_err(|e| StepError::rejected(e.to_string()))?;
            for item in &items {
                sqlx::query("UPDATE products SET available = available + $2, reserved = reserved - $2 WHERE product_id = $1")
                    .bind(&item.product_id)
                    .bind(item.quantity)
                    .execute(&mut **tx)
                    .await
                    .map_err(step_error)?;
            }
            sqlx::query("UPDATE reservations SET released = 1 WHERE order_id = $1")
                .bind(order_id)
                .execute(&mut **tx)
                .await
                .map_err(step_error)?;
            Ok(())
        }

        /// The payment service: `payment.charge` and `payment.refund`.
        struct Payment {
            refund: bool,
        }

        #[async_trait]
        impl CommandHandler<Tx> for Payment {
            async fn handle(&self, tx: &mut Tx, command: &Message) -> Result<Reply, StepError> {
                let order: PlaceOrder = command.payload_json()?;
                if self.refund {
                    let row = sqlx::query(
                        "SELECT amount_cents FROM payments WHERE order_id = $1 AND refunded = 0",
                    )
                    .bind(&order.order_id)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err(step_error)?;
                    if let Some(row) = row {
                        sqlx::query(
                            "UPDATE wallets SET balance_cents = balance_cents + $2 WHERE customer_id = $1",
                        )
                        .bind(&order.customer_id)
                        .bind(row.get::<i64, _>("amount_cents"))
                        .execute(&mut **tx)
                        .await
                        .map_err(step_error)?;
                        sqlx::query("UPDATE payments SET refunded = 1 WHERE order_id = $1")
                            .bind(&order.order_id)
                            .execute(&mut **tx)
                            .await
                            .map_err(step_error)?;
                    }
                    return Ok(Reply::empty("payment.refunded"));
                }
                charge(tx, &order).await?;
                Ok(Reply::empty("payment.charged"))
            }
        }


        /// Debits the order's total from the customer's wallet, or refuses.
        async fn charge(tx: &mut Tx, order: &PlaceOrder) -> Result<(), StepError> {
        let balance: i64 = sqlx::query("SELECT balance_cents FROM wallets WHERE customer_id = $1")
            .bind(&order.customer_id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(step_error)?
            .ok_or_else(|| StepError::rejected(format!("unknown customer {}", order.customer_id)))?
            .get("balance_cents");
        if balance < order.total.0 {
            return Err(StepError::rejected(format!(
                "insufficient funds: balance {} < total {}",
                Cents(balance),
                order.total
            )));
        }
        sqlx::query("UPDATE wallets SET balance_cents = balance_cents - $2 WHERE customer_id = $1")
            .bind(&order.customer_id)
            .bind(order.total.0)
            .execute(&mut **tx)
            .await
            .map_err(step_error)?;
        sqlx::query("INSERT INTO payments (order_id, amount_cents, refunded) VALUES ($1, $2, 0)")
            .bind(&order.order_id)
            .bind(order.total.0)
            .execute(&mut **tx)
            .await
            .map_err(step_error)?;
            Ok(())
        }

        /// What an order's fate events carry.
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Fate {
            order_id: String,
            reason: Option<String>,
            total: Option<Cents>,
        }

        /// Choreography, stock service: an order was placed; reserve or refuse.
        struct OnOrderPlaced;

        #[async_trait]
        impl EventHandler<Tx> for OnOrderPlaced {
            async fn handle(&self, ctx: &mut EventContext<'_, Tx>, event: &Message) -> Result<(), StepError> {
                let mut order: PlaceOrder = event.payload_json()?;
                match reserve(ctx.tx, &order).await {
                    Ok(total) => {
                        order.total = total;
                        ctx.emit_json("stock.events", "stock.reserved", &order)
                    }
                    Err(refused) if !refused.retryable => ctx.emit_json(
                        "stock.events",
                        "stock.rejected",
                        &Fate { order_id: order.order_id, reason: Some(refused.message), total: None },
                    ),
                    Err(error) => Err(error),
                }
            }
        }

        /// Choreography, stock service: payment was declined; release the stock.
        struct OnPaymentDeclined;

        #[async_trait]
        impl EventHandler<Tx> for OnPaymentDeclined {
            async fn handle(&self, ctx: &mut EventContext<'_, Tx>, event: &Message) -> Result<(), StepError> {
                let fate: Fate = event.payload_json()?;
                release(ctx.tx, &fate.order_id).await?;
                ctx.emit_json("stock.events", "stock.released", &fate)
            }
        }

        /// Choreography, payment service: stock is reserved; charge or decline.
        struct OnStockReserved;

        #[async_trait]
        impl EventHandler<Tx> for OnStockReserved {
            async fn handle(&self, ctx: &mut EventContext<'_, Tx>, event: &Message) -> Result<(), StepError> {
                let order: PlaceOrder = event.payload_json()?;
                match charge(ctx.tx, &order).await {
                    Ok(()) => ctx.emit_json(
                        "payment.events",
                        "payment.charged",
                        &Fate { order_id: order.order_id, reason: None, total: Some(order.total) },
                    ),
                    Err(refused) if !refused.retryable => ctx.emit_json(
                        "payment.events",
                        "payment.declined",
                        &Fate { order_id: order.order_id, reason: Some(refused.message), total: None },
                    ),
                    Err(error) => Err(error),
                }
            }
        }

        /// Choreography, order service: every event of the flow is logged; the
        /// ones that decide the order's fate set its status.
        struct OrderFate {
            status: Option<&'static str>,
        }

        #[async_trait]
        impl EventHandler<Tx> for OrderFate {
            async fn handle(&self, ctx: &mut EventContext<'_, Tx>, event: &Message) -> Result<(), StepError> {
                let Some(status) = self.status else {
                    return Ok(());
                };
                let fate: Fate = event.payload_json()?;
                sqlx::query(
                    "UPDATE orders SET status = $2, reason = $3, total_cents = COALESCE($4, total_cents)
                     WHERE order_id = $1 AND status = 'PENDING'",
                )
                .bind(&fate.order_id)
                .bind(status)
                .bind(&fate.reason)
                .bind(fate.total.map(|t| t.0))
                .execute(&mut **ctx.tx)
                .await
                .map_err(step_error)?;
                Ok(())
            }
        }

        /// The services this process runs, on their stores.
        pub(crate) struct Node {
            choreography: bool,
            orders: Option<$store>,
            stock: Option<$store>,
            payment: Option<$store>,
            transport: Arc<dyn Transport>,
            orchestrator: Option<Orchestrator<$store>>,
            workers: Mutex<Vec<Worker>>,
            payment_worker: Mutex<Option<Worker>>,
        }

        impl Node {
            /// Starts a relay per store, and each service whose store is
            /// given, as `config.role` says.
            pub(crate) async fn start(
                orders: Option<$store>,
                stock: Option<$store>,
                payment: Option<$store>,
                transport: Arc<dyn Transport>,
                config: &ShopConfig,
            ) -> saga::Result<Self> {
                let mut workers = Vec::new();
                if config.role != Role::Services {
                    for store in [&orders, &stock, &payment].into_iter().flatten() {
                        workers.push(
                            Relay::new(store.clone(), Arc::clone(&transport), RelayConfig::default())
                                .spawn(),
                        );
                    }
                }
                if config.role == Role::Relays {
                    return Ok(Self {
                        choreography: config.choreography,
                        orders,
                        stock,
                        payment,
                        transport,
                        orchestrator: None,
                        workers: Mutex::new(workers),
                        payment_worker: Mutex::new(None),
                    });
                }
                if config.choreography {
                    if let Some(stock) = &stock {
                        workers.push(
                            EventConsumer::new("stock", ["orders.events", "payment.events"], stock.clone(), Arc::clone(&transport))
                                .on("order.placed", OnOrderPlaced)
                                .on("payment.declined", OnPaymentDeclined)
                                .spawn()
                                .await?,
                        );
                    }
                    if let Some(orders) = &orders {
                        let fate = |status| OrderFate { status };
                        workers.push(
                            EventConsumer::new("orders", ["stock.events", "payment.events"], orders.clone(), Arc::clone(&transport))
                                .on("stock.reserved", fate(None))
                                .on("stock.rejected", fate(Some("CANCELLED")))
                                .on("stock.released", fate(Some("CANCELLED")))
                                .on("payment.charged", fate(Some("CONFIRMED")))
                                .on("payment.declined", fate(None))
                                .spawn()
                                .await?,
                        );
                    }
                } else if let Some(stock) = &stock {
                    workers.push(
                        Participant::new("stock", "stock.commands", stock.clone(), Arc::clone(&transport))
                            .on("stock.reserve", Stock { release: false })
                            .on("stock.release", Stock { release: true })
                            .spawn()
                            .await?,
                    );
                }
                let orchestrator = match &orders {
                    Some(orders) if !config.choreography => {
                        let remote = StepConfig::default()
                            .deadline(config.deadline)
                            .retry(RetryPolicy::attempts(config.attempts))
                            .compensation_retry(RetryPolicy::attempts(10));
                        let orchestrator = Orchestrator::builder(
                            orders.clone(),
                            Arc::clone(&transport),
                            OrchestratorConfig::new("orders"),
                        )
                        .saga(
                            SagaDefinition::new("place-order")
                                .step(RecordOrder)
                                .step_with(ReserveStock, remote.clone())
                                .step_with(ProcessPayment, remote)
                                .step(ApproveOrder),
                        )
                        .build();
                        workers.push(orchestrator.spawn().await?);
                        Some(orchestrator)
                    }
                    _ => None,
                };
                let node = Self {
                    choreography: config.choreography,
                    orders,
                    stock,
                    payment,
                    transport,
                    orchestrator,
                    workers: Mutex::new(workers),
                    payment_worker: Mutex::new(None),
                };
                node.start_payment().await?;
                Ok(node)
            }

            /// An order of the choreographed flow: its saga is its log.
            async fn choreographed(&self, order_id: &str, row: &<$db as sqlx::Database>::Row) -> saga::Result<OrderView> {
                let status: String = row.get("status");
                let log = SagaStore::log(self.orders()?, order_id).await?;
                Ok(OrderView {
                    order_id: order_id.to_owned(),
                    reason: row.get("reason"),
                    total: row.get::<Option<i64>, _>("total_cents").map(|c| Cents(c).to_string()),
                    saga: SagaSummary {
                        state: match status.as_str() {
                            "CONFIRMED" => "COMPLETED",
                            "CANCELLED" => "COMPENSATED",
                            _ => "RUNNING",
                        }
                        .to_owned(),
                        steps: log
                            .iter()
                            .map(|entry| StepView {
                                name: entry.message_type.clone(),
                                status: format!("{} by {}", entry.status.as_str().to_lowercase(), entry.consumer),
                                at: entry.at.to_rfc3339(),
                                error: entry.error.clone(),
                            })
                            .collect(),
                    },
                    status,
                })
            }

            fn orders(&self) -> saga::Result<&$store> {
                self.orders.as_ref().ok_or_else(|| missing("order"))
            }

            fn stock(&self) -> saga::Result<&$store> {
                self.stock.as_ref().ok_or_else(|| missing("stock"))
            }

            fn payment(&self) -> saga::Result<&$store> {
                self.payment.as_ref().ok_or_else(|| missing("payment"))
            }

            fn orchestrator(&self) -> saga::Result<&Orchestrator<$store>> {
                self.orchestrator.as_ref().ok_or_else(|| missing("order"))
            }
        }

        #[async_trait]
        impl ShopApi for Node {
        async fn put_stock(
            &self,
            product_id: &str,
            available: i64,
            unit_price: Cents,
        ) -> saga::Result<()> {
            sqlx::query(
                "INSERT INTO products (product_id, available, reserved, unit_price_cents) VALUES ($1, $2, 0, $3)
                 ON CONFLICT (product_id) DO UPDATE SET available = $2, unit_price_cents = $3",
            )
            .bind(product_id)
            .bind(available)
            .bind(unit_price.0)
            .execute(self.stock()?.pool())
            .await
            .map_err(|e| saga::Error::backend("PUT stock", true, e))?;
            Ok(())
        }
        /// (available, reserved)
        async fn stock_of(&self, product_id: &str) -> saga::Result<Option<(i64, i64)>> {
            let row = sqlx::query("SELECT available, reserved FROM products WHERE product_id = $1")
                .bind(product_id)
                .fetch_optional(self.stock()?.pool())
                .await
                .map_err(|e| saga::Error::backend("GET stock", true, e))?;
            Ok(row.map(|r| (r.get("available"), r.get("reserved"))))
        }
        async fn put_wallet(&self, customer_id: &str, balance: Cents) -> saga::Result<()> {
            sqlx::query(
                "INSERT INTO wallets (customer_id, balance_cents) VALUES ($1, $2)
                 ON CONFLICT (customer_id) DO UPDATE SET balance_cents = $2",
            )
            .bind(customer_id)
            .bind(balance.0)
            .execute(self.payment()?.pool())
            .await
            .map_err(|e| saga::Error::backend("PUT wallet", true, e))?;
            Ok(())
        }
        async fn wallet_of(&self, customer_id: &str) -> saga::Result<Option<Cents>> {
            let row = sqlx::query("SELECT balance_cents FROM wallets WHERE customer_id = $1")
                .bind(customer_id)
                .fetch_optional(self.payment()?.pool())
                .await
                .map_err(|e| saga::Error::backend("GET wallet", true, e))?;
            Ok(row.map(|r| Cents(r.get("balance_cents"))))
        }
        /// Stores the order PENDING and starts its saga, in one transaction.
        async fn place_order(
            &self,
            customer_id: &str,
            items: Vec<Item>,
        ) -> saga::Result<String> {
            let order_id = format!("order-{}", saga::MessageId::new());
            let data = PlaceOrder {
                order_id: order_id.clone(),
                customer_id: customer_id.to_owned(),
                items,
                total: Cents(0),
            };
            let orders = self.orders()?;
            let mut tx = orders.begin().await?;
            let saga_id = if self.choreography {
                // The flow's first event, logged under the order id.
                let placed = Message::json("order.placed", &data)?
                    .with_correlation_id(order_id.clone())
                    .with_ordering_key(order_id.clone());
                saga::choreography::emit(orders, &mut tx, "orders", "orders.events", placed).await?;
                String::new()
            } else {
                self.orchestrator()?
                    .start(&mut tx, "place-order", &data)
                    .await?
                    .to_string()
            };
            sqlx::query("INSERT INTO orders (order_id, customer_id, items, status, saga_id) VALUES ($1, $2, $3, 'PENDING', $4)")
                .bind(&order_id)
                .bind(customer_id)
                .bind(serde_json::to_string(&data.items)?)
                .bind(saga_id)
                .execute(&mut *tx)
                .await
                .map_err(|e| saga::Error::backend("INSERT order", true, e))?;
            orders.commit(tx).await?;
            Ok(order_id)
        }
        /// The order, its reason if cancelled, and its saga's steps.
        async fn order(&self, order_id: &str) -> saga::Result<Option<OrderView>> {
            let Some(row) =
                sqlx::query("SELECT status, reason, total_cents, saga_id FROM orders WHERE order_id = $1")
                    .bind(order_id)
                    .fetch_optional(self.orders()?.pool())
                    .await
                    .map_err(|e| saga::Error::backend("GET order", true, e))?
            else {
                return Ok(None);
            };
            if self.choreography {
                return self.choreographed(order_id, &row).await.map(Some);
            }
            let saga_id: SagaId = row
                .get::<String, _>("saga_id")
                .parse()
                .map_err(|e| saga::Error::InvalidState(format!("saga id: {e:?}")))?;
            let saga = async || {
                self.orchestrator()?
                    .saga(saga_id)
                    .await?
                    .ok_or_else(|| saga::Error::NotFound(format!("saga {saga_id}")))
            };
            let mut view = saga().await?;
            // Status and total after the saga: the saga's last transaction
            // writes them, so a terminal saga is never shown beside a stale
            // PENDING read before it.
            let row = sqlx::query("SELECT status, total_cents FROM orders WHERE order_id = $1")
                .bind(order_id)
                .fetch_one(self.orders()?.pool())
                .await
                .map_err(|e| saga::Error::backend("GET order", true, e))?;
            // A decided order with a saga read just before that transaction
            // committed: read the saga again, it has ended with the row.
            if row.get::<String, _>("status") != "PENDING" && !view.instance.state.is_terminal() {
                view = saga().await?;
            }
            let history = &view.instance.history;
            // The failure that decided the outcome, not an earlier attempt's.
            let reason = view.instance.failure().map(|e| match e.status {
                StepStatus::TimedOut => format!("{} timed out", e.step),
                _ => e.error.clone().unwrap_or_default(),
            });
            let status: String = row.get("status");
            Ok(Some(OrderView {
                order_id: order_id.to_owned(),
                reason: if status == "CANCELLED" { reason } else { None },
                status,
                total: row
                    .get::<Option<i64>, _>("total_cents")
                    .map(|c| Cents(c).to_string()),
                saga: SagaSummary {
                    state: view.instance.state.as_str().to_owned(),
                    steps: history
                        .iter()
                        .map(|e| StepView {
                            name: e.step.clone(),
                            status: step_status(e.phase, e.status),
                            at: e.at.to_rfc3339(),
                            error: e.error.clone(),
                        })
                        .collect(),
                },
            }))
        }
        /// The customer and lines of an order.
        async fn order_lines(&self, order_id: &str) -> saga::Result<(String, Vec<Item>)> {
            let row = sqlx::query("SELECT customer_id, items FROM orders WHERE order_id = $1")
                .bind(order_id)
                .fetch_one(self.orders()?.pool())
                .await
                .map_err(|e| saga::Error::backend("GET order lines", true, e))?;
            Ok((
                row.get("customer_id"),
                serde_json::from_str(row.get("items"))?,
            ))
        }

            async fn healthy(&self) -> bool {
                if self.transport.check().await.is_err() {
                    return false;
                }
                for store in [&self.orders, &self.stock, &self.payment].into_iter().flatten() {
                    if sqlx::query("SELECT 1").execute(store.pool()).await.is_err() {
                        return false;
                    }
                }
                true
            }

            async fn crash_payment(&self) {
                if let Some(worker) = self.payment_worker.lock().await.take() {
                    worker.abort().await;
                }
            }

            async fn start_payment(&self) -> saga::Result<()> {
                let Some(payment) = &self.payment else {
                    return Ok(());
                };
                let mut worker = self.payment_worker.lock().await;
                if worker.is_none() && self.choreography {
                    *worker = Some(
                        EventConsumer::new("payment", ["stock.events"], payment.clone(), Arc::clone(&self.transport))
                            .on("stock.reserved", OnStockReserved)
                            .spawn()
                            .await?,
                    );
                } else if worker.is_none() {
                    *worker = Some(
                        Participant::new("payment", "payment.commands", payment.clone(), Arc::clone(&self.transport))
                            .on("payment.charge", Payment { refund: false })
                            .on("payment.refund", Payment { refund: true })
                            .spawn()
                            .await?,
                    );
                }
                Ok(())
            }

            async fn stop(&self) {
                if let Some(worker) = self.payment_worker.lock().await.take() {
                    worker.shutdown().await;
                }
                for worker in std::mem::take(&mut *self.workers.lock().await) {
                    worker.shutdown().await;
                }
            }
        }

        /// Opens (or not) each service's store, creates its tables, starts the services.
        async fn services(
            services: Services,
            mut open: impl AsyncFnMut(&'static str, &'static str) -> saga::Result<$store>,
            transport: Arc<dyn Transport>,
            config: &ShopConfig,
        ) -> saga::Result<Node> {
            let mut store = async |wanted: bool, name: &'static str, tables: &'static str| -> saga::Result<Option<$store>> {
                if !wanted {
                    return Ok(None);
                }
                let store = open(name, tables).await?;
                sqlx::raw_sql(tables)
                    .execute(store.pool())
                    .await
                    .map_err(|e| saga::Error::backend("creating the business tables", false, e))?;
                Ok(Some(store))
            };
            let orders = store(services.order, "orders", super::ORDER_TABLES).await?;
            let stock = store(services.stock, "stock", super::STOCK_TABLES).await?;
            let payment = store(services.payment, "payment", super::PAYMENT_TABLES).await?;
            Node::start(orders, stock, payment, transport, config).await
        }
    };
}

mod on_sqlite {
    use std::path::Path;

    use saga::sql::SqliteStore;

    services_on!(SqliteStore, sqlx::Sqlite);

    /// One SQLite file per service under `dir`.
    pub(crate) async fn start(
        dir: &Path,
        wanted: Services,
        transport: Arc<dyn Transport>,
        config: &ShopConfig,
    ) -> saga::Result<Node> {
        let open = async |name: &'static str, _: &'static str| {
            SqliteStore::connect(&format!(
                "sqlite://{}",
                dir.join(format!("{name}.db")).display()
            ))
            .await
        };
        services(wanted, open, transport, config).await
    }
}

#[cfg(feature = "postgres")]
mod on_postgres {
    use saga::sql::PostgresStore;

    services_on!(PostgresStore, sqlx::Postgres);

    /// One database per service on `server`, created when missing.
    pub(crate) async fn start(
        server: &str,
        prefix: &str,
        wanted: Services,
        transport: Arc<dyn Transport>,
        config: &ShopConfig,
    ) -> saga::Result<Node> {
        let open = async |name: &'static str, _: &'static str| {
            let database = format!("{prefix}_{name}");
            let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
                .await
                .map_err(super::db("connecting to PostgreSQL"))?;
            let exists = sqlx::query("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(&database)
                .fetch_optional(&admin)
                .await
                .map_err(super::db("looking for the database"))?
                .is_some();
            if !exists {
                // Two processes may race to create it: the loser's error is harmless.
                let _ = sqlx::query(&format!("CREATE DATABASE \"{database}\""))
                    .execute(&admin)
                    .await;
            }
            admin.close().await;
            let pool = sqlx::PgPool::connect(&format!("{server}/{database}"))
                .await
                .map_err(super::db("connecting to the service database"))?;
            let store = PostgresStore::with_schema(pool, "saga")?;
            store.migrate().await?;
            Ok(store)
        };
        services(wanted, open, transport, config).await
    }

    /// Drops every database on `server` whose name starts with `prefix`.
    pub(crate) async fn drop_databases(server: &str, prefix: &str) -> saga::Result<()> {
        let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
            .await
            .map_err(super::db("connecting to PostgreSQL"))?;
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE left(datname, length($1)) = $1",
        )
        .bind(prefix)
        .fetch_all(&admin)
        .await
        .map_err(super::db("listing the databases"))?;
        for name in names {
            sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
                .execute(&admin)
                .await
                .map_err(super::db("dropping a database"))?;
        }
        admin.close().await;
        Ok(())
    }
}
