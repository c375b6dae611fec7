//! The e-commerce example as three processes (order, stock, payment) on
//! PostgreSQL and Redis Streams, orchestrated and choreographed. While 500 orders go in over HTTP, a random
//! service is SIGKILLed and started again, several times. Afterwards, read
//! straight from the three databases: no order is PENDING, and stock and
//! money add up exactly (scenario 8's invariants).
//!
//! Runs the example binary that `cargo test` builds
//! (`target/<profile>/examples/ecommerce`).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use saga::sql::sqlx::{self, PgPool, Row};
use saga_core::testing::{free_port, unavailable, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORDERS: usize = 500;
const KILLS: usize = 5;

#[path = "support/example.rs"]
mod example;

use example::example_binary;

/// One HTTP/1.1 request; `None` when the service cannot be reached.
async fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, serde_json::Value)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    ))
}

struct Service {
    name: &'static str,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Service {
    fn spawn(&mut self) {
        let child = Command::new(example_binary())
            .args(["service", self.name])
            .args(&self.args)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the example binary starts");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn until_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some((200, _)) = http(self.port, "GET", "/health", "").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the {} service did not come up", self.name);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Retries a request until the service answers (it may be down for a while).
async fn call(port: u16, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(answer) = http(port, method, path, body).await
            && answer.0 < 500
        {
            return answer;
        }
        assert!(Instant::now() < deadline, "{method} {path} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_killed_with_sigkill_lose_nothing() {
    sigkill_services("orchestration").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choreographed_services_killed_with_sigkill_lose_nothing() {
    sigkill_services("choreography").await;
}

/// One test at a time: each loads the machine with three processes.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn sigkill_services(mode: &str) {
    let _turn = ONE_AT_A_TIME.lock().await;
    example_binary();
    let server = std::env::var("ECOMMERCE_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    if let Err(error) = PgPool::connect(&format!("{server}/postgres")).await {
        return unavailable("PostgreSQL", error).unwrap_or(());
    }
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    if let Err(error) = redis_reachable(&redis_url).await {
        return unavailable("Redis", error).unwrap_or(());
    }
    let instance = unique("shop").replace('-', "_");
    let args = vec![
        "--transport".to_owned(),
        "redis".to_owned(),
        "--database-url".to_owned(),
        server.clone(),
        "--instance".to_owned(),
        instance.clone(),
        "--mode".to_owned(),
        mode.to_owned(),
    ];
    let mut services: Vec<Service> = ["order", "stock", "payment"]
        .into_iter()
        .map(|name| Service {
            name,
            port: free_port(),
            args: args.clone(),
            child: None,
        })
        .collect();
    for service in &mut services {
        service.spawn();
    }
    for service in &services {
        service.until_healthy().await;
    }
    let (order_port, stock_port, payment_port) =
        (services[0].port, services[1].port, services[2].port);

    let products: Vec<(String, i64, &str)> = (0..5)
        .map(|i| {
            (
                format!("gadget-{i}"),
                40 + 10 * i,
                ["5.00", "7.50", "10.00", "12.50", "15.00"][i as usize],
            )
        })
        .collect();
    let customers: Vec<(String, i64)> = (0..50)
        .map(|i| (format!("buyer-{i}"), 2_000 + 700 * i))
        .collect();
    for (id, available, price) in &products {
        let body = format!(r#"{{"available": {available}, "unit_price": "{price}"}}"#);
        assert_eq!(
            call(stock_port, "PUT", &format!("/stock/{id}"), &body)
                .await
                .0,
            200
        );
    }
    for (id, cents) in &customers {
        let body = format!(r#"{{"balance": "{}.{:02}"}}"#, cents / 100, cents % 100);
        assert_eq!(
            call(payment_port, "PUT", &format!("/wallets/{id}"), &body)
                .await
                .0,
            200
        );
    }

    // Place the orders from two tasks while the main task kills services.
    let mut placers = Vec::new();
    for part in 0..2 {
        let customers = customers.clone();
        let products: Vec<String> = products.iter().map(|p| p.0.clone()).collect();
        placers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(part);
            for n in (part as usize..ORDERS).step_by(2) {
                let customer = &customers[n % customers.len()].0;
                let product = &products[rng.usize(..products.len())];
                let body = format!(
                    r#"{{"customer_id": "{customer}", "items": [{{"product_id": "{product}", "quantity": {}}}]}}"#,
                    rng.i64(1..=3)
                );
                let (status, _) = call(order_port, "POST", "/orders", &body).await;
                assert_eq!(status, 201, "an order was refused");
            }
        }));
    }
    let mut rng = fastrand::Rng::with_seed(42);
    let mut killed = Vec::new();
    let first = rng.usize(..3);
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1200))).await;
        // Each service once, in a random rotation, then at random.
        let index = if kill < 3 {
            (first + kill) % 3
        } else {
            rng.usize(..3)
        };
        let victim = &mut services[index];
        killed.push(victim.name);
        victim.kill();
        tokio::time::sleep(Duration::from_millis(rng.u64(100..800))).await;
        victim.spawn();
        victim.until_healthy().await;
    }
    for placer in placers {
        placer.await.unwrap();
    }

    // Read the databases themselves.
    let database = |service: &str| format!("{server}/{instance}_{service}");
    let orders_db = PgPool::connect(&database("orders")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let statuses = loop {
        let rows = sqlx::query("SELECT status, count(*) AS n FROM orders GROUP BY status")
            .fetch_all(&orders_db)
            .await
            .unwrap();
        let statuses: HashMap<String, i64> =
            rows.iter().map(|r| (r.get("status"), r.get("n"))).collect();
        if !statuses.contains_key("PENDING") || Instant::now() >= deadline {
            break statuses;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        statuses.get("PENDING"),
        None,
        "orders left PENDING: {statuses:?}"
    );
    let placed: i64 = statuses.values().sum();
    assert!(
        placed >= ORDERS as i64,
        "{placed} orders stored for {ORDERS} accepted"
    );

    let confirmed = sqlx::query(
        "SELECT customer_id, items, total_cents FROM orders WHERE status = 'CONFIRMED'",
    )
    .fetch_all(&orders_db)
    .await
    .unwrap();
    let mut units: HashMap<String, i64> = HashMap::new();
    let mut spent: HashMap<String, i64> = HashMap::new();
    for row in &confirmed {
        let items: serde_json::Value = serde_json::from_str(row.get("items")).unwrap();
        for item in items.as_array().unwrap() {
            *units
                .entry(item["product_id"].as_str().unwrap().to_owned())
                .or_default() += item["quantity"].as_i64().unwrap();
        }
        *spent.entry(row.get("customer_id")).or_default() += row.get::<i64, _>("total_cents");
    }
    let stock_db = PgPool::connect(&database("stock")).await.unwrap();
    for (id, initial, _) in &products {
        let row = sqlx::query("SELECT available, reserved FROM products WHERE product_id = $1")
            .bind(id)
            .fetch_one(&stock_db)
            .await
            .unwrap();
        let (available, reserved): (i64, i64) = (row.get("available"), row.get("reserved"));
        assert_eq!(
            available + reserved,
            *initial,
            "{id}: stock appeared or vanished"
        );
        assert_eq!(
            reserved,
            units.get(id).copied().unwrap_or(0),
            "{id}: reserved != confirmed units"
        );
    }
    let payment_db = PgPool::connect(&database("payment")).await.unwrap();
    for (id, initial) in &customers {
        let balance: i64 =
            sqlx::query_scalar("SELECT balance_cents FROM wallets WHERE customer_id = $1")
                .bind(id)
                .fetch_one(&payment_db)
                .await
                .unwrap();
        assert_eq!(
            balance + spent.get(id).copied().unwrap_or(0),
            *initial,
            "{id}: money appeared or vanished"
        );
    }
    eprintln!("{mode}: {statuses:?} after SIGKILLs of {killed:?}");

    for service in &mut services {
        service.kill();
    }
    for pool in [orders_db, stock_db, payment_db] {
        pool.close().await;
    }
    if let Ok(admin) = PgPool::connect(&format!("{server}/postgres")).await {
        for service in ["orders", "stock", "payment"] {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{instance}_{service}\" WITH (FORCE)"
            ))
            .execute(&admin)
            .await;
        }
    }
}

async fn redis_reachable(url: &str) -> Result<(), String> {
    let address = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:6379")
        .to_owned();
    tokio::net::TcpStream::connect(address)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The HTTP API as documented: status codes, error bodies naming the field,
/// nothing stored for invalid input, the order view with its saga's steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_answers_as_documented() {
    let dir = std::env::temp_dir().join(unique("saga-ecommerce-http"));
    let mut shop = Service {
        name: "all",
        port: free_port(),
        args: vec![
            "--database-url".into(),
            format!("sqlite://{}", dir.display()),
        ],
        child: None,
    };
    // `serve`, not `service NAME`: every route on one listener, in memory.
    let child = Command::new(example_binary())
        .arg("serve")
        .args(&shop.args)
        .args(["--listen", &format!("127.0.0.1:{}", shop.port)])
        .stdout(Stdio::null())
        .spawn()
        .expect("the example binary starts");
    shop.child = Some(child);
    shop.until_healthy().await;
    let port = shop.port;

    let (status, body) = call(
        port,
        "PUT",
        "/stock/book",
        r#"{"available": 10, "unit_price": "12.50"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        call(port, "PUT", "/wallets/alice", r#"{"balance": "100.00"}"#)
            .await
            .0,
        200
    );
    let (status, body) = call(port, "PUT", "/wallets/bob", r#"{"balance": 12.5}"#).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (422, Some("balance")),
        "money as a float is refused"
    );

    let invalid = [
        (
            r#"{"customer_id": "alice", "items": [{"product_id": "book", "quantity": 0}]}"#,
            422,
            Some("items[0].quantity"),
        ),
        (
            r#"{"customer_id": "alice", "items": [{"quantity": 1}]}"#,
            422,
            Some("items[0].product_id"),
        ),
        (
            r#"{"items": [{"product_id": "book", "quantity": 1}]}"#,
            422,
            Some("customer_id"),
        ),
        (
            r#"{"customer_id": "alice", "items": []}"#,
            422,
            Some("items"),
        ),
        (r#"{"customer_id": "alice", "items": ["#, 400, None),
    ];
    for (body, expected, field) in invalid {
        let (status, answer) = call(port, "POST", "/orders", body).await;
        assert_eq!(status, expected, "{body} → {answer}");
        assert!(answer["error"].is_string(), "an error message: {answer}");
        assert_eq!(answer["field"].as_str(), field, "{body} → {answer}");
    }

    let (status, placed) = call(
        port,
        "POST",
        "/orders",
        r#"{"customer_id": "alice", "items": [{"product_id": "book", "quantity": 2}]}"#,
    )
    .await;
    assert_eq!(status, 201, "{placed}");
    assert_eq!(placed["status"], "PENDING");
    let id = placed["order_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let (status, view) = call(port, "GET", &format!("/orders/{id}"), "").await;
        assert_eq!(status, 200);
        if view["status"] != "PENDING" || Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view["status"], "CONFIRMED", "{view}");
    assert_eq!(view["reason"], serde_json::Value::Null);
    assert_eq!(view["saga"]["state"], "COMPLETED");
    let steps = view["saga"]["steps"].as_array().unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s["name"] == "process-payment" && s["status"] == "succeeded"),
        "{view}"
    );
    assert!(
        steps
            .iter()
            .all(|s| s["at"].is_string() && s.get("error").is_some()),
        "{view}"
    );
    assert_eq!(call(port, "GET", "/orders/no-such-order", "").await.0, 404);
    let (_, stock) = call(port, "GET", "/stock/book", "").await;
    assert_eq!(
        (stock["available"].as_i64(), stock["reserved"].as_i64()),
        (Some(8), Some(2))
    );
    let (_, wallet) = call(port, "GET", "/wallets/alice", "").await;
    assert_eq!(wallet["balance"], "75.00");
    assert_eq!(call(port, "GET", "/stock/unknown", "").await.0, 404);

    shop.kill();
    // Only the valid order was stored.
    let orders = sqlx::SqlitePool::connect(&format!("sqlite://{}/orders.db", dir.display()))
        .await
        .unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&orders)
        .await
        .unwrap();
    assert_eq!(stored, 1, "invalid requests stored nothing");
    orders.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
