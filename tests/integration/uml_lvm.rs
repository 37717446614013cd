//! Real LVM inside User-Mode Linux: `blockrep sync` with `snapshot = "lvm"` from a busy ext4 LV to a shadow LV
//! through `blockrep serve` on the guest's 127.0.0.1, and power cuts of the standby in the middle of a sync.
//!
//! The host-built `blockrep` runs inside the guest by its host path (hostfs). The state directory lives on its
//! own ext4 disk, as it would on a real standby (never on a replicated volume).

use std::time::Duration;

use super::uml;

/// Common setup: the ext4 state disk (/dev/ubdc), key and configuration; `$BR` is blockrep, `start_serve` starts
/// the standby daemon in the background and waits until it listens.
fn setup(snapshot_size: &str) -> String {
    format!(
        r#"
BR={br}
W=$UML_DIR
state_fs
cat > $W/blockrep.toml <<CONF
node = "uml"
key_file = "$W/key"
state_dir = "/mnt/brstate"
[standby]
listen = "127.0.0.1:7788"
[primary]
peer = "127.0.0.1:7788"
[[volume]]
name = "data"
source = "/dev/vg0/data"
shadow = "/dev/vg1/data_shadow"
snapshot = "lvm"
snapshot_size = "{snapshot_size}"
CONF
start_serve() {{
  serve_bg $W/serve.log --config $W/blockrep.toml
}}
"#,
        br = env!("CARGO_BIN_EXE_blockrep")
    )
}

macro_rules! skip_without_uml {
    () => {
        if let Some(reason) = uml::unavailable() {
            eprintln!("skipping: {reason}");
            return;
        }
    };
}

#[test]
fn lvm_snapshot_sync_of_a_busy_ext4_gives_a_clean_identical_shadow_and_incremental_ships_only_changes() {
    skip_without_uml!();
    let scenario = setup("50%")
        + r#"
make_vg vg0 /dev/ubda
make_vg vg1 /dev/ubdb
make_lv vg0 data 40M
make_ext4_with_files /dev/vg0/data data 64
start_serve
# No shadow yet: the sync is refused, the standby records the size; `shadow create` provisions it tagged.
$BR sync --config $W/blockrep.toml > $W/s0.out 2> $W/s0.err && fail "sync without a shadow must fail"
grep -q "blockrep shadow create" $W/s0.err || fail "no hint to create the shadow: $(cat $W/s0.err)"
check $BR shadow create --config $W/blockrep.toml data
result shadow_tags "$(lvs --noheadings -o lv_tags vg1/data_shadow | tr -d ' ')"
result shadow_size "$(lvs --noheadings --units b --nosuffix -o lv_size vg1/data_shadow | tr -d ' ')"
# A foreign LV where a shadow should be is never touched.
make_lv vg1 other 8M
sed 's/data_shadow/other/' $W/blockrep.toml > $W/other.toml
$BR shadow create --config $W/other.toml data 2> $W/other.err && fail "shadow create took over a foreign LV"
result foreign_refused "$(grep -c 'not a blockrep shadow' $W/other.err)"

start_writer $W/data
sleep 1
check $BR sync --json --config $W/blockrep.toml > $W/s1.json 2>> $W/sync.err
stop_writer
result sync1 "$(cat $W/s1.json)"
result snapshots_left "$(lvs --noheadings -o lv_name vg0 | grep -c blockrep_snap)"
# The shadow equals the generation the primary hashed from the snapshot (verify re-hashes the shadow).
check $BR verify --json --local /dev/vg1/data_shadow --state-dir /mnt/brstate --name data > $W/v1.json
result verify1 "$(cat $W/v1.json)"
# serve holds the shadow (created after it started) exclusively: it cannot be mounted while serve runs.
mkdir -p $W/shadowmnt
mount -t ext4 -o ro /dev/vg1/data_shadow $W/shadowmnt 2> $W/mount.err && fail "mounted a shadow that serve holds"
result mount_refused "$(grep -c -i busy $W/mount.err)"
kill $SERVE; wait $SERVE
check e2fsck -n -f /dev/vg1/data_shadow
check mount -t ext4 -o ro /dev/vg1/data_shadow $W/shadowmnt
result files "$(ls $W/shadowmnt | grep -c '^file[0-9]*$')"
umount $W/shadowmnt
mv $W/serve.log $W/serve.log.1
start_serve

# Catch up with what the writer changed after the snapshot, then change 4 files (4 x 64 KiB) and sync again:
# only about that much (plus ext4 metadata and journal) is sent.
check $BR sync --json --config $W/blockrep.toml > $W/s1b.json 2>> $W/sync.err
for i in 1 2 3 4; do head -c 65536 /dev/urandom > $W/data/file$i; done
sync
check $BR sync --json --config $W/blockrep.toml > $W/s2.json 2>> $W/sync.err
result sync2 "$(cat $W/s2.json)"
check umount $W/data
check $BR sync --json --config $W/blockrep.toml > $W/s3.json 2>> $W/sync.err
result src_hash "$(hash_dev /dev/vg0/data)"
result shadow_hash "$(hash_dev /dev/vg1/data_shadow)"
kill $SERVE; wait $SERVE
result serve_rc $?
"#;
    let disks = [("disk0", 128 << 20), ("disk1", 96 << 20), ("state", 32 << 20)];
    let r = uml::run_guest(&disks, &scenario, Duration::from_secs(300));
    eprintln!("guest ran for {:?}", r.elapsed);
    r.assert_success();
    assert_eq!(r.result("shadow_tags"), Some("blockrep_shadow"));
    assert_eq!(r.result("shadow_size"), Some((40u64 << 20).to_string().as_str()));
    assert_eq!(r.result("foreign_refused"), Some("1"));
    assert_eq!(r.result("snapshots_left"), Some("0"), "the snapshot must be removed after the sync");
    let s1: serde_json::Value = serde_json::from_str(r.result("sync1").unwrap()).unwrap();
    assert_eq!(s1["generation"], 1);
    let v1: serde_json::Value = serde_json::from_str(r.result("verify1").unwrap()).unwrap();
    assert_eq!(v1["ok"], true, "{v1}");
    assert_eq!(r.result("mount_refused"), Some("1"), "mounting a held shadow fails with 'busy'");
    assert_eq!(r.result("files"), Some("64"));
    let s2: serde_json::Value = serde_json::from_str(r.result("sync2").unwrap()).unwrap();
    assert_eq!(s2["mode"], "incremental");
    let sent = s2["bytes_sent"].as_u64().unwrap();
    assert!(sent < 2 << 20, "incremental sync of 4 changed files sent {sent} bytes of a 40 MiB volume");
    assert!(sent >= 4 * 65536, "the 4 changed files ({} bytes) must be sent, sent {sent}", 4 * 65536);
    assert_eq!(r.result("src_hash"), r.result("shadow_hash"), "after a quiesced sync the shadow equals the source");
    assert_eq!(r.result("serve_rc"), Some("0"), "serve exits 0 on SIGTERM");
}

#[test]
fn power_cut_of_the_standby_mid_sync_leaves_the_previous_or_the_new_generation() {
    skip_without_uml!();
    let first = setup("60%")
        + r#"
make_vg vg0 /dev/ubda
make_vg vg1 /dev/ubdb
make_lv vg0 data 24M
check dd if=/dev/urandom of=/dev/vg0/data bs=1M count=24 status=none
start_serve
$BR sync --config $W/blockrep.toml > /dev/null 2>&1
check $BR shadow create --config $W/blockrep.toml data
check $BR sync --config $W/blockrep.toml
result h1 "$(hash_dev /dev/vg0/data)"
# Generation 2: every other 64 KiB block rewritten, then a slow sync that the host cuts.
i=0; while [ $i -lt 192 ]; do dd if=/dev/urandom of=/dev/vg0/data bs=64K count=1 seek=$((i*2)) conv=notrunc status=none; i=$((i+1)); done
sync
result h2 "$(hash_dev /dev/vg0/data)"
echo SYNC_STARTED
$BR sync --bwlimit 2M --config $W/blockrep.toml
echo SYNC_FINISHED
sleep 600
"#;
    let second = setup("60%")
        + r#"
check vgchange -q -ay vg0 vg1
check $BR verify --json --local /dev/vg1/data_shadow --state-dir /mnt/brstate --name data > $W/v.json
result verify "$(cat $W/v.json)"
result shadow_hash "$(hash_dev /dev/vg1/data_shadow)"
result leftover_present "$(lvs --noheadings -o lv_name vg0 | grep -c blockrep_snap)"
start_serve
BLOCKREP_LOG=info $BR sync --json --config $W/blockrep.toml > $W/s.json 2> $W/s.err || fail "sync after the cut: $(cat $W/s.err)"
result leftover_removed "$(grep -c 'left behind' $W/s.err)"
result snapshots_left "$(lvs --noheadings -o lv_name vg0 | grep -c blockrep_snap)"
result final_hash "$(hash_dev /dev/vg1/data_shadow)"
result src_hash "$(hash_dev /dev/vg0/data)"
"#;
    let disks = |b: uml::Boot| b.disk("disk0", 64 << 20).disk("disk1", 64 << 20).disk("state", 32 << 20);
    // Cut at several points: early in the transfer, in the middle, and near the end (commit and apply).
    for delay_ms in [300u64, 2500, 5500, 9000] {
        let u = uml::Uml::new(&format!("cut{delay_ms}"));
        let mut g = u.start(&disks(uml::Boot::new(first.clone())).timeout(Duration::from_secs(240)));
        assert!(g.wait_for_console("SYNC_STARTED", Duration::from_secs(200)), "{}", g.console());
        std::thread::sleep(Duration::from_millis(delay_ms));
        g.kill();
        let cut = g.wait();
        let (h1, h2) = (cut.result("h1").unwrap().to_owned(), cut.result("h2").unwrap().to_owned());
        assert_ne!(h1, h2);
        let r = u.run(&disks(uml::Boot::new(second.clone())).timeout(Duration::from_secs(240)));
        r.assert_success();
        let v: serde_json::Value = serde_json::from_str(r.result("verify").unwrap()).unwrap();
        assert_eq!(v["ok"], true, "cut after {delay_ms} ms: shadow is not its committed generation: {v}");
        let shadow = r.result("shadow_hash").unwrap();
        match v["generation"].as_u64() {
            Some(1) => assert_eq!(shadow, h1, "cut after {delay_ms} ms: generation 1 but other content"),
            Some(2) => assert_eq!(shadow, h2, "cut after {delay_ms} ms: generation 2 but other content"),
            g => panic!("cut after {delay_ms} ms: unexpected generation {g:?}"),
        }
        eprintln!("cut after {delay_ms} ms: shadow at generation {}", v["generation"]);
        assert_eq!(r.result("final_hash"), Some(h2.as_str()), "the next sync completes");
        assert_eq!(r.result("src_hash"), Some(h2.as_str()));
        // A cut after the snapshot was created leaves it behind; the next sync finds it by its tag and removes it.
        assert_eq!(r.result("leftover_removed"), r.result("leftover_present"), "leftover snapshot handling");
        assert_eq!(r.result("snapshots_left"), Some("0"));
    }
}

#[test]
fn lvm_bad_inputs_fail_clearly_and_leave_nothing_behind() {
    skip_without_uml!();
    let scenario = setup("8M")
        + r#"
make_vg vg0 /dev/ubda
make_vg vg1 /dev/ubdb
make_lv vg0 data 96M
check dd if=/dev/zero of=/dev/vg0/data bs=1M count=96 status=none
check dd if=/dev/urandom of=/dev/vg0/data bs=1M count=8 conv=notrunc status=none
start_serve
$BR sync --config $W/blockrep.toml > /dev/null 2>&1
check $BR shadow create --config $W/blockrep.toml data
check $BR sync --config $W/blockrep.toml 2>> $W/sync.err
result h1 "$(hash_dev /dev/vg1/data_shadow)"

# 1. The snapshot (8 MiB) overflows while a writer rewrites the origin during the scan of 96 MiB.
( while :; do dd if=/dev/urandom of=/dev/vg0/data bs=1M count=96 conv=notrunc oflag=direct status=none; done ) &
DD=$!
sleep 1
$BR sync --config $W/blockrep.toml > /dev/null 2> $W/full.err && fail "sync through an overflowing snapshot must fail"
kill $DD; wait $DD 2>/dev/null
result overflow_msg "$(grep -c 'filled up and was invalidated' $W/full.err)"
result overflow_hint "$(grep -c 'snapshot_size' $W/full.err)"
result overflow_alarm "$($BR status --json --config $W/blockrep.toml | grep -c '"kind":"snapshot_full","volume":"data"')"
result after_overflow "$(hash_dev /dev/vg1/data_shadow)"
result snaps_after_overflow "$(lvs --noheadings -o lv_name vg0 | grep -c blockrep_snap)"

# 2. Not enough free space in the VG for the snapshot: refused with the numbers, nothing created.
sed 's/snapshot_size = "8M"/snapshot_size = "200M"/' $W/blockrep.toml > $W/big.toml
$BR sync --config $W/big.toml > /dev/null 2> $W/space.err && fail "a snapshot larger than the VG's free space must be refused"
result space_msg "$(grep -c 'bytes free' $W/space.err)"
result snaps_after_space "$(lvs --noheadings -o lv_name vg0 | grep -c blockrep_snap)"

# 3. A source that is not an LV while snapshot = "lvm".
truncate -s 96M $W/plain.img
sed "s|source = \"/dev/vg0/data\"|source = \"$W/plain.img\"|" $W/blockrep.toml > $W/plain.toml
$BR sync --config $W/plain.toml > /dev/null 2> $W/plain.err && fail "snapshot = lvm on a plain file must fail"
result notlv_msg "$(grep -c 'LVM logical volume' $W/plain.err)"
result verify "$($BR verify --json --local /dev/vg1/data_shadow --state-dir /mnt/brstate --name data)"
"#;
    let disks = [("disk0", 160 << 20), ("disk1", 128 << 20), ("state", 32 << 20)];
    let r = uml::run_guest(&disks, &scenario, Duration::from_secs(300));
    eprintln!("guest ran for {:?}", r.elapsed);
    r.assert_success();
    assert_eq!(r.result("overflow_msg"), Some("1"), "{:?}", r.results);
    assert_eq!(r.result("overflow_hint"), Some("1"));
    assert_eq!(r.result("overflow_alarm"), Some("1"), "status raises the snapshot alarm: {:?}", r.results);
    assert_eq!(r.result("after_overflow"), r.result("h1"), "the shadow keeps its previous generation");
    assert_eq!(r.result("snaps_after_overflow"), Some("0"));
    assert_eq!(r.result("space_msg"), Some("1"));
    assert_eq!(r.result("snaps_after_space"), Some("0"));
    assert_eq!(r.result("notlv_msg"), Some("1"));
    let v: serde_json::Value = serde_json::from_str(r.result("verify").unwrap()).unwrap();
    assert_eq!((v["ok"].as_bool(), v["generation"].as_u64()), (Some(true), Some(1)), "{v}");
}
