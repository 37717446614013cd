//! Trust in the shadow (issue 11): a shadow written outside blockrep is never left silently different from its
//! source after the next sync, locally and over the network, with `serve` running or stopped; `serve` holds its
//! shadows; a failed verify marks the shadow untrusted and the next sync repairs it; a split brain is refused with
//! both histories until the standby's changes are discarded explicitly.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;

use super::network::Pair;
use super::*;

/// Writes `data` at `offset` of `path` as an outside program would (no blockrep involved).
fn poke(path: &Path, offset: u64, data: &[u8]) {
    std::thread::sleep(std::time::Duration::from_millis(5)); // a distinct mtime even on a coarse clock
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(data, offset).unwrap();
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", stderr(o));
    serde_json::from_str(stdout(o).trim()).expect("one JSON object")
}

fn local_sync(src: &Path, dst: &Path, state: &Path, extra: &[&str]) -> std::process::Output {
    run(blockrep().args(["sync", "--json", "--state-dir"]).arg(state).args(extra).arg("--local").arg(src).arg(dst))
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// The case: full sync, 15 bytes written to the shadow outside blockrep, 8 bytes changed on the source,
/// `blockrep sync --local src dst`: the shadow is byte-identical to the source (it was not before), the sync says
/// it compared and why; the one after it is incremental again.
#[test]
fn a_shadow_written_outside_blockrep_is_repaired_by_the_next_local_sync() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst, state) = (d.path().join("src.img"), d.path().join("dst.img"), d.path().join("state"));
    write_volume(&src, 4 << 20, 21);
    std::fs::write(&dst, vec![0u8; 4 << 20]).unwrap();
    assert_eq!(json(&local_sync(&src, &dst, &state, &[]))["mode"], "full");
    poke(&dst, 2 * 65536 + 1000, b"written outside"); // in a region of random bytes (not a zero block)
    poke(&src, 12345, b"8 bytes!");
    let r = json(&local_sync(&src, &dst, &state, &[]));
    assert!(same(&src, &dst), "the shadow still differs from the source: {r}");
    assert_eq!(r["mode"], "compare", "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("not trusted") && reason.contains("modified"), "{reason}");
    assert_eq!(r["bytes_changed"], 2 * 4096, "{r}");
    let r = json(&local_sync(&src, &dst, &state, &[]));
    assert_eq!((r["mode"].as_str(), r["bytes_changed"].as_u64()), (Some("incremental"), Some(0)), "{r}");
    // sync --verify compares even so (and finds nothing to do).
    let r = json(&local_sync(&src, &dst, &state, &["--verify"]));
    assert_eq!((r["mode"].as_str(), r["bytes_changed"].as_u64()), (Some("compare"), Some(0)), "{r}");
}

/// `verify` finds a write that left no evidence (modification time put back), marks the shadow untrusted and says
/// the next sync repairs it; the next sync compares and repairs it; verify then passes.
#[test]
fn a_failed_verify_marks_the_shadow_untrusted_and_the_next_sync_repairs_it() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst, state) = (d.path().join("v.img"), d.path().join("s.img"), d.path().join("state"));
    write_volume(&src, 2 << 20, 22);
    std::fs::write(&dst, vec![0u8; 2 << 20]).unwrap();
    json(&local_sync(&src, &dst, &state, &[]));
    let mtime = std::fs::metadata(&dst).unwrap().modified().unwrap();
    poke(&dst, 70000, b"bit rot");
    std::fs::File::options().write(true).open(&dst).unwrap().set_modified(mtime).unwrap();
    let verify = || {
        run(blockrep().args(["verify", "--state-dir"]).arg(&state).arg("--local").arg(&dst).args(["--name", "v.img"]))
    };
    let o = verify();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("marked untrusted") && stderr(&o).contains("next sync"), "{}", stderr(&o));
    let r = json(&local_sync(&src, &dst, &state, &[]));
    assert_eq!(r["mode"], "compare", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("verify"), "{r}");
    assert!(same(&src, &dst));
    let o = verify();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Over the network: the shadow written while `serve` runs (the flock does not stop a writer that ignores it,
/// but the size/mtime/inode evidence shows the write) and while it is stopped; each next sync repairs it. A
/// second `serve` on the same configuration refuses (exit 4): the first holds the shadow.
#[test]
fn a_shadow_written_outside_blockrep_is_repaired_over_the_network_with_serve_running_or_stopped() {
    let mut p = Pair::new(4 << 20);
    p.start_serve();
    assert_eq!(p.sync_ok()["mode"], "full");

    // A second daemon on the same configuration refuses to run.
    let cfg = p.config("standby", &p.path("key"), "127.0.0.1:1");
    let mut second = blockrep()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while second.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if second.try_wait().unwrap().is_none() {
        let _ = second.kill();
        let _ = second.wait();
        panic!("a second serve on the same configuration kept running");
    }
    let o = second.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("in use by another process"), "{}", stderr(&o));

    poke(&p.path("shadow.img"), 1 << 20, b"written outside");
    poke(&p.path("src.img"), 100, b"8 bytes!");
    let r = p.sync_ok();
    assert!(p.identical(), "{r}");
    assert_eq!(r["mode"], "compare", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("modified"), "{r}");
    assert_eq!(p.sync_ok()["mode"], "incremental");

    p.stop_serve();
    poke(&p.path("shadow.img"), 2 << 20, b"written while serve was stopped");
    poke(&p.path("src.img"), 200, b"8 bytes?");
    let st = run(blockrep().args(["status", "--json", "--config"]).arg(&cfg));
    let st: serde_json::Value = serde_json::from_str(stdout(&st).trim()).expect("status JSON");
    assert!(st["volumes"][0]["untrusted"].as_str().is_some_and(|w| w.contains("modified")), "{st}");
    p.start_serve();
    let r = p.sync_ok();
    assert!(p.identical(), "{r}");
    assert_eq!(r["mode"], "compare", "{r}");
    assert_eq!(p.sync_ok()["mode"], "incremental");
}

/// Split brain: another node synced the standby after the common generation, so the primary's next sync would
/// discard that node's data. It is refused (exit 4) with both histories and nothing written; `sync
/// --discard-standby-changes` makes the sides identical and says how many bytes of the standby it overwrote.
#[test]
fn a_split_brain_is_refused_with_both_histories_until_the_standby_changes_are_discarded() {
    let mut p = Pair::new(2 << 20);
    p.start_serve();
    p.sync_ok();
    // Another node ("other", its own state and source) syncs the same standby.
    write_volume(&p.path("other.img"), 2 << 20, 99);
    let mine = std::fs::read_to_string(p.config("primary", &p.path("key"), &p.addr)).unwrap();
    let other = mine
        .replace("node = \"primary\"", "node = \"other\"")
        .replace("state-primary", "state-other")
        .replace("src.img", "other.img");
    std::fs::write(p.path("other.toml"), other).unwrap();
    json(&run(blockrep().args(["sync", "--json", "--config"]).arg(p.path("other.toml"))));
    assert!(same(&p.path("other.img"), &p.path("shadow.img")));

    let o = p.sync();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("split brain"), "{e}");
    assert!(e.contains("by primary") && e.contains("by other"), "both histories with their nodes: {e}");
    assert!(e.contains("--discard-standby-changes"), "{e}");
    assert!(same(&p.path("other.img"), &p.path("shadow.img")), "nothing discarded");

    let cfg = p.config("primary", &p.path("key"), &p.addr);
    let o = run(blockrep().args(["sync", "--json", "--discard-standby-changes", "--config"]).arg(&cfg));
    let r = json(&o);
    assert!(p.identical());
    assert_eq!(r["mode"], "compare", "{r}");
    let overwritten = r["standby_bytes_overwritten"].as_u64().expect("reported");
    assert!(overwritten > 0 && overwritten == r["bytes_changed"].as_u64().unwrap(), "{r}");
    assert_eq!(p.sync_ok()["mode"], "incremental");
}

/// A block device shadow held by `serve` cannot be opened exclusively (what mount does) while it runs.
#[test]
fn serve_holds_a_block_device_shadow_exclusively() {
    let p = Pair::new(1 << 20);
    let Some(mut d) = serve_on_a_loop_device(&p) else { return };
    let dev = d.dev.clone();
    use std::os::unix::fs::OpenOptionsExt;
    let excl = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&dev);
    assert_eq!(excl.err().and_then(|e| e.raw_os_error()), Some(libc::EBUSY), "serve holds {dev}");
    d.stop_serve();
    let excl = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&dev);
    assert!(excl.is_ok(), "released when serve ends");
}

/// Whether another process holds an exclusive `flock` on `path` (what `serve` takes on a file shadow).
pub(super) fn flocked(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: flock on a file descriptor this function owns for the duration of the call; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return false; // the lock is released when `f` is closed
    }
    let e = std::io::Error::last_os_error();
    assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK), "flock {}: {e}", path.display());
    true
}

/// Polls until `cond` holds (at most `secs` seconds); false when it never did.
pub(super) fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    cond()
}

/// `blockrep status --json` (exit 0 or 1: with or without an alarm).
fn status(cfg: &Path) -> serde_json::Value {
    let o = run(blockrep().args(["status", "--json", "--config"]).arg(cfg));
    assert!(matches!(o.status.code(), Some(0 | 1)), "status: {}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("status JSON: {e}: {}", stderr(&o)))
}

/// `[standby] verify_every`: `serve` re-hashes the shadow it holds at that interval. A clean shadow passes; a
/// write that left no evidence (modification time put back) is found by the next periodic verify, which marks
/// the shadow untrusted, raises the alarm and records it; the next sync compares and repairs it.
#[test]
fn the_periodic_verify_in_serve_finds_a_silent_write_and_the_next_sync_repairs_it() {
    let mut p = Pair::new(4 << 20);
    p.standby_extra = "verify_every = \"1s\"".into();
    p.start_serve();
    assert_eq!(p.sync_ok()["mode"], "full");
    let standby = p.config("standby", &p.path("key"), "127.0.0.1:1");
    let mut st = serde_json::Value::Null;
    let passed = eventually(60, || {
        st = status(&standby);
        st["volumes"][0]["last_verify"]["ok"] == true
    });
    assert!(passed, "no periodic verify passed on the clean shadow: {st}");
    assert_eq!(st["volumes"][0]["last_verify"]["generation"], 1, "{st}");
    assert!(st["volumes"][0]["untrusted"].is_null(), "{st}");

    let shadow = p.path("shadow.img");
    let mtime = std::fs::metadata(&shadow).unwrap().modified().unwrap();
    poke(&shadow, 3 * 32768 + 100, b"bit rot, no evidence"); // block 3 of 32 KiB (auto for a small volume)
    std::fs::File::options().write(true).open(&shadow).unwrap().set_modified(mtime).unwrap();
    let found = eventually(60, || {
        st = status(&standby);
        st["volumes"][0]["untrusted"].as_str().is_some_and(|w| w.contains("verify"))
    });
    assert!(found, "the periodic verify did not find the write: {st}");
    assert_eq!(st["volumes"][0]["last_verify"]["ok"], false, "{st}");
    assert_eq!(st["volumes"][0]["last_verify"]["mismatch_block"], 3, "{st}");
    assert!(st["alarms"].to_string().contains("shadow_untrusted"), "{st}");
    let log = stdout(&run(blockrep().args(["log", "--config"]).arg(&standby)));
    assert!(log.contains("verify vol: MISMATCH"), "{log}");

    let r = p.sync_ok();
    assert!(p.identical(), "the shadow still differs: {r}");
    assert_eq!(r["mode"], "compare", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("verify"), "{r}");
    assert_eq!(p.sync_ok()["mode"], "incremental");
    let cleared = eventually(30, || {
        st = status(&standby);
        st["volumes"][0]["complete"] == true
            && st["volumes"][0]["untrusted"].is_null()
            && !st["alarms"].to_string().contains("shadow_untrusted")
    });
    assert!(cleared, "{st}");
}

/// `blockrep verify` on the primary: the next sync is a compare sync that says it was requested; the one after
/// it is incremental again (the request was consumed).
#[test]
fn verify_on_the_primary_makes_the_next_sync_a_compare_sync() {
    let mut p = Pair::new(2 << 20);
    p.start_serve();
    assert_eq!(p.sync_ok()["mode"], "full");
    assert_eq!(p.sync_ok()["mode"], "incremental");
    let primary = p.config("primary", &p.path("key"), &p.addr);
    let o = run(blockrep().args(["verify", "--json", "--config"]).arg(&primary));
    let v = json(&o);
    assert_eq!((v["volume"].as_str(), v["side"].as_str()), (Some("vol"), Some("primary")), "{v}");
    assert!(v["compare_requested"]["time"].as_u64().is_some(), "{v}");
    let r = p.sync_ok();
    assert_eq!(r["mode"], "compare", "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("requested") && reason.contains("blockrep verify"), "{reason}");
    assert!(p.identical());
    let r = p.sync_ok();
    assert_eq!(r["mode"], "incremental", "the request was consumed: {r}");
}

/// `blockrep verify` on the standby with its configuration re-hashes the shadow: a clean one passes (exit 0), a
/// silent write is found (exit 1, marked untrusted), and the next sync repairs it.
#[test]
fn verify_on_the_standby_checks_the_configured_shadow() {
    let mut p = Pair::new(2 << 20);
    p.start_serve();
    p.sync_ok();
    let standby = p.config("standby", &p.path("key"), "127.0.0.1:1");
    let v = json(&run(blockrep().args(["verify", "--json", "vol", "--config"]).arg(&standby)));
    assert_eq!(
        (v["side"].as_str(), v["ok"].as_bool(), v["generation"].as_u64()),
        (Some("standby"), Some(true), Some(1))
    );
    let shadow = p.path("shadow.img");
    let mtime = std::fs::metadata(&shadow).unwrap().modified().unwrap();
    poke(&shadow, 100_000, b"bit rot"); // block 3 of 32 KiB (auto for a small volume)
    std::fs::File::options().write(true).open(&shadow).unwrap().set_modified(mtime).unwrap();
    let o = run(blockrep().args(["verify", "--config"]).arg(&standby));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("marked untrusted") && stderr(&o).contains("next sync"), "{}", stderr(&o));
    assert!(status(&standby)["volumes"][0]["untrusted"].as_str().is_some_and(|w| w.contains("verify")));
    let text = stdout(&run(blockrep().args(["status", "--config"]).arg(&standby)));
    assert!(text.contains("last verify") && text.contains("generation 1, MISMATCH at block 3"), "{text}");
    let r = p.sync_ok();
    assert_eq!(r["mode"], "compare", "{r}");
    assert!(p.identical());
}

/// A shadow created while `serve` runs (`blockrep shadow create`) is held from then on, without a restart; so is
/// one deleted and created again.
#[test]
fn serve_holds_a_shadow_created_after_it_started() {
    let mut p = Pair::new(1 << 20);
    std::fs::remove_file(p.path("shadow.img")).unwrap();
    p.start_serve();
    let standby = p.config("standby", &p.path("key"), "127.0.0.1:1");
    let o = run(blockrep().args(["shadow", "create", "vol", "--size", "1M", "--config"]).arg(&standby));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(eventually(10, || flocked(&p.path("shadow.img"))), "serve does not hold the new shadow");
    assert_eq!(p.sync_ok()["mode"], "full");
    assert!(p.identical());
    assert!(flocked(&p.path("shadow.img")));
    // Deleted and created again (another file at the same path): held anew, and the next sync repairs it.
    std::fs::remove_file(p.path("shadow.img")).unwrap();
    let o = run(blockrep().args(["shadow", "create", "vol", "--size", "1M", "--config"]).arg(&standby));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(eventually(10, || flocked(&p.path("shadow.img"))), "serve does not hold the new file");
    let r = p.sync_ok();
    assert_eq!(r["mode"], "compare", "{r}");
    assert!(p.identical());
    p.stop_serve();
    assert!(!flocked(&p.path("shadow.img")), "released when serve stops");
}

/// The periodic verify on a block device shadow (a loop device; O_DIRECT reads beside serve's O_EXCL hold): a
/// write to the loop device's backing file leaves the device's write counter alone (no evidence), the verify
/// finds it, and the next sync repairs it through the device.
#[test]
fn the_periodic_verify_checks_a_block_device_shadow() {
    let mut p = Pair::new(2 << 20);
    p.standby_extra = "verify_every = \"1s\"".into();
    let Some(d) = serve_on_a_loop_device(&p) else { return };
    let (addr, cfg) = (d.addr.clone(), d.cfg.clone());
    let sync = || {
        let o = p.sync_via(&addr, &p.path("key"));
        assert!(o.status.success(), "sync: {}", stderr(&o));
        serde_json::from_str::<serde_json::Value>(stdout(&o).trim()).unwrap()
    };
    assert_eq!(sync()["mode"], "full");
    let mut st = serde_json::Value::Null;
    assert!(eventually(60, || {
        st = status(&cfg);
        st["volumes"][0]["last_verify"]["ok"] == true
    }));
    poke(&p.path("shadow.img"), 65536 + 10, b"behind the device's back");
    let found = eventually(60, || {
        st = status(&cfg);
        st["volumes"][0]["untrusted"].as_str().is_some_and(|w| w.contains("verify"))
    });
    assert!(found, "{st}");
    let r = sync();
    assert_eq!(r["mode"], "compare", "{r}");
    assert!(p.identical(), "{r}");
}

/// `serve` of `p`'s standby configuration with the shadow on a loop device over `p`'s shadow image.
struct LoopServe {
    /// The loop device (detached on drop, after serve is killed).
    dev: String,
    /// The configuration naming it.
    cfg: std::path::PathBuf,
    /// Where serve listens.
    addr: String,
    /// The daemon (killed on drop).
    serve: Option<std::process::Child>,
}

impl LoopServe {
    /// Kills serve and waits for it.
    fn stop_serve(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LoopServe {
    fn drop(&mut self) {
        self.stop_serve();
        let _ = std::process::Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Starts [`LoopServe`], or says why it skips (not root, no losetup, no loop device) and returns `None`.
fn serve_on_a_loop_device(p: &Pair) -> Option<LoopServe> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() == 0 };
    let losetup = Path::new("/usr/sbin/losetup").exists() || Path::new("/sbin/losetup").exists();
    if !is_root || !losetup {
        eprintln!("skipping: needs root and losetup for a loop device");
        return None;
    }
    let o = run(std::process::Command::new("losetup").args(["--find", "--show"]).arg(p.path("shadow.img")));
    if !o.status.success() {
        eprintln!("skipping: no loop device ({})", stderr(&o));
        return None;
    }
    let mut d =
        LoopServe { dev: stdout(&o).trim().to_owned(), cfg: p.path("dev.toml"), addr: String::new(), serve: None };
    let text = std::fs::read_to_string(p.config("standby", &p.path("key"), "127.0.0.1:1")).unwrap();
    std::fs::write(&d.cfg, text.replace(&format!("{:?}", p.path("shadow.img")), &format!("{:?}", d.dev))).unwrap();
    let mut serve = blockrep()
        .args(["serve", "--announce", "--listen", "127.0.0.1:0", "--config"])
        .arg(&d.cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap()).read_line(&mut line).unwrap();
    d.serve = Some(serve);
    d.addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("announce line: {line}")).to_owned();
    Some(d)
}
