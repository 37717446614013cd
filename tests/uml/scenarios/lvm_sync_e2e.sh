# Scenario for issue 4, item 5 (end-to-end on real LVM, one guest). DRAFT: written before `blockrep sync/serve`
# with the lvm snapshot driver existed, so it has not run yet; the LVM/ext4/writer/hash parts are the ones
# tested in lvmctl/tests/uml.rs (scenario_helpers_...). Wire it up from tests/integration with:
#
#   let scenario = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/uml/scenarios/lvm_sync_e2e.sh"))?;
#   let boot = uml::Boot::new(scenario).disk("src", 128 << 20).disk("dst", 96 << 20)
#       .env("BLOCKREP", env!("CARGO_BIN_EXE_blockrep")).timeout(Duration::from_secs(300));
#   let r = uml::Uml::new("e2e").run(&boot); r.assert_success();
#   // then assert on r.result("first_sync_bytes"), r.result("second_sync_bytes"), ...
#
# Layout: source VG vg0 on /dev/ubda (LV data, ext4, a writer keeps changing it during the first sync), shadow
# VG vg1 on /dev/ubdb (LV data_shadow); `blockrep serve` listens on 127.0.0.1 inside the guest.
: "${BLOCKREP:?set BLOCKREP to the host path of the blockrep binary}"

make_vg vg0 /dev/ubda
make_vg vg1 /dev/ubdb
make_lv vg0 data 48M
make_ext4_with_files /dev/vg0/data src 32

check "$BLOCKREP" keygen "$UML_DIR/key"
mkdir -p "$UML_DIR/state-primary" "$UML_DIR/state-standby"
cat > "$UML_DIR/primary.toml" <<CONF
node = "primary"
key_file = "$UML_DIR/key"
state_dir = "$UML_DIR/state-primary"
[primary]
peer = "127.0.0.1:7788"
[[volume]]
name = "data"
source = "/dev/vg0/data"
snapshot = "lvm"
snapshot_size = "50%"
CONF
cat > "$UML_DIR/standby.toml" <<CONF
node = "standby"
key_file = "$UML_DIR/key"
state_dir = "$UML_DIR/state-standby"
[standby]
listen = "127.0.0.1:7788"
[[volume]]
name = "data"
shadow = "/dev/vg1/data_shadow"
CONF

check "$BLOCKREP" shadow create --config "$UML_DIR/standby.toml" --size 48M data
"$BLOCKREP" serve --config "$UML_DIR/standby.toml" --announce > "$UML_DIR/serve.out" 2>&1 &
serve_pid=$!
i=0
until grep -q 'listening on' "$UML_DIR/serve.out"; do
  i=$((i + 1))
  [ $i -lt 100 ] || fail "blockrep serve did not start: $(cat "$UML_DIR/serve.out")"
  sleep 0.1
done

# First (full) sync while a writer changes the source: the shadow must be one consistent generation.
start_writer "$UML_DIR/src"
sleep 1
check "$BLOCKREP" sync --config "$UML_DIR/primary.toml"
stop_writer
lvs --noheadings -o lv_name vg0 | grep -q blockrep_snap && fail "the sync left its snapshot behind"
check e2fsck -n -f /dev/vg1/data_shadow
mkdir -p "$UML_DIR/shadow"
check mount -t ext4 -o ro /dev/vg1/data_shadow "$UML_DIR/shadow"
result first_sync_files "$(ls "$UML_DIR/shadow" | grep -c '^file[0-9]*$')"
umount "$UML_DIR/shadow"

# Quiesced: change a few files, sync again; the shadow must then equal the source byte for byte.
for f in 1 7 19; do head -c 65536 /dev/urandom > "$UML_DIR/src/file$f"; done
check umount "$UML_DIR/src"
check "$BLOCKREP" sync --config "$UML_DIR/primary.toml"
[ "$(hash_dev /dev/vg0/data)" = "$(hash_dev /dev/vg1/data_shadow)" ] || fail "shadow differs from the quiesced source"
result quiesced_identical yes

kill "$serve_pid"
wait "$serve_pid" 2>/dev/null
true
