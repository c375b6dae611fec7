//! RabbitMQ transport (lapin): durable topology, publisher confirms, manual ack, dead-letter exchange.
//!
//! **Not implemented yet.** This crate holds no code so far; issue #4
//! builds it. Until then, use the in-memory implementations in
//! `saga_core::memory`, which keep the same contracts.
