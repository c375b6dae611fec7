//! A Redis server of a test's own (`redis-server` on the PATH, as
//! `scripts/services redis` installs it) on a free port that the test can
//! SIGKILL and restart: with an append-only file synced on every write
//! (`appendfsync always`), so that what it acknowledged survives, or with
//! nothing on disk. The shared server of the test services cannot be
//! restarted.
//!
//! Used by saga-redis's restart test and the e-commerce process campaign.

use std::process::{Command, Stdio};
use std::time::Duration;

use saga_core::testing::{Process, free_port, unavailable, unique, until_up};

/// The server process; killed when dropped, its directory removed after it.
pub(crate) struct RedisServer {
    port: u16,
    process: Process,
    dir: std::path::PathBuf,
}

/// What the server keeps across a kill.
#[derive(Clone, Copy)]
pub(crate) enum Keeps {
    /// Everything it acknowledged: an append-only file synced on every write.
    Everything,
    /// Nothing, as the shared test server (and a failover to an empty
    /// replica): it comes back empty.
    Nothing,
}

impl RedisServer {
    /// Starts a server and waits until it answers; `None` (after
    /// [`unavailable`]) when `redis-server` is missing.
    pub(crate) async fn start(keeps: Keeps) -> Option<Self> {
        if let Err(error) = Command::new("redis-server").arg("--version").output() {
            return unavailable("redis-server", error);
        }
        let dir = std::env::temp_dir().join(unique("redis-server"));
        std::fs::create_dir_all(&dir).expect("a directory for the server's files");
        let port = free_port();
        let appendonly = match keeps {
            Keeps::Everything => "yes",
            Keeps::Nothing => "no",
        };
        let files = dir.clone();
        let process = Process::new(move || {
            let mut command = Command::new("redis-server");
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", appendonly])
                .args(["--appendfsync", "always"])
                .arg("--dir")
                .arg(&files)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            command
        });
        let mut server = Self { port, process, dir };
        server.restart().await;
        Some(server)
    }

    /// The URL for `REDIS_URL`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILLs the server (nothing happens if it is not running).
    /// The process campaign keeps it down for a while this way; the crate's
    /// own restart test kills it through [`restart`](Self::restart).
    #[allow(dead_code)]
    pub(crate) fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server (again) on its port and files, and waits until it
    /// answers PING with PONG: while it loads its file it accepts
    /// connections but answers LOADING.
    pub(crate) async fn restart(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.process.start();
        let port = self.port;
        until_up(
            &format!("redis-server on port {port}"),
            Duration::from_secs(10),
            || async move {
                let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                else {
                    return false;
                };
                let mut answer = [0; 7];
                stream.write_all(b"PING\r\n").await.is_ok()
                    && stream.read_exact(&mut answer).await.is_ok()
                    && &answer == b"+PONG\r\n"
            },
        )
        .await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
