//! lvmctl against the real lvm2, inside a User-Mode Linux guest, and the UML harness's own tests.
//!
//! Each `real_lvm_*` test runs twice: on the host it boots a guest whose scenario makes a VG on a disk image and
//! runs this same test binary (by its host path, through hostfs) with `BLOCKREP_IN_UML=1` and a filter for
//! itself; in the guest it does the real operations and asserts on them. (Two tests, so two guests share the
//! work in parallel: every lvm command costs a few hundred milliseconds in the guest.) With `LVMCTL_CAPTURE_FIXTURES=<dir>` the guest also writes the raw
//! reports and stderr it saw into `<dir>` (that is how `lvmctl/tests/fixtures/` was made).

#[path = "../../tests/uml/harness.rs"]
mod uml;

use std::time::Duration;

const IN_UML: &str = "BLOCKREP_IN_UML";
const CAPTURE: &str = "LVMCTL_CAPTURE_FIXTURES";

macro_rules! skip_without_uml {
    () => {
        if let Some(reason) = uml::unavailable() {
            eprintln!("skipping: {reason}");
            return;
        }
    };
}

/// Runs `test` (a test of this binary) inside a guest with a fresh VG `vg0` on a 128 MiB disk image.
fn run_in_guest(test: &str) {
    let exe = std::env::current_exe().unwrap();
    let scenario = format!(
        "set -e\n\
         modprobe -d \"$UML_MODS\" dm-thin-pool\n\
         pvcreate -q /dev/ubda\n\
         vgcreate -q vg0 /dev/ubda\n\
         {IN_UML}=1 {exe} --exact {test} --nocapture --test-threads=1\n",
        exe = exe.display()
    );
    let mut boot = uml::Boot::new(scenario).disk("disk0", 128 << 20).timeout(Duration::from_secs(300));
    if let Some(dir) = std::env::var_os(CAPTURE) {
        let dir = std::fs::canonicalize(dir).expect("LVMCTL_CAPTURE_FIXTURES must be an existing directory");
        boot = boot.env(CAPTURE, dir.to_str().unwrap());
    }
    let u = uml::Uml::new("lvmctl");
    let r = u.run(&boot);
    eprintln!("{test}: guest ran for {:?}", r.elapsed);
    r.assert_success();
    // The in-guest test really ran (and was not filtered away).
    assert!(r.console.contains("test result: ok. 1 passed"), "{}", r.console_tail(40));
}

#[test]
fn real_lvm_snapshots() {
    if std::env::var_os(IN_UML).is_some() {
        return in_guest::snapshots();
    }
    skip_without_uml!();
    run_in_guest("real_lvm_snapshots");
}

#[test]
fn real_lvm_volumes_and_errors() {
    if std::env::var_os(IN_UML).is_some() {
        return in_guest::volumes_and_errors();
    }
    skip_without_uml!();
    run_in_guest("real_lvm_volumes_and_errors");
}

#[test]
fn harness_returns_scenario_status_and_keeps_disks_across_a_power_cut() {
    skip_without_uml!();
    let u = uml::Uml::new("harness");
    // First boot: an LV with a marker written through to the disk image, then hang until the power is cut.
    let first = uml::Boot::new(
        "make_vg vg0 /dev/ubda\n\
         make_lv vg0 shadow 8M\n\
         printf BLOCKREP-MARKER | dd of=/dev/vg0/shadow bs=512 conv=sync,fsync 2>/dev/null || fail dd\n\
         echo MARKER-WRITTEN\n\
         sleep 600\n",
    )
    .disk("disk0", 32 << 20)
    .timeout(Duration::from_secs(180));
    let mut g = u.start(&first);
    assert!(g.wait_for_console("MARKER-WRITTEN", Duration::from_secs(150)), "{}", g.console());
    let pgid = g.pid().unwrap();
    assert!(uml::live_processes_in_group(pgid).len() > 1, "the running guest's processes are not visible");
    g.kill();
    let r = g.wait();
    assert_eq!(r.status, 125, "a killed guest has no SCENARIO_RC: {r:?}");
    assert_eq!(r.scenario_rc, None);
    assert!(r.elapsed < Duration::from_secs(170), "killed, not timed out: {:?}", r.elapsed);
    // No process of the guest is left.
    assert_eq!(uml::live_processes_in_group(pgid), Vec::<i32>::new(), "the killed guest left processes behind");

    // Second boot on the same image: the VG comes back, the marker survived; the scenario's status comes back.
    let second = uml::Boot::new(
        "check vgchange -q -ay vg0\n\
         head -c 15 /dev/vg0/shadow > \"$UML_DIR/read-back\"\n\
         echo \"X=$X\"\n\
         exit 7\n",
    )
    .disk("disk0", 32 << 20)
    .env("X", "it's a value")
    .timeout(Duration::from_secs(60));
    let r = u.run(&second);
    assert_eq!((r.status, r.scenario_rc), (7, Some(7)), "{}", r.console_tail(30));
    assert!(r.console.contains("X=it's a value"), "{}", r.console_tail(30));
    assert_eq!(std::fs::read_to_string(u.dir().join("read-back")).unwrap(), "BLOCKREP-MARKER");
}

#[test]
fn harness_kills_a_hung_guest_at_the_timeout() {
    skip_without_uml!();
    // 20 s: time for the boot to reach the scenario even on a loaded machine (it takes 2-3 s when idle).
    let r = uml::run_guest(&[], "echo hanging\nsleep 600\n", Duration::from_secs(20));
    assert!(r.timed_out(), "{r:?}");
    assert_eq!(r.scenario_rc, None);
    assert!(r.console.contains("hanging"), "{}", r.console_tail(20));
    assert!(r.elapsed < Duration::from_secs(60), "{:?}", r.elapsed);
}

#[test]
fn scenario_helpers_snapshot_of_a_busy_ext4_is_frozen_and_clean() {
    skip_without_uml!();
    // The shape of the end-to-end scenario: an ext4 origin that a writer keeps changing, a snapshot taken under
    // it, which must stay byte-identical and pass fsck while the origin moves on.
    let scenario = r#"
make_vg vg0 /dev/ubda
make_lv vg0 src 32M
make_ext4_with_files /dev/vg0/src src 16
start_writer "$UML_DIR/src"
sleep 1
check lvcreate -q --yes -s -L 32M -n snap vg0/src
h1=$(hash_dev /dev/vg0/snap)
o1=$(hash_dev /dev/vg0/src)
sleep 1
h2=$(hash_dev /dev/vg0/snap)
o2=$(hash_dev /dev/vg0/src)
stop_writer
[ "$h1" = "$h2" ] || fail "the snapshot changed while the writer ran"
[ "$o1" != "$o2" ] || fail "the writer did not change the origin"
attr=$(lvs --noheadings -o lv_attr vg0/snap | tr -d ' ')
result snap_attr "$attr"
check e2fsck -n -f /dev/vg0/snap
mkdir -p "$UML_DIR/snapmnt"
check mount -t ext4 -o ro /dev/vg0/snap "$UML_DIR/snapmnt"
result files "$(ls "$UML_DIR/snapmnt" | grep -c '^file[0-9]*$')"
result rounds "$(wc -l < "$UML_DIR/src/writer.log")"
umount "$UML_DIR/snapmnt"
umount "$UML_DIR/src"
"#;
    let r = uml::run_guest(&[("disk0", 96 << 20)], scenario, Duration::from_secs(180));
    eprintln!("guest ran for {:?}", r.elapsed);
    r.assert_success();
    assert_eq!(r.result("files"), Some("16"), "{:?}", r.results);
    assert_eq!(r.result("snap_attr").map(|a| a.chars().nth(4)), Some(Some('a')), "{:?}", r.results);
    let rounds: u32 = r.result("rounds").unwrap().parse().unwrap();
    assert!(rounds >= 1, "the writer did not finish a round");
}

#[test]
fn two_guests_on_a_private_lan_reach_each_other() {
    skip_without_uml!();
    if !uml::is_root() {
        eprintln!("skipping: network namespaces need root (CI runs as root)");
        return;
    }
    let lan = uml::Lan::new("h4");
    // B configures its address and stays up until the host powers it off; A must reach it. (If both pinged and
    // then exited, the faster one could power off before the slower one had reached it.)
    let (a, b) = (uml::Uml::new("lan-a"), uml::Uml::new("lan-b"));
    let boot = |scenario: &str, tap: &str| {
        uml::Boot::new(scenario).netns(lan.name()).append(lan.tap(tap)).timeout(Duration::from_secs(120))
    };
    let mut gb = b.start(&boot("net_up vec0 10.77.0.2/24\necho LAN-READY\nsleep 600\n", "tapB"));
    let ga = a.start(&boot("net_up vec0 10.77.0.1/24\nwait_ping 10.77.0.2 90\nresult reached 10.77.0.2\n", "tapA"));
    let ra = ga.wait();
    assert!(gb.wait_for_console("LAN-READY", Duration::from_secs(10)), "{}", gb.console());
    gb.kill();
    let rb = gb.wait();
    ra.assert_success();
    assert_eq!(ra.result("reached"), Some("10.77.0.2"));
    assert_eq!(rb.status, 125, "B ran until it was powered off: {rb:?}");
}

/// The real operations; only compiled into a useful path when run inside the guest.
mod in_guest {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::path::Path;
    use std::process::Command;

    use lvmctl::{Lv, Lvm, LvmError, NameError, Shadow, SnapshotSize, Vg, NO_UDEV_CONFIG, SHADOW_TAG, SNAPSHOT_TAG};

    const MIB: u64 = 1 << 20;
    const VG: &str = "vg0";

    fn capture(name: &str, text: &str) {
        if let Some(dir) = std::env::var_os(super::CAPTURE) {
            std::fs::write(Path::new(&dir).join(name), text).unwrap();
            eprintln!("captured fixture {name}");
        }
    }

    fn names(lvm: &Lvm) -> Vec<String> {
        let mut v: Vec<String> = lvm.lvs(Some(VG)).unwrap().into_iter().map(|l| l.name).collect();
        v.sort();
        v
    }

    fn write_at(lv: &Lv, offset: u64, data: &[u8]) {
        let mut f = std::fs::OpenOptions::new().write(true).open(lv.path.as_ref().unwrap()).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }

    fn read_at(lv: &Lv, offset: u64, len: usize) -> Vec<u8> {
        let mut f = std::fs::File::open(lv.path.as_ref().unwrap()).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0; len];
        f.read_exact(&mut buf).unwrap();
        buf
    }

    /// Runs the tool directly, bypassing lvmctl's checks, to see what lvm itself says.
    fn raw_lvm(args: &[&str]) -> (bool, String) {
        let out = Command::new("/usr/sbin/lvm").args(args).env("LVM_SUPPRESS_FD_WARNINGS", "1").output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The handle, the fresh VG, and a 32 MiB origin LV `data`.
    fn setup() -> (Lvm, Vg, Lv) {
        let lvm = Lvm::new().unwrap().config(NO_UDEV_CONFIG);

        // A fresh VG on the 128 MiB disk image.
        let vg = lvm.vg(VG).unwrap();
        assert_eq!(vg.extent_size, 4 * MIB);
        assert_eq!(vg.free, vg.size);
        assert!(vg.size >= 120 * MIB && vg.size <= 128 * MIB, "{vg:?}");
        assert!(lvm.lvs(Some(VG)).unwrap().is_empty());

        // A plain LV to be the origin.
        let data = lvm.create_lv(VG, "data", 32 * MIB, &[]).unwrap();
        assert_eq!((data.size, data.origin.as_deref(), data.tags.len()), (32 * MIB, None, 0));
        assert!(data.path.as_ref().unwrap().exists(), "{data:?}");
        (lvm, vg, data)
    }

    pub fn snapshots() {
        let (lvm, vg, data) = setup();
        let before = vec![0xA5u8; MIB as usize];
        write_at(&data, 0, &before);

        // Snapshot by percent (20% of 32 MiB = 6.4 MiB -> 2 extents); it freezes the origin's content.
        let snap = lvm.create_snapshot(VG, "data", "data_snap", SnapshotSize::Percent(20)).unwrap();
        assert_eq!(snap.size, 8 * MIB);
        assert!(snap.is_snapshot());
        assert_eq!(snap.origin.as_deref(), Some("data"));
        assert_eq!(snap.tags, [SNAPSHOT_TAG]);
        let st = lvm.snapshot_status(VG, "data_snap").unwrap();
        assert!(!st.invalid && st.fill_percent < 1.0, "{st:?}");
        capture("vgs.json", &lvm.vgs_json(None).unwrap());
        capture("lvs_snapshot.json", &lvm.lvs_json(Some(VG), None).unwrap());
        assert_eq!(lvm.vg(VG).unwrap().free, vg.size - 40 * MIB);

        write_at(&data, 0, &vec![0x5Au8; MIB as usize]);
        assert_eq!(read_at(&snap, 0, MIB as usize), before, "the snapshot must keep the old content");
        assert_eq!(read_at(&data, 0, 1), [0x5A]);
        let st = lvm.snapshot_status(VG, "data_snap").unwrap();
        assert!(!st.invalid && st.fill_percent > 1.0 && st.fill_percent < 100.0, "{st:?}");

        // Device paths map to LVs; other block devices are refused.
        for p in ["/dev/vg0/data", "/dev/mapper/vg0-data", "/dev/vg0/data_snap"] {
            let found = lvm.lv_for_device(Path::new(p)).unwrap();
            assert_eq!(found.name, Path::new(p).file_name().unwrap().to_str().unwrap().trim_start_matches("vg0-"));
        }
        let e = lvm.lv_for_device(Path::new("/dev/ubda")).unwrap_err();
        assert!(matches!(&e, LvmError::NotAnLv { .. }), "{e:?}");
        assert!(e.to_string().contains("no active LV has its device number 98:0"), "{e}");

        // An origin with a snapshot is not removed (lvremove would take the snapshot with it).
        let e = lvm.remove_lv(VG, "data").unwrap_err();
        assert!(matches!(&e, LvmError::HasSnapshots { snapshots, .. } if snapshots == &["vg0/data_snap"]), "{e}");
        lvm.remove_lv(VG, "data_snap").unwrap();
        assert_eq!(names(&lvm), ["data"]);
        assert_eq!(lvm.vg(VG).unwrap().free, vg.size - 32 * MIB);

        // Snapshot by bytes (rounded up to one extent), then overflow it: the kernel invalidates it.
        let small = lvm.create_snapshot(VG, "data", "data_small", SnapshotSize::Bytes(3 * MIB)).unwrap();
        assert_eq!(small.size, 4 * MIB);
        write_at(&data, 0, &vec![0x3Cu8; 8 * MIB as usize]);
        let st = lvm.snapshot_status(VG, "data_small").unwrap();
        assert!(st.invalid, "{st:?}");
        assert_eq!(st.fill_percent, 100.0);
        capture("lvs_snapshot_invalid.json", &lvm.lvs_json(Some(VG), None).unwrap());
        lvm.remove_lv(VG, "data_small").unwrap();

        // Leftover snapshots: ours are removed, others are refused and stay.
        assert!(!lvm.remove_leftover_snapshot(VG, "data", "data_left").unwrap());
        lvm.create_snapshot(VG, "data", "data_left", SnapshotSize::Bytes(4 * MIB)).unwrap();
        assert!(lvm.remove_leftover_snapshot(VG, "data", "data_left").unwrap());
        let (ok, stderr) = raw_lvm(&["lvcreate", "--yes", "-s", "-L", "4m", "-n", "data_left", "vg0/data"]);
        assert!(ok, "{stderr}");
        let e = lvm.remove_leftover_snapshot(VG, "data", "data_left").unwrap_err();
        assert!(e.to_string().contains("is not a blockrep snapshot (no blockrep_snapshot tag)"), "{e}");
        // The origin itself (untagged) is never taken for a leftover.
        let e = lvm.remove_leftover_snapshot(VG, "data", "data").unwrap_err();
        assert!(e.to_string().contains("is not a blockrep snapshot"), "{e}");
        assert_eq!(names(&lvm), ["data", "data_left"]);
        lvm.remove_lv(VG, "data_left").unwrap();

        // Thin LVs: the report gives each its pool and device id.
        let (ok, stderr) = raw_lvm(&["lvcreate", "-q", "--yes", "-L", "16M", "-T", "vg0/tpool"]);
        assert!(ok, "{stderr}");
        let (ok, stderr) = raw_lvm(&["lvcreate", "-q", "--yes", "-V", "8M", "-T", "vg0/tpool", "-n", "thin1"]);
        assert!(ok, "{stderr}");
        lvm.create_thin_snapshot(VG, "thin1", "thin1_snap", &[SNAPSHOT_TAG]).unwrap();
        capture("lvs_thin.json", &lvm.lvs_json(Some(VG), None).unwrap());
        let t1 = lvm.thin_lv(VG, "thin1").unwrap().expect("thin1 is thin");
        let t2 = lvm.thin_lv(VG, "thin1_snap").unwrap().expect("its snapshot is thin");
        assert_eq!((t1.pool.as_str(), t2.pool.as_str()), ("tpool", "tpool"));
        assert!(t1.thin_id != t2.thin_id, "{t1:?} {t2:?}");
        assert_eq!(lvm.thin_lv(VG, "data").unwrap(), None, "a linear LV is not thin");
        assert_eq!(lvm.thin_lv(VG, "tpool").unwrap(), None, "nor is the pool");
        for lv in ["thin1_snap", "thin1", "tpool"] {
            let (ok, stderr) = raw_lvm(&["lvremove", "-q", "--yes", &format!("vg0/{lv}")]);
            assert!(ok, "{lv}: {stderr}");
        }

        // The report cache: what this handle changes is seen at once (each change empties it); a change made by
        // another process is not, until the cache is turned off.
        lvm.cache_reports(true);
        let before = names(&lvm);
        lvm.create_lv(VG, "cached_a", 4 * MIB, &[]).unwrap();
        assert!(lvm.find_lv(VG, "cached_a").unwrap().is_some(), "a created LV is seen");
        lvm.rename_lv(VG, "cached_a", "cached_b").unwrap();
        assert!(lvm.find_lv(VG, "cached_a").unwrap().is_none(), "a renamed LV is gone under its old name");
        assert!(lvm.lv(VG, "cached_b").is_ok());
        lvm.remove_lv(VG, "cached_b").unwrap();
        assert!(matches!(lvm.lv(VG, "cached_b"), Err(LvmError::LvNotFound { .. })), "a removed LV is gone");
        assert_eq!(names(&lvm), before);
        let (ok, stderr) = raw_lvm(&["lvcreate", "-q", "--yes", "-L", "4M", "-n", "elsewhere", "vg0"]);
        assert!(ok, "{stderr}");
        assert!(lvm.find_lv(VG, "elsewhere").unwrap().is_none(), "while on, another process's change is not seen");
        lvm.cache_reports(false);
        assert!(lvm.find_lv(VG, "elsewhere").unwrap().is_some());
        lvm.remove_lv(VG, "elsewhere").unwrap();

        // Clean up to nothing.
        for lv in names(&lvm) {
            lvm.remove_lv(VG, &lv).unwrap();
        }
        assert!(lvm.lvs(Some(VG)).unwrap().is_empty());
        assert_eq!(lvm.vg(VG).unwrap().free, vg.size);
    }

    pub fn volumes_and_errors() {
        let (lvm, vg, data) = setup();
        // A tagged shadow LV, renamed and tagged again.
        let shadow = lvm.create_lv(VG, "shadow_data", 32 * MIB, &[SHADOW_TAG, "blockrep_vol=data"]).unwrap();
        assert_eq!(shadow.size, data.size);
        assert!(shadow.has_tag(SHADOW_TAG) && shadow.has_tag("blockrep_vol=data"), "{shadow:?}");
        capture("lvs_tagged.json", &lvm.lvs_json(Some(VG), None).unwrap());
        lvm.rename_lv(VG, "shadow_data", "shadow_data2").unwrap();
        lvm.add_tag(VG, "shadow_data2", "gen_1").unwrap();
        let renamed = lvm.lv(VG, "shadow_data2").unwrap();
        assert!(renamed.has_tag(SHADOW_TAG) && renamed.has_tag("gen_1"), "{renamed:?}");
        assert_eq!(renamed.path.as_deref(), Some(Path::new("/dev/vg0/shadow_data2")));
        assert!(lvm.find_lv(VG, "shadow_data").unwrap().is_none());

        // Missing LV / VG: specific errors that carry lvm's stderr.
        let e = lvm.lv(VG, "shadow_data").unwrap_err();
        assert!(matches!(&e, LvmError::LvNotFound { .. }), "{e:?}");
        let stderr = e.stderr().unwrap();
        assert!(stderr.contains("Failed to find logical volume \"vg0/shadow_data\""), "{stderr}");
        assert!(e.to_string().contains("vg0/shadow_data does not exist") && e.to_string().contains("lvm said"), "{e}");
        capture("lvs_missing_lv.stderr", stderr);
        let e = lvm.remove_lv(VG, "nope").unwrap_err();
        assert!(matches!(&e, LvmError::LvNotFound { .. }), "{e:?}");
        let e = lvm.rename_lv(VG, "nope", "nope2").unwrap_err();
        assert!(matches!(&e, LvmError::LvNotFound { .. }), "{e:?}");
        capture("lvrename_missing_lv.stderr", e.stderr().unwrap());
        let e = lvm.vg("nosuch").unwrap_err();
        assert!(matches!(&e, LvmError::VgNotFound { .. }), "{e:?}");
        assert!(e.stderr().unwrap().contains("Volume group \"nosuch\" not found"), "{e:?}");
        capture("vgs_missing_vg.stderr", e.stderr().unwrap());
        let e = lvm.create_snapshot(VG, "nope", "nope_snap", SnapshotSize::default()).unwrap_err();
        assert!(matches!(&e, LvmError::LvNotFound { .. }), "{e:?}");
        let e = lvm.create_snapshot(VG, "data", "shadow_data2", SnapshotSize::default()).unwrap_err();
        assert!(matches!(&e, LvmError::LvExists { .. }), "{e:?}");
        let e = lvm.snapshot_status(VG, "data").unwrap_err();
        assert!(matches!(&e, LvmError::NotASnapshot { .. }), "{e:?}");

        // Not enough space: refused with the numbers, nothing created.
        let listed = names(&lvm);
        let free = lvm.vg(VG).unwrap().free;
        assert_eq!(free, vg.size - 64 * MIB);
        let e = lvm.create_snapshot(VG, "data", "big_snap", SnapshotSize::Bytes(free + 1)).unwrap_err();
        match &e {
            LvmError::InsufficientSpace { free: f, needed, .. } => assert_eq!((*f, *needed), (free, free + 4 * MIB)),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().starts_with(&format!("VG vg0 has {free} bytes free, the snapshot")), "{e}");
        let e = lvm.create_lv(VG, "big", free + 4 * MIB, &[SHADOW_TAG]).unwrap_err();
        assert!(matches!(e, LvmError::InsufficientSpace { .. }), "{e:?}");
        let e = lvm.create_lv(VG, "odd", 5 * MIB, &[SHADOW_TAG]).unwrap_err();
        assert!(matches!(e, LvmError::SizeNotExtentMultiple { .. }), "{e:?}");
        assert_eq!(names(&lvm), listed);
        // What lvm itself says when asked anyway.
        let big = format!("{}b", free + 4 * MIB);
        let (ok, stderr) = raw_lvm(&["lvcreate", "--yes", "-L", &big, "-n", "big", VG]);
        assert!(!ok && stderr.contains("insufficient free space"), "{stderr}");
        capture("lvcreate_no_space.stderr", &stderr);

        // Names: lvmctl refuses what lvm refuses, before running it; lvm agrees.
        // (Each lvm run costs a few hundred ms in the guest: lvm itself is asked about three of them.)
        for bad in ["bad name", "-x", "snapshot1", "pvmove_x", "x_tdata", "x_cdata", "x_rimage_0", ".."] {
            let e = lvm.create_lv(VG, bad, 4 * MIB, &[]).unwrap_err();
            assert!(matches!(e, LvmError::InvalidName(_)), "{bad}: {e:?}");
            if !matches!(bad, "bad name" | "snapshot1" | "x_tdata") {
                continue;
            }
            let (ok, stderr) = raw_lvm(&["lvcreate", "--yes", "-L", "4m", "-n", bad, VG]);
            assert!(!ok, "lvm accepted {bad:?}");
            if bad == "bad name" {
                capture("lvcreate_bad_name.stderr", &stderr);
            }
            if bad == "x_tdata" {
                capture("lvcreate_reserved_name.stderr", &stderr);
            }
        }
        let e = lvm.create_lv(VG, "ok", 4 * MIB, &["bad tag"]).unwrap_err();
        assert!(matches!(e, LvmError::InvalidName(NameError::BadChar { ch: ' ', .. })), "{e:?}");
        assert_eq!(names(&lvm), listed);
        // Names lvm accepts even though they look reserved-ish; lvmctl accepts them too.
        let odd = lvm.create_lv(VG, "a+b.c-d_snapshot", 4 * MIB, &[]).unwrap();
        lvm.remove_lv(VG, &odd.name).unwrap();

        // Shadows: created tagged, accepted when tagged and of the right size, else refused and left alone.
        let made = lvm.ensure_shadow(VG, "shadow_b", 8 * MIB).unwrap();
        assert!(matches!(&made, Shadow::Created(lv) if lv.has_tag(SHADOW_TAG) && lv.size == 8 * MIB), "{made:?}");
        let again = lvm.ensure_shadow(VG, "shadow_b", 8 * MIB).unwrap();
        assert!(matches!(&again, Shadow::Existing(lv) if lv.name == "shadow_b"), "{again:?}");
        let e = lvm.ensure_shadow(VG, "shadow_b", 12 * MIB).unwrap_err();
        assert!(
            matches!(e, LvmError::ShadowSizeMismatch { size, expected, .. } if size == 8 * MIB && expected == 12 * MIB)
        );
        let e = lvm.ensure_shadow(VG, "data", 32 * MIB).unwrap_err();
        assert!(e.to_string().contains("is not a blockrep shadow (no blockrep_shadow tag)"), "{e}");
        lvm.remove_lv(VG, "shadow_b").unwrap();

        // An inactive LV: lvm reports no device number.
        let (ok, stderr) = raw_lvm(&["lvchange", "-an", "vg0/shadow_data2"]);
        assert!(ok, "{stderr}");
        let inactive = lvm.lv(VG, "shadow_data2").unwrap();
        assert!(!inactive.is_active() && inactive.kernel_device.is_none(), "{inactive:?}");
        capture("lvs_inactive.json", &lvm.lvs_json(Some(VG), None).unwrap());

        // Clean up to nothing.
        for lv in names(&lvm) {
            lvm.remove_lv(VG, &lv).unwrap();
        }
        assert!(lvm.lvs(Some(VG)).unwrap().is_empty());
        assert_eq!(lvm.vg(VG).unwrap().free, vg.size);
    }
}
