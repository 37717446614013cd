#!/usr/bin/env bash
# The full test suite: formatting, lints, unit/property/integration tests, UML (real LVM) and namespace scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test
start=$(date +%s)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast
echo "test suite finished in $(( $(date +%s) - start )) s"
