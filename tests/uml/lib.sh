# Helpers for guest scenarios (POSIX sh). run-guest.sh's init sources this file before the scenario, so a
# scenario can call these directly. Everything the guest writes outside tmpfs lands on the host: keep files under
# $UML_DIR and run mkfs/pvcreate only on /dev/ubd* and LVs.

# fail MESSAGE...: print a marker line and end the scenario with status 1.
fail() {
  echo "SCENARIO_FAIL: $*"
  exit 1
}

# check CMD...: run CMD; fail (naming it) when it fails.
check() {
  "$@" || fail "command failed (status $?): $*"
}

# result KEY VALUE: record a result for the host test (GuestResult::result(KEY) on the Rust side).
result() {
  printf '%s=%s\n' "$1" "$2" >> "$UML_DIR/results"
}

# state_fs: blockrep's state directory /mnt/brstate on an ext4 file system of /dev/ubdc (made on the first boot of
# the guest's disks, mounted on every boot), and the key $UML_DIR/key (made once). Needs $BR.
state_fs() {
  mkdir -p /mnt/brstate
  if ! mountpoint -q /mnt/brstate; then
    blkid /dev/ubdc >/dev/null 2>&1 || check mkfs.ext4 -q -F /dev/ubdc
    check mount -t ext4 /dev/ubdc /mnt/brstate
  fi
  [ -f "$UML_DIR/key" ] || check "$BR" keygen "$UML_DIR/key"
}

# serve_bg LOG ARGS...: `$BR ARGS serve` in the background (its pid in SERVE), appending to LOG (BLOCKREP_LOG
# defaults to info); returns once it serves, fails after 10 s.
serve_bg() {
  _log=$1
  shift
  BLOCKREP_LOG=${BLOCKREP_LOG:-info} "$BR" "$@" serve >> "$_log" 2>&1 &
  SERVE=$!
  for _i in $(seq 1 50); do
    grep -q serving "$_log" 2>/dev/null && return 0
    sleep 0.2
  done
  fail "serve did not start: $(tail -5 "$_log")"
}

# seed_same MIB DEVICE...: the same MIB MiB of random data on each DEVICE (written through, O_DIRECT).
seed_same() {
  _mib=$1
  shift
  check dd if=/dev/urandom of="$UML_DIR/seed" bs=1M count="$_mib" status=none
  for _d in "$@"; do
    check dd if="$UML_DIR/seed" of="$_d" bs=1M oflag=direct status=none
  done
  rm "$UML_DIR/seed"
}

# make_vg VG DEVICE...: a volume group on whole ubd disks.
make_vg() {
  _vg=$1
  shift
  for _d in "$@"; do
    case "$_d" in /dev/ubd*) ;; *) fail "make_vg: refusing to pvcreate $_d (only /dev/ubd* in the guest)" ;; esac
    check pvcreate -q "$_d"
  done
  check vgcreate -q "$_vg" "$@"
}

# make_lv VG NAME SIZE [TAG...]: a plain LV (SIZE in lvcreate syntax, e.g. 48M).
make_lv() {
  _vg=$1 _lv=$2 _size=$3
  shift 3
  _tags=""
  for _t in "$@"; do _tags="$_tags --addtag $_t"; done
  # shellcheck disable=SC2086
  check lvcreate -q --yes -L "$_size" -n "$_lv" $_tags "$_vg"
}

# hash_dev PATH: sha256 of a whole device or file, hex only.
hash_dev() {
  sha256sum < "$1" | cut -d' ' -f1
}

# tree_hash DIR: one sha256 over the names and contents of all regular files under DIR (order-independent).
tree_hash() {
  (cd "$1" && find . -type f ! -name '*.tmp' | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1)
}

# make_ext4_with_files DEVICE MOUNTPOINT NFILES: mkfs.ext4 on DEVICE, mount it on MOUNTPOINT (created under
# $UML_DIR if relative), and write NFILES files of 64 KiB with distinct content.
make_ext4_with_files() {
  _dev=$1 _mnt=$2 _n=$3
  case "$_mnt" in /*) ;; *) _mnt="$UML_DIR/$_mnt" ;; esac
  check mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$_dev"
  mkdir -p "$_mnt"
  check mount -t ext4 "$_dev" "$_mnt"
  _i=0
  while [ "$_i" -lt "$_n" ]; do
    head -c 65536 /dev/urandom > "$_mnt/file$_i" || fail "writing $_mnt/file$_i"
    _i=$((_i + 1))
  done
  sync
}

# start_writer MOUNTPOINT: a background process that keeps rewriting the files in MOUNTPOINT (whole-file
# replace via rename, plus appends to a log), syncing every round. Its pid is in WRITER_PID.
start_writer() {
  _wm=$1
  (
    _r=0
    while :; do
      for _f in "$_wm"/file*; do
        head -c 65536 /dev/urandom > "$_f.tmp" && mv "$_f.tmp" "$_f"
      done
      echo "round $_r" >> "$_wm/writer.log"
      _r=$((_r + 1))
      sync
    done
  ) &
  WRITER_PID=$!
}

# stop_writer: stop the writer started by start_writer and wait for it.
stop_writer() {
  [ -n "${WRITER_PID:-}" ] || return 0
  kill "$WRITER_PID" 2>/dev/null
  wait "$WRITER_PID" 2>/dev/null
  WRITER_PID=""
  sync
}

# net_up IFACE ADDRESS/PREFIX: bring up a guest network interface (vec0 for the first --append vec0:...).
net_up() {
  check ip link set "$1" up
  check ip addr add "$2" dev "$1"
}

# wait_ping ADDRESS SECONDS: wait until ADDRESS answers a ping; fail after SECONDS.
wait_ping() {
  _end=$(($(date +%s) + $2))
  until ping -c1 -W1 "$1" > /dev/null 2>&1; do
    [ "$(date +%s)" -lt "$_end" ] || fail "no ping reply from $1 within $2 s"
  done
}
