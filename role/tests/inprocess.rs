//! The library API as the CLI calls it (custom guards, an LVM binding, a peer for switchover), run in-process
//! on a thread that moved into its own fresh network namespace (`unshare(CLONE_NEWNET)` affects only that
//! thread; the namespace disappears with it). Inside, a veth pair `rv0`/`rv1` carries 10.77.9.x addresses.
//!
//! Needs root; each test prints why it skips otherwise.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;

use role::boot::LvmError;
use role::plan::PlanError;
use role::{Config, Guards, LvRenamer, Options, Peer, Role, SwitchoverError};

const IP: &str = "/usr/sbin/ip";

/// Runs `f` on a thread inside a fresh network namespace with veth pair rv0/rv1 up; `None` if it cannot.
fn in_fresh_netns<T: Send + 'static>(tag: &str, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    if !nix::unistd::geteuid().is_root() || !Path::new(IP).exists() {
        eprintln!("SKIP {tag}: needs root and {IP} (CI runs as root)");
        return None;
    }
    let tag = tag.to_string();
    let h = std::thread::spawn(move || {
        // SAFETY: unshare(2) with CLONE_NEWNET only changes the network namespace of this thread; no memory is
        // involved.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!("SKIP {tag}: unshare(CLONE_NEWNET) failed: {}", std::io::Error::last_os_error());
            return None;
        }
        // Children forked from this thread inherit its namespace.
        for args in [
            vec!["link", "add", "rv0", "type", "veth", "peer", "name", "rv1"],
            vec!["link", "set", "rv0", "up"],
            vec!["link", "set", "rv1", "up"],
            vec!["addr", "add", "10.77.9.1/24", "dev", "rv0"],
        ] {
            let st = Command::new(IP).args(&args).status().expect("run ip");
            assert!(st.success(), "ip {args:?} failed in the test namespace");
        }
        Some(f())
    });
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

fn config(dir: &Path, boot: &str) -> Config {
    let text = format!(
        r#"[role]
node = "inproc"
state_dir = "{d}/state"
interface = "rv0"
vip = "10.77.9.50/24"
[role.garp]
count = 1
interval_ms = 1
[role.probe]
count = 1
interval_ms = 10
wait_ms = 30
{boot}
"#,
        d = dir.display()
    );
    Config::from_toml(&text).expect("test config")
}

fn has_vip() -> bool {
    let out = Command::new(IP).args(["-4", "-o", "addr", "show", "dev", "rv0"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("10.77.9.50/24")
}

struct TestGuards {
    data: Result<Option<u64>, String>,
    peer: Result<String, String>,
}

impl Guards for TestGuards {
    fn data_committed(&self) -> Result<Option<u64>, String> {
        self.data.clone()
    }
    fn peer_not_primary(&self) -> Result<String, String> {
        self.peer.clone()
    }
}

#[test]
fn guards_refuse_as_unsafe_without_changing_anything_and_force_skips_them() {
    in_fresh_netns("guards", || {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), "");
        let opts = Options { reason: "guard test".into(), ..Default::default() };
        let stale =
            TestGuards { data: Err("shadow vg0/data is at an uncommitted generation".into()), peer: Ok("".into()) };
        let e = role::promote(&cfg, &stale, &opts).unwrap_err();
        assert!(e.refused_as_unsafe(), "{e}");
        assert!(e.to_string().contains("uncommitted generation"), "{e}");
        let primary_peer = TestGuards { data: Ok(Some(1)), peer: Err("peer 10.77.9.2 says it is primary".into()) };
        let e = role::promote(&cfg, &primary_peer, &opts).unwrap_err();
        assert!(matches!(e, PlanError::Refused { guard: "peer", .. }), "{e:?}");
        assert!(!has_vip());
        assert_eq!(role::status(&cfg.state_dir).unwrap().role, Role::Standby);
        assert!(role::accepts_syncs(&cfg.state_dir).unwrap());

        // A promote meant to re-assert a primary's address refuses on a node that is not primary (the role
        // changed under its caller), changing nothing.
        let reassert = Options { reason: "re-assert".into(), reassert_only: true, ..Default::default() };
        let e = role::promote(&cfg, &TestGuards { data: Ok(Some(1)), peer: Ok("".into()) }, &reassert).unwrap_err();
        assert!(matches!(e, PlanError::RoleChanged(Role::Standby)), "{e:?}");
        assert!(!has_vip());
        assert!(role::status(&cfg.state_dir).unwrap().plan.is_none());

        let forced = Options { force: true, reason: "forced".into(), ..Default::default() };
        let r = role::promote(&cfg, &primary_peer, &forced).unwrap();
        assert_eq!(r.role, Role::Primary);
        assert!(r.steps[0].detail.contains("--force"));
        assert!(has_vip());
        assert!(!role::accepts_syncs(&cfg.state_dir).unwrap());

        // With passing guards the report carries the data age.
        role::demote(&cfg, &Options::default()).unwrap();
        let fine = TestGuards { data: Ok(Some(1_700_000_000)), peer: Ok("peer is standby".into()) };
        let r = role::promote(&cfg, &fine, &opts).unwrap();
        assert_eq!(r.last_sync, Some(1_700_000_000));
        assert!(r.to_string().contains("promoted data is from the sync completed"), "{r}");
    });
}

/// An in-memory volume group recording every rename.
#[derive(Default)]
struct FakeVg {
    lvs: RefCell<BTreeSet<String>>,
    calls: RefCell<Vec<String>>,
}

impl LvRenamer for FakeVg {
    fn exists(&self, _vg: &str, lv: &str) -> Result<bool, LvmError> {
        Ok(self.lvs.borrow().contains(lv))
    }
    fn rename(&self, vg: &str, from: &str, to: &str) -> Result<(), LvmError> {
        let mut lvs = self.lvs.borrow_mut();
        if !lvs.remove(from) || !lvs.insert(to.to_string()) {
            return Err(format!("bad rename {from} -> {to}").into());
        }
        self.calls.borrow_mut().push(format!("{vg}/{from}->{to}"));
        Ok(())
    }
}

const LV_BOOT: &str = r#"[role.boot_target]
kind = "lv-rename"
vg = "vg0"
pairs = [{ production = "root", shadow = "root_shadow" }, { production = "data", shadow = "data_shadow" }]
"#;

#[test]
fn lv_rename_swaps_names_once_even_with_a_crash_after_every_rename() {
    in_fresh_netns("lv-rename", || {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), LV_BOOT);
        let vg = FakeVg::default();
        vg.lvs.borrow_mut().extend(["root", "root_shadow", "data", "data_shadow"].map(String::from));
        // Without an LVM binding the step fails and says so.
        let e = role::promote(&cfg, &role::NoGuards, &Options::default()).unwrap_err();
        assert!(format!("{e:?}").contains("NoLvm"), "{e:?}");
        assert_eq!(role::status(&cfg.state_dir).unwrap().plan.unwrap().failed.unwrap().step, "boot-target/rename-0");

        // Crash (panic) right after each rename is journaled, then run promote again.
        for k in 0..6 {
            let key = format!("boot-target/rename-{k}");
            let crash = |s: &str| {
                if s == key {
                    panic!("injected crash after {s}");
                }
            };
            let opts = Options { lvm: Some(&vg), after_step: Some(&crash), ..Default::default() };
            let r = catch_unwind(AssertUnwindSafe(|| role::promote(&cfg, &role::NoGuards, &opts)));
            assert!(r.is_err(), "no crash at {key}");
        }
        let opts = Options { lvm: Some(&vg), ..Default::default() };
        role::promote(&cfg, &role::NoGuards, &opts).unwrap();
        assert_eq!(
            *vg.calls.borrow(),
            [
                "vg0/root->root_blockrep_swap",
                "vg0/root_shadow->root",
                "vg0/root_blockrep_swap->root_shadow",
                "vg0/data->data_blockrep_swap",
                "vg0/data_shadow->data",
                "vg0/data_blockrep_swap->data_shadow",
            ]
        );
        assert_eq!(role::status(&cfg.state_dir).unwrap().role, Role::Primary);
        // Demote swaps back: six more renames.
        role::demote(&cfg, &opts).unwrap();
        assert_eq!(vg.calls.borrow().len(), 12);
        assert_eq!(vg.calls.borrow()[6], "vg0/root->root_blockrep_swap");
    });
}

struct FakePeer {
    role: RefCell<Role>,
    reachable: bool,
}

impl Peer for FakePeer {
    fn role(&self) -> Result<Role, String> {
        if self.reachable {
            Ok(*self.role.borrow())
        } else {
            Err("connection refused".into())
        }
    }
    fn demote(&self, _reason: &str) -> Result<(), role::switchover::PeerError> {
        if !self.reachable {
            return Err("peer 10.77.9.2 unreachable".into());
        }
        *self.role.borrow_mut() = Role::Standby;
        Ok(())
    }
}

#[test]
fn switchover_demotes_the_peer_first_and_reports_both_states_when_it_cannot() {
    in_fresh_netns("switchover", || {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), "");
        let opts = Options { reason: "planned switchover".into(), ..Default::default() };
        let gone = FakePeer { role: RefCell::new(Role::Primary), reachable: false };
        let e = role::switchover(&cfg, &role::NoGuards, &gone, &opts).unwrap_err();
        assert!(matches!(e, SwitchoverError::PeerDemote { local: Role::Standby, .. }), "{e:?}");
        assert!(e.to_string().contains("unreachable") && e.to_string().contains("peer role: unknown"), "{e}");
        assert!(!has_vip());

        let peer = FakePeer { role: RefCell::new(Role::Primary), reachable: true };
        let r = role::switchover(&cfg, &role::NoGuards, &peer, &opts).unwrap();
        assert_eq!(*peer.role.borrow(), Role::Standby);
        assert_eq!(r.role, Role::Primary);
        assert!(has_vip());
    });
}
