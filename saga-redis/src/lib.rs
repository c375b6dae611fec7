//! Redis Streams transport (XADD, consumer groups, XAUTOCLAIM) and a Redis idempotency store.
//!
//! **Not implemented yet.** This crate holds no code so far; issue #4
//! builds it. Until then, use the in-memory implementations in
//! `saga_core::memory`, which keep the same contracts.
