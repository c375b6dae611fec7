//! The e-commerce example: Order, Stock and Payment services, each with its
//! own database, placing orders through a saga.
//!
//! ```sh
//! cargo run --example ecommerce                       # every scenario, one process, no server
//! cargo run --example ecommerce -- --help             # the commands and options
//! cargo run --example ecommerce --features kafka -- --transport kafka   # over Kafka (or amqp, redis)
//! cargo run --example ecommerce --features postgres -- --database-url postgres://postgres@127.0.0.1:5432
//! ```
//!
//! The demo prints one row per scenario (expected, got, time) and exits
//! non-zero if any scenario did not behave as expected. It deletes what it
//! made for itself (its databases or files, its topics, queues or streams)
//! unless `--keep` asks to keep them.
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
//! Each service relays its own outbox. With `service NAME --no-relay` it
//! only writes to it, and `relay NAME` processes (any number, with the
//! service's `--instance` and `--database-url`) publish it; without one,
//! nothing it writes is published:
//!
//! ```sh
//! cargo run --example ecommerce --features redis -- service order --no-relay --transport redis --listen 127.0.0.1:3001
//! cargo run --example ecommerce --features redis -- relay order --transport redis --listen 127.0.0.1:3011
//! ```
//!
//! `serve`, `service` and `relay` keep their data (by default in SQLite files under
//! the system's temporary directory, `saga-<instance>-data`) and use fixed
//! channel names (prefix `<instance>.`), so a service can be killed and
//! started again, and processes find each other through the broker. One
//! process per service needs a real broker: the in-memory transport does not
//! cross processes.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default
//! `warn,sqlx::query=error,ecommerce=info`; `RUST_LOG=saga=debug` shows
//! what the library does).

mod faults;
mod http;
#[path = "../support/logs.rs"]
mod logs;
mod scenarios;
mod shop;
#[path = "../support/transport.rs"]
mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use shop::{Databases, Role, Services, ShopConfig};
use transport::TransportKind;

/// Order, Stock and Payment services, each with its own database, placing
/// orders through a saga. With no command: runs the scenarios and prints
/// what each expected and got.
#[derive(Parser)]
#[command(name = "ecommerce")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    shop: ShopArgs,
    /// Keep what the demo made for itself (databases or files, topics,
    /// queues or streams) instead of deleting it at the end. (`serve` and
    /// `service` always keep their data.)
    #[arg(long)]
    keep: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Every service in one process, with the HTTP API.
    Serve(ServeArgs),
    /// One service in this process, with its HTTP API (needs a broker).
    Service {
        /// Which service.
        #[arg(value_enum)]
        name: ServiceName,
        /// Leave publishing the service's outbox to `relay` processes.
        #[arg(long)]
        no_relay: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Only the relay of one service's outbox, with `/health` (needs a
    /// broker): for services started with `--no-relay`. Run as many as
    /// you like; they share the work and take over from each other.
    Relay {
        /// Whose outbox.
        #[arg(value_enum)]
        name: ServiceName,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

/// Options of every command.
#[derive(Args)]
struct ShopArgs {
    /// Orchestration (the Order service runs a saga) or choreography (the
    /// services react to each other's events).
    #[arg(long, value_enum, default_value_t = Mode::Orchestration, global = true)]
    mode: Mode,
    /// Where the services' messages travel.
    #[arg(long, value_enum, default_value_t = TransportKind::Memory, global = true)]
    transport: TransportKind,
    /// `sqlite://DIR` (one file per service in DIR) or
    /// `postgres://user@host:port` (one database per service, created when
    /// missing). Default: SQLite files in a directory of their own under the
    /// system's temporary directory.
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
}

/// Options of `serve`, `service` and `relay`.
#[derive(Args)]
struct ServeArgs {
    /// The HTTP API's address.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Starts the database and channel names, to run several shops side by side.
    #[arg(long, default_value = "ecommerce")]
    instance: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Orchestration,
    Choreography,
}

#[derive(Clone, Copy, ValueEnum)]
enum ServiceName {
    Order,
    Stock,
    Payment,
}

impl ServiceName {
    fn services(self) -> Services {
        Services {
            order: matches!(self, Self::Order),
            stock: matches!(self, Self::Stock),
            payment: matches!(self, Self::Payment),
        }
    }
}

impl ShopArgs {
    fn config(&self, role: Role) -> ShopConfig {
        ShopConfig {
            choreography: self.mode == Mode::Choreography,
            role,
            ..ShopConfig::default()
        }
    }

    /// Where `serve`, `service` and `relay` keep their data: the same place every
    /// start, named after the instance.
    fn serve_databases(&self, instance: &str) -> Result<Databases, String> {
        match self.database_url.as_deref() {
            None => Ok(Databases::Sqlite(
                std::env::temp_dir().join(format!("saga-{instance}-data")),
            )),
            Some(url) if url.starts_with("sqlite://") => Ok(Databases::Sqlite(
                url.trim_start_matches("sqlite://").into(),
            )),
            Some(url) => postgres(url, instance),
        }
    }

    /// Where the demo keeps its data: a place of this run's own (files in a
    /// directory named after the run, or databases whose names start with it).
    fn demo_databases(&self, run: &str) -> Result<Databases, String> {
        match self.database_url.as_deref() {
            None => Ok(Databases::Sqlite(
                std::env::temp_dir().join(format!("saga-{run}")),
            )),
            Some(url) if url.starts_with("sqlite://") => Ok(Databases::Sqlite(
                PathBuf::from(url.trim_start_matches("sqlite://")).join(run),
            )),
            Some(url) => postgres(url, run),
        }
    }
}

/// PostgreSQL databases whose names start with `name`, or why `url` is not
/// a database URL this example takes.
fn postgres(url: &str, name: &str) -> Result<Databases, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Databases::Postgres {
            server: url.trim_end_matches('/').to_owned(),
            prefix: name.replace(['-', '.'], "_"),
        })
    } else {
        Err(format!(
            "--database-url {}: use sqlite://DIR or postgres://user@host:port",
            saga::core::redact::redact_url(url)
        ))
    }
}

/// `serve` (every service), `service NAME` (one) or `relay NAME` (one
/// service's relay), with the HTTP API of what runs here.
async fn serve(shop_args: &ShopArgs, services: Services, role: Role, args: &ServeArgs) -> ExitCode {
    if shop_args.transport == TransportKind::Memory && services != Services::ALL {
        let what = if role == Role::Relays {
            "a relay in a process of its own"
        } else {
            "one service per process"
        };
        eprintln!("error: {what} needs a broker: --transport kafka, amqp or redis");
        return ExitCode::from(2);
    }
    let databases = match shop_args.serve_databases(&args.instance) {
        Ok(databases) => databases,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let started = async {
        let transport =
            transport::connect(shop_args.transport, &format!("{}.", args.instance)).await?;
        shop::start(&databases, services, transport, &shop_args.config(role)).await
    };
    let shop = match started.await {
        Ok(shop) => shop,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        ?services,
        ?role,
        %databases,
        transport = %shop_args.transport,
        "services started; their data stays for the next start"
    );
    // A relay process serves `/health` only.
    let routes = if role == Role::Relays {
        Services {
            order: false,
            stock: false,
            payment: false,
        }
    } else {
        services
    };
    match http::serve(shop, routes, args.listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}: {error}", args.listen);
            ExitCode::FAILURE
        }
    }
}

/// The scenarios, on databases and channels of this run's own.
async fn demo(shop_args: &ShopArgs, keep: bool) -> ExitCode {
    let run = saga::MessageId::new().to_string().replace('-', "");
    let run = format!("ecommerce-{}", &run[run.len() - 12..]);
    let databases = match shop_args.demo_databases(&run) {
        Ok(databases) => databases,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let config = shop_args.config(Role::ServicesAndRelays);
    println!(
        "e-commerce saga demo {run}: {}, one database per service in {databases}, transport {}\n",
        if config.choreography {
            "choreography"
        } else {
            "orchestration"
        },
        shop_args.transport,
    );
    let outcomes = scenarios::run_all(&databases, shop_args.transport, &run, &config, keep).await;
    if keep {
        println!("kept: {databases}, and the broker channels named {run}.*");
    } else if let Err(error) = databases.remove().await {
        eprintln!("warning: {error}");
    }
    let outcomes = match outcomes {
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.keep && cli.command.is_some() {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--keep is for the demo: `serve` and `service` always keep their data",
            )
            .exit();
    }
    // sqlx warns of every statement over 1 s: scenario 8 queues 500 orders
    // on SQLite's one writer on purpose.
    logs::init("warn,sqlx::query=error,ecommerce=info");
    match &cli.command {
        None => demo(&cli.shop, cli.keep).await,
        Some(Command::Serve(args)) => {
            serve(&cli.shop, Services::ALL, Role::ServicesAndRelays, args).await
        }
        Some(Command::Service {
            name,
            no_relay,
            serve: args,
        }) => {
            let role = if *no_relay {
                Role::Services
            } else {
                Role::ServicesAndRelays
            };
            serve(&cli.shop, name.services(), role, args).await
        }
        Some(Command::Relay { name, serve: args }) => {
            serve(&cli.shop, name.services(), Role::Relays, args).await
        }
    }
}
