#!/usr/bin/env bash
# Installs the Debian packages blockrep's build, demo and tests need, when missing. Safe to run repeatedly.
# Usage: scripts/deps.sh [demo|test]
set -euo pipefail
want=(gcc pkg-config)
if [ "${1:-test}" = test ]; then
  # user-mode-linux + lvm2 + kmod: real LVM in a UML guest; iproute2/arping/ping/keepalived: namespace tests;
  # grub-common: grub-editenv round trip; rsync/socat/b3sum/time: benchmark peers; e2fsprogs: ext4 in scenarios;
  # patchelf: scripts/uml-kernel.sh, when the packaged UML kernel cannot boot on this CPU;
  # thin-provisioning-tools: thin_delta for tracked thin LVs (and thin_restore for its parser's fixture);
  # xfsprogs: an XFS loop filesystem with reflinks for retained generations of file shadows.
  want+=(user-mode-linux lvm2 kmod iproute2 iputils-arping iputils-ping keepalived grub-common rsync socat b3sum
         e2fsprogs nftables time patchelf thin-provisioning-tools xfsprogs)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "${1:-test}" = test ]; then
  "$(dirname "$0")/uml-kernel.sh"
fi
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || {
  echo "cargo not found: install a Rust toolchain (rustup, Rust >= 1.85) and run this again" >&2; exit 2; }
