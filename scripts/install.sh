#!/usr/bin/env bash
# Bare-metal install: builds blockrep, installs the binary, the systemd units, an example configuration.
# Usage: scripts/install.sh [PREFIX]   (default /usr/local; run as root)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-/usr/local}
scripts/deps.sh demo
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lvm2 iproute2 >/dev/null
cargo build --release -p blockrep
install -m 0755 target/release/blockrep "$prefix/bin/blockrep"
install -d -m 0700 /etc/blockrep /var/lib/blockrep
[ -f /etc/blockrep/blockrep.toml ] || install -m 0600 docs/blockrep.example.toml /etc/blockrep/blockrep.toml
[ -f /etc/blockrep/key ] || "$prefix/bin/blockrep" keygen /etc/blockrep/key
install -m 0644 contrib/systemd/blockrep-serve.service contrib/systemd/blockrep-sync.service \
  contrib/systemd/blockrep-sync.timer /etc/systemd/system/
command -v systemctl >/dev/null && systemctl daemon-reload || true
cat <<MSG
installed $prefix/bin/blockrep
next: edit /etc/blockrep/blockrep.toml, copy /etc/blockrep/key to the other node, then
  standby: blockrep shadow create && systemctl enable --now blockrep-serve.service
  primary: systemctl enable --now blockrep-sync.timer
MSG
