//! The whole lifecycle of a pair on real LVM, inside one User-Mode Linux guest: two nodes A and B as two
//! configuration files (separate state directories on an ext4 disk, `blockrep serve` of each on its own port
//! of the guest's 127.0.0.1), A's volume on vg0 and B's on vg1, each node's production volume also configured
//! as its shadow (docs/role.md, "Switching back"), `snapshot = "lvm"`. Each node's virtual IP lives on its own
//! dummy interface, so that the two role plans in one kernel do not take each other's address.
//!
//! sync → writes → planned switchover to B (A's final sync: A's last write is on B) → writes on B → reverse sync
//! B→A (incremental, about the changed bytes on the wire) → switch back to A → sync A→B (incremental). Then an
//! unplanned failover: A's writer, its sync and `serve` are SIGKILLed mid-write and mid-sync, B is promoted, A
//! comes back and is demoted,
//! and the reverse sync B→A compares A's actual content; A ends up byte-identical to B's volume (hashed in the
//! guest with sha256sum, independently of blockrep). A's volume is tracked by its previous snapshot
//! (`track = "snapshot"`), B's is not: a demote of A removes its tracker, and A's first sync as primary again scans.

use std::time::Duration;

use super::uml;

/// Size of each node's volume in MiB (the scenario's `24M`, 6144 blocks of 4 KiB).
const VOLUME_MIB: u64 = 24;

const SCENARIO: &str = r#"
W=$UML_DIR
check modprobe -d "$UML_MODS" dummy
for n in a b; do
  check ip link add vip$n type dummy
  check ip link set vip$n up
done
state_fs
mkdir -p /mnt/brstate/a /mnt/brstate/b
# conf NODE LISTEN_PORT PEER_PORT VG TRACK
conf() {
  cat > $W/$1.toml <<CONF
node = "$1"
key_file = "$W/key"
state_dir = "/mnt/brstate/$1"
[standby]
listen = "127.0.0.1:$2"
peer = "127.0.0.1:$3"
[primary]
peer = "127.0.0.1:$3"
[[volume]]
name = "data"
source = "/dev/$4/data"
shadow = "/dev/$4/data"
snapshot = "lvm"
snapshot_size = "8M"
track = "$5"
[role]
interface = "vip$1"
vip = "10.77.9.50/24"
[role.garp]
count = 1
interval_ms = 10
refresh_s = 0
[role.probe]
count = 1
interval_ms = 10
wait_ms = 20
[role.services]
primary_only = [{ hook = "echo \$BLOCKREP_ACTION >> $W/app-$1.log" }]
CONF
}
conf a 7701 7702 vg0 snapshot
conf b 7702 7701 vg1 none
A="--config $W/a.toml"
B="--config $W/b.toml"
VA=/dev/vg0/data
VB=/dev/vg1/data

# start_serve NODE: blockrep serve of NODE in the background (pid in SERVE_NODE), waits until it serves.
SERVES=0
start_serve() {
  SERVES=$((SERVES + 1))
  serve_bg $W/serve-$1-$SERVES.log --config $W/$1.toml
  eval "SERVE_$1=$SERVE"
}
# wr DEV BLOCK...: one random 4 KiB block at each 4 KiB block number, written through (O_DIRECT).
wr() {
  _d=$1
  shift
  for _b in "$@"; do
    check dd if=/dev/urandom of=$_d bs=4K seek=$_b count=1 conv=notrunc oflag=direct status=none
  done
}
# mark DEV BLOCK TEXT: a 4 KiB block starting with TEXT (then zeros); read_mark DEV BLOCK LEN reads it back.
mark() {
  { printf '%s' "$3"; head -c $((4096 - ${#3})) /dev/zero; } |
    dd of=$1 bs=4K seek=$2 count=1 conv=notrunc oflag=direct iflag=fullblock status=none || fail "mark $1 $2"
}
read_mark() {
  dd if=$1 bs=4K skip=$2 count=1 status=none | head -c $3
}
# sync_json NODE KEY [ARGS...]: blockrep sync --json on NODE; records its JSON as KEY and its exit status as KEY_rc.
sync_json() {
  _n=$1 _k=$2
  shift 2
  BLOCKREP_LOG=info $BR --config $W/$_n.toml sync --json "$@" > $W/$_k.json 2> $W/$_k.err
  _rc=$?
  result ${_k}_rc $_rc
  result $_k "$(cat $W/$_k.json)"
  [ $_rc -eq 0 ] || echo "sync $_k exit $_rc: $(cat $W/$_k.err)"
  return $_rc
}
# role_of NODE: the node's own role (the first "role" of status --json; the peer's comes later).
role_of() {
  $BR --config $W/$1.toml status --json | grep -o '"role":"[a-z]*"' | head -n 1 | cut -d'"' -f4
}
has_vip() {
  ip -4 addr show dev vip$1 | grep -c '10.77.9.50/'
}
same() {
  [ "$(hash_dev $VA)" = "$(hash_dev $VB)" ] && echo yes || echo no
}

make_vg vg0 /dev/ubda
make_vg vg1 /dev/ubdb
make_lv vg0 data 24M
make_lv vg1 data 24M
check dd if=/dev/urandom of=$VA bs=1M count=24 oflag=direct status=none
check dd if=/dev/zero of=$VB bs=1M count=24 oflag=direct status=none

# 1. A primary, B its standby: full sync, then writes and an incremental sync.
check $BR $A promote --force --reason initial
start_serve a
start_serve b
sync_json a sync_full || fail "first sync"
wr $VA 100 1000 2000 3000
sync_json a sync_inc || fail "second sync"
result same_after_sync "$(same)"

# 2. Writes on A, the last one just before a planned switchover from B: A stops its service, syncs a final time,
#    demotes; B promotes.
wr $VA 10 1500 4000 6000
mark $VA 5000 "the last write on a before the switchover"
result same_before_switchover "$(same)"
BLOCKREP_LOG=info $BR $B switchover --reason "maintenance of a" --json > $W/so1.json 2> $W/so1.err || fail "switchover to b: $(cat $W/so1.err)"
result switchover1 "$(cat $W/so1.json)"
result same_after_switchover "$(same)"
result mark_on_b "$(read_mark $VB 5000 41)"
result roles_after_switchover "$(role_of a) $(role_of b)"
result trackers_on_a_after_switchover "$(lvs --noheadings -o lv_name vg0 | grep -c _blockrep_)"
result vips_after_switchover "$(has_vip a) $(has_vip b)"
result app_a "$(tr '\n' ' ' < $W/app-a.log)"
result log_a "$($BR $A log | grep -c 'final-sync: switchover requested by b')"

# 3. Writes on B (8 blocks of 4 KiB, each in its own 64 KiB block), reverse sync B->A: incremental.
wr $VB 16 300 700 1100 2200 3300 4400 5500
sync_json b reverse_inc || fail "reverse sync"
result same_after_reverse "$(same)"

# 4. Switch back to A (B's final sync, B's last write on A), then A->B incremental again.
mark $VB 77 "the last write on b"
BLOCKREP_LOG=info $BR $A switchover --reason "switch back" --json > $W/so2.json 2> $W/so2.err || fail "switchover to a: $(cat $W/so2.err)"
result same_after_switchback "$(same)"
result mark_on_a "$(read_mark $VA 77 19)"
result roles_after_switchback "$(role_of a) $(role_of b)"
result vips_after_switchback "$(has_vip a) $(has_vip b)"
wr $VA 50 2500 5900 6100
sync_json a forward_inc || fail "sync after the switch back"
result same_after_forward "$(same)"

# 5. Unplanned failover in the middle of a sync: 8 MiB rewritten on A, A's (rate-limited) sync to B running and a
#    writer too when all of A's processes are SIGKILLed (its host dies, its VIP with it); B is promoted, written,
#    and A, back and demoted, becomes B's standby.
check dd if=/dev/urandom of=$VA bs=1M seek=8 count=8 conv=notrunc oflag=direct status=none
$BR $A sync --bwlimit 2M > $W/killed_sync.out 2>&1 &
SYNC_a=$!
# The writer leads its own process group (setsid), so that the kill also takes the dd in flight.
setsid sh -c 'i=0; while :; do
  dd if=/dev/urandom of=$0 bs=4K seek=$(( (i * 397) % 6144 )) count=1 conv=notrunc oflag=direct status=none
  i=$((i + 1)); done' $VA &
WRITER=$!
SPOOL=/mnt/brstate/b/standby/data/spool
for _i in $(seq 1 150); do
  [ "$(stat -c %s $SPOOL 2>/dev/null || echo 0)" -ge 1048576 ] && break
  sleep 0.1
done
kill -9 -$WRITER || fail "cannot kill the writer's process group"
kill -9 $SYNC_a $SERVE_a
wait $WRITER $SYNC_a $SERVE_a 2>/dev/null
result spool_at_kill "$(stat -c %s $SPOOL 2>/dev/null || echo 0)"
result snapshots_on_a_at_kill "$(lvs --noheadings -o lv_name vg0 | grep -c _blockrep_)"
check ip link set vipa down
result same_after_kill "$(same)"
BLOCKREP_LOG=info $BR $B promote --reason "a died" --json > $W/promote.json 2> $W/promote.err
result promote_rc $?
result promote "$(cat $W/promote.json)"
result roles_after_promote "$(role_of b)"
result vipb_after_promote "$(has_vip b)"
wr $VB 20 900 1800 2700
mark $VB 3600 "written on b after the failover"
# A comes back, still believing it is primary: demoted, it serves as B's standby.
check ip link set vipa up
check $BR $A demote --reason "back after a failure"
result roles_after_demote "$(role_of a) $(role_of b)"
result vipa_after_demote "$(has_vip a)"
result snapshots_on_a_after_demote "$(lvs --noheadings -o lv_name vg0 | grep -c _blockrep_)"
start_serve a
sync_json b failover_sync
result failover_sync_err "$(grep -v '^ *$' $W/failover_sync.err | tail -n 5 | tr '\n' ' ')"
HA=$(hash_dev $VA)
HB=$(hash_dev $VB)
result failover_hashes "$HA $HB"
result mark_on_a_after_failover "$(read_mark $VA 3600 31)"
result snapshots_on_a_at_end "$(lvs --noheadings -o lv_name vg0 | grep -c _blockrep_)"
kill $SERVE_a $SERVE_b
wait $SERVE_a $SERVE_b
"#;

fn json(r: &uml::GuestResult, key: &str) -> serde_json::Value {
    let text = r.result(key).unwrap_or_else(|| panic!("no result {key}: {:?}", r.results));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{key} is not JSON ({e}): {text}"))
}

/// Asserts an incremental sync that put about `changed` bytes on the wire (the changed 4 KiB pieces, their
/// frames and the sub-block hashes that found them: at most 10 % plus 8 KiB more).
fn assert_incremental(r: &uml::GuestResult, key: &str, changed: u64) {
    let s = json(r, key);
    assert_eq!(r.result(&format!("{key}_rc")), Some("0"), "{key}: {s}");
    assert_eq!(s["mode"], "incremental", "{key}: {s}");
    assert_eq!(s["bytes_changed"], changed, "{key}: {s}");
    let wire = s["bytes_on_wire"].as_u64().unwrap();
    assert!(wire >= changed && wire <= changed * 11 / 10 + 8192, "{key}: {wire} bytes on the wire for {changed}: {s}");
}

#[test]
fn lvm_lifecycle_switchover_switchback_and_unplanned_failover() {
    if let Some(reason) = uml::unavailable() {
        eprintln!("skipping: {reason}");
        return;
    }
    let boot = uml::Boot::new(SCENARIO)
        .disk("vg0", 48 << 20)
        .disk("vg1", 48 << 20)
        .disk("state", 32 << 20)
        .env("BR", env!("CARGO_BIN_EXE_blockrep"))
        .timeout(Duration::from_secs(240));
    let u = uml::Uml::new("lifecycle");
    let r = u.run(&boot);
    eprintln!("guest ran for {:?}", r.elapsed);
    for (k, v) in &r.results {
        eprintln!("{k} = {v}");
    }
    r.assert_success();
    let res = |k: &str| r.result(k).unwrap_or_else(|| panic!("no result {k}: {:?}", r.results)).to_owned();

    // 1. Full, then incremental (4 blocks of 4 KiB).
    assert_eq!(json(&r, "sync_full")["mode"], "full");
    assert_eq!(json(&r, "sync_full")["bytes_changed"], VOLUME_MIB << 20);
    assert_incremental(&r, "sync_inc", 4 * 4096);
    assert_eq!(json(&r, "sync_inc")["tracker"], "exception store", "A's second sync reads its tracker's changes");
    assert_eq!(res("same_after_sync"), "yes");

    // 2. Planned switchover: A's last write is on B, both volumes byte-identical; roles and VIP moved; A's
    //    service was stopped before the final sync, which is in A's log.
    assert_eq!(res("same_before_switchover"), "no");
    assert_eq!(res("same_after_switchover"), "yes", "the final sync shipped every write A made");
    assert_eq!(res("mark_on_b"), "the last write on a before the switchover");
    assert_eq!(res("roles_after_switchover"), "standby primary");
    assert_eq!(res("trackers_on_a_after_switchover"), "0", "A's demote removed its tracker");
    assert_eq!(res("vips_after_switchover"), "0 1");
    assert_eq!(res("app_a").split_whitespace().collect::<Vec<_>>(), ["start", "stop", "stop"]);
    assert_eq!(res("log_a"), "1");
    let so = json(&r, "switchover1");
    assert!(so["data_age_s"].as_u64().is_some_and(|a| a < 60), "{so}");

    // 3. Reverse sync B->A after 8 blocks written on B: incremental, about those 32 KiB on the wire.
    assert_incremental(&r, "reverse_inc", 8 * 4096);
    assert_eq!(res("same_after_reverse"), "yes");

    // 4. Switch back: B's last write on A, roles and VIP back; A->B incremental again.
    assert_eq!(res("same_after_switchback"), "yes");
    assert_eq!(res("mark_on_a"), "the last write on b");
    assert_eq!(res("roles_after_switchback"), "primary standby");
    assert_eq!(res("vips_after_switchback"), "1 0");
    assert_incremental(&r, "forward_inc", 4 * 4096);
    // Its tracker went with the demote: A's first sync as primary again scans (incremental all the same).
    let f = json(&r, "forward_inc");
    assert_eq!(f["tracker"], "full scan", "{f}");
    assert!(f["fallback_reason"].as_str().is_some_and(|w| w.starts_with("no tracker")), "{f}");
    assert_eq!(res("same_after_forward"), "yes");

    // 5. Unplanned failover. A's writer changed A's volume after its last sync; B's promote (the peer does not
    //    answer: no --force needed) reports how old its data is.
    assert_eq!(res("same_after_kill"), "no", "A's writer wrote after A's last sync");
    let spool: u64 = res("spool_at_kill").parse().unwrap();
    assert!(spool >= 1 << 20, "A's sync was killed in the middle of its transfer: spool of {spool} bytes on B");
    // The killed sync left its snapshot on A beside A's tracker; A's demote removes both (a standby's volume must
    // not keep copying every write the new primary's syncs make into a snapshot of itself).
    assert_eq!(res("snapshots_on_a_at_kill"), "2", "the killed sync's snapshot beside A's tracker");
    assert_eq!(res("snapshots_on_a_after_demote"), "0");
    assert_eq!(res("snapshots_on_a_at_end"), "0");
    assert_eq!(res("promote_rc"), "0");
    let p = json(&r, "promote");
    assert!(p["data_age_s"].as_u64().is_some() && p["last_sync"].as_u64().is_some(), "{p}");
    assert!(p.to_string().contains("the peer does not answer"), "{p}");
    assert_eq!(res("roles_after_promote"), "primary");
    assert_eq!(res("vipb_after_promote"), "1");
    assert_eq!(res("roles_after_demote"), "standby primary");
    assert_eq!(res("vipa_after_demote"), "0");
    // The reverse sync compares A's actual content (A was written after the generation B promoted), sends
    // about the differing bytes, and A ends up byte-identical to B's volume, B's write after the failover
    // included (hashed in the guest, not by blockrep).
    let f = json(&r, "failover_sync");
    assert_eq!(res("failover_sync_rc"), "0", "{}", res("failover_sync_err"));
    assert_eq!(f["mode"], "compare", "{f}");
    assert!(f["reason"].as_str().unwrap().contains("not trusted"), "{f}");
    let changed = f["bytes_changed"].as_u64().unwrap();
    let wire = f["bytes_on_wire"].as_u64().unwrap();
    assert!((4 * 4096..(VOLUME_MIB << 20) / 2).contains(&changed), "{f}");
    assert!(wire <= changed * 11 / 10 + 65536, "compare sync: {wire} bytes on the wire for {changed} changed: {f}");
    let hashes = res("failover_hashes");
    let (ha, hb) = hashes.split_once(' ').unwrap();
    assert_eq!(ha, hb, "A's volume equals B's after the sync back");
    assert_eq!(res("mark_on_a_after_failover"), "written on b after the failover");
}
