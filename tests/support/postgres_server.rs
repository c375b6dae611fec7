//! A PostgreSQL server of a test's own, which the test can crash and start
//! again on its data directory: a cluster made with the postgresql-common
//! tools (`pg_createcluster`, `pg_ctlcluster`) that `scripts/services`
//! installs PostgreSQL with, on a free port, trusting local connections.
//! The shared server stays up for every other test.

use std::process::{Command, Stdio};

use saga_core::testing::{free_port, unique};

/// A running cluster; dropped with its data when the test passed, stopped
/// with its data kept for inspection when it failed.
pub(crate) struct PostgresServer {
    version: String,
    name: String,
    port: u16,
}

impl PostgresServer {
    /// Creates and starts a cluster of the installed version, or says why
    /// it cannot.
    pub(crate) fn start() -> Result<Self, String> {
        let clusters = output("pg_lsclusters", &["-h"])?;
        let version = clusters
            .split_whitespace()
            .next()
            .ok_or("pg_lsclusters lists no cluster to take the version from")?
            .to_owned();
        let server = Self {
            version,
            name: unique("campaign").replace('-', "_"),
            port: free_port(),
        };
        let port = server.port.to_string();
        output(
            "pg_createcluster",
            &[
                &server.version,
                &server.name,
                "-p",
                &port,
                "--",
                "--auth=trust",
            ],
        )?;
        server.ctl(&["start"])?;
        Ok(server)
    }

    /// `postgres://postgres@127.0.0.1:<port>`, without a database.
    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Stops the server as a crash does (`immediate`: no shutdown
    /// checkpoint, every connection cut; the next start recovers from the
    /// write-ahead log).
    pub(crate) fn crash(&self) {
        self.ctl(&["stop", "-m", "immediate"])
            .unwrap_or_else(|e| panic!("crashing {}: {e}", self.name));
    }

    /// Starts the server again on its data; returns once it accepts connections.
    pub(crate) fn start_again(&self) {
        self.ctl(&["start"])
            .unwrap_or_else(|e| panic!("starting {} again: {e}", self.name));
    }

    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["--skip-systemctl-redirect", &self.version, &self.name];
        all.extend_from_slice(args);
        output("pg_ctlcluster", &all)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let stopped = self
                .ctl(&["stop"])
                .map_or_else(|e| format!(" (stopping it failed: {e})"), |_| String::new());
            eprintln!(
                "the PostgreSQL cluster {version} {name} is stopped{stopped} with its data kept for \
                 inspection: `pg_ctlcluster {version} {name} start` serves it on port {port}; \
                 `pg_dropcluster {version} {name} --stop` drops it",
                version = self.version,
                name = self.name,
                port = self.port,
            );
            return;
        }
        if let Err(error) = output("pg_dropcluster", &[&self.version, &self.name, "--stop"]) {
            eprintln!("dropping the PostgreSQL cluster {}: {error}", self.name);
        }
    }
}

/// Runs `program` and returns its standard output, or what went wrong.
fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e} (PostgreSQL's postgresql-common tools)"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
