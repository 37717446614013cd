//! `blockrep sync --local`, `verify --local` and `demo`, as a user runs them.

use super::*;

fn sync_json(src: &Path, dst: &Path, state: &Path) -> serde_json::Value {
    let o = run(blockrep().args(["sync", "--json", "--state-dir"]).arg(state).arg("--local").arg(src).arg(dst));
    assert!(o.status.success(), "sync failed: {}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).expect("one JSON object")
}

#[test]
fn full_then_incremental_sync_makes_identical_shadow_and_ships_only_changes() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst, state) = (d.path().join("src.img"), d.path().join("dst.img"), d.path().join("state"));
    let size = 8 * 1024 * 1024 + 12345; // not a multiple of the block size
    write_volume(&src, size, 7);
    std::fs::write(&dst, vec![0xffu8; size]).unwrap();

    let first = sync_json(&src, &dst, &state);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    for k in ["volume", "generation", "bytes_scanned", "blocks_changed", "bytes_changed", "bytes_sent", "duration_s"] {
        assert!(first.get(k).is_some(), "missing {k} in {first}");
    }
    assert_eq!(first["generation"], 1);
    assert_eq!(first["bytes_scanned"], size as u64);

    // 20 scattered 4 KiB blocks change: the second sync sends about 20 × 4 KiB, not whole 64 KiB blocks.
    let changed: Vec<u64> = (0..20).map(|i| i * 97 + 3).collect();
    scribble(&src, &changed, 3);
    let second = sync_json(&src, &dst, &state);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert_eq!(second["generation"], 2);
    assert_eq!(second["mode"], "incremental");
    let sent = second["bytes_sent"].as_u64().unwrap();
    assert!((20 * 4096..=22 * 4096).contains(&sent), "sent {sent} bytes for 20 changed 4 KiB blocks");

    // Nothing changed: nothing sent, generation still advances.
    let third = sync_json(&src, &dst, &state);
    assert_eq!(third["bytes_sent"], 0);
    assert_eq!(third["generation"], 3);

    let o = run(blockrep()
        .args(["verify", "--state-dir"])
        .arg(&state)
        .arg("--local")
        .arg(&dst)
        .arg("--name")
        .arg("src.img"));
    assert!(o.status.success(), "verify: {}", stderr(&o));
}

#[test]
fn the_default_block_size_is_32k_for_a_new_volume_and_an_existing_manifest_keeps_its_own() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    // Two 4 KiB writes 32 KiB apart: two blocks of 32 KiB, one of 64 KiB.
    let two_writes = |src: &Path| scribble(src, &[0, 8], 5);
    let (src, dst) = (d.path().join("new"), d.path().join("new.shadow"));
    write_volume(&src, 4 << 20, 1);
    std::fs::write(&dst, vec![0u8; 4 << 20]).unwrap();
    sync_json(&src, &dst, &state);
    two_writes(&src);
    let r = sync_json(&src, &dst, &state);
    assert_eq!((r["mode"].as_str(), r["blocks_changed"].as_u64()), (Some("incremental"), Some(2)), "{r}");
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());

    // A volume first synced with 64 KiB blocks (as before `auto`) stays incremental in 64 KiB blocks.
    let (src, dst) = (d.path().join("old"), d.path().join("old.shadow"));
    write_volume(&src, 4 << 20, 2);
    std::fs::write(&dst, vec![0u8; 4 << 20]).unwrap();
    let o = run(blockrep()
        .args(["sync", "--json", "--block-size", "64K", "--state-dir"])
        .arg(&state)
        .arg("--local")
        .arg(&src)
        .arg(&dst));
    assert!(o.status.success(), "{}", stderr(&o));
    two_writes(&src);
    let r = sync_json(&src, &dst, &state);
    assert_eq!((r["mode"].as_str(), r["blocks_changed"].as_u64()), (Some("incremental"), Some(1)), "{r}");
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
}

#[test]
fn lost_source_manifest_falls_back_to_comparing_with_the_target() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst, state) = (d.path().join("v"), d.path().join("s"), d.path().join("state"));
    write_volume(&src, 4 << 20, 11);
    std::fs::write(&dst, vec![0u8; 4 << 20]).unwrap();
    sync_json(&src, &dst, &state);
    scribble(&src, &[5, 500], 9);
    std::fs::remove_file(state.join("primary/v/manifest")).unwrap();
    let r = sync_json(&src, &dst, &state);
    assert_eq!(r["mode"], "compare");
    assert!(r["bytes_sent"].as_u64().unwrap() <= 2 * 4096, "{r}");
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
}

#[test]
fn smaller_target_is_refused_naming_both_sizes_and_left_untouched() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("big"), d.path().join("small"));
    write_volume(&src, 2 << 20, 1);
    std::fs::write(&dst, vec![0x11u8; 1 << 20]).unwrap();
    let o = run(blockrep().args(["sync", "--state-dir"]).arg(d.path().join("st")).arg("--local").arg(&src).arg(&dst));
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains(&(2u64 << 20).to_string()) && e.contains(&(1u64 << 20).to_string()), "{e}");
    assert_eq!(std::fs::read(&dst).unwrap(), vec![0x11u8; 1 << 20]);
}

#[test]
fn bad_paths_are_named() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_volume(&src, 1 << 20, 2);
    let missing = d.path().join("no-such-volume");
    let o =
        run(blockrep().args(["sync", "--state-dir"]).arg(d.path().join("st")).arg("--local").arg(&missing).arg(&src));
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("no-such-volume"), "{}", stderr(&o));
    let o = run(blockrep().args(["sync", "--state-dir"]).arg(d.path().join("st")).arg("--local").arg(&src).arg(&src));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("same volume"), "{}", stderr(&o));
    let o = run(blockrep().args(["sync", "--block-size", "3000", "--local"]).arg(&src).arg(&missing));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("power of two"), "{}", stderr(&o));
}

#[test]
fn demo_runs_and_verifies() {
    let o = run(blockrep().args(["demo", "--size", "16M"]));
    assert!(o.status.success(), "demo failed: {}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("identical"), "{out}");
    assert!(out.contains("incremental sync"), "{out}");
}

#[test]
fn verify_of_an_unknown_name_fails_and_creates_no_state() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst, state) = (d.path().join("src.img"), d.path().join("dst.img"), d.path().join("state"));
    write_volume(&src, 1 << 20, 4);
    std::fs::write(&dst, vec![0u8; 1 << 20]).unwrap();
    sync_json(&src, &dst, &state);
    let o =
        run(blockrep().args(["verify", "--state-dir"]).arg(&state).arg("--local").arg(&dst).args(["--name", "nosuch"]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("nosuch") && stderr(&o).contains("--name"), "{}", stderr(&o));
    assert!(!state.join("standby/nosuch").exists(), "verify created a state directory for an unknown name");
    // A state directory that does not exist at all is not created either.
    let none = d.path().join("none");
    let o = run(blockrep().args(["verify", "--state-dir"]).arg(&none).arg("--local").arg(&dst));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!none.exists(), "verify created {}", none.display());
}
