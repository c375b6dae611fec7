//! In-memory implementations of every trait: for tests, examples and the
//! embedded default. They keep the same contracts as the real backends
//! (the conformance suites run against them).

mod store;
mod transport;

pub use store::{MemoryStore, MemoryTx};
pub use transport::{Faults, MemoryTransport, MemoryTransportConfig, PublishFault};
