//! Integration tests: one test binary that drives the real `blockrep` executable.

mod integration;
