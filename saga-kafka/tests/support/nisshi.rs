//! A Kafka-compatible broker of a test's own (nisshi, `NISSHI_BIN`, built by
//! `scripts/services kafka`) on a free port, storing in a fresh PostgreSQL
//! database (`NISSHI_STORAGE_URL`, default postgres://postgres@127.0.0.1:5432),
//! so that what it confirmed survives a SIGKILL. The shared broker of the
//! test services keeps its data in memory and cannot be restarted.
//!
//! Used by saga-kafka's restart test and the e-commerce process campaign.

use std::process::{Command, Stdio};
use std::time::Duration;

use saga_core::testing::{Process, free_port, unavailable, unique, until_up};

/// The broker process; killed when dropped, its database dropped after it.
pub(crate) struct Nisshi {
    port: u16,
    process: Process,
    /// Held for its `Drop`, which runs after the process's.
    _storage: Storage,
}

/// A database of the broker's own.
struct Storage {
    server: String,
    database: String,
}

impl Storage {
    /// Creates a fresh database, or says why it cannot.
    fn create() -> Result<Self, String> {
        let server = std::env::var("NISSHI_STORAGE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let storage = Self {
            server,
            database: unique("nisshi").replace('-', "_"),
        };
        storage.psql(&format!("CREATE DATABASE {}", storage.database))?;
        Ok(storage)
    }

    fn psql(&self, sql: &str) -> Result<(), String> {
        let output = Command::new("psql")
            .arg(format!("{}/postgres", self.server))
            .args(["-qXc", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    fn url(&self) -> String {
        // Our PostgreSQL's certificate is self-signed: the broker would refuse it.
        format!("{}/{}?sslmode=disable", self.server, self.database)
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "the broker's storage, database {} at {}, stays for inspection",
                self.database, self.server
            );
            return;
        }
        let _ = self.psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.database
        ));
    }
}

impl Nisshi {
    /// Starts a broker and waits until it listens; `None` (after
    /// [`unavailable`]) when the binary or PostgreSQL is missing.
    pub(crate) async fn start() -> Option<Self> {
        let bin = std::env::var("NISSHI_BIN")
            .ok()
            .filter(|b| std::path::Path::new(b).exists())
            .or_else(|| unavailable("the nisshi broker binary (NISSHI_BIN)", "not found"))?;
        let storage = Storage::create().map_or_else(
            |e| unavailable("PostgreSQL for the broker's storage", e),
            Some,
        )?;
        let port = free_port();
        let (listener, storage_url) = (format!("tcp://127.0.0.1:{port}"), storage.url());
        let process = Process::new(move || {
            let mut command = Command::new(&bin);
            command
                .args(["broker", "--listener-url", &listener])
                .args(["--advertised-listener-url", &listener])
                .args(["--storage-engine", &storage_url])
                .args(["--group-initial-rebalance-delay", "0s"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            command
        });
        let mut broker = Self {
            port,
            process,
            _storage: storage,
        };
        broker.restart().await;
        Some(broker)
    }

    /// `host:port` for `KAFKA_BROKERS`.
    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the broker (nothing happens if it is not running).
    /// The process campaign keeps it down for a while this way; the crate's
    /// own restart test kills it through [`restart`](Self::restart).
    #[allow(dead_code)]
    pub(crate) fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the broker (again) on its port and storage, and waits until
    /// it listens.
    pub(crate) async fn restart(&mut self) {
        self.process.start();
        let port = self.port;
        until_up(
            &format!("nisshi on port {port}"),
            Duration::from_secs(10),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }
}
