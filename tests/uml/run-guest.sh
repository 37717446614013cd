#!/usr/bin/env bash
# Boots a User-Mode Linux guest (recipe: /work/shared/uml/README.md) with disk images and runs a scenario script
# inside it, then exits with the scenario's exit code.
#
# Usage: tests/uml/run-guest.sh --dir DIR --scenario FILE [--disk NAME:SIZE]... [--timeout SECS] [--mem SIZE]
#                               [--umid ID] [--env NAME=VALUE]... [--append KERNEL_ARG]... [--netns NS]
#
#   --dir DIR        work directory (created if missing): init.sh, the module tree, the disk images, console.log,
#                    guest.pid. The guest's root is the host's / (hostfs), so the scenario can run binaries
#                    built on the host by their host paths and leave result files in DIR.
#   --disk NAME:SIZE disk image DIR/NAME.img, created sparse with SIZE (truncate syntax: 64M) when missing and
#                    kept as it is when present (to boot again on the same disks after a kill). The first --disk
#                    is /dev/ubda in the guest, the second /dev/ubdb, ...
#   --scenario FILE  /bin/sh script sourced in a subshell by the guest's init (PID 1) after it mounted /proc, /sys,
#                    /dev, tmpfs on /run and /etc/lvm, wrote an lvm.conf for a guest without udev, loaded
#                    dm-snapshot, brought up lo and sourced tests/uml/lib.sh (helpers: fail, check, result,
#                    make_vg, make_lv, hash_dev, tree_hash, make_ext4_with_files, start_writer, stop_writer,
#                    net_up, wait_ping). Its exit status (or that of its last command) is the result. It sees
#                    UML_DIR=DIR, UML_MODS (for modprobe -d), the --env variables,
#                    PATH=/usr/sbin:/usr/bin:/sbin:/bin and LVM_SUPPRESS_FD_WARNINGS=1. `result KEY VALUE`
#                    appends KEY=VALUE to DIR/results.
#   --timeout SECS   kill the guest after SECS seconds (default 120).
#   --mem SIZE       guest memory (default 256M).
#   --umid ID        UML instance id (default: derived from DIR); every concurrently running guest needs its own.
#   --env NAME=VALUE exported to the scenario (repeatable).
#   --append ARG     extra kernel command line argument, e.g. vec0:transport=tap,ifname=tap0,gro=1 (repeatable).
#   --netns NS       start the guest inside network namespace NS (ip netns exec), where the test made its taps.
#
# The guest's console (kernel messages and the scenario's stdout/stderr) goes to DIR/console.log; init prints
# SCENARIO_RC=<n> there when the scenario ends. DIR/guest.pid holds the pid of linux.uml, which leads its own
# process group: `kill -KILL -- -$(cat DIR/guest.pid)` simulates a power cut (the images keep what was written).
#
# Exit status: the scenario's status (0-123); 124 the guest was killed at the timeout; 125 the guest ended
# without printing SCENARIO_RC (kernel panic, init failure, killed from outside); 126 linux.uml or the UML
# modules are missing (install the Debian package user-mode-linux: scripts/deps.sh, which also runs
# scripts/uml-kernel.sh); 2 usage error.
set -euo pipefail

die() { echo "run-guest.sh: $*" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd -P)

dir="" scenario="" timeout=120 mem=256M umid="" netns=""
disks=() envs=() appends=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=${2:?}; shift 2 ;;
    --scenario) scenario=${2:?}; shift 2 ;;
    --disk) disks+=("${2:?}"); shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --mem) mem=${2:?}; shift 2 ;;
    --umid) umid=${2:?}; shift 2 ;;
    --env) envs+=("${2:?}"); shift 2 ;;
    --append) appends+=("${2:?}"); shift 2 ;;
    --netns) netns=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1'; see --help" ;;
  esac
done
[ -n "$dir" ] || die "--dir is required"
[ -n "$scenario" ] || die "--scenario is required"
[ -f "$scenario" ] || die "scenario file '$scenario' does not exist"
[[ "$timeout" =~ ^[0-9]+$ ]] && [ "$timeout" -gt 0 ] || die "--timeout must be a positive number of seconds, not '$timeout'"

# The kernel scripts/uml-kernel.sh installed when the packaged one cannot boot on this CPU, else the package's.
if [ -x /opt/blockrep-uml/linux.uml ]; then
  uml=/opt/blockrep-uml/linux.uml modroot=/opt/blockrep-uml/modules
else
  uml=/usr/bin/linux.uml modroot=/usr/lib/uml/modules
fi
if [ ! -x "$uml" ]; then
  echo "run-guest.sh: $uml not found; install the Debian package user-mode-linux (scripts/deps.sh does)" >&2
  exit 126
fi
ver=$(ls "$modroot" 2>/dev/null | head -n1 || true)
if [ -z "$ver" ]; then
  echo "run-guest.sh: no UML kernel modules under $modroot; reinstall the Debian package user-mode-linux" >&2
  exit 126
fi

mkdir -p "$dir"
dir=$(cd "$dir" && pwd -P)
scenario=$(cd "$(dirname "$scenario")" && pwd -P)/$(basename "$scenario")
[ -n "$umid" ] || umid="br-$(printf '%s' "$dir" | cksum | cut -d' ' -f1)"
# hostfs paths and the kernel command line cannot take blanks; keep them simple.
case "$dir$scenario" in *[[:space:]]*|*\'*|*\"*) die "paths with blanks or quotes are not supported: $dir, $scenario" ;; esac

# Module tree for modprobe -d (dm-snapshot, dm-thin-pool, dm-flakey, netem, ... all live there).
mkdir -p "$dir/mods/lib/modules"
ln -sfn "$modroot/$ver" "$dir/mods/lib/modules/$ver"

ubd_args=() i=0
letters=abcdefghijklmnop
for d in "${disks[@]}"; do
  name=${d%%:*} size=${d#*:}
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] && [ "$name" != "$d" ] || die "--disk wants NAME:SIZE (e.g. disk0:64M), not '$d'"
  [ $i -lt ${#letters} ] || die "at most ${#letters} disks"
  img="$dir/$name.img"
  [ -e "$img" ] || truncate -s "$size" "$img"
  ubd_args+=("ubd$i=$img")
  i=$((i + 1))
done

{
  echo '#!/bin/sh'
  echo '# Written by tests/uml/run-guest.sh: init (PID 1) of the User-Mode Linux guest.'
  echo 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin LVM_SUPPRESS_FD_WARNINGS=1'
  echo "export UML_DIR='$dir'"
  for e in "${envs[@]}"; do
    [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants NAME=VALUE, not '$e'"
    v=${e#*=}
    printf "export %s='%s'\n" "${e%%=*}" "${v//\'/\'\\\'\'}"
  done
  cat <<'INIT'
mount -t proc proc /proc
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mount -t tmpfs tmp /run
mount -t tmpfs tmp /etc/lvm   # lvm2 writes archives and backups here: keep them off the host
ip link set lo up 2>/dev/null  # for servers on 127.0.0.1 inside the guest
printf 'activation {\n udev_sync = 0\n udev_rules = 0\n monitoring = 0\n}\ndevices {\n obtain_device_list_from_udev = 0\n}\n' > /etc/lvm/lvm.conf
INIT
  echo "modprobe -d '$dir/mods' dm-snapshot || echo 'init: modprobe dm-snapshot failed'"
  echo "export UML_MODS='$dir/mods'   # modprobe -d \$UML_MODS dm-flakey, netem, ..."
  echo "( set +e; . '$here/lib.sh'; . '$scenario' )"
  cat <<'INIT'
rc=$?
sync
echo "SCENARIO_RC=$rc"
poweroff -f
INIT
} > "$dir/init.sh"
chmod +x "$dir/init.sh"

wrap=()
if [ -n "$netns" ]; then
  ip=$(command -v ip) || die "--netns needs the ip tool (Debian package iproute2)"
  wrap=("$ip" netns exec "$netns")
fi

rm -f "$dir/console.log" "$dir/guest.pid" "$dir/results"
# setsid: linux.uml leads its own process group, so one kill reaches all its helper processes.
"${wrap[@]}" setsid "$uml" mem="$mem" umid="$umid" uml_dir="$dir" quiet root=/dev/root rootfstype=hostfs rootflags=/ rw \
  "${ubd_args[@]}" "${appends[@]}" init="$dir/init.sh" con0=null,fd:1 con=null \
  </dev/null >"$dir/console.log" 2>&1 &
pid=$!
echo "$pid" > "$dir/guest.pid"

killed=0
deadline=$(( $(date +%s) + timeout ))
while kill -0 "$pid" 2>/dev/null; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    killed=1
    break
  fi
  sleep 0.1
done
wait "$pid" 2>/dev/null || true
# UML's helper processes may outlive the main one for a moment: make sure none is left.
kill -KILL -- "-$pid" 2>/dev/null || true

if [ $killed = 1 ]; then
  echo "run-guest.sh: guest $umid killed after the ${timeout}s timeout; console: $dir/console.log" >&2
  exit 124
fi
rc=$(sed -n 's/^SCENARIO_RC=\([0-9][0-9]*\)\r\{0,1\}$/\1/p' "$dir/console.log" | tail -n1)
if [ -z "$rc" ]; then
  echo "run-guest.sh: guest $umid ended without SCENARIO_RC (crashed or killed); console: $dir/console.log" >&2
  exit 125
fi
[ "$rc" -le 123 ] || rc=123
exit "$rc"
