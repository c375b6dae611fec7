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
//! Options:
//! - `--transport memory|kafka|amqp|redis` (default `memory`; addresses from
//!   `KAFKA_BROKERS`, `AMQP_URL`, `REDIS_URL`);
//! - `--database-url URL`: `sqlite://DIR` (one file per service in DIR;
//!   default a fresh directory under the system's temporary directory) or
//!   `postgres://user@host:port` (one database per service, created when
//!   missing, named `ecommerce_<run>_<service>`).

mod scenarios;
mod shop;
#[path = "../support/transport.rs"]
mod transport;

use std::process::ExitCode;

use shop::Databases;

/// The value after `flag` on the command line.
fn option(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|at| args.get(at + 1).cloned())
}

/// Where the services keep their data, from `--database-url`.
fn databases() -> Result<Databases, String> {
    let run = saga::MessageId::new().to_string().replace('-', "");
    match option("--database-url") {
        None => Ok(Databases::Sqlite(
            std::env::temp_dir().join(format!("saga-ecommerce-{run}")),
        )),
        Some(url) if url.starts_with("sqlite://") => Ok(Databases::Sqlite(
            url.trim_start_matches("sqlite://").into(),
        )),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Databases::Postgres {
                server: url.trim_end_matches('/').to_owned(),
                prefix: format!("ecommerce_{}", &run[run.len() - 12..]),
            })
        }
        Some(url) => Err(format!(
            "--database-url {url:?}: use sqlite://DIR or postgres://user@host:port"
        )),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let transport = transport::chosen();
    let databases = match databases() {
        Ok(databases) => databases,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    println!(
        "e-commerce saga demo: one database per service ({databases:?}), transport {transport}\n"
    );
    let outcomes = match scenarios::run_all(&databases, &transport).await {
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
