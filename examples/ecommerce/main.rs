//! The e-commerce example: Order, Stock and Payment services, each with its
//! own SQLite database, placing orders through a saga.
//!
//! ```sh
//! cargo run --example ecommerce                       # every scenario, in one process, no server
//! cargo run --example ecommerce --features kafka -- --transport kafka   # the same over Kafka (or amqp, redis)
//! ```
//!
//! Prints one row per scenario (expected, got, time) and exits non-zero if
//! any scenario did not behave as expected. The databases are kept in a
//! fresh directory under the system's temporary directory, printed at the end.

mod scenarios;
mod shop;
#[path = "../support/transport.rs"]
mod transport;

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let name = transport::chosen();
    let dir = std::env::temp_dir().join(format!("saga-ecommerce-{}", saga::MessageId::new()));
    println!("e-commerce saga demo: SQLite databases per service, transport {name}\n");
    let outcomes = match scenarios::run_all(&dir, &name).await {
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
        "\n{} of {} scenarios as expected; databases in {}",
        outcomes.len() - failed,
        outcomes.len(),
        dir.display()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
