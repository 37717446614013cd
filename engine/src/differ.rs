//! Stub: differ.
