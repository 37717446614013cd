//! Role manager tests on real kernel paths: network namespaces created by each test (two servers A and B and an
//! observer "lan" on a bridge, addresses 10.77.0.x and fd77::x only inside them), the `role_cli` example run inside them with
//! `ip netns exec`, keepalived from the Debian package. Every namespace is deleted when the test ends.
//!
//! Needs root; each test prints why it skips otherwise. The `role_cli` example must be built, which
//! `cargo test -p blockrep-role` does (a bare `--test netns` does not build examples).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const IP: &str = "/usr/sbin/ip";
const VIP: &str = "10.77.0.50";
const VIP6: &str = "fd77::50";
/// The address, gateway and route lines of the IPv4-only configuration.
const NET4: &str = r#"vip = "10.77.0.50/24"
gateway = "10.77.0.100"
routes = [{ to = "10.78.0.0/16", via = "10.77.0.100" }]"#;
/// IPv6 only.
const NET6: &str = r#"vip = "fd77::50/64""#;
/// Dual stack: both VIPs, a default gateway and a route per family.
const NET_DUAL: &str = r#"vip = ["10.77.0.50/24", "fd77::50/64"]
gateway = ["10.77.0.100", "fd77::100"]
routes = [{ to = "10.78.0.0/16", via = "10.77.0.100" }, { to = "fd78::/48", via = "fd77::100" }]"#;

fn role_cli() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let p = profile_dir.join("examples/role_cli");
    assert!(
        p.exists(),
        "{} is missing: run `cargo test -p blockrep-role` (which builds examples) or `cargo build -p blockrep-role --example role_cli`",
        p.display()
    );
    p
}

/// Why this machine cannot run namespace tests, if it cannot.
fn cannot_run(tag: &str) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (namespace tests need CAP_NET_ADMIN; CI runs them as root)".into());
    }
    for tool in [IP, "/usr/bin/ping"] {
        if !Path::new(tool).exists() {
            return Some(format!("{tool} is missing (scripts/deps.sh installs it)"));
        }
    }
    let probe = format!("rlprobe{}{tag}", std::process::id());
    let ok = Command::new(IP).args(["netns", "add", &probe]).status().is_ok_and(|s| s.success());
    if !ok {
        return Some("`ip netns add` fails here (no network namespace support)".into());
    }
    let _ = Command::new(IP).args(["netns", "del", &probe]).status();
    None
}

macro_rules! lab_or_skip {
    ($tag:expr) => {
        match cannot_run($tag) {
            Some(why) => {
                eprintln!("SKIP {}: {why}", $tag);
                return;
            }
            None => Lab::new($tag),
        }
    };
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Three namespaces on a bridge; deleted (with any keepalived started here) on drop.
struct Lab {
    prefix: String,
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
    cli: PathBuf,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let prefix = format!("rl{}{}", std::process::id(), tag);
        let dir = tempfile::tempdir().expect("tempdir");
        let lab = Lab { prefix, dir, daemons: Vec::new(), cli: role_cli() };
        let lan = lab.ns("lan");
        ok(Command::new(IP).args(["netns", "add", &lan]));
        let steps: Vec<Vec<String>> = vec![
            vec!["-n", &lan, "link", "add", "br0", "type", "bridge"],
            vec!["-n", &lan, "link", "set", "br0", "up"],
            vec!["-n", &lan, "addr", "add", "10.77.0.100/24", "dev", "br0"],
            // The observer's IPv6 address is usable at once (no DAD wait in the test; promote itself never needs
            // this: it adds the VIP with IFA_F_NODAD after its own duplicate address detection).
            vec!["-n", &lan, "addr", "add", "fd77::100/64", "dev", "br0", "nodad"],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect())
        .collect();
        for s in steps {
            ok(Command::new(IP).args(&s));
        }
        ok(Command::new(IP).args(["netns", "exec", &lan, "sysctl", "-qw", "net.ipv4.conf.br0.arp_accept=1"]));
        for (n, addr) in [("A", "10.77.0.1/24"), ("B", "10.77.0.2/24")] {
            let ns = lab.ns(n);
            let (veth, port) = (format!("veth{n}"), format!("port{n}"));
            ok(Command::new(IP).args(["netns", "add", &ns]));
            ok(Command::new(IP)
                .args(["-n", &ns, "link", "add", &veth, "type", "veth", "peer", "name", &port, "netns", &lan]));
            ok(Command::new(IP).args(["-n", &lan, "link", "set", &port, "master", "br0", "up"]));
            ok(Command::new(IP).args(["-n", &ns, "link", "set", &veth, "up"]));
            ok(Command::new(IP).args(["-n", &ns, "link", "set", "lo", "up"]));
            ok(Command::new(IP).args(["-n", &ns, "addr", "add", addr, "dev", &veth]));
            fs::create_dir_all(lab.node_dir(n)).unwrap();
            role::grubenv::GrubEnv::default().write(&lab.node_dir(n).join("grubenv")).unwrap();
        }
        lab.write_config("A", "");
        lab.write_config("B", "");
        lab
    }

    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    fn node_dir(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    fn config_path(&self, n: &str) -> PathBuf {
        self.node_dir(n).join("blockrep.toml")
    }

    /// Writes node `n`'s configuration; `primary_hook` replaces the primary-only service hook if non-empty.
    fn write_config(&self, n: &str, primary_hook: &str) {
        self.write_config_net(n, primary_hook, NET4);
    }

    /// Writes node `n`'s configuration with `net` as its vip, gateway and routes lines.
    fn write_config_net(&self, n: &str, primary_hook: &str, net: &str) {
        let d = self.node_dir(n);
        let d = d.display();
        let default_hook = format!("echo $BLOCKREP_ACTION >> {d}/primary.log");
        let hook = if primary_hook.is_empty() { default_hook.as_str() } else { primary_hook };
        let text = format!(
            r#"[role]
node = "{n}"
state_dir = "{d}/state"
interface = "veth{n}"
{net}
notify = ["echo $BLOCKREP_EVENT $BLOCKREP_NODE $BLOCKREP_REASON >> {d}/notify.log"]
poweroff_command = ["/bin/sh", "-c", "echo off > {d}/poweroff.marker"]
[role.garp]
count = 3
interval_ms = 50
refresh_s = 1
refresh_interval_s = 1
[role.boot_target]
kind = "grub-env"
path = "{d}/grubenv"
primary_entry = "blockrep-primary"
standby_entry = "blockrep-standby"
[role.services]
standby_only = [{{ hook = "echo $BLOCKREP_ACTION >> {d}/standby.log", timeout_s = 5 }}]
primary_only = [{{ hook = {hook:?}, timeout_s = 5 }}]
"#
        );
        fs::write(self.config_path(n), text).unwrap();
    }

    /// Runs `role_cli --config <n's config> ARGS` inside namespace `n`.
    fn cli(&self, n: &str, args: &[&str]) -> Output {
        let cfg = self.config_path(n);
        run(Command::new(IP).args(["netns", "exec", &self.ns(n)]).arg(&self.cli).arg("--config").arg(&cfg).args(args))
    }

    fn cli_ok(&self, n: &str, args: &[&str]) -> String {
        let out = self.cli(n, args);
        assert!(
            out.status.success(),
            "role_cli {args:?} in {n} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn status(&self, n: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(n, &["status", "--json"])).expect("status JSON")
    }

    fn mac(&self, n: &str) -> String {
        let out = ok(Command::new(IP).args(["-n", &self.ns(n), "-o", "link", "show", &format!("veth{n}")]));
        let i = out.find("link/ether ").expect("ether address") + "link/ether ".len();
        out[i..i + 17].to_string()
    }

    fn has_vip(&self, n: &str) -> bool {
        let out =
            ok(Command::new(IP).args(["-n", &self.ns(n), "-4", "-o", "addr", "show", "dev", &format!("veth{n}")]));
        out.contains(&format!("inet {VIP}/24"))
    }

    fn routes(&self, n: &str) -> String {
        ok(Command::new(IP).args(["-n", &self.ns(n), "-4", "route", "show"]))
    }

    fn has_vip6(&self, n: &str) -> bool {
        let out =
            ok(Command::new(IP).args(["-n", &self.ns(n), "-6", "-o", "addr", "show", "dev", &format!("veth{n}")]));
        out.contains(&format!("inet6 {VIP6}/64"))
    }

    fn routes6(&self, n: &str) -> String {
        ok(Command::new(IP).args(["-n", &self.ns(n), "-6", "route", "show"]))
    }

    /// The MAC the observer's IPv6 neighbour cache holds for the IPv6 VIP (`ip -6 neigh`).
    fn observed_mac6(&self) -> Option<String> {
        let out = ok(Command::new(IP).args(["-n", &self.ns("lan"), "-6", "neigh", "show", VIP6, "dev", "br0"]));
        out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).map(String::from)
    }

    fn observer_reaches_vip6(&self) -> bool {
        run(Command::new(IP).args(["netns", "exec", &self.ns("lan"), "ping", "-6", "-c1", "-W1", VIP6]))
            .status
            .success()
    }

    /// The MAC the observer's neighbour table holds for the VIP.
    fn observed_mac(&self) -> Option<String> {
        let out = ok(Command::new(IP).args(["-n", &self.ns("lan"), "neigh", "show", VIP, "dev", "br0"]));
        out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).map(String::from)
    }

    fn observer_reaches_vip(&self) -> bool {
        run(Command::new(IP).args(["netns", "exec", &self.ns("lan"), "ping", "-c1", "-W1", VIP])).status.success()
    }

    fn log(&self, n: &str, name: &str) -> String {
        fs::read_to_string(self.node_dir(n).join(name)).unwrap_or_default()
    }

    fn grub_entry(&self, n: &str) -> String {
        let env = role::grubenv::GrubEnv::read(&self.node_dir(n).join("grubenv")).unwrap();
        env.get("saved_entry").unwrap_or("").to_string()
    }

    fn wait_until(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < limit, "timed out after {limit:?} waiting until {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
        t.elapsed()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.daemons {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in ["A", "B", "lan"] {
            let _ = Command::new(IP).args(["netns", "del", &self.ns(n)]).status();
        }
    }
}

fn ms_from_stderr(out: &Output) -> String {
    let e = String::from_utf8_lossy(&out.stderr);
    e.lines().find(|l| l.contains(" took ")).unwrap_or("").to_string()
}

#[test]
fn promote_moves_the_vip_announces_the_new_mac_and_demote_removes_it() {
    let lab = lab_or_skip!("mv");
    // A dry run changes nothing.
    let plan = lab.cli_ok("B", &["promote", "--dry-run"]);
    assert!(plan.contains("would run") && plan.contains("vip"), "{plan}");
    assert!(!lab.has_vip("B"));
    assert!(!lab.node_dir("B").join("state/role.state").exists(), "dry run wrote the state");

    // B takes the VIP first, so that the observer has a neighbour entry pointing at B.
    lab.cli_ok("B", &["promote", "--reason", "first"]);
    assert!(lab.has_vip("B"));
    assert!(lab.observer_reaches_vip());
    assert_eq!(lab.observed_mac().as_deref(), Some(lab.mac("B").as_str()));
    lab.cli_ok("B", &["demote", "--reason", "handover"]);
    assert!(!lab.has_vip("B"));

    // A promotes: the observer learns A's MAC from our gratuitous ARP alone (no traffic from the observer yet).
    let t = Instant::now();
    let out = lab.cli("A", &["promote", "--reason", "handover"]);
    let wall = t.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!(
        "MEASURED promote without reboot in namespace A: {:.1} ms wall-clock incl. ip netns exec; {}\n{}",
        wall.as_secs_f64() * 1000.0,
        ms_from_stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(lab.has_vip("A"));
    assert_eq!(lab.observed_mac().as_deref(), Some(lab.mac("A").as_str()), "observer still has the old MAC");
    assert!(lab.observer_reaches_vip());
    let routes = lab.routes("A");
    assert!(routes.contains("default via 10.77.0.100") && routes.contains("10.78.0.0/16 via 10.77.0.100"), "{routes}");
    assert_eq!(lab.grub_entry("A"), "blockrep-primary");
    assert_eq!(lab.log("A", "primary.log"), "start\n");
    assert_eq!(lab.log("A", "standby.log"), "stop\n");
    assert_eq!(lab.log("A", "notify.log"), "promote A handover\n");
    let st = lab.status("A");
    assert_eq!(st["role"], "primary");
    assert_eq!(st["accepts_syncs"], false);
    assert_eq!(st["last_switchover"]["reason"], "handover");
    assert!(st["plan"].is_null());

    // Promote again: nothing to do.
    // A neighbour that forgot the VIP learns it again from the periodic re-announcement.
    ok(Command::new(IP).args(["-n", &lab.ns("lan"), "neigh", "flush", "dev", "br0"]));
    assert_eq!(lab.observed_mac(), None);
    lab.cli_ok("A", &["refresh"]);
    assert_eq!(lab.observed_mac().as_deref(), Some(lab.mac("A").as_str()), "refresh did not re-announce");

    let again = lab.cli_ok("A", &["promote"]);
    assert!(again.contains("already primary"), "{again}");
    assert_eq!(lab.log("A", "primary.log"), "start\n");
    // A primary that lost its address (a reboot does that) gets it back from promote, services untouched.
    ok(Command::new(IP).args(["-n", &lab.ns("A"), "addr", "del", &format!("{VIP}/24"), "dev", "vethA"]));
    lab.cli_ok("A", &["promote"]);
    assert!(lab.has_vip("A"));
    assert_eq!(lab.log("A", "primary.log"), "start\n");
    assert!(lab.status("A")["plan"].is_null());

    lab.cli_ok("A", &["demote", "--reason", "maintenance"]);
    assert!(!lab.has_vip("A"));
    let routes = lab.routes("A");
    assert!(!routes.contains("default") && !routes.contains("10.78.0.0"), "{routes}");
    assert!(!lab.observer_reaches_vip(), "VIP still answers after demote");
    assert_eq!(lab.grub_entry("A"), "blockrep-standby");
    assert_eq!(lab.log("A", "primary.log"), "start\nstop\n");
    let st = lab.status("A");
    assert_eq!(st["role"], "standby");
    assert_eq!(st["accepts_syncs"], true);
    assert_eq!(st["last_switchover"]["reason"], "maintenance");
}

#[test]
fn promote_refuses_while_another_host_answers_for_the_vip_and_names_its_mac() {
    let lab = lab_or_skip!("sb");
    ok(Command::new(IP).args(["-n", &lab.ns("B"), "addr", "add", &format!("{VIP}/24"), "dev", "vethB"]));
    let out = lab.cli("A", &["promote", "--reason", "split-brain test"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "expected 'refused as unsafe': {err}");
    assert!(err.contains(&lab.mac("B")), "error does not name B's MAC {}: {err}", lab.mac("B"));
    assert!(!lab.has_vip("A"));
    let st = lab.status("A");
    assert_eq!(st["role"], "standby", "a refused promote changed the role");
    assert_eq!(st["accepts_syncs"], true);
    assert_eq!(lab.log("A", "primary.log"), "");

    // Once B gives the address up, the same promote goes through.
    ok(Command::new(IP).args(["-n", &lab.ns("B"), "addr", "del", &format!("{VIP}/24"), "dev", "vethB"]));
    lab.cli_ok("A", &["promote"]);
    assert!(lab.has_vip("A"));
}

fn step_keys(lab: &Lab, kind: &str) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_str(&lab.cli_ok("A", &[kind, "--dry-run", "--json"])).unwrap();
    json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["outcome"] == "planned")
        .map(|s| s["step"].as_str().unwrap().to_string())
        .filter(|k| k != "guards")
        .collect()
}

#[test]
fn a_crash_after_any_step_is_finished_by_running_the_command_again() {
    let lab = lab_or_skip!("cr");
    let promote_keys = step_keys(&lab, "promote");
    assert!(promote_keys.len() >= 9, "{promote_keys:?}");
    for (i, key) in promote_keys.iter().enumerate() {
        let out = lab.cli("A", &["promote", "--reason", "crash test", "--crash-after", key]);
        assert!(!out.status.success(), "promote did not crash after {key}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("crash after step {key}")));
        let st = lab.status("A");
        if key == "role-primary" {
            assert_eq!(st["role"], "primary");
        } else {
            assert_eq!(st["role"], "promoting", "after a crash at {key}");
            assert_eq!(st["plan"]["done"].as_array().unwrap().last().unwrap(), key.as_str());
        }
        lab.cli_ok("A", &["promote", "--reason", "crash test"]);
        let st = lab.status("A");
        assert_eq!(st["role"], "primary", "after resuming from {key}");
        assert!(st["plan"].is_null());
        assert!(lab.has_vip("A"), "no VIP after resuming from {key}");
        assert_eq!(lab.grub_entry("A"), "blockrep-primary");
        // Journaled services ran exactly once per promote, crash or not.
        assert_eq!(lab.log("A", "primary.log").matches("start").count(), i + 1, "after resuming from {key}");
        lab.cli_ok("A", &["demote"]);
        assert!(!lab.has_vip("A"));
    }

    lab.cli_ok("A", &["promote"]);
    let demote_keys = step_keys(&lab, "demote");
    assert!(demote_keys.len() >= 6, "{demote_keys:?}");
    let stops_before = lab.log("A", "primary.log").matches("stop").count();
    for (i, key) in demote_keys.iter().enumerate() {
        let out = lab.cli("A", &["demote", "--crash-after", key]);
        assert!(!out.status.success(), "demote did not crash after {key}");
        lab.cli_ok("A", &["demote"]);
        let st = lab.status("A");
        assert_eq!(st["role"], "standby", "after resuming demote from {key}");
        assert_eq!(st["accepts_syncs"], true);
        assert!(!lab.has_vip("A"));
        assert_eq!(lab.grub_entry("A"), "blockrep-standby");
        assert_eq!(lab.log("A", "primary.log").matches("stop").count(), stops_before + i + 1);
        lab.cli_ok("A", &["promote"]);
    }
}

#[test]
fn a_failing_service_start_stops_promote_and_status_says_where() {
    let lab = lab_or_skip!("fs");
    lab.write_config("A", "echo database will not start >&2; exit 7");
    let out = lab.cli("A", &["promote", "--reason", "svc"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("start-primary-services") && err.contains("database will not start"), "{err}");
    let st = lab.status("A");
    assert_eq!(st["role"], "promoting");
    let failed = st["plan"]["failed"]["step"].as_str().unwrap();
    assert!(failed.starts_with("start-primary-services/"), "{failed}");
    assert!(st["plan"]["failed"]["error"].as_str().unwrap().contains("database will not start"));
    assert!(lab.log("A", "notify.log").contains("promote-failed A svc"));
    // The operator fixes the service and runs promote again: it continues and completes.
    lab.write_config("A", "");
    lab.cli_ok("A", &["promote", "--reason", "svc"]);
    let st = lab.status("A");
    assert_eq!(st["role"], "primary");
    assert!(lab.has_vip("A"));

    // demote --poweroff: the reverse plan, then the configured poweroff command.
    lab.cli_ok("A", &["demote", "--poweroff", "--reason", "defective"]);
    assert_eq!(fs::read_to_string(lab.node_dir("A").join("poweroff.marker")).unwrap(), "off\n");
    assert_eq!(lab.status("A")["role"], "standby");
    assert!(!lab.has_vip("A"));
}

fn render_keepalived(lab: &Lab, n: &str, priority: u32, notify: &Path) -> PathBuf {
    let template = include_str!("../../contrib/keepalived/keepalived.conf.template");
    let text = template
        .replace("@NODE@", n)
        .replace("@INTERFACE@", &format!("veth{n}"))
        .replace("@VRID@", "77")
        .replace("@PRIORITY@", &priority.to_string())
        .replace("@NOTIFY@", &notify.display().to_string())
        .replace("@BLOCKREP@", &lab.cli.display().to_string())
        .replace("@CONFIG@", &lab.config_path(n).display().to_string());
    let p = lab.node_dir(n).join("keepalived.conf");
    fs::write(&p, text).unwrap();
    p
}

#[test]
fn keepalived_failover_promotes_the_other_node_through_the_notify_script() {
    const KEEPALIVED: &str = "/usr/sbin/keepalived";
    if !Path::new(KEEPALIVED).exists() && cannot_run("kacheck").is_none() {
        panic!("{KEEPALIVED} is missing: install the Debian package keepalived (scripts/deps.sh does)");
    }
    let mut lab = lab_or_skip!("ka");
    // A dual-stack service: keepalived (VRRP over IPv4) only elects; blockrep moves both addresses.
    for n in ["A", "B"] {
        lab.write_config_net(n, "", NET_DUAL);
    }
    let notify = lab.dir.path().join("blockrep-keepalived-notify");
    fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/keepalived/blockrep-keepalived-notify"), &notify)
        .unwrap();

    // Before its first full sync a node does not promote, even when VRRP says MASTER.
    let out = run(Command::new(IP)
        .args(["netns", "exec", &lab.ns("B"), "/bin/sh"])
        .arg(&notify)
        .arg("--blockrep")
        .arg(&lab.cli)
        .arg("--config")
        .arg(lab.config_path("B"))
        .args(["INSTANCE", "blockrep", "MASTER", "100"]));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("first full sync"), "{out:?}");
    assert!(!lab.has_vip("B"));
    assert_eq!(lab.status("B")["role"], "standby");

    for n in ["A", "B"] {
        lab.cli_ok(n, &["mark-synced"]);
    }
    for (n, prio) in [("A", 150), ("B", 100)] {
        let conf = render_keepalived(&lab, n, prio, &notify);
        let d = lab.node_dir(n);
        let log = fs::File::create(d.join("keepalived.log")).unwrap();
        let child = Command::new(IP)
            .args(["netns", "exec", &lab.ns(n), KEEPALIVED, "--dont-fork", "--log-console", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(d.join("k.pid"))
            .arg("-r")
            .arg(d.join("k.vrrp.pid"))
            .arg("-c")
            .arg(d.join("k.chk.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start keepalived");
        lab.daemons.push(child);
    }
    let took = lab.wait_until("A is primary through keepalived", Duration::from_secs(10), || {
        lab.has_vip("A") && lab.has_vip6("A") && lab.status("A")["role"] == "primary"
    });
    println!("keepalived made A primary {took:?} after start");
    assert!(!lab.has_vip("B") && !lab.has_vip6("B"));
    assert!(lab.observer_reaches_vip6());
    assert!(lab.status("A")["last_switchover"]["reason"].as_str().unwrap().contains("keepalived"));

    // Stop keepalived on the primary: it demotes (STOP), B becomes MASTER and promotes.
    let a = lab.daemons.remove(0);
    let pid = nix::unistd::Pid::from_raw(a.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut a = a;
    let took = lab.wait_until("B is primary after A's keepalived stopped", Duration::from_secs(10), || {
        lab.has_vip("B") && lab.has_vip6("B") && lab.status("B")["role"] == "primary"
    });
    println!("MEASURED keepalived failover: B primary {took:?} after SIGTERM to A's keepalived");
    let _ = a.wait();
    assert!(!lab.has_vip("A") && !lab.has_vip6("A"));
    assert_eq!(lab.status("A")["role"], "standby");
    assert!(lab.observer_reaches_vip());
    assert_eq!(lab.observed_mac().as_deref(), Some(lab.mac("B").as_str()));
    assert_eq!(lab.observed_mac6().as_deref(), Some(lab.mac("B").as_str()), "IPv6 neighbour entry not moved to B");
    assert!(lab.observer_reaches_vip6());
}

#[test]
fn pacemaker_agent_promotes_and_demotes_through_the_cli() {
    let lab = lab_or_skip!("pm");
    let agent = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/pacemaker/blockrep");
    let rsctmp = lab.dir.path().join("rsctmp");
    let ocf = |action: &str| -> (Option<i32>, String) {
        let out = run(Command::new(IP)
            .args(["netns", "exec", &lab.ns("A"), "/bin/sh", agent, action])
            .env("OCF_ROOT", lab.dir.path().join("no-ocf"))
            .env("OCF_RESOURCE_INSTANCE", "blockrep:0")
            .env("OCF_RESKEY_binary", &lab.cli)
            .env("OCF_RESKEY_config", lab.config_path("A"))
            .env("HA_RSCTMP", &rsctmp));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    let (code, xml) = ocf("meta-data");
    assert_eq!(code, Some(0));
    assert!(xml.contains("<resource-agent name=\"blockrep\"") && xml.contains("<action name=\"promote\""), "{xml}");
    assert_eq!(ocf("monitor").0, Some(7), "not started yet: OCF_NOT_RUNNING");
    assert_eq!(ocf("start").0, Some(0));
    assert_eq!(ocf("monitor").0, Some(0), "started, unpromoted");
    let (code, text) = ocf("promote");
    assert_eq!(code, Some(1), "promote before the first full sync must fail: {text}");
    assert!(text.contains("first full sync"), "{text}");
    assert!(!lab.has_vip("A"));

    lab.cli_ok("A", &["mark-synced"]);
    assert_eq!(ocf("promote").0, Some(0));
    assert!(lab.has_vip("A"));
    assert_eq!(ocf("monitor").0, Some(8), "OCF_RUNNING_PROMOTED");
    assert_eq!(lab.status("A")["last_switchover"]["reason"], "pacemaker promote");
    assert_eq!(ocf("demote").0, Some(0));
    assert!(!lab.has_vip("A"));
    assert_eq!(ocf("monitor").0, Some(0));
    // stop on a primary demotes first.
    assert_eq!(ocf("promote").0, Some(0));
    assert_eq!(ocf("stop").0, Some(0));
    assert!(!lab.has_vip("A"));
    assert_eq!(lab.status("A")["role"], "standby");
    assert_eq!(ocf("monitor").0, Some(7));
    // Misconfiguration is reported as such.
    let out = run(Command::new("/bin/sh")
        .args([agent, "monitor"])
        .env("OCF_ROOT", lab.dir.path().join("no-ocf"))
        .env("OCF_RESKEY_binary", "/nonexistent/blockrep"));
    assert_eq!(out.status.code(), Some(5), "OCF_ERR_INSTALLED");
}

#[test]
fn ipv6_vip_moves_and_the_observer_learns_the_new_mac_from_our_neighbour_advertisements() {
    let lab = lab_or_skip!("v6");
    for n in ["A", "B"] {
        lab.write_config_net(n, "", NET6);
    }
    // B holds the VIP first and the observer talks to it, so its neighbour cache points at B.
    lab.cli_ok("B", &["promote", "--reason", "first"]);
    assert!(lab.has_vip6("B"));
    let addr = ok(Command::new(IP).args(["-n", &lab.ns("B"), "-6", "-o", "addr", "show", "dev", "vethB"]));
    let line = addr.lines().find(|l| l.contains(&format!("inet6 {VIP6}/64"))).unwrap_or_default();
    assert!(line.contains("nodad") && !line.contains("tentative"), "the VIP must be usable at once: {addr}");
    assert!(lab.observer_reaches_vip6());
    assert_eq!(lab.observed_mac6().as_deref(), Some(lab.mac("B").as_str()));
    lab.cli_ok("B", &["demote", "--reason", "handover"]);
    assert!(!lab.has_vip6("B"));
    assert_eq!(lab.observed_mac6().as_deref(), Some(lab.mac("B").as_str()), "observer entry still B's");

    // A promotes: its unsolicited advertisements (override flag) alone move the observer's entry to A's MAC.
    let t = Instant::now();
    let out = lab.cli("A", &["promote", "--reason", "handover"]);
    let wall = t.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!(
        "MEASURED IPv6 promote in namespace A: {:.1} ms wall-clock incl. ip netns exec; {}",
        wall.as_secs_f64() * 1000.0,
        ms_from_stderr(&out)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("nobody answers DAD for fd77::50"), "{report}");
    assert!(lab.has_vip6("A"));
    assert_eq!(lab.observed_mac6().as_deref(), Some(lab.mac("A").as_str()), "observer still has the old MAC");
    assert!(lab.observer_reaches_vip6());

    // A neighbour that missed the announcement and still has a stale MAC is corrected by the periodic
    // re-announcement.
    ok(Command::new(IP).args([
        "-n",
        &lab.ns("lan"),
        "-6",
        "neigh",
        "replace",
        VIP6,
        "lladdr",
        "02:de:ad:00:00:01",
        "dev",
        "br0",
        "nud",
        "stale",
    ]));
    assert_eq!(lab.observed_mac6().as_deref(), Some("02:de:ad:00:00:01"));
    lab.cli_ok("A", &["refresh"]);
    assert_eq!(lab.observed_mac6().as_deref(), Some(lab.mac("A").as_str()), "refresh did not re-announce");

    lab.cli_ok("A", &["demote", "--reason", "maintenance"]);
    assert!(!lab.has_vip6("A"));
    assert!(!lab.observer_reaches_vip6(), "IPv6 VIP still answers after demote");
    assert_eq!(lab.status("A")["role"], "standby");
}

#[test]
fn promote_refuses_while_another_host_holds_the_ipv6_vip_and_names_its_mac() {
    let lab = lab_or_skip!("d6");
    for n in ["A", "B"] {
        lab.write_config_net(n, "", NET6);
    }
    // B holds the address (added by hand, usable at once: it must answer our duplicate address detection).
    ok(Command::new(IP).args(["-n", &lab.ns("B"), "addr", "add", &format!("{VIP6}/64"), "dev", "vethB", "nodad"]));
    let out = lab.cli("A", &["promote", "--reason", "split-brain test"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "expected 'refused as unsafe': {err}");
    assert!(err.contains(&lab.mac("B")), "error does not name B's MAC {}: {err}", lab.mac("B"));
    assert!(err.contains("duplicate address detection"), "{err}");
    assert!(!lab.has_vip6("A"));
    let st = lab.status("A");
    assert_eq!(st["role"], "standby", "a refused promote changed the role");
    assert_eq!(st["accepts_syncs"], true);
    assert_eq!(lab.log("A", "primary.log"), "");
    // The probe on its own says the same.
    let probe = lab.cli_ok("A", &["probe"]);
    assert_eq!(probe.trim(), format!("{VIP6} {}", lab.mac("B")));

    ok(Command::new(IP).args(["-n", &lab.ns("B"), "addr", "del", &format!("{VIP6}/64"), "dev", "vethB"]));
    assert_eq!(lab.cli_ok("A", &["probe"]).trim(), "", "nobody holds it now");
    lab.cli_ok("A", &["promote"]);
    assert!(lab.has_vip6("A"));
}

#[test]
fn dual_stack_vips_move_together_and_demote_removes_both() {
    let lab = lab_or_skip!("ds");
    for n in ["A", "B"] {
        lab.write_config_net(n, "", NET_DUAL);
    }
    lab.cli_ok("B", &["promote", "--reason", "first"]);
    assert!(lab.has_vip("B") && lab.has_vip6("B"));
    assert!(lab.observer_reaches_vip() && lab.observer_reaches_vip6());
    assert_eq!(lab.observed_mac6().as_deref(), Some(lab.mac("B").as_str()));

    // While B still holds only the IPv6 VIP, A refuses the whole promote: it takes neither address.
    lab.cli_ok("B", &["demote"]);
    ok(Command::new(IP).args(["-n", &lab.ns("B"), "addr", "add", &format!("{VIP6}/64"), "dev", "vethB", "nodad"]));
    let out = lab.cli("A", &["promote", "--reason", "half split"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains(VIP6) && err.contains(&lab.mac("B")), "{err}");
    assert!(!lab.has_vip("A") && !lab.has_vip6("A"), "a refused promote added an address");
    ok(Command::new(IP).args(["-n", &lab.ns("B"), "addr", "del", &format!("{VIP6}/64"), "dev", "vethB"]));

    let out = lab.cli("A", &["promote", "--reason", "handover"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!("MEASURED dual-stack promote in namespace A: {}", ms_from_stderr(&out));
    assert!(lab.has_vip("A") && lab.has_vip6("A"));
    assert!(!lab.has_vip("B") && !lab.has_vip6("B"));
    assert_eq!(lab.observed_mac().as_deref(), Some(lab.mac("A").as_str()), "IPv4 entry not moved");
    assert_eq!(lab.observed_mac6().as_deref(), Some(lab.mac("A").as_str()), "IPv6 entry not moved");
    assert!(lab.observer_reaches_vip() && lab.observer_reaches_vip6());
    let (r4, r6) = (lab.routes("A"), lab.routes6("A"));
    assert!(r4.contains("default via 10.77.0.100") && r4.contains("10.78.0.0/16 via 10.77.0.100"), "{r4}");
    assert!(r6.contains("default via fd77::100") && r6.contains("fd78::/48 via fd77::100"), "{r6}");

    lab.cli_ok("A", &["demote", "--reason", "maintenance"]);
    assert!(!lab.has_vip("A") && !lab.has_vip6("A"));
    let (r4, r6) = (lab.routes("A"), lab.routes6("A"));
    assert!(!r4.contains("default") && !r4.contains("10.78.0.0"), "{r4}");
    assert!(!r6.contains("default") && !r6.contains("fd78::"), "{r6}");
    assert!(!lab.observer_reaches_vip() && !lab.observer_reaches_vip6());
    // Demote again: nothing left to remove, still fine.
    lab.cli_ok("A", &["demote"]);
}
