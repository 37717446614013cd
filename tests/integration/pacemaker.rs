//! The Pacemaker resource agent (contrib/pacemaker/blockrep) against the real `blockrep` CLI (root; network
//! namespaces the test creates). An OCF agent is a script Pacemaker calls with an action and `OCF_RESKEY_*`
//! parameters: this calls the actions Pacemaker would, in the order it would, on both nodes, so that the agent's
//! reading of `blockrep status --json` and its command lines are checked against the binary, not a stand-in.

use std::path::Path;
use std::process::Command;

use super::role_cli::{primary_a_synced_to_b, serve, status, Lan};
use super::{run, stderr, stdout};

const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/pacemaker/blockrep");

/// Runs agent `action` on node `n` with configuration `cfg`; returns the exit code and what it printed.
fn ocf(lan: &Lan, dir: &Path, n: &str, cfg: &Path, action: &str) -> (Option<i32>, String) {
    let o = run(Command::new("ip")
        .args(["netns", "exec", &lan.ns(n), "/bin/sh", AGENT, action])
        .env("OCF_ROOT", dir.join("no-ocf"))
        .env("OCF_RESOURCE_INSTANCE", "blockrep:0")
        .env("OCF_RESKEY_binary", env!("CARGO_BIN_EXE_blockrep"))
        .env("OCF_RESKEY_config", cfg)
        .env("HA_RSCTMP", dir.join(format!("rsctmp-{n}")))
        .env_remove("BLOCKREP_LOG"));
    (o.status.code(), format!("{}{}", stdout(&o), stderr(&o)))
}

/// A primary (installed with `promote --force`) and its synced standby B, each started as Pacemaker starts a
/// promotable clone: monitor reports A promoted and B unpromoted; a promote of A (Pacemaker after a reboot of the
/// primary) re-asserts; a promote of B while A serves is refused and changes nothing; the failover (demote A,
/// promote B) moves the address; a promote of A then, which never completed a full sync as a standby, is refused
/// by the agent; stop on the primary demotes it.
#[test]
fn pacemaker_agent_drives_the_real_cli_through_a_failover() {
    skip_unless_root!();
    let lan = Lan::named("pc");
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (ca, cb, _serve_b) = primary_a_synced_to_b(&lan, dp);
    let _serve_a = serve(&lan, "a", &ca);
    let a = |action: &str| ocf(&lan, dp, "a", &ca, action);
    let b = |action: &str| ocf(&lan, dp, "b", &cb, action);

    assert_eq!(a("monitor").0, Some(8), "A is primary: OCF_RUNNING_PROMOTED");
    assert_eq!(b("monitor").0, Some(7), "B not started yet: OCF_NOT_RUNNING");
    for (n, r) in [("a", a("start")), ("b", b("start"))] {
        assert_eq!(r.0, Some(0), "start {n}: {}", r.1);
    }
    let (code, text) = b("monitor");
    assert_eq!(code, Some(0), "B started, unpromoted: {text}");

    // Pacemaker promotes the node it finds promoted after a restart: a re-assert.
    let (code, text) = a("promote");
    assert_eq!(code, Some(0), "re-assert on A: {text}");
    assert!(lan.has_vip("a") && !lan.has_vip("b"));

    // B promoted while A still serves (split cluster): refused, nothing moves.
    let (code, text) = b("promote");
    assert_eq!(code, Some(1), "promote of B while A is primary must fail: {text}");
    assert!(text.contains("refused"), "{text}");
    assert_eq!(status(&lan, "b", &cb)["role"], "standby");
    assert!(lan.has_vip("a") && !lan.has_vip("b"));

    // The failover Pacemaker runs when A's resource fails: demote A, promote B.
    let (code, text) = a("demote");
    assert_eq!(code, Some(0), "demote A: {text}");
    assert!(!lan.has_vip("a"));
    let (code, text) = b("promote");
    assert_eq!(code, Some(0), "promote B: {text}");
    assert!(lan.has_vip("b"));
    assert_eq!(b("monitor").0, Some(8));
    assert_eq!(a("monitor").0, Some(0), "A started, unpromoted");
    let st = status(&lan, "b", &cb);
    assert_eq!(
        (st["role"].as_str(), st["last_switchover"]["reason"].as_str()),
        (Some("primary"), Some("pacemaker promote")),
        "{st}"
    );

    // A never completed a full sync as B's standby: the agent does not offer it, and refuses a promote.
    let (code, text) = a("promote");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("first full sync"), "{text}");
    assert_eq!(status(&lan, "a", &ca)["role"], "standby");
    assert!(lan.has_vip("b") && !lan.has_vip("a"));

    // stop on the primary demotes it first.
    let (code, text) = b("stop");
    assert_eq!(code, Some(0), "stop B: {text}");
    assert!(!lan.has_vip("b"));
    assert_eq!(status(&lan, "b", &cb)["role"], "standby");
    assert_eq!(b("monitor").0, Some(7));
}
