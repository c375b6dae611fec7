//! The e-commerce example: Order, Stock and Payment services, each with its
//! own database, placing orders through a saga.
//!
//! ```sh
//! cargo run --example ecommerce                       # every scenario, one process, no server
//! cargo run --example ecommerce --features kafka -- --transport kafka   # over Kafka (or amqp, redis)
//! cargo run --example ecommerce --features postgres -- --database-url postgres://postgres@127.0.0.1:5432
//! ```
//!
//! Prints one row per scenario (expected, got, time) and exits non-zero if
//! any scenario did not behave as expected.
//!
//! The services with their HTTP API (routes in `http.rs`):
//!
//! ```sh
//! cargo run --example ecommerce -- serve [--listen 127.0.0.1:3000]           # all three in one process
//! cargo run --example ecommerce --features redis -- service order --transport redis --listen 127.0.0.1:3001
//! cargo run --example ecommerce --features redis -- service stock --transport redis --listen 127.0.0.1:3002
//! cargo run --example ecommerce --features redis -- service payment --transport redis --listen 127.0.0.1:3003
//! ```
//!
//! `serve` and `service` keep their data (default `sqlite://ecommerce-data`)
//! and use fixed channel names (prefix `ecommerce.`), so a service can be
//! killed and started again, and processes find each other through the
//! broker. `--instance NAME` replaces `ecommerce` in those names, to run
//! several shops side by side. One process per service needs a real broker: the in-memory
//! transport does not cross processes.
//!
//! Options:
//! - `--mode orchestration|choreography` (default orchestration): the Order
//!   service runs the saga, or every service reacts to the others' events
//!   and the order's saga is its event log (scenario 7, a step deadline,
//!   exists only with an orchestrator);
//! - `--transport memory|kafka|amqp|redis` (default `memory`; addresses from
//!   `KAFKA_BROKERS`, `AMQP_URL`, `REDIS_URL`);
//! - `--database-url URL`: `sqlite://DIR` (one file per service in DIR;
//!   default a fresh directory under the system's temporary directory) or
//!   `postgres://user@host:port` (one database per service, created when
//!   missing, named `ecommerce_<run>_<service>`).

mod http;
mod scenarios;
mod shop;
#[path = "../support/transport.rs"]
mod transport;

use std::process::ExitCode;

use shop::{Databases, Services, ShopConfig};

/// The value after `flag` on the command line.
fn option(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|at| args.get(at + 1).cloned())
}

/// The name that keeps several shops apart (`--instance`, default
/// `ecommerce`): it starts database and channel names.
fn instance() -> String {
    option("--instance").unwrap_or_else(|| "ecommerce".into())
}

/// Where the services keep their data, from `--database-url`; `keep`:
/// the same place every run (serving), or a fresh one (the demo).
fn databases(keep: bool) -> Result<Databases, String> {
    let run = saga::MessageId::new().to_string().replace('-', "");
    match option("--database-url") {
        None if keep => Ok(Databases::Sqlite(format!("{}-data", instance()).into())),
        None => Ok(Databases::Sqlite(
            std::env::temp_dir().join(format!("saga-ecommerce-{run}")),
        )),
        Some(url) if url.starts_with("sqlite://") => Ok(Databases::Sqlite(
            url.trim_start_matches("sqlite://").into(),
        )),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Databases::Postgres {
                server: url.trim_end_matches('/').to_owned(),
                prefix: if keep {
                    instance()
                } else {
                    format!("ecommerce_{}", &run[run.len() - 12..])
                },
            })
        }
        Some(url) => Err(format!(
            "--database-url {url:?}: use sqlite://DIR or postgres://user@host:port"
        )),
    }
}

/// Orchestration (default) or choreography, from `--mode`.
fn shop_config() -> Result<ShopConfig, String> {
    let choreography = match option("--mode").as_deref() {
        None | Some("orchestration") => false,
        Some("choreography") => true,
        Some(other) => {
            return Err(format!(
                "--mode {other:?}: use orchestration or choreography"
            ));
        }
    };
    Ok(ShopConfig {
        choreography,
        ..ShopConfig::default()
    })
}

/// `serve` (every service) or `service NAME` (one), with the HTTP API.
async fn serve(services: Services) -> ExitCode {
    let name = transport::chosen();
    if name == "memory" && services != Services::ALL {
        eprintln!(
            "error: one service per process needs a broker: --transport kafka, amqp or redis"
        );
        return ExitCode::from(2);
    }
    let databases = match databases(true) {
        Ok(databases) => databases,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let listen = option("--listen").unwrap_or_else(|| "127.0.0.1:3000".into());
    let config = match shop_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let started = async {
        let transport = transport::connect(&name, &format!("{}.", instance())).await?;
        shop::start(&databases, services, transport, &config).await
    };
    let shop = match started.await {
        Ok(shop) => shop,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("{services:?} on {databases:?}, transport {name}");
    match http::serve(shop, services, &listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {listen}: {error}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => return serve(Services::ALL).await,
        Some("service") => {
            let services = match args.get(1).map(String::as_str) {
                Some("order") => Services {
                    order: true,
                    stock: false,
                    payment: false,
                },
                Some("stock") => Services {
                    order: false,
                    stock: true,
                    payment: false,
                },
                Some("payment") => Services {
                    order: false,
                    stock: false,
                    payment: true,
                },
                other => {
                    eprintln!("error: service {other:?}: use order, stock or payment");
                    return ExitCode::from(2);
                }
            };
            return serve(services).await;
        }
        Some(flag) if flag.starts_with("--") => {}
        None => {}
        Some(other) => {
            eprintln!(
                "error: unknown command {other:?}: use serve, service NAME, or no command for the demo"
            );
            return ExitCode::from(2);
        }
    }
    let transport = transport::chosen();
    let (databases, config) = match databases(false).and_then(|d| Ok((d, shop_config()?))) {
        Ok(both) => both,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    println!(
        "e-commerce saga demo: {}, one database per service ({databases:?}), transport {transport}\n",
        if config.choreography {
            "choreography"
        } else {
            "orchestration"
        }
    );
    let outcomes = match scenarios::run_all(&databases, &transport, &config).await {
        Ok(outcomes) => outcomes,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("| scenario | expected | got | time |");
    println!("|---|---|---|---|");
    for o in &outcomes {
        println!(
            "| {}{} | {} | {} | {:.2} s |",
            if o.ok { "" } else { "FAILED " },
            o.scenario,
            o.expected,
            o.got,
            o.elapsed.as_secs_f64()
        );
    }
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    println!(
        "\n{} of {} scenarios as expected",
        outcomes.len() - failed,
        outcomes.len()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
