//! The `blockrep` binary.
fn main() {}
