//! One standby protecting several primaries (`[[primary]]` blocks, issue 14), as real `blockrep serve` and
//! `blockrep sync` processes on 127.0.0.1: three primaries with their own keys and the same volume name, two of
//! them syncing at once; a primary that asks for another primary's volume, or claims another primary's name, is
//! refused and nothing is written; `promote --for` takes over one primary only (its services, its shadows), the
//! others' syncs are refused with the alarm `unprotected/<node>` unless `keep_protecting`; one takeover at a time,
//! by priority when two start together; a maintenance lock refuses `promote --for`. The virtual-IP part runs in
//! network namespaces (root).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use super::keepalived::{install_notify, start_keepalived, KEEPALIVED};
use super::role_cli::{is_root, Lan};
use super::*;

const SIZE: usize = 2 << 20;

struct Site {
    dir: tempfile::TempDir,
    serve: Option<Child>,
    addr: String,
    /// The namespaces when the primaries' role sections have virtual IPs (root).
    lan: Option<Lan>,
}

impl Site {
    /// Three primaries p1..p3 (own key, source `src-pN.img`, volume `data`; p1 also `extra`) and standby `s`.
    fn new(lan: Option<Lan>) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let s = Site { dir, serve: None, addr: String::new(), lan };
        for (i, p) in ["p1", "p2", "p3"].iter().enumerate() {
            let o = run(blockrep().arg("keygen").arg(s.path(&format!("{p}.key"))));
            assert!(o.status.success(), "keygen: {}", stderr(&o));
            // The standby's copy of the primary's key, as an operator copies it over.
            std::fs::copy(s.path(&format!("{p}.key")), s.path(&format!("s-{p}.key"))).unwrap();
            write_volume(&s.path(&format!("src-{p}.img")), SIZE, 5 + i as u64);
            std::fs::write(s.path(&format!("shadow-{p}.img")), vec![0u8; SIZE]).unwrap();
        }
        write_volume(&s.path("src-p1-extra.img"), SIZE, 99);
        std::fs::write(s.path("shadow-p1-extra.img"), vec![0u8; SIZE]).unwrap();
        s.standby_config("keep_protecting = false");
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The standby's configuration; `extra` goes into `[standby]`.
    fn standby_config(&self, extra: &str) -> PathBuf {
        let mut text = format!(
            "node = \"s\"\nstate_dir = {:?}\n[standby]\nlisten = \"127.0.0.1:0\"\ntakeover_settle = \"3s\"\n{extra}\n\
             [monitoring]\nmetrics_file = {:?}\nmetrics_interval = \"1s\"\n",
            self.path("state-s"),
            self.path("s.prom")
        );
        for (p, prio) in [("p1", 100), ("p2", 50), ("p3", 200)] {
            text += &format!(
                "[[primary]]\nnode = \"{p}\"\nkey_file = {:?}\npriority = {prio}\n\
                 [[primary.volume]]\nname = \"data\"\nshadow = {:?}\n",
                self.path(&format!("s-{p}.key")),
                self.path(&format!("shadow-{p}.img"))
            );
            if p == "p1" {
                text +=
                    &format!("[[primary.volume]]\nname = \"extra\"\nshadow = {:?}\n", self.path("shadow-p1-extra.img"));
            }
            if self.lan.is_none() {
                continue;
            }
            let vip = match p {
                "p1" => "10.77.8.61/24",
                "p2" => "10.77.8.62/24",
                _ => "10.77.8.63/24",
            };
            text += &format!(
                "[primary.role]\ninterface = \"eth0\"\nvip = \"{vip}\"\n[primary.role.garp]\ncount = 1\n\
                 interval_ms = 10\n[primary.role.services]\n\
                 primary_only = [{{ hook = \"echo $BLOCKREP_ACTION >> {}\" }}]\n",
                self.path(&format!("app-{p}.log")).display()
            );
        }
        let path = self.path("s.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Primary `p`'s configuration: its name `node`, key `key`, and the volumes `(name, source)`.
    fn primary_config(
        &self,
        p: &str,
        node: &str,
        key: &str,
        volumes: &[(&str, &str)],
        bwlimit: Option<&str>,
    ) -> PathBuf {
        let mut text = format!(
            "node = \"{node}\"\nkey_file = {:?}\nstate_dir = {:?}\n[primary]\npeer = \"{}\"\n",
            self.path(key),
            self.path(&format!("state-{p}")),
            self.addr
        );
        if let Some(b) = bwlimit {
            text += &format!("bwlimit = \"{b}\"\n");
        }
        for (name, src) in volumes {
            text += &format!("[[volume]]\nname = \"{name}\"\nsource = {:?}\n", self.path(src));
        }
        let names: Vec<&str> = volumes.iter().map(|(n, _)| *n).collect();
        let path = self.path(&format!("{p}-{node}-{}-{}.toml", names.join("-"), bwlimit.unwrap_or("")));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn own(&self, p: &str) -> PathBuf {
        let src = format!("src-{p}.img");
        let mut vols = vec![("data", src.as_str())];
        if p == "p1" {
            vols.push(("extra", "src-p1-extra.img"));
        }
        self.primary_config(p, p, &format!("{p}.key"), &vols, None)
    }

    /// `blockrep` on the standby (in namespace `a` when there is one).
    fn blockrep(&self) -> std::process::Command {
        match &self.lan {
            Some(l) => l.blockrep("a"),
            None => blockrep(),
        }
    }

    fn start_serve(&mut self) {
        let (child, addr) = spawn_serve(
            self.blockrep()
                .args(["serve", "--announce", "--config"])
                .arg(self.path("s.toml"))
                .env("BLOCKREP_LOG", "info")
                .stderr(Stdio::null()),
        );
        self.addr = addr;
        self.serve = Some(child);
    }

    fn sync(&self, cfg: &Path) -> std::process::Output {
        run(self.blockrep().args(["sync", "--json", "--config"]).arg(cfg))
    }

    fn s(&self, args: &[&str]) -> std::process::Output {
        run(self.blockrep().args(args).arg("--config").arg(self.path("s.toml")))
    }

    fn status(&self) -> serde_json::Value {
        let o = self.s(&["status", "--json"]);
        assert!(matches!(o.status.code(), Some(0 | 1)), "status: {}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("status: {e}: {}", stdout(&o)))
    }

    fn same(&self, a: &str, b: &str) -> bool {
        std::fs::read(self.path(a)).unwrap() == std::fs::read(self.path(b)).unwrap()
    }

    fn digest(&self, f: &str) -> blake3::Hash {
        blake3::hash(&std::fs::read(self.path(f)).unwrap())
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The raised alarms' keys (`kind/volume`).
fn alarm_keys(st: &serde_json::Value) -> Vec<String> {
    st["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| match a["volume"].as_str() {
            Some(v) => format!("{}/{v}", a["kind"].as_str().unwrap()),
            None => a["kind"].as_str().unwrap().to_owned(),
        })
        .collect()
}

fn primary_entry<'a>(st: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    st["primaries"].as_array().unwrap().iter().find(|p| p["node"] == node).unwrap_or_else(|| panic!("{node}: {st}"))
}

#[test]
fn one_standby_protects_three_primaries_each_with_its_own_key_and_volumes() {
    let mut site = Site::new(None);
    site.start_serve();
    let (c1, c2, c3) = (site.own("p1"), site.own("p2"), site.own("p3"));

    // Two primaries sync at once into the same standby; both volumes are called "data".
    let (h1, h2) = {
        let (a, b) = (c1.clone(), c2.clone());
        let s1 = std::thread::spawn(move || run(blockrep().args(["sync", "--json", "--config"]).arg(a)));
        let s2 = std::thread::spawn(move || run(blockrep().args(["sync", "--json", "--config"]).arg(b)));
        (s1.join().unwrap(), s2.join().unwrap())
    };
    assert!(h1.status.success(), "p1: {}", stderr(&h1));
    assert!(h2.status.success(), "p2: {}", stderr(&h2));
    let o = site.sync(&c3);
    assert!(o.status.success(), "p3: {}", stderr(&o));
    for p in ["p1", "p2", "p3"] {
        assert!(site.same(&format!("src-{p}.img"), &format!("shadow-{p}.img")), "{p}'s shadow differs");
    }
    assert!(site.same("src-p1-extra.img", "shadow-p1-extra.img"));
    // Each primary's state is its own: same volume name, separate generation histories.
    for p in ["p1", "p2", "p3"] {
        assert!(site.path(&format!("state-s/primaries/{p}/standby/data")).is_dir(), "{p}");
    }

    // p2 asks for p1's volume "extra": refused by name, and nothing is written to p1's shadow.
    let before = site.digest("shadow-p1-extra.img");
    write_volume(&site.path("src-p2-fake.img"), SIZE, 1234);
    let bad = site.primary_config("p2", "p2", "p2.key", &[("extra", "src-p2-fake.img")], None);
    let o = site.sync(&bad);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not configured for primary p2") && stderr(&o).contains("its own volumes"),
        "{}",
        stderr(&o)
    );
    assert_eq!(site.digest("shadow-p1-extra.img"), before, "p1's shadow was written by p2's session");

    // p2 claiming to be p1 (p2's key): authentication fails, exit 5, nothing written.
    let before = site.digest("shadow-p1.img");
    let bad = site.primary_config("p2", "p1", "p2.key", &[("data", "src-p2-fake.img")], None);
    let o = site.sync(&bad);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("authentication failed"), "{}", stderr(&o));
    assert_eq!(site.digest("shadow-p1.img"), before);
    // A node the standby does not protect is told so (exit 5).
    let bad = site.primary_config("p2", "px", "p2.key", &[("data", "src-p2-fake.img")], None);
    let o = site.sync(&bad);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("node px is not a primary of standby s"), "{}", stderr(&o));

    // status lists every protected primary.
    let st = site.status();
    assert_eq!(st["primaries"].as_array().unwrap().len(), 3, "{st}");
    for p in ["p1", "p2", "p3"] {
        let e = primary_entry(&st, p);
        assert_eq!(e["acting"], false, "{e}");
        assert!(e["refused"].is_null(), "{e}");
        assert_eq!(e["status"]["volumes"][0]["generation"], 1, "{e}");
    }
    let text = stdout(&site.s(&["status"]));
    assert!(text.contains("standby protecting 3 primaries (p1, p2, p3)"), "{text}");
    // serve's metrics file has every primary's volumes, told apart by a `primary` label (all are called "data").
    let prom = site.path("s.prom");
    let want = |p: &str| format!("blockrep_generation{{node=\"s\",primary=\"{p}\",volume=\"data\"}} 1\n");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let metrics = loop {
        let m = std::fs::read_to_string(&prom).unwrap_or_default();
        if ["p1", "p2", "p3"].iter().all(|p| m.contains(&want(p))) || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    for p in ["p1", "p2", "p3"] {
        assert!(metrics.contains(&want(p)), "{p}: {metrics}");
    }
    assert!(metrics.contains("blockrep_generation{node=\"s\",primary=\"p1\",volume=\"extra\"} 1\n"), "{metrics}");
    node::metrics::check_text_format(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    assert!(text.contains("primary p3 (priority 200, fallback manual): protected"), "{text}");

    // One primary's full sync running does not stop another primary's incremental sync from completing.
    write_volume(&site.path("src-p1.img"), SIZE, 77); // half the volume changed: about 4 s at 256 KiB/s
    let slow = site.primary_config("p1", "p1", "p1.key", &[("data", "src-p1.img")], Some("256K"));
    let mut long = blockrep().args(["sync", "--config"]).arg(&slow).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    scribble(&site.path("src-p2.img"), &[3, 100], 7);
    let o = site.sync(&c2);
    assert!(o.status.success(), "p2 incremental during p1's sync: {}", stderr(&o));
    assert!(long.try_wait().unwrap().is_none(), "p1's sync should still be running (256 KiB/s for 1 MiB)");
    assert!(site.same("src-p2.img", "shadow-p2.img"));
    assert!(long.wait().unwrap().success());
    assert!(site.same("src-p1.img", "shadow-p1.img"));

    // Key rotation of one primary's key, with syncs before, during and after: the standby starts it, accepts
    // either key meanwhile, and both sides finish it in the first session under the new key; the others' keys
    // are untouched.
    let key_id =
        |st: &serde_json::Value, p: &str| primary_entry(st, p)["status"]["key"]["id"].as_str().unwrap().to_owned();
    let before = site.status();
    let o = run(blockrep().args(["keygen", "--rotate"]).arg(site.path("s-p3.key")));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(primary_entry(&site.status(), "p3")["status"]["key"]["rotation"], "pending");
    scribble(&site.path("src-p3.img"), &[1], 1);
    let o = site.sync(&c3); // p3 still has only the old key: accepted during the rotation
    assert!(o.status.success(), "during: {}", stderr(&o));
    std::fs::copy(site.path("s-p3.key.next"), site.path("p3.key.next")).unwrap();
    scribble(&site.path("src-p3.img"), &[2], 2);
    let o = site.sync(&c3); // both hold the next key: it becomes current on both
    assert!(o.status.success(), "switching: {}", stderr(&o));
    assert!(!site.path("s-p3.key.next").exists() && !site.path("p3.key.next").exists(), "rotation finished");
    let after = site.status();
    assert_eq!(primary_entry(&after, "p3")["status"]["key"]["rotation"], "none", "{after}");
    assert_ne!(key_id(&after, "p3"), key_id(&before, "p3"));
    assert_eq!(key_id(&after, "p1"), key_id(&before, "p1"), "another primary's key is not touched");
    assert_eq!(std::fs::read(site.path("p3.key")).unwrap(), std::fs::read(site.path("s-p3.key")).unwrap());
    scribble(&site.path("src-p3.img"), &[3], 3);
    assert!(site.sync(&c3).status.success(), "after the rotation");
    assert!(site.same("src-p3.img", "shadow-p3.img"));

    // deconfigure removes every primary's state with the node's own; the shadows stay.
    if let Some(mut c) = site.serve.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let o = site.s(&["deconfigure"]);
    assert!(o.status.success(), "deconfigure: {}{}", stdout(&o), stderr(&o));
    assert!(!site.path("state-s/primaries").exists(), "{}", stdout(&o));
    assert!(site.same("src-p3.img", "shadow-p3.img"));
}

#[test]
fn takeover_of_one_primary_by_priority_with_keep_protecting_and_lock() {
    if !is_root() {
        eprintln!("skipping: the primaries' virtual IPs need network namespaces, which need root (CI runs as root)");
        return;
    }
    let mut site = Site::new(Some(Lan::named("n2")));
    site.start_serve();
    for p in ["p1", "p2", "p3"] {
        let o = site.sync(&site.own(p));
        assert!(o.status.success(), "{p}: {}", stderr(&o));
    }
    // Without --for the standby does not know which primary to take over.
    let o = site.s(&["promote"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("say which with --for NODE") && stderr(&o).contains("p1, p2, p3"), "{}", stderr(&o));

    // A lock on p3 refuses its takeover (exit 4), --force included.
    let o = site.s(&["lock", "p3", "--reason", "disk swap"]);
    assert!(o.status.success(), "lock: {}", stderr(&o));
    let o = site.s(&["promote", "--for", "p3", "--force"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("p3") && stderr(&o).contains("disk swap"), "{}", stderr(&o));
    assert!(site.s(&["unlock", "p3"]).status.success());

    // Takeover of p1 only: its services start, its shadows are released; the others stay held and untouched.
    let o = site.s(&["promote", "--for", "p1", "--reason", "p1 died"]);
    assert!(o.status.success(), "promote --for p1: {}", stderr(&o));
    assert_eq!(std::fs::read_to_string(site.path("app-p1.log")).unwrap().trim(), "start");
    assert!(!site.path("app-p2.log").exists() && !site.path("app-p3.log").exists());
    std::thread::sleep(std::time::Duration::from_millis(600)); // serve's hold check
    std::fs::OpenOptions::new().write(true).open(site.path("shadow-p1.img")).unwrap(); // production now
    let st = site.status();
    assert_eq!(primary_entry(&st, "p1")["acting"], true, "{st}");
    let alarms = alarm_keys(&st);
    assert!(alarms.contains(&"unprotected/p2".into()) && alarms.contains(&"unprotected/p3".into()), "{st}");
    assert!(!alarms.contains(&"unprotected/p1".into()), "{st}");
    let text = stdout(&site.s(&["status"]));
    assert!(text.contains("ACTING for p1"), "{text}");
    assert!(text.contains("primary p2 (priority 50, fallback manual): UNPROTECTED"), "{text}");

    // While acting for p1 (keep_protecting = false) p2's sync is refused with a clear message; its shadow stays.
    let before = site.digest("shadow-p2.img");
    scribble(&site.path("src-p2.img"), &[1, 9], 3);
    let o = site.sync(&site.own("p2"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("acts for primary p1") && stderr(&o).contains("keep_protecting"), "{}", stderr(&o));
    assert_eq!(site.digest("shadow-p2.img"), before);
    // p1's own sync is refused too: the standby is p1's production now.
    let o = site.sync(&site.own("p1"));
    assert!(!o.status.success() && stderr(&o).contains("acts for primary p1"), "{}", stderr(&o));

    // One takeover at a time.
    let o = site.s(&["promote", "--for", "p3"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("already acts for primary p1"), "{}", stderr(&o));

    // keep_protecting = true: the others' syncs are accepted while acting for p1.
    site.standby_config("keep_protecting = true");
    if let Some(mut c) = site.serve.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    site.start_serve();
    let o = site.sync(&site.own("p2"));
    assert!(o.status.success(), "p2 with keep_protecting: {}", stderr(&o));
    assert!(site.same("src-p2.img", "shadow-p2.img"));
    assert!(!alarm_keys(&site.status()).contains(&"unprotected/p2".into()), "cleared with keep_protecting");

    // Back to p1 as primary of its own (hand back by hand), then two primaries fail at once: p3 (priority 200)
    // wins over p2 (50); p2's takeover is refused naming p3.
    let site_cfg = site.standby_config("keep_protecting = false");
    let o = site.s(&["demote", "--for", "p1"]);
    assert!(o.status.success(), "demote --for p1: {}", stderr(&o));
    let (a, b) = (site_cfg.clone(), site_cfg);
    let (mut c2, mut c3) = (site.blockrep(), site.blockrep());
    let t2 = std::thread::spawn(move || run(c2.args(["promote", "--for", "p2", "--config"]).arg(a)));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let t3 = std::thread::spawn(move || run(c3.args(["promote", "--for", "p3", "--config"]).arg(b)));
    let (o2, o3) = (t2.join().unwrap(), t3.join().unwrap());
    assert!(o3.status.success(), "p3: {}", stderr(&o3));
    assert_eq!(o2.status.code(), Some(4), "p2: {}", stderr(&o2));
    assert!(
        stderr(&o2).contains("primary p3 (priority 200)") && stderr(&o2).contains("outranks p2"),
        "{}",
        stderr(&o2)
    );
    let st = site.status();
    assert_eq!(primary_entry(&st, "p3")["acting"], true, "{st}");
    assert_eq!(primary_entry(&st, "p2")["acting"], false, "{st}");
    let log = stdout(&site.s(&["log"]));
    assert!(log.contains("[for p2] takeover refused"), "{log}");
    assert!(log.contains("[for p3]"), "{log}");
}

#[test]
fn takeover_of_one_primary_moves_only_its_virtual_ip() {
    skip_unless_root!();
    let lan = Lan::named("n1");
    let d = tempfile::tempdir().unwrap();
    let path = |n: &str| d.path().join(n);
    let mut text = format!("node = \"s\"\nstate_dir = {:?}\n[standby]\nlisten = \"127.0.0.1:0\"\n", path("state"));
    for (p, vip) in [("p1", "10.77.8.50/24"), ("p2", "10.77.8.51/24")] {
        assert!(run(blockrep().arg("keygen").arg(path(&format!("{p}.key")))).status.success());
        write_volume(&path(&format!("src-{p}.img")), 1 << 20, 3);
        std::fs::write(path(&format!("shadow-{p}.img")), vec![0u8; 1 << 20]).unwrap();
        text += &format!(
            "[[primary]]\nnode = \"{p}\"\nkey_file = {:?}\n[[primary.volume]]\nname = \"vol\"\nshadow = {:?}\n\
             [primary.role]\ninterface = \"eth0\"\nvip = \"{vip}\"\nstate_dir = {:?}\n[primary.role.garp]\ncount = 1\n\
             interval_ms = 10\n",
            path(&format!("{p}.key")),
            path(&format!("shadow-{p}.img")),
            path(&format!("role-{p}"))
        );
    }
    let cfg = path("s.toml");
    std::fs::write(&cfg, &text).unwrap();
    let (mut serve, addr) =
        spawn_serve(lan.blockrep("a").args(["serve", "--announce", "--config"]).arg(&cfg).stderr(Stdio::null()));
    for p in ["p1", "p2"] {
        let pc = path(&format!("{p}.toml"));
        std::fs::write(
            &pc,
            format!(
                "node = \"{p}\"\nkey_file = {:?}\nstate_dir = {:?}\n[primary]\npeer = \"{addr}\"\n[[volume]]\n\
                 name = \"vol\"\nsource = {:?}\n",
                path(&format!("{p}.key")),
                path(&format!("state-{p}")),
                path(&format!("src-{p}.img"))
            ),
        )
        .unwrap();
        let o = run(lan.blockrep("a").args(["sync", "--config"]).arg(&pc));
        assert!(o.status.success(), "sync {p}: {}", stderr(&o));
    }
    let vips = |ns: &str| {
        let o =
            std::process::Command::new("ip").args(["-n", &lan.ns(ns), "-4", "addr", "show", "dev", "eth0"]).output();
        String::from_utf8_lossy(&o.unwrap().stdout).into_owned()
    };
    let o = run(lan.blockrep("a").args(["promote", "--for", "p1", "--config"]).arg(&cfg));
    assert!(o.status.success(), "promote --for p1: {}", stderr(&o));
    let shown = vips("a");
    assert!(shown.contains("10.77.8.50/24"), "p1's VIP taken over: {shown}");
    assert!(!shown.contains("10.77.8.51/"), "p2's VIP must stay where it is: {shown}");
    // A reboot of the standby loses p1's address; `reconcile` without --for (the boot unit) settles every
    // primary: p1's address comes back, p2 (not taken over) is left alone. A node without [role] has nothing to do.
    std::process::Command::new("ip")
        .args(["-n", &lan.ns("a"), "addr", "del", "10.77.8.50/24", "dev", "eth0"])
        .status()
        .unwrap();
    let o = run(lan.blockrep("a").args(["reconcile", "--json", "--config"]).arg(&cfg));
    assert!(o.status.success(), "reconcile: {}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let action = |p: &str| lines.iter().find(|v| v["primary"] == p).map(|v| v["action"].clone());
    assert_eq!((action("p1"), action("p2")), (Some("reasserted".into()), Some("none".into())), "{lines:?}");
    assert!(vips("a").contains("10.77.8.50/24") && !vips("a").contains("10.77.8.51/"), "{}", vips("a"));
    let o = run(lan.blockrep("a").args(["reconcile", "--config"]).arg(path("p1.toml")));
    assert!(o.status.success() && stdout(&o).contains("nothing to do"), "{}\n{}", stdout(&o), stderr(&o));
    // p2's shadow is not p1's: with keep_protecting = false its sync is refused while acting for p1.
    let o = run(lan.blockrep("a").args(["sync", "--config"]).arg(path("p2.toml")));
    assert!(stderr(&o).contains("acts for primary p1"), "{}", stderr(&o));
    let o = run(lan.blockrep("a").args(["demote", "--for", "p1", "--config"]).arg(&cfg));
    assert!(o.status.success(), "demote --for p1: {}", stderr(&o));
    assert!(!vips("a").contains("10.77.8.50/"), "{}", vips("a"));
    let _ = serve.kill();
    let _ = serve.wait();
}

/// Primary `pa` (namespace b, 10.77.8.2) and standby `s` protecting it and `pb` (namespace a, 10.77.8.1); pa's
/// service address 10.77.8.70 moves between them.
struct Fallback {
    lan: Lan,
    dir: tempfile::TempDir,
    serves: Vec<Child>,
}

impl Fallback {
    fn new() -> Fallback {
        let f = Fallback { lan: Lan::named("fb"), dir: tempfile::tempdir().unwrap(), serves: Vec::new() };
        for p in ["pa", "pb"] {
            assert!(run(blockrep().arg("keygen").arg(f.path(&format!("{p}.key")))).status.success());
            write_volume(&f.path(&format!("vol-{p}.img")), SIZE, 21);
            std::fs::write(f.path(&format!("shadow-{p}.img")), vec![0u8; SIZE]).unwrap();
        }
        let role = |log: &str| {
            format!(
                "interface = \"eth0\"\nvip = \"10.77.8.70/24\"\n[ROLE.garp]\ncount = 1\ninterval_ms = 10\n\
                 [ROLE.services]\nprimary_only = [{{ hook = \"echo $BLOCKREP_ACTION >> {}\" }}]\n",
                f.path(log).display()
            )
        };
        let pa = format!(
            "node = \"pa\"\nkey_file = {:?}\nstate_dir = {:?}\n[standby]\nlisten = \"10.77.8.2:7788\"\n\
             peer = \"10.77.8.1:7788\"\n[primary]\npeer = \"10.77.8.1:7788\"\n[[volume]]\nname = \"data\"\n\
             source = {:?}\nshadow = {:?}\n[role]\n{}",
            f.path("pa.key"),
            f.path("state-pa"),
            f.path("vol-pa.img"),
            f.path("vol-pa.img"),
            role("app-pa.log").replace("ROLE", "role")
        );
        std::fs::write(f.path("pa.toml"), pa).unwrap();
        let pb = format!(
            "node = \"pb\"\nkey_file = {:?}\nstate_dir = {:?}\n[primary]\npeer = \"10.77.8.1:7788\"\n[[volume]]\n\
             name = \"data\"\nsource = {:?}\n",
            f.path("pb.key"),
            f.path("state-pb"),
            f.path("vol-pb.img"),
        );
        std::fs::write(f.path("pb.toml"), pb).unwrap();
        f.standby("fallback = \"manual\"");
        f
    }

    fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    fn standby(&self, fallback: &str) {
        let role = format!(
            "interface = \"eth0\"\nvip = \"10.77.8.70/24\"\n[primary.role.garp]\ncount = 1\ninterval_ms = 10\n\
             [primary.role.services]\nprimary_only = [{{ hook = \"echo $BLOCKREP_ACTION >> {}\" }}]\n",
            self.path("app-s.log").display()
        );
        let text = format!(
            "node = \"s\"\nstate_dir = {:?}\n[standby]\nlisten = \"10.77.8.1:7788\"\n\
             [[primary]]\nnode = \"pa\"\nkey_file = {:?}\naddress = \"10.77.8.2:7788\"\n{fallback}\nmin_hold = \"1s\"\n\
             [[primary.volume]]\nname = \"data\"\nshadow = {:?}\n[primary.role]\n{}\
             [[primary]]\nnode = \"pb\"\nkey_file = {:?}\n[[primary.volume]]\nname = \"data\"\nshadow = {:?}\n",
            self.path("state-s"),
            self.path("pa.key"),
            self.path("shadow-pa.img"),
            role,
            self.path("pb.key"),
            self.path("shadow-pb.img"),
        );
        std::fs::write(self.path("s.toml"), text).unwrap();
    }

    /// `blockrep ARGS --config <node>.toml` in the node's namespace (s: a, pa and pb: b).
    fn br(&self, node: &str, args: &[&str]) -> std::process::Output {
        let ns = if node == "s" { "a" } else { "b" };
        run(self.lan.blockrep(ns).args(args).arg("--config").arg(self.path(&format!("{node}.toml"))))
    }

    fn ok(&self, node: &str, args: &[&str]) -> String {
        let o = self.br(node, args);
        assert!(o.status.success(), "{node} {args:?}: {}", stderr(&o));
        stdout(&o)
    }

    fn serve(&mut self, node: &str) {
        let ns = if node == "s" { "a" } else { "b" };
        let (c, _) = spawn_serve(
            self.lan
                .blockrep(ns)
                .args(["serve", "--announce", "--config"])
                .arg(self.path(&format!("{node}.toml")))
                .env("BLOCKREP_LOG", "info")
                .stderr(std::fs::File::create(self.path(&format!("serve-{node}.log"))).unwrap()),
        );
        self.serves.push(c);
    }

    fn vip(&self, ns: &str) -> bool {
        let ns = self.lan.ns(ns);
        let o = std::process::Command::new("ip").args(["-n", &ns, "-4", "addr", "show", "dev", "eth0"]).output();
        String::from_utf8_lossy(&o.unwrap().stdout).contains("10.77.8.70/")
    }

    fn same(&self, a: &str, b: &str) -> bool {
        std::fs::read(self.path(a)).unwrap() == std::fs::read(self.path(b)).unwrap()
    }

    fn role(&self, node: &str, for_: Option<&str>) -> String {
        let mut args = vec!["status", "--json"];
        if let Some(p) = for_ {
            args.extend(["--for", p]);
        }
        let o = self.br(node, &args);
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {o:?}"));
        v["role"].as_str().unwrap().to_owned()
    }
}

impl Drop for Fallback {
    fn drop(&mut self) {
        for c in &mut self.serves {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `switchover --for pa` on the standby of two primaries while pa is alive: pa stops its service, syncs a last
/// time (its last write reaches s), demotes, and s takes over pa only; pb's syncs are then refused (keep_protecting
/// off) until s hands pa back.
#[test]
fn the_standby_of_two_primaries_takes_one_over_by_a_planned_switchover() {
    skip_unless_root!();
    let mut f = Fallback::new();
    f.ok("pa", &["promote", "--force", "--reason", "initial"]);
    f.serve("s");
    f.ok("pa", &["sync"]);
    f.ok("pb", &["sync"]);
    f.serve("pa");
    scribble(&f.path("vol-pa.img"), &[3, 90], 13); // written after the last sync: the final sync carries it

    let out = f.ok("s", &["switchover", "--for", "pa", "--reason", "maintenance of pa"]);
    assert!(f.vip("a") && !f.vip("b"), "pa's address moved to s: {out}");
    assert!(f.same("vol-pa.img", "shadow-pa.img"), "pa's last write is on s");
    assert_eq!(f.role("pa", None), "standby");
    assert_eq!(f.role("s", Some("pa")), "primary");
    assert_eq!(f.role("s", Some("pb")), "standby");
    let app = |n: &str| std::fs::read_to_string(f.path(&format!("app-{n}.log"))).unwrap();
    assert_eq!(app("pa").split_whitespace().last(), Some("stop"), "{}", app("pa"));
    assert_eq!(app("s").split_whitespace().collect::<Vec<_>>(), ["start"]);
    let o = f.br("pb", &["sync"]);
    assert!(!o.status.success() && stderr(&o).contains("acts for primary pa"), "{}", stderr(&o));
    let log = f.ok("pa", &["log"]);
    assert!(log.contains("final-sync: switchover requested by s") && log.contains("demote:"), "{log}");

    // Back: pa (now s's standby for its volume) switches over; pb is protected again.
    f.ok("pa", &["switchover", "--reason", "maintenance done"]);
    assert!(f.vip("b") && !f.vip("a"));
    assert_eq!(f.role("s", Some("pa")), "standby");
    f.ok("pb", &["sync"]);
}

#[test]
fn a_repaired_primary_takes_its_service_back_by_hand_and_automatically() {
    skip_unless_root!();
    let mut f = Fallback::new();
    f.ok("pa", &["promote", "--force", "--reason", "initial"]);
    assert!(f.vip("b"));
    f.serve("s");
    f.ok("pa", &["sync"]);
    f.ok("pb", &["sync"]);
    assert!(f.same("vol-pa.img", "shadow-pa.img"));

    // pa fails (its service stops, its address goes); s takes over pa only and writes in production.
    f.ok("pa", &["demote", "--reason", "pa fails"]);
    f.ok("s", &["promote", "--for", "pa", "--reason", "pa died"]);
    assert!(f.vip("a") && !f.vip("b"));
    scribble(&f.path("shadow-pa.img"), &[2, 40, 300], 9);

    // pa is repaired and back as s's standby; by hand: s syncs pa's volume back, then pa switches over.
    f.serve("pa");
    let out = f.ok("s", &["sync", "--for", "pa", "--json"]);
    assert!(f.same("vol-pa.img", "shadow-pa.img"), "reverse sync: {out}");
    scribble(&f.path("shadow-pa.img"), &[7], 10); // the last write on s before the switchover
    f.ok("pa", &["switchover", "--reason", "pa repaired"]);
    assert!(f.vip("b") && !f.vip("a"), "the service address is back on pa");
    assert!(f.same("vol-pa.img", "shadow-pa.img"), "the last write made on s is on pa");
    assert_eq!(std::fs::read_to_string(f.path("app-s.log")).unwrap().split_whitespace().last(), Some("stop"));
    assert_eq!(f.role("s", Some("pa")), "standby");
    // s protects pa again: pa's next sync is accepted, and pb's too.
    scribble(&f.path("vol-pa.img"), &[11], 11);
    f.ok("pa", &["sync"]);
    assert!(f.same("vol-pa.img", "shadow-pa.img"));
    f.ok("pb", &["sync"]);

    // Automatic: pa fails again, s takes over; once pa's serve answers as a standby and min_hold (1 s) passed,
    // s syncs pa back and asks it to take its service back, with nobody typing anything.
    f.standby("fallback = \"automatic\"");
    let mut old = f.serves.remove(0);
    let _ = old.kill();
    let _ = old.wait();
    f.serve("s");
    f.ok("pa", &["demote", "--reason", "pa fails again"]);
    f.ok("s", &["promote", "--for", "pa", "--reason", "pa died again"]);
    scribble(&f.path("shadow-pa.img"), &[5, 77], 12);
    let written = std::fs::read(f.path("shadow-pa.img")).unwrap();
    let t = std::time::Instant::now();
    while f.role("pa", None) != "primary" {
        assert!(t.elapsed() < std::time::Duration::from_secs(90), "no automatic fallback within 90 s");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_eq!(std::fs::read(f.path("vol-pa.img")).unwrap(), written, "s's writes are on pa");
    let t = std::time::Instant::now();
    while f.role("s", Some("pa")) != "standby" {
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(f.vip("b") && !f.vip("a"));
    let log = f.ok("s", &["log"]);
    assert!(log.contains("[for pa] fallback: automatic fallback"), "{log}");
}

/// keepalived on the standby with one VRRP instance per primary, each calling the contrib notify script with
/// `--for NODE`; the primaries' keepalived (one process in namespace b, two instances) dies at once: both
/// instances on the standby become MASTER together, and the priority rule takes over p3 (priority 200), not p2
/// (50), whose notify is refused (exit 4) and leaves p2's address alone.
#[test]
fn keepalived_promotes_by_priority_when_two_primaries_fail_together() {
    skip_unless_root!();
    assert!(Path::new(KEEPALIVED).exists(), "{KEEPALIVED} is missing: scripts/deps.sh installs keepalived");
    let mut site = Site::new(Some(Lan::named("ka")));
    site.standby_config("keep_protecting = false");
    site.start_serve();
    for p in ["p2", "p3"] {
        let o = site.sync(&site.own(p));
        assert!(o.status.success(), "{p}: {}", stderr(&o));
    }
    let notify = install_notify(site.dir.path());
    let conf = |node: &str, prio: u32, with_notify: bool| {
        let mut text = format!("global_defs {{\n router_id {node}\n script_user root\n enable_script_security\n}}\n");
        for (p, vrid) in [("p2", 82), ("p3", 83)] {
            let n = if with_notify {
                format!(
                    " notify \"{} --blockrep {} --config {} --for {p}\"\n",
                    notify.display(),
                    env!("CARGO_BIN_EXE_blockrep"),
                    site.path("s.toml").display()
                )
            } else {
                String::new()
            };
            text += &format!(
                "vrrp_instance {p} {{\n state BACKUP\n nopreempt\n interface eth0\n virtual_router_id {vrid}\n \
                 priority {prio}\n advert_int 1\n{n}}}\n"
            );
        }
        let path = site.path(&format!("keepalived-{node}.conf"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let lan = site.lan.as_ref().unwrap();
    let start = |ns: &str, conf: &Path| start_keepalived(&lan.ns(ns), conf, &site.path(&format!("ka-{ns}")));
    // The primaries' VRRP (higher priority) first, so they are MASTER; then the standby's, BACKUP.
    let mut primaries = start("b", &conf("prim", 150, false));
    std::thread::sleep(std::time::Duration::from_secs(4));
    let mut standby = start("a", &conf("s", 100, true));
    std::thread::sleep(std::time::Duration::from_secs(3));
    let vips = || {
        let ns = lan.ns("a");
        let o = std::process::Command::new("ip").args(["-n", &ns, "-4", "addr", "show", "dev", "eth0"]).output();
        String::from_utf8_lossy(&o.unwrap().stdout).into_owned()
    };
    assert!(!vips().contains("10.77.8.62/") && !vips().contains("10.77.8.63/"), "{}", vips());
    // Both primaries fail at once.
    let _ = primaries.kill();
    let _ = primaries.wait();
    let t = std::time::Instant::now();
    let mut ok = false;
    while t.elapsed() < std::time::Duration::from_secs(30) {
        let st = site.status();
        if primary_entry(&st, "p3")["acting"] == true && primary_entry(&st, "p3")["status"]["role"] == "primary" {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // Let p2's refused takeover finish too.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let _ = standby.kill();
    let _ = standby.wait();
    let log = std::fs::read_to_string(site.path("ka-a/keepalived.log")).unwrap_or_default();
    assert!(ok, "p3 was not taken over: {}\n{log}", site.status());
    let shown = vips();
    assert!(shown.contains("10.77.8.63/"), "p3's address taken over: {shown}");
    assert!(!shown.contains("10.77.8.62/"), "p2's address must not be: {shown}");
    let st = site.status();
    assert_eq!(primary_entry(&st, "p2")["acting"], false, "{st}");
    let history = stdout(&site.s(&["log"]));
    assert!(history.contains("[for p2] takeover refused") && history.contains("outranks p2"), "{history}\n{log}");
}
