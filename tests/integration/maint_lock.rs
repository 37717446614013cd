//! The maintenance lock (`blockrep lock NODE` / `unlock`) with real processes, in the network namespaces of
//! `role_cli` (root needed; CI runs as root): a lock refuses promote and switchover (exit 4, --force included),
//! on the node asked and on the peer asked to demote, survives a restart of `serve`, shows in `status` and `log`,
//! and `unlock` lets the role change through. A demote, and a promote that only re-asserts, stay allowed.

use std::path::Path;

use super::role_cli::{ip, primary_a_synced_to_b, serve, status, stop, Lan};
use super::*;

/// A primary-only hook's log: the `start`/`stop` lines A's service received.
fn app_log(d: &Path, n: &str) -> Vec<String> {
    std::fs::read_to_string(d.join(format!("app-{n}.log"))).unwrap_or_default().lines().map(String::from).collect()
}

/// Runs `blockrep ARGS --config CFG` on node `n`.
fn br(lan: &Lan, n: &str, cfg: &Path, args: &[&str]) -> std::process::Output {
    run(lan.blockrep(n).args(args).arg("--config").arg(cfg))
}

/// The events of a node's history (`blockrep log --json`) of kind `event`.
fn events(lan: &Lan, n: &str, cfg: &Path, event: &str) -> Vec<serde_json::Value> {
    let o = br(lan, n, cfg, &["log", "--json"]);
    assert!(o.status.success(), "log on {n}: {}", stderr(&o));
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == event)
        .collect()
}

#[test]
fn a_maintenance_lock_refuses_promote_and_switchover_until_unlocked() {
    skip_unless_root!();
    let lan = Lan::named("k");
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (ca, cb, mut serve_b) = primary_a_synced_to_b(&lan, dp);
    let mut serve_a = serve(&lan, "a", &ca);
    assert!(lan.has_vip("a") && !lan.has_vip("b"));
    assert_eq!(app_log(dp, "a"), ["start"]);

    // On B (the standby), lock A (its peer, known from the generation A synced). An unknown name is a usage error
    // naming the known ones, and sets nothing.
    let o = br(&lan, "b", &cb, &["lock", "nobody"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("\"nobody\" is not known on b") && stderr(&o).contains("(b, a)"), "{}", stderr(&o));
    let o = br(&lan, "b", &cb, &["lock", "a", "--reason", "kernel update on a"]);
    assert!(o.status.success(), "lock: {}", stderr(&o));
    assert!(stdout(&o).contains("a locked for maintenance on b"), "{}", stdout(&o));

    // Status shows it, as text and as JSON.
    let sb = status(&lan, "b", &cb);
    let locks = sb["maintenance_locks"].as_array().unwrap();
    assert_eq!(locks.len(), 1, "{sb}");
    assert_eq!((locks[0]["node"].as_str(), locks[0]["reason"].as_str()), (Some("a"), Some("kernel update on a")));
    assert!(locks[0]["since"].as_u64().is_some_and(|t| t > 0) && locks[0]["by"].as_str().is_some(), "{sb}");
    let text = stdout(&br(&lan, "b", &cb, &["status"]));
    assert!(text.contains("LOCKED for maintenance: a, set by") && text.contains("kernel update on a"), "{text}");
    assert_eq!(status(&lan, "a", &ca)["maintenance_locks"], serde_json::json!([]), "a lock is local to b");

    // A forced promote is refused (exit 4): role, virtual IP, services and hooks untouched.
    let o = br(&lan, "b", &cb, &["promote", "--force"]);
    assert_eq!(o.status.code(), Some(4), "{}\n{}", stdout(&o), stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("refusing to promote: node a is locked for maintenance on b"), "{e}");
    assert!(e.contains("kernel update on a") && e.contains("--force does not override"), "{e}");
    assert!(e.contains("`blockrep unlock a` on b"), "{e}");
    assert!(!lan.has_vip("b") && lan.has_vip("a"));
    assert_eq!(status(&lan, "b", &cb)["role"], "standby");
    assert!(!std::fs::read_to_string(dp.join("notify-b.log")).unwrap_or_default().contains("promote"));

    // A switchover asked on B is refused there, before A is asked anything: A keeps its role and its service.
    let o = br(&lan, "b", &cb, &["switchover", "--reason", "planned"]);
    assert_eq!(o.status.code(), Some(4), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("refusing to switch over: node a is locked"), "{}", stderr(&o));
    assert!(lan.has_vip("a") && !lan.has_vip("b"));
    assert_eq!(app_log(dp, "a"), ["start"], "A's service was never stopped");

    // The same with B's lock on itself.
    assert!(br(&lan, "b", &cb, &["unlock", "a"]).status.success());
    assert!(br(&lan, "b", &cb, &["lock", "b", "--reason", "disk swap on b"]).status.success());
    let o = br(&lan, "b", &cb, &["switchover", "--force"]);
    assert_eq!(o.status.code(), Some(4), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("node b is locked for maintenance on b"), "{}", stderr(&o));
    assert!(lan.has_vip("a") && !lan.has_vip("b"));
    assert!(br(&lan, "b", &cb, &["unlock", "b"]).status.success());

    // A lock on the primary A (there, on itself): A's serve refuses to demote for B's switchover, before its final
    // sync stops anything. `lock` on a primary warns that the standby can still promote.
    let o = br(&lan, "a", &ca, &["lock", "a", "--reason", "firmware on a"]);
    assert!(o.status.success(), "lock on a: {}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: a is primary") && stderr(&o).contains("lock it on the standby"),
        "{}",
        stderr(&o)
    );
    let o = br(&lan, "b", &cb, &["switchover", "--reason", "planned"]);
    assert_eq!(o.status.code(), Some(4), "{}\n{}", stdout(&o), stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("refusing to demote for a switchover requested by b: node a is locked"), "{e}");
    assert!(e.contains("firmware on a") && e.contains("`blockrep unlock a` on a"), "{e}");
    assert!(lan.has_vip("a") && !lan.has_vip("b"));
    assert_eq!(status(&lan, "a", &ca)["role"], "primary");
    assert_eq!(status(&lan, "b", &cb)["role"], "standby");
    assert_eq!(app_log(dp, "a"), ["start"], "A's service was never stopped");
    // B's lock on A, set while A is locked there too, is what matters once A is gone.
    assert!(br(&lan, "a", &ca, &["unlock", "a"]).status.success());
    assert!(br(&lan, "b", &cb, &["lock", "a", "--reason", "reboot of a"]).status.success());

    // A goes down for its maintenance and B's serve restarts: the lock still refuses B's promote (what keepalived
    // or Pacemaker would run), and `unlock` lets the same promote through.
    stop(&mut [&mut serve_b, &mut serve_a]);
    ip(&["-n", &lan.ns("a"), "link", "set", "eth0", "down"]);
    let mut serve_b = serve(&lan, "b", &cb);
    let o = br(&lan, "b", &cb, &["promote", "--reason", "keepalived: MASTER"]);
    assert_eq!(o.status.code(), Some(4), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("node a is locked") && stderr(&o).contains("reboot of a"), "{}", stderr(&o));
    assert!(!lan.has_vip("b"));
    assert_eq!(status(&lan, "b", &cb)["role"], "standby");
    let o = br(&lan, "b", &cb, &["unlock", "a"]);
    assert!(o.status.success() && stdout(&o).contains("a unlocked on b"), "{}", stderr(&o));
    let o = br(&lan, "b", &cb, &["promote", "--reason", "a is gone"]);
    assert!(o.status.success(), "promote after unlock: {}\n{}", stdout(&o), stderr(&o));
    assert!(lan.has_vip("b"));
    assert_eq!(status(&lan, "b", &cb)["role"], "primary");

    // Under a lock, a promote of a node that already is primary only re-asserts (allowed), and the operator's
    // demote is allowed: it is how the maintenance of a primary starts.
    assert!(br(&lan, "b", &cb, &["lock", "b", "--reason", "maintenance of b"]).status.success());
    let o = br(&lan, "b", &cb, &["promote", "--force"]);
    assert!(o.status.success(), "re-assert: {}", stderr(&o));
    let o = br(&lan, "b", &cb, &["demote"]);
    assert!(o.status.success(), "demote under a lock: {}", stderr(&o));
    assert!(!lan.has_vip("b"));
    assert_eq!(status(&lan, "b", &cb)["maintenance_locks"][0]["node"], "b", "the lock stays after the demote");

    // Both histories tell the story.
    let text = stdout(&br(&lan, "b", &cb, &["log"]));
    for needle in [
        "lock a: maintenance lock set by",
        "promote refused: node a is locked for maintenance",
        "switch over refused: node a is locked for maintenance",
        "unlock a: maintenance lock (kernel update on a) removed by",
        "lock b: maintenance lock set by",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    let (locks, unlocks) = (events(&lan, "b", &cb, "lock"), events(&lan, "b", &cb, "unlock"));
    assert_eq!((locks.len(), unlocks.len()), (4, 3), "{locks:?} {unlocks:?}");
    assert_eq!(locks[0]["reason"], "kernel update on a");
    let refused = events(&lan, "a", &ca, "lock_refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["action"], "demote for a switchover requested by b");
    stop(&mut [&mut serve_b]);
}

/// Without root or network (dry runs only): the lock, a corrupt lock file and an unknown name, through the
/// binary.
#[test]
fn a_corrupt_lock_file_refuses_promote_and_is_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let cfg = d.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "node = \"b\"\nkey_file = {:?}\nstate_dir = {state:?}\n[monitoring]\nstandby_node = \"b\"\n[role]\n\
             interface = \"lo\"\nvip = \"10.77.9.50/24\"\n",
            d.path().join("key")
        ),
    )
    .unwrap();
    let br = |args: &[&str]| run(blockrep().args(args).arg("--config").arg(&cfg));

    let o = br(&["lock", "pbx-z"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("\"pbx-z\" is not known on b: lock this node or its peer by name (b)"),
        "{}",
        stderr(&o)
    );
    let o = br(&["lock", "b", "--reason", "disk swap", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        (j["node"].as_str(), j["reason"].as_str(), j["already"].as_bool()),
        (Some("b"), Some("disk swap"), Some(false))
    );
    let o = br(&["promote", "--force", "--dry-run"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("refusing to promote: node b is locked for maintenance on b"), "{}", stderr(&o));

    // A damaged file: promote refuses (exit 4) naming it, status shows it, and neither lock nor unlock touches it.
    let file = state.join("maintenance_lock.json");
    let damaged = b"{\"version\":1,\"locks\":{\"b\":{\"since\":17";
    std::fs::write(&file, damaged).unwrap();
    // (--dry-run: should the check ever be lost, this test must not add an address to the host's loopback.)
    let o = br(&["promote", "--force", "--dry-run"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("maintenance_lock.json cannot be read") && stderr(&o).contains("a lock may be set"),
        "{}",
        stderr(&o)
    );
    let o = br(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(s["maintenance_lock_error"].as_str().is_some_and(|e| e.contains("cannot be read")), "{s}");
    assert!(stdout(&br(&["status"])).contains("MAINTENANCE LOCK UNREADABLE"));
    for args in [&["unlock", "b"][..], &["lock", "b"][..]] {
        let o = br(args);
        assert_eq!(o.status.code(), Some(4), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(std::fs::read(&file).unwrap(), damaged, "the damaged file is left as it was");
    assert_eq!(status_role(&br(&["status", "--json"])), "standby");
}

fn status_role(o: &std::process::Output) -> String {
    let s: serde_json::Value = serde_json::from_str(stdout(o).trim()).unwrap();
    s["role"].as_str().unwrap_or_default().to_owned()
}
