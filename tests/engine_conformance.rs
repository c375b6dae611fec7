//! The engine suite of saga-core on the in-memory store (the SQL stores run
//! it in saga-sqlx).

use std::sync::Arc;
use std::time::Duration;

use saga::memory::MemoryStore;
use saga::outbox::{Relay, RelayConfig};
use saga::{Transport, Worker};

// Setup is async because real backends connect; this one has nothing to wait for.
#[allow(clippy::unused_async)]
async fn store() -> Option<MemoryStore> {
    Some(MemoryStore::new())
}

fn relay(store: MemoryStore, transport: Arc<dyn Transport>) -> Worker {
    Relay::new(
        store,
        transport,
        RelayConfig::default()
            .poll_interval(Duration::from_millis(20))
            .lease(Duration::from_secs(2)),
    )
    .spawn()
}

saga_core::engine_conformance!(store, relay);
