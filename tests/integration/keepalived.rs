//! keepalived with the contrib template and notify script, as installed (root; network namespaces the test
//! creates). keepalived starts every VRRP instance in BACKUP, also on the primary after a reboot: that must not
//! stop a primary nobody replaced, and the primary must win the election whatever its configured priority.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::role_cli::{ip, primary_a_synced_to_b, serve, status, Daemon, Lan};
use super::{run, stderr, stdout};

pub(super) const KEEPALIVED: &str = "/usr/sbin/keepalived";

/// Starts keepalived in namespace `ns` with `conf`, logging to `dir/keepalived.log` (pid files in `dir`).
pub(super) fn start_keepalived(ns: &str, conf: &Path, dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::File::create(dir.join("keepalived.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns, KEEPALIVED, "--dont-fork", "--log-console", "-f"])
        .arg(conf)
        .arg("-p")
        .arg(dir.join("k.pid"))
        .arg("-r")
        .arg(dir.join("k.vrrp.pid"))
        .arg("-c")
        .arg(dir.join("k.chk.pid"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start keepalived");
    Daemon::from(child)
}

/// The contrib notify script, copied where keepalived's script security accepts it (root-owned, mode 0755).
pub(super) fn install_notify(dir: &Path) -> PathBuf {
    let notify = dir.join("blockrep-keepalived-notify");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/keepalived/blockrep-keepalived-notify"), &notify)
        .unwrap();
    std::fs::set_permissions(&notify, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    notify
}

/// contrib/keepalived/keepalived.conf.template with its fields filled in.
fn render_template(dir: &Path, node: &str, priority: u32, notify: &Path, config: &Path) -> PathBuf {
    let template = include_str!("../../contrib/keepalived/keepalived.conf.template");
    let text = template
        .replace("@NODE@", node)
        .replace("@INTERFACE@", "eth0")
        .replace("@VRID@", "71")
        .replace("@PRIORITY@", &priority.to_string())
        .replace("@NOTIFY@", &notify.display().to_string())
        .replace("@BLOCKREP@", env!("CARGO_BIN_EXE_blockrep"))
        .replace("@CONFIG@", &config.display().to_string())
        .replace("preempt_delay 30", "preempt_delay 3"); // shortened for the test
    let unfilled = text.lines().filter(|l| !l.trim_start().starts_with('#')).any(|l| l.contains('@'));
    assert!(!unfilled, "a template field is left: {text}");
    let path = dir.join(format!("keepalived-{node}.conf"));
    std::fs::write(&path, text).unwrap();
    path
}

fn app_log(dir: &Path, n: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("app-{n}.log"))).unwrap_or_default().lines().map(str::to_owned).collect()
}

fn ka_log(dir: &Path, n: &str) -> String {
    std::fs::read_to_string(dir.join(format!("ka-{n}/keepalived.log"))).unwrap_or_default()
}

/// Waits until `cond` holds (at most `limit`), then lets running notify scripts finish.
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool, logs: impl Fn() -> String) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
}

/// A is primary (installed with `promote --force`, never a standby), B its synced standby, both with keepalived
/// from the template (A preferred). Starting keepalived leaves A primary (before: its BACKUP at start demoted A,
/// and A's MASTER then did not promote it, having never completed a full sync as a standby: no service at all).
/// A power cut of both (no STOP notify, A's address lost) with the priorities now favouring B: A stays primary
/// (the primary's priority bonus), B never becomes MASTER. A switchover in between moves VRRP MASTER with the
/// role, and back. Stopping A's keepalived then fails over to B.
#[test]
fn keepalived_keeps_the_primary_through_a_restart_of_both_and_fails_over_when_it_stops() {
    skip_unless_root!();
    assert!(Path::new(KEEPALIVED).exists(), "{KEEPALIVED} is missing: scripts/deps.sh installs keepalived");
    let lan = Lan::named("kv");
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (ca, cb, serve_b) = primary_a_synced_to_b(&lan, dp);
    let mut serves = [serve_b, serve(&lan, "a", &ca)];
    let notify = install_notify(dp);
    let logs = || format!("A:\n{}\nB:\n{}", ka_log(dp, "a"), ka_log(dp, "b"));
    let start_both = |prio_a: u32, prio_b: u32| {
        let conf_a = render_template(dp, "a", prio_a, &notify, &ca);
        let conf_b = render_template(dp, "b", prio_b, &notify, &cb);
        vec![
            start_keepalived(&lan.ns("a"), &conf_a, &dp.join("ka-a")),
            start_keepalived(&lan.ns("b"), &conf_b, &dp.join("ka-b")),
        ]
    };

    let mut ka = start_both(150, 100);
    wait_for("A MASTER", Duration::from_secs(20), || ka_log(dp, "a").contains("Entering MASTER STATE"), logs);
    assert_eq!(status(&lan, "a", &ca)["role"], "primary", "{}", logs());
    assert!(lan.has_vip("a") && !lan.has_vip("b"), "{}", logs());
    assert_eq!(status(&lan, "b", &cb)["role"], "standby");
    assert_eq!(app_log(dp, "a"), ["start"], "A's service was stopped by keepalived's start\n{}", logs());
    assert!(!ka_log(dp, "b").contains("Entering MASTER STATE"), "{}", logs());

    // A switchover while keepalived runs: B becomes primary and, its priority raised, takes VRRP MASTER over once
    // preempt_delay (3 s here) has passed, so VRRP would notice B failing; the switch back moves it back.
    let masters = |n: &str| ka_log(dp, n).matches("Entering MASTER STATE").count();
    let o = run(lan.blockrep("b").args(["switchover", "--reason", "planned", "--config"]).arg(&cb));
    assert!(o.status.success(), "switchover to b: {}\n{}", stdout(&o), stderr(&o));
    wait_for("B MASTER after the switchover", Duration::from_secs(20), || masters("b") == 1, logs);
    assert!(ka_log(dp, "a").matches("Entering BACKUP STATE").count() >= 2, "A left MASTER: {}", logs());
    assert!(lan.has_vip("b") && !lan.has_vip("a"), "{}", logs());
    assert_eq!(status(&lan, "b", &cb)["role"], "primary", "{}", logs());
    assert_eq!(status(&lan, "a", &ca)["role"], "standby", "{}", logs());
    let o = run(lan.blockrep("a").args(["switchover", "--reason", "back", "--config"]).arg(&ca));
    assert!(o.status.success(), "switchover to a: {}\n{}", stdout(&o), stderr(&o));
    wait_for("A MASTER again", Duration::from_secs(20), || masters("a") == 2, logs);
    assert!(lan.has_vip("a") && !lan.has_vip("b"), "{}", logs());
    assert_eq!(status(&lan, "a", &ca)["role"], "primary", "{}", logs());
    // B's shadow was production while B was primary (this pair's volumes are not swapped back): A's sync refuses
    // it as a split brain until told to discard B's side, which makes it a trusted copy again (B's failover below
    // needs one).
    let o = run(lan.blockrep("a").args(["sync", "--discard-standby-changes", "vol", "--config"]).arg(&ca));
    assert!(o.status.success(), "sync a->b: {}", stderr(&o));
    let services_a = app_log(dp, "a");

    // Power cut of both: every process in both namespaces dies at once (keepalived's children too, so no STOP
    // notify runs) and A's address is gone. They come back with B configured as the preferred server.
    let mut pids = Vec::new();
    for n in ["a", "b"] {
        let o = Command::new("ip").args(["netns", "pids", &lan.ns(n)]).output().unwrap();
        pids.extend(String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned));
    }
    for signal in ["-STOP", "-KILL"] {
        let _ = Command::new("kill").arg(signal).args(&pids).status();
    }
    for k in ka.iter_mut().chain(serves.iter_mut()) {
        let _ = k.wait();
    }
    ip(&["-n", &lan.ns("a"), "addr", "del", "10.77.8.50/24", "dev", "eth0"]);
    for n in ["a", "b"] {
        for pid_file in ["k.pid", "k.vrrp.pid", "k.chk.pid"] {
            let _ = std::fs::remove_file(dp.join(format!("ka-{n}/{pid_file}")));
            // a reboot empties /run
        }
    }
    let _serves = [serve(&lan, "a", &ca), serve(&lan, "b", &cb)];
    let mut ka = start_both(100, 150);
    let a_master = || ka_log(dp, "a").contains("Entering MASTER STATE");
    wait_for("A MASTER after the power cut", Duration::from_secs(20), a_master, logs);
    assert!(lan.has_vip("a"), "{}", logs());
    assert!(!ka_log(dp, "b").contains("Entering MASTER STATE"), "B must not win the election: {}", logs());
    assert_eq!(status(&lan, "a", &ca)["role"], "primary");
    assert_eq!(status(&lan, "b", &cb)["role"], "standby");
    assert!(!lan.has_vip("b"));
    assert_eq!(app_log(dp, "a"), services_a, "A's service untouched by the power cut's restart\n{}", logs());

    // Stopping keepalived on the primary demotes it (STOP) and B takes over.
    let a = ka.remove(0);
    assert!(Command::new("kill").args(["-TERM", &a.id().to_string()]).status().unwrap().success());
    wait_for("B primary", Duration::from_secs(20), || lan.has_vip("b"), logs);
    assert_eq!(status(&lan, "b", &cb)["role"], "primary", "{}", logs());
    assert_eq!(status(&lan, "a", &ca)["role"], "standby", "{}", logs());
    assert!(!lan.has_vip("a"));
    assert_eq!(app_log(dp, "a").last().map(String::as_str), Some("stop"));
    assert_eq!(app_log(dp, "b").last().map(String::as_str), Some("start"));
    drop(a);
}
