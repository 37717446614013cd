#!/usr/bin/env bash
# The end-to-end benchmark (issue 6): builds blockrep in release and runs the comparison harness.
#   scripts/bench.sh                      # 2 GiB random image, all tools, 3 repetitions -> target/bench/
#   scripts/bench.sh --quick              # tiny smoke run
#   scripts/bench.sh --size 512M --pattern scattered4k,clustered1m --content mixed
#   scripts/bench.sh --link 1gbit         # across two namespaces on a rate-limited veth (root)
#   scripts/bench.sh --uml                # the measurements that need LVM, in User-Mode Linux: tracked syncs
#                                         # against the full scan (issue 15) and keep_generations = 2 against 1
# Options: scripts/bench.sh --help. Results: target/bench/{report.md,summary.csv,samples.csv,incremental.png}.
# Peers: rsync, socat, b3sum (Debian packages); the plot needs python3 with matplotlib (pip install matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--uml" ]; then
  # Ratios printed by the tests themselves (only ratios mean anything in the guest); needs scripts/deps.sh.
  exec cargo test -p blockrep --test integration -- --ignored --nocapture --test-threads=1 \
    tracked_thin_against keep2_thin
fi
target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release -p blockrep
exec cargo run --release -p blockrep-benches --bin e2e -- --blockrep "$target_dir/release/blockrep" "$@"
