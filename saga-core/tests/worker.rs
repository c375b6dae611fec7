//! The Worker contract on the in-memory store: a dropped handle stops its tasks.

use std::sync::Arc;

use saga_core::memory::{MemoryStore, MemoryTransport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_workers_end_when_dropped() {
    saga_core::testing::worker::engine_workers_end_when_dropped(
        MemoryStore::new(),
        Arc::new(MemoryTransport::default()),
    )
    .await;
}
