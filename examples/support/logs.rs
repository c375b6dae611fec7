//! Logs for the examples: `tracing` events on stderr, filtered by `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Installs the log subscriber. Without `RUST_LOG`, `default` filters
/// (for example `warn,ecommerce=info`); `RUST_LOG=saga=debug` shows what the
/// library does.
pub(crate) fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
