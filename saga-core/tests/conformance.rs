//! The conformance suites on the in-memory implementations.

use saga_core::memory::{MemoryStore, MemoryTransport};

// Setup is async because real backends connect; these have nothing to wait for.
#[allow(clippy::unused_async)]
async fn store() -> Option<MemoryStore> {
    Some(MemoryStore::new())
}

#[allow(clippy::unused_async)]
async fn transport() -> Option<MemoryTransport> {
    Some(MemoryTransport::default())
}

mod outbox {
    saga_core::outbox_conformance!(super::store);
}

mod idempotency {
    saga_core::idempotency_conformance!(super::store);
}

mod saga_store {
    saga_core::saga_store_conformance!(super::store);
}

mod transport {
    saga_core::transport_conformance!(super::transport, claims: {
        ordered_per_key: true,
        replays_history: true,
        redelivers_unacked: true,
    });
}
