//! Stub: durable.
