//! Kafka transport (rdkafka): idempotent producer with acks=all, ordering key as message key, manual commit after the handler succeeded.
//!
//! **Not implemented yet.** This crate holds no code so far; issue #4
//! builds it. Until then, use the in-memory implementations in
//! `saga_core::memory`, which keep the same contracts.
