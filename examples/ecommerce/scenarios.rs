//! The scenarios the demo (and the test) runs, each checking what the
//! databases hold afterwards.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use saga::Transport;

use crate::faults::{LoseFirst, Twice};
use crate::shop::{self, Cents, Databases, Item, OrderView, Services, ShopApi, ShopConfig};
use crate::transport::TransportKind;

/// How long a scenario waits for its orders to end.
const PATIENCE: Duration = Duration::from_secs(60);

/// One row of the result table.
pub(crate) struct Outcome {
    pub(crate) scenario: &'static str,
    pub(crate) expected: String,
    pub(crate) got: String,
    pub(crate) ok: bool,
    pub(crate) elapsed: Duration,
}

fn item(product_id: &str, quantity: i64) -> Item {
    Item {
        product_id: product_id.into(),
        quantity,
    }
}

fn status(view: &OrderView) -> String {
    match &view.reason {
        Some(reason) => format!("{} ({reason})", view.status),
        None => view.status.clone(),
    }
}

/// Scenario 1: Happy path.
async fn happy_path(shop: &dyn ShopApi) -> saga::Result<(String, String, bool)> {
    shop.put_stock("book", 10, Cents(1250)).await?;
    shop.put_wallet("alice", Cents(10_000)).await?;
    let id = shop.place_order("alice", vec![item("book", 2)]).await?;
    let view = shop.settled(&id, PATIENCE).await?;
    let stock = shop.stock_of("book").await?.unwrap_or_default();
    let wallet = shop.wallet_of("alice").await?.unwrap_or_default();
    let got = format!(
        "{}; book {}+{} reserved; wallet {wallet}",
        status(&view),
        stock.0,
        stock.1
    );
    let ok = view.status == "CONFIRMED" && stock == (8, 2) && wallet == Cents(7_500);
    Ok(("CONFIRMED; book 8+2 reserved; wallet 75.00".into(), got, ok))
}

/// Scenario 2: Out of stock.
async fn out_of_stock(shop: &dyn ShopApi) -> saga::Result<(String, String, bool)> {
    shop.put_stock("lamp", 1, Cents(3000)).await?;
    shop.put_wallet("bob", Cents(10_000)).await?;
    let id = shop.place_order("bob", vec![item("lamp", 3)]).await?;
    let view = shop.settled(&id, PATIENCE).await?;
    let wallet = shop.wallet_of("bob").await?.unwrap_or_default();
    let stock = shop.stock_of("lamp").await?.unwrap_or_default();
    let ok = view.status == "CANCELLED"
        && view
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("out of stock"))
        && wallet == Cents(10_000)
        && stock == (1, 0);
    Ok((
        "CANCELLED (out of stock); wallet 100.00".into(),
        format!("{}; wallet {wallet}", status(&view)),
        ok,
    ))
}

/// Scenario 3: Unknown product.
async fn unknown_product(shop: &dyn ShopApi) -> saga::Result<(String, String, bool)> {
    shop.put_wallet("carol", Cents(10_000)).await?;
    let id = shop.place_order("carol", vec![item("unicorn", 1)]).await?;
    let view = shop.settled(&id, PATIENCE).await?;
    let ok = view.status == "CANCELLED"
        && view
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("unknown product"));
    Ok(("CANCELLED (unknown product)".into(), status(&view), ok))
}

/// Scenario 4: Payment declined: the stock is released.
async fn payment_declined(shop: &dyn ShopApi) -> saga::Result<(String, String, bool)> {
    shop.put_stock("pen", 5, Cents(250)).await?;
    shop.put_wallet("dave", Cents(100)).await?;
    let id = shop.place_order("dave", vec![item("pen", 2)]).await?;
    let view = shop.settled(&id, PATIENCE).await?;
    let stock = shop.stock_of("pen").await?.unwrap_or_default();
    let wallet = shop.wallet_of("dave").await?.unwrap_or_default();
    let ok = view.status == "CANCELLED"
        && view
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("insufficient funds"))
        && stock == (5, 0)
        && wallet == Cents(100);
    Ok((
        "CANCELLED (insufficient funds); pen 5+0; wallet 1.00".into(),
        format!(
            "{}; pen {}+{}; wallet {wallet}",
            status(&view),
            stock.0,
            stock.1
        ),
        ok,
    ))
}

/// Waits until the order's saga history has a step matching one of `what`.
async fn until_history(shop: &dyn ShopApi, order_id: &str, what: &[&str]) -> saga::Result<bool> {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if let Some(view) = shop.order(order_id).await?
            && view.saga.steps.iter().any(|s| {
                what.iter()
                    .any(|w| format!("{} {}", s.name, s.status).contains(w))
            })
        {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(false)
}

/// Scenario 5: The payment service crashes mid-saga and comes back.
async fn payment_crash(shop: &dyn ShopApi) -> saga::Result<(String, String, bool)> {
    shop.put_stock("mug", 10, Cents(800)).await?;
    shop.put_wallet("erin", Cents(5_000)).await?;
    shop.crash_payment().await;
    let id = shop.place_order("erin", vec![item("mug", 1)]).await?;
    // Orchestration: the charge command is out; choreography: the order
    // service has seen the stock reserved (so the charge event is out too).
    let reached = until_history(
        shop,
        &id,
        &["process-payment sent", "stock.reserved handled by orders"],
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    shop.start_payment().await?;
    let view = shop.settled(&id, PATIENCE).await?;
    let wallet = shop.wallet_of("erin").await?.unwrap_or_default();
    let ok = reached && view.status == "CONFIRMED" && wallet == Cents(4_200);
    Ok((
        "CONFIRMED; wallet 42.00 (debited once)".into(),
        format!("{}; wallet {wallet}", status(&view)),
        ok,
    ))
}

/// Scenario 6: Every message delivered twice (a shop on the [`Twice`]
/// transport): scenarios 1–5 again, effects once.
async fn duplicates(shop: &dyn ShopApi) -> saga::Result<(String, String, bool)> {
    let mut got = Vec::new();
    let mut ok = true;
    for (number, (_, seen, passed)) in [
        happy_path(shop).await?,
        out_of_stock(shop).await?,
        unknown_product(shop).await?,
        payment_declined(shop).await?,
        payment_crash(shop).await?,
    ]
    .into_iter()
    .enumerate()
    {
        got.push(if passed {
            format!("{} ok", number + 1)
        } else {
            format!("{} WRONG: {seen}", number + 1)
        });
        ok &= passed;
    }
    Ok(("1–5 as without duplicates".into(), got.join("; "), ok))
}

/// Scenario 7: Payment does not answer within the deadline (a shop with a
/// 1 s deadline and one attempt): compensation, then the late reply changes
/// nothing.
async fn deadline(shop: &dyn ShopApi) -> saga::Result<(String, String, bool)> {
    shop.put_stock("desk", 3, Cents(20_000)).await?;
    shop.put_wallet("frank", Cents(50_000)).await?;
    shop.crash_payment().await;
    let id = shop.place_order("frank", vec![item("desk", 1)]).await?;
    let timed_out = until_history(shop, &id, &["process-payment timed out"]).await?;
    shop.start_payment().await?;
    let view = shop.settled(&id, PATIENCE).await?;
    // The late charge reply arrives while (or after) compensating: ignored.
    let ignored = until_history(shop, &id, &["ignored a late reply"]).await?;
    let wallet = shop.wallet_of("frank").await?.unwrap_or_default();
    let stock = shop.stock_of("desk").await?.unwrap_or_default();
    let ok = timed_out
        && view.status == "CANCELLED"
        && wallet == Cents(50_000)
        && stock == (3, 0)
        && ignored;
    Ok((
        "CANCELLED (timed out); late reply ignored; wallet 500.00; desk 3+0".into(),
        format!(
            "{}; late reply {}; wallet {wallet}; desk {}+{}",
            status(&view),
            if ignored { "ignored" } else { "NOT seen" },
            stock.0,
            stock.1
        ),
        ok,
    ))
}

/// Scenario 9: The first charge command is lost on its way (a shop on the
/// [`LoseFirst`] transport, with a 1 s deadline and two attempts): the step
/// times out, and payment declines the retry. The order is cancelled for
/// the decline, the failure that decided it, not for the first timeout.
async fn retried_then_declined(shop: &dyn ShopApi) -> saga::Result<(String, String, bool)> {
    shop.put_stock("lamp", 4, Cents(3_000)).await?;
    shop.put_wallet("grace", Cents(1_000)).await?;
    let id = shop.place_order("grace", vec![item("lamp", 1)]).await?;
    let view = shop.settled(&id, PATIENCE).await?;
    let timed_out = view
        .saga
        .steps
        .iter()
        .any(|s| s.name == "process-payment" && s.status == "timed out");
    let retried = view
        .saga
        .steps
        .iter()
        .any(|s| s.name == "process-payment" && s.status == "failed");
    let stock = shop.stock_of("lamp").await?.unwrap_or_default();
    let ok = timed_out
        && retried
        && view.status == "CANCELLED"
        && view
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("insufficient funds"))
        && stock == (4, 0);
    Ok((
        "CANCELLED (insufficient funds); lamp 4+0".into(),
        format!("{}; lamp {}+{}", status(&view), stock.0, stock.1),
        ok,
    ))
}

/// Scenario 8: 500 orders at once against limited stock.
async fn concurrency(shop: &Arc<dyn ShopApi>) -> saga::Result<(String, String, bool)> {
    let products: Vec<(String, i64, Cents)> = (0..5)
        .map(|i| (format!("gadget-{i}"), 40 + 10 * i, Cents(500 + 250 * i)))
        .collect();
    let customers: Vec<(String, Cents)> = (0..50)
        .map(|i| (format!("buyer-{i}"), Cents(2_000 + 700 * i)))
        .collect();
    for (id, available, price) in &products {
        shop.put_stock(id, *available, *price).await?;
    }
    for (id, balance) in &customers {
        shop.put_wallet(id, *balance).await?;
    }
    let mut rng = fastrand::Rng::with_seed(8);
    let mut tasks = Vec::new();
    for n in 0..500 {
        let customer = customers[n % customers.len()].0.clone();
        let mut items = vec![item(
            &products[rng.usize(..products.len())].0,
            rng.i64(1..=3),
        )];
        if rng.bool() {
            let other = &products[rng.usize(..products.len())].0;
            if *other != items[0].product_id {
                items.push(item(other, rng.i64(1..=2)));
            }
        }
        let shop = Arc::clone(shop);
        tasks.push(tokio::spawn(async move {
            shop.place_order(&customer, items).await
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(
            task.await
                .map_err(|e| saga::Error::Unavailable(e.to_string()))??,
        );
    }
    let mut by_status: HashMap<String, usize> = HashMap::new();
    let mut reasons: HashMap<String, usize> = HashMap::new();
    let mut confirmed_units: HashMap<String, i64> = HashMap::new();
    let mut confirmed_spent: HashMap<String, i64> = HashMap::new();
    for id in &ids {
        let view = shop.settled(id, PATIENCE * 2).await?;
        *by_status.entry(view.status.clone()).or_default() += 1;
        if let Some(reason) = &view.reason {
            let kind = reason
                .split([':', '('])
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            *reasons.entry(kind).or_default() += 1;
        }
        if view.status == "CONFIRMED" {
            let (customer, items) = shop.order_lines(id).await?;
            for line in items {
                *confirmed_units.entry(line.product_id).or_default() += line.quantity;
            }
            *confirmed_spent.entry(customer).or_default() += view
                .total
                .as_deref()
                .and_then(Cents::parse)
                .unwrap_or_default()
                .0;
        }
    }
    let mut ok = by_status
        .keys()
        .all(|s| s == "CONFIRMED" || s == "CANCELLED");
    for (id, initial, _) in &products {
        let (available, reserved) = shop.stock_of(id).await?.unwrap_or_default();
        let sold = confirmed_units.get(id).copied().unwrap_or(0);
        ok &= *initial == available + reserved && reserved == sold;
    }
    for (id, initial) in &customers {
        let balance = shop.wallet_of(id).await?.unwrap_or_default();
        ok &= initial.0 == balance.0 + confirmed_spent.get(id).copied().unwrap_or(0);
    }
    let count = |s: &str| by_status.get(s).copied().unwrap_or(0);
    Ok((
        "all 500 end; stock and money add up".into(),
        format!(
            "{} CONFIRMED, {} CANCELLED ({}), {} other; invariants {}",
            count("CONFIRMED"),
            count("CANCELLED"),
            {
                let mut kinds: Vec<_> = reasons.iter().map(|(k, n)| format!("{n} {k}")).collect();
                kinds.sort();
                kinds.join(", ")
            },
            ids.len() - count("CONFIRMED") - count("CANCELLED"),
            if ok { "hold" } else { "BROKEN" }
        ),
        ok,
    ))
}

/// The shops of a run and their transports, to stop and clean up at the end.
#[derive(Default)]
struct Shops(Vec<(Arc<dyn ShopApi>, Arc<dyn Transport>)>);

impl Shops {
    /// Starts a shop on databases and channels of its own (`name` under the run's).
    async fn start(
        &mut self,
        databases: &Databases,
        kind: TransportKind,
        run: &str,
        name: &str,
        config: &ShopConfig,
        wrap: impl FnOnce(Arc<dyn Transport>) -> Arc<dyn Transport>,
    ) -> saga::Result<Arc<dyn ShopApi>> {
        // Channel names of each shop's own: two shops on one broker must not
        // share a consumer group.
        let transport = crate::transport::connect(kind, &format!("{run}.{name}.")).await?;
        let shop = shop::start(
            &databases.child(name),
            Services::ALL,
            wrap(Arc::clone(&transport)),
            config,
        )
        .await?;
        self.0.push((Arc::clone(&shop), transport));
        Ok(shop)
    }

    /// Stops every shop; unless `keep`, deletes their channels on the broker.
    async fn stop(self, keep: bool) -> saga::Result<()> {
        let mut cleaned = Ok(());
        for (shop, transport) in self.0 {
            shop.stop().await;
            if !keep {
                cleaned = cleaned.and(shop::delete_channels(transport.as_ref()).await);
            }
        }
        cleaned
    }
}

/// Runs every scenario; each shop gets databases of its own under
/// `databases` and channels named `<run>.<shop>.*`, which it deletes at the
/// end unless `keep` (the caller owns the databases), also after an error
/// or a Ctrl-C.
///
/// With `config.choreography`, scenarios 7 and 9 are not run: a step
/// deadline is the orchestrator's; a choreographed flow has no one waiting
/// for a reply.
pub(crate) async fn run_all(
    databases: &Databases,
    kind: TransportKind,
    run: &str,
    config: &ShopConfig,
    keep: bool,
) -> saga::Result<Vec<Outcome>> {
    let mut shops = Shops::default();
    // Ctrl-C stops the scenarios, not the clean-up.
    let outcomes = tokio::select! {
        outcomes = scenarios(&mut shops, databases, kind, run, config) => outcomes,
        _ = tokio::signal::ctrl_c() => Err(saga::Error::Config("interrupted by Ctrl-C".into())),
    };
    let cleaned = shops.stop(keep).await;
    let outcomes = outcomes?;
    cleaned?;
    Ok(outcomes)
}

async fn scenarios(
    shops: &mut Shops,
    databases: &Databases,
    kind: TransportKind,
    run: &str,
    config: &ShopConfig,
) -> saga::Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    let mut record = |scenario: &'static str, started: Instant, result: (String, String, bool)| {
        outcomes.push(Outcome {
            scenario,
            expected: result.0,
            got: result.1,
            ok: result.2,
            elapsed: started.elapsed(),
        });
    };
    let same = |transport| transport;

    let shop = shops
        .start(databases, kind, run, "main", config, same)
        .await?;
    if !shop.healthy().await {
        return Err(saga::Error::Unavailable(format!(
            "the service databases ({databases}) cannot be reached"
        )));
    }
    let started = Instant::now();
    record("1 happy path", started, happy_path(shop.as_ref()).await?);
    let started = Instant::now();
    record(
        "2 out of stock",
        started,
        out_of_stock(shop.as_ref()).await?,
    );
    let started = Instant::now();
    record(
        "3 unknown product",
        started,
        unknown_product(shop.as_ref()).await?,
    );
    let started = Instant::now();
    record(
        "4 payment declined",
        started,
        payment_declined(shop.as_ref()).await?,
    );
    let started = Instant::now();
    record(
        "5 payment crashes mid-saga",
        started,
        payment_crash(shop.as_ref()).await?,
    );
    let started = Instant::now();
    let twice = shops
        .start(databases, kind, run, "twice", config, |transport| {
            Arc::new(Twice(transport))
        })
        .await?;
    record(
        "6 every message twice",
        started,
        duplicates(twice.as_ref()).await?,
    );
    if !config.choreography {
        let deadline_config = ShopConfig {
            deadline: Duration::from_secs(1),
            attempts: 1,
            ..config.clone()
        };
        let started = Instant::now();
        let late = shops
            .start(databases, kind, run, "deadline", &deadline_config, same)
            .await?;
        record(
            "7 payment misses its deadline",
            started,
            deadline(late.as_ref()).await?,
        );
    }
    let started = Instant::now();
    record("8 500 orders at once", started, concurrency(&shop).await?);
    if !config.choreography {
        let retry_config = ShopConfig {
            deadline: Duration::from_secs(1),
            attempts: 2,
            ..config.clone()
        };
        let started = Instant::now();
        let retried = shops
            .start(databases, kind, run, "retry", &retry_config, |transport| {
                Arc::new(LoseFirst::new(transport, "payment.charge"))
            })
            .await?;
        record(
            "9 payment times out, then is declined",
            started,
            retried_then_declined(retried.as_ref()).await?,
        );
    }
    Ok(outcomes)
}
