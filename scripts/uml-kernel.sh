#!/usr/bin/env bash
# Makes sure a User-Mode Linux kernel that boots on THIS machine's CPU is installed for the UML tests.
#
# Debian 12's user-mode-linux (6.1) cannot start a guest's init on CPUs whose XSAVE area is larger than the
# one UML 6.1 was written for (AVX-512 / AMX, e.g. recent Intel Xeon): the guest panics with
# "userspace - ptrace set fp regs failed, errno = 14" (the host kernel wants the whole XSAVE buffer in
# PTRACE_SETREGSET and UML 6.1 passes a fixed, smaller one; Debian 13's 6.12 fails the same way). Newer UML
# sizes the buffer from the host. So: boot the packaged kernel once with a trivial init; when that fails, fetch
# Debian unstable's user-mode-linux and libc6 (it needs glibc >= 2.38, Debian 12 has 2.36) as .debs with
# apt-get download (signature-checked like any apt download, system apt state untouched), unpack them under
# /opt/blockrep-uml and point the kernel's ELF interpreter at that libc (patchelf). tests/uml/run-guest.sh and
# tests/uml/harness.rs use /opt/blockrep-uml/linux.uml when it exists, else /usr/bin/linux.uml.
#
# Usage: scripts/uml-kernel.sh [--force]   (--force: install the newer kernel even if the packaged one boots)
# Exit status: 0 a working kernel is installed; 1 none could be made to work (the message says why).
set -euo pipefail

opt=/opt/blockrep-uml
mirror=${BLOCKREP_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then  # the mirror this machine's apt already uses
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
fi
force=0
[ "${1:-}" = --force ] && force=1

# probe KERNEL: boots KERNEL with an init that prints a marker and powers off; 0 when the marker came back.
probe() {
  local kernel=$1 d
  d=$(mktemp -d /tmp/blockrep-uml-probe.XXXXXX)
  printf '#!/bin/sh\necho BLOCKREP-UML-PROBE-OK\nexec /sbin/poweroff -f\n' > "$d/init.sh"
  chmod +x "$d/init.sh"
  timeout 60 setsid "$kernel" mem=64M umid="probe$$" uml_dir="$d" quiet root=/dev/root rootfstype=hostfs \
    rootflags=/ rw init="$d/init.sh" con0=null,fd:1 con=null </dev/null >"$d/console.log" 2>&1 || true
  if grep -q BLOCKREP-UML-PROBE-OK "$d/console.log"; then
    rm -rf "$d"
    return 0
  fi
  echo "uml-kernel.sh: $kernel did not boot on this CPU; its last words:" >&2
  { grep -v '^ \[<' "$d/console.log" | grep -E 'failed|panic|error' || tail -n 3 "$d/console.log"; } | tail -n 3 | sed 's/^/  /' >&2
  rm -rf "$d"
  return 1
}

# fetch SUITE PACKAGE...: downloads the packages' .debs from SUITE into the current directory with apt-get, so
# they are verified against the archive's signed Release file like any apt download, without touching the
# system's apt configuration or lists.
fetch() {
  local suite=$1 w
  shift
  w=$PWD/apt
  mkdir -p "$w/lists/partial" "$w/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" > "$w/sources.list"
  local o=(-o "Dir::Etc::SourceList=$w/sources.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$w/lists"
           -o "Dir::Cache=$w/cache" -o APT::Sandbox::User=root)
  apt-get "${o[@]}" update -qq
  apt-get "${o[@]}" download -qq "$@"
  rm -rf "$w"
}

if [ $force = 0 ]; then
  if [ -x $opt/linux.uml ] && probe $opt/linux.uml; then exit 0; fi
  if [ -x /usr/bin/linux.uml ] && probe /usr/bin/linux.uml; then exit 0; fi
fi

echo "uml-kernel.sh: installing Debian unstable's user-mode-linux under $opt" >&2
for tool in apt-get patchelf dpkg-deb; do
  command -v $tool >/dev/null || { echo "uml-kernel.sh: $tool is missing (scripts/deps.sh installs it)" >&2; exit 1; }
done
work=$(mktemp -d /tmp/blockrep-uml-fetch.XXXXXX)
trap 'rm -rf "$work"' EXIT
(cd "$work" && fetch unstable user-mode-linux libc6)
dpkg-deb -x "$work"/user-mode-linux_*.deb "$work/uml"
dpkg-deb -x "$work"/libc6_*.deb "$work/libc"
new=$opt.new
rm -rf "$new"
mkdir -p "$new"
cp -a "$work/libc/usr/lib/x86_64-linux-gnu" "$new/libc"
cp -a "$work/uml/usr/lib/uml/modules" "$new/modules"
cp "$work/uml/usr/bin/linux.uml" "$new/linux.uml"
# The final paths are baked in: the kernel is moved to $opt below before it is first run.
patchelf --set-interpreter $opt/libc/ld-linux-x86-64.so.2 --set-rpath $opt/libc "$new/linux.uml"
rm -rf $opt.old
[ -e $opt ] && mv $opt $opt.old
mv "$new" $opt
rm -rf $opt.old
if ! probe $opt/linux.uml; then
  echo "uml-kernel.sh: the newer kernel does not boot either; UML tests cannot run on this machine" >&2
  exit 1
fi
echo "uml-kernel.sh: $opt/linux.uml ($(ls $opt/modules)) boots on this CPU" >&2
