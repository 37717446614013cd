//! Stub: manifest.
