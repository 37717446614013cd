#!/usr/bin/env bash
# Builds blockrep and runs `blockrep demo` (file-backed volumes in a temporary directory; no LVM, no root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh demo
exec cargo run --release --quiet -p blockrep -- demo "$@"
