//! The e-commerce example as a program: its command line, its logs, and the
//! demo leaving nothing of its own behind.

#[path = "support/example.rs"]
mod example;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use example::example_binary;
use saga_core::testing::free_port;

fn run(args: &[&str]) -> Output {
    Command::new(example_binary())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the example binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_is_shown_and_bad_arguments_are_refused() {
    let help = run(&["--help"]);
    let stdout = text(&help.stdout);
    assert_eq!(help.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("Usage: ecommerce"), "{stdout}");
    for listed in [
        "serve",
        "service",
        "--transport",
        "--database-url",
        "--keep",
    ] {
        assert!(stdout.contains(listed), "--help lists {listed}: {stdout}");
    }
    assert!(
        !stdout.contains("scenarios as expected"),
        "--help runs nothing"
    );

    for (args, named) in [
        (&["--bogus"][..], "--bogus"),
        (&["service", "nowhere"][..], "nowhere"),
        (&["--transport", "pigeon"][..], "pigeon"),
        (
            &["serve", "--listen", "not-an-address"][..],
            "not-an-address",
        ),
        (&["--keep", "serve"][..], "--keep"),
    ] {
        let refused = run(args);
        let stderr = text(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(named),
            "{args:?}: the error names {named}: {stderr}"
        );
    }
}

/// `RUST_LOG` decides what the services log on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_filters_the_logs() {
    let dir = std::env::temp_dir().join(saga_core::testing::unique("saga-ecommerce-logs"));
    let mut seen = Vec::new();
    for filter in ["info", "error"] {
        let port = free_port();
        let child = Command::new(example_binary())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", &format!("sqlite://{}", dir.display())])
            .env("RUST_LOG", filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the example binary starts");
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "serve did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // SIGTERM: the services stop cleanly and the process exits.
        Command::new("kill")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let output = child.wait_with_output().unwrap();
        seen.push((filter, port, text(&output.stderr)));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (_, port, info) = &seen[0];
    assert!(
        info.contains("INFO") && info.contains(&format!("listening on http://127.0.0.1:{port}")),
        "RUST_LOG=info logs the start: {info}"
    );
    let (_, _, error) = &seen[1];
    assert!(
        !error.contains("INFO"),
        "RUST_LOG=error logs no INFO: {error}"
    );
}

/// The demo's first line names its run and where its databases live.
fn run_and_place(stdout: &str) -> (String, String) {
    let line = stdout.lines().next().unwrap_or_default();
    let run = line
        .strip_prefix("e-commerce saga demo ")
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("the demo names its run: {line}"));
    let place = line
        .split_once("one database per service in ")
        .and_then(|(_, rest)| rest.split(", transport").next())
        .unwrap_or_else(|| panic!("the demo names its databases: {line}"));
    (run.to_owned(), place.to_owned())
}

/// The SQLite directory the demo names on its first line.
fn demo_dir(stdout: &str) -> std::path::PathBuf {
    let (_, place) = run_and_place(stdout);
    place
        .strip_prefix("SQLite files in ")
        .unwrap_or_else(|| panic!("SQLite by default: {place}"))
        .into()
}

/// The demo on SQLite deletes its files when it ends, unless `--keep`.
#[test]
fn the_demo_removes_its_files_unless_kept() {
    let demo = run(&[]);
    let stdout = text(&demo.stdout);
    assert_eq!(
        demo.status.code(),
        Some(0),
        "{stdout}{}",
        text(&demo.stderr)
    );
    let dir = demo_dir(&stdout);
    assert!(!dir.exists(), "{} is left behind", dir.display());

    let kept = run(&["--keep"]);
    let stdout = text(&kept.stdout);
    assert_eq!(
        kept.status.code(),
        Some(0),
        "{stdout}{}",
        text(&kept.stderr)
    );
    let dir = demo_dir(&stdout);
    let files = std::fs::read_dir(&dir).map(Iterator::count);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        files.is_ok_and(|n| n > 0),
        "--keep keeps {}: {stdout}",
        dir.display()
    );
}

/// A demo stopped with Ctrl-C still deletes its files.
#[test]
fn an_interrupted_demo_removes_its_files() {
    use std::io::BufRead;
    let mut demo = Command::new(example_binary())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example binary starts");
    let mut first = String::new();
    std::io::BufReader::new(demo.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let dir = demo_dir(&first);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.exists() {
        assert!(Instant::now() < deadline, "the demo made no files");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .unwrap();
    let output = demo.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

/// The demo on PostgreSQL and Redis drops its databases and deletes its
/// streams when it ends.
#[cfg(all(feature = "postgres", feature = "redis"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_removes_its_databases_and_streams() {
    use saga::sql::sqlx;
    let server = std::env::var("ECOMMERCE_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let admin = match sqlx::PgPool::connect(&format!("{server}/postgres")).await {
        Ok(admin) => admin,
        Err(error) => return saga_core::testing::unavailable("PostgreSQL", error).unwrap_or(()),
    };
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut redis = match redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
    {
        Ok(redis) => redis,
        Err(error) => return saga_core::testing::unavailable("Redis", error).unwrap_or(()),
    };
    let demo = tokio::task::spawn_blocking(move || {
        Command::new(example_binary())
            .args(["--database-url", &server, "--transport", "redis"])
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = text(&demo.stdout);
    assert_eq!(
        demo.status.code(),
        Some(0),
        "{stdout}{}",
        text(&demo.stderr)
    );
    let (run, _) = run_and_place(&stdout);
    let databases: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE left(datname, length($1)) = $1")
            .bind(run.replace('-', "_"))
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(databases, 0, "the databases of {run} are left behind");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{run}.*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        keys.is_empty(),
        "streams of {run} are left behind: {keys:?}"
    );
}
