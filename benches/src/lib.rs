//! Benchmarks for blockrep: criterion micro-benchmarks live in `benches/benches/`,
//! the end-to-end comparison harness in `src/bin/`.

pub mod e2e;
