//! Retained generations (`keep_generations`, issue 12) on real LVM inside User-Mode Linux: a primary and a standby
//! as two configurations in one guest (`blockrep serve` on the guest's 127.0.0.1), a shadow on a classic LV and
//! one on a thin LV. Four syncs with K = 3 keep exactly the two previous generations, each byte-identical to what
//! the primary had at that sync (hashed in the guest with sha256sum, independently of blockrep); a VG without room
//! for the snapshot refuses the sync before anything is written; `promote --generation` serves an older
//! generation (its ext4 mounts with that generation's files). Power cuts while a retained snapshot is created and
//! while one is removed leave the shadow at one complete generation and every listed copy complete.

use std::time::Duration;

use super::uml;

/// Key, the state disk, the two configurations (`p`: primary, `s`: standby with `keep_generations = KEEP`) and
/// `start_serve`.
fn setup(keep: u32, volumes: &[&str]) -> String {
    let mut p_vols = String::new();
    let mut s_vols = String::new();
    for v in volumes {
        p_vols += &format!("[[volume]]\nname = \"{v}\"\nsource = \"/dev/vg0/{v}\"\n");
        s_vols += &format!("[[volume]]\nname = \"{v}\"\nshadow = \"/dev/vg1/{v}\"\nkeep_generations = {keep}\n");
    }
    format!(
        r#"
W=$UML_DIR
state_fs
cat > $W/p.toml <<CONF
node = "p"
key_file = "$W/key"
state_dir = "/mnt/brstate/p"
[primary]
peer = "127.0.0.1:7711"
{p_vols}
CONF
cat > $W/s.toml <<CONF
node = "s"
key_file = "$W/key"
state_dir = "/mnt/brstate/s"
[standby]
listen = "127.0.0.1:7711"
{s_vols}
[role]
interface = "vips"
vip = "10.77.9.60/24"
[role.garp]
count = 1
interval_ms = 10
refresh_s = 0
[role.probe]
count = 1
interval_ms = 10
wait_ms = 20
CONF
P="--config $W/p.toml"
S="--config $W/s.toml"
start_serve() {{
  : > $W/serve.log
  serve_bg $W/serve.log $S
}}
# psync KEY [VOLUME...]: blockrep sync on the primary; exit status in KEY_rc, stderr in $W/KEY.err.
psync() {{
  _k=$1
  shift
  BLOCKREP_LOG=info $BR $P sync --json "$@" > $W/$_k.json 2> $W/$_k.err
  _rc=$?
  result ${{_k}}_rc $_rc
  return $_rc
}}
"#
    )
}

/// JSON objects recorded one per line, the lines joined with `|`.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.split('|')
        .filter(|s| !s.trim().is_empty())
        .map(|s| serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}")))
        .collect()
}

fn retained(v: &serde_json::Value) -> Vec<u64> {
    v["retained"].as_array().unwrap().iter().map(|r| r["generation"].as_u64().unwrap()).collect()
}

#[test]
fn retained_generations_on_classic_and_thin_lvs_are_exact_and_an_older_one_is_promoted() {
    if let Some(reason) = uml::unavailable() {
        eprintln!("skipping: {reason}");
        return;
    }
    let scenario = setup(3, &["cl", "th"])
        + r#"
check modprobe -d "$UML_MODS" dummy
check modprobe -d "$UML_MODS" dm-thin-pool
check ip link add vips type dummy
check ip link set vips up
make_vg vg0 /dev/ubda
make_vg vg1 /dev/ubdb
make_lv vg0 cl 16M
make_lv vg0 th 16M
make_lv vg1 cl 16M
check lvcreate -q --yes -L 40M -T vg1/pool
check lvcreate -q --yes -V 16M -T vg1/pool -n th
check dd if=/dev/urandom of=/dev/vg0/cl bs=1M count=16 oflag=direct status=none
check mkfs.ext4 -q -F /dev/vg0/th
mkdir -p $W/th $W/thp
start_serve
# Four syncs; before each, a file named after the generation on th's ext4 and 16 KiB of new data on cl.
g=1
while [ $g -le 4 ]; do
  check mount /dev/vg0/th $W/th
  echo "generation $g" > $W/th/gen$g
  check umount $W/th
  check dd if=/dev/urandom of=/dev/vg0/cl bs=4K seek=$((g * 100)) count=4 conv=notrunc oflag=direct status=none
  psync sync$g || fail "sync $g: $(tail -n 5 $W/sync$g.err)"
  result cl_$g "$(hash_dev /dev/vg0/cl)"
  result th_$g "$(hash_dev /dev/vg0/th)"
  g=$((g + 1))
done
result shadows_4 "$(hash_dev /dev/vg1/cl) $(hash_dev /dev/vg1/th)"
$BR $S generations --json > $W/gens.json || fail "generations: $(cat $W/gens.json)"
result gens "$(tr '\n' '|' < $W/gens.json)"
for v in cl th; do
  for g in 1 2 3; do
    if [ -e /dev/vg1/${v}_gen$g ]; then result copy_${v}_$g "$(hash_dev /dev/vg1/${v}_gen$g)"; fi
  done
done
result gen_lvs "$(lvs --noheadings -o lv_name vg1 | grep -c _gen)"
result gen_tags "$(lvs --noheadings -o lv_tags vg1/cl_gen3 | tr -d ' ')"
result gen_types "$(lvs --noheadings -o lv_attr vg1/cl_gen3 | cut -c3) $(lvs --noheadings -o segtype vg1/th_gen3 | tr -d ' ')"
result status_retained "$($BR $S status | grep -c 'retained generation')"

# No room in vg1 for cl's next snapshot: the sync is refused before anything is written.
check lvcreate -q --yes -l 100%FREE -n filler vg1
check dd if=/dev/urandom of=/dev/vg0/cl bs=4K seek=777 count=4 conv=notrunc oflag=direct status=none
psync nospace cl
result nospace_msg "$(grep -c 'no room to keep generation 4' $W/nospace.err)"
result nospace_err "$(tail -n 3 $W/nospace.err | tr '\n' ' ')"
result cl_after_nospace "$(hash_dev /dev/vg1/cl)"
result gen_lvs_after_nospace "$(lvs --noheadings -o lv_name vg1 | grep -c _gen)"
check lvremove -q -y vg1/filler
psync sync5 cl || fail "sync after freeing space: $(tail -n 5 $W/sync5.err)"
result cl_5 "$(hash_dev /dev/vg0/cl)"
result shadow_cl_5 "$(hash_dev /dev/vg1/cl)"

# The shadow written outside blockrep (12 MiB, more than the copies' stores hold): cl's classic copies overflow;
# the next sync drops them with an alarm (never the shadow), keeps what the shadow held marked untrusted, and
# repairs the shadow; the sync after it keeps a trusted copy again.
check dd if=/dev/urandom of=/dev/vg1/cl bs=1M count=12 oflag=direct status=none
$BR $S generations --json cl > $W/ovf.json || fail "generations: $(cat $W/ovf.json)"
result ovf_gens "$(cat $W/ovf.json)"
psync sync6 cl || fail "sync 6: $(tail -n 5 $W/sync6.err)"
result sync6 "$(cat $W/sync6.json)"
result dropped_alarm "$($BR $S status --json | grep -o '"kind":"retained_dropped","volume":"cl"' | wc -l)"
result cl_6 "$(hash_dev /dev/vg0/cl)"
psync sync7 cl || fail "sync 7: $(tail -n 5 $W/sync7.err)"
result shadow_cl_7 "$(hash_dev /dev/vg1/cl)"
$BR $S generations --json cl > $W/g7.json || fail "generations: $(cat $W/g7.json)"
result gens7 "$(cat $W/g7.json)"
result alarm_after_7 "$($BR $S status --json | grep -o '"kind":"retained_dropped","volume":"cl"' | wc -l)"

# Promote older generations (serve stopped, as when the primary died). A copy kept from the untrusted shadow is
# refused (exit 4) and nothing changes; then cl's 6 (of 7) and th's 2 (of 4).
kill $SERVE
wait $SERVE
$BR $S promote --generation cl=5 --generation th=2 --reason "bad upgrade on p" > /dev/null 2> $W/refused.err
result refused_rc $?
result refused_msg "$(grep -c 'not trusted when it was kept' $W/refused.err)"
result after_refused "$(hash_dev /dev/vg1/cl) $(hash_dev /dev/vg1/th)"
BLOCKREP_LOG=info $BR $S promote --generation cl=6 --generation th=2 --reason "bad upgrade on p" --json > $W/promote.json 2> $W/promote.err
result promote_rc $?
result promote_err "$(tail -n 3 $W/promote.err | tr '\n' ' ')"
result cl_promoted "$(hash_dev /dev/vg1/cl)"
result th_promoted "$(hash_dev /dev/vg1/th)"
check mount -o ro /dev/vg1/th $W/thp
result th_files "$(ls $W/thp | grep gen | tr '\n' ' ')"
check umount $W/thp
result role "$($BR $S status --json | grep -o '"role":"[a-z]*"' | head -n 1 | cut -d'"' -f4)"
result log "$($BR $S log | grep -c 'rollback')"
"#;
    let boot = uml::Boot::new(scenario)
        .disk("vg0", 48 << 20)
        .disk("vg1", 128 << 20)
        .disk("state", 32 << 20)
        .env("BR", env!("CARGO_BIN_EXE_blockrep"))
        .timeout(Duration::from_secs(240));
    let u = uml::Uml::new("retain");
    let r = u.run(&boot);
    eprintln!("guest ran for {:?}", r.elapsed);
    for (k, v) in &r.results {
        eprintln!("{k} = {v}");
    }
    r.assert_success();
    let res = |k: &str| r.result(k).unwrap_or_else(|| panic!("no result {k}: {:?}", r.results)).to_owned();
    for g in 1..=4 {
        assert_eq!(res(&format!("sync{g}_rc")), "0");
    }
    assert_eq!(res("shadows_4"), format!("{} {}", res("cl_4"), res("th_4")));
    // K = 3: generations 2 and 3 of each volume kept, 1 removed, each byte-identical to that sync's source.
    let gens = json_lines(&res("gens"));
    for (v, backend) in [("cl", "classic"), ("th", "thin")] {
        let g = gens.iter().find(|g| g["volume"] == v).unwrap_or_else(|| panic!("no {v} in {gens:?}"));
        assert_eq!(g["backend"], backend, "{g}");
        assert_eq!(g["current"]["generation"], 4, "{g}");
        assert_eq!(retained(g), [3, 2], "{g}");
        for r in g["retained"].as_array().unwrap() {
            assert_eq!((r["complete"].as_bool(), r["promotable"].as_bool()), (Some(true), Some(true)), "{r}");
        }
        for n in 2..=3 {
            assert_eq!(res(&format!("copy_{v}_{n}")), res(&format!("{v}_{n}")), "{v}: the copy of generation {n}");
        }
        assert!(r.result(&format!("copy_{v}_1")).is_none(), "{v}: generation 1 was not removed");
    }
    assert_eq!(res("gen_lvs"), "4");
    assert_eq!(res("gen_tags"), "blockrep_retained");
    assert_eq!(res("gen_types"), "s thin", "a classic snapshot of cl, a thin snapshot of th");
    assert_eq!(res("status_retained"), "4");
    // No room: refused with the numbers, the shadow and the copies unchanged; then it goes through.
    assert_ne!(res("nospace_rc"), "0");
    assert_eq!(res("nospace_msg"), "1", "{}", res("nospace_err"));
    assert_eq!(res("cl_after_nospace"), res("cl_4"), "the shadow was written although the sync was refused");
    assert_eq!(res("gen_lvs_after_nospace"), "4");
    assert_eq!(res("shadow_cl_5"), res("cl_5"));
    // Overflowed classic copies: listed as lost, dropped by the next sync with the alarm; the copy made from the
    // written shadow is kept but marked untrusted (not promotable); the shadow is repaired.
    let ovf = json_lines(&res("ovf_gens"));
    for c in ovf[0]["retained"].as_array().unwrap() {
        assert_eq!(c["complete"], false, "{c}");
        assert!(c["problem"].as_str().unwrap().contains("overflowed"), "{c}");
    }
    let s6 = json_lines(&res("sync6"));
    assert_eq!(s6[0]["mode"], "compare", "{s6:?}");
    assert_eq!(res("dropped_alarm"), "1");
    assert_eq!(res("alarm_after_7"), "0", "cleared once the standby holds two earlier generations again");
    assert_eq!(res("shadow_cl_7"), res("cl_6"));
    let g7 = &json_lines(&res("gens7"))[0];
    assert_eq!(retained(g7), [6, 5], "{g7}");
    assert_eq!(g7["retained"][0]["promotable"], true, "{g7}");
    assert_eq!(g7["retained"][1]["promotable"], false, "{g7}");
    assert!(g7["retained"][1]["untrusted"].as_str().is_some_and(|u| !u.is_empty()), "{g7}");
    // promote --generation of the untrusted copy: refused (exit 4), nothing rolled back.
    assert_eq!(res("refused_rc"), "4");
    assert_eq!(res("refused_msg"), "1");
    assert_eq!(res("after_refused"), format!("{} {}", res("cl_6"), res("th_4")));
    // promote --generation: each shadow holds the chosen older generation; th's ext4 has that generation's files.
    assert_eq!(res("promote_rc"), "0", "{}", res("promote_err"));
    assert_eq!(res("cl_promoted"), res("cl_6"));
    assert_eq!(res("th_promoted"), res("th_2"));
    assert_eq!(res("th_files").split_whitespace().collect::<Vec<_>>(), ["gen1", "gen2"]);
    assert_eq!(res("role"), "primary");
    assert_eq!(res("log"), "2", "both rollbacks are in blockrep log");
}

/// Phase 1 of a power cut: generations 1 and 2 of cl (K = 2, one copy kept), then a third sync whose lvm calls
/// for the retained copy pause 2 s (an `lvm` wrapper bound over the real one, announcing itself on the console),
/// so that the host can cut the power while lvm makes or removes the copy.
fn cut_phase1() -> String {
    setup(2, &["cl"])
        + r#"
make_vg vg0 /dev/ubda
make_vg vg1 /dev/ubdb
make_lv vg0 cl 16M
make_lv vg1 cl 16M
check dd if=/dev/urandom of=/dev/vg0/cl bs=1M count=16 oflag=direct status=none
start_serve
psync s1 || fail "sync 1: $(tail -n 5 $W/s1.err)"
result h1 "$(hash_dev /dev/vg0/cl)"
check dd if=/dev/urandom of=/dev/vg0/cl bs=64K seek=10 count=8 conv=notrunc oflag=direct status=none
psync s2 || fail "sync 2: $(tail -n 5 $W/s2.err)"
result h2 "$(hash_dev /dev/vg0/cl)"
LVM=$(command -v lvm)
# lvm reads its command from argv[0] unless that is "lvm": the copy keeps the name.
mkdir -p $W/real
check cp "$LVM" $W/real/lvm
cat > $W/lvm.wrap <<WRAP
#!/bin/sh
case "\$*" in
  *lvcreate*cl_gen2*) echo RETAIN_CREATE > /dev/console; sleep 2 ;;
  *lvremove*cl_gen1*) echo RETAIN_REMOVE > /dev/console; sleep 2 ;;
esac
exec $W/real/lvm "\$@"
WRAP
chmod +x $W/lvm.wrap
check mount --bind $W/lvm.wrap "$LVM"
check dd if=/dev/urandom of=/dev/vg0/cl bs=64K seek=100 count=8 conv=notrunc oflag=direct status=none
sync
result h3 "$(hash_dev /dev/vg0/cl)"
echo SYNC3_STARTED
psync s3
result s3_err "$(tail -n 4 $W/s3.err | tr '\n' ' ')"
echo SYNC3_FINISHED
sleep 600
"#
}

/// Phase 2: after the cut, the shadow is one complete generation and every listed copy is complete and exact;
/// the next sync completes and leaves exactly one copy.
fn cut_phase2() -> String {
    setup(2, &["cl"])
        + r#"
check vgchange -q -ay vg0 vg1
$BR verify --json --local /dev/vg1/cl --state-dir /mnt/brstate/s --name cl > $W/v.json
result verify "$(cat $W/v.json)"
result shadow_hash "$(hash_dev /dev/vg1/cl)"
$BR $S generations --json > $W/g.json || fail "generations: $(cat $W/g.json)"
result gens "$(cat $W/g.json)"
for g in 1 2; do
  if [ -e /dev/vg1/cl_gen$g ]; then result copy_$g "$(hash_dev /dev/vg1/cl_gen$g)"; fi
done
start_serve
psync after || fail "sync after the cut: $(tail -n 5 $W/after.err)"
result final_hash "$(hash_dev /dev/vg1/cl)"
$BR $S generations --json > $W/g2.json || fail "generations: $(cat $W/g2.json)"
result gens_after "$(cat $W/g2.json)"
result gen_lvs_after "$(lvs --noheadings -o lv_name vg1 | grep -c cl_gen)"
for g in 2 3; do
  if [ -e /dev/vg1/cl_gen$g ]; then result copy_${g}_after "$(hash_dev /dev/vg1/cl_gen$g)"; fi
done
"#
}

#[test]
fn power_cuts_while_a_retained_snapshot_is_made_or_removed_leave_complete_copies() {
    if let Some(reason) = uml::unavailable() {
        eprintln!("skipping: {reason}");
        return;
    }
    let disks = |b: uml::Boot| {
        b.disk("vg0", 32 << 20)
            .disk("vg1", 96 << 20)
            .disk("state", 32 << 20)
            .env("BR", env!("CARGO_BIN_EXE_blockrep"))
            .timeout(Duration::from_secs(180))
    };
    // Cut 0.3 s into the real lvcreate of generation 2's copy, and 0.3 s into the real lvremove of generation 1's.
    for marker in ["RETAIN_CREATE", "RETAIN_REMOVE"] {
        let u = uml::Uml::new(&format!("retaincut-{}", marker.to_lowercase()));
        let mut g = u.start(&disks(uml::Boot::new(cut_phase1())));
        if !g.wait_for_console(marker, Duration::from_secs(150)) {
            g.kill();
            let r = g.wait();
            panic!("{marker} never shown: {:?}\n{}", r.results, r.console_tail(40));
        }
        std::thread::sleep(Duration::from_millis(2300));
        g.kill();
        let cut = g.wait();
        let h = |k: &str| cut.result(k).unwrap_or_else(|| panic!("{marker}: no {k}: {:?}", cut.results)).to_owned();
        let (h1, h2, h3) = (h("h1"), h("h2"), h("h3"));
        if marker == "RETAIN_CREATE" {
            // The copy is made before the commit; the oldest is removed after the sync answered (serve prunes in
            // the background), so only the create cut must land before the sync ends.
            assert!(cut.result("s3_rc").is_none(), "{marker}: the third sync ended before the cut");
        }
        let r = u.run(&disks(uml::Boot::new(cut_phase2())));
        for (k, v) in &r.results {
            eprintln!("{marker}: {k} = {v}");
        }
        r.assert_success();
        let res = |k: &str| r.result(k).unwrap_or_else(|| panic!("{marker}: no {k}: {:?}", r.results)).to_owned();
        let v: serde_json::Value = serde_json::from_str(&res("verify")).unwrap();
        assert_eq!(v["ok"], true, "{marker}: the shadow is not its committed generation: {v}");
        let shadow = res("shadow_hash");
        match v["generation"].as_u64() {
            Some(2) => assert_eq!(shadow, h2, "{marker}: generation 2 with other content"),
            Some(3) => assert_eq!(shadow, h3, "{marker}: generation 3 with other content"),
            g => panic!("{marker}: unexpected generation {g:?}"),
        }
        // Every copy listed is complete and holds exactly its generation (an unlisted leftover is incomplete and
        // is removed by the next sync).
        let gens: serde_json::Value = serde_json::from_str(&res("gens")).unwrap();
        for c in gens["retained"].as_array().unwrap() {
            let n = c["generation"].as_u64().unwrap();
            assert_eq!(c["complete"], true, "{marker}: {c}");
            let want = [&h1, &h2][n as usize - 1];
            assert_eq!(
                &res(&format!("copy_{n}")),
                want,
                "{marker}: listed copy of generation {n} is not that generation"
            );
        }
        eprintln!("{marker}: cut left generation {} and copies {:?}", v["generation"], retained(&gens));
        // The next sync completes and keeps exactly the generation it overwrote, exact.
        assert_eq!(res("final_hash"), h3, "{marker}");
        let was = v["generation"].as_u64().unwrap();
        let after: serde_json::Value = serde_json::from_str(&res("gens_after")).unwrap();
        assert_eq!(retained(&after), [was], "{marker}: {after}");
        assert_eq!(res("gen_lvs_after"), "1", "{marker}: a leftover copy stayed");
        assert_eq!(res(&format!("copy_{was}_after")), shadow, "{marker}");
    }
}

/// Measurement, not a test (`cargo test -p blockrep --test integration keep2_thin -- --ignored --nocapture`):
/// incremental syncs (1 % of a 256 MiB volume in scattered 4 KiB writes) into a thin shadow with
/// `keep_generations = 2` against one with 1, in the same guest, interleaved; prints each time and the medians.
#[test]
#[ignore]
fn keep2_thin_incremental_time_against_keep1() {
    if let Some(reason) = uml::unavailable() {
        eprintln!("skipping: {reason}");
        return;
    }
    let scenario = r#"
W=$UML_DIR
check modprobe -d "$UML_MODS" dm-thin-pool
state_fs
make_vg vg0 /dev/ubda
make_vg vg1 /dev/ubdb
make_lv vg0 k1 256M
make_lv vg0 k2 256M
check lvcreate -q --yes -L 900M -T vg1/pool
check lvcreate -q --yes -V 256M -T vg1/pool -n k1
check lvcreate -q --yes -V 256M -T vg1/pool -n k2
seed_same 256 /dev/vg0/k1 /dev/vg0/k2
cat > $W/p.toml <<CONF
node = "p"
key_file = "$W/key"
state_dir = "/mnt/brstate/p"
[primary]
peer = "127.0.0.1:7711"
[[volume]]
name = "k1"
source = "/dev/vg0/k1"
[[volume]]
name = "k2"
source = "/dev/vg0/k2"
CONF
cat > $W/s.toml <<CONF
node = "s"
key_file = "$W/key"
state_dir = "/mnt/brstate/s"
[standby]
listen = "127.0.0.1:7711"
[[volume]]
name = "k1"
shadow = "/dev/vg1/k1"
[[volume]]
name = "k2"
shadow = "/dev/vg1/k2"
keep_generations = 2
CONF
serve_bg $W/serve.log --config $W/s.toml
check $BR --config $W/p.toml sync > /dev/null 2>&1
check $BR --config $W/p.toml sync > /dev/null 2>&1
# t VOLUME: seconds of one sync of VOLUME
t() {
  _s=$(date +%s.%N)
  check $BR --config $W/p.toml sync $1 > /dev/null 2>> $W/sync.err
  echo "$(date +%s.%N) $_s" | awk '{printf "%.3f", $1 - $2}'
}
r=1
while [ $r -le 7 ]; do
  i=0
  while [ $i -lt 655 ]; do
    b=$(( (i * 9973 + r * 131) % 65536 ))
    dd if=/dev/urandom of=$W/blk bs=4K count=1 status=none
    dd if=$W/blk of=/dev/vg0/k1 bs=4K seek=$b count=1 conv=notrunc status=none
    dd if=$W/blk of=/dev/vg0/k2 bs=4K seek=$b count=1 conv=notrunc status=none
    i=$((i + 1))
  done
  sync
  if [ $((r % 2)) -eq 0 ]; then a=$(t k1); b=$(t k2); else b=$(t k2); a=$(t k1); fi
  result round_$r "$a $b"
  r=$((r + 1))
done
result lvs "$(lvs --noheadings -o lv_name vg1 | tr -s ' \n' ' ')"
"#;
    let boot = uml::Boot::new(scenario)
        .disk("vg0", 560 << 20)
        .disk("vg1", 1000 << 20)
        .disk("state", 64 << 20)
        .env("BR", env!("CARGO_BIN_EXE_blockrep"))
        .timeout(Duration::from_secs(900));
    let r = uml::Uml::new("retainbench").run(&boot);
    r.assert_success();
    let mut k1 = Vec::new();
    let mut k2 = Vec::new();
    for n in 1..=7 {
        let v = r.result(&format!("round_{n}")).unwrap().to_owned();
        let (a, b) = v.split_once(' ').unwrap();
        eprintln!("round {n}: keep 1 {a} s, keep 2 {b} s");
        k1.push(a.parse::<f64>().unwrap());
        k2.push(b.parse::<f64>().unwrap());
    }
    k1.sort_by(f64::total_cmp);
    k2.sort_by(f64::total_cmp);
    eprintln!(
        "median keep 1 {:.3} s, keep 2 {:.3} s, ratio {:.2}; LVs: {}",
        k1[3],
        k2[3],
        k2[3] / k1[3],
        r.result("lvs").unwrap()
    );
}
