//! The Kafka-compatible broker SIGKILLed and restarted under a running
//! publisher and consumer.
//!
//! The test starts a broker of its own (nisshi, `NISSHI_BIN`, built by
//! `scripts/services kafka`) on a free port, storing in a fresh PostgreSQL
//! database (`NISSHI_STORAGE_URL`, default postgres://postgres@127.0.0.1:5432),
//! so that what the broker confirmed survives the kill.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use saga_core::testing::{free_port, transport, unavailable, unique};
use saga_kafka::{KafkaConfig, KafkaTransport};

struct Broker {
    bin: String,
    port: u16,
    storage: Storage,
    child: Option<Child>,
}

/// A database of the test's own; dropped with it.
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
        let _ = self.psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.database
        ));
    }
}

impl Broker {
    fn spawn(&mut self) {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", &self.storage.url()])
            .args(["--group-initial-rebalance-delay", "0s"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nisshi starts");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn until_up(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nisshi on port {port} did not come up");
}

/// SIGKILL and restart mid-stream: nothing confirmed is lost; producer and
/// consumer go on by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_loses_no_confirmed_message() {
    let Some(bin) = std::env::var("NISSHI_BIN")
        .ok()
        .filter(|b| std::path::Path::new(b).exists())
        .or_else(|| unavailable("the nisshi broker binary (NISSHI_BIN)", "not found"))
    else {
        return;
    };
    let Some(storage) = Storage::create().map_or_else(
        |e| unavailable("PostgreSQL for the broker's storage", e),
        Some,
    ) else {
        return;
    };
    let broker = std::sync::Mutex::new(Broker {
        bin,
        port: free_port(),
        storage,
        child: None,
    });
    let port = broker.lock().unwrap().port;
    broker.lock().unwrap().spawn();
    until_up(port).await;
    let config = KafkaConfig::default()
        .brokers(format!("127.0.0.1:{port}"))
        .prefix(format!("{}.", unique("restart")))
        .partitions(2);
    let subject = KafkaTransport::connect(config).await.unwrap();
    transport::messages_survive_a_broker_restart(subject, || async {
        {
            let mut broker = broker.lock().unwrap();
            broker.kill();
            broker.spawn();
        }
        until_up(port).await;
    })
    .await;
}
