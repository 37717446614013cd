//! Stub: spool.
