//! `scripts/install.sh` into a temporary root (nothing outside it is touched), `blockrep deconfigure`, and the
//! configuration's version key and semantic errors as the operator sees them.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn install_sh(root: &Path) -> Command {
    let mut c = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh"));
    c.arg("--root").arg(root).env_remove("BLOCKREP_LOG");
    c
}

fn ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(o.status.success(), "{cmd:?} failed ({}):\n{}\n{}", o.status, stdout(&o), stderr(&o));
    stdout(&o)
}

/// Every path under `root` (relative) with its type, mode and, for files, a hash of the content.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            let rel = p.strip_prefix(root).unwrap().to_owned();
            if m.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                walk(root, &p, out);
            } else {
                let hash = blake3::hash(&std::fs::read(&p).unwrap());
                out.insert(rel, format!("file {mode:o} {hash}"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn names(t: &BTreeMap<PathBuf, String>) -> Vec<String> {
    t.keys().map(|p| p.display().to_string()).collect()
}

#[test]
fn install_is_idempotent_names_the_prefix_and_uninstall_reverses_it() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let prefix = d.path().join("p");
    let install = || {
        let mut c = install_sh(&root);
        c.args(["--role", "primary", "--with-keepalived", "--with-pacemaker", "--binary"]);
        c.arg(env!("CARGO_BIN_EXE_blockrep")).arg("--prefix").arg(&prefix);
        ok(&mut c)
    };
    let first = install();
    assert!(first.contains("created /etc/blockrep/key"), "{first}");
    let before = tree(&root);
    let second = install();
    assert!(second.contains("kept /etc/blockrep/blockrep.toml") && second.contains("kept /etc/blockrep/key"));
    assert_eq!(before, tree(&root), "a second install changed the tree");

    let inside = |p: &str| root.join(p.trim_start_matches('/'));
    let exe = prefix.join("bin/blockrep");
    for unit in ["blockrep-serve.service", "blockrep-sync.service", "blockrep-reconcile.service"] {
        let text = std::fs::read_to_string(inside(&format!("/etc/systemd/system/{unit}"))).unwrap();
        assert!(text.contains(&format!("ExecStart={} ", exe.display())), "{unit}:\n{text}");
        assert!(!text.contains("/usr/local/bin"), "{unit} names /usr/local/bin:\n{text}");
    }
    let timer = std::fs::read_to_string(inside("/etc/systemd/system/blockrep-sync.timer")).unwrap();
    assert!(timer.lines().any(|l| l.starts_with("OnCalendar=") && l.len() > "OnCalendar=".len()), "{timer}");
    let mode = |p: &str| std::fs::metadata(inside(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("/etc/blockrep/key"), 0o600);
    assert_eq!(mode("/etc/blockrep/blockrep.toml"), 0o600);
    let in_prefix = |p: &str| root.join(prefix.strip_prefix("/").unwrap()).join(p);
    assert_eq!(
        std::fs::read(in_prefix("bin/blockrep")).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_blockrep")).unwrap()
    );
    let man = std::fs::read_to_string(in_prefix("share/man/man1/blockrep.1")).unwrap();
    assert!(man.contains("sync") && in_prefix("share/man/man1/blockrep-sync.1").exists(), "{man}");
    for c in [
        "share/bash-completion/completions/blockrep",
        "share/zsh/site-functions/_blockrep",
        "share/fish/vendor_completions.d/blockrep.fish",
    ] {
        assert!(std::fs::read_to_string(in_prefix(c)).unwrap().contains("sync"), "{c}");
    }
    let notify = std::fs::read_to_string(in_prefix("lib/blockrep/blockrep-keepalived-notify")).unwrap();
    assert!(notify.contains(&format!("BLOCKREP={}", exe.display())), "{notify}");
    let ocf = std::fs::read_to_string(inside("/usr/lib/ocf/resource.d/blockrep/blockrep")).unwrap();
    assert!(ocf.contains(&format!("OCF_RESKEY_binary:-{}", exe.display())));

    verify_units(d.path(), &root, &prefix);

    let key = std::fs::read(inside("/etc/blockrep/key")).unwrap();
    let out = ok(install_sh(&root).arg("--uninstall"));
    assert!(out.contains("kept /etc/blockrep/key"), "{out}");
    let kept = [
        "etc",
        "etc/blockrep",
        "etc/blockrep/blockrep.toml",
        "etc/blockrep/key",
        "var",
        "var/lib",
        "var/lib/blockrep",
        "var/lib/blockrep/install.manifest",
    ];
    assert_eq!(names(&tree(&root)), kept, "uninstall left more (or less) than configuration, key and state");
    assert_eq!(std::fs::read(inside("/etc/blockrep/key")).unwrap(), key);

    install();
    assert_eq!(std::fs::read(inside("/etc/blockrep/key")).unwrap(), key, "the key was replaced");
    ok(install_sh(&root).args(["--uninstall", "--purge"]));
    assert_eq!(names(&tree(&root)), Vec::<String>::new(), "--purge left files");
}

/// `systemd-analyze verify` on the rendered units where it works on this machine (a probe unit proves it),
/// else the rendered files were checked above.
fn verify_units(tmp: &Path, root: &Path, prefix: &Path) {
    let probe = tmp.join("probe.service");
    std::fs::write(&probe, "[Unit]\nDescription=probe\n[Service]\nType=oneshot\nExecStart=/bin/true\n").unwrap();
    match Command::new("systemd-analyze").arg("verify").arg(&probe).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => return eprintln!("skipped systemd-analyze verify: it fails on a trivial unit here: {}", stderr(&o)),
        Err(e) => return eprintln!("skipped systemd-analyze verify: {e}"),
    }
    // The units name PREFIX/bin/blockrep, which exists under ROOT: make PREFIX point there for the check.
    std::os::unix::fs::symlink(root.join(prefix.strip_prefix("/").unwrap()), prefix).unwrap();
    let units = root.join("etc/systemd/system");
    let mut c = Command::new("systemd-analyze");
    c.arg("verify");
    for u in ["blockrep-sync.timer", "blockrep-sync.service", "blockrep-serve.service", "blockrep-reconcile.service"] {
        c.arg(units.join(u));
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "systemd-analyze verify: {}{}", stdout(&o), stderr(&o));
    std::fs::remove_file(prefix).unwrap();
}

#[test]
fn deconfigure_removes_state_and_keeps_shadows_unless_asked() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let config = p.join("blockrep.toml");
    let text = format!(
        "version = 1\nnode = \"n\"\nkey_file = \"{d}/key\"\nstate_dir = \"{d}/state\"\n[[volume]]\nname = \"v\"\n\
         shadow = \"{d}/v.img\"\n",
        d = p.display()
    );
    std::fs::write(&config, text).unwrap();
    std::fs::create_dir_all(p.join("state/standby/v")).unwrap();
    std::fs::write(p.join("state/standby/v/manifest"), b"m").unwrap();
    std::fs::write(p.join("v.img"), b"shadow data").unwrap();
    let out = ok(blockrep().arg("--config").arg(&config).arg("deconfigure"));
    assert!(out.contains("removed"), "{out}");
    assert!(!p.join("state/standby").exists(), "{out}");
    assert!(p.join("state/replication-disabled").exists(), "replication is left disabled: {out}");
    assert_eq!(std::fs::read(p.join("v.img")).unwrap(), b"shadow data", "the shadow went without --delete-shadows");
    let out = ok(blockrep().arg("--config").arg(&config).args(["deconfigure", "--delete-shadows"]));
    assert!(out.contains("shadow") && !p.join("v.img").exists(), "{out}");
}

#[test]
fn config_version_and_bad_values_name_the_key_and_line() {
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("c.toml");
    let status = |text: &str| {
        std::fs::write(&config, text).unwrap();
        run(blockrep().arg("--config").arg(&config).arg("status"))
    };
    let o = status("version = 2\nnode = \"n\"\nkey_file = \"/k\"\n");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("version 2") && stderr(&o).contains("line 1"), "{}", stderr(&o));
    let o = status("node = \"n\"\nkey_file = \"/k\"\n\n[standby]\nlisten = \"192.0.2.1\"\n");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("standby.listen") && e.contains("line 5") && e.contains("192.0.2.1"), "{e}");
}
