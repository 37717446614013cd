//! Retained generations (`keep_generations`, issue 12) of a file shadow on a filesystem with reflinks (XFS on a
//! loop device the test makes), with `serve` and `sync` as real processes on 127.0.0.1: copies kept and pruned,
//! each byte-identical to what the primary had at that sync; `generations`; `restore` and the compare sync after
//! it; no space for a copy refuses the sync with the shadow unchanged; a shadow on a filesystem without reflinks
//! is refused at `serve` start. LVM (thin and classic) and `promote --generation` run in UML
//! (`uml_retain.rs`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use super::*;

/// An XFS filesystem on a loop device, mounted in a temp dir (unmounted and detached on drop).
struct Xfs {
    dir: tempfile::TempDir,
    dev: String,
}

impl Xfs {
    /// Makes and mounts it, or says why it skips (not root, no mkfs.xfs or losetup).
    fn new() -> Option<Xfs> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/sbin/mkfs.xfs").exists() {
            eprintln!("skipping: needs root and mkfs.xfs (scripts/deps.sh test installs xfsprogs)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img).unwrap().set_len(320 << 20).unwrap(); // sparse; XFS's minimum is 300 MiB
        let o = run(std::process::Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&img));
        assert!(o.status.success(), "mkfs.xfs: {}", stderr(&o));
        let o = run(std::process::Command::new("losetup").args(["--find", "--show"]).arg(&img));
        if !o.status.success() {
            eprintln!("skipping: no loop device ({})", stderr(&o));
            return None;
        }
        let dev = stdout(&o).trim().to_owned();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let o = run(std::process::Command::new("mount").arg(&dev).arg(&mnt));
        if !o.status.success() {
            let _ = std::process::Command::new("losetup").args(["-d", &dev]).status();
            eprintln!("skipping: cannot mount XFS ({})", stderr(&o));
            return None;
        }
        Some(Xfs { dir, dev })
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.mnt()).status();
        let _ = std::process::Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Primary and standby configurations of one volume, the shadow on `shadow`.
struct Nodes {
    dir: tempfile::TempDir,
    shadow: PathBuf,
    keep: u32,
    serve: Option<Child>,
    addr: String,
}

const SIZE: usize = 8 << 20;

impl Nodes {
    fn new(shadow: PathBuf, keep: u32) -> Nodes {
        let dir = tempfile::tempdir().unwrap();
        let o = run(blockrep().arg("keygen").arg(dir.path().join("key")));
        assert!(o.status.success(), "keygen: {}", stderr(&o));
        write_volume(&dir.path().join("src.img"), SIZE, 9);
        std::fs::write(&shadow, vec![0u8; SIZE]).unwrap();
        Nodes { dir, shadow, keep, serve: None, addr: String::new() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self, side: &str) -> PathBuf {
        let text = format!(
            "node = \"{side}\"\nkey_file = {:?}\nstate_dir = {:?}\n[standby]\nlisten = \"127.0.0.1:0\"\n[primary]\n\
             peer = \"{}\"\n[[volume]]\nname = \"vol\"\nsource = {:?}\nshadow = {:?}\nkeep_generations = {}\n",
            self.path("key"),
            self.path(&format!("state-{side}")),
            if self.addr.is_empty() { "127.0.0.1:1" } else { &self.addr },
            self.path("src.img"),
            self.shadow,
            self.keep,
        );
        let p = self.path(&format!("{side}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Starts serve: `Ok` when it listens, `Err(output)` when it exits.
    fn start_serve(&mut self) -> Result<(), std::process::Output> {
        let mut child = blockrep()
            .args(["serve", "--announce", "--listen", "127.0.0.1:0", "--config"])
            .arg(self.config("standby"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.path("serve.log")).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        match line.trim().strip_prefix("listening on ") {
            Some(a) => {
                self.addr = a.to_owned();
                self.serve = Some(child);
                Ok(())
            }
            None => {
                let mut o = child.wait_with_output().unwrap();
                o.stderr = std::fs::read(self.path("serve.log")).unwrap();
                Err(o)
            }
        }
    }

    fn sync(&self) -> std::process::Output {
        run(blockrep().args(["sync", "--json", "--config"]).arg(self.config("primary")))
    }

    fn sync_ok(&self) -> serde_json::Value {
        let o = self.sync();
        assert!(o.status.success(), "sync failed: {}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap()
    }

    fn standby(&self, args: &[&str]) -> std::process::Output {
        run(blockrep().args(args).arg("--config").arg(self.config("standby")))
    }

    fn generations(&self) -> serde_json::Value {
        let o = self.standby(&["generations", "--json"]);
        assert!(o.status.success(), "generations: {}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn retained_generations(g: &serde_json::Value) -> Vec<u64> {
    g["retained"].as_array().unwrap().iter().map(|r| r["generation"].as_u64().unwrap()).collect()
}

#[test]
fn retained_generations_of_a_file_shadow_on_xfs_are_kept_listed_and_restored() {
    let Some(xfs) = Xfs::new() else { return };
    let mut n = Nodes::new(xfs.mnt().join("shadow.img"), 3);
    n.start_serve().unwrap_or_else(|o| panic!("serve: {}", stderr(&o)));
    // Four syncs, the source changed before each; what the primary had at each sync, by generation.
    let mut content = vec![Vec::new()];
    for g in 1..=4u64 {
        if g > 1 {
            scribble(&n.path("src.img"), &[g * 7, g * 31, 100 + g], g as u8);
        }
        let r = n.sync_ok();
        assert_eq!(r["generation"], g, "{r}");
        content.push(std::fs::read(n.path("src.img")).unwrap());
    }
    assert_eq!(std::fs::read(&n.shadow).unwrap(), content[4]);
    // K = 3: the current generation 4 and the two before it, each byte-identical to that sync's source.
    let g = n.generations();
    assert_eq!(g["current"]["generation"], 4, "{g}");
    assert_eq!(g["backend"], "reflink", "{g}");
    assert_eq!(retained_generations(&g), [3, 2], "{g}");
    for r in g["retained"].as_array().unwrap() {
        let gen = r["generation"].as_u64().unwrap();
        assert_eq!(r["complete"], true, "{r}");
        assert_eq!(r["promotable"], true, "{r}");
        assert_eq!(r["source_node"], "primary", "{r}");
        let copy = std::fs::read(r["copy"].as_str().unwrap()).unwrap();
        assert!(copy == content[gen as usize], "the copy of generation {gen} differs from that sync's source");
    }
    assert!(!Path::new(&format!("{}.gen1", n.shadow.display())).exists(), "generation 1 was not removed");
    let text = stdout(&n.standby(&["generations"]));
    assert!(text.contains("retained generation     3") && text.contains("complete, promotable"), "{text}");
    let st = n.standby(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_str(stdout(&st).trim()).unwrap();
    let kept: Vec<u64> =
        st["volumes"][0]["retained"].as_array().unwrap().iter().map(|r| r["generation"].as_u64().unwrap()).collect();
    assert_eq!(kept, [2, 3], "{st}");

    // Roll back to generation 2 (serve keeps running): the shadow holds it again, generation 4 is kept.
    let o = n.standby(&["restore", "--generation", "2", "vol", "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!((r["generation"].as_u64(), r["committed"].as_u64()), (Some(2), Some(5)), "{r}");
    assert!(std::fs::read(&n.shadow).unwrap() == content[2], "the shadow is not generation 2 after the restore");
    let g = n.generations();
    assert_eq!(retained_generations(&g), [4, 3], "{g}");
    let copy4 = std::fs::read(g["retained"][0]["copy"].as_str().unwrap()).unwrap();
    assert!(copy4 == content[4], "the generation the rollback overwrote was not kept intact");
    assert!(g["current"]["untrusted"].as_str().unwrap().contains("rolled back"), "{g}");
    let log = stdout(&n.standby(&["log"]));
    assert!(log.contains("rollback vol: the shadow was rolled back to retained generation 2"), "{log}");
    // A generation that is not kept: a clear error, nothing changes.
    let o = n.standby(&["restore", "--generation", "1", "vol"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("generation 1 is not retained"), "{}", stderr(&o));
    assert!(std::fs::read(&n.shadow).unwrap() == content[2]);

    // The primary's next sync compares (never a wrong incremental) and repairs the shadow.
    let r = n.sync_ok();
    assert_eq!(r["mode"], "compare", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("rolled back"), "{r}");
    assert_eq!(std::fs::read(&n.shadow).unwrap(), std::fs::read(n.path("src.img")).unwrap());
    assert_eq!(n.sync_ok()["mode"], "incremental");

    // No room for the copy: the sync is refused with the shadow and the kept copies unchanged.
    let before = std::fs::read(&n.shadow).unwrap();
    let kept_before = retained_generations(&n.generations());
    let df = run(std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(xfs.mnt()));
    let avail: u64 = stdout(&df).lines().nth(1).unwrap().trim().parse().unwrap();
    let filler = xfs.mnt().join("filler");
    let o = run(std::process::Command::new("fallocate").args(["-l", &(avail - (1 << 20)).to_string()]).arg(&filler));
    assert!(o.status.success(), "fallocate: {}", stderr(&o));
    scribble(&n.path("src.img"), &[3, 50, 90], 77);
    let o = n.sync();
    assert!(!o.status.success(), "a sync without room for the copy succeeded");
    assert!(stderr(&o).contains("no room to keep generation"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&n.shadow).unwrap(), before, "the shadow changed although the sync was refused");
    assert_eq!(retained_generations(&n.generations()), kept_before);
    std::fs::remove_file(&filler).unwrap();
    let r = n.sync_ok();
    assert_eq!(std::fs::read(&n.shadow).unwrap(), std::fs::read(n.path("src.img")).unwrap(), "{r}");

    // The standby's manifest lost: nothing could prove what a copy of that generation holds, so none is kept,
    // but the sync that repairs the shadow is not refused.
    let kept = retained_generations(&n.generations());
    std::fs::remove_file(n.path("state-standby/standby/vol/manifest")).unwrap();
    scribble(&n.path("src.img"), &[5, 60], 88);
    let r = n.sync_ok();
    assert_eq!(r["mode"], "compare", "{r}");
    assert_eq!(std::fs::read(&n.shadow).unwrap(), std::fs::read(n.path("src.img")).unwrap(), "{r}");
    assert_eq!(retained_generations(&n.generations()), kept, "a copy was kept without a manifest to prove it");
}

#[test]
fn keep_generations_on_a_filesystem_without_reflinks_is_refused_at_serve_start() {
    let dir = tempfile::tempdir().unwrap();
    let fs = std::process::Command::new("stat").args(["-f", "-c", "%T"]).arg(dir.path()).output().unwrap();
    let fs = String::from_utf8_lossy(&fs.stdout).trim().to_owned();
    if fs == "xfs" || fs == "btrfs" {
        eprintln!("skipping: the temp directory is on {fs}, which has reflinks");
        return;
    }
    let mut n = Nodes::new(dir.path().join("shadow.img"), 2);
    let o = n.start_serve().expect_err("serve started with keep_generations on a filesystem without reflinks");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("keep_generations = 2 needs") && e.contains("without reflinks"), "{e}");
    // keep_generations = 1 (the default) is fine there.
    n.keep = 1;
    n.start_serve().unwrap_or_else(|o| panic!("serve: {}", stderr(&o)));
    n.sync_ok();
}
