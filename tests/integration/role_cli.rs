//! `blockrep promote` / `demote` / `status` / `switchover` as an operator runs them, in network namespaces this
//! test creates (root needed; CI runs as root). Two "servers" A and B on a private bridge; the virtual IP moves
//! between them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::*;

pub(super) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub(super) fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip runs");
    assert!(st.success(), "ip {args:?} failed");
}

/// Namespaces `<tag>a`, `<tag>b` and a bridge namespace `<tag>l`, deleted on drop.
pub(super) struct Lan {
    tag: String,
}

impl Lan {
    fn new() -> Lan {
        Lan::named("")
    }

    /// Namespaces with `suffix` in their names, so that tests running at once do not share them.
    pub(super) fn named(suffix: &str) -> Lan {
        let tag = format!("brc{}{suffix}", std::process::id() % 100000);
        let lan = Lan { tag };
        let l = lan.ns("l");
        ip(&["netns", "add", &l]);
        ip(&["-n", &l, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &l, "link", "set", "br0", "up"]);
        for (n, addr) in [("a", "10.77.8.1/24"), ("b", "10.77.8.2/24")] {
            let ns = lan.ns(n);
            ip(&["netns", "add", &ns]);
            let (veth, port) = (format!("v{}{n}", lan.tag), format!("p{}{n}", lan.tag));
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", &port]);
            ip(&["link", "set", &veth, "netns", &ns]);
            ip(&["link", "set", &port, "netns", &l]);
            ip(&["-n", &l, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &ns, "link", "set", &veth, "name", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "addr", "add", addr, "dev", "eth0"]);
        }
        lan
    }

    pub(super) fn ns(&self, n: &str) -> String {
        format!("{}{n}", self.tag)
    }

    /// `blockrep ARGS` inside namespace `n`.
    pub(super) fn blockrep(&self, n: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(n), env!("CARGO_BIN_EXE_blockrep")]);
        c.env_remove("BLOCKREP_LOG");
        c
    }

    pub(super) fn has_vip(&self, n: &str) -> bool {
        let o = Command::new("ip").args(["-n", &self.ns(n), "-4", "addr", "show", "dev", "eth0"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).contains("10.77.8.50/")
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in ["a", "b", "l"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(n)]).status();
        }
    }
}

/// One node's files: key (shared), config with a [role] section, a file-backed shadow and source.
fn node_config(dir: &Path, me: &str, peer_addr: &str) -> PathBuf {
    let state = dir.join(format!("state-{me}"));
    let text = format!(
        r#"node = "{me}"
key_file = {key:?}
state_dir = {state:?}
[standby]
listen = "0.0.0.0:7788"
peer = "{peer_addr}:7788"
[primary]
peer = "{peer_addr}:7788"
[[volume]]
name = "vol"
source = {src:?}
shadow = {shadow:?}
[monitoring]
standby_node = "b"
[role]
interface = "eth0"
vip = "10.77.8.50/24"
notify = ["echo $BLOCKREP_EVENT $BLOCKREP_NODE >> {dir}/notify-{me}.log"]
[role.garp]
count = 2
interval_ms = 20
[role.services]
primary_only = [{{ hook = "echo $BLOCKREP_ACTION >> {dir}/app-{me}.log" }}]
"#,
        key = dir.join("key"),
        src = dir.join(format!("src-{me}.img")),
        shadow = dir.join(format!("shadow-{me}.img")),
        dir = dir.display(),
    );
    let p = dir.join(format!("{me}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// A daemon the test started: killed and reaped when dropped, so a failing test leaves no `serve` running in a
/// namespace nobody uses any more.
pub(super) struct Daemon(Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl From<Child> for Daemon {
    fn from(c: Child) -> Daemon {
        Daemon(c)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn serve(lan: &Lan, n: &str, cfg: &Path) -> Daemon {
    let mut c = lan
        .blockrep(n)
        .args(["serve", "--announce", "--config"])
        .arg(cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(c.stdout.take().unwrap()), &mut line).unwrap();
    assert!(line.starts_with("listening on"), "{line}");
    Daemon(c)
}

pub(super) fn status(lan: &Lan, n: &str, cfg: &Path) -> serde_json::Value {
    let o = run(lan.blockrep(n).args(["status", "--json", "--config"]).arg(cfg));
    // 0 without alarm, 1 with an alarm raised (the JSON says which).
    assert!(matches!(o.status.code(), Some(0 | 1)), "status: {}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

#[test]
fn promote_demote_and_switchover_move_the_virtual_ip_with_guards() {
    skip_unless_root!();
    let lan = Lan::new();
    let d = tempfile::tempdir().unwrap();
    assert!(run(blockrep().arg("keygen").arg(d.path().join("key"))).status.success());
    for me in ["a", "b"] {
        write_volume(&d.path().join(format!("src-{me}.img")), 1 << 20, 3);
        std::fs::write(d.path().join(format!("shadow-{me}.img")), vec![0u8; 1 << 20]).unwrap();
    }
    let (ca, cb) = (node_config(d.path(), "a", "10.77.8.2"), node_config(d.path(), "b", "10.77.8.1"));

    // B has never received a complete generation: promote is refused as unsafe (exit 4), nothing changes.
    let o = run(lan.blockrep("b").args(["promote", "--config"]).arg(&cb));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("no complete generation"), "{}", stderr(&o));
    assert!(!lan.has_vip("b"));

    // A is primary (forced: its own shadow is irrelevant) and serves role queries; B syncs from... A's serve
    // refuses syncs while primary, so B's shadow is filled by B's own serve from A's sync.
    let o = run(lan.blockrep("a").args(["promote", "--force", "--reason", "initial", "--config"]).arg(&ca));
    assert!(o.status.success(), "promote a: {}", stderr(&o));
    assert!(lan.has_vip("a"));
    let mut serve_b = serve(&lan, "b", &cb);
    let o = run(lan.blockrep("a").args(["sync", "--json", "--config"]).arg(&ca));
    assert!(o.status.success(), "sync a->b: {}", stderr(&o));
    assert_eq!(
        std::fs::read(d.path().join("src-a.img")).unwrap(),
        std::fs::read(d.path().join("shadow-b.img")).unwrap()
    );
    let sb = status(&lan, "b", &cb);
    assert_eq!(sb["role"], "standby", "{sb}");
    assert_eq!(sb["first_full_sync_done"], true, "{sb}");
    assert_eq!(sb["volumes"][0]["generation"], 1, "{sb}");

    // A primary's serve refuses syncs, naming the reason.
    let mut serve_a = serve(&lan, "a", &ca);
    let o = run(lan.blockrep("b").args(["sync", "--config"]).arg(&cb));
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("is primary"), "{}", stderr(&o));

    // Split-brain guard: A still answers as primary, so promoting B is refused (exit 4) and the VIP stays on A.
    let o = run(lan.blockrep("b").args(["promote", "--config"]).arg(&cb));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(lan.has_vip("a") && !lan.has_vip("b"));

    // Dry run changes nothing.
    let o = run(lan.blockrep("b").args(["switchover", "--dry-run", "--config"]).arg(&cb));
    assert!(o.status.success(), "dry run: {}", stderr(&o));
    assert!(lan.has_vip("a") && !lan.has_vip("b"));

    // Switchover from B: A demotes (over the protocol), then B promotes; the VIP moves.
    let o = run(lan.blockrep("b").args(["switchover", "--reason", "maintenance of a", "--config"]).arg(&cb));
    assert!(o.status.success(), "switchover: {}\n{}", stdout(&o), stderr(&o));
    assert!(lan.has_vip("b") && !lan.has_vip("a"));
    let (sa, sb) = (status(&lan, "a", &ca), status(&lan, "b", &cb));
    assert_eq!(sa["role"], "standby", "{sa}");
    assert_eq!(sb["role"], "primary", "{sb}");
    assert!(sb["last_switchover"].to_string().contains("maintenance of a"), "{sb}");
    // B is the node configured as the standby: running as primary there raises an alarm until it demotes.
    let has_alarm = |st: &serde_json::Value| st["alarms"].to_string().contains("primary_on_standby");
    assert!(has_alarm(&sb) && !has_alarm(&sa), "{sb}\n{sa}");
    let app_b = std::fs::read_to_string(d.path().join("app-b.log")).unwrap_or_default();
    assert!(app_b.contains("start"), "primary-only service started on b: {app_b:?}");
    let notify_b = std::fs::read_to_string(d.path().join("notify-b.log")).unwrap_or_default();
    assert!(notify_b.contains("promote b"), "{notify_b:?}");

    // Demote B: VIP gone, standby again.
    let o = run(lan.blockrep("b").args(["demote", "--config"]).arg(&cb));
    assert!(o.status.success(), "demote: {}", stderr(&o));
    assert!(!lan.has_vip("b"));
    let sb = status(&lan, "b", &cb);
    assert_eq!(sb["role"], "standby");
    assert!(!has_alarm(&sb), "the alarm is cleared after the demote: {sb}");
    for c in [&mut serve_a, &mut serve_b] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A and B as in the test above, with A primary (VIP, primary-only hook service started) and B's shadow holding
/// one complete generation of A's source; returns the configurations and B's serve.
pub(super) fn primary_a_synced_to_b(lan: &Lan, d: &Path) -> (PathBuf, PathBuf, Daemon) {
    assert!(run(blockrep().arg("keygen").arg(d.join("key"))).status.success());
    for me in ["a", "b"] {
        write_volume(&d.join(format!("src-{me}.img")), 1 << 20, 3);
        std::fs::write(d.join(format!("shadow-{me}.img")), vec![0u8; 1 << 20]).unwrap();
    }
    let (ca, cb) = (node_config(d, "a", "10.77.8.2"), node_config(d, "b", "10.77.8.1"));
    let o = run(lan.blockrep("a").args(["promote", "--force", "--reason", "initial", "--config"]).arg(&ca));
    assert!(o.status.success(), "promote a: {}", stderr(&o));
    let serve_b = serve(lan, "b", &cb);
    let o = run(lan.blockrep("a").args(["sync", "--config"]).arg(&ca));
    assert!(o.status.success(), "sync a->b: {}", stderr(&o));
    (ca, cb, serve_b)
}

/// Writes `bytes` at `offset` of `path` in place.
fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

pub(super) fn stop(children: &mut [&mut Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn switchover_ships_the_last_write_before_demoting_the_primary() {
    skip_unless_root!();
    let lan = Lan::named("s");
    let d = tempfile::tempdir().unwrap();
    let (ca, cb, mut serve_b) = primary_a_synced_to_b(&lan, d.path());
    let mut serve_a = serve(&lan, "a", &ca);

    // The last write on A after its last sync: a planned switchover must not lose it.
    let last_write = b"the last write on a before the switchover";
    write_at(&d.path().join("src-a.img"), 777_777, last_write);
    assert_ne!(
        std::fs::read(d.path().join("src-a.img")).unwrap(),
        std::fs::read(d.path().join("shadow-b.img")).unwrap()
    );

    let o = run(lan.blockrep("b").args(["switchover", "--reason", "planned", "--json", "--config"]).arg(&cb));
    assert!(o.status.success(), "switchover: {}\n{}", stdout(&o), stderr(&o));
    // The report says how old the promoted data is: the final sync just committed it.
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(report["data_age_s"].as_u64().is_some_and(|a| a < 60), "{report}");
    let (src_a, shadow_b) =
        (std::fs::read(d.path().join("src-a.img")).unwrap(), std::fs::read(d.path().join("shadow-b.img")).unwrap());
    assert!(src_a == shadow_b, "B's shadow is A's source, the last write included");
    assert_eq!(&shadow_b[777_777..777_777 + last_write.len()], last_write);
    assert!(lan.has_vip("b") && !lan.has_vip("a"));
    let (sa, sb) = (status(&lan, "a", &ca), status(&lan, "b", &cb));
    assert_eq!(sa["role"], "standby", "{sa}");
    assert_eq!(sb["role"], "primary", "{sb}");
    // A stopped its service before the final sync and did not start it again.
    let app_a = std::fs::read_to_string(d.path().join("app-a.log")).unwrap();
    assert_eq!(app_a.lines().filter(|l| *l == "start").count(), 1, "{app_a:?}");
    assert_eq!(app_a.lines().last(), Some("stop"), "{app_a:?}");
    // The final sync is in A's history, before its demote.
    let log = stdout(&run(lan.blockrep("a").args(["log", "--config"]).arg(&ca)));
    let (sync2, final_sync, demote) = (
        log.find("sync vol: ok, generation 2"),
        log.find("final-sync: switchover requested by b"),
        log.find("demote: "),
    );
    assert!(sync2.is_some() && final_sync.is_some() && demote.is_some(), "{log}");
    stop(&mut [&mut serve_a, &mut serve_b]);
}

#[test]
fn a_failed_final_sync_leaves_the_primary_primary_with_its_services() {
    skip_unless_root!();
    let lan = Lan::named("f");
    let d = tempfile::tempdir().unwrap();
    let (ca, cb, mut serve_b) = primary_a_synced_to_b(&lan, d.path());
    let mut serve_a = serve(&lan, "a", &ca);
    write_at(&d.path().join("src-a.img"), 4096, b"written after the last sync");

    // B's serve is not running: A's final sync cannot reach it, so nothing is demoted.
    stop(&mut [&mut serve_b]);
    let o = run(lan.blockrep("b").args(["switchover", "--reason", "planned", "--config"]).arg(&cb));
    assert_eq!(o.status.code(), Some(1), "{}\n{}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("final sync before the switchover failed"), "{err}");
    assert!(err.contains("nothing was demoted") && err.contains("stays primary"), "{err}");
    assert!(lan.has_vip("a") && !lan.has_vip("b"));
    let (sa, sb) = (status(&lan, "a", &ca), status(&lan, "b", &cb));
    assert_eq!(sa["role"], "primary", "{sa}");
    assert_eq!(sb["role"], "standby", "{sb}");
    let app_a = std::fs::read_to_string(d.path().join("app-a.log")).unwrap();
    assert_eq!(app_a.lines().collect::<Vec<_>>(), ["start", "stop", "start"], "service restarted on a");

    // A dies (its link goes down): an unplanned promote of B works as before and reports how old its data is
    // (the last write on A is lost: that is what the age says).
    let mut serve_b = serve(&lan, "b", &cb);
    ip(&["-n", &lan.ns("a"), "link", "set", "eth0", "down"]);
    let o = run(lan.blockrep("b").args(["promote", "--reason", "a is dead", "--json", "--config"]).arg(&cb));
    assert!(o.status.success(), "promote b: {}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(report["data_age_s"].as_u64().is_some() && report["last_sync"].as_u64().is_some(), "{report}");
    assert!(lan.has_vip("b"));

    // A comes back still primary and B is demoted again: B's promoted shadow is a split brain for A's final
    // sync, so a switchover is refused as unsafe (exit 4) and again nothing changes.
    ip(&["-n", &lan.ns("a"), "link", "set", "eth0", "up"]);
    let o = run(lan.blockrep("b").args(["demote", "--config"]).arg(&cb));
    assert!(o.status.success(), "demote b: {}", stderr(&o));
    let o = run(lan.blockrep("b").args(["switchover", "--reason", "planned", "--config"]).arg(&cb));
    assert_eq!(o.status.code(), Some(4), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("stays primary"), "{}", stderr(&o));
    assert!(lan.has_vip("a") && !lan.has_vip("b"));
    assert_eq!(status(&lan, "a", &ca)["role"], "primary");
    assert_eq!(status(&lan, "b", &cb)["role"], "standby");
    stop(&mut [&mut serve_a, &mut serve_b]);
}

/// A primary that was never a standby (promoted with --force at installation: its shadow never received a
/// generation) loses its address in a reboot; `blockrep promote`, as an operator or keepalived runs it, re-asserts
/// the address without --force: the data guard judges the shadows a promote would serve, and a node that already
/// is primary serves its own volumes. The peer and ARP guards still apply, services are not touched.
#[test]
fn promote_reasserts_the_address_of_a_primary_that_never_was_a_standby() {
    skip_unless_root!();
    let lan = Lan::named("r");
    let d = tempfile::tempdir().unwrap();
    let (ca, cb, mut serve_b) = primary_a_synced_to_b(&lan, d.path());
    let shadow_a = std::fs::read(d.path().join("shadow-a.img")).unwrap();
    ip(&["-n", &lan.ns("a"), "addr", "del", "10.77.8.50/24", "dev", "eth0"]);
    assert!(!lan.has_vip("a"));

    let o = run(lan.blockrep("a").args(["promote", "--reason", "after reboot", "--config"]).arg(&ca));
    assert!(o.status.success(), "re-assert: {}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("already primary"), "{}", stdout(&o));
    assert!(lan.has_vip("a"), "the address is back");
    let app_a = std::fs::read_to_string(d.path().join("app-a.log")).unwrap();
    assert_eq!(app_a.lines().collect::<Vec<_>>(), ["start"], "services untouched by a re-assert");
    assert_eq!(status(&lan, "a", &ca)["role"], "primary");
    let o = run(lan.blockrep("a").args(["status", "--role", "--config"]).arg(&ca));
    assert!(o.status.success() && stdout(&o) == "primary\n", "status --role: {:?} {}", stdout(&o), stderr(&o));
    assert_eq!(std::fs::read(d.path().join("shadow-a.img")).unwrap(), shadow_a, "A's shadow untouched");
    let log = stdout(&run(lan.blockrep("a").args(["log", "--config"]).arg(&ca)));
    assert!(log.contains("re-assert: after reboot") && !log.contains("promote: after reboot"), "{log}");

    // --generation names a shadow generation to serve: meaningless on a primary, refused as a usage error.
    let o = run(lan.blockrep("a").args(["promote", "--generation", "1", "--config"]).arg(&ca));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("already is primary") && stderr(&o).contains("demote first"), "{}", stderr(&o));

    // Another host holding the address still refuses the re-assert (exit 4): B takes it by force while A's
    // address is gone, and A's promote then finds it in use.
    ip(&["-n", &lan.ns("a"), "addr", "del", "10.77.8.50/24", "dev", "eth0"]);
    stop(&mut [&mut serve_b]);
    let o = run(lan.blockrep("b").args(["promote", "--force", "--config"]).arg(&cb));
    assert!(o.status.success(), "forced promote of b: {}", stderr(&o));
    let o = run(lan.blockrep("a").args(["promote", "--config"]).arg(&ca));
    assert_eq!(o.status.code(), Some(4), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    assert!(!lan.has_vip("a") && lan.has_vip("b"));
}

/// A switchover's final sync stops the primary's services first; when A's serve dies right then (killed by the
/// service's own stop hook here, as an OOM kill or a stop during the final sync would), A stays primary and B
/// standby, and the next start of A's serve starts A's services again instead of leaving the service down.
#[test]
fn a_switchover_interrupted_after_stopping_the_services_restarts_them_when_serve_starts() {
    skip_unless_root!();
    let lan = Lan::named("q");
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (ca, cb, mut serve_b) = primary_a_synced_to_b(&lan, dp);
    let hook = format!("echo $BLOCKREP_ACTION >> {}/app-a.log", dp.display());
    let killer = format!(
        "{hook}; if [ $BLOCKREP_ACTION = stop ] && rm {}/kill-once 2>/dev/null; then kill -9 $PPID; fi",
        dp.display()
    );
    let text = std::fs::read_to_string(&ca).unwrap();
    assert!(text.contains(&hook));
    std::fs::write(&ca, text.replace(&format!("hook = \"{hook}\""), &format!("hook = {killer:?}"))).unwrap();
    std::fs::write(dp.join("kill-once"), "").unwrap();
    let mut serve_a = serve(&lan, "a", &ca);

    let o = run(lan.blockrep("b").args(["switchover", "--reason", "planned", "--config"]).arg(&cb));
    assert_ne!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    let _ = serve_a.wait();
    let app_a = || std::fs::read_to_string(dp.join("app-a.log")).unwrap();
    assert_eq!(app_a(), "start\nstop\n", "the final sync stopped A's service, then serve died");
    assert_eq!(status(&lan, "a", &ca)["role"], "primary");
    assert_eq!(status(&lan, "b", &cb)["role"], "standby");
    assert!(lan.has_vip("a") && !lan.has_vip("b"));

    let mut serve_a = serve(&lan, "a", &ca);
    assert_eq!(app_a(), "start\nstop\nstart\n", "serve started A's service again");
    assert_eq!(status(&lan, "a", &ca)["role"], "primary");
    let log = stdout(&run(lan.blockrep("a").args(["log", "--config"]).arg(&ca)));
    assert!(log.contains("resume: switchover requested by b: planned: interrupted before the demote"), "{log}");
    // Nothing left to resume: a second start changes nothing.
    stop(&mut [&mut serve_a]);
    let mut serve_a = serve(&lan, "a", &ca);
    assert_eq!(app_a(), "start\nstop\nstart\n");

    // The switchover, asked again, goes through.
    let o = run(lan.blockrep("b").args(["switchover", "--reason", "planned", "--config"]).arg(&cb));
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(lan.has_vip("b") && !lan.has_vip("a"));
    assert_eq!(status(&lan, "a", &ca)["role"], "standby");
    stop(&mut [&mut serve_a, &mut serve_b]);
}

/// `blockrep reconcile`, as contrib/systemd/blockrep-reconcile.service runs it at boot: a standby does nothing,
/// a primary nobody replaced gets its address back (services untouched), a primary another node replaced while
/// it was away demotes (its service stops), and the history says which.
#[test]
fn reconcile_reasserts_an_unreplaced_primary_and_demotes_a_replaced_one() {
    skip_unless_root!();
    let lan = Lan::named("rc");
    let d = tempfile::tempdir().unwrap();
    let (ca, cb, mut serve_b) = primary_a_synced_to_b(&lan, d.path());
    let reconcile = |n: &str, cfg: &Path| run(lan.blockrep(n).args(["reconcile", "--json", "--config"]).arg(cfg));
    let json = |o: &std::process::Output| -> serde_json::Value {
        assert!(o.status.success(), "reconcile: {}\n{}", stdout(o), stderr(o));
        serde_json::from_str(stdout(o).trim()).unwrap()
    };
    let app_a = || std::fs::read_to_string(d.path().join("app-a.log")).unwrap();

    let r = json(&reconcile("b", &cb));
    assert_eq!((r["action"].as_str(), r["role"].as_str()), (Some("none"), Some("standby")), "{r}");

    // A reboots: the address is gone, and status raises an alarm naming what to run; nobody else serves, so
    // reconcile brings it back and the alarm clears.
    let vip_alarm = |st: &serde_json::Value| {
        st["alarms"].as_array().unwrap().iter().find(|a| a["kind"] == "vip_missing").map(|a| a.to_string())
    };
    assert_eq!(vip_alarm(&status(&lan, "a", &ca)), None);
    ip(&["-n", &lan.ns("a"), "addr", "del", "10.77.8.50/24", "dev", "eth0"]);
    let alarm = vip_alarm(&status(&lan, "a", &ca)).expect("vip_missing raised");
    assert!(alarm.contains("10.77.8.50/24 is not on eth0") && alarm.contains("blockrep reconcile"), "{alarm}");
    let o = run(lan.blockrep("a").args(["reconcile", "--reason", "boot", "--config"]).arg(&ca));
    assert!(o.status.success() && stdout(&o).contains("virtual IP re-asserted"), "{}\n{}", stdout(&o), stderr(&o));
    assert!(lan.has_vip("a") && !lan.has_vip("b"));
    assert_eq!(vip_alarm(&status(&lan, "a", &ca)), None);
    assert_eq!(app_a(), "start\n", "services untouched");
    assert_eq!(status(&lan, "a", &ca)["role"], "primary");

    // A is away long enough for B to take over; when A comes back, B holds the address: A demotes.
    ip(&["-n", &lan.ns("a"), "addr", "del", "10.77.8.50/24", "dev", "eth0"]);
    stop(&mut [&mut serve_b]);
    let o = run(lan.blockrep("b").args(["promote", "--reason", "a is gone", "--config"]).arg(&cb));
    assert!(o.status.success(), "promote b: {}", stderr(&o));
    let r = json(&reconcile("a", &ca));
    assert_eq!((r["action"].as_str(), r["role"].as_str()), (Some("demoted"), Some("standby")), "{r}");
    assert!(r["why"].as_str().unwrap().contains("in use"), "{r}");
    assert!(lan.has_vip("b") && !lan.has_vip("a"));
    assert_eq!(app_a(), "start\nstop\n", "A's service stopped");
    assert_eq!(status(&lan, "a", &ca)["role"], "standby");
    let log = stdout(&run(lan.blockrep("a").args(["log", "--config"]).arg(&ca)));
    assert!(log.contains("re-assert: boot") && log.contains("demote: reconcile: another node serves"), "{log}");
}

/// A's configuration for a pair that switches back: each node's volume is both its source and its shadow.
fn switchback_config(dir: &Path, me: &str, peer_addr: &str) -> PathBuf {
    let p = node_config(dir, me, peer_addr);
    let text = std::fs::read_to_string(&p).unwrap().replace(&format!("shadow-{me}.img"), &format!("src-{me}.img"));
    std::fs::write(&p, text).unwrap();
    p
}

fn sync_json(lan: &Lan, n: &str, cfg: &Path) -> serde_json::Value {
    let o = run(lan.blockrep(n).args(["sync", "--json", "--config"]).arg(cfg));
    assert!(o.status.success(), "sync on {n}: {}\n{}", stdout(&o), stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

/// A primary, B its standby, both volumes their own shadows (A's holding data, B's zero), a full sync, a write on
/// A, then a planned switchover to B (A's final sync). Returns the configurations and both `serve`s.
fn switched_to_b(lan: &Lan, dp: &Path, size: usize) -> (PathBuf, PathBuf, Daemon, Daemon) {
    assert!(run(blockrep().arg("keygen").arg(dp.join("key"))).status.success());
    write_volume(&dp.join("src-a.img"), size, 5);
    std::fs::write(dp.join("src-b.img"), vec![0u8; size]).unwrap();
    let (ca, cb) = (switchback_config(dp, "a", "10.77.8.2"), switchback_config(dp, "b", "10.77.8.1"));
    let o = run(lan.blockrep("a").args(["promote", "--force", "--reason", "initial", "--config"]).arg(&ca));
    assert!(o.status.success(), "promote a: {}", stderr(&o));
    let serve_b = serve(lan, "b", &cb);
    let serve_a = serve(lan, "a", &ca);
    assert_eq!(sync_json(lan, "a", &ca)["mode"], "full");
    write_at(&dp.join("src-a.img"), 123_456, b"written on a before the switchover");
    let o = run(lan.blockrep("b").args(["switchover", "--reason", "maintenance of a", "--config"]).arg(&cb));
    assert!(o.status.success(), "switchover to b: {}\n{}", stdout(&o), stderr(&o));
    assert!(std::fs::read(dp.join("src-a.img")).unwrap() == std::fs::read(dp.join("src-b.img")).unwrap());
    assert_eq!(status(lan, "b", &cb)["role"], "primary");
    (ca, cb, serve_a, serve_b)
}

#[test]
fn switchback_syncs_incrementally_both_ways() {
    skip_unless_root!();
    let lan = Lan::named("w");
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let vol = |n: &str| std::fs::read(dp.join(format!("src-{n}.img"))).unwrap();
    let (ca, cb, mut serve_a, mut serve_b) = switched_to_b(&lan, dp, 8 << 20);
    // Both adoptions of the switchover are in the nodes' histories, naming the same generation (the final sync's).
    let (a, b) = (adoptions(&lan, "a", &ca), adoptions(&lan, "b", &cb));
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!((a[0]["side"].as_str(), b[0]["side"].as_str()), (Some("standby"), Some("primary")));
    assert_eq!((a[0]["generation"].as_u64(), b[0]["generation"].as_u64()), (Some(2), Some(2)));
    assert_eq!(a[0]["id"], b[0]["id"], "the same generation on both nodes: {a:?} {b:?}");
    let text = stdout(&run(lan.blockrep("a").args(["log", "--config"]).arg(&ca)));
    assert!(text.contains("adopt vol: this node's volume holds generation 2"), "{text}");
    let text = stdout(&run(lan.blockrep("b").args(["log", "--config"]).arg(&cb)));
    assert!(text.contains("adopt vol: the promoted generation 2"), "{text}");

    // B writes its production volume; the reverse sync to A ships only that.
    write_at(&dp.join("src-b.img"), 5_000_000, &[0xb5; 8192]);
    let r = sync_json(&lan, "b", &cb);
    assert_eq!(r["mode"], "incremental", "{r}");
    let wire = r["bytes_on_wire"].as_u64().unwrap();
    assert!(wire <= 3 * 4096 * 11 / 10 + 8192, "bytes on the wire {wire}: {r}");
    assert!(vol("a") == vol("b"), "A's volume is B's after the reverse sync");

    // Switch back to A (B's final sync), then A's sync to B is incremental again.
    write_at(&dp.join("src-b.img"), 42, b"the last write on b");
    let o = run(lan.blockrep("a").args(["switchover", "--reason", "switch back", "--config"]).arg(&ca));
    assert!(o.status.success(), "switchover to a: {}\n{}", stdout(&o), stderr(&o));
    assert!(vol("a") == vol("b"));
    assert_eq!(&vol("a")[42..61], b"the last write on b");
    assert!(lan.has_vip("a") && !lan.has_vip("b"));
    write_at(&dp.join("src-a.img"), 7_000_000, &[0xa7; 4096]);
    let r = sync_json(&lan, "a", &ca);
    assert_eq!(r["mode"], "incremental", "{r}");
    assert!(r["bytes_on_wire"].as_u64().unwrap() <= 2 * 4096 * 11 / 10 + 8192, "{r}");
    assert!(vol("a") == vol("b"), "B's volume is A's after the sync");
    // The switch back is in the histories too, the other way round.
    let (a, b) = (adoptions(&lan, "a", &ca), adoptions(&lan, "b", &cb));
    assert_eq!((a.len(), b.len()), (2, 2), "{a:?} {b:?}");
    assert_eq!((a[1]["side"].as_str(), b[1]["side"].as_str()), (Some("primary"), Some("standby")));
    assert_eq!(a[1]["id"], b[1]["id"]);
    stop(&mut [&mut serve_a, &mut serve_b]);
}

/// The adoptions in a node's history (`blockrep log --json`), oldest first.
fn adoptions(lan: &Lan, n: &str, cfg: &Path) -> Vec<serde_json::Value> {
    let o = run(lan.blockrep(n).args(["log", "--json", "--config"]).arg(cfg));
    assert!(o.status.success(), "log on {n}: {}", stderr(&o));
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "adopted")
        .collect()
}

/// `serve` holds a standby's shadow, releases it when the node is promoted and holds it again after the demote;
/// `status` shows a shadow written outside blockrep as untrusted, and `promote` refuses it (exit 4, naming the
/// volume and why) unless forced.
#[test]
fn promote_refuses_an_untrusted_shadow_and_serve_holds_it_again_after_a_demote() {
    skip_unless_root!();
    use super::trust::{eventually, flocked};
    let lan = Lan::named("h");
    let d = tempfile::tempdir().unwrap();
    let (_ca, cb, mut serve_b) = primary_a_synced_to_b(&lan, d.path());
    let shadow_b = d.path().join("shadow-b.img");
    assert!(flocked(&shadow_b), "B's serve holds its shadow");

    std::thread::sleep(std::time::Duration::from_millis(10));
    write_at(&shadow_b, 5000, b"written outside blockrep");
    let sb = status(&lan, "b", &cb);
    assert!(sb["volumes"][0]["untrusted"].as_str().is_some_and(|w| w.contains("modified")), "{sb}");
    let o = run(lan.blockrep("b").args(["promote", "--config"]).arg(&cb));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("volume vol has an untrusted shadow") && e.contains("modified"), "{e}");
    assert!(e.contains("--force"), "{e}");
    assert!(!lan.has_vip("b"));
    assert_eq!(status(&lan, "b", &cb)["role"], "standby");

    let o = run(lan.blockrep("b").args(["promote", "--force", "--config"]).arg(&cb));
    assert!(o.status.success(), "forced promote: {}", stderr(&o));
    assert!(lan.has_vip("b"));
    assert!(eventually(10, || !flocked(&shadow_b)), "a primary's serve releases the shadow");
    let o = run(lan.blockrep("b").args(["demote", "--config"]).arg(&cb));
    assert!(o.status.success(), "demote: {}", stderr(&o));
    assert!(eventually(10, || flocked(&shadow_b)), "serve holds the shadow again after the demote");
    stop(&mut [&mut serve_b]);
}

#[test]
fn switchback_compares_when_the_old_primary_was_written_after_its_demote() {
    skip_unless_root!();
    let lan = Lan::named("x");
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let vol = |n: &str| std::fs::read(dp.join(format!("src-{n}.img"))).unwrap();
    let (_ca, cb, mut serve_a, mut serve_b) = switched_to_b(&lan, dp, 1 << 20);
    // Something writes A's demoted volume outside blockrep: its evidence no longer matches, so the reverse sync
    // compares A's actual content and repairs it, instead of trusting the adopted generation.
    std::thread::sleep(std::time::Duration::from_millis(10));
    write_at(&dp.join("src-a.img"), 300_000, b"outside write on a");
    write_at(&dp.join("src-b.img"), 600_000, b"written on b");
    let r = sync_json(&lan, "b", &cb);
    assert_eq!(r["mode"], "compare", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("not trusted"), "{r}");
    assert!(vol("a") == vol("b"), "A's volume is repaired");
    stop(&mut [&mut serve_a, &mut serve_b]);
}

#[test]
fn switchback_after_an_unplanned_promote_compares_instead_of_refusing() {
    skip_unless_root!();
    let lan = Lan::named("u");
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let vol = |n: &str| std::fs::read(dp.join(format!("src-{n}.img"))).unwrap();
    let (ca, cb, mut serve_a, mut serve_b) = switched_to_b(&lan, dp, 1 << 20);
    // B (promoted by the switchover, so its standby side was once marked promoted) syncs to A, then writes
    // more and dies before its next sync: A is promoted without B.
    write_at(&dp.join("src-b.img"), 200_000, b"synced from b");
    assert_eq!(sync_json(&lan, "b", &cb)["mode"], "incremental");
    write_at(&dp.join("src-b.img"), 400_000, b"written on b after its last sync, lost by the failover");
    stop(&mut [&mut serve_b]);
    ip(&["-n", &lan.ns("b"), "link", "set", "eth0", "down"]);
    let o = run(lan.blockrep("a").args(["promote", "--reason", "b died", "--config"]).arg(&ca));
    assert!(o.status.success(), "promote a: {}", stderr(&o));
    write_at(&dp.join("src-a.img"), 600_000, b"written on a after the failover");

    // B comes back, is demoted and serves as A's standby: A's sync compares B's actual content (B's last
    // generation is the one A promoted, so this is no split brain) and B ends up with A's volume.
    ip(&["-n", &lan.ns("b"), "link", "set", "eth0", "up"]);
    let o = run(lan.blockrep("b").args(["demote", "--reason", "back after a failure", "--config"]).arg(&cb));
    assert!(o.status.success(), "demote b: {}", stderr(&o));
    // B's history says that its volume became a standby side that may have been written since.
    let b = adoptions(&lan, "b", &cb);
    assert_eq!(b.last().map(|e| e["side"].as_str()), Some(Some("standby-written")), "{b:?}");
    let text = stdout(&run(lan.blockrep("b").args(["log", "--config"]).arg(&cb)));
    assert!(text.contains("adopt vol: this node's volume descends from generation"), "{text}");
    let mut serve_b = serve(&lan, "b", &cb);
    let r = sync_json(&lan, "a", &ca);
    assert_eq!(r["mode"], "compare", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("not trusted"), "{r}");
    assert!(r["bytes_on_wire"].as_u64().unwrap() < 64 << 10, "only the differing pieces are sent: {r}");
    assert!(vol("a") == vol("b"), "B's volume is A's after the sync back");
    // From then on B is an ordinary trusted standby: the next sync is incremental.
    write_at(&dp.join("src-a.img"), 800_000, b"next write on a");
    assert_eq!(sync_json(&lan, "a", &ca)["mode"], "incremental");
    assert!(vol("a") == vol("b"));
    stop(&mut [&mut serve_a, &mut serve_b]);
}

#[test]
fn switchback_after_a_primary_died_mid_sync_compares_instead_of_refusing() {
    skip_unless_root!();
    let lan = Lan::named("m");
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let vol = |n: &str| std::fs::read(dp.join(format!("src-{n}.img"))).unwrap();
    let (ca, cb, mut serve_a, mut serve_b) = switched_to_b(&lan, dp, 4 << 20);
    write_at(&dp.join("src-b.img"), 100_000, b"synced from b");
    assert_eq!(sync_json(&lan, "b", &cb)["mode"], "incremental");
    // B rewrites its whole volume and dies in the middle of its sync to A (sync and serve SIGKILLed, link down): A's
    // standby side keeps the interrupted transfer (a spool) beside its committed generation.
    scribble(&dp.join("src-b.img"), &(0..1024).collect::<Vec<u64>>(), 77);
    let mut sync_b = lan
        .blockrep("b")
        .args(["sync", "--bwlimit", "256K", "--config"])
        .arg(&cb)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let spool = dp.join("state-a/standby/vol/spool");
    let t = std::time::Instant::now();
    while std::fs::metadata(&spool).map_or(0, |m| m.len()) < 128 << 10 {
        if t.elapsed().as_secs() > 20 || matches!(sync_b.try_wait(), Ok(Some(_))) {
            let o = sync_b.wait_with_output().unwrap();
            let ls = run(Command::new("find").arg(dp.join("state-a")).arg("-ls"));
            panic!("no transfer reached A: {}\n{}\n{}", o.status, stderr(&o), stdout(&ls));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    stop(&mut [&mut sync_b, &mut serve_b]);
    ip(&["-n", &lan.ns("b"), "link", "set", "eth0", "down"]);
    let o = run(lan.blockrep("a").args(["promote", "--reason", "b died", "--config"]).arg(&ca));
    assert!(o.status.success(), "promote a: {}", stderr(&o));
    write_at(&dp.join("src-a.img"), 3_000_000, b"written on a after the failover");

    // B comes back and is demoted: A's sync back compares and B ends up with A's volume.
    ip(&["-n", &lan.ns("b"), "link", "set", "eth0", "up"]);
    let o = run(lan.blockrep("b").args(["demote", "--config"]).arg(&cb));
    assert!(o.status.success(), "demote b: {}", stderr(&o));
    let mut serve_b = serve(&lan, "b", &cb);
    let r = sync_json(&lan, "a", &ca);
    assert_eq!(r["mode"], "compare", "{r}");
    assert!(vol("a") == vol("b"), "B's volume is A's after the sync back");
    stop(&mut [&mut serve_a, &mut serve_b]);
}
